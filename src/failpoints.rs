//! Fault injection for tests: named failpoints in the store (the `fail`
//! crate), compiled in only with the `failpoints` cargo feature. Without
//! it every failpoint is an empty statement and this module only says so.
//!
//! Set them with the `FAILPOINTS` environment variable when the server
//! starts (`FAILPOINTS='store::settle_queue=return(enospc)'`, several
//! separated by `;`), or at run time through the control socket's
//! `Failpoint` request (the integration tests' `TestServer::failpoint`).
//! Actions are the `fail` crate's: `return`, `return(enospc)` (the error
//! is ENOSPC instead of EIO), `50%return`, `3*return`, `off`, …
//!
//! | name | where | a hit is |
//! |---|---|---|
//! | `store::directory` | user and alias lookups, password checks | a failed read |
//! | `store::accept_local` | [`Store::accept_local`](crate::Store::accept_local) | a failed write, nothing stored |
//! | `store::accept_remote` | [`Store::accept_remote`](crate::Store::accept_remote) | a failed write after the schedule key (a half-written entry) |
//! | `store::spool` | [`Store::spool`](crate::Store::spool) | a failed write, nothing stored |
//! | `store::durable` | [`Store::durable`](crate::Store::durable) | the caller's flush fails (the flush itself still runs) |
//! | `store::settle_queue` | [`Store::settle_queue`](crate::Store::settle_queue) | a failed write, nothing written |

/// Whether failpoints are compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Sets failpoint `name` to `actions` (`"off"` turns it off).
///
/// # Errors
///
/// Bad actions, or failpoints are not compiled in.
pub fn configure(name: &str, actions: &str) -> Result<(), String> {
    #[cfg(feature = "failpoints")]
    {
        fail::cfg(name, actions)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (name, actions);
        Err("failpoints are not compiled in (cargo feature `failpoints`)".into())
    }
}

/// Reads `FAILPOINTS` from the environment; keep the value for as long as
/// the failpoints should stay set (the life of the process).
///
/// # Panics
///
/// On a malformed `FAILPOINTS` (the `fail` crate's behaviour): a test that
/// asked for faults must not run without them.
#[cfg(feature = "failpoints")]
pub fn from_env() -> fail::FailScenario<'static> {
    fail::FailScenario::setup()
}
