//! Users (argon2id password hashes) and aliases.
//!
//! Password hashing and verification cost tens of milliseconds of CPU and
//! ~19 MiB of memory on purpose: call them from a blocking context, not from
//! an async task. The server checks passwords on a few dedicated threads,
//! each reusing one [`PasswordScratch`] (see `actors/src/auth.rs`).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use blake2::digest::{KeyInit, Mac};
use blake2::Blake2sMac256;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use serde::{Deserialize, Serialize};

use super::{abort, canonical, decode, encode, tx_done, utf8, Store, StoreError};

/// What the `users` tree holds for one user.
#[derive(Clone, Serialize, Deserialize)]
pub(super) struct UserRecord {
    /// PHC string (`$argon2id$v=19$m=...`): algorithm, parameters and salt
    /// travel with the hash, so parameters can change without a migration.
    pub(super) password: String,
}

/// The hash is left out: it must never reach a log.
impl std::fmt::Debug for UserRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserRecord")
            .field("password", &crate::logsafe::Secret::new(()))
            .finish()
    }
}

/// Most rounds `delete_user` spends removing mail that keeps arriving.
const MAX_PURGE_ROUNDS: usize = 16;
/// Mailbox entries removed per transaction when a user is deleted.
const PURGE_CHUNK: usize = 512;

/// An argon2id PHC hash of `password` with a fresh salt, as stored for a user.
///
/// # Errors
///
/// [`StoreError::Password`] if hashing fails.
pub fn hash_password(password: &str) -> Result<String, StoreError> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| StoreError::Password(e.to_string()))
}

/// A hash of a random password, verified against when the user does not
/// exist, so that a failed login costs the same either way and does not tell
/// which users exist.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        let password = format!("{:032x}", rand::random::<u128>());
        hash_password(&password).unwrap_or_default()
    })
}

/// argon2's working memory (`m_cost` KiB, 19 MiB by default), kept between
/// verifications on one thread.
///
/// argon2's own `verify_password` allocates and frees it on every call. With
/// glibc that is what made login floods eat gigabytes: the first free of
/// such an mmap'd block raises the dynamic mmap threshold above 19 MiB, so
/// later blocks come from the per-thread malloc arenas, and a freed block
/// below the (also raised) trim threshold is kept by its arena for good;
/// with up to 8 arenas per core and tokio's blocking threads coming and
/// going, RSS grew by 19 MiB per arena and concurrent check, and stayed.
/// Allocated once per checking thread, the memory is bounded by the number
/// of threads.
#[derive(Default)]
pub struct PasswordScratch {
    blocks: Vec<Block>,
}

impl PasswordScratch {
    /// Scratch memory not yet allocated (the first check allocates it).
    pub fn new() -> PasswordScratch {
        PasswordScratch::default()
    }

    /// `count` blocks, growing (once) if a stored hash asks for more.
    fn blocks(&mut self, count: usize) -> &mut [Block] {
        if self.blocks.len() < count {
            self.blocks = vec![Block::default(); count];
        }
        &mut self.blocks[..count]
    }
}

impl std::fmt::Debug for PasswordScratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PasswordScratch({} blocks)", self.blocks.len())
    }
}

/// Whether `password` matches the PHC string `hash`: what argon2's
/// `PasswordVerifier` does, with the caller's memory.
fn verify(hash: &str, password: &str, scratch: &mut PasswordScratch) -> bool {
    let checked = PasswordHash::new(hash).and_then(|parsed| {
        let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
            return Err(argon2::password_hash::Error::PhcStringField);
        };
        let algorithm = Algorithm::try_from(parsed.algorithm)?;
        let version = parsed
            .version
            .map(Version::try_from)
            .transpose()?
            .unwrap_or_default();
        let params = Params::try_from(&parsed)?;
        let count = params.block_count();
        let mut salt_buf = [0u8; 64];
        let salt = salt.decode_b64(&mut salt_buf)?;
        let computed = Output::init_with(expected.len(), |out| {
            Argon2::new(algorithm, version, params)
                .hash_password_into_with_memory(
                    password.as_bytes(),
                    salt,
                    out,
                    scratch.blocks(count),
                )
                .map_err(Into::into)
        })?;
        // `Output`'s equality is constant-time.
        Ok(computed == expected)
    });
    match checked {
        Ok(matches) => matches,
        // A wrong password is `Ok(false)`; an error here is the stored hash.
        Err(error) => {
            tracing::error!(%error, "stored password hash is unreadable");
            false
        }
    }
}

/// Successful logins remembered for a while (Dovecot's auth cache): a
/// repeated login with the same password is checked against a keyed digest
/// instead of argon2. An entry is only good for the stored hash it was made
/// with, so a new password (or a removed user) ends it at once. Failed
/// logins are never remembered: they always cost a full verification.
pub(super) struct AuthCache {
    ttl: Duration,
    capacity: usize,
    /// Random per process: the digests mean nothing outside it.
    key: [u8; 32],
    entries: Mutex<HashMap<String, Remembered>>,
    /// Logins let in from here, for tests and statistics.
    hits: std::sync::atomic::AtomicU64,
}

struct Remembered {
    /// The PHC string the password was verified against.
    phc: String,
    digest: [u8; 32],
    at: Instant,
}

impl AuthCache {
    pub(super) fn new(ttl: Duration, capacity: usize) -> AuthCache {
        AuthCache {
            ttl,
            capacity,
            key: rand::random(),
            entries: Mutex::new(HashMap::new()),
            hits: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn mac(&self, address: &str, password: &str) -> Blake2sMac256 {
        let mut mac = <Blake2sMac256 as KeyInit>::new_from_slice(&self.key)
            .expect("a 32-octet key fits Blake2s");
        mac.update(address.as_bytes());
        mac.update(&[0]);
        mac.update(password.as_bytes());
        mac
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Remembered>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this password was verified for `address` against `phc`
    /// within the TTL.
    fn knows(&self, address: &str, phc: &str, password: &str) -> bool {
        let digest = {
            let entries = self.lock();
            match entries.get(address) {
                Some(r) if r.phc == phc && r.at.elapsed() < self.ttl => r.digest,
                _ => return false,
            }
        };
        // Constant-time comparison.
        let known = self.mac(address, password).verify_slice(&digest).is_ok();
        if known {
            self.hits.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        known
    }

    /// Logins remembered now.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().len()
    }

    fn remember(&self, address: &str, phc: &str, password: &str) {
        let digest: [u8; 32] = self.mac(address, password).finalize().into_bytes().into();
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(address) {
            let ttl = self.ttl;
            entries.retain(|_, r| r.at.elapsed() < ttl);
            if entries.len() >= self.capacity {
                // Full of live entries: forget one (any) to make room.
                if let Some(k) = entries.keys().next().cloned() {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(
            address.to_owned(),
            Remembered {
                phc: phc.to_owned(),
                digest,
                at: Instant::now(),
            },
        );
    }
}

/// Checks `password` against a stored hash as [`Store::verify_password`]
/// does, for backends that only hand out the hash
/// ([`crate::storage::Directory::password_hash`]): `None` (no such user)
/// costs the same work and is false. Successful logins are remembered in
/// `cache` when given.
pub fn verify_password_hash(
    address: &str,
    hash: Option<&str>,
    password: &str,
    cache: Option<&LoginCache>,
    scratch: &mut PasswordScratch,
) -> bool {
    let Some(hash) = hash else {
        let _ = verify(dummy_hash(), password, scratch);
        return false;
    };
    let address = canonical(address).unwrap_or_default();
    if cache.is_some_and(|c| c.0.knows(&address, hash, password)) {
        return true;
    }
    let ok = verify(hash, password, scratch);
    if let (true, Some(cache)) = (ok, cache) {
        cache.0.remember(&address, hash, password);
    }
    ok
}

/// The remembered-login cache ([`Store::remember_logins`]) for callers
/// checking hashes themselves ([`verify_password_hash`]).
pub struct LoginCache(AuthCache);

impl LoginCache {
    /// Remembers successful logins for `ttl`, at most `capacity` at once.
    /// `None` if either is zero (no cache).
    pub fn new(ttl: Duration, capacity: usize) -> Option<LoginCache> {
        (!ttl.is_zero() && capacity > 0).then(|| LoginCache(AuthCache::new(ttl, capacity)))
    }

    /// Logins let in by the cache so far.
    pub fn hits(&self) -> u64 {
        self.0.hits.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Aliases followed from `from` that reach `to`: the path `from … to`, or
/// `None`. Bounded like routing's expansion.
fn path_back(
    aliases: &sled::transaction::TransactionalTree,
    from: &str,
    to: &str,
) -> super::TxResult<Option<Vec<String>>> {
    fn walk(
        aliases: &sled::transaction::TransactionalTree,
        path: &mut Vec<String>,
        to: &str,
        seen: &mut Vec<String>,
    ) -> super::TxResult<bool> {
        let here = path.last().cloned().unwrap_or_default();
        if here == to {
            return Ok(true);
        }
        if seen.contains(&here) || path.len() > crate::routing::MAX_ALIAS_DEPTH + 1 {
            return Ok(false);
        }
        seen.push(here.clone());
        let Some(bytes) = aliases.get(here.as_bytes())? else {
            return Ok(false);
        };
        let targets: Vec<String> = decode("alias", &bytes).or_else(abort)?;
        for t in targets {
            path.push(t);
            if walk(aliases, path, to, seen)? {
                return Ok(true);
            }
            path.pop();
        }
        Ok(false)
    }
    let mut path = vec![from.to_owned()];
    let found = walk(aliases, &mut path, to, &mut Vec::new())?;
    Ok(found.then_some(path))
}

impl Store {
    /// Remembers successful logins for `ttl` (at most `capacity` at once),
    /// like Dovecot's auth cache: a keyed digest of the password, good only
    /// for the stored hash it was checked against. The server turns this on
    /// from `[auth]`; once on, it stays for the life of the store handle.
    pub fn remember_logins(&self, ttl: Duration, capacity: usize) {
        if !ttl.is_zero() && capacity > 0 {
            let _ = self.inner.auth_cache.set(AuthCache::new(ttl, capacity));
        }
    }

    /// Logins let in by the remembered-login cache so far.
    pub fn remembered_logins(&self) -> u64 {
        self.inner
            .auth_cache
            .get()
            .map_or(0, |c| c.hits.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Adds a user with this password (stored as an argon2id hash).
    ///
    /// # Errors
    ///
    /// [`StoreError::UserExists`], [`StoreError::InvalidAddress`].
    pub fn add_user(&self, address: &str, password: &str) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let record = encode(
            "user",
            &UserRecord {
                password: hash_password(password)?,
            },
        )?;
        self.inner
            .users
            .compare_and_swap(address.as_bytes(), None as Option<&[u8]>, Some(record))?
            .map_err(|_| StoreError::UserExists(address))
    }

    /// Replaces a user's password.
    pub fn set_password(&self, address: &str, password: &str) -> Result<(), StoreError> {
        let address = canonical(address)?;
        let record = encode(
            "user",
            &UserRecord {
                password: hash_password(password)?,
            },
        )?;
        // A transaction, so that a concurrent delete_user is not undone.
        tx_done(self.inner.users.transaction(|users| {
            if users.get(address.as_bytes())?.is_none() {
                return abort(StoreError::NoSuchUser(address.clone()));
            }
            users.insert(address.as_bytes(), record.as_slice())?;
            Ok(())
        }))
    }

    /// Deletes a user and every message in their mailbox (releasing the
    /// content references). Aliases that point at the user stay; routing
    /// sends their mail to the postmaster.
    pub fn delete_user(&self, address: &str) -> Result<(), StoreError> {
        let address = canonical(address)?;
        if !self.inner.users.contains_key(address.as_bytes())? {
            return Err(StoreError::NoSuchUser(address));
        }
        // Empty the mailbox first: a crash midway leaves a user with fewer
        // messages, not orphaned messages nobody can read. Mail routed to the
        // user before the delete may still land; the second purge takes it.
        self.purge_mailbox(&address)?;
        if self.inner.users.remove(address.as_bytes())?.is_none() {
            return Err(StoreError::NoSuchUser(address));
        }
        self.inner.quotas.remove(address.as_bytes())?;
        self.purge_mailbox(&address)
    }

    fn purge_mailbox(&self, mailbox: &str) -> Result<(), StoreError> {
        for _ in 0..MAX_PURGE_ROUNDS {
            let keys = self.mailbox_keys(mailbox, PURGE_CHUNK)?;
            if keys.is_empty() {
                return Ok(());
            }
            self.delete_mail(mailbox, &keys)?;
        }
        tracing::warn!(mailbox = %crate::logsafe::escape(mailbox), "mail kept arriving while the mailbox was emptied");
        Ok(())
    }

    /// All users, sorted.
    pub fn users(&self) -> Result<Vec<String>, StoreError> {
        // sled orders keys bytewise, which for UTF-8 is code point order.
        self.inner
            .users
            .iter()
            .keys()
            .map(|k| utf8("user", &k?))
            .collect()
    }

    /// Whether `address` (case-insensitive) is a user. An invalid address is
    /// not a user.
    pub fn is_user(&self, address: &str) -> Result<bool, StoreError> {
        fail::fail_point!("store::directory", |arg| Err(super::injected(arg)));
        match canonical(address) {
            Ok(a) => Ok(self.inner.users.contains_key(a.as_bytes())?),
            Err(_) => Ok(false),
        }
    }

    /// The stored password hash (PHC string) of a user; `None` if there is
    /// no such user (or the address is not one).
    pub fn password_hash(&self, address: &str) -> Result<Option<String>, StoreError> {
        fail::fail_point!("store::directory", |arg| Err(super::injected(arg)));
        let Ok(address) = canonical(address) else {
            return Ok(None);
        };
        match self.inner.users.get(address.as_bytes())? {
            Some(bytes) => Ok(Some(decode::<UserRecord>("user", &bytes)?.password)),
            None => Ok(None),
        }
    }

    /// Checks a password. False for unknown users too, after the same work.
    /// A login that succeeded within `[auth] cache_ttl` with the same
    /// password and the same stored hash is let in without argon2.
    ///
    /// Allocates argon2's memory for this one call; a thread that checks
    /// many passwords should keep a [`PasswordScratch`] and use
    /// [`Store::verify_password_with`].
    pub fn verify_password(&self, address: &str, password: &str) -> Result<bool, StoreError> {
        self.verify_password_with(address, password, &mut PasswordScratch::new())
    }

    /// [`Store::verify_password`] with argon2's memory from `scratch`.
    pub fn verify_password_with(
        &self,
        address: &str,
        password: &str,
        scratch: &mut PasswordScratch,
    ) -> Result<bool, StoreError> {
        fail::fail_point!("store::directory", |arg| Err(super::injected(arg)));
        let (address, record) = match canonical(address) {
            Ok(a) => {
                let record = self.inner.users.get(a.as_bytes())?;
                (a, record)
            }
            Err(_) => (String::new(), None),
        };
        match record {
            Some(bytes) => {
                let record: UserRecord = decode("user", &bytes)?;
                let cache = self.inner.auth_cache.get();
                if cache.is_some_and(|c| c.knows(&address, &record.password, password)) {
                    return Ok(true);
                }
                let ok = verify(&record.password, password, scratch);
                if let (true, Some(cache)) = (ok, cache) {
                    cache.remember(&address, &record.password, password);
                }
                Ok(ok)
            }
            None => {
                let _ = verify(dummy_hash(), password, scratch);
                Ok(false)
            }
        }
    }

    /// Adds `target` to the targets of `alias` (creating the alias); adding
    /// a target twice changes nothing. `target` may be local or remote.
    ///
    /// # Errors
    ///
    /// [`StoreError::AliasLoop`] if `target` leads back to `alias` (checked
    /// in the same transaction as the write).
    pub fn add_alias(&self, alias: &str, target: &str) -> Result<(), StoreError> {
        let alias = canonical(alias)?;
        let target = canonical(target)?;
        tx_done(self.inner.aliases.transaction(|aliases| {
            if let Some(chain) = path_back(aliases, &target, &alias)? {
                let mut looped = vec![alias.clone()];
                looped.extend(chain);
                return abort(StoreError::AliasLoop(looped.join(" -> ")));
            }
            let mut targets: Vec<String> = match aliases.get(alias.as_bytes())? {
                Some(bytes) => decode("alias", &bytes).or_else(abort)?,
                None => Vec::new(),
            };
            if !targets.contains(&target) {
                targets.push(target.clone());
                let record = encode("alias", &targets).or_else(abort)?;
                aliases.insert(alias.as_bytes(), record)?;
            }
            Ok(())
        }))
    }

    /// Removes an alias with all its targets.
    pub fn delete_alias(&self, alias: &str) -> Result<(), StoreError> {
        let alias = canonical(alias)?;
        match self.inner.aliases.remove(alias.as_bytes())? {
            Some(_) => Ok(()),
            None => Err(StoreError::NoSuchAlias(alias)),
        }
    }

    /// Targets of `alias`, if it is one.
    pub fn alias(&self, alias: &str) -> Result<Option<Vec<String>>, StoreError> {
        fail::fail_point!("store::directory", |arg| Err(super::injected(arg)));
        let Ok(alias) = canonical(alias) else {
            return Ok(None);
        };
        match self.inner.aliases.get(alias.as_bytes())? {
            Some(bytes) => Ok(Some(decode("alias", &bytes)?)),
            None => Ok(None),
        }
    }

    /// All aliases with their targets, sorted by alias.
    pub fn aliases(&self) -> Result<Vec<(String, Vec<String>)>, StoreError> {
        self.inner
            .aliases
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                Ok((utf8("alias", &k)?, decode("alias", &v)?))
            })
            .collect()
    }
}
