//! Users, aliases and quotas. Nothing is cached: every lookup asks the
//! database, so a user or alias added through any node is seen by every
//! node at once (a lookup is one indexed read, a fraction of a message's
//! cost). A change also notifies `postino_users`, for nodes that keep
//! anything derived.

use std::sync::atomic::Ordering;

use postino_core::routing::MAX_ALIAS_DEPTH;
use postino_core::store::{
    canonical_mailbox as canonical, hash_password, QuotaSetting, StoreError, Usage,
};

use crate::{db_err, Db};

/// A user's quota stored for "unlimited".
const UNLIMITED: i64 = i64::MAX;

impl Db {
    pub(crate) async fn is_user(&self, address: &str) -> Result<bool, StoreError> {
        let Ok(address) = canonical(address) else {
            return Ok(false);
        };
        let row = self
            .query_cached("SELECT 1 FROM users WHERE address = $1", &[&address])
            .await?;
        Ok(row.is_some())
    }

    pub(crate) async fn alias(&self, alias: &str) -> Result<Option<Vec<String>>, StoreError> {
        let Ok(alias) = canonical(alias) else {
            return Ok(None);
        };
        let row = self
            .query_cached("SELECT targets FROM aliases WHERE alias = $1", &[&alias])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(crate) async fn users(&self) -> Result<Vec<String>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT address FROM users ORDER BY address COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    pub(crate) async fn aliases(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT alias, targets FROM aliases ORDER BY alias COLLATE \"C\"",
                &[],
            )
            .await
            .map_err(db_err)?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Adds a user with an already computed hash (`hash_password`, or an
    /// import).
    pub(crate) async fn add_user_hash(
        &self,
        address: &str,
        hash: &str,
        quota: Option<u64>,
    ) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let quota = quota.map(|q| q.min(UNLIMITED as u64) as i64);
        let client = self.client().await?;
        let n = client
            .execute(
                "INSERT INTO users (address, hash, quota) VALUES ($1, $2, $3) \
                 ON CONFLICT DO NOTHING",
                &[&address, &hash, &quota],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::UserExists(address));
        }
        notify_users(&client).await;
        Ok(())
    }

    pub(crate) async fn add_user(&self, address: &str, password: &str) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let hash = hash_off_thread(password).await?;
        self.add_user_hash(&address, &hash, None).await
    }

    pub(crate) async fn set_password(
        &self,
        address: &str,
        password: &str,
    ) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let hash = hash_off_thread(password).await?;
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE users SET hash = $2 WHERE address = $1",
                &[&address, &hash],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(address));
        }
        Ok(())
    }

    /// Removes the user and their mailbox in one transaction (shared
    /// content loses the references the entries held).
    pub(crate) async fn delete_user(&self, address: &str) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        let n = tx
            .execute("DELETE FROM users WHERE address = $1", &[&address])
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(address));
        }
        let ids: Vec<i64> = tx
            .query(
                "DELETE FROM mail WHERE mailbox = $1 AND content IS NULL RETURNING id",
                &[&address],
            )
            .await
            .map_err(db_err)?
            .iter()
            .map(|r| r.get(0))
            .collect();
        tx.execute("DELETE FROM mail WHERE mailbox = $1", &[&address])
            .await
            .map_err(db_err)?;
        crate::intake::release_all(&tx, &ids).await?;
        tx.commit().await.map_err(db_err)?;
        notify_users(&client).await;
        Ok(())
    }

    /// Adds `target` to `alias`'s targets; the loop check and the write are
    /// one transaction under a lock on the aliases, so two nodes adding
    /// `a -> b` and `b -> a` at once cannot both succeed.
    pub(crate) async fn add_alias(&self, alias: &str, target: &str) -> Result<(), StoreError> {
        let alias = canonical(alias)?;
        let target = canonical(target)?;
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(db_err)?;
        tx.execute("LOCK TABLE aliases IN SHARE ROW EXCLUSIVE MODE", &[])
            .await
            .map_err(db_err)?;
        if let Some(chain) = path_back(&tx, &target, &alias).await? {
            let mut looped = vec![alias.clone()];
            looped.extend(chain);
            return Err(StoreError::AliasLoop(looped.join(" -> ")));
        }
        tx.execute(
            "INSERT INTO aliases (alias, targets) VALUES ($1, ARRAY[$2]) \
             ON CONFLICT (alias) DO UPDATE SET targets = aliases.targets || $2 \
             WHERE NOT ($2 = ANY (aliases.targets))",
            &[&alias, &target],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        notify_users(&client).await;
        Ok(())
    }

    pub(crate) async fn delete_alias(&self, alias: &str) -> Result<(), StoreError> {
        let alias = canonical(alias)?;
        let client = self.client().await?;
        let n = client
            .execute("DELETE FROM aliases WHERE alias = $1", &[&alias])
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NoSuchAlias(alias));
        }
        notify_users(&client).await;
        Ok(())
    }

    pub(crate) async fn password_hash(&self, address: &str) -> Result<Option<String>, StoreError> {
        let Ok(address) = canonical(address) else {
            return Ok(None);
        };
        let row = self
            .query_cached("SELECT hash FROM users WHERE address = $1", &[&address])
            .await?;
        Ok(row.map(|r| r.get(0)))
    }

    pub(crate) async fn quota_setting(&self, address: &str) -> Result<QuotaSetting, StoreError> {
        let address = canonical(address)?;
        let row = self
            .query_cached("SELECT quota FROM users WHERE address = $1", &[&address])
            .await?;
        Ok(match row.and_then(|r| r.get::<_, Option<i64>>(0)) {
            None => QuotaSetting::Default,
            Some(UNLIMITED) => QuotaSetting::Unlimited,
            Some(q) => QuotaSetting::Octets(q.max(0) as u64),
        })
    }

    pub(crate) async fn set_quota(
        &self,
        address: &str,
        setting: QuotaSetting,
    ) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let quota: Option<i64> = match setting {
            QuotaSetting::Default => None,
            QuotaSetting::Unlimited => Some(UNLIMITED),
            QuotaSetting::Octets(q) => Some(q.min(UNLIMITED as u64 - 1) as i64),
        };
        let client = self.client().await?;
        let n = client
            .execute(
                "UPDATE users SET quota = $2 WHERE address = $1",
                &[&address, &quota],
            )
            .await
            .map_err(db_err)?;
        if n == 0 {
            return Err(StoreError::NoSuchUser(address));
        }
        Ok(())
    }

    pub(crate) async fn quota(&self, mailbox: &str) -> Result<Option<u64>, StoreError> {
        Ok(match self.quota_setting(mailbox).await? {
            QuotaSetting::Default => self.default_quota(),
            QuotaSetting::Unlimited => None,
            QuotaSetting::Octets(q) => Some(q),
        })
    }

    pub(crate) async fn usage(&self, mailbox: &str) -> Result<Usage, StoreError> {
        let mailbox = canonical(mailbox)?;
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT count(*), coalesce(sum(size), 0)::bigint FROM mail WHERE mailbox = $1",
                &[&mailbox],
            )
            .await
            .map_err(db_err)?;
        Ok(Usage {
            messages: row.get::<_, i64>(0) as u64,
            octets: row.get::<_, i64>(1) as u64,
        })
    }

    pub(crate) async fn is_full(&self, mailbox: &str) -> Result<bool, StoreError> {
        let Some(quota) = self.quota(mailbox).await? else {
            return Ok(false);
        };
        Ok(self.usage(mailbox).await?.octets >= quota)
    }

    /// `[mailbox] quota`. (The warning threshold the sled store logs at is
    /// not applied here yet.)
    pub(crate) fn set_quota_policy(&self, default: Option<u64>) {
        self.default_quota
            .store(default.unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// Tells the other nodes that users or aliases changed (best effort: they
/// read the database on every lookup anyway).
async fn notify_users(client: &tokio_postgres::Client) {
    if let Err(e) = client.batch_execute("NOTIFY postino_users").await {
        tracing::debug!(error = %e, "NOTIFY postino_users failed");
    }
}

/// argon2 is CPU work of tens of milliseconds: not on the store's runtime.
async fn hash_off_thread(password: &str) -> Result<String, StoreError> {
    let password = password.to_owned();
    tokio::task::spawn_blocking(move || hash_password(&password))
        .await
        .map_err(db_err)?
}

/// The alias path from `from` to `to`, if `from`'s targets lead there.
async fn path_back(
    tx: &tokio_postgres::Transaction<'_>,
    from: &str,
    to: &str,
) -> Result<Option<Vec<String>>, StoreError> {
    // Breadth-first over the alias graph, a query per level, bounded like
    // routing's expansion.
    let mut paths: Vec<Vec<String>> = vec![vec![from.to_owned()]];
    let mut seen = vec![from.to_owned()];
    for _ in 0..=MAX_ALIAS_DEPTH + 1 {
        if let Some(p) = paths.iter().find(|p| p.last().is_some_and(|l| l == to)) {
            return Ok(Some(p.clone()));
        }
        let last: Vec<String> = paths.iter().filter_map(|p| p.last().cloned()).collect();
        let rows = tx
            .query(
                "SELECT alias, targets FROM aliases WHERE alias = ANY ($1)",
                &[&last],
            )
            .await
            .map_err(db_err)?;
        let mut next = Vec::new();
        for row in rows {
            let alias: String = row.get(0);
            let targets: Vec<String> = row.get(1);
            for p in paths.iter().filter(|p| p.last() == Some(&alias)) {
                for t in &targets {
                    if !seen.contains(t) || t == to {
                        let mut q = p.clone();
                        q.push(t.clone());
                        next.push(q);
                    }
                }
            }
            seen.extend(targets);
        }
        if next.is_empty() {
            return Ok(None);
        }
        paths = next;
    }
    Ok(None)
}
