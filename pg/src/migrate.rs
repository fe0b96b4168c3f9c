//! The schema, versioned in the repository: `migrations/V<n>__<name>.sql`,
//! applied in order at open, each in one transaction with its row in
//! `schema_version`. Nodes starting at once are serialised by a
//! transaction-scoped advisory lock, so each migration runs once. A
//! database whose schema is newer than this postino knows is refused (an
//! older node must not write records it does not understand).
//!
//! A table and twenty lines rather than a migration framework: postino
//! only ever moves forward, and this keeps the runner's own bookkeeping
//! visible in the same schema.

use deadpool_postgres::Object;
use postino_core::store::StoreError;

use crate::db_err;

/// The migrations, in order: (version, name, SQL).
const MIGRATIONS: &[(i32, &str, &str)] =
    &[(1, "initial", include_str!("../migrations/V1__initial.sql"))];

/// The schema version this postino writes (the last migration's).
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0 as u32;

/// Arbitrary key of the advisory lock that serialises migrations ("pstn").
const MIGRATION_LOCK: i64 = 0x7073_746e;

/// Brings the schema up to [`SCHEMA_VERSION`]; returns the version found.
pub(crate) async fn migrate(client: &mut Object) -> Result<u32, StoreError> {
    let tx = client.transaction().await.map_err(db_err)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(db_err)?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_version (
            version    integer PRIMARY KEY,
            name       text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )",
    )
    .await
    .map_err(db_err)?;
    let found: i32 = tx
        .query_one("SELECT coalesce(max(version), 0) FROM schema_version", &[])
        .await
        .map_err(db_err)?
        .get(0);
    if found as u32 > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            found: found as u32,
            expected: SCHEMA_VERSION,
        });
    }
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 > found) {
        tx.batch_execute(sql).await.map_err(db_err)?;
        tx.execute(
            "INSERT INTO schema_version (version, name) VALUES ($1, $2)",
            &[version, name],
        )
        .await
        .map_err(db_err)?;
        tracing::info!(version, name, "database schema migrated");
    }
    tx.commit().await.map_err(db_err)?;
    Ok(found as u32)
}
