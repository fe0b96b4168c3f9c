//! The socket under a connection actor: plain TCP or TLS, a read buffer, a
//! write buffer, and reads that end on timeout or on server shutdown.
//!
//! A connection actor owns one [`Io`] and lends it to one future at a time
//! (a read, a flush, a TLS handshake), so the protocol state machine never
//! sees a half-done read.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// Initial read buffer: a 1 KiB message and its commands fit in one read;
/// it grows for larger ones. Small, since 10,000 sessions may be open.
const READ_BUFFER: usize = 4 * 1024;

/// Longest wait for the last reply and the shutdown of a closing connection.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// Plain or TLS stream.
pub enum Stream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP (implicit TLS, or after STARTTLS/STLS).
    Tls(Box<TlsStream<TcpStream>>),
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
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Why a read ended without data.
#[derive(Debug)]
pub enum ReadOutcome {
    /// Bytes were appended to the read buffer.
    Data,
    /// The client closed the connection.
    Closed,
    /// Nothing arrived within the timeout.
    TimedOut,
    /// The server is stopping.
    Shutdown,
    /// The read failed.
    Error(io::Error),
}

/// A connection's socket and buffers.
pub struct Io {
    /// The socket.
    pub stream: Stream,
    /// What was read and not yet taken by the session.
    pub rbuf: BytesMut,
    /// Replies waiting to be written.
    pub wbuf: Vec<u8>,
    shutdown: watch::Receiver<bool>,
}

impl Io {
    /// Buffers for `stream`; reads end early once `shutdown` turns true.
    pub fn new(stream: Stream, shutdown: watch::Receiver<bool>) -> Io {
        Io {
            stream,
            rbuf: BytesMut::with_capacity(READ_BUFFER),
            wbuf: Vec::with_capacity(1024),
            shutdown,
        }
    }

    /// Writes out everything buffered.
    pub async fn flush(&mut self) -> io::Result<()> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&self.wbuf).await?;
            self.wbuf.clear();
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Flushes pending replies, then reads more input. `timeout` bounds
    /// both together: a client that does not read its replies runs out of
    /// time as one that does not send. Callers pass what is left of the
    /// deadline of the command line being read (Postfix's
    /// `smtpd_per_record_deadline`), not a fresh idle timeout per read, so a
    /// client that drips one byte at a time cannot hold a session open.
    pub async fn flush_and_read(&mut self, timeout: Duration) -> ReadOutcome {
        if *self.shutdown.borrow() {
            return ReadOutcome::Shutdown;
        }
        let mut shutdown = self.shutdown.clone();
        tokio::select! {
            r = tokio::time::timeout(timeout, self.flush_then_read()) => match r {
                Ok(Ok(0)) => ReadOutcome::Closed,
                Ok(Ok(_)) => ReadOutcome::Data,
                Ok(Err(e)) => ReadOutcome::Error(e),
                Err(_) => ReadOutcome::TimedOut,
            },
            _ = shutdown.wait_for(|stop| *stop) => ReadOutcome::Shutdown,
        }
    }

    async fn flush_then_read(&mut self) -> io::Result<usize> {
        self.flush().await?;
        if self.rbuf.capacity() - self.rbuf.len() < 1024 {
            self.rbuf.reserve(READ_BUFFER);
        }
        self.stream.read_buf(&mut self.rbuf).await
    }

    /// Flushes and closes the write side; gives up after `CLOSE_TIMEOUT` (10 s)
    /// (a client that reads nothing must not hold the connection).
    pub async fn close(&mut self) {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
            let _ = self.flush().await;
            let _ = self.stream.shutdown().await;
        })
        .await;
    }

    /// Upgrades a plain stream to TLS. Input buffered before the handshake is
    /// discarded (the STARTTLS command injection of CVE-2011-0411): only what
    /// arrives encrypted counts.
    pub async fn start_tls(mut self, acceptor: TlsAcceptor, timeout: Duration) -> io::Result<Io> {
        self.flush().await?;
        self.rbuf.clear();
        let Stream::Plain(tcp) = self.stream else {
            return Err(io::Error::other("TLS already active"));
        };
        let tls = tokio::time::timeout(timeout, acceptor.accept(tcp))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(Io {
            stream: Stream::Tls(Box::new(tls)),
            rbuf: self.rbuf,
            wbuf: self.wbuf,
            shutdown: self.shutdown,
        })
    }
}

/// A TLS acceptor that can be swapped at run time (certificate reload on
/// SIGHUP): connections read the current one when they start TLS.
#[derive(Clone, Default)]
pub struct TlsSlot(Arc<std::sync::RwLock<Option<TlsAcceptor>>>);

impl TlsSlot {
    /// A slot holding `acceptor` (`None`: no TLS configured).
    pub fn new(acceptor: Option<TlsAcceptor>) -> TlsSlot {
        TlsSlot(Arc::new(std::sync::RwLock::new(acceptor)))
    }

    /// The current acceptor, if TLS is configured.
    pub fn get(&self) -> Option<TlsAcceptor> {
        self.0.read().map(|a| a.clone()).unwrap_or(None)
    }

    /// Replaces the acceptor (a reload); connections that start TLS
    /// afterwards use the new one.
    pub fn set(&self, acceptor: TlsAcceptor) {
        if let Ok(mut slot) = self.0.write() {
            *slot = Some(acceptor);
        }
    }

    /// Whether TLS is configured.
    pub fn is_configured(&self) -> bool {
        self.get().is_some()
    }
}
