//! The storage seam's conformance suite (`postino_core::storage::conformance`)
//! against the PostgreSQL store: one throwaway cluster, a fresh database
//! per check.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use postino_core::storage::{conformance, Storage};
use postino_pg::testing::TestCluster;
use postino_pg::{PgOptions, PgStore};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_suite_on_postgres() {
    let cluster = Arc::new(TestCluster::start().expect("start a throwaway PostgreSQL"));
    let n = Arc::new(AtomicUsize::new(0));
    let fresh = {
        let cluster = cluster.clone();
        move || {
            let cluster = cluster.clone();
            let n = n.fetch_add(1, Ordering::Relaxed);
            Box::pin(async move {
                let url = cluster.create_database(&format!("check{n}")).unwrap();
                let store = PgStore::open(&PgOptions::new(url, "node-a")).unwrap();
                Arc::new(store) as Arc<dyn Storage>
            })
                as std::pin::Pin<Box<dyn std::future::Future<Output = Arc<dyn Storage>> + Send>>
        }
    };
    conformance::run_all(&fresh).await;
}
