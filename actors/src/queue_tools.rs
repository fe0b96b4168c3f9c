//! The administrator's queue tools: `postino queue list|cat|hold|release|
//! requeue|flush|delete|bounce` with filters (`--domain`, `--sender`,
//! `--older-than`, `--state`) and `--json`, as Postfix's `mailq`, `postcat
//! -q`, `postsuper -h/-H/-r/-d` and `postqueue -s` do.
//!
//! Everything here works on the storage seam ([`Storage`]), so the tools
//! act the same on sled and on a PostgreSQL shared by several nodes.
//! Listings walk the queue a page at a time ([`Selection`], over
//! [`postino_core::storage::Queue::queue_page`]) and hand their lines to a
//! callback, which the control socket sends on in chunks ([`CHUNK`] lines)
//! through a bounded channel: memory stays bounded whatever the queue's
//! length. Actions on a running server are carried out by the delivery
//! actor (`delivery/actor/admin.rs`), so that its schedule and the store
//! agree; without a server, on the store ([`act_offline`]).

use std::collections::HashSet;

use postino_core::message::now_unix;
use postino_core::storage::Storage;
use postino_core::store::{QueueItem, RecipientState};
use postino_core::MessageId;
use serde::{Deserialize, Serialize};

/// Lines per chunk of a streamed answer on the control socket.
pub const CHUNK: usize = 512;
/// Entries read from the store per page of a walk.
pub const PAGE: usize = 512;

/// Where a queued message stands, as `--state` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// Being tried right now: by the running server, or on PostgreSQL by
    /// any node (its lease).
    Active,
    /// Put on hold: not tried until released.
    Held,
    /// Tried at least once, waiting for its next attempt.
    Deferred,
    /// Not tried yet.
    Incoming,
}

impl State {
    /// The name `--state` and the listings use.
    pub fn name(self) -> &'static str {
        match self {
            State::Active => "active",
            State::Held => "held",
            State::Deferred => "deferred",
            State::Incoming => "incoming",
        }
    }
}

/// Which messages a request is about: the ids given, or every message
/// that passes all the filters set. An empty filter selects everything.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Queue ids, as `queue list` prints them.
    pub ids: Vec<String>,
    /// A recipient still to be delivered to is in this domain
    /// (case-insensitive).
    pub domain: Option<String>,
    /// The envelope sender, case-insensitive; `@domain` matches any sender
    /// in that domain, an empty string the null sender `<>`.
    pub sender: Option<String>,
    /// Received at least this many seconds ago.
    pub older_than: Option<u64>,
    /// In one of these states (any, when empty).
    pub states: Vec<State>,
}

impl Filter {
    /// Whether nothing narrows the selection.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
            && self.domain.is_none()
            && self.sender.is_none()
            && self.older_than.is_none()
            && self.states.is_empty()
    }

    /// Whether `item` passes every filter (ids aside).
    pub fn matches(&self, item: &QueueItem, active: &HashSet<MessageId>, now: u64) -> bool {
        let e = &item.entry;
        if let Some(d) = &self.domain {
            let in_domain = e.recipients.iter().any(|r| {
                r.state.is_open()
                    && r.address
                        .rsplit_once('@')
                        .is_some_and(|(_, rd)| rd.eq_ignore_ascii_case(d))
            });
            if !in_domain {
                return false;
            }
        }
        if let Some(s) = &self.sender {
            let sender = e.sender.as_deref().unwrap_or("");
            let ok = match s.strip_prefix('@') {
                Some(d) => sender
                    .rsplit_once('@')
                    .is_some_and(|(_, sd)| sd.eq_ignore_ascii_case(d)),
                None => {
                    sender.eq_ignore_ascii_case(s.trim_start_matches('<').trim_end_matches('>'))
                }
            };
            if !ok {
                return false;
            }
        }
        if let Some(age) = self.older_than {
            if now.saturating_sub(e.received_at) < age {
                return false;
            }
        }
        self.states.is_empty() || self.states.contains(&state_of(item, active))
    }
}

/// The state of a queued message; `active` holds the ids this server is
/// trying (a lease in the store, [`QueueItem::leased_by`], counts too).
pub fn state_of(item: &QueueItem, active: &HashSet<MessageId>) -> State {
    if item.held {
        State::Held
    } else if active.contains(&item.entry.id) || item.leased_by.is_some() {
        State::Active
    } else if item.entry.attempts > 0 {
        State::Deferred
    } else {
        State::Incoming
    }
}

/// What `queue cat` prints of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Part {
    /// Headers and body (`postcat -q`).
    All,
    /// The header section only (`postcat -h`).
    Headers,
    /// The body only (`postcat -b`).
    Body,
}

/// An action on the selected messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Action {
    /// Keep them queued but untried (`postsuper -h`).
    Hold,
    /// End the hold and make them due now (`postsuper -H`).
    Release,
    /// Due now, with the retry schedule started again (`postsuper -r`).
    Requeue,
    /// Due now (`postqueue -f`, `-s DOMAIN`).
    Flush,
    /// Drop them without telling the sender (`postsuper -d`).
    Delete,
    /// Return them to their senders.
    Bounce,
}

impl Action {
    /// The past tense for the count line ("3 message(s) held").
    pub fn done(self) -> &'static str {
        match self {
            Action::Hold => "held",
            Action::Release => "released",
            Action::Requeue => "requeued",
            Action::Flush => "scheduled for delivery now",
            Action::Delete => "deleted",
            Action::Bounce => "bounced",
        }
    }
}

/// A queue request that the control socket answers in chunks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum QueueRequest {
    /// `queue list`: a table, or one JSON object per message (`json`).
    List {
        /// Which messages.
        filter: Filter,
        /// NDJSON instead of the table.
        json: bool,
    },
    /// `queue cat ID`: the message's octets, as lines.
    Cat {
        /// The queue id.
        id: String,
        /// Headers, body, or both.
        part: Part,
    },
    /// `queue hold|release|requeue|flush|delete|bounce`.
    Act {
        /// What to do.
        action: Action,
        /// To which messages.
        filter: Filter,
    },
}

/// Resolves the ids of `filter`; `Err` names those not queued.
fn parse_ids(filter: &Filter) -> Result<Vec<MessageId>, String> {
    filter
        .ids
        .iter()
        .map(|s| MessageId::parse_queue_id(s))
        .collect()
}

/// A walk over the selected messages, a page at a time: the given ids,
/// else the whole queue in id order (a page of at most [`PAGE`] entries
/// is in memory at once). Entries changed or removed between pages are
/// seen as they are when their page is read.
pub struct Selection<'a> {
    filter: &'a Filter,
    active: &'a HashSet<MessageId>,
    now: u64,
    /// The ids given, still to look up; `None`: walk the queue.
    ids: Option<std::vec::IntoIter<MessageId>>,
    after: Option<MessageId>,
    done: bool,
    missing: Vec<MessageId>,
}

impl<'a> Selection<'a> {
    /// Starts a walk over what `filter` selects; `active` holds the ids
    /// being tried (for `--state active`).
    ///
    /// # Errors
    /// An id given that is not a queue id.
    pub fn new(
        filter: &'a Filter,
        active: &'a HashSet<MessageId>,
    ) -> Result<Selection<'a>, String> {
        let ids = match filter.ids.is_empty() {
            true => None,
            false => Some(parse_ids(filter)?.into_iter()),
        };
        Ok(Selection {
            filter,
            active,
            now: now_unix(),
            ids,
            after: None,
            done: false,
            missing: Vec::new(),
        })
    }

    /// The next selected messages; `None` once the walk is over.
    ///
    /// # Errors
    /// A store failure, as text.
    pub async fn next_page(
        &mut self,
        storage: &dyn Storage,
    ) -> Result<Option<Vec<QueueItem>>, String> {
        while !self.done {
            let mut page = Vec::new();
            match &mut self.ids {
                Some(ids) => {
                    for id in ids.by_ref().take(PAGE) {
                        match storage.queue_item(id).await.map_err(|e| e.to_string())? {
                            Some(item) => page.push(item),
                            None => self.missing.push(id),
                        }
                    }
                    self.done = ids.len() == 0;
                }
                None => {
                    page = storage
                        .queue_page(self.after, PAGE)
                        .await
                        .map_err(|e| e.to_string())?;
                    // A short page may only mean that an entry went
                    // between reading its id and its record: the walk
                    // ends on an empty page.
                    self.done = page.is_empty();
                    self.after = page.last().map(|i| i.entry.id);
                }
            }
            page.retain(|item| self.filter.matches(item, self.active, self.now));
            if !page.is_empty() {
                return Ok(Some(page));
            }
        }
        Ok(None)
    }

    /// The ids given that were not queued (complete once the walk is over).
    pub fn missing(&self) -> &[MessageId] {
        &self.missing
    }
}

/// Calls `each` with every selected message, in id order: the given ids,
/// else a walk over the whole queue. `each` returns false to stop early.
/// Returns the ids given that are not queued.
///
/// # Errors
/// A bad id or a store failure, as text.
pub async fn select(
    storage: &dyn Storage,
    filter: &Filter,
    active: &HashSet<MessageId>,
    mut each: impl FnMut(QueueItem) -> Result<bool, String>,
) -> Result<Vec<MessageId>, String> {
    let mut selection = Selection::new(filter, active)?;
    'walk: while let Some(page) = selection.next_page(storage).await? {
        for item in page {
            if !each(item)? {
                break 'walk;
            }
        }
    }
    Ok(selection.missing)
}

/// The error for ids that are not queued.
pub fn not_queued(missing: &[MessageId]) -> String {
    let ids: Vec<String> = missing.iter().map(|id| id.to_string()).collect();
    format!("no queued message {}", ids.join(", "))
}

/// Header line of the table `queue list` prints.
pub fn list_header() -> String {
    format!(
        "{:<10} {:<8} {:>9} {:<30} {:>8} {:<31} {:<20} {}",
        "ID", "STATE", "SIZE", "SENDER", "ATTEMPTS", "NEXT ATTEMPT", "RECIPIENTS", "LAST ERROR"
    )
}

/// One table line: fixed-width columns, the open recipients and the
/// first last error at the end (they vary in length).
pub fn list_line(item: &QueueItem, state: State) -> String {
    let e = &item.entry;
    let pending: Vec<&str> = e
        .recipients
        .iter()
        .filter(|r| r.state.is_open())
        .map(|r| r.address.as_str())
        .collect();
    let last_error = e
        .recipients
        .iter()
        .find_map(|r| match state_text(&r.state) {
            ("deferred", diagnostic) => diagnostic,
            _ => None,
        })
        .unwrap_or_default();
    let next = match (state, &item.leased_by) {
        (State::Held, _) => "on hold".to_owned(),
        (State::Active, Some(node)) => format!("now, on node {node}"),
        _ => postino_core::dsn::rfc5322_date(e.next_attempt),
    };
    format!(
        "{:<10} {:<8} {:>9} {:<30} {:>8} {:<31} {:<20} {}",
        e.id.to_string(),
        state.name(),
        item.size,
        format!("<{}>", e.sender.as_deref().unwrap_or("")),
        e.attempts,
        next,
        pending.join(","),
        last_error
    )
}

/// A recipient's state as a name and its diagnostic, if any.
fn state_text(state: &RecipientState) -> (&'static str, Option<String>) {
    match state {
        RecipientState::Pending => ("pending", None),
        RecipientState::Deferred { last_error } => ("deferred", Some(last_error.to_string())),
        RecipientState::Delivered { reply } => ("delivered", Some(reply.to_string())),
        RecipientState::Failed { reply } => ("failed", Some(reply.to_string())),
        RecipientState::Bounced { reply } => ("bounced", Some(reply.to_string())),
    }
}

/// One message as a JSON object (one line of `queue list --json`).
pub fn list_json(item: &QueueItem, state: State) -> String {
    let e = &item.entry;
    let recipients: Vec<serde_json::Value> = e
        .recipients
        .iter()
        .map(|r| {
            let (name, diagnostic) = state_text(&r.state);
            serde_json::json!({
                "address": r.address,
                "state": name,
                "diagnostic": diagnostic,
            })
        })
        .collect();
    serde_json::json!({
        "id": e.id.to_string(),
        "state": state.name(),
        "size": item.size,
        "sender": e.sender.as_deref().unwrap_or(""),
        "received_at": e.received_at,
        "next_attempt": (!item.held).then_some(e.next_attempt),
        "attempts": e.attempts,
        "node": item.leased_by,
        "client": e.client,
        "recipients": recipients,
    })
    .to_string()
}

/// `queue list`: calls `emit` with each output line (the table with its
/// header and count line, or one JSON object per message). `emit`
/// returns false when nobody reads any more.
///
/// # Errors
/// A bad or unknown id, or a store failure, as text.
pub async fn list(
    storage: &dyn Storage,
    filter: &Filter,
    json: bool,
    active: &HashSet<MessageId>,
    mut emit: impl FnMut(String) -> bool,
) -> Result<(), String> {
    if !json && !emit(list_header()) {
        return Ok(());
    }
    let mut n = 0u64;
    let mut open = true;
    let missing = select(storage, filter, active, |item| {
        let state = state_of(&item, active);
        n += 1;
        let line = match json {
            true => list_json(&item, state),
            false => list_line(&item, state),
        };
        open = emit(line);
        Ok(open)
    })
    .await?;
    if !missing.is_empty() {
        return Err(not_queued(&missing));
    }
    if !json && open {
        emit(match filter.is_empty() {
            true => format!("-- {n} message(s) in the queue"),
            false => format!("-- {n} message(s) matched"),
        });
    }
    Ok(())
}

/// `queue cat`: the lines of the message (line ends removed), or the part
/// asked for. Content that is not UTF-8 is shown with U+FFFD in its place.
///
/// # Errors
/// A bad or unknown id, or a store failure, as text.
pub async fn cat(
    storage: &dyn Storage,
    id: &str,
    part: Part,
    mut emit: impl FnMut(String) -> bool,
) -> Result<(), String> {
    let id = MessageId::parse_queue_id(id)?;
    let content = match storage.queued_content(id).await {
        Ok(Some(c)) => c,
        Ok(None) => return Err(not_queued(&[id])),
        Err(e) => return Err(e.to_string()),
    };
    let mut in_headers = true;
    let text = content.strip_suffix(b"\r\n").unwrap_or(&content);
    for line in text.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let show = match part {
            Part::All => true,
            Part::Headers => in_headers,
            Part::Body => !in_headers,
        };
        let ends_headers = in_headers && line.is_empty();
        if ends_headers {
            in_headers = false;
            // The blank line separates: shown in full, not in a part.
            if part != Part::All {
                continue;
            }
        }
        if show && !emit(String::from_utf8_lossy(line).into_owned()) {
            break;
        }
    }
    Ok(())
}

/// Carries out an action on the store when no server runs: bounce needs
/// the running server (it sends mail), the others are store writes.
///
/// # Errors
/// A refused action, a bad or unknown id, or a store failure, as text.
pub async fn act_offline(
    storage: &dyn Storage,
    action: Action,
    filter: &Filter,
) -> Result<String, String> {
    check_selection(action, filter)?;
    if action == Action::Bounce {
        return Err("queue bounce needs the running server (it sends mail)".into());
    }
    let now = now_unix();
    let mut n = 0u64;
    let active = HashSet::new();
    let mut selection = Selection::new(filter, &active)?;
    while let Some(page) = selection.next_page(storage).await? {
        for item in page {
            let id = item.entry.id;
            let done = match action {
                Action::Hold => storage.hold(id, now).await,
                Action::Release => storage.release(id, now).await,
                Action::Requeue => storage
                    .reschedule(id, now, true)
                    .await
                    .map(|r| r == postino_core::store::Rescheduled::Done),
                Action::Flush => storage
                    .reschedule(id, now, false)
                    .await
                    .map(|r| r == postino_core::store::Rescheduled::Done),
                Action::Delete => storage.remove_queue(id).await.map(|()| true),
                Action::Bounce => unreachable!("refused above"),
            };
            n += u64::from(done.map_err(|e| e.to_string())?);
        }
    }
    finish(action, n, selection.missing())
}

/// The answer to an action: the count, or the ids not found.
///
/// # Errors
/// Some ids given were not queued (the others were acted on).
pub fn finish(action: Action, n: u64, missing: &[MessageId]) -> Result<String, String> {
    let done = format!("{n} message(s) {}", action.done());
    match missing {
        [] => Ok(done),
        _ => Err(format!("{}; {done}", not_queued(missing))),
    }
}

/// Bulk actions need ids or a filter: an empty selection means "every
/// message", which only `flush` takes without being told.
///
/// # Errors
/// The selection is empty for an action other than flush.
pub fn check_selection(action: Action, filter: &Filter) -> Result<(), String> {
    if action != Action::Flush && filter.is_empty() {
        return Err(
            "name queue ids or a filter (--domain, --sender, --older-than, --state)".into(),
        );
    }
    Ok(())
}
