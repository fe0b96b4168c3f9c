//! The control channel: a Unix socket in the data directory through which
//! `postino user …`, `alias …` and `queue …` reach a running server (sled
//! allows one process per database). Without a running server the CLI opens
//! the store itself (sled, or the PostgreSQL database that `[store] url`
//! names) and runs the same [`execute`]. Everything here works on the
//! storage seam ([`Storage`]): on PostgreSQL a user added through any node,
//! or by the CLI on any machine with a node's configuration, is every
//! node's at once.
//!
//! Wire format: one JSON [`Request`] per line, one JSON [`Response`] per line.
//! The socket is created with mode 0600: whoever can use it can add users.
//!
//! Queue changes go to the delivery actor while it runs, as typed
//! [`ChangeQueue`] messages (ids parsed here); its typed answers, and those
//! of the offline variants, are worded here, in one place.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use actix::Recipient;
use postino_core::address::Address;
use postino_core::logsafe::escape;
use postino_core::message::now_unix;
use postino_core::storage::{SharedStorage, Storage};
use postino_core::store::{QueueEntry, QuotaSetting, RecipientState, StoreError};
use postino_core::{Config, MessageId};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::delivery::actor::{ActiveIds, QueueAdmin};
use crate::delivery::actor::{ChangeQueue, Destinations, QueueChanged, QueueError};
use crate::delivery::shaping::View;
use crate::queue_tools::{self, QueueRequest};
use crate::sessions::{Pop3Sessions, SessionInfo};
pub use crate::wire::{Request, Response};

/// What requests act on in a running server: shared by the control socket
/// and the admin HTTP API (`admin.rs`), which both go through
/// [`answer`].
#[derive(Clone)]
pub struct Live {
    /// The storage the server runs on.
    pub store: SharedStorage,
    /// The configuration the server runs with (the current one is taken
    /// per request).
    pub config: crate::reload::LiveConfig,
    /// Reloads the configuration (`postino reload`); `None`: refused.
    pub reloader: Option<crate::reload::Reloader>,
    /// The queue manager (the delivery actor), which carries out queue changes.
    pub queue: Recipient<ChangeQueue>,
    /// The same actor's bulk queue actions (`queue_tools`).
    pub queue_admin: Recipient<QueueAdmin>,
    /// The same actor's list of messages being tried now.
    pub active: Recipient<ActiveIds>,
    /// The live POP3 sessions (`Who`, `Kick`).
    pub sessions: Arc<Pop3Sessions>,
    /// The delivery actor's destinations and their shaping.
    pub destinations: Recipient<Destinations>,
}

/// The bound control socket of a running server.
pub(crate) struct ControlSocket {
    listener: UnixListener,
    live: Live,
}

/// Binds the control socket at `path` (mode 0600); requests act on `live`.
pub(crate) fn bind(path: PathBuf, live: Live) -> std::io::Result<ControlSocket> {
    // A server that answers on it is running with this data directory (a
    // node on a shared database holds no lock on it): leave its socket be.
    // Else the file belongs to a server that is gone.
    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another postino server answers on it (data_dir in use)",
        ));
    }
    let _ = std::fs::remove_file(&path);
    // On PostgreSQL nothing else makes the data directory: the socket is
    // all a node keeps there.
    if let Some(dir) = path.parent() {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let listener = UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(ControlSocket { listener, live })
}

impl ControlSocket {
    /// Answers clients until `stop` is cancelled. A client connected
    /// before that is answered to its end.
    pub(crate) async fn run(self, stop: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = self.listener.accept() => accepted,
            };
            let Ok((stream, _)) = accepted else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let live = self.live.clone();
            actix_rt::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines = tokio::io::BufReader::new(read).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Ok(Request::Queue(request)) = serde_json::from_str::<Request>(&line) {
                        debug!(?request, "control request");
                        if stream_queue(request, &live, &mut write).await.is_err() {
                            break;
                        }
                        continue;
                    }
                    let response = match serde_json::from_str::<Request>(&line) {
                        Ok(request) => answer(&live, request).await,
                        Err(e) => Response::Error(format!("bad request: {e}")),
                    };
                    let mut out = serde_json::to_vec(&response).unwrap_or_default();
                    out.push(b'\n');
                    if write.write_all(&out).await.is_err() {
                        break;
                    }
                }
            });
        }
    }
}

/// Answers one request in the running server: queue changes through the
/// delivery actor, POP3 sessions through the registry, the rest with
/// [`execute`] (off the async threads when it writes, then flushed).
pub async fn answer(live: &Live, request: Request) -> Response {
    debug!(?request, "control request");
    match &request {
        Request::Who => return Response::Ok(who_lines(&live.sessions.list())),
        Request::QueueDestinations => {
            return match live.destinations.send(Destinations).await {
                Ok(views) => Response::Ok(destination_lines(&views)),
                Err(e) => Response::Error(format!("delivery actor: {e}")),
            }
        }
        Request::Kick { target } => return kick(&live.sessions, target),
        Request::Reload => {
            // Reads files: off the async threads.
            let live = live.clone();
            return tokio::task::spawn_blocking(move || reload(&live))
                .await
                .unwrap_or_else(|e| Response::Error(e.to_string()));
        }
        _ => {}
    }
    let (store, config) = (live.store.clone(), live.config.current());
    if crate::inspect::handles(&request) {
        return crate::inspect::answer(store.as_ref(), &config, request).await;
    }
    match queue_change(&request) {
        Some(Ok(change)) => match live.queue.send(change).await {
            Ok(changed) => queue_response(changed),
            Err(e) => Response::Error(format!("delivery actor: {e}")),
        },
        Some(Err(e)) => Response::Error(e),
        None if !changes_store(&request) => execute(store.as_ref(), &config, request).await,
        None => {
            let done = store.clone();
            // Off the async threads: a new password is hashed (argon2),
            // and sled writes in place.
            let response = tokio::task::spawn_blocking(move || {
                futures::executor::block_on(execute(store.as_ref(), &config, request))
            })
            .await
            .unwrap_or_else(|e| Response::Error(e.to_string()));
            // The CLI prints "added …" on this answer: make the change
            // survive a crash first, as the offline CLI's flush does.
            match done.durable().await {
                Ok(()) => response,
                Err(e) => Response::Error(format!("flushing the store: {e}")),
            }
        }
    }
}

/// Answers a [`Request::Queue`]: listings and `cat` are read on a
/// blocking thread (the walk's futures run there; sled reads in place)
/// and sent in chunks of [`queue_tools::CHUNK`] lines
/// through a channel of two chunks, so a listing of any length takes
/// bounded memory; actions are the delivery actor's.
async fn stream_queue(
    request: QueueRequest,
    live: &Live,
    write: &mut tokio::net::unix::OwnedWriteHalf,
) -> std::io::Result<()> {
    async fn send(
        write: &mut tokio::net::unix::OwnedWriteHalf,
        response: &Response,
    ) -> std::io::Result<()> {
        let mut out = serde_json::to_vec(response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        write.write_all(&out).await
    }
    let active = match &request {
        // The state column shows which are being tried.
        QueueRequest::List { .. } => live.active.send(ActiveIds).await.unwrap_or_default(),
        _ => Default::default(),
    };
    let (action, filter) = match request {
        QueueRequest::Act { action, filter } => (action, filter),
        read => {
            let store = live.store.clone();
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<String>>(2);
            let reader = tokio::task::spawn_blocking(move || {
                let mut chunk = Vec::with_capacity(queue_tools::CHUNK);
                let mut emit = |line: String| {
                    chunk.push(line);
                    if chunk.len() < queue_tools::CHUNK {
                        return true;
                    }
                    let full =
                        std::mem::replace(&mut chunk, Vec::with_capacity(queue_tools::CHUNK));
                    tx.blocking_send(full).is_ok()
                };
                let done = futures::executor::block_on(async {
                    match read {
                        QueueRequest::List { filter, json } => {
                            queue_tools::list(store.as_ref(), &filter, json, &active, &mut emit)
                                .await
                        }
                        QueueRequest::Cat { id, part } => {
                            queue_tools::cat(store.as_ref(), &id, part, &mut emit).await
                        }
                        QueueRequest::Act { .. } => unreachable!("matched above"),
                    }
                });
                (done, chunk)
            });
            while let Some(chunk) = rx.recv().await {
                send(write, &Response::More(chunk)).await?;
            }
            let last = match reader.await {
                Ok((Ok(()), rest)) => Response::Ok(rest),
                Ok((Err(e), rest)) => {
                    send(write, &Response::More(rest)).await?;
                    Response::Error(e)
                }
                Err(e) => Response::Error(e.to_string()),
            };
            return send(write, &last).await;
        }
    };
    let store = live.store.clone();
    let answer = match live.queue_admin.send(QueueAdmin { action, filter }).await {
        Ok(Ok(line)) => match store.durable().await {
            Ok(()) => Response::Ok(vec![line]),
            Err(e) => Response::Error(format!("flushing the store: {e}")),
        },
        Ok(Err(e)) => Response::Error(e),
        Err(e) => Response::Error(format!("delivery actor: {e}")),
    };
    send(write, &answer).await
}

/// Sends a [`Request::Queue`] to a running server, handing each chunk of
/// lines to `lines` as it arrives. `Ok(None)`: no server listens; else the
/// last answer (`Ok` with the last lines, which were not handed over, or
/// `Error`).
///
/// # Errors
/// IO errors other than "nobody listens", and those of `lines`.
pub fn call_streaming(
    path: &Path,
    request: &Request,
    mut lines: impl FnMut(Vec<String>) -> std::io::Result<()>,
) -> std::io::Result<Option<Response>> {
    // A bulk action on a deep queue answers once, at the end: a million
    // entries take a while.
    let Some(stream) = connect_and_send(path, request, Duration::from_secs(600))? else {
        return Ok(None);
    };
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    loop {
        answer.clear();
        if reader.read_line(&mut answer)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        match serde_json::from_str(&answer).map_err(std::io::Error::other)? {
            Response::More(chunk) => lines(chunk)?,
            last => return Ok(Some(last)),
        }
    }
}

/// `postino who`: one line per live POP3 session.
fn who_lines(sessions: &[SessionInfo]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<8} {:<40} {:<25} {}",
        "ID", "USER", "SINCE", "CLIENT"
    )];
    lines.extend(sessions.iter().map(|s| {
        format!(
            "{:<8} {:<40} {:<25} {}",
            s.id,
            s.user.as_deref().unwrap_or("-"),
            postino_core::dsn::rfc5322_date(s.since),
            s.peer
        )
    }));
    lines.push(format!("-- {} POP3 session(s)", sessions.len()));
    lines
}

/// `postino kick ID|USER`.
fn kick(sessions: &Pop3Sessions, target: &str) -> Response {
    if let Ok(id) = target.parse::<u64>() {
        return if sessions.kick(id) {
            info!(session = id, "pop3 session kicked by the administrator");
            Response::Ok(vec![format!("kicked session {id}")])
        } else {
            Response::Error(format!("no POP3 session {id}"))
        };
    }
    match sessions.kick_user(target) {
        0 => Response::Error(format!("no POP3 session of {target}")),
        n => {
            info!(user = %escape(target), sessions = n, "pop3 sessions kicked by the administrator");
            Response::Ok(vec![format!("kicked {n} session(s) of {target}")])
        }
    }
}

/// The queue change the delivery actor makes for `request`, if it is one;
/// `Err` for an id that is not one.
fn queue_change(request: &Request) -> Option<Result<ChangeQueue, String>> {
    match request {
        Request::QueueFlush => Some(Ok(ChangeQueue::Flush)),
        Request::QueueDelete { id } => Some(parse_id(id).map(ChangeQueue::Delete)),
        Request::QueueBounce { id } => Some(parse_id(id).map(ChangeQueue::Bounce)),
        _ => None,
    }
}

/// Words a queue change's outcome for the CLI.
fn queue_response(changed: Result<QueueChanged, QueueError>) -> Response {
    match changed {
        Ok(changed) => Response::Ok(queue_lines(&changed)),
        Err(e) => Response::Error(e.to_string()),
    }
}

fn queue_lines(changed: &QueueChanged) -> Vec<String> {
    match changed {
        QueueChanged::Flushed { due } => {
            vec![format!("{due} message(s) scheduled for delivery now")]
        }
        QueueChanged::Deleted(id) => vec![format!("deleted {id}")],
        QueueChanged::Bounced(id) => vec![format!("bounced {id}")],
    }
}

/// Answers [`Request::Reload`]: what took effect, what needs a restart, or
/// why nothing changed.
fn reload(live: &Live) -> Response {
    let Some(reloader) = &live.reloader else {
        return Response::Error("reload is not available here".into());
    };
    match reloader.reload() {
        Ok(done) => {
            let mut lines = vec![if done.applied.is_empty() {
                "reloaded; nothing changed".to_string()
            } else {
                format!("reloaded; in effect: {}", done.applied.join(", "))
            }];
            if !done.need_restart.is_empty() {
                lines.push(format!(
                    "warning: needs a restart (running values kept): {}",
                    done.need_restart.join(", ")
                ));
            }
            Response::Ok(lines)
        }
        Err(e) => Response::Error(format!("reload failed, running configuration kept: {e}")),
    }
}

/// Whether the answer to `request` waits for a flush. Not for failpoints
/// (nor for reads, which have nothing to flush):
/// turning off `store::durable` must not wait for a flush it fails.
fn changes_store(request: &Request) -> bool {
    !matches!(
        request,
        Request::Failpoint { .. }
            | Request::Who
            | Request::QueueDestinations
            | Request::Kick { .. }
            | Request::Reload
            | Request::Trace { .. }
    )
}

/// Connects to the control socket at `path` and sends `request`; the
/// answer is to be read within `timeout`. `Ok(None)`: no server listens.
fn connect_and_send(
    path: &Path,
    request: &Request,
    timeout: Duration,
) -> std::io::Result<Option<std::os::unix::net::UnixStream>> {
    let stream = match std::os::unix::net::UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    stream.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    (&stream).write_all(&line)?;
    Ok(Some(stream))
}

/// Sends one request to a running server. `Ok(None)`: no server listens.
///
/// # Errors
/// IO errors other than "nobody listens" (e.g. permission denied).
pub fn call(path: &Path, request: &Request) -> std::io::Result<Option<Response>> {
    let Some(stream) = connect_and_send(path, request, Duration::from_secs(60))? else {
        return Ok(None);
    };
    let mut reader = BufReader::new(&stream);
    let mut answer = String::new();
    reader.read_line(&mut answer)?;
    serde_json::from_str(&answer)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// Runs a request against the store (server side, or the CLI when no
/// server runs). `config` gives the local domains that new users and
/// aliases must be in.
pub async fn execute(store: &dyn Storage, config: &Config, request: Request) -> Response {
    let checked = match &request {
        Request::UserAdd {
            address,
            quota: Some(q),
            ..
        } => local_address(config, address).and_then(|()| quota_setting(q).map(drop)),
        Request::UserAdd { address, .. } => local_address(config, address),
        Request::AliasAdd { alias, target } => {
            local_address(config, alias).and_then(|()| address(target).map(drop))
        }
        _ => Ok(()),
    };
    if let Err(e) = checked {
        return Response::Error(e);
    }
    let result = match request {
        Request::Trace { id, json } => return crate::history::answer(store, &id, json).await,
        Request::UserAdd {
            address,
            password,
            quota,
        } => {
            let added = match store
                .add_user(&address.to_ascii_lowercase(), password.expose())
                .await
            {
                Ok(()) => match quota.as_deref().map(quota_setting) {
                    Some(Ok(q)) => store.set_quota(&address, q).await,
                    _ => Ok(()),
                },
                Err(e) => Err(e),
            };
            added.map(|()| {
                info!(user = %escape(&address), "user added");
                vec![format!("added {address}")]
            })
        }
        Request::UserSet { address, quota } => {
            let Some(quota) = quota else {
                return Response::Error("nothing to set (--quota)".into());
            };
            match quota_setting(&quota) {
                Ok(q) => store.set_quota(&address, q).await.map(|()| {
                    info!(user = %escape(&address), quota = %escape(&quota), "quota set");
                    vec![format!("quota of {address}: {quota}")]
                }),
                Err(e) => return Response::Error(e),
            }
        }
        Request::UserPasswd { address, password } => store
            .set_password(&address.to_ascii_lowercase(), password.expose())
            .await
            .map(|()| vec![format!("password of {address} changed")]),
        Request::UserDel { address, force } => {
            if !force {
                match what_user_del_removes(store, &address.to_ascii_lowercase()).await {
                    Ok(None) => {}
                    Ok(Some(what)) => return Response::Error(what),
                    Err(e) => return Response::Error(e.to_string()),
                }
            }
            store
                .delete_user(&address.to_ascii_lowercase())
                .await
                .map(|()| {
                    info!(user = %escape(&address), "user deleted");
                    vec![format!("deleted {address}")]
                })
        }
        Request::UserList => store.users().await,
        Request::AliasAdd { alias, target } => store
            .add_alias(&alias.to_ascii_lowercase(), &target.to_ascii_lowercase())
            .await
            .map(|()| vec![format!("{alias} -> {target}")]),
        Request::AliasDel { alias } => store
            .delete_alias(&alias.to_ascii_lowercase())
            .await
            .map(|()| vec![format!("deleted alias {alias}")]),
        Request::AliasList => store.aliases().await.map(|all| {
            all.into_iter()
                .map(|(a, t)| format!("{a} -> {}", t.join(", ")))
                .collect()
        }),
        Request::QueueList => whole_queue(store).await.map(|q| {
            let mut lines = vec![format!(
                "{:<10} {:<30} {:>8} {:<25} {:<20} {}",
                "ID", "SENDER", "ATTEMPTS", "NEXT ATTEMPT", "RECIPIENTS", "LAST ERROR"
            )];
            lines.extend(q.iter().map(queue_line));
            lines.push(format!("-- {} message(s) in the queue", q.len()));
            lines
        }),
        Request::QueueShow { id } => match parse_id(&id) {
            Ok(id) => match store.queue_entry(id).await {
                Ok(Some(entry)) => Ok(queue_details(&entry)),
                // Not found is a failure, as `user del` of nobody is.
                Ok(None) => return Response::Error(QueueError::NotQueued(id).to_string()),
                Err(e) => Err(e),
            },
            Err(e) => return Response::Error(e),
        },
        // Offline variants of what the delivery actor does when running.
        Request::QueueFlush => flush_offline(store)
            .await
            .map(|()| vec!["all queued messages are due now".into()]),
        Request::QueueDelete { id } => match parse_id(&id) {
            Ok(id) => match delete_offline(store, id).await {
                Ok(changed) => Ok(queue_lines(&changed)),
                Err(QueueError::Store(e)) => Err(e),
                Err(e) => return Response::Error(e.to_string()),
            },
            Err(e) => return Response::Error(e),
        },
        Request::QueueBounce { .. } => {
            return Response::Error("queue bounce needs the running server (it sends mail)".into())
        }
        Request::QueueDestinations => {
            return Response::Error(
                "no server runs: destinations live in the running server's memory".into(),
            )
        }
        Request::Who | Request::Kick { .. } => {
            return Response::Error("no server runs, so no POP3 session either".into())
        }
        Request::Reload => return Response::Error("no server runs, so nothing to reload".into()),
        Request::RouteExplain { .. } | Request::MailboxStats { .. } | Request::AuthTest { .. } => {
            return crate::inspect::answer(store, config, request).await
        }
        Request::Queue(request) => {
            // Collected: the CLI streams these itself (`queue_tools`).
            let mut lines = Vec::new();
            let done = match request {
                QueueRequest::List { filter, json } => {
                    queue_tools::list(store, &filter, json, &Default::default(), |l| {
                        lines.push(l);
                        true
                    })
                    .await
                }
                QueueRequest::Cat { id, part } => {
                    queue_tools::cat(store, &id, part, |l| {
                        lines.push(l);
                        true
                    })
                    .await
                }
                QueueRequest::Act { action, filter } => {
                    queue_tools::act_offline(store, action, &filter)
                        .await
                        .map(|l| lines.push(l))
                }
            };
            return match done {
                Ok(()) => Response::Ok(lines),
                Err(e) => Response::Error(e),
            };
        }
        Request::Failpoint { name, actions } => {
            return match postino_core::failpoints::configure(&name, &actions) {
                Ok(()) => {
                    warn!(%name, %actions, "failpoint set");
                    Response::Ok(vec![format!("{name}={actions}")])
                }
                Err(e) => Response::Error(e),
            };
        }
    };
    match result {
        Ok(lines) => Response::Ok(lines),
        Err(e) => {
            warn!(error = %escape(&e.to_string()), "control request failed");
            Response::Error(e.to_string())
        }
    }
}

/// [`ChangeQueue::Delete`] without the server.
async fn delete_offline(store: &dyn Storage, id: MessageId) -> Result<QueueChanged, QueueError> {
    if store.queue_entry(id).await?.is_none() {
        return Err(QueueError::NotQueued(id));
    }
    store.remove_queue(id).await?;
    Ok(QueueChanged::Deleted(id))
}

/// [`ChangeQueue::Flush`] without the server: every entry due now, a page
/// at a time (held entries stay held).
async fn flush_offline(store: &dyn Storage) -> Result<(), StoreError> {
    let now = now_unix();
    let mut after = None;
    loop {
        let page = store.queue_page(after, queue_tools::PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(());
        };
        after = Some(last.entry.id);
        for item in page {
            if item.entry.next_attempt > now {
                store.reschedule(item.entry.id, now, false).await?;
            }
        }
    }
}

/// Every queue entry, for the older [`Request::QueueList`] (which answers
/// in one piece; `postino queue list` streams [`Request::Queue`]).
async fn whole_queue(store: &dyn Storage) -> Result<Vec<QueueEntry>, StoreError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let page = store.queue_page(after, queue_tools::PAGE).await?;
        let Some(last) = page.last() else {
            return Ok(all);
        };
        after = Some(last.entry.id);
        all.extend(page.into_iter().map(|item| item.entry));
    }
}

/// A quota as the CLI gives it: a size (`"500M"`), `unlimited` or
/// `default` (`[mailbox] quota` applies).
fn quota_setting(text: &str) -> Result<QuotaSetting, String> {
    match text {
        "default" => Ok(QuotaSetting::Default),
        "unlimited" | "none" => Ok(QuotaSetting::Unlimited),
        size => postino_core::config::parse_size(size)
            .map(QuotaSetting::Octets)
            .map_err(|e| format!("--quota: {e}, unlimited or default")),
    }
}

/// What deleting user `address` would take with it, when that is more
/// than the user: `None` when the mailbox is empty and no alias points at
/// it (or there is no such user: the delete then says so).
async fn what_user_del_removes(
    store: &dyn Storage,
    address: &str,
) -> Result<Option<String>, StoreError> {
    if !store.is_user(address).await? {
        return Ok(None);
    }
    let mail = store.maildrop(address).await?;
    let aliases: Vec<String> = store
        .aliases()
        .await?
        .into_iter()
        .filter(|(_, targets)| targets.iter().any(|t| t == address))
        .map(|(alias, _)| alias)
        .collect();
    if mail.is_empty() && aliases.is_empty() {
        return Ok(None);
    }
    let mut what = Vec::new();
    if !mail.is_empty() {
        let octets: u64 = mail.iter().map(|m| m.size).sum();
        what.push(format!(
            "its {} message(s) ({octets} octets) would be deleted",
            mail.len()
        ));
    }
    if !aliases.is_empty() {
        what.push(format!(
            "aliases pointing at it ({}) would send their mail to the postmaster",
            aliases.join(", ")
        ));
    }
    Ok(Some(format!(
        "{address}: {}; repeat with --force to delete",
        what.join(", and ")
    )))
}

/// `address` as RFC 5321 allows it in a path (UTF-8 too, as with SMTPUTF8).
fn address(address: &str) -> Result<Address, String> {
    match Address::parse(address, true) {
        Ok(a) if !a.domain.is_empty() => Ok(a),
        Ok(_) => Err(format!("invalid address {address}: no domain")),
        Err(e) => Err(format!("invalid address {address}: {e}")),
    }
}

/// A new mailbox or alias: an address in one of the local domains that the
/// router would deliver here (no `%`, `!` or `@` in the local part, which it
/// refuses as relaying attempts).
fn local_address(config: &Config, name: &str) -> Result<(), String> {
    let a = address(name)?;
    if !config.is_local_domain(&a.domain) {
        return Err(format!(
            "{name}: {} is not a local domain (routing.local_domains: {})",
            a.domain,
            config.routing.local_domains.join(", ")
        ));
    }
    if a.names_another_host() {
        return Err(format!(
            "invalid address {name}: a local part with %, ! or @ names another host"
        ));
    }
    Ok(())
}

/// A queue id as the CLI gives it.
///
/// # Errors
/// The text that the CLI prints when it is not one.
pub fn parse_id(id: &str) -> Result<MessageId, String> {
    MessageId::parse_queue_id(id)
}

fn queue_line(e: &QueueEntry) -> String {
    let pending: Vec<&str> = e
        .recipients
        .iter()
        .filter(|r| {
            matches!(
                r.state,
                RecipientState::Pending | RecipientState::Deferred { .. }
            )
        })
        .map(|r| r.address.as_str())
        .collect();
    let last_error = e
        .recipients
        .iter()
        .find_map(|r| match &r.state {
            RecipientState::Deferred { last_error } => Some(last_error.to_string()),
            _ => None,
        })
        .unwrap_or_default();
    format!(
        "{:<10} {:<30} {:>8} {:<25} {:<20} {}",
        e.id.to_string(),
        format!("<{}>", e.sender.as_deref().unwrap_or("")),
        e.attempts,
        postino_core::dsn::rfc5322_date(e.next_attempt),
        pending.join(","),
        last_error
    )
}

fn queue_details(e: &QueueEntry) -> Vec<String> {
    let mut lines = vec![
        format!("id: {}", e.id),
        format!("sender: <{}>", e.sender.as_deref().unwrap_or("")),
        format!(
            "received: {}",
            postino_core::dsn::rfc5322_date(e.received_at)
        ),
        format!("client: {}", e.client),
        format!("attempts: {}", e.attempts),
        format!(
            "next attempt: {}",
            postino_core::dsn::rfc5322_date(e.next_attempt)
        ),
    ];
    for r in &e.recipients {
        lines.push(format!("recipient: {} {}", r.address, r.state));
    }
    lines
}

/// `postino queue destinations`: one line per destination the delivery
/// actor knows now (mail running or waiting for it, or a death or rate to
/// remember), then a count line.
fn destination_lines(views: &[View]) -> Vec<String> {
    let mut lines = vec![format!(
        "{:<30} {:>6} {:>7} {:>11} {:<10} {}",
        "DESTINATION", "ACTIVE", "WAITING", "CONCURRENCY", "RATE", "STATE"
    )];
    for v in views {
        let state = match (v.dead_for, v.throttled_for) {
            (Some(s), _) => format!("dead, retried in {s}s"),
            (None, Some(s)) => format!("throttled, next in {s:.1}s"),
            (None, None) => "ok".to_owned(),
        };
        lines.push(format!(
            "{:<30} {:>6} {:>7} {:>11} {:<10} {state}",
            v.name,
            v.active,
            v.waiting,
            format!("{}/{}", v.window, v.max),
            v.rate.as_deref().unwrap_or("-"),
        ));
    }
    lines.push(format!("-- {} destination(s)", views.len()));
    lines
}
