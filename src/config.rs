//! The TOML configuration: typed sections, Postfix/Dovecot-like defaults, and
//! errors that name the key and the line.
//!
//! Every struct denies unknown keys, so a typo is an error rather than a
//! silently ignored setting. `config.example.toml` documents every key and is
//! parsed by a test.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

/// Postfix's `message_size_limit`.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 10_240_000;
/// Postfix's `smtpd_recipient_limit`.
pub const DEFAULT_MAX_RECIPIENTS: usize = 1000;
/// Postfix reads command lines up to `line_length_limit` (2048) octets.
pub const DEFAULT_MAX_LINE_LENGTH: usize = 2048;
/// Postfix's `hopcount_limit`.
pub const DEFAULT_HOP_LIMIT: usize = 50;
/// Most password-checking threads (`auth.workers`): each may hold ~19 MiB.
pub const MAX_AUTH_WORKERS: usize = 1024;

/// The whole configuration (`postino.toml`); every section and key has a
/// default, so `Config::default()` is a working local setup.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name used in the banner, in `Received:` headers and in bounces.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// Directory of the sled database (created if missing). Relative paths are
    /// taken from the directory of the config file.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// `[smtp]`: listeners and limits of the SMTP server.
    #[serde(default)]
    pub smtp: SmtpConfig,
    /// `[pop3]`: listeners and limits of the POP3 server.
    #[serde(default)]
    pub pop3: Pop3Config,
    /// `[routing]`: local domains, relaying, unknown users, smarthost.
    #[serde(default)]
    pub routing: RoutingConfig,
    /// `[delivery]`: the outbound queue (retries, lifetime, concurrency).
    #[serde(default)]
    pub delivery: DeliveryConfig,
    /// `[dns]`: the resolver for MX lookups.
    #[serde(default)]
    pub dns: DnsConfig,
    /// `[mta_sts]`: MTA-STS policies of recipient domains.
    #[serde(default)]
    pub mta_sts: MtaStsConfig,
    /// TLS certificate and key; without this section no TLS is offered.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// `[control]`: the control socket that the CLI talks to.
    #[serde(default)]
    pub control: ControlConfig,
    /// The HTTP admin listener (`/metrics`, `/healthz`, the JSON API); off
    /// unless `admin.listen` is set.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[store]`: the sled store (flushing, free-space reserve).
    #[serde(default)]
    pub store: StoreConfig,
    /// `[auth]`: password checking threads and the login cache.
    #[serde(default)]
    pub auth: AuthConfig,
    /// `[log]`: log format.
    #[serde(default)]
    pub log: LogConfig,
    /// `[mailbox]`: quotas.
    #[serde(default)]
    pub mailbox: MailboxConfig,
    /// Message histories (`postino trace ID`).
    #[serde(default)]
    pub trace: TraceConfig,
    /// Submission rate limits per user and per client.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// `[dkim."example.com"]`: DKIM signing keys per sender domain (RFC
    /// 6376); the keys themselves are read by the server at start and
    /// reload (`postino::dkim`).
    #[serde(default)]
    pub dkim: BTreeMap<String, DkimDomain>,
}

/// `[dkim."example.com"]`: the key that signs mail from one domain.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DkimDomain {
    /// The selector: the key is published at
    /// `SELECTOR._domainkey.DOMAIN`.
    pub selector: String,
    /// PEM private key (PKCS#8, or PKCS#1 for RSA); RSA (2048 bits or
    /// more) or Ed25519, told apart by the key itself. Relative paths are
    /// taken from the directory of the config file.
    pub key: PathBuf,
}

/// How long and how much of each message's history is kept (`[trace]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceConfig {
    /// Events older than this are dropped (hourly).
    #[serde(default = "default_trace_keep", with = "humantime_serde")]
    pub keep: Duration,
    /// Most events kept per message (0: no history); the last one kept
    /// says that later ones were dropped.
    #[serde(default = "default_max_events_per_message")]
    pub max_events_per_message: u64,
}

impl Default for TraceConfig {
    fn default() -> Self {
        from_empty_table()
    }
}

impl TraceConfig {
    /// The limits the store applies.
    pub fn limits(&self) -> crate::store::TraceLimits {
        crate::store::TraceLimits {
            keep: self.keep,
            max_events_per_message: self.max_events_per_message,
        }
    }
}

fn default_trace_keep() -> Duration {
    crate::store::DEFAULT_TRACE_KEEP
}
fn default_max_events_per_message() -> u64 {
    crate::store::DEFAULT_MAX_EVENTS_PER_MESSAGE
}

/// Mailbox quotas, as Dovecot's quota plugin with `quota_full_tempfail =
/// no`: a recipient whose mailbox is at or over its quota is refused at
/// RCPT with `552 5.2.2`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MailboxConfig {
    /// Default quota in octets for every mailbox (`"1G"`, `"500M"`, or a
    /// number); none by default. `postino user set --quota` overrides it
    /// per user.
    #[serde(default, with = "size_option", skip_serializing_if = "Option::is_none")]
    pub quota: Option<u64>,
    /// Percent of the quota at which a delivery that crosses it logs a
    /// warning (Dovecot's `quota_warning`); 0 turns it off.
    #[serde(default = "default_quota_warning")]
    pub quota_warning: u8,
}

impl Default for MailboxConfig {
    fn default() -> Self {
        from_empty_table()
    }
}

fn default_quota_warning() -> u8 {
    90
}

/// Parses a size: octets, or a number with `K`, `M`, `G` or `T` (powers of
/// 1024, as Dovecot reads them; a trailing `B` or `iB` is allowed).
///
/// # Errors
///
/// Not a number with one of those suffixes, or too large.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (digits, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a size (e.g. 1048576, \"500M\", \"1G\")"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("{text:?} is too large"))
}

/// An optional size given as a number of octets or a string [`parse_size`]
/// reads; written back as a number.
mod size_option {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => s.serialize_u64(*n),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Size {
            Octets(u64),
            Text(String),
        }
        match Size::deserialize(d)? {
            Size::Octets(n) => Ok(Some(n)),
            Size::Text(t) => super::parse_size(&t)
                .map(Some)
                .map_err(serde::de::Error::custom),
        }
    }
}

/// The log on standard error (`RUST_LOG` still chooses the levels).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// `"text"`: one human line per record; `"json"`: one JSON object per
    /// line, for log collectors.
    #[serde(default)]
    pub format: LogFormat,
}

/// How log records are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `2026-12-01T18:24:34.123456Z  INFO smtp{peer=…}: postino::smtp: message fields…`
    #[default]
    Text,
    /// `{"timestamp":…,"level":…,"fields":{"message":…},"target":…,"span":…}`
    Json,
}

/// Password checks, for POP3 logins and SMTP AUTH alike.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// How long a successful login is remembered, so that the same user
    /// with the same password gets in again without another argon2
    /// verification (tens of milliseconds of CPU each; a POP3 client polls
    /// every few minutes). As Dovecot's `auth_cache_ttl`. "0s": never. A
    /// changed or removed password ends it at once.
    #[serde(default = "default_auth_cache_ttl", with = "humantime_serde")]
    pub cache_ttl: Duration,
    /// Most logins remembered at once.
    #[serde(default = "default_auth_cache_size")]
    pub cache_size: usize,
    /// Password checks (argon2: tens of ms of CPU and ~19 MiB of memory
    /// each) that run at once; more wait in line. Default: one per core.
    /// As Dovecot's auth-worker `process_limit`; bounds the memory a login
    /// flood can take.
    #[serde(default = "default_auth_workers")]
    pub workers: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        from_empty_table()
    }
}

fn default_auth_cache_ttl() -> Duration {
    Duration::from_secs(3600)
}
fn default_auth_cache_size() -> usize {
    10_000
}
fn default_auth_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// sled settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// sled's page cache, in bytes.
    #[serde(default = "default_cache_size")]
    pub cache_size: u64,
    /// How often sled flushes on its own ("0s": never). Acknowledged mail
    /// never depends on it: postino flushes before every 250 to DATA.
    #[serde(default = "default_background_flush", with = "humantime_serde")]
    pub background_flush: Duration,
    /// Abort the process when one flush has been stuck this long ("0s":
    /// never), so that a supervisor restarts it: a last resort (stock sled
    /// 0.34 could deadlock under load, sled #1412; the vendored sled is
    /// fixed). A restart loses no acknowledged mail.
    #[serde(default = "default_stall_abort", with = "humantime_serde")]
    pub stall_abort: Duration,
    /// Shortest time between two group commits under load ("0s": flush as
    /// soon as asked). When the last flush served several messages, a
    /// message whose flush is asked for sooner waits for the rest of it (or
    /// until 8 messages wait), so that more messages share one flush. A
    /// lone client, or flushes rarer than this, never wait.
    #[serde(default = "default_commit_delay", with = "humantime_serde")]
    pub commit_delay: Duration,
    /// Free bytes in the data directory's file system below which `MAIL`
    /// is refused with `452 4.3.1 Insufficient system storage` (Postfix
    /// `queue_minfree`); 0 turns the check off. Unset: 1.5 ×
    /// `smtp.max_message_size`, as Postfix requires at least.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_free: Option<u64>,
    /// `fdatasync` the database files after each group commit, before the
    /// 250s it releases (as Postfix fsyncs its queue file): a 250 then
    /// survives a power loss, not only a crash of postino. Off: sled's
    /// `sync_file_range` only, faster, at the mercy of the disk's cache.
    #[serde(default = "default_true")]
    pub sync: bool,
    /// Which store holds users, mailboxes and the queue: `sled` (embedded,
    /// in `data_dir`; one node) or `postgres` (a PostgreSQL database shared
    /// by the nodes of a cluster, at `url`).
    #[serde(default)]
    pub backend: StoreBackend,
    /// The PostgreSQL connection URL (`postgresql://user@host:port/db`),
    /// for `backend = "postgres"`. May carry a password: never logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// This node's name in a cluster (queue leases and maildrop locks name
    /// their holder): 1–64 characters of `A-Z a-z 0-9 . _ -`, distinct per
    /// node.
    #[serde(default = "default_node")]
    pub node: String,
    /// How long a node's claim on a queue entry lasts unless renewed (at a
    /// third of it): a node that dies mid-delivery gives its entries to
    /// the other nodes this much later, and only entries it held in that
    /// window may go out twice. At least 3 s (leases count whole seconds).
    #[serde(default = "default_lease", with = "humantime_serde")]
    pub lease: Duration,
}

/// Shortest `[store] lease`: renewed at a third of it, in whole seconds.
pub const MIN_LEASE: Duration = Duration::from_secs(3);

fn default_lease() -> Duration {
    Duration::from_secs(120)
}

/// `[store] backend`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    /// The embedded sled database in `data_dir`.
    #[default]
    Sled,
    /// A PostgreSQL database at `[store] url`, shared by the nodes.
    Postgres,
}

fn default_node() -> String {
    "local".into()
}

impl Default for StoreConfig {
    fn default() -> Self {
        from_empty_table()
    }
}

fn default_true() -> bool {
    true
}
fn default_cache_size() -> u64 {
    64 * 1024 * 1024
}
fn default_stall_abort() -> Duration {
    Duration::from_secs(60)
}
fn default_commit_delay() -> Duration {
    Duration::from_millis(1)
}
fn default_background_flush() -> Duration {
    Duration::from_millis(500)
}

/// `[smtp]`: SMTP listeners (MTA, submission, implicit-TLS submission) and
/// session limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmtpConfig {
    /// MTA listeners (port 25 in production): relay only for `relay_networks`
    /// or authenticated clients.
    #[serde(default = "default_smtp_listen")]
    pub listen: Vec<SocketAddr>,
    /// Submission listeners (RFC 6409, port 587): AUTH required before MAIL.
    #[serde(default)]
    pub submission: Vec<SocketAddr>,
    /// Implicit-TLS submission listeners (RFC 8314, port 465). Needs `[tls]`.
    #[serde(default)]
    pub submissions: Vec<SocketAddr>,
    /// Largest message accepted, in octets (advertised as `SIZE`).
    #[serde(default = "default_max_message_size")]
    pub max_message_size: u64,
    /// Most `RCPT TO` per transaction; more get `452 4.5.3`.
    #[serde(default = "default_max_recipients")]
    pub max_recipients: usize,
    /// Longest command line accepted, CRLF included.
    #[serde(default = "default_max_line_length")]
    pub max_line_length: usize,
    /// After this many errors in a session, each reply is delayed by `error_delay`.
    #[serde(default = "default_soft_error_limit")]
    pub soft_error_limit: u32,
    /// After this many errors the session is closed with `421 4.7.0`.
    #[serde(default = "default_hard_error_limit")]
    pub hard_error_limit: u32,
    /// How long each error reply is delayed past `soft_error_limit`.
    #[serde(default = "default_error_delay", with = "humantime_serde")]
    pub error_delay: Duration,
    /// Time allowed for each command line, however slowly its bytes come
    /// (Postfix `smtpd_timeout` with `smtpd_per_record_deadline`).
    #[serde(default = "default_smtp_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Minimum transfer rate in DATA, bytes per second (Postfix
    /// `smtpd_min_data_rate`); 0 turns it off.
    #[serde(default = "default_min_data_rate")]
    pub min_data_rate: u64,
    /// Concurrent connections from one client address (Postfix anvil's 50).
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Concurrent connections in total on all SMTP listeners.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most `Received:` headers a message may carry (mail loop protection).
    #[serde(default = "default_hop_limit")]
    pub hop_limit: usize,
    /// What to do with a bare CR or LF in commands or DATA.
    #[serde(default)]
    pub bare_lf: BareLf,
    /// Offer AUTH (and accept USER/PASS on POP3) without TLS.
    #[serde(default)]
    pub allow_plaintext_auth: bool,
}

/// Policy for a bare `\n` (or `\r`) not part of a CRLF pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BareLf {
    /// Turn it into CRLF in message content (Postfix 3.9's default); in a
    /// command it ends the line.
    #[default]
    Normalize,
    /// Answer `5xx` and close the session.
    Reject,
}

/// `[pop3]`: POP3 listeners and limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pop3Config {
    /// Plain POP3 listeners.
    #[serde(default = "default_pop3_listen")]
    pub listen: Vec<SocketAddr>,
    /// Implicit-TLS listeners (port 995). Needs `[tls]`.
    #[serde(default)]
    pub pop3s: Vec<SocketAddr>,
    /// RFC 1939 autologout timer: at least 10 minutes. Counts for each
    /// command line, however slowly its bytes come.
    #[serde(default = "default_pop3_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// First delay after a failed login; doubles per failure (Dovecot).
    #[serde(default = "default_auth_failure_delay", with = "humantime_serde")]
    pub auth_failure_delay: Duration,
    /// Upper bound of the growing delay after failed logins.
    #[serde(default = "default_max_auth_failure_delay", with = "humantime_serde")]
    pub max_auth_failure_delay: Duration,
    /// Most simultaneous POP3 connections from one client address.
    #[serde(default = "default_max_connections_per_ip")]
    pub max_connections_per_ip: usize,
    /// Most simultaneous POP3 connections in all.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

/// What happens to mail for a local domain whose user does not exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnknownUser {
    /// `550 5.1.1 <addr>: user unknown` at RCPT time.
    #[default]
    Reject,
    /// Accept, then send an RFC 3464 bounce to the sender.
    Bounce,
    /// Accept and deliver to `postmaster@` the recipient's domain.
    Postmaster,
}

/// `[routing]`: which domains are ours, and what happens to other mail.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoutingConfig {
    /// Domains whose mail is stored here (default `localhost`, as Postfix's
    /// `mydestination` includes it).
    #[serde(default = "default_local_domains")]
    pub local_domains: Vec<String>,
    /// What to do with mail for an unknown local user.
    #[serde(default)]
    pub unknown_user: UnknownUser,
    /// Clients allowed to send to non-local domains without authenticating.
    #[serde(default = "default_relay_networks")]
    pub relay_networks: Vec<IpNet>,
    /// `host:port`: send every remote message there instead of to MX hosts.
    #[serde(default)]
    pub smarthost: Option<String>,
    /// Credentials for the smarthost (AUTH PLAIN), if it needs them.
    #[serde(default)]
    pub smarthost_auth: Option<SmarthostAuth>,
    /// TLS level for the smarthost; default `delivery.tls.level`, raised to
    /// `encrypt` while `smarthost_auth` is set (unless it allows plaintext).
    #[serde(default)]
    pub smarthost_tls: Option<TlsLevel>,
    /// Implicit TLS to the smarthost (RFC 8314 "wrapper mode", no STARTTLS);
    /// default: on when the smarthost's port is 465.
    #[serde(default)]
    pub smarthost_implicit_tls: Option<bool>,
}

impl RoutingConfig {
    /// Whether the smarthost is reached with implicit TLS: the explicit
    /// `smarthost_implicit_tls`, else port 465.
    pub fn smarthost_implicit(&self) -> bool {
        self.smarthost_implicit_tls.unwrap_or_else(|| {
            self.smarthost
                .as_deref()
                .and_then(|h| h.rsplit_once(':'))
                .is_some_and(|(_, port)| port == "465")
        })
    }

    /// The TLS level that applies to the smarthost, `default` being
    /// `delivery.tls.level`: at least `encrypt` when credentials are set and
    /// plaintext AUTH is not allowed, so a password never crosses in clear.
    pub fn smarthost_level(&self, default: TlsLevel) -> TlsLevel {
        let level = self.smarthost_tls.unwrap_or(default);
        match &self.smarthost_auth {
            Some(auth) if !auth.allow_plaintext => level.max(TlsLevel::Encrypt),
            _ => level,
        }
    }
}

/// A user name and password for the smarthost.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmarthostAuth {
    /// The AUTH user name.
    pub username: String,
    /// The AUTH password (never logged).
    pub password: String,
    /// Send AUTH even without TLS (default false: credentials only go over
    /// TLS, and the smarthost gets at least the `encrypt` level).
    #[serde(default)]
    pub allow_plaintext: bool,
}

/// The password is left out: a `Debug` of the configuration may be logged.
impl std::fmt::Debug for SmarthostAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmarthostAuth")
            .field("username", &self.username)
            .field("password", &crate::logsafe::Secret::new(()))
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

/// Where a bounce that itself cannot be delivered goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DoubleBounce {
    /// Send it to the postmaster.
    #[default]
    Postmaster,
    /// Drop it (logged).
    Drop,
}

/// `[delivery]`: the outbound queue.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// Port used on remote exchangers.
    #[serde(default = "default_mx_port")]
    pub mx_port: u16,
    /// Waits between attempts; after the last one, the last interval repeats.
    #[serde(default = "default_retry", with = "duration_list")]
    pub retry: Vec<Duration>,
    /// A message still undelivered after this long is bounced.
    #[serde(default = "default_max_queue_lifetime", with = "humantime_serde")]
    pub max_queue_lifetime: Duration,
    /// Most simultaneous deliveries to one destination (a domain, or the
    /// smarthost); the concurrency in use grows up to it while deliveries
    /// succeed and falls on failures (Postfix's
    /// `default_destination_concurrency_limit`).
    #[serde(default = "default_concurrency_per_domain")]
    pub concurrency_per_domain: usize,
    /// The concurrency a destination starts with (Postfix's
    /// `initial_destination_concurrency`, 5); at most
    /// `concurrency_per_domain`.
    #[serde(default = "default_initial_concurrency")]
    pub initial_concurrency: usize,
    /// Failed connections in a row at concurrency 1 after which a
    /// destination is "dead" (Postfix's
    /// `default_destination_concurrency_failed_cohort_limit`, 1).
    #[serde(default = "default_failed_cohort_limit")]
    pub failed_cohort_limit: u32,
    /// How long a dead destination is left alone: its waiting mail is
    /// deferred meanwhile (Postfix's `minimal_backoff_time`, 300 s).
    #[serde(default = "default_dead_destination_wait", with = "humantime_serde")]
    pub dead_destination_wait: Duration,
    /// Most messages per time unit to a destination domain (or the
    /// smarthost, by its `host:port`): `"gmail.com" = "100/min"`. Excess
    /// mail waits its turn; it is not deferred.
    #[serde(default)]
    pub rate: std::collections::BTreeMap<String, crate::rate::Rate>,
    /// Most recipients sent in one SMTP transaction.
    #[serde(default = "default_recipients_per_delivery")]
    pub recipients_per_delivery: usize,
    /// Send with `BDAT` (RFC 3030) when the next hop offers CHUNKING; false
    /// always sends DATA (Postfix: `smtp_discard_ehlo_keywords = chunking`).
    #[serde(default = "default_true")]
    pub chunking: bool,
    /// Send a delay warning to the sender once a message has waited this long.
    #[serde(default, with = "humantime_serde")]
    pub delay_warning: Option<Duration>,
    /// What to do with a bounce that cannot be delivered either.
    #[serde(default)]
    pub double_bounce: DoubleBounce,
    /// Bound on establishing an outbound SMTP connection.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Greeting, EHLO, MAIL and RCPT replies (Postfix: 300 s).
    #[serde(default = "default_command_timeout", with = "humantime_serde")]
    pub command_timeout: Duration,
    /// Reply to DATA (Postfix: 120 s).
    #[serde(default = "default_data_init_timeout", with = "humantime_serde")]
    pub data_init_timeout: Duration,
    /// Writing the message (Postfix: 180 s).
    #[serde(default = "default_data_xfer_timeout", with = "humantime_serde")]
    pub data_xfer_timeout: Duration,
    /// Reply to the final dot (Postfix: 600 s).
    #[serde(default = "default_data_done_timeout", with = "humantime_serde")]
    pub data_done_timeout: Duration,
    /// Keep idle connections for the next message to the same destination
    /// (Postfix's connection cache); off: one connection per delivery.
    #[serde(default = "default_true")]
    pub connection_reuse: bool,
    /// `[delivery.tls]`: outbound TLS (STARTTLS) levels and certificates.
    #[serde(default)]
    pub tls: DeliveryTlsConfig,
}

/// Outbound TLS security level, as Postfix's `smtp_tls_security_level`.
/// Ordered from weakest to strongest.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsLevel {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not checked; on a failed
    /// handshake the same server is tried again in clear.
    #[default]
    May,
    /// DANE (RFC 7672) where the exchanger has DNSSEC-validated TLSA
    /// records (needs `[dns] dnssec`): TLS required and the certificate
    /// checked against them; with only unusable records, `encrypt`;
    /// without secure records, `may` (Postfix's opportunistic `dane`).
    Dane,
    /// TLS required (defer without it), certificate not checked.
    Encrypt,
    /// TLS required and the certificate valid for the MX host name (or the
    /// smarthost's name).
    Verify,
    /// TLS required and the certificate valid for the next-hop domain (or a
    /// name under it), not trusting the MX lookup.
    Secure,
}

impl TlsLevel {
    /// The level's name as in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsLevel::None => "none",
            TlsLevel::May => "may",
            TlsLevel::Dane => "dane",
            TlsLevel::Encrypt => "encrypt",
            TlsLevel::Verify => "verify",
            TlsLevel::Secure => "secure",
        }
    }

    /// TLS must be used: without it the delivery is deferred.
    pub fn requires_tls(self) -> bool {
        self >= TlsLevel::Encrypt
    }

    /// The server certificate is checked.
    pub fn verifies(self) -> bool {
        self >= TlsLevel::Verify
    }
}

impl std::fmt::Display for TlsLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[delivery.tls]`: outbound TLS.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryTlsConfig {
    /// Level for destinations without a policy entry (default `may`).
    #[serde(default)]
    pub level: TlsLevel,
    /// PEM file of extra CA certificates trusted for `verify`/`secure`, on
    /// top of the built-in web roots (private relays, tests).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Per destination domain levels (`"example.com" = "verify"`), as
    /// Postfix's `smtp_tls_policy_maps`; a key `.example.com` covers the
    /// domains under example.com. An exact entry wins over a parent's.
    #[serde(default)]
    pub policy: std::collections::BTreeMap<String, TlsLevel>,
}

impl DeliveryTlsConfig {
    /// The level for mail to `domain`: its policy entry, the nearest
    /// `.parent` entry, else `level`.
    pub fn level_for(&self, domain: &str) -> TlsLevel {
        let domain = domain.trim_end_matches('.').to_ascii_lowercase();
        if let Some(level) = self.lookup(&domain) {
            return level;
        }
        let mut rest = domain.as_str();
        while let Some((_, parent)) = rest.split_once('.') {
            if let Some(level) = self.lookup(&format!(".{parent}")) {
                return level;
            }
            rest = parent;
        }
        self.level
    }

    fn lookup(&self, key: &str) -> Option<TlsLevel> {
        self.policy
            .iter()
            .find(|(k, _)| k.trim_end_matches('.').eq_ignore_ascii_case(key))
            .map(|(_, v)| *v)
    }
}

/// `[limits]`: messages and recipients per time window that one SASL user
/// or one client address may submit, counted across all connections and
/// workers (Postfix's anvil: `smtpd_client_message_rate_limit`,
/// `smtpd_client_recipient_rate_limit`). Past them: `452 4.7.0` at MAIL
/// or RCPT until the window ends. Each is off unless set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Messages (MAIL commands accepted) per authenticated user.
    #[serde(default)]
    pub messages_per_user: Option<crate::rate::Rate>,
    /// Recipients (RCPT commands) per authenticated user.
    #[serde(default)]
    pub recipients_per_user: Option<crate::rate::Rate>,
    /// Messages per client IP address, authenticated or not.
    #[serde(default)]
    pub messages_per_client: Option<crate::rate::Rate>,
    /// Recipients per client IP address, authenticated or not.
    #[serde(default)]
    pub recipients_per_client: Option<crate::rate::Rate>,
}

/// `[dns]`: the resolver for MX and address lookups.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Empty: the system resolver (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
    /// Bound on one lookup; `None`: the resolver's default.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Validate answers with DNSSEC (needed for DANE, RFC 7672): answers
    /// that fail validation become temporary failures, and only validated
    /// (secure) MX, address and TLSA records count for DANE. Postfix's
    /// `smtp_dns_support_level = dnssec`. Off by default.
    #[serde(default)]
    pub dnssec: bool,
    /// DNSKEY records (zone-file syntax) to trust instead of the root's
    /// keys, e.g. for a private signed zone or the tests; setting it turns
    /// `dnssec` on.
    #[serde(default)]
    pub trust_anchor: Option<PathBuf>,
}

impl DnsConfig {
    /// True when answers are DNSSEC-validated (`dnssec` or a trust anchor).
    pub fn validates(&self) -> bool {
        self.dnssec || self.trust_anchor.is_some()
    }
}

/// `[mta_sts]`: MTA-STS (RFC 8461) for outbound delivery.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MtaStsConfig {
    /// Look for and apply the policies of recipient domains (default on).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// HTTPS port of `mta-sts.DOMAIN`; always 443 (RFC 8461 §3.3) except in
    /// tests. The policy server's certificate is checked against the same
    /// roots as `verify` deliveries (`delivery.tls.ca_file` included).
    #[serde(default = "default_mta_sts_port")]
    pub port: u16,
    /// Bound on one policy fetch (connect, TLS and body).
    #[serde(default = "default_mta_sts_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

impl Default for MtaStsConfig {
    fn default() -> Self {
        MtaStsConfig {
            enabled: true,
            port: default_mta_sts_port(),
            timeout: default_mta_sts_timeout(),
        }
    }
}

fn default_mta_sts_port() -> u16 {
    443
}

fn default_mta_sts_timeout() -> Duration {
    // RFC 8461 §3.3: "a timeout of 1 minute" is suggested; a queue run
    // should not wait that long on one domain.
    Duration::from_secs(30)
}

/// `[tls]`: the certificate for STARTTLS and the implicit-TLS listeners.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// `[control]`: the control socket.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Unix socket the CLI uses to reach a running server; default
    /// `<data_dir>/control.sock`.
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

/// The HTTP admin listener: Prometheus `/metrics`, `/healthz` and the JSON
/// API for the queue, users and POP3 sessions.
#[derive(Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address to serve on, e.g. `127.0.0.1:9025`; unset: no listener.
    /// Anything but a loopback address needs `token`.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Bearer token every request must carry (`Authorization: Bearer …`);
    /// unset on loopback: anyone who can connect may use the API.
    #[serde(default)]
    pub token: Option<String>,
}

/// The token is left out: a `Debug` of the configuration may be logged.
impl std::fmt::Debug for AdminConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminConfig")
            .field("listen", &self.listen)
            .field(
                "token",
                &self.token.as_ref().map(|_| crate::logsafe::Secret::new(())),
            )
            .finish()
    }
}

fn default_hostname() -> String {
    "localhost".into()
}
fn default_data_dir() -> PathBuf {
    "data".into()
}
fn default_smtp_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:2525".parse().expect("literal address")]
}
fn default_pop3_listen() -> Vec<SocketAddr> {
    vec!["127.0.0.1:1110".parse().expect("literal address")]
}
fn default_max_message_size() -> u64 {
    DEFAULT_MAX_MESSAGE_SIZE
}
fn default_max_recipients() -> usize {
    DEFAULT_MAX_RECIPIENTS
}
fn default_max_line_length() -> usize {
    DEFAULT_MAX_LINE_LENGTH
}
fn default_soft_error_limit() -> u32 {
    10
}
fn default_hard_error_limit() -> u32 {
    20
}
fn default_error_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_smtp_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_min_data_rate() -> u64 {
    500
}
fn default_max_connections_per_ip() -> usize {
    50
}
fn default_max_connections() -> usize {
    10_000
}
fn default_hop_limit() -> usize {
    DEFAULT_HOP_LIMIT
}
fn default_pop3_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_auth_failure_delay() -> Duration {
    Duration::from_secs(2)
}
fn default_max_auth_failure_delay() -> Duration {
    Duration::from_secs(15)
}
fn default_local_domains() -> Vec<String> {
    vec!["localhost".into()]
}
fn default_relay_networks() -> Vec<IpNet> {
    vec![
        "127.0.0.0/8".parse().expect("literal network"),
        "::1/128".parse().expect("literal network"),
    ]
}
fn default_mx_port() -> u16 {
    25
}
fn default_retry() -> Vec<Duration> {
    [5, 10, 20, 40, 67]
        .into_iter()
        .map(|m| Duration::from_secs(m * 60))
        .collect()
}
fn default_max_queue_lifetime() -> Duration {
    Duration::from_secs(5 * 24 * 3600)
}
fn default_concurrency_per_domain() -> usize {
    20
}
fn default_initial_concurrency() -> usize {
    5
}
fn default_failed_cohort_limit() -> u32 {
    1
}
fn default_dead_destination_wait() -> Duration {
    Duration::from_secs(300)
}
fn default_recipients_per_delivery() -> usize {
    50
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_command_timeout() -> Duration {
    Duration::from_secs(300)
}
fn default_data_init_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_data_xfer_timeout() -> Duration {
    Duration::from_secs(180)
}
fn default_data_done_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Default for SmtpConfig {
    fn default() -> Self {
        from_empty_table()
    }
}
impl Default for Pop3Config {
    fn default() -> Self {
        from_empty_table()
    }
}
impl Default for RoutingConfig {
    fn default() -> Self {
        from_empty_table()
    }
}
impl Default for DeliveryConfig {
    fn default() -> Self {
        from_empty_table()
    }
}
impl Default for Config {
    fn default() -> Self {
        from_empty_table()
    }
}

/// Builds a section from its serde defaults, so `Default` and an empty TOML
/// table can never disagree.
fn from_empty_table<T: for<'de> Deserialize<'de>>() -> T {
    toml::from_str("").expect("every field has a serde default")
}

/// A configuration error, naming the file, the line and the key where known.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why it could not be read.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has a bad value.
    #[error("{}", invalid_message(.path, *.line, .key, .message))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line, when the error can be placed.
        line: Option<usize>,
        /// Dotted key path such as `routing.unknown_user`.
        key: Option<String>,
        /// What is wrong.
        message: String,
    },
}

fn invalid_message(path: &Path, line: Option<usize>, key: &Option<String>, msg: &str) -> String {
    let mut out = path.display().to_string();
    if let Some(line) = line {
        out.push_str(&format!(":{line}"));
    }
    out.push_str(": ");
    if let Some(key) = key {
        out.push_str(&format!("key `{key}`: "));
    }
    out.push_str(msg);
    out
}

/// What stands in for a secret in [`Config::without_secrets`]: printable
/// and without spaces, so that the printed configuration still loads.
pub const HIDDEN: &str = "<hidden>";

impl Config {
    /// This configuration with its secrets replaced by [`HIDDEN`]: the
    /// smarthost password, the admin token and a password in the store URL
    /// (its user info or a `password=` parameter). What `check-config`
    /// prints unless asked for them, as `doveconf` hides passwords without
    /// `-P`: its output gets pasted into tickets and chats.
    pub fn without_secrets(&self) -> Config {
        let mut config = self.clone();
        if let Some(auth) = &mut config.routing.smarthost_auth {
            auth.password = HIDDEN.to_owned();
        }
        if let Some(token) = &mut config.admin.token {
            *token = HIDDEN.to_owned();
        }
        if let Some(url) = &mut config.store.url {
            *url = url_without_password(url);
        }
        config
    }

    /// The free-space reserve in bytes: `store.min_free`, or by default
    /// 1.5 × `smtp.max_message_size`.
    pub fn min_free(&self) -> u64 {
        self.store
            .min_free
            .unwrap_or(self.smtp.max_message_size.saturating_mul(3) / 2)
    }

    /// Reads and validates a config file. Relative `data_dir` and TLS paths
    /// are resolved against the file's directory.
    ///
    /// # Errors
    /// [`ConfigError`] with the key and line of the first problem.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Config::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        config.resolve_paths(base);
        if let Some(ca) = &config.delivery.tls.ca_file {
            // Read at every delivery setup: a missing file is said now.
            if let Err(e) = std::fs::File::open(ca) {
                let key = "delivery.tls.ca_file";
                return Err(ConfigError::Invalid {
                    path: path.to_owned(),
                    line: locate_key(&text, key),
                    key: Some(key.into()),
                    message: format!("{}: {e}", ca.display()),
                });
            }
        }
        Ok(config)
    }

    /// Parses and validates config text; `path` is only used in messages.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the key and the line.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let invalid = |line, key: Option<String>, message: String| ConfigError::Invalid {
            path: path.to_owned(),
            line,
            key,
            message,
        };
        let de = toml::Deserializer::parse(text).map_err(|e| {
            invalid(
                e.span().map(|s| line_of(text, s.start)),
                None,
                e.message().to_owned(),
            )
        })?;
        let config: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let line = inner
                .span()
                .map(|s| line_of(text, s.start))
                .or_else(|| locate_key(text, &key));
            let key = (key != ".").then_some(key);
            invalid(line, key, inner.message().to_owned())
        })?;
        config
            .validate()
            .map_err(|(key, message)| invalid(locate_key(text, key), Some(key.into()), message))?;
        config
            .validate_dkim()
            .map_err(|(key, message)| invalid(locate_key(text, &key), Some(key), message))?;
        Ok(config)
    }

    fn resolve_paths(&mut self, base: &Path) {
        let resolve = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        resolve(&mut self.data_dir);
        if let Some(tls) = &mut self.tls {
            resolve(&mut tls.cert);
            resolve(&mut tls.key);
        }
        if let Some(socket) = &mut self.control.socket {
            resolve(socket);
        }
        if let Some(anchor) = &mut self.dns.trust_anchor {
            resolve(anchor);
        }
        if let Some(ca) = &mut self.delivery.tls.ca_file {
            resolve(ca);
        }
        for domain in self.dkim.values_mut() {
            resolve(&mut domain.key);
        }
    }

    /// Checks what serde cannot: returns the offending key and why.
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.hostname.is_empty() || self.hostname.contains(char::is_whitespace) {
            return Err(("hostname", "must be a host name without spaces".into()));
        }
        for d in &self.routing.local_domains {
            if d.is_empty() || d.contains(['@', ' ']) || d.len() > 255 {
                return Err(("routing.local_domains", format!("`{d}` is not a domain")));
            }
        }
        if self.mailbox.quota_warning > 100 {
            return Err((
                "mailbox.quota_warning",
                "a percentage: 0 (off) to 100".into(),
            ));
        }
        if self.smtp.max_line_length < 512 {
            return Err((
                "smtp.max_line_length",
                "must be at least 512 (RFC 5321 §4.5.3.1.4)".into(),
            ));
        }
        if self.smtp.max_recipients < 100 {
            return Err((
                "smtp.max_recipients",
                "must be at least 100 (RFC 5321 §4.5.3.1.8)".into(),
            ));
        }
        let node = &self.store.node;
        if node.is_empty()
            || node.len() > 64
            || !node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err((
                "store.node",
                "1 to 64 characters of A-Z a-z 0-9 . _ -".into(),
            ));
        }
        if self.store.lease < MIN_LEASE {
            return Err((
                "store.lease",
                "must be at least 3s (renewed at a third of it, in whole seconds)".into(),
            ));
        }
        match (self.store.backend, &self.store.url) {
            (StoreBackend::Postgres, None) => {
                return Err((
                    "store.url",
                    "backend = \"postgres\" needs url = \"postgresql://…\"".into(),
                ));
            }
            (_, Some(url))
                if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) =>
            {
                // Not echoed: it may hold a password.
                return Err((
                    "store.url",
                    "must be a postgresql:// (or postgres://) URL".into(),
                ));
            }
            _ => {}
        }
        if self.smtp.hard_error_limit == 0 {
            return Err(("smtp.hard_error_limit", "must be at least 1".into()));
        }
        if self.auth.workers == 0 || self.auth.workers > MAX_AUTH_WORKERS {
            return Err((
                "auth.workers",
                format!("must be between 1 and {MAX_AUTH_WORKERS}"),
            ));
        }
        if self.delivery.retry.is_empty() || self.delivery.retry.iter().any(|d| d.is_zero()) {
            return Err((
                "delivery.retry",
                "must list at least one non-zero interval".into(),
            ));
        }
        if self.delivery.concurrency_per_domain == 0 {
            return Err((
                "delivery.concurrency_per_domain",
                "must be at least 1".into(),
            ));
        }
        if self.delivery.initial_concurrency == 0 {
            return Err(("delivery.initial_concurrency", "must be at least 1".into()));
        }
        if self.delivery.failed_cohort_limit == 0 {
            return Err(("delivery.failed_cohort_limit", "must be at least 1".into()));
        }
        if let Some(host) = &self.routing.smarthost {
            if host
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(("routing.smarthost", format!("`{host}` is not host:port")));
            }
        }
        for domain in self.delivery.tls.policy.keys() {
            let d = domain.strip_prefix('.').unwrap_or(domain);
            if d.is_empty() || d.contains(['@', ' ', ':', '[']) || d.len() > 255 {
                return Err((
                    "delivery.tls.policy",
                    format!("`{domain}` is not a domain (or `.domain` for the domains under it)"),
                ));
            }
        }
        if let Some(auth) = &self.routing.smarthost_auth {
            if !auth.allow_plaintext && self.routing.smarthost_tls == Some(TlsLevel::None) {
                return Err((
                    "routing.smarthost_tls",
                    "\"none\" would send smarthost_auth's password in clear: use encrypt or \
                     stronger, or set routing.smarthost_auth.allow_plaintext = true"
                        .into(),
                ));
            }
        }
        let tls = &self.delivery.tls;
        if !self.dns.validates() {
            if tls.level == TlsLevel::Dane {
                return Err((
                    "delivery.tls.level",
                    "dane needs DNSSEC: set dns.dnssec = true (or dns.trust_anchor)".into(),
                ));
            }
            if let Some((domain, _)) = tls.policy.iter().find(|(_, l)| **l == TlsLevel::Dane) {
                return Err((
                    "delivery.tls.policy",
                    format!(
                        "{domain} = dane needs DNSSEC: set dns.dnssec = true (or dns.trust_anchor)"
                    ),
                ));
            }
        }
        if self.routing.smarthost_tls == Some(TlsLevel::Dane) {
            return Err((
                "routing.smarthost_tls",
                "dane applies to MX delivery, not to the smarthost".into(),
            ));
        }
        if let Some(token) = &self.admin.token {
            if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                return Err((
                    "admin.token",
                    "must be non-empty printable ASCII without spaces".into(),
                ));
            }
        }
        if let Some(addr) = self.admin.listen {
            if !addr.ip().is_loopback() && self.admin.token.is_none() {
                return Err((
                    "admin.listen",
                    format!("{addr} is not a loopback address: set admin.token too"),
                ));
            }
        }
        let needs_tls = !self.smtp.submissions.is_empty() || !self.pop3.pop3s.is_empty();
        if needs_tls && self.tls.is_none() {
            return Err((
                "tls",
                "implicit-TLS listeners (smtp.submissions, pop3.pop3s) need a [tls] section".into(),
            ));
        }
        Ok(())
    }

    /// Checks the `[dkim."DOMAIN"]` sections' names and selectors (their
    /// keys are read by the server); returns the dotted key and why.
    fn validate_dkim(&self) -> Result<(), (String, String)> {
        // RFC 6376 §3.1: a selector is one or more dot-separated labels.
        let labels = |s: &str| {
            s.split('.')
                .all(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'))
        };
        for (domain, dkim) in &self.dkim {
            if domain.len() > 253 || !labels(domain) {
                return Err((format!("dkim.\"{domain}\""), "not a domain name".into()));
            }
            if !labels(&dkim.selector) {
                return Err((
                    format!("dkim.\"{domain}\".selector"),
                    format!(
                        "`{}` is not a selector (letters, digits, `-`, `.`)",
                        dkim.selector
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The control socket path, defaulting into the data directory.
    pub fn control_socket(&self) -> PathBuf {
        self.control
            .socket
            .clone()
            .unwrap_or_else(|| self.data_dir.join("control.sock"))
    }

    /// Whether `domain` (any case) is one of ours.
    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.routing
            .local_domains
            .iter()
            .any(|d| d.eq_ignore_ascii_case(domain))
    }

    /// Whether a client at `ip` may relay without authenticating.
    pub fn may_relay(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        self.routing.relay_networks.iter().any(|n| n.contains(&ip))
    }
}

impl ConfigError {
    /// An error about `dotted` (such as `dkim."example.com".key`) found
    /// after the file loaded, for instance in a file it names: the line is
    /// looked up in `file` when it can be read again.
    pub fn at_key(file: Option<&Path>, dotted: &str, message: String) -> ConfigError {
        let line = file
            .and_then(|f| std::fs::read_to_string(f).ok())
            .and_then(|text| locate_key(&text, dotted));
        ConfigError::Invalid {
            path: file.map_or_else(|| PathBuf::from("(built-in configuration)"), Path::to_owned),
            line,
            key: Some(dotted.to_owned()),
            message,
        }
    }
}

/// `humantime_serde` for a list of durations (`["5m", "10m"]`).
mod duration_list {
    use std::time::Duration;

    use humantime_serde::Serde;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| Serde::from(*d)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let v = Vec::<Serde<Duration>>::deserialize(d)?;
        Ok(v.into_iter().map(Serde::into_inner).collect())
    }
}

/// 1-based line number of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text.as_bytes()[..at.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Finds the line that sets a dotted key such as `routing.local_domains`, by
/// following `[section]` headers. Good enough for error messages; the key is
/// named in the message either way.
fn locate_key(text: &str, dotted: &str) -> Option<usize> {
    let (section, key) = match dotted.rsplit_once('.') {
        Some((s, k)) => (s, k),
        None => ("", dotted),
    };
    let key = key.split('[').next().unwrap_or(key);
    let mut current = String::new();
    for (n, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(h) = t.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            current = h.trim().to_owned();
            if current == dotted {
                return Some(n + 1);
            }
            continue;
        }
        let Some((k, _)) = t.split_once('=') else {
            continue;
        };
        if current == section && k.trim() == key {
            return Some(n + 1);
        }
    }
    None
}

/// `url` (`postgresql://user:password@host/db?password=…`) with each
/// password replaced by [`HIDDEN`].
fn url_without_password(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = match authority.rsplit_once('@') {
        Some((info, hosts)) => match info.split_once(':') {
            Some((user, _)) => format!("{user}:{HIDDEN}@{hosts}"),
            None => authority.to_owned(),
        },
        None => authority.to_owned(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((key, _)) if key == "password" => format!("{key}={HIDDEN}"),
                    _ => p.to_owned(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_owned(),
    };
    match url.contains("://") {
        true => format!("{scheme}://{authority}{tail}"),
        false => format!("{authority}{tail}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("test.toml"))
    }

    #[test]
    fn dkim_sections_name_the_domain_and_key_in_errors() {
        let ok =
            parse("[dkim.\"Example.test\"]\nselector = \"s1.2026\"\nkey = \"k.pem\"\n").unwrap();
        assert_eq!(ok.dkim["Example.test"].selector, "s1.2026");
        let err = parse(
            "hostname = \"h\"\n[dkim.\"example.test\"]\nselector = \"s 1\"\nkey = \"k.pem\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("test.toml:3: key `dkim.\"example.test\".selector`"),
            "{err}"
        );
        let err = parse("[dkim.\"example.test\"]\nselector = \"s1\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("key"), "{err}");
        let err = ConfigError::at_key(None, "dkim.\"a.test\".key", "bad".into()).to_string();
        assert!(err.contains("`dkim.\"a.test\".key`: bad"), "{err}");
    }

    #[test]
    fn mailbox_quota_sizes() {
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("500M"), Ok(500 << 20));
        assert_eq!(parse_size("2KiB"), Ok(2048));
        assert_eq!(parse_size("1234"), Ok(1234));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("99999999T").is_err());
        let c = parse("[mailbox]\nquota = \"1K\"\nquota_warning = 80\n").unwrap();
        assert_eq!((c.mailbox.quota, c.mailbox.quota_warning), (Some(1024), 80));
        let c = parse("[mailbox]\nquota = 5000\n").unwrap();
        assert_eq!(c.mailbox.quota, Some(5000));
        assert_eq!(Config::default().mailbox.quota, None);
        assert!(parse("[mailbox]\nquota_warning = 101\n").is_err());
        assert!(parse("[mailbox]\nquota = \"big\"\n").is_err());
    }

    #[test]
    fn min_free_defaults_to_one_and_a_half_message_sizes() {
        let c = parse("[smtp]\nmax_message_size = 1000000\n").unwrap();
        assert_eq!(c.min_free(), 1_500_000);
        let c = parse("[store]\nmin_free = 0\n").unwrap();
        assert_eq!(c.min_free(), 0);
        assert!(parse("[store]\nmin_free = -1\n").is_err());
    }

    #[test]
    fn empty_config_has_postfix_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c.smtp.max_message_size, 10_240_000);
        assert_eq!(c.smtp.max_recipients, 1000);
        assert_eq!(c.delivery.retry[0], Duration::from_secs(300));
        assert_eq!(c.delivery.max_queue_lifetime, Duration::from_secs(432_000));
        assert_eq!(c.routing.unknown_user, UnknownUser::Reject);
        assert!(c.may_relay("127.0.0.1".parse().unwrap()));
        assert!(!c.may_relay("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn shipped_example_parses() {
        let text = include_str!("../config.example.toml");
        let c = parse(text).unwrap();
        assert!(c.is_local_domain("EXAMPLE.test"));
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let err = parse("hostname = \"a\"\n[smtp]\nlisten = []\nmax_mesage_size = 5\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:4"), "{err}");
        assert!(err.contains("max_mesage_size"), "{err}");
    }

    #[test]
    fn bad_enum_value_names_key_and_line() {
        let err = parse("[routing]\nlocal_domains = [\"a.test\"]\nunknown_user = \"drop\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("routing.unknown_user"), "{err}");
        assert!(err.contains("reject"), "{err}");
    }

    #[test]
    fn log_format_parses_and_bad_value_names_key_and_line() {
        let config = parse("[log]\nformat = \"json\"\n").unwrap();
        assert_eq!(config.log.format, LogFormat::Json);
        assert_eq!(parse("").unwrap().log.format, LogFormat::Text);
        let err = parse("\n[log]\nformat = \"xml\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("log.format"), "{err}");
    }

    #[test]
    fn trace_settings_parse_and_bad_keep_names_key_and_line() {
        let c = parse("").unwrap();
        assert_eq!(c.trace.keep, Duration::from_secs(7 * 24 * 3600));
        assert_eq!(c.trace.max_events_per_message, 100);
        let c = parse("[trace]\nkeep = \"1d\"\nmax_events_per_message = 5\n").unwrap();
        assert_eq!(c.trace.limits().keep, Duration::from_secs(24 * 3600));
        assert_eq!(c.trace.limits().max_events_per_message, 5);
        let err = parse("\n[trace]\nkeep = \"a week\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("trace.keep"), "{err}");
    }

    #[test]
    fn shaping_and_limits_parse_and_bad_rates_name_key_and_line() {
        let c = parse("").unwrap();
        assert_eq!(
            (
                c.delivery.initial_concurrency,
                c.delivery.failed_cohort_limit
            ),
            (5, 1)
        );
        assert!(c.delivery.rate.is_empty() && c.limits.messages_per_user.is_none());
        let c = parse(
            "[delivery]\ninitial_concurrency = 2\n[delivery.rate]\n\"gmail.com\" = \"100/min\"\n[limits]\nmessages_per_user = \"200/h\"\n",
        )
        .unwrap();
        assert_eq!(c.delivery.rate["gmail.com"].to_string(), "100/min");
        assert_eq!(c.limits.messages_per_user.unwrap().count, 200);
        let err = parse("[delivery.rate]\n\n\"gmail.com\" = \"100/day\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("delivery.rate.gmail.com"), "{err}");
        assert!(err.contains("\"100/day\" is not a rate"), "{err}");
        let err = parse("[limits]\nrecipients_per_client = \"0/s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:2"), "{err}");
        assert!(err.contains("limits.recipients_per_client"), "{err}");
        let err = parse("[limits]\nmessages_per_users = \"1/s\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("messages_per_users"), "{err}");
        let err = parse("[delivery]\ninitial_concurrency = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.toml:2") && err.contains("delivery.initial_concurrency"),
            "{err}"
        );
    }

    #[test]
    fn bad_type_names_key_and_line() {
        let err = parse("\n[smtp]\nmax_message_size = \"big\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("smtp.max_message_size"), "{err}");
    }

    #[test]
    fn semantic_error_names_key_and_line() {
        let err = parse("[delivery]\n\nretry = []\n").unwrap_err().to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("delivery.retry"), "{err}");
    }

    #[test]
    fn outbound_tls_levels_and_errors_name_key_and_line() {
        let c = parse("").unwrap();
        assert_eq!(c.delivery.tls.level, TlsLevel::May);
        assert!(c.delivery.connection_reuse);
        let c = parse(
            "[delivery]\nconnection_reuse = false\n[delivery.tls]\nlevel = \"encrypt\"\n\
             [delivery.tls.policy]\n\"Bank.test\" = \"secure\"\n\".corp.test\" = \"none\"\n",
        )
        .unwrap();
        assert!(!c.delivery.connection_reuse);
        assert_eq!(c.delivery.tls.level_for("bank.TEST."), TlsLevel::Secure);
        assert_eq!(c.delivery.tls.level_for("a.corp.test"), TlsLevel::None);
        assert_eq!(c.delivery.tls.level_for("other.test"), TlsLevel::Encrypt);

        let err = parse("[delivery.tls]\n\nlevel = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:3: key `delivery.tls.level`"),
            "{err}"
        );
        let err = parse("[delivery.tls.policy]\n\"a.test\" = \"secure\"\n\"b.test\" = \"dane!\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("test.toml:3:"), "{err}");
        assert!(err.contains("delivery.tls.policy"), "{err}");
        let err = parse("[delivery.tls.policy]\n\"a@b\" = \"secure\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("test.toml:1: key `delivery.tls.policy`: `a@b` is not a domain"),
            "{err}"
        );
    }

    #[test]
    fn smarthost_tls_follows_the_credentials() {
        let c = parse("[routing]\nsmarthost = \"relay.test:587\"\n").unwrap();
        assert_eq!(c.routing.smarthost_level(TlsLevel::May), TlsLevel::May);
        assert!(!c.routing.smarthost_implicit());
        let c = parse(
            "[routing]\nsmarthost = \"relay.test:465\"\n[routing.smarthost_auth]\n\
             username = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        assert_eq!(c.routing.smarthost_level(TlsLevel::May), TlsLevel::Encrypt);
        assert_eq!(c.routing.smarthost_level(TlsLevel::None), TlsLevel::Encrypt);
        assert_eq!(
            c.routing.smarthost_level(TlsLevel::Verify),
            TlsLevel::Verify
        );
        assert!(c.routing.smarthost_implicit());
        let c = parse(
            "[routing]\nsmarthost = \"relay.test:25\"\nsmarthost_implicit_tls = true\n\
             [routing.smarthost_auth]\nusername = \"u\"\npassword = \"p\"\nallow_plaintext = true\n",
        )
        .unwrap();
        assert_eq!(c.routing.smarthost_level(TlsLevel::None), TlsLevel::None);
        assert!(c.routing.smarthost_implicit());
        let err = parse(
            "[routing]\nsmarthost = \"relay.test:25\"\nsmarthost_tls = \"none\"\n\
             [routing.smarthost_auth]\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("test.toml:3: key `routing.smarthost_tls`"),
            "{err}"
        );
    }

    #[test]
    fn a_missing_ca_file_names_key_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("postino.toml");
        std::fs::write(
            &path,
            "[delivery.tls]\nlevel = \"verify\"\nca_file = \"nope.pem\"\n",
        )
        .unwrap();
        let err = Config::load(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}:3: key `delivery.tls.ca_file`: ",
                path.display()
            )),
            "{err}"
        );
        assert!(err.contains("nope.pem"), "{err}");
        std::fs::write(dir.path().join("nope.pem"), "").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.delivery.tls.ca_file, Some(dir.path().join("nope.pem")));
    }

    #[test]
    fn auth_workers_default_to_cores_and_are_checked() {
        let c = parse("").unwrap();
        assert!(c.auth.workers >= 1);
        assert_eq!(parse("[auth]\nworkers = 3\n").unwrap().auth.workers, 3);
        for bad in ["0", "100000"] {
            let err = parse(&format!("[auth]\ncache_ttl = \"0s\"\nworkers = {bad}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("test.toml:3"), "{err}");
            assert!(err.contains("auth.workers"), "{err}");
        }
    }

    #[test]
    fn admin_is_off_by_default_and_needs_a_token_off_loopback() {
        let c = parse("").unwrap();
        assert!(c.admin.listen.is_none());
        let c = parse("[admin]\nlisten = \"127.0.0.1:9025\"\n").unwrap();
        assert_eq!(c.admin.listen, Some("127.0.0.1:9025".parse().unwrap()));
        assert!(parse("[admin]\nlisten = \"[::1]:9025\"\n").is_ok());
        let err = parse("\n[admin]\nlisten = \"0.0.0.0:9025\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("admin.listen"), "{err}");
        assert!(err.contains("admin.token"), "{err}");
        let c = parse("[admin]\nlisten = \"0.0.0.0:9025\"\ntoken = \"s3cret\"\n").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        let err = parse("[admin]\nlisten = \"127.0.0.1:9025\"\ntoken = \"a b\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("admin.token"), "{err}");
        let err = parse("[admin]\nlisten = \"localhost\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:2"), "{err}");
        assert!(err.contains("admin.listen"), "{err}");
        let err = parse("[admin]\nport = 9025\n").unwrap_err().to_string();
        assert!(err.contains("test.toml:2") && err.contains("port"), "{err}");
    }

    #[test]
    fn dane_needs_dnssec_and_mta_sts_is_on_by_default() {
        let c = parse("").unwrap();
        assert!(c.mta_sts.enabled);
        assert_eq!(c.mta_sts.port, 443);
        assert!(!c.dns.validates());
        let err = parse("[delivery.tls]\n\nlevel = \"dane\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:3"), "{err}");
        assert!(err.contains("delivery.tls.level"), "{err}");
        assert!(err.contains("dns.dnssec"), "{err}");
        let err = parse("[delivery.tls.policy]\n\"a.test\" = \"dane\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("delivery.tls.policy") && err.contains("a.test"),
            "{err}"
        );
        let c = parse("[delivery.tls]\nlevel = \"dane\"\n[dns]\ndnssec = true\n").unwrap();
        assert_eq!(c.delivery.tls.level, TlsLevel::Dane);
        assert!(c.dns.validates());
        let c = parse("[dns]\ntrust_anchor = \"k.key\"\n").unwrap();
        assert!(c.dns.validates());
        let err = parse("[mta_sts]\nca_file = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("test.toml:2") && err.contains("ca_file"),
            "{err}"
        );
    }

    #[test]
    fn syntax_error_names_line() {
        let err = parse("hostname = \"a\"\nthis is not toml\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("test.toml:2"), "{err}");
    }

    #[test]
    fn queue_lease_is_configurable_and_not_too_short() {
        assert_eq!(parse("").unwrap().store.lease, Duration::from_secs(120));
        let c = parse("[store]\nlease = \"6s\"\n").unwrap();
        assert_eq!(c.store.lease, Duration::from_secs(6));
        for bad in ["0s", "2s", "2999ms"] {
            let err = parse(&format!("[store]\nnode = \"a\"\nlease = \"{bad}\"\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("test.toml:3") && err.contains("store.lease"),
                "{err}"
            );
        }
    }

    #[test]
    fn durations_are_human() {
        let c =
            parse("[delivery]\nretry = [\"1s\", \"2m\"]\nmax_queue_lifetime = \"1h\"\n").unwrap();
        assert_eq!(
            c.delivery.retry,
            vec![Duration::from_secs(1), Duration::from_secs(120)]
        );
        assert_eq!(c.delivery.max_queue_lifetime, Duration::from_secs(3600));
    }

    #[test]
    fn secrets_are_hidden_and_the_rest_kept() {
        let c = parse(
            "[routing]\nsmarthost = \"relay.test:465\"\n[routing.smarthost_auth]\n\
             username = \"u\"\npassword = \"pw1\"\n\
             [admin]\nlisten = \"127.0.0.1:9025\"\ntoken = \"tok2\"\n\
             [store]\nurl = \"postgresql://bob:pw3@db.test:5432/mail?password=pw4&sslmode=require\"\n",
        )
        .unwrap();
        let hidden = c.without_secrets();
        let text = toml::to_string_pretty(&hidden).unwrap();
        for secret in ["pw1", "tok2", "pw3", "pw4"] {
            assert!(!text.contains(secret), "{secret} in:\n{text}");
        }
        assert_eq!(
            hidden.store.url.as_deref(),
            Some("postgresql://bob:<hidden>@db.test:5432/mail?password=<hidden>&sslmode=require")
        );
        assert_eq!(hidden.routing.smarthost_auth.unwrap().username, "u");
        assert_eq!(hidden.admin.listen, c.admin.listen);
        // Without secrets nothing changes.
        for url in [
            "postgresql://bob@db.test/mail",
            "postgres://db.test",
            "postgresql:///mail?host=/run/pg",
        ] {
            assert_eq!(url_without_password(url), url);
        }
        assert_eq!(
            url_without_password("postgresql://a:b:c@h"),
            "postgresql://a:<hidden>@h"
        );
        assert_eq!(
            url_without_password("postgresql://a:p@ss@h/db"),
            "postgresql://a:<hidden>@h/db"
        );
    }
}
