//! Mailbox usage and quotas.
//!
//! The `usage` tree holds, per mailbox, its messages and octets. Every
//! transaction that adds or removes mailbox entries (`mail.rs`) updates it
//! in the same transaction, so usage is never off, even after a crash, and
//! reading it is one `get` (the quota check at RCPT, `mailbox stats`).
//! A store written before usage was kept (schema 1 or 2) gets it computed
//! once, when it is opened (`Store::open`), before the schema number is
//! raised.
//!
//! The `quotas` tree holds per-user overrides of `[mailbox] quota`.

use std::collections::BTreeMap;

use sled::transaction::TransactionalTree;

use super::mail::MailRecord;
use super::{abort, canonical, decode, Store, StoreError, TxResult};

/// Stored for a user whose quota is "unlimited" (whatever the default).
const UNLIMITED: u64 = u64::MAX;

/// Messages and octets in one mailbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub messages: u64,
    pub octets: u64,
}

impl Usage {
    pub(super) fn to_bytes(self) -> [u8; 16] {
        let mut b = [0; 16];
        b[..8].copy_from_slice(&self.messages.to_be_bytes());
        b[8..].copy_from_slice(&self.octets.to_be_bytes());
        b
    }

    fn parse(b: &[u8]) -> Result<Usage, StoreError> {
        let bad = || StoreError::Codec("usage record: not 16 bytes".into());
        let (m, o) = b.split_at_checked(8).ok_or_else(bad)?;
        Ok(Usage {
            messages: u64::from_be_bytes(m.try_into().map_err(|_| bad())?),
            octets: u64::from_be_bytes(o.try_into().map_err(|_| bad())?),
        })
    }
}

/// A user's quota setting, as `postino user set --quota` gives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaSetting {
    /// `[mailbox] quota` applies.
    Default,
    /// No quota for this user.
    Unlimited,
    /// This many octets.
    Octets(u64),
}

/// `[mailbox]` as the store applies it ([`Store::set_quota_policy`]).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct QuotaPolicy {
    default: Option<u64>,
    warning_percent: u8,
}

/// Adds `messages` and `octets` (negative: removes) to `mailbox`'s usage in
/// a transaction; returns (before, after). Usage never goes below zero.
pub(super) fn add_usage(
    usage: &TransactionalTree,
    mailbox: &str,
    messages: i64,
    octets: i64,
) -> TxResult<(Usage, Usage)> {
    let before = match usage.get(mailbox.as_bytes())? {
        Some(b) => Usage::parse(&b).or_else(abort)?,
        None => Usage::default(),
    };
    let after = Usage {
        messages: before.messages.saturating_add_signed(messages),
        octets: before.octets.saturating_add_signed(octets),
    };
    if after == Usage::default() {
        usage.remove(mailbox.as_bytes())?;
    } else {
        usage.insert(mailbox.as_bytes(), &after.to_bytes())?;
    }
    Ok((before, after))
}

impl Store {
    /// Adds to one mailbox's usage outside any transaction: one atomic
    /// update of its single key. Returns the usage before and after. Used
    /// where a transaction would cost the hot path its speed (one mailbox,
    /// [`Store::accept_local`]); a crash between the mailbox write and this
    /// one is repaired at the next open (`META_USAGE_DIRTY`).
    pub(super) fn add_usage_now(
        &self,
        mailbox: &str,
        messages: i64,
        octets: i64,
    ) -> Result<(Usage, Usage), StoreError> {
        let mut before = Usage::default();
        let mut after = Usage::default();
        self.inner
            .usage
            .update_and_fetch(mailbox.as_bytes(), |old| {
                before = old.and_then(|b| Usage::parse(b).ok()).unwrap_or_default();
                after = Usage {
                    messages: before.messages.saturating_add_signed(messages),
                    octets: before.octets.saturating_add_signed(octets),
                };
                (after != Usage::default()).then(|| after.to_bytes().to_vec())
            })?;
        Ok((before, after))
    }

    /// Applies `[mailbox]`: the default quota in octets (`None`: none) and
    /// the percentage at which a delivery logs a warning (0: never). The
    /// server and the offline CLI call it once after opening.
    pub fn set_quota_policy(&self, default: Option<u64>, warning_percent: u8) {
        let _ = self.inner.quota_policy.set(QuotaPolicy {
            default,
            warning_percent,
        });
    }

    fn policy(&self) -> QuotaPolicy {
        self.inner.quota_policy.get().copied().unwrap_or_default()
    }

    /// Messages and octets in `mailbox`: one read, no scan.
    pub fn usage(&self, mailbox: &str) -> Result<Usage, StoreError> {
        let mailbox = canonical(mailbox)?;
        match self.inner.usage.get(mailbox.as_bytes())? {
            Some(b) => Usage::parse(&b),
            None => Ok(Usage::default()),
        }
    }

    /// The quota that applies to `mailbox` in octets: its own setting, else
    /// `[mailbox] quota`; `None`: unlimited.
    pub fn quota(&self, mailbox: &str) -> Result<Option<u64>, StoreError> {
        Ok(match self.quota_setting(mailbox)? {
            QuotaSetting::Default => self.policy().default,
            QuotaSetting::Unlimited => None,
            QuotaSetting::Octets(n) => Some(n),
        })
    }

    /// A user's own quota setting.
    pub fn quota_setting(&self, mailbox: &str) -> Result<QuotaSetting, StoreError> {
        let mailbox = canonical(mailbox)?;
        let Some(b) = self.inner.quotas.get(mailbox.as_bytes())? else {
            return Ok(QuotaSetting::Default);
        };
        let n = b
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| StoreError::Codec("quota record: not 8 bytes".into()))?;
        Ok(match n {
            UNLIMITED => QuotaSetting::Unlimited,
            n => QuotaSetting::Octets(n),
        })
    }

    /// Sets a user's quota.
    ///
    /// # Errors
    ///
    /// [`StoreError::NoSuchUser`].
    pub fn set_quota(&self, user: &str, setting: QuotaSetting) -> Result<(), StoreError> {
        let user = canonical(user)?;
        if !self.inner.users.contains_key(user.as_bytes())? {
            return Err(StoreError::NoSuchUser(user));
        }
        match setting {
            QuotaSetting::Default => {
                self.inner.quotas.remove(user.as_bytes())?;
            }
            QuotaSetting::Unlimited => {
                self.inner
                    .quotas
                    .insert(user.as_bytes(), &UNLIMITED.to_be_bytes())?;
            }
            QuotaSetting::Octets(n) => {
                self.inner
                    .quotas
                    .insert(user.as_bytes(), &n.to_be_bytes())?;
            }
        }
        Ok(())
    }

    /// Whether `mailbox` is at or over its quota (new mail is refused,
    /// `552 5.2.2`): its usage and quota if so.
    pub fn over_quota(&self, mailbox: &str) -> Result<Option<(Usage, u64)>, StoreError> {
        fail::fail_point!("store::directory", |arg| Err(super::injected(arg)));
        let Some(limit) = self.quota(mailbox)? else {
            return Ok(None);
        };
        let usage = self.usage(mailbox)?;
        Ok((usage.octets >= limit).then_some((usage, limit)))
    }

    /// Logs a warning when a delivery took `mailbox` across the warning
    /// threshold (as Dovecot's `quota_warning` script would be run), and
    /// when it took it over its quota.
    pub(super) fn warn_if_crossed(&self, mailbox: &str, before: Usage, after: Usage) {
        let percent = u64::from(self.policy().warning_percent);
        let Ok(Some(limit)) = self.quota(mailbox) else {
            return;
        };
        let threshold = (u128::from(limit) * u128::from(percent) / 100) as u64;
        let mailbox = crate::logsafe::escape(mailbox);
        if percent > 0 && before.octets < threshold && after.octets >= threshold {
            tracing::warn!(%mailbox, octets = after.octets, quota = limit, percent, "mailbox crossed its quota warning threshold");
        }
        if before.octets < limit && after.octets >= limit {
            tracing::warn!(%mailbox, octets = after.octets, quota = limit, "mailbox is full: new mail is refused (552 5.2.2)");
        }
    }

    /// Every mailbox's usage as its entries add up.
    fn usage_from_mail(&self) -> Result<BTreeMap<Vec<u8>, Usage>, StoreError> {
        let mut sums: BTreeMap<Vec<u8>, Usage> = BTreeMap::new();
        for kv in self.inner.mail.iter() {
            let (k, v) = kv?;
            let Some(nul) = k.iter().position(|&b| b == 0) else {
                continue;
            };
            // An unreadable entry counts for nothing (`store check` names it).
            let Ok(record) = decode::<MailRecord>("mail", &v) else {
                continue;
            };
            let u = sums.entry(k[..nul].to_vec()).or_default();
            u.messages += 1;
            u.octets += record.size;
        }
        Ok(sums)
    }

    /// `store check`: mailboxes whose kept usage differs from their entries.
    pub(super) fn check_usage(&self) -> Result<Vec<String>, StoreError> {
        let sums = self.usage_from_mail()?;
        let mut problems = Vec::new();
        let mut kept = BTreeMap::new();
        for kv in self.inner.usage.iter() {
            let (k, v) = kv?;
            match Usage::parse(&v) {
                Ok(u) => {
                    kept.insert(k.to_vec(), u);
                }
                Err(e) => problems.push(format!("usage: {e}")),
            }
        }
        for mailbox in sums
            .keys()
            .chain(kept.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            let (want, have) = (
                sums.get(mailbox).copied().unwrap_or_default(),
                kept.get(mailbox).copied().unwrap_or_default(),
            );
            if want != have {
                problems.push(format!(
                    "usage of {}: kept {} messages, {} octets; the mailbox holds {} messages, {} octets",
                    String::from_utf8_lossy(mailbox),
                    have.messages,
                    have.octets,
                    want.messages,
                    want.octets
                ));
            }
        }
        Ok(problems)
    }

    /// Computes every mailbox's usage from its entries and writes it over
    /// the `usage` tree: once, when a store from before usage was kept is
    /// opened, and after an import.
    pub(super) fn recompute_usage(&self) -> Result<(), StoreError> {
        let sums = self.usage_from_mail()?;
        self.inner.usage.clear()?;
        for (mailbox, u) in &sums {
            self.inner.usage.insert(mailbox.as_slice(), &u.to_bytes())?;
        }
        tracing::info!(mailboxes = sums.len(), "mailbox usage computed");
        Ok(())
    }
}
