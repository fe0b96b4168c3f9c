//! The control socket's wire types: one JSON [`Request`] per line, one
//! JSON [`Response`] per line (see [`crate::control`], which answers them,
//! and re-exports them for the CLI).

use postino_core::logsafe::Secret;
use serde::{Deserialize, Serialize};

use crate::queue_tools::QueueRequest;

/// A command for the server. Passwords are [`Secret`]s: requests are logged
/// with `Debug`, which shows `<redacted>` for them (the JSON wire form is the
/// plain string).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Adds a user (`postino user add`).
    UserAdd {
        /// The user's address, in a local domain.
        address: String,
        /// The password, stored as an argon2 hash.
        password: Secret,
        /// The user's quota (`"1G"`, `"unlimited"`, `"default"`).
        #[serde(default)]
        quota: Option<String>,
    },
    /// Changes a user's settings (today: the quota).
    UserSet {
        /// The user.
        address: String,
        /// The new quota, as in `UserAdd`.
        quota: Option<String>,
    },
    /// Sets a user's password (`postino user passwd`).
    UserPasswd {
        /// The user.
        address: String,
        /// The new password.
        password: Secret,
    },
    /// Deletes a user. Without `force`, refused (saying what would happen)
    /// when the mailbox holds mail or aliases point at the user.
    UserDel {
        /// The user.
        address: String,
        /// Delete even with mail or aliases.
        #[serde(default)]
        force: bool,
    },
    /// Lists the users.
    UserList,
    /// Adds an alias (`postino alias add`); a loop is refused.
    AliasAdd {
        /// The alias, in a local domain.
        alias: String,
        /// Where its mail goes (may be remote).
        target: String,
    },
    /// Deletes an alias.
    AliasDel {
        /// The alias.
        alias: String,
    },
    /// Lists the aliases.
    AliasList,
    /// The whole queue in one answer (the CLI now streams with `Queue`).
    QueueList,
    /// One queued message in detail (`postino queue show`).
    QueueShow {
        /// The queue id.
        id: String,
    },
    /// Makes every queued message due now.
    QueueFlush,
    /// Deletes one queued message without notice.
    QueueDelete {
        /// The queue id.
        id: String,
    },
    /// Returns one queued message to its sender.
    QueueBounce {
        /// The queue id.
        id: String,
    },
    /// The delivery destinations of the running server and their traffic
    /// shaping: concurrency, limit, rate, dead or throttled
    /// (`postino queue destinations`).
    QueueDestinations,
    /// The live POP3 sessions (`postino who`).
    Who,
    /// Ends POP3 sessions: `target` is a session id from `Who`, or a user
    /// whose every session ends (`postino kick`).
    Kick {
        /// A session id, or a user.
        target: String,
    },
    /// Reads the server's configuration file again and puts it in place
    /// (`postino reload`, as SIGHUP; see [`crate::reload`]).
    Reload,
    /// Explains where mail to `address` would go (`crate::inspect`).
    RouteExplain {
        /// The recipient.
        address: String,
        /// The sender, if given.
        from: Option<String>,
        /// The client address relay permission is checked for.
        client: Option<String>,
        /// The authenticated user relay permission is checked for.
        auth: Option<String>,
    },
    /// Messages and octets of one mailbox, or of all.
    MailboxStats {
        /// One mailbox; `None`: all.
        address: Option<String>,
    },
    /// Checks a password without logging in (as `doveadm auth test`).
    AuthTest {
        /// The user.
        address: String,
        /// The password to check.
        password: Secret,
    },
    /// Listings, `cat` and bulk actions (`queue_tools.rs`), answered in
    /// chunks: `Response::More` lines, then the last `Response::Ok`.
    Queue(QueueRequest),
    /// A message's history (`postino trace ID [--json]`, `crate::history`).
    Trace {
        /// The queue id.
        id: String,
        /// JSON instead of words.
        #[serde(default)]
        json: bool,
    },
    /// Sets a store failpoint (`postino_core::failpoints`); refused unless
    /// the build has the `failpoints` feature, which only the tests use.
    Failpoint {
        /// The failpoint's name (`store::…`).
        name: String,
        /// The `fail` crate's actions (`return(enospc)`, `off`).
        actions: String,
    },
}

/// The answer: lines to print, or an error.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Response {
    /// Done: the lines to print.
    Ok(Vec<String>),
    /// Failed: the message to print (the CLI exits 1).
    Error(String),
    /// Lines of a streamed answer ([`Request::Queue`]); more follow, up to
    /// an `Ok` or `Error`.
    More(Vec<String>),
}
