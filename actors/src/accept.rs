//! The accept loop of one listener: takes connections, applies the
//! connection limits (a `421`/`-ERR` to those over them), hands each
//! accepted socket to a worker arbiter in turn, which does the implicit-TLS
//! handshake and starts the SMTP or POP3 connection actor there. Ends when
//! its [`CancellationToken`] is cancelled.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::io::{Stream, TlsSlot};
use crate::limits::Limits;
use crate::pop3::{Pop3Connection, Pop3Shared};
use crate::smtp::{SmtpConnection, SmtpShared};

/// Listen backlog: thousands of clients may connect at once (an ISP relay,
/// `postino bench smtp --hold`); the default 1024 made some of 10,000 hang.
/// The kernel caps it at `net.core.somaxconn` (4096 here).
pub const LISTEN_BACKLOG: u32 = 8192;

/// What a listener serves.
#[derive(Clone)]
pub(crate) enum Kind {
    /// One shared state per worker arbiter, in worker order.
    Smtp(Arc<Vec<Arc<SmtpShared>>>),
    Pop3(Arc<Pop3Shared>),
}

/// Everything an accept loop hands to the connections it starts.
pub(crate) struct Acceptor {
    pub(crate) kind: Kind,
    /// Whether the listener is SMTPS/POP3S (TLS before the greeting).
    pub(crate) implicit_tls: bool,
    pub(crate) workers: Vec<ArbiterHandle>,
    pub(crate) limits: Arc<Limits>,
    pub(crate) config: crate::reload::LiveConfig,
    pub(crate) tls: TlsSlot,
    /// Given to every session: `true` asks it to finish.
    pub(crate) shutdown: watch::Receiver<bool>,
}

/// Binds `addr` with [`LISTEN_BACKLOG`] and `SO_REUSEADDR`.
pub(crate) fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // Restarts must not wait for TIME_WAIT sockets to expire.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

impl Acceptor {
    /// Accepts connections on `listener` until `stop` is cancelled; the
    /// listening socket closes when this returns.
    pub(crate) async fn run(self, listener: TcpListener, stop: CancellationToken) {
        let mut next = 0usize;
        let mut backoff = Duration::from_millis(5);
        loop {
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                accepted = listener.accept() => accepted,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    backoff = Duration::from_millis(5);
                    accepted
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning or
                    // giving up (mini-redis does the same).
                    warn!(error = %e, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                    continue;
                }
            };
            self.start(stream, peer, next);
            next = next.wrapping_add(1);
        }
    }

    /// Starts the connection actor for one accepted socket on worker
    /// `next % workers`, or refuses the socket over the limits.
    fn start(&self, stream: TcpStream, peer: SocketAddr, next: usize) {
        let config = &self.config.current();
        let (per_ip, total, name) = match &self.kind {
            Kind::Smtp(_) => (
                config.smtp.max_connections_per_ip,
                config.smtp.max_connections,
                "smtp",
            ),
            Kind::Pop3(_) => (
                config.pop3.max_connections_per_ip,
                config.pop3.max_connections,
                "pop3",
            ),
        };
        let Some(guard) = self.limits.try_acquire(peer.ip(), per_ip, total, name) else {
            warn!(%peer, "too many connections; refused");
            actix_rt::spawn(refuse(
                stream,
                matches!(self.kind, Kind::Smtp(_)),
                config.hostname.clone(),
            ));
            return;
        };
        let Ok(std) = stream.into_std() else { return };
        let index = next % self.workers.len();
        let worker = &self.workers[index];
        let kind = self.kind.clone();
        let shutdown = self.shutdown.clone();
        let acceptor = self.implicit_tls.then(|| self.tls.get()).flatten();
        let handshake_timeout = config.smtp.timeout.min(Duration::from_secs(60));
        worker.spawn(async move {
            // Registered with this worker's reactor, not the acceptor's.
            let Ok(tcp) = TcpStream::from_std(std) else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let stream = match acceptor {
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => Stream::Tls(Box::new(tls)),
                        _ => return,
                    }
                }
                None => Stream::Plain(tcp),
            };
            match kind {
                Kind::Smtp(shared) => {
                    let shared = shared[index % shared.len()].clone();
                    SmtpConnection::new(shared, stream, peer, shutdown, guard).start();
                }
                Kind::Pop3(shared) => {
                    Pop3Connection::new(shared, stream, peer, shutdown, guard).start();
                }
            }
        });
    }
}

/// Answers a connection over the limits with a 421 (SMTP) or -ERR (POP3).
async fn refuse(mut stream: TcpStream, smtp: bool, hostname: String) {
    let line = if smtp {
        format!("421 4.7.0 {hostname} Error: too many connections\r\n")
    } else {
        "-ERR [SYS/TEMP] Too many connections\r\n".to_owned()
    };
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.write_all(line.as_bytes())).await;
    let _ = stream.shutdown().await;
}
