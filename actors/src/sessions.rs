//! The live POP3 sessions, for `postino who` and `postino kick` (control
//! socket and admin API): each connection actor registers itself here while
//! it runs, with the user once logged in and a [`Kick`] recipient.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Mutex;

use actix::{Message, Recipient};
use serde::{Deserialize, Serialize};

/// Ends a POP3 session at once: the connection is closed without `QUIT`, so
/// nothing marked deleted is removed (RFC 1939 §6) and the maildrop lock is
/// released.
#[derive(Message, Debug)]
#[rtype(result = "()")]
pub struct Kick;

/// One live POP3 session as `who` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// The connection's id (the one `kick` takes).
    pub id: u64,
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The maildrop it has open, once logged in.
    pub user: Option<String>,
    /// When it connected, unix seconds.
    pub since: u64,
}

struct Live {
    info: SessionInfo,
    kick: Recipient<Kick>,
}

/// The registry: a small map under a mutex, touched at connect, login and
/// disconnect only.
#[derive(Default)]
pub struct Pop3Sessions {
    live: Mutex<BTreeMap<u64, Live>>,
}

impl Pop3Sessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Live>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection `id` from `peer` started.
    pub fn connected(&self, id: u64, peer: SocketAddr, kick: Recipient<Kick>) {
        let info = SessionInfo {
            id,
            peer,
            user: None,
            since: postino_core::message::now_unix(),
        };
        self.lock().insert(id, Live { info, kick });
    }

    /// Connection `id` logged in to `user`'s maildrop.
    pub fn logged_in(&self, id: u64, user: &str) {
        if let Some(live) = self.lock().get_mut(&id) {
            live.info.user = Some(user.to_owned());
        }
    }

    /// Connection `id` ended.
    pub fn disconnected(&self, id: u64) {
        self.lock().remove(&id);
    }

    /// Every live session, oldest first.
    pub fn list(&self) -> Vec<SessionInfo> {
        self.lock().values().map(|l| l.info.clone()).collect()
    }

    /// Asks every session logged in as `user` (any case) to end; how many.
    pub fn kick_user(&self, user: &str) -> usize {
        let live = self.lock();
        let mut n = 0;
        for l in live.values() {
            if l.info
                .user
                .as_deref()
                .is_some_and(|u| u.eq_ignore_ascii_case(user))
            {
                l.kick.do_send(Kick);
                n += 1;
            }
        }
        n
    }

    /// Asks session `id` to end; `false` if there is none.
    pub fn kick(&self, id: u64) -> bool {
        match self.lock().get(&id) {
            Some(live) => {
                live.kick.do_send(Kick);
                true
            }
            None => false,
        }
    }
}
