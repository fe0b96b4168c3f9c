//! The SMTP client side of remote delivery: one connection to the first
//! exchanger that answers, then one or more mail transactions on it.
//!
//! [`SmtpClient::connect`] walks the exchangers in order and stops at the
//! first server ([`RemoteHost`]: one exchanger, one address) that greets
//! and answers EHLO (or HELO).
//! [`SmtpClient::send`] runs one transaction (MAIL, RCPT…, then DATA, or
//! `BDAT … LAST` when the server offers CHUNKING) and
//! says, per recipient, whether the message was delivered, deferred or
//! failed. A connection stays usable for further transactions while
//! [`SmtpClient::is_reusable`] is true, so the delivery actor can keep a
//! few per destination. [`deliver`] does connect, send and QUIT in one call.
//!
//! The protocol parts without IO live in the core crate
//! (`postino_core::smtp::client`): replies are read by a [`ReplyReceiver`],
//! EHLO keywords by [`Extensions::parse`], and message content is
//! line-end normalised by [`encode_content`] (dot-stuffed, for DATA) or
//! [`encode_chunk`] (as is, for BDAT).

use std::borrow::Cow;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use bytes::BytesMut;
use postino_core::config::{DeliveryConfig, SmarthostAuth};
use postino_core::esmtp::{xtext_encode, EnvelopeParams, Ret};
use postino_core::logsafe::escape;
use postino_core::smtp::client::{
    encode_chunk, encode_content, Extensions, ReplyError, ReplyReceiver,
};
use postino_core::smtp::{RemoteHost, Reply};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;
use tracing::{debug, info, Instrument};

use super::mx::Exchanger;
use super::tls::{server_name, OutboundTls, TlsInfo, TlsLevel, TlsRequirement};

/// Postfix's `smtp_mx_address_limit`: addresses tried per delivery.
pub const DEFAULT_MAX_ADDRESSES: usize = 5;
/// Postfix's `smtp_mx_session_limit`: servers that got as far as a greeting
/// before we give up for this attempt.
pub const DEFAULT_MAX_SESSIONS: usize = 2;
/// Message content is written in pieces of this size, each under the
/// `data_xfer` timeout, so a slow but moving link is not cut off.
const WRITE_CHUNK: usize = 64 * 1024;

/// Per-stage client timeouts (Postfix `smtp_*_timeout`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, per address.
    pub connect: Duration,
    /// Greeting, EHLO/HELO, AUTH, MAIL, RCPT, RSET and QUIT replies.
    pub command: Duration,
    /// Reply to DATA.
    pub data_init: Duration,
    /// Each write of message content.
    pub data_xfer: Duration,
    /// Reply to the final dot.
    pub data_done: Duration,
}

impl From<&DeliveryConfig> for Timeouts {
    fn from(c: &DeliveryConfig) -> Self {
        Timeouts {
            connect: c.connect_timeout,
            command: c.command_timeout,
            data_init: c.data_init_timeout,
            data_xfer: c.data_xfer_timeout,
            data_done: c.data_done_timeout,
        }
    }
}

/// How the client introduces itself and how long it waits.
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Name sent in EHLO/HELO (the server's `hostname`).
    pub helo_name: String,
    pub timeouts: Timeouts,
    /// AUTH PLAIN credentials (for the smarthost). When set, a server that
    /// does not offer AUTH PLAIN or rejects the credentials is skipped like
    /// one that is down: relaying unauthenticated would only be refused.
    pub auth: Option<SmarthostAuth>,
    /// Addresses tried at most per [`SmtpClient::connect`].
    pub max_addresses: usize,
    /// Servers that greeted (or refused to) tried at most per connect.
    pub max_sessions: usize,
    /// Send with `BDAT` to servers offering CHUNKING (`delivery.chunking`).
    pub chunking: bool,
    /// Outbound TLS (roots and client configurations). `None`: no TLS at
    /// all, whatever a [`Target`] asks (a [`TlsRequirement`] that needs TLS
    /// then fails).
    pub tls: Option<Arc<OutboundTls>>,
}

/// One exchanger and the TLS its connection must have.
#[derive(Debug, Clone)]
pub struct Target {
    pub exchanger: Exchanger,
    pub tls: TlsRequirement,
}

impl ClientSettings {
    pub fn new(helo_name: impl Into<String>, delivery: &DeliveryConfig) -> Self {
        ClientSettings {
            helo_name: helo_name.into(),
            timeouts: Timeouts::from(delivery),
            auth: None,
            max_addresses: DEFAULT_MAX_ADDRESSES,
            max_sessions: DEFAULT_MAX_SESSIONS,
            chunking: delivery.chunking,
            tls: None,
        }
    }
}

/// One mail transaction: a sender, recipients of one destination and the
/// content (CRLF lines, not dot-stuffed, as the store keeps it).
#[derive(Debug, Clone, Copy)]
pub struct Transaction<'a> {
    /// `None` is the null reverse path `<>` (bounces).
    pub sender: Option<&'a str>,
    pub recipients: &'a [String],
    pub content: &'a [u8],
    /// DSN and SMTPUTF8 parameters, if the message has any.
    pub params: Option<&'a EnvelopeParams>,
}

/// Why a recipient was not delivered: the remote server's reply, or what went
/// wrong on our side (timeout, lost connection, size over the server's limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Diagnostic {
    Remote(Reply),
    Local {
        /// RFC 3463 enhanced status code.
        status: Cow<'static, str>,
        text: String,
    },
}

impl Diagnostic {
    fn local(status: &'static str, text: impl Into<String>) -> Diagnostic {
        Diagnostic::Local {
            status: Cow::Borrowed(status),
            text: text.into(),
        }
    }

    /// The enhanced status code: the server's, or `4.0.0`/`5.0.0` from its
    /// reply code when it sent none.
    pub fn status(&self) -> Cow<'static, str> {
        match self {
            Diagnostic::Remote(reply) => match &reply.status {
                Some(s) => s.clone(),
                None => Cow::Owned(format!("{}.0.0", reply.code / 100)),
            },
            Diagnostic::Local { status, .. } => status.clone(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Diagnostic::Remote(reply) => write!(f, "{reply}"),
            Diagnostic::Local { status, text } => write!(f, "{status} {text}"),
        }
    }
}

/// What happened to one recipient of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptOutcome {
    /// The server took responsibility: the reply to the final dot.
    Delivered(Reply),
    /// Try again later (4xx, timeout, lost connection).
    Deferred(Diagnostic),
    /// Bounce (5xx, or a local permanent reason).
    Failed(Diagnostic),
}

impl RcptOutcome {
    pub fn is_delivered(&self) -> bool {
        matches!(self, RcptOutcome::Delivered(_))
    }
    pub fn is_deferred(&self) -> bool {
        matches!(self, RcptOutcome::Deferred(_))
    }
    pub fn is_failed(&self) -> bool {
        matches!(self, RcptOutcome::Failed(_))
    }

    fn from_reply(reply: &Reply) -> RcptOutcome {
        if reply.code >= 500 {
            RcptOutcome::Failed(Diagnostic::Remote(reply.clone()))
        } else {
            // 4xx, and anything out of place (a 3xx to RCPT): not a reason
            // to bounce.
            RcptOutcome::Deferred(Diagnostic::Remote(reply.clone()))
        }
    }
}

/// No exchanger could be brought to the point of accepting a transaction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{diagnostic}")]
pub struct ConnectError {
    /// The last server tried, when any address was tried.
    pub remote: Option<RemoteHost>,
    /// True when the last server tried refused for good (5xx greeting or
    /// HELO): as Postfix, the final server's answer decides.
    pub permanent: bool,
    pub diagnostic: Diagnostic,
}

impl ConnectError {
    /// The outcome for every recipient of the attempt.
    pub fn outcome(&self) -> RcptOutcome {
        if self.permanent {
            RcptOutcome::Failed(self.diagnostic.clone())
        } else {
            RcptOutcome::Deferred(self.diagnostic.clone())
        }
    }
}

/// Where in the conversation something went wrong, for diagnostics in
/// Postfix's words ("lost connection with … while sending RCPT TO").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Greeting,
    Ehlo,
    Helo,
    Auth,
    Rset,
    Mail,
    Rcpt,
    Data,
    Content,
    Dot,
    Quit,
    StartTls,
    TlsHandshake,
}

impl Stage {
    fn describe(self) -> &'static str {
        match self {
            Stage::Greeting => "receiving the initial server greeting",
            Stage::Ehlo => "performing the EHLO handshake",
            Stage::Helo => "performing the HELO handshake",
            Stage::Auth => "performing AUTH PLAIN",
            Stage::Rset => "sending RSET",
            Stage::Mail => "sending MAIL FROM",
            Stage::Rcpt => "sending RCPT TO",
            Stage::Data => "sending DATA command",
            Stage::Content => "sending message body",
            Stage::Dot => "sending end of data -- message may be sent more than once",
            Stage::Quit => "sending QUIT",
            Stage::StartTls => "sending STARTTLS",
            Stage::TlsHandshake => "performing the TLS handshake",
        }
    }
}

/// Transport trouble: the connection is unusable afterwards.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("timed out")]
    Timeout,
    #[error("lost connection")]
    Closed,
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Protocol(#[from] ReplyError),
    /// The TLS handshake failed (or could not start).
    #[error("{0}")]
    Tls(String),
}

impl SessionError {
    fn diagnostic(&self, remote: &RemoteHost, stage: Stage) -> Diagnostic {
        let what = stage.describe();
        match self {
            SessionError::Timeout => Diagnostic::local(
                "4.4.2",
                format!("conversation with {remote} timed out while {what}"),
            ),
            SessionError::Closed => Diagnostic::local(
                "4.4.2",
                format!("lost connection with {remote} while {what}"),
            ),
            SessionError::Io(e) => Diagnostic::local(
                "4.4.2",
                format!("lost connection with {remote} while {what}: {e}"),
            ),
            SessionError::Protocol(e) => Diagnostic::local(
                "4.5.0",
                format!("protocol error from {remote} while {what}: {e}"),
            ),
            SessionError::Tls(e) => {
                Diagnostic::local("4.7.5", format!("TLS handshake with {remote} failed: {e}"))
            }
        }
    }
}

async fn within<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, SessionError>>,
) -> Result<T, SessionError> {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(SessionError::Timeout))
}

/// The connection under a session: plain TCP, or TLS over it.
#[derive(Debug)]
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only between taking the TCP stream for a handshake and putting back
    /// the TLS one; a failed handshake leaves it.
    Gone,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection closed")
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(gone())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// How the handshake ended when the server is not usable.
enum Refusal {
    /// The server refused (greeting, EHLO/HELO, AUTH).
    Reply(Reply),
    /// Our own reason, e.g. TLS required but not offered.
    Local(Diagnostic),
}

/// An open SMTP session past EHLO (and AUTH), ready for transactions.
#[derive(Debug)]
pub struct SmtpClient {
    stream: Stream,
    /// Protocol and cipher once TLS is up.
    tls: Option<TlsInfo>,
    rbuf: BytesMut,
    replies: ReplyReceiver,
    remote: RemoteHost,
    ext: Extensions,
    timeouts: Timeouts,
    stage: Stage,
    /// False after any transport or protocol error, or a 421.
    reusable: bool,
    /// The server may hold transaction state (an aborted transaction): RSET
    /// before the next MAIL.
    needs_rset: bool,
    transactions: u32,
    /// BDAT may be used when the server offers CHUNKING.
    chunking: bool,
    span: tracing::Span,
}

/// A failure to open one address, and whether it got as far as a session.
struct OpenError {
    error: ConnectError,
    session: bool,
    /// The TLS handshake failed (a `may` connection is tried again in
    /// clear).
    tls_failed: bool,
}

impl SmtpClient {
    /// Connects to the first exchanger address that greets and answers EHLO
    /// (or HELO after a 5xx to EHLO), in the given order, with STARTTLS
    /// when the server offers it and TLS is configured
    /// ([`ClientSettings::tls`], level `may` for every exchanger); see
    /// [`SmtpClient::connect_to`].
    ///
    /// # Errors
    ///
    /// The last address's failure, once the list or the
    /// `max_addresses`/`max_sessions` limits are exhausted.
    pub async fn connect(
        exchangers: &[Exchanger],
        settings: &ClientSettings,
    ) -> Result<SmtpClient, ConnectError> {
        let level = match settings.tls {
            Some(_) => TlsLevel::May,
            None => TlsLevel::None,
        };
        let targets: Vec<Target> = exchangers
            .iter()
            .map(|ex| Target {
                exchanger: ex.clone(),
                tls: TlsRequirement::new(level, "default"),
            })
            .collect();
        Self::connect_to(&targets, settings).await
    }

    /// Connects to the first target address that greets, answers EHLO (or
    /// HELO after a 5xx to EHLO) and meets the target's TLS requirement, in
    /// the given order: a refused or timed out connect, a 4xx/5xx greeting,
    /// a rejected EHLO and HELO, TLS missing where it is required, a failed
    /// AUTH or a dropped connection move on to the next address. A failed
    /// TLS handshake at level `may` is retried once in clear on the same
    /// address, as Postfix does. Credentials go out only over TLS unless
    /// the [`SmarthostAuth`] allows plaintext.
    ///
    /// # Errors
    ///
    /// The last address's failure, once the list or the
    /// `max_addresses`/`max_sessions` limits are exhausted. TLS failures are
    /// never permanent.
    pub async fn connect_to(
        targets: &[Target],
        settings: &ClientSettings,
    ) -> Result<SmtpClient, ConnectError> {
        let mut last = None;
        let mut sessions = 0;
        // Collected first: an iterator of closures held across the awaits
        // below would keep this future from being `Send` (rustc cannot prove
        // the closures general over lifetimes), and attempts run on worker
        // arbiters.
        let addresses: Vec<(&str, SocketAddr, &TlsRequirement)> = targets
            .iter()
            .flat_map(|t| {
                t.exchanger
                    .addrs
                    .iter()
                    .map(|a| (t.exchanger.host.as_str(), *a, &t.tls))
            })
            .collect();
        let addresses = addresses.into_iter();
        for (tried, (host, addr, req)) in addresses.enumerate() {
            if tried >= settings.max_addresses || sessions >= settings.max_sessions {
                break;
            }
            let remote = RemoteHost {
                host: host.to_string(),
                addr,
            };
            let span = tracing::debug_span!("smtp_client", server = %escape(&remote.to_string()));
            let mut result = Self::open(remote.clone(), settings, req, span.clone())
                .instrument(span.clone())
                .await;
            if let Err(e) = &result {
                if e.tls_failed && req.level == TlsLevel::May && !req.requires_tls() {
                    // Postfix's `may`: a broken TLS stack is no reason to
                    // keep mail back; the same server again, in clear.
                    info!(server = %escape(&remote.to_string()), error = %escape(&e.error.to_string()), "TLS handshake failed; trying again without TLS");
                    result = Self::open(remote, settings, &TlsRequirement::none(), span.clone())
                        .instrument(span)
                        .await;
                }
            }
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    debug!(error = %escape(&e.error.to_string()), "server unusable, trying the next one");
                    sessions += usize::from(e.session);
                    last = Some(e.error);
                }
            }
        }
        Err(last.unwrap_or_else(|| ConnectError {
            remote: None,
            permanent: false,
            diagnostic: Diagnostic::local("4.4.4", "no mail exchanger address to try"),
        }))
    }

    async fn open(
        remote: RemoteHost,
        settings: &ClientSettings,
        req: &TlsRequirement,
        span: tracing::Span,
    ) -> Result<SmtpClient, OpenError> {
        let t = settings.timeouts;
        let stream = match tokio::time::timeout(t.connect, TcpStream::connect(remote.addr)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                let text = format!("connect to {remote}: {e}");
                return Err(OpenError::local(remote, "4.4.1", text, false));
            }
            Err(_) => {
                let text = format!("connect to {remote}: connection timed out");
                return Err(OpenError::local(remote, "4.4.1", text, false));
            }
        };
        // Commands are written whole; Nagle would only delay them.
        let _ = stream.set_nodelay(true);
        let mut conn = SmtpClient {
            stream: Stream::Plain(stream),
            tls: None,
            rbuf: BytesMut::with_capacity(4096),
            replies: ReplyReceiver::new(),
            remote,
            ext: Extensions::default(),
            timeouts: t,
            stage: Stage::Greeting,
            reusable: true,
            needs_rset: false,
            transactions: 0,
            chunking: settings.chunking,
            span,
        };
        match conn.handshake(settings, req).await {
            Ok(Ok(())) => {
                match &conn.tls {
                    Some(tls) => info!(
                        server = %escape(&conn.remote.to_string()),
                        tls = %tls,
                        level = %req.level,
                        "TLS connection established"
                    ),
                    None => debug!(level = %req.level, "connection without TLS"),
                }
                Ok(conn)
            }
            Ok(Err(refusal)) => {
                // The server answered but refused, or does not meet the TLS
                // requirement: say goodbye politely (RFC 5321 §3.1), then let
                // the caller try the next one.
                let (permanent, diagnostic) = match refusal {
                    Refusal::Reply(reply) => (reply.code >= 500, Diagnostic::Remote(reply)),
                    Refusal::Local(diag) => (false, diag),
                };
                let remote = conn.remote.clone();
                conn.quit().await;
                Err(OpenError {
                    error: ConnectError {
                        remote: Some(remote),
                        permanent,
                        diagnostic,
                    },
                    session: true,
                    tls_failed: false,
                })
            }
            Err(e) => {
                let tls_failed =
                    matches!(e, SessionError::Tls(_)) || matches!(conn.stage, Stage::TlsHandshake);
                let mut diagnostic = e.diagnostic(&conn.remote, conn.stage);
                if tls_failed && req.requires_tls() {
                    if let Diagnostic::Local { text, .. } = &mut diagnostic {
                        *text = format!("TLS is required ({} {}): {text}", req.source, req.level);
                    }
                }
                Err(OpenError {
                    error: ConnectError {
                        remote: Some(conn.remote),
                        permanent: false,
                        diagnostic,
                    },
                    session: true,
                    tls_failed,
                })
            }
        }
    }

    /// Greeting, EHLO (HELO on 5xx), STARTTLS and EHLO again, AUTH.
    /// `Ok(Err(_))` is a refusal.
    async fn handshake(
        &mut self,
        settings: &ClientSettings,
        req: &TlsRequirement,
    ) -> Result<Result<(), Refusal>, SessionError> {
        let command = self.timeouts.command;
        if req.implicit {
            self.start_tls(settings, req).await?;
        }
        self.stage = Stage::Greeting;
        let greeting = self.read_reply(command).await?;
        if greeting.code / 100 != 2 {
            return Ok(Err(Refusal::Reply(greeting)));
        }
        if let Err(refusal) = self.hello(settings).await? {
            return Ok(Err(refusal));
        }
        if self.tls.is_none() && req.attempts_tls() && settings.tls.is_some() {
            if self.ext.starttls {
                // RFC 3207 §4: STARTTLS, 220, the handshake, then EHLO again;
                // what the server said before counts no more.
                self.stage = Stage::StartTls;
                let reply = self.command("STARTTLS\r\n", command).await?;
                if reply.code == 220 {
                    if !self.rbuf.is_empty() {
                        // Anything after the 220 came in clear, maybe
                        // injected by a man in the middle (CVE-2011-0411).
                        return Err(SessionError::Tls(
                            "data after the STARTTLS reply, before the handshake".into(),
                        ));
                    }
                    self.start_tls(settings, req).await?;
                    if let Err(refusal) = self.hello(settings).await? {
                        return Ok(Err(refusal));
                    }
                } else if req.requires_tls() {
                    return Ok(Err(Refusal::Local(
                        self.tls_missing(req, &format!("refused STARTTLS: {reply}")),
                    )));
                }
            } else if req.requires_tls() {
                return Ok(Err(Refusal::Local(
                    self.tls_missing(req, "did not offer STARTTLS"),
                )));
            }
        }
        if self.tls.is_none() && req.requires_tls() {
            // STARTTLS unavailable on our side (no TLS configured).
            return Ok(Err(Refusal::Local(self.tls_missing(
                req,
                "cannot be reached with TLS: outbound TLS is not set up",
            ))));
        }
        if let Some(auth) = &settings.auth {
            self.stage = Stage::Auth;
            if self.tls.is_none() && !auth.allow_plaintext {
                return Ok(Err(Refusal::Local(Diagnostic::local(
                    "4.7.0",
                    format!(
                        "credentials are configured but the connection to {} is not \
                         encrypted; AUTH is not sent in clear \
                         (routing.smarthost_auth.allow_plaintext)",
                        self.remote
                    ),
                ))));
            }
            if !self.ext.auth_plain {
                return Ok(Err(Refusal::Reply(Reply::new(
                    454,
                    "4.7.0",
                    format!(
                        "{} does not offer AUTH PLAIN; credentials are configured",
                        self.remote
                    ),
                ))));
            }
            let mut token = Vec::with_capacity(auth.username.len() + auth.password.len() + 2);
            token.push(0);
            token.extend_from_slice(auth.username.as_bytes());
            token.push(0);
            token.extend_from_slice(auth.password.as_bytes());
            let token = base64::engine::general_purpose::STANDARD.encode(token);
            let reply = self
                .command(&format!("AUTH PLAIN {token}\r\n"), command)
                .await?;
            if reply.code != 235 {
                // Postfix's `smtp_sasl_auth_soft_bounce`: a rejected login
                // is a configuration problem, so defer rather than bounce.
                let mut reply = reply;
                if reply.code >= 500 {
                    reply.code = 454;
                    reply.status = Some(Cow::Borrowed("4.7.0"));
                    reply.text = Cow::Owned(format!("authentication failed: {}", reply.text));
                }
                return Ok(Err(Refusal::Reply(reply)));
            }
        }
        debug!(extensions = ?self.ext, "session ready");
        Ok(Ok(()))
    }

    /// EHLO, or HELO after a 5xx to EHLO; sets the extensions.
    async fn hello(
        &mut self,
        settings: &ClientSettings,
    ) -> Result<Result<(), Refusal>, SessionError> {
        let command = self.timeouts.command;
        self.stage = Stage::Ehlo;
        self.ext = Extensions::default();
        let ehlo = self
            .command(&format!("EHLO {}\r\n", settings.helo_name), command)
            .await?;
        if ehlo.code / 100 == 2 {
            self.ext = Extensions::parse(&ehlo);
        } else if ehlo.code >= 500 {
            // An old server: plain SMTP, no extensions (RFC 5321 §3.2).
            self.stage = Stage::Helo;
            let helo = self
                .command(&format!("HELO {}\r\n", settings.helo_name), command)
                .await?;
            if helo.code / 100 != 2 {
                return Ok(Err(Refusal::Reply(helo)));
            }
        } else {
            return Ok(Err(Refusal::Reply(ehlo)));
        }
        Ok(Ok(()))
    }

    /// Why a connection that must be encrypted cannot be: deferred, the
    /// next exchanger tried.
    fn tls_missing(&self, req: &TlsRequirement, what: &str) -> Diagnostic {
        Diagnostic::local(
            "4.7.4",
            format!(
                "TLS is required ({} {}) but {} {what}",
                req.source, req.level, self.remote
            ),
        )
    }

    /// The TLS handshake on the TCP stream, under the command timeout.
    async fn start_tls(
        &mut self,
        settings: &ClientSettings,
        req: &TlsRequirement,
    ) -> Result<(), SessionError> {
        self.stage = Stage::TlsHandshake;
        let tls = settings
            .tls
            .as_ref()
            .ok_or_else(|| SessionError::Tls("outbound TLS is not set up".into()))?;
        let config = tls
            .client_config(req, &self.remote.host)
            .map_err(SessionError::Tls)?;
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(SessionError::Tls("TLS is already active".into()));
        };
        let name = server_name(&self.remote.host, self.remote.addr.ip());
        let connector = TlsConnector::from(config);
        let stream = tokio::time::timeout(self.timeouts.command, connector.connect(name, tcp))
            .await
            .map_err(|_| SessionError::Timeout)?
            .map_err(|e| SessionError::Tls(e.to_string()))?;
        self.tls = Some(TlsInfo::of(stream.get_ref().1, req.verifies()));
        self.stream = Stream::Tls(Box::new(stream));
        // RFC 3207 §4.2: forget what the server said before.
        self.rbuf.clear();
        self.replies = ReplyReceiver::new();
        Ok(())
    }

    /// Protocol and cipher when the connection is encrypted.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// Runs one mail transaction and returns one outcome per recipient, in
    /// the order of `tx.recipients`.
    ///
    /// With PIPELINING, MAIL, every RCPT and DATA go out in one write and the
    /// replies are read in order (RFC 2920). MAIL carries `SIZE=n` when the
    /// server announced SIZE, `BODY=8BITMIME` when it announced 8BITMIME and
    /// the content has 8-bit octets, and `SMTPUTF8` when an address needs
    /// it. A 5xx to MAIL or DATA fails every recipient, a 4xx defers them; a
    /// lost connection or a timeout defers every recipient not yet confirmed.
    pub async fn send(&mut self, tx: &Transaction<'_>) -> Vec<RcptOutcome> {
        let span = self.span.clone();
        self.send_inner(tx).instrument(span).await
    }

    async fn send_inner(&mut self, tx: &Transaction<'_>) -> Vec<RcptOutcome> {
        let n = tx.recipients.len();
        let mut outcomes: Vec<Option<RcptOutcome>> = vec![None; n];
        if !self.reusable {
            let diag = Diagnostic::local(
                "4.4.2",
                format!("connection with {} is no longer usable", self.remote),
            );
            return vec![RcptOutcome::Deferred(diag); n];
        }
        if let Some(failure) = self.precheck(tx, &mut outcomes) {
            return vec![failure; n];
        }
        let valid: Vec<usize> = (0..n).filter(|&i| outcomes[i].is_none()).collect();
        if !valid.is_empty() {
            if let Err(e) = self.transaction(tx, &valid, &mut outcomes).await {
                self.reusable = false;
                let diag = e.diagnostic(&self.remote, self.stage);
                debug!(error = %escape(&diag.to_string()), "transaction aborted");
                for o in outcomes.iter_mut().filter(|o| o.is_none()) {
                    *o = Some(RcptOutcome::Deferred(diag.clone()));
                }
            }
        }
        self.transactions += 1;
        outcomes
            .into_iter()
            .map(|o| {
                // Every path above fills each slot; a gap would be a bug, and
                // deferring is the answer that loses no mail.
                o.unwrap_or_else(|| {
                    RcptOutcome::Deferred(Diagnostic::local("4.3.0", "internal: no outcome"))
                })
            })
            .collect()
    }

    /// Checks that need no round trip. Returns an outcome for every recipient
    /// when the whole message cannot go; marks single bad addresses.
    fn precheck(
        &self,
        tx: &Transaction<'_>,
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Option<RcptOutcome> {
        if let Some(limit) = self.ext.size_limit {
            if tx.content.len() as u64 > limit {
                return Some(RcptOutcome::Failed(Diagnostic::local(
                    "5.3.4",
                    format!(
                        "message size {} exceeds size limit {limit} of server {}",
                        tx.content.len(),
                        self.remote
                    ),
                )));
            }
        }
        if !valid_path(tx.sender.unwrap_or("")) {
            return Some(RcptOutcome::Failed(Diagnostic::local(
                "5.1.7",
                "invalid sender address",
            )));
        }
        if needs_smtputf8(tx) && !self.ext.smtputf8 {
            return Some(RcptOutcome::Failed(Diagnostic::local(
                "5.6.7",
                format!(
                    "SMTPUTF8 is required, but was not offered by host {}",
                    self.remote
                ),
            )));
        }
        for (slot, rcpt) in outcomes.iter_mut().zip(tx.recipients) {
            if rcpt.is_empty() || !valid_path(rcpt) {
                *slot = Some(RcptOutcome::Failed(Diagnostic::local(
                    "5.1.3",
                    format!("invalid recipient address {rcpt:?}"),
                )));
            }
        }
        None
    }

    fn mail_command(&self, tx: &Transaction<'_>) -> String {
        let mut cmd = format!("MAIL FROM:<{}>", tx.sender.unwrap_or(""));
        if self.ext.size {
            cmd.push_str(&format!(" SIZE={}", tx.content.len()));
        }
        // Without 8BITMIME from the server the content still goes as is, as
        // Postfix does by default: downgrading to 7 bit is left undone.
        if self.ext.eight_bit_mime && tx.content.iter().any(|b| *b >= 0x80) {
            cmd.push_str(" BODY=8BITMIME");
        }
        if needs_smtputf8(tx) {
            cmd.push_str(" SMTPUTF8");
        }
        if let (true, Some(p)) = (self.ext.dsn, tx.params) {
            match p.ret {
                Some(Ret::Full) => cmd.push_str(" RET=FULL"),
                Some(Ret::Hdrs) => cmd.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &p.envid {
                cmd.push_str(" ENVID=");
                cmd.push_str(&xtext_encode(envid));
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    /// `RCPT TO`, with the recipient's `NOTIFY` and `ORCPT` when the
    /// server offers DSN (RFC 3461 §5.2: passed on as received).
    fn rcpt_command(&self, tx: &Transaction<'_>, rcpt: &str) -> String {
        let mut cmd = format!("RCPT TO:<{rcpt}>");
        let given = tx.params.and_then(|p| p.recipient(rcpt));
        if let (true, Some(r)) = (self.ext.dsn, given) {
            if let Some(notify) = r.notify {
                cmd.push_str(" NOTIFY=");
                cmd.push_str(&notify.to_param());
            }
            if let Some(orcpt) = &r.orcpt {
                cmd.push_str(" ORCPT=");
                cmd.push_str(&orcpt.to_param());
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    async fn transaction(
        &mut self,
        tx: &Transaction<'_>,
        valid: &[usize],
        outcomes: &mut [Option<RcptOutcome>],
    ) -> Result<(), SessionError> {
        let t = self.timeouts;
        if self.needs_rset {
            self.stage = Stage::Rset;
            let reply = self.command("RSET\r\n", t.command).await?;
            if reply.code / 100 != 2 {
                self.reusable = false;
                for &i in valid {
                    outcomes[i] = Some(RcptOutcome::Deferred(Diagnostic::Remote(reply.clone())));
                }
                return Ok(());
            }
        }
        // Until the final dot's reply, the server may hold transaction state.
        self.needs_rset = true;
        // RFC 3030: the content goes as one `BDAT n LAST` chunk, no
        // dot-stuffing, no 354 round trip; its reply is the final one.
        let bdat = self.chunking && self.ext.chunking;
        let mail = self.mail_command(tx);
        let rcpts: Vec<String> = valid
            .iter()
            .map(|&i| self.rcpt_command(tx, &tx.recipients[i]))
            .collect();

        let mut accepted = Vec::with_capacity(valid.len());
        // The reply to DATA; `None` when sending with BDAT.
        let data_reply;
        if self.ext.pipelining {
            // One write for the whole envelope. Even a thousand recipients
            // are far less than a socket buffer, so writing everything before
            // reading cannot deadlock against a server that answers as it
            // reads.
            let mut batch = mail.into_bytes();
            for r in &rcpts {
                batch.extend_from_slice(r.as_bytes());
            }
            if !bdat {
                batch.extend_from_slice(b"DATA\r\n");
            }
            self.stage = Stage::Mail;
            self.write(&batch, t.command).await?;
            let mail_reply = self.read_reply(t.command).await?;
            if mail_reply.code == 421 {
                self.settle_pending(valid, &mail_reply, outcomes);
                return Ok(());
            }
            let mail_ok = mail_reply.code / 100 == 2;
            self.stage = Stage::Rcpt;
            for &i in valid {
                let reply = self.read_reply(t.command).await?;
                if !mail_ok {
                    // A 503 after a refused MAIL says nothing new.
                    continue;
                }
                if reply.code == 421 {
                    self.settle_pending(valid, &reply, outcomes);
                    return Ok(());
                }
                if reply.code / 100 == 2 {
                    accepted.push(i);
                } else {
                    outcomes[i] = Some(RcptOutcome::from_reply(&reply));
                }
            }
            if bdat {
                // Nothing was sent past the envelope: nothing to abandon.
                if !mail_ok {
                    self.settle_pending(valid, &mail_reply, outcomes);
                    return Ok(());
                }
                if accepted.is_empty() {
                    return Ok(());
                }
                data_reply = None;
            } else {
                self.stage = Stage::Data;
                let data = self.read_reply(t.data_init).await?;
                if !mail_ok {
                    self.settle_pending(valid, &mail_reply, outcomes);
                    return self.abandon_data(&data).await;
                }
                if accepted.is_empty() {
                    return self.abandon_data(&data).await;
                }
                data_reply = Some(data);
            }
        } else {
            self.stage = Stage::Mail;
            let mail_reply = self.command(&mail, t.command).await?;
            if mail_reply.code / 100 != 2 {
                self.settle_pending(valid, &mail_reply, outcomes);
                return Ok(());
            }
            self.stage = Stage::Rcpt;
            for (&i, cmd) in valid.iter().zip(&rcpts) {
                let reply = self.command(cmd, t.command).await?;
                if reply.code == 421 {
                    // The server is closing: nobody else gets through.
                    self.settle_pending(valid, &reply, outcomes);
                    return Ok(());
                }
                if reply.code / 100 == 2 {
                    accepted.push(i);
                } else {
                    outcomes[i] = Some(RcptOutcome::from_reply(&reply));
                }
            }
            if accepted.is_empty() {
                return Ok(());
            }
            data_reply = if bdat {
                None
            } else {
                self.stage = Stage::Data;
                Some(self.command("DATA\r\n", t.data_init).await?)
            };
        }

        let body = match data_reply {
            Some(reply) if reply.code != 354 => {
                self.settle_pending(&accepted, &reply, outcomes);
                return Ok(());
            }
            Some(_) => encode_content(tx.content),
            None => {
                let chunk = encode_chunk(tx.content);
                let mut wire = format!("BDAT {} LAST\r\n", chunk.len()).into_bytes();
                wire.extend_from_slice(&chunk);
                wire
            }
        };
        self.stage = Stage::Content;
        for chunk in body.chunks(WRITE_CHUNK) {
            self.write(chunk, t.data_xfer).await?;
        }
        self.stage = Stage::Dot;
        let done = self.read_reply(t.data_done).await?;
        debug!(code = done.code, bdat, "message sent");
        self.note_421(&done);
        // The final dot ends the transaction whatever its reply; a refused
        // BDAT chunk leaves it failed but open (RFC 3030 §2): RSET first.
        self.needs_rset = bdat && done.code / 100 != 2;
        if done.code / 100 == 2 {
            for &i in &accepted {
                outcomes[i] = Some(RcptOutcome::Delivered(done.clone()));
            }
        } else {
            self.settle_pending(&accepted, &done, outcomes);
        }
        Ok(())
    }

    /// Gives every recipient in `which` still without an outcome the one a
    /// negative `reply` means.
    fn settle_pending(
        &mut self,
        which: &[usize],
        reply: &Reply,
        outcomes: &mut [Option<RcptOutcome>],
    ) {
        self.note_421(reply);
        for &i in which {
            if outcomes[i].is_none() {
                outcomes[i] = Some(RcptOutcome::from_reply(reply));
            }
        }
    }

    /// After pipelining, a server that still said 354 to DATA with no valid
    /// recipient gets an empty message end (RFC 2920 §3.1); its reply is of
    /// no interest.
    async fn abandon_data(&mut self, data: &Reply) -> Result<(), SessionError> {
        self.note_421(data);
        if data.code == 354 {
            self.stage = Stage::Dot;
            self.write(b".\r\n", self.timeouts.data_xfer).await?;
            let reply = self.read_reply(self.timeouts.data_done).await?;
            self.note_421(&reply);
        }
        Ok(())
    }

    fn note_421(&mut self, reply: &Reply) {
        if reply.code == 421 {
            // RFC 5321 §3.8: the server is closing the channel.
            self.reusable = false;
        }
    }

    /// Sends RSET and reads its reply: cheap proof that an idle pooled
    /// connection still works before giving it a new transaction. Returns
    /// false (and marks the connection unusable) if it does not.
    pub async fn reset(&mut self) -> bool {
        if !self.reusable {
            return false;
        }
        let span = self.span.clone();
        let command = self.timeouts.command;
        self.stage = Stage::Rset;
        let ok = matches!(
            self.command("RSET\r\n", command).instrument(span).await,
            Ok(reply) if reply.code / 100 == 2
        );
        if ok {
            self.needs_rset = false;
        } else {
            self.reusable = false;
        }
        ok
    }

    /// True while the connection can carry another transaction: no transport
    /// or protocol error and no 421 so far.
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    /// Transactions run on this connection so far.
    pub fn transactions(&self) -> u32 {
        self.transactions
    }

    /// The server this connection talks to.
    pub fn remote(&self) -> &RemoteHost {
        &self.remote
    }

    pub fn extensions(&self) -> &Extensions {
        &self.ext
    }

    /// Says QUIT, waits (bounded) for the reply and closes. Errors are
    /// ignored: every transaction's outcome is already known.
    pub async fn quit(mut self) {
        if self.reusable {
            let span = self.span.clone();
            self.stage = Stage::Quit;
            let command = self.timeouts.command;
            let _ = self.command("QUIT\r\n", command).instrument(span).await;
        }
        let _ = self.stream.shutdown().await;
    }

    async fn command(
        &mut self,
        line: &str,
        reply_timeout: Duration,
    ) -> Result<Reply, SessionError> {
        self.write(line.as_bytes(), self.timeouts.command).await?;
        self.read_reply(reply_timeout).await
    }

    async fn write(&mut self, bytes: &[u8], limit: Duration) -> Result<(), SessionError> {
        let stream = &mut self.stream;
        within(limit, async move { Ok(stream.write_all(bytes).await?) }).await
    }

    async fn read_reply(&mut self, limit: Duration) -> Result<Reply, SessionError> {
        let stream = &mut self.stream;
        let rbuf = &mut self.rbuf;
        let replies = &mut self.replies;
        let reply = within(limit, async move {
            loop {
                if let Some(reply) = replies.next_reply(rbuf)? {
                    return Ok(reply);
                }
                if stream.read_buf(rbuf).await? == 0 {
                    return Err(SessionError::Closed);
                }
            }
        })
        .await?;
        debug!(code = reply.code, stage = ?self.stage, "reply");
        Ok(reply)
    }
}

impl OpenError {
    fn local(remote: RemoteHost, status: &'static str, text: String, session: bool) -> OpenError {
        OpenError {
            error: ConnectError {
                remote: Some(remote),
                permanent: false,
                diagnostic: Diagnostic::local(status, text),
            },
            session,
            tls_failed: false,
        }
    }
}

/// A path that is safe to put between `<>` on a command line: no control
/// characters (no command injection), no brackets, at most 256 octets (RFC
/// 5321 §4.5.3.1.3).
fn valid_path(path: &str) -> bool {
    path.len() <= 256
        && !path
            .bytes()
            .any(|b| b < 0x20 || b == 0x7f || b == b'<' || b == b'>')
}

/// The result of one delivery attempt with [`deliver`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionOutcome {
    /// The server that was talked to last (`None` if no address was tried).
    pub remote: Option<RemoteHost>,
    /// One outcome per recipient, in order.
    pub outcomes: Vec<RcptOutcome>,
}

/// One attempt without connection reuse: connect, one transaction, QUIT.
pub async fn deliver(
    exchangers: &[Exchanger],
    settings: &ClientSettings,
    tx: &Transaction<'_>,
) -> SessionOutcome {
    match SmtpClient::connect(exchangers, settings).await {
        Err(e) => SessionOutcome {
            outcomes: vec![e.outcome(); tx.recipients.len()],
            remote: e.remote,
        },
        Ok(mut conn) => {
            let outcomes = conn.send(tx).await;
            let remote = Some(conn.remote().clone());
            conn.quit().await;
            SessionOutcome { remote, outcomes }
        }
    }
}

/// Whether the message must go with `SMTPUTF8` (RFC 6531 §3.4): UTF-8 in
/// an envelope address, or a message received with `SMTPUTF8` whose header
/// section has UTF-8. A message received with `SMTPUTF8` that has neither
/// goes without it (§3.4: a client SHOULD NOT ask for it when the message
/// does not need it); one that needs it is never sent to a server without
/// SMTPUTF8 (bounced `5.6.7`, not downgraded: RFC 6530 leaves downgrading
/// to the originator's side).
fn needs_smtputf8(tx: &Transaction<'_>) -> bool {
    let address =
        !tx.sender.unwrap_or("").is_ascii() || tx.recipients.iter().any(|r| !r.is_ascii());
    let declared = tx.params.is_some_and(|p| p.smtputf8);
    address || (declared && !postino_core::dsn::headers_of(tx.content).is_ascii())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(code: u16, status: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            status: status.map(|s| Cow::Owned(s.to_string())),
            text: Cow::Owned(text.to_string()),
        }
    }

    #[test]
    fn diagnostics() {
        let remote = Diagnostic::Remote(r(550, Some("5.1.1"), "unknown"));
        assert_eq!(remote.status(), "5.1.1");
        assert_eq!(remote.to_string(), "550 5.1.1 unknown");
        assert_eq!(Diagnostic::Remote(r(451, None, "later")).status(), "4.0.0");
        assert_eq!(
            Diagnostic::local("4.4.1", "refused").to_string(),
            "4.4.1 refused"
        );
    }

    #[test]
    fn paths() {
        assert!(valid_path(""));
        assert!(valid_path("a@b.example"));
        assert!(!valid_path("a@b\r\nRSET"));
        assert!(!valid_path("a>@b"));
        assert!(!valid_path(&"a".repeat(257)));
    }
}
