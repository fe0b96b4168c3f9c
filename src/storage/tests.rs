//! The conformance suite run against the sled store: a real sled database
//! in a temporary directory per check.

use super::conformance;
use super::SledStorage;
use crate::Store;

fn check(name: &str) {
    let dir = tempfile::tempdir().unwrap();
    let storage = SledStorage::new(Store::open(dir.path()).unwrap());
    futures_executor::block_on(conformance::run(name, &storage));
}

macro_rules! checks {
    ($($name:ident),* $(,)?) => {
        $(#[test]
        fn $name() {
            check(stringify!($name));
        })*

        #[test]
        fn every_check_runs_here() {
            let here = [$(stringify!($name)),*];
            assert_eq!(here.as_slice(), conformance::CHECKS);
        }
    };
}

checks!(
    directory_users_and_passwords,
    directory_aliases,
    directory_quotas,
    intake_local_then_durable,
    intake_spool_and_dispatch,
    mailbox_expunge_keeps_uidls,
    maildrop_lock_is_exclusive,
    queue_claim_is_exclusive,
    queue_expired_lease_is_claimable,
    queue_settle_defers_and_spools_notices,
    queue_hold_and_release,
    queue_claim_one,
    queue_listing_pages,
    ids_are_unique,
    history_in_order,
);

/// Routing over the seam asks the store per recipient: a user added
/// after a first decision counts at once, an alias is followed.
#[test]
fn decide_async_fetches_per_recipient() {
    use crate::routing::{decide_async, Route, Target};
    let dir = tempfile::tempdir().unwrap();
    let storage = SledStorage::new(Store::open(dir.path()).unwrap());
    let mut config = crate::Config::default().routing;
    config.local_domains = vec!["example.test".into()];
    let rcpt = crate::Address::parse("team@example.test", false).unwrap();
    let route = || futures_executor::block_on(decide_async(&config, &storage, &rcpt, false));
    let store = storage.store();
    store.add_user("alice@example.test", "pw").unwrap();
    let before = route().unwrap();
    assert!(!matches!(before, Route::Deliver(_)), "{before:?}");
    store
        .add_alias("team@example.test", "alice@example.test")
        .unwrap();
    store
        .add_alias("team@example.test", "bob@remote.test")
        .unwrap();
    match route().unwrap() {
        Route::Deliver(targets) => {
            assert!(targets.iter().any(
                |t| matches!(t, Target::Mailbox { mailbox, .. } if mailbox == "alice@example.test")
            ));
            assert!(targets
                .iter()
                .any(|t| matches!(t, Target::Remote { address } if address == "bob@remote.test")));
        }
        other => panic!("{other:?}"),
    }
}
