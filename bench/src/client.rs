//! The client side of one connection: a TCP (or STARTTLS) stream with a read
//! buffer, and reads of whole SMTP replies and POP3 responses under a timeout.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::TlsConnector;

use super::proto::{self, Pop3Status, ProtoError, ReplyReceiver, SmtpReply};

/// Why a connection failed. [`ClientError::kind`] names it in reports.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(io::Error),
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    #[error("connection closed by the server")]
    Closed,
    #[error("io: {0}")]
    Io(#[from] io::Error),
    #[error("protocol: {0}")]
    Proto(#[from] ProtoError),
    #[error("tls: {0}")]
    Tls(io::Error),
}

impl ClientError {
    /// Short name for the errors table of a report.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientError::Connect(_) => "connect",
            ClientError::Timeout(_) => "timeout",
            ClientError::Closed => "closed",
            ClientError::Io(_) => "io",
            ClientError::Proto(_) => "protocol",
            ClientError::Tls(_) => "tls",
        }
    }
}

/// A plain or TLS stream. An enum rather than a boxed trait object keeps the
/// plain path free of dynamic dispatch, and STARTTLS can take the TCP stream out.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while STARTTLS swaps one for the other.
    Gone,
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
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
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Gone => Poll::Ready(Err(io::ErrorKind::NotConnected.into())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Gone => Poll::Ready(Ok(())),
        }
    }
}

/// One client connection to the server under test.
pub struct Client {
    stream: Stream,
    rbuf: BytesMut,
    /// Lines of a reply not yet whole.
    replies: ReplyReceiver,
    timeout: Duration,
}

impl Client {
    /// Connects to `addr`; every later read, write and the connect itself is
    /// bounded by `timeout`.
    pub async fn connect(addr: SocketAddr, timeout: Duration) -> Result<Self, ClientError> {
        let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout("connect"))?
            .map_err(ClientError::Connect)?;
        // Commands are small and latency is what is measured: do not let
        // Nagle hold back a pipelined batch's last segment.
        stream.set_nodelay(true).map_err(ClientError::Connect)?;
        Ok(Self {
            stream: Stream::Plain(stream),
            rbuf: BytesMut::with_capacity(8192),
            replies: proto::reply_receiver(),
            timeout,
        })
    }

    /// Writes all of `data` and flushes it.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ClientError> {
        let stream = &mut self.stream;
        tokio::time::timeout(self.timeout, async move {
            stream.write_all(data).await?;
            stream.flush().await
        })
        .await
        .map_err(|_| ClientError::Timeout("write"))??;
        Ok(())
    }

    /// Reads more input into the buffer.
    async fn fill(&mut self, waiting_for: &'static str) -> Result<(), ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(16 * 1024);
        }
        let n = tokio::time::timeout(self.timeout, self.stream.read_buf(&mut self.rbuf))
            .await
            .map_err(|_| ClientError::Timeout(waiting_for))??;
        if n == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Reads one complete SMTP reply.
    pub async fn smtp_reply(&mut self) -> Result<SmtpReply, ClientError> {
        loop {
            if let Some(reply) = self
                .replies
                .next_reply(&mut self.rbuf)
                .map_err(ProtoError::from)?
            {
                return Ok(reply);
            }
            self.fill("SMTP reply").await?;
        }
    }

    /// Reads one POP3 status line.
    pub async fn pop3_status(&mut self) -> Result<Pop3Status, ClientError> {
        loop {
            if let Some((status, used)) = proto::parse_status(&self.rbuf)? {
                self.rbuf.advance(used);
                return Ok(status);
            }
            self.fill("POP3 status").await?;
        }
    }

    /// Reads a POP3 response that is multi-line when positive (RETR, LIST).
    /// Returns the status and, for `+OK`, the octets of the whole response.
    pub async fn pop3_multiline(&mut self) -> Result<(Pop3Status, usize), ClientError> {
        let status = loop {
            if let Some((status, used)) = proto::parse_status(&self.rbuf)? {
                if !status.ok {
                    self.rbuf.advance(used);
                    return Ok((status, used));
                }
                break status;
            }
            self.fill("POP3 status").await?;
        };
        let mut searched = 0;
        loop {
            if let Some(end) = proto::multiline_end(&self.rbuf, &mut searched) {
                self.rbuf.advance(end);
                return Ok((status, end));
            }
            self.fill("POP3 multi-line response").await?;
        }
    }

    /// Runs the TLS handshake on this connection (after `220` to STARTTLS).
    pub async fn start_tls(
        &mut self,
        connector: &TlsConnector,
        name: ServerName<'static>,
    ) -> Result<(), ClientError> {
        // Anything the server sent before the handshake must not be read as if
        // it came over TLS (the mirror image of CVE-2011-0411).
        self.rbuf.clear();
        self.replies = proto::reply_receiver();
        let Stream::Plain(tcp) = std::mem::replace(&mut self.stream, Stream::Gone) else {
            return Err(ClientError::Tls(io::Error::other("TLS already active")));
        };
        let tls = tokio::time::timeout(self.timeout, connector.connect(name, tcp))
            .await
            .map_err(|_| ClientError::Timeout("TLS handshake"))?
            .map_err(ClientError::Tls)?;
        self.stream = Stream::Tls(Box::new(tls));
        Ok(())
    }

    /// Sends `QUIT`-like `command`, waits briefly for its reply and closes.
    /// Errors are ignored: the measured work is done.
    pub async fn close(mut self, command: &[u8]) {
        self.timeout = self.timeout.min(Duration::from_secs(5));
        if self.send(command).await.is_ok() {
            let _ = self.fill("QUIT reply").await;
        }
        let _ = tokio::time::timeout(self.timeout, self.stream.shutdown()).await;
    }
}
