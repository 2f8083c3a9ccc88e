//! The request-head deadline pingora lacks.
//!
//! pingora times out each *read* of a request head (60 s, or the keep-alive timeout on a
//! reused connection), so a client that trickles one byte at a time (slowloris) holds a
//! connection open for as long as it likes. [`HeadDeadline`] wraps each downstream stream
//! and bounds the *whole* head: the clock starts when the connection is handed over after
//! the TLS handshake (first request) or at the first byte of a later request, and stops at
//! the blank line that ends the head. Past the deadline, reads fail with `TimedOut` and
//! pingora closes the connection.
//!
//! The wrapper sees every byte, so it finds the end of the head itself instead of asking
//! pingora; that costs a byte scan of the head only (bodies and idle time are not
//! scanned), and the one timer per connection is reset, not re-allocated, per request.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use pingora::{
    apps::{HttpPersistentSettings, HttpServerApp, ServerApp},
    protocols::http::ServerSession,
    protocols::{
        raw_connect::ProxyDigest, tls::SslDigest, GetProxyDigest, GetSocketDigest, GetTimingDigest,
        Peek, Shutdown, SocketDigest, Ssl, Stream, TimingDigest, UniqueID, UniqueIDType, ALPN,
    },
    server::ShutdownWatch,
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Where a connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head; the deadline is armed.
    Head,
    /// The head is complete; body and response flow without a deadline.
    Body,
    /// A response was written; waiting for the next request (bounded by pingora's
    /// keep-alive timeout, not by us).
    Idle,
}

/// A downstream stream with a deadline on each request head.
#[derive(Debug)]
pub struct HeadDeadline {
    inner: Stream,
    timeout: Duration,
    phase: Phase,
    /// Whether the last head byte seen was a line feed (CRs ignored): a second one ends
    /// the head, whether lines end in CRLF or bare LF as httparse allows.
    after_lf: bool,
    sleep: Pin<Box<Sleep>>,
    cut: Arc<AtomicU64>,
    /// Bytes read by [`Peek::try_peek`] while waiting for the next request, handed out
    /// before anything else is read.
    early: Vec<u8>,
}

impl HeadDeadline {
    /// Wraps `inner`; the first head must arrive within `timeout` from now. `cut` counts
    /// connections closed by the deadline.
    pub fn new(inner: Stream, timeout: Duration, cut: Arc<AtomicU64>) -> Self {
        HeadDeadline {
            inner,
            timeout,
            phase: Phase::Head,
            after_lf: false,
            sleep: Box::pin(tokio::time::sleep(timeout)),
            cut,
            early: Vec::new(),
        }
    }

    /// Scans newly read head bytes; true when they complete the head.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        for &b in bytes {
            match b {
                b'\n' if self.after_lf => return true,
                b'\n' => self.after_lf = true,
                b'\r' => {}
                _ => self.after_lf = false,
            }
        }
        false
    }
}

impl AsyncRead for HeadDeadline {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !this.early.is_empty() {
            // Already scanned when they were read.
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.drain(..n);
            if this.early.is_empty() {
                this.early = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        if this.phase == Phase::Head && this.sleep.as_mut().poll(cx).is_ready() {
            this.cut.fetch_add(1, Ordering::Relaxed);
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "request head not complete within the header deadline",
            )));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = buf.filled().len() - before;
            if new > 0 {
                if this.phase == Phase::Idle {
                    // First byte of the next request: its head gets the full timeout.
                    this.phase = Phase::Head;
                    this.after_lf = false;
                    let deadline = Instant::now() + this.timeout;
                    this.sleep.as_mut().reset(deadline);
                }
                if this.phase == Phase::Head {
                    let done = this.scan(&buf.filled()[before..]);
                    if done {
                        this.phase = Phase::Body;
                    }
                }
            }
        }
        res
    }
}

impl AsyncWrite for HeadDeadline {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                // A response is going out: the next bytes read start a new request.
                self.phase = Phase::Idle;
            }
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                self.phase = Phase::Idle;
            }
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

// === pingora's stream traits, all delegated ===

#[async_trait]
impl Shutdown for HeadDeadline {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for HeadDeadline {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for HeadDeadline {
    fn get_ssl(&self) -> Option<&pingora::protocols::tls::TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for HeadDeadline {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
}

impl GetProxyDigest for HeadDeadline {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for HeadDeadline {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

/// Waits until the next request's first bytes arrive (or the head deadline passes) and
/// keeps them for the following reads, so they are not consumed. `Ok(false)`: the peer
/// closed the connection. [`WithHeadDeadline`] calls this between requests.
#[async_trait]
impl Peek for HeadDeadline {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        if self.early.is_empty() {
            let mut first = [0u8; 1024];
            let n = tokio::io::AsyncReadExt::read(self, &mut first).await?;
            if n == 0 {
                return Ok(false);
            }
            self.early = first[..n].to_vec();
        }
        let n = self.early.len().min(buf.len());
        buf[..n].copy_from_slice(&self.early[..n]);
        Ok(true)
    }
}

/// A [`ServerApp`] that wraps every accepted stream in a [`HeadDeadline`] and runs the
/// HTTP/1 keep-alive loop itself.
///
/// pingora's own loop (`impl ServerApp for T: HttpServerApp`) waits for the next request
/// *inside* `process_new_http`, whose boxed future is sized for the whole proxy state
/// machine: every idle keep-alive connection held one such allocation plus a 4 KiB head
/// buffer, about 59 KB per connection measured on plain HTTP. This loop waits in
/// [`HeadDeadline`]'s `try_peek` (a 1 KiB stack buffer, then only the bytes that arrived)
/// and calls `process_new_http` once a request has started, so an idle connection holds
/// the TLS state and little else. The idle bound pingora applied to that wait
/// (`set_keepalive`) is applied here; the head deadline works as before, because the
/// bytes are read through [`HeadDeadline`].
pub struct WithHeadDeadline<A> {
    inner: Arc<A>,
    timeout: Duration,
    idle: Duration,
    cut: Arc<AtomicU64>,
}

impl<A> WithHeadDeadline<A> {
    /// Wraps `inner`. `timeout` bounds each request head, `idle` the wait for the next
    /// request on a kept-alive connection; `cut` counts connections closed by the deadline.
    pub fn new(inner: A, timeout: Duration, idle: Duration, cut: Arc<AtomicU64>) -> Self {
        WithHeadDeadline {
            inner: Arc::new(inner),
            timeout,
            idle,
            cut,
        }
    }
}

#[async_trait]
impl<A: HttpServerApp + Send + Sync + 'static> ServerApp for WithHeadDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let mut stream: Stream =
            Box::new(HeadDeadline::new(stream, self.timeout, self.cut.clone()));
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            // Not offered by our listener; should a client get it anyway, pingora's own
            // loop serves it.
            return ServerApp::process_new(&self.inner, stream, shutdown).await;
        }
        let mut persistent = None;
        let mut first = true;
        loop {
            if *shutdown.borrow() {
                return None;
            }
            // The first request is bounded by the head deadline alone; later ones by the
            // idle bound until their first byte, then by the head deadline.
            let mut probe = [0u8; 1];
            let arrived = if first {
                stream.try_peek(&mut probe).await
            } else {
                match tokio::time::timeout(self.idle, stream.try_peek(&mut probe)).await {
                    Ok(r) => r,
                    Err(_) => return None,
                }
            };
            if !matches!(arrived, Ok(true)) {
                return None;
            }
            first = false;
            let mut session = ServerSession::new_http1(stream);
            match persistent.take() {
                Some(settings) => HttpPersistentSettings::apply_to_session(settings, &mut session),
                None => session.set_keepalive(Some(self.idle.as_secs().max(1))),
            }
            let reused = self.inner.process_new_http(session, shutdown).await?;
            let (next, settings) = reused.consume();
            stream = next;
            persistent = settings;
        }
    }

    async fn cleanup(&self) {
        self.inner.http_cleanup().await
    }
}
