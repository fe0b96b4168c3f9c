//! Reloading the configuration of a running server, as `postfix reload`:
//! SIGHUP, `postino reload` (the control socket) and [`crate::Server::reload`]
//! read a new [`Config`], validate it whole and put it in place.
//!
//! The configuration in use sits in one [`LiveConfig`]; whatever decides
//! something takes the current one at the start of its unit of work: a
//! session at its start (limits, timeouts, the greeting's name), the router
//! at each `RCPT TO`, intake at each message, the delivery actor at each
//! round, an accept loop at each connection. Sessions in progress finish
//! with the values they started with, except the submission rates
//! (`[limits]`), taken at each MAIL and RCPT; the delivery destinations'
//! concurrency limits and rates change at once, for waiting mail too.
//!
//! What is bound once at start (listeners, the data directory, the store's
//! tuning, the password threads, ...) cannot change without a restart: a
//! reload names those settings in a warning and keeps their running values,
//! so the configuration in use always says what runs. A file that does not
//! load (syntax, a bad value, an unreadable TLS certificate) is logged with
//! its file, line and key, and the running configuration stays.

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use actix::prelude::*;
use postino_core::config::Config;
use postino_core::smtp::session::SessionConfig;
use tracing::{error, info, warn};

use crate::io::TlsSlot;

/// The configuration in use, shared by every part of a running server and
/// swapped whole by a reload. Cloning shares it.
#[derive(Clone)]
pub struct LiveConfig(Arc<RwLock<Arc<Config>>>);

impl LiveConfig {
    /// A handle on `config`, until a reload replaces it.
    pub fn new(config: Arc<Config>) -> LiveConfig {
        LiveConfig(Arc::new(RwLock::new(config)))
    }

    /// The configuration in use now. Hold the `Arc` for a unit of work
    /// (a session, a decision) so that it sees one configuration.
    pub fn current(&self) -> Arc<Config> {
        match self.0.read() {
            Ok(c) => c.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Puts `config` in place for every later [`LiveConfig::current`].
    fn set(&self, config: Arc<Config>) {
        match self.0.write() {
            Ok(mut c) => *c = config,
            Err(poisoned) => *poisoned.into_inner() = config,
        }
    }
}

impl From<Arc<Config>> for LiveConfig {
    fn from(config: Arc<Config>) -> LiveConfig {
        LiveConfig::new(config)
    }
}

impl From<Config> for LiveConfig {
    fn from(config: Config) -> LiveConfig {
        LiveConfig::new(Arc::new(config))
    }
}

/// Tells the delivery actor which configuration the next rounds use (its
/// retry schedule, smarthost, timeouts, resolver).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Reconfigure(pub Arc<Config>);

/// What a reload changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reloaded {
    /// Settings now in effect, as dotted keys (`smtp.max_message_size`).
    pub applied: Vec<String>,
    /// Settings that changed in the file but need a restart; their running
    /// values stay.
    pub need_restart: Vec<String>,
}

/// Why a reload did not happen; the running configuration stays.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReloadError {
    /// The file does not load (names file, line and key where known).
    #[error(transparent)]
    Config(#[from] postino_core::config::ConfigError),
    /// The TLS certificate or key cannot be read.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// Reloads a running server's configuration; see [`crate::Server::reloader`].
#[derive(Clone)]
pub struct Reloader {
    pub(crate) live: LiveConfig,
    /// The file the server was started with (`None`: built-in defaults).
    pub(crate) file: Option<PathBuf>,
    pub(crate) tls: TlsSlot,
    /// The DKIM signing keys, read again at every reload.
    pub(crate) dkim: crate::dkim::DkimKeys,
    pub(crate) store: postino_core::storage::SharedStorage,
    pub(crate) delivery: Recipient<Reconfigure>,
    /// One reload at a time (SIGHUP and `postino reload` may cross).
    pub(crate) busy: Arc<std::sync::Mutex<()>>,
}

impl Reloader {
    /// Reads the file the server was started with again and puts it in
    /// place ([`Reloader::apply`]); without a file, only the TLS
    /// certificate is read again. Success and failure are both logged.
    ///
    /// # Errors
    /// The file does not load or its certificate cannot be read; nothing
    /// changed.
    pub fn reload(&self) -> Result<Reloaded, ReloadError> {
        let result = match &self.file {
            Some(path) => Config::load(path)
                .map_err(ReloadError::from)
                .and_then(|config| self.apply(config)),
            None => self.apply(Config::clone(&self.live.current())),
        };
        if let Err(e) = &result {
            error!(error = %e, "configuration reload failed; keeping the running configuration");
        }
        result
    }

    /// Puts `config` in place of the running configuration: settings that
    /// need a restart keep their running values (and are named in a
    /// warning), the TLS certificate is read again, and new sessions,
    /// routing decisions and delivery rounds use the rest.
    ///
    /// # Errors
    /// The TLS certificate or key cannot be read; nothing changed.
    pub fn apply(&self, mut config: Config) -> Result<Reloaded, ReloadError> {
        let _one = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.live.current();
        let need_restart = keep_restart_settings(&old, &mut config);
        // Read before anything changes: a bad key keeps it all.
        let dkim = crate::dkim::DkimKeys::load(&config, self.file.as_deref())?;
        if let Some(tls) = &config.tls {
            // Read before anything changes: a bad certificate keeps it all.
            let acceptor = crate::tls::acceptor(tls).inspect_err(|e| {
                error!(error = %e, "tls reload failed; keeping the old certificate");
            })?;
            self.tls.set(acceptor);
            info!("tls certificate reloaded");
        }
        let applied = changed_keys(&old, &config);
        let config = Arc::new(config);
        self.store
            .set_quota_policy(config.mailbox.quota, config.mailbox.quota_warning);
        // Keys first: once the delivery actor takes the new configuration,
        // the notices it makes find the keys that go with it.
        self.dkim.replace(dkim);
        self.delivery.do_send(Reconfigure(config.clone()));
        self.live.set(config);
        for (section, keys) in by_section(&applied) {
            info!(section, keys = %keys.join(", "), "reload: now in effect");
        }
        if !need_restart.is_empty() {
            warn!(
                settings = %need_restart.join(", "),
                "reload: these settings need a restart; their running values stay"
            );
        }
        info!(
            config = %self
                .file
                .as_deref()
                .map_or("built-in defaults".into(), |p| p.display().to_string()),
            changed = applied.len(),
            "configuration reloaded"
        );
        Ok(Reloaded {
            applied,
            need_restart,
        })
    }
}

/// Copies into `new` the running value of every setting that is bound at
/// start, and returns the names of those that differed.
fn keep_restart_settings(old: &Config, new: &mut Config) -> Vec<String> {
    let mut changed = Vec::new();
    macro_rules! keep {
        ($($field:ident).+) => {
            if json(&old.$($field).+) != json(&new.$($field).+) {
                changed.push(stringify!($($field).+).replace(' ', ""));
                new.$($field).+ = old.$($field).+.clone();
            }
        };
    }
    keep!(data_dir);
    keep!(smtp.listen);
    keep!(smtp.submission);
    keep!(smtp.submissions);
    keep!(pop3.listen);
    keep!(pop3.pop3s);
    keep!(pop3.auth_failure_delay);
    keep!(pop3.max_auth_failure_delay);
    keep!(admin.listen);
    keep!(control.socket);
    keep!(store);
    keep!(auth.workers);
    keep!(auth.cache_ttl);
    keep!(auth.cache_size);
    keep!(log);
    // TLS on or off changes what every listener offers; a new certificate
    // (other paths included) is read on reload.
    if old.tls.is_some() != new.tls.is_some() {
        changed.push("tls".into());
        new.tls = old.tls.clone();
    }
    changed
}

fn json<T: serde::Serialize>(value: &T) -> serde_json::Value {
    serde_json::to_value(value).unwrap_or(serde_json::Value::Null)
}

/// The dotted keys (`section.key`) whose values differ. Values are never
/// logged, only keys: some are secrets.
fn changed_keys(old: &Config, new: &Config) -> Vec<String> {
    let (old, new) = (json(old), json(new));
    let mut keys = Vec::new();
    diff("", &old, &new, 0, &mut keys);
    keys
}

fn diff(
    prefix: &str,
    a: &serde_json::Value,
    b: &serde_json::Value,
    depth: usize,
    out: &mut Vec<String>,
) {
    use serde_json::Value::Object;
    match (a, b) {
        (Object(a), Object(b)) if depth < 2 => {
            let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
            names.sort();
            names.dedup();
            let null = serde_json::Value::Null;
            for name in names {
                let key = if prefix.is_empty() {
                    name.clone()
                } else {
                    format!("{prefix}.{name}")
                };
                diff(
                    &key,
                    a.get(name).unwrap_or(&null),
                    b.get(name).unwrap_or(&null),
                    depth + 1,
                    out,
                );
            }
        }
        _ if a != b => out.push(prefix.to_owned()),
        _ => {}
    }
}

/// Groups dotted keys by their section, in order.
fn by_section(keys: &[String]) -> Vec<(&str, Vec<&str>)> {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for key in keys {
        let (section, rest) = key.split_once('.').unwrap_or((key.as_str(), key.as_str()));
        match groups.last_mut() {
            Some((s, keys)) if *s == section => keys.push(rest),
            _ => groups.push((section, vec![rest])),
        }
    }
    groups
}

/// The SMTP session settings of a listener (`auth_required`: submission)
/// under `config`: taken at the start of each session.
pub(crate) fn smtp_session(config: &Config, auth_required: bool) -> Arc<SessionConfig> {
    Arc::new(SessionConfig {
        hostname: config.hostname.clone(),
        max_message_size: config.smtp.max_message_size,
        max_recipients: config.smtp.max_recipients,
        hop_limit: config.smtp.hop_limit,
        soft_error_limit: config.smtp.soft_error_limit,
        hard_error_limit: config.smtp.hard_error_limit,
        tls_available: config.tls.is_some(),
        auth_available: true,
        auth_required,
        allow_plaintext_auth: config.smtp.allow_plaintext_auth || config.tls.is_none(),
        postmaster_domain: config
            .routing
            .local_domains
            .first()
            .cloned()
            .unwrap_or_else(|| config.hostname.clone()),
        max_line_length: config.smtp.max_line_length,
        bare_lf: config.smtp.bare_lf,
        error_delay: config.smtp.error_delay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, "t.toml".as_ref()).unwrap()
    }

    #[test]
    fn restart_settings_keep_their_running_values() {
        let old = parse("[smtp]\nlisten = [\"127.0.0.1:25\"]\n");
        let mut new = parse(
            "data_dir = \"/elsewhere\"\n[smtp]\nlisten = [\"127.0.0.1:26\"]\nmax_message_size = 1000\n",
        );
        let changed = keep_restart_settings(&old, &mut new);
        assert_eq!(changed, ["data_dir", "smtp.listen"]);
        assert_eq!(new.smtp.listen, old.smtp.listen);
        assert_eq!(new.data_dir, old.data_dir);
        assert_eq!(changed_keys(&old, &new), ["smtp.max_message_size"]);
    }

    #[test]
    fn changed_keys_group_by_section() {
        let old = parse("");
        let new = parse("[routing]\nlocal_domains = [\"b.test\"]\n[smtp]\nmax_recipients = 150\n");
        let keys = changed_keys(&old, &new);
        assert!(
            keys.contains(&"routing.local_domains".to_string()),
            "{keys:?}"
        );
        assert!(
            keys.contains(&"smtp.max_recipients".to_string()),
            "{keys:?}"
        );
        let groups = by_section(&keys);
        assert_eq!(groups.iter().filter(|(s, _)| *s == "routing").count(), 1);
    }
}
