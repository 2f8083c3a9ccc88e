//! The worker side: a small pool of HTTP/1 connections to the worker per event loop.
//!
//! A request takes an idle connection from its loop's pool (or opens one), and its
//! response body gives the connection back once the client has received all of it. So
//! only requests in flight hold a worker connection: an idle client connection holds
//! none, and a loop keeps at most [`MAX_IDLE_PER_LOOP`] idle ones. The pool is
//! thread-local: each loop is one thread, so taking and returning a connection needs no
//! lock and never moves a connection between threads.
//!
//! A connection idle for [`MAX_REUSE_IDLE`] or longer is not reused, because the worker
//! closes idle keep-alive connections after 5 s and a request sent into that close would
//! fail; a request that a closed connection never took is sent again on a fresh one.
//!
//! Timeouts: connecting is bounded by `--upstream-connect-timeout`; once connected, no
//! byte from the worker for `--upstream-read-timeout` ends the connection, and a request
//! waiting on it fails with 504.

use std::{
    cell::RefCell,
    collections::VecDeque,
    future::Future,
    io,
    path::PathBuf,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::{
    body::{Body, Frame, Incoming, SizeHint},
    client::conn::http1::{self, SendRequest},
    Request, Response,
};
use hyper_util::rt::TokioIo;
use taskgate_shared::listen::Addr;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream},
    time::{Instant, Sleep},
};
use tokio_util::either::Either;

/// An upstream connection idle for this long is closed rather than reused (the worker
/// closes idle keep-alive connections after 5 s).
pub const MAX_REUSE_IDLE: Duration = Duration::from_secs(2);

/// Most idle worker connections one event loop keeps.
pub const MAX_IDLE_PER_LOOP: usize = 64;

thread_local! {
    /// This loop's idle worker connections, most recently used last.
    static IDLE: RefCell<VecDeque<(SendRequest<Incoming>, Instant)>> = const { RefCell::new(VecDeque::new()) };
}

/// The most recently used idle connection that is still fresh.
fn take_idle() -> Option<SendRequest<Incoming>> {
    IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        while let Some((sender, since)) = idle.pop_back() {
            if !sender.is_closed() && since.elapsed() < MAX_REUSE_IDLE {
                return Some(sender);
            }
        }
        None
    })
    .ok()
    .flatten()
}

/// Returns a connection whose exchange is complete; stale ones at the old end go.
fn put_idle(sender: SendRequest<Incoming>) {
    let _ = IDLE.try_with(|idle| {
        let mut idle = idle.borrow_mut();
        while idle
            .front()
            .is_some_and(|(s, since)| s.is_closed() || since.elapsed() >= MAX_REUSE_IDLE)
        {
            idle.pop_front();
        }
        if idle.len() >= MAX_IDLE_PER_LOOP {
            idle.pop_front();
        }
        idle.push_back((sender, Instant::now()));
    });
}

/// Why a request could not be proxied.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The worker could not be reached in time.
    #[error("connecting to the upstream: {0}")]
    Connect(io::Error),
    /// The worker accepted but did not answer in time.
    #[error("the upstream sent nothing within the read timeout")]
    Timeout,
    /// The exchange failed.
    #[error("upstream request failed: {0}")]
    Http(#[from] hyper::Error),
}

impl UpstreamError {
    /// The status a client gets: 504 for a timeout, 502 otherwise.
    pub fn status(&self) -> u16 {
        match self {
            UpstreamError::Timeout => 504,
            UpstreamError::Connect(e) if e.kind() == io::ErrorKind::TimedOut => 504,
            _ => 502,
        }
    }
}

/// Where and how to reach the worker; shared by every connection.
#[derive(Debug, Clone)]
pub struct Upstream {
    target: Target,
    connect_timeout: Duration,
    read_timeout: Duration,
}

#[derive(Debug, Clone)]
enum Target {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl Upstream {
    /// The upstream at `addr` with its timeouts.
    pub fn new(addr: &Addr, connect_timeout: Duration, read_timeout: Duration) -> Self {
        let target = match addr {
            Addr::Unix(p) => Target::Unix(p.clone()),
            Addr::Tcp(sa) => Target::Tcp(*sa),
        };
        Upstream {
            target,
            connect_timeout,
            read_timeout,
        }
    }

    async fn connect(&self) -> Result<SendRequest<Incoming>, UpstreamError> {
        let io = tokio::time::timeout(self.connect_timeout, async {
            Ok::<_, io::Error>(match &self.target {
                Target::Unix(path) => Either::Left(UnixStream::connect(path).await?),
                Target::Tcp(sa) => {
                    let tcp = TcpStream::connect(sa).await?;
                    tcp.set_nodelay(true)?;
                    Either::Right(tcp)
                }
            })
        })
        .await
        .map_err(|_| {
            UpstreamError::Connect(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            ))
        })?
        .map_err(UpstreamError::Connect)?;
        let io = ReadBound::new(io, self.read_timeout);
        let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
        // The connection's own task, on this loop: it ends when the worker closes, the
        // read bound passes, or every handle to it (pool entry, response body) is gone.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// Sends `req` to the worker and returns its response; the body streams, and gives
    /// the connection back to this loop's pool once it has been read to the end.
    pub async fn send(
        &self,
        mut req: Request<Incoming>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        // At most one retry: a pooled connection may have been closed by the worker since
        // it was used; hyper hands back a request it never sent.
        for _ in 0..2 {
            let mut sender = match take_idle() {
                Some(s) => s,
                None => self.connect().await?,
            };
            if sender.ready().await.is_err() {
                sender = self.connect().await?;
                sender.ready().await?;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    return Ok(resp.map(|inner| PooledBody {
                        inner,
                        sender: Some(sender),
                    }))
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) => req = unsent,
                    None => return Err(classify(e.into_error())),
                },
            }
        }
        Err(UpstreamError::Connect(io::Error::new(
            io::ErrorKind::ConnectionReset,
            "the upstream closed two connections before taking the request",
        )))
    }
}

/// A worker response body that holds its connection: read to the end, the connection
/// goes back to the pool when the body is dropped; dropped early (the client went away
/// mid-body), the connection is closed, since unread bytes are still on it.
pub struct PooledBody {
    inner: Incoming,
    sender: Option<SendRequest<Incoming>>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some(sender) = self.sender.take() {
            if self.inner.is_end_stream() {
                put_idle(sender);
            }
        }
    }
}

fn classify(e: hyper::Error) -> UpstreamError {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            if io.kind() == io::ErrorKind::TimedOut {
                return UpstreamError::Timeout;
            }
        }
        source = s.source();
    }
    UpstreamError::Http(e)
}

/// The read timeout: no byte from the worker for `limit` fails the read, which ends the
/// connection. The timer is re-armed lazily (only when it fires), so a read costs a
/// clock read and no timer operation.
struct ReadBound<S> {
    inner: S,
    limit: Duration,
    last: Instant,
    sleep: Pin<Box<Sleep>>,
}

impl<S> ReadBound<S> {
    fn new(inner: S, limit: Duration) -> Self {
        let now = Instant::now();
        ReadBound {
            inner,
            limit,
            last: now,
            sleep: Box::pin(tokio::time::sleep_until(now + limit)),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for ReadBound<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    this.last = Instant::now();
                }
                Poll::Ready(r)
            }
            Poll::Pending => loop {
                if this.sleep.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let due = this.last + this.limit;
                if due <= Instant::now() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "upstream read timeout",
                    )));
                }
                this.sleep.as_mut().reset(due);
            },
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadBound<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                // A request went out: the worker's time to answer starts now.
                this.last = Instant::now();
            }
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                this.last = Instant::now();
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn silence_from_the_worker_fails_the_read_and_each_byte_restarts_the_clock() {
        let (mut worker, gateway_side) = tokio::io::duplex(1024);
        let mut io = ReadBound::new(gateway_side, Duration::from_secs(5));
        let feeder = tokio::spawn(async move {
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(3)).await;
                worker.write_all(b"x").await.unwrap();
            }
            worker
        });
        let start = Instant::now();
        let mut buf = [0u8; 8];
        for _ in 0..4 {
            assert_eq!(io.read(&mut buf).await.unwrap(), 1);
        }
        let _worker = feeder.await.unwrap();
        let err = io.read(&mut buf).await.expect_err("read bound");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(start.elapsed().as_secs(), 12 + 5);
    }
}
