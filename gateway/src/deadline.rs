//! Deadlines on a downstream connection: the whole request head (slowloris) and the idle
//! wait between requests.
//!
//! hyper times nothing by itself here, and a per-read timeout would let a client that
//! trickles one byte at a time hold a connection for as long as it likes. [`Deadlines`]
//! wraps the stream (under hyper, over TLS) and bounds:
//!
//! - the *whole* request head: the clock starts when the connection is handed over after
//!   the TLS handshake (first request) or at the first byte of a later request, and stops
//!   at the blank line that ends the head;
//! - the quiet time of a connection between requests, or while a response is streaming:
//!   no byte read nor written for `idle` closes it. A streaming `/events` response writes
//!   a heartbeat well within that bound, so it is never cut.
//!
//! Past a deadline, reads fail with `TimedOut` and hyper closes the connection.
//!
//! The wrapper sees every byte, so it finds the end of the head itself; that costs a byte
//! scan of the head only (bodies and idle time are not scanned). There is one timer per
//! connection. It is moved earlier when a deadline comes closer (the head deadline after
//! an idle wait; the idle bound, when shorter than the head deadline, after a request);
//! every later deadline is applied lazily, when the timer fires, so a read or a write
//! costs a clock read and no timer operation.

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

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Where a connection is in its request/response cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head; the head deadline is armed.
    Head,
    /// The head is complete; the request is being handled. No deadline here: the upstream
    /// timeouts bound the wait for the response.
    Handling,
    /// A response is being written or was written: the idle bound applies, counted from
    /// the last byte read or written.
    Idle,
}

/// Both deadlines, and what the timer stands for.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The whole request head must arrive within this.
    pub head: Duration,
    /// A connection with no byte in either direction for this long is closed.
    pub idle: Duration,
}

/// A downstream stream with a head deadline and an idle bound.
#[derive(Debug)]
pub struct Deadlines<S> {
    inner: S,
    limits: Limits,
    phase: Phase,
    /// Whether the last head byte seen was a line feed (CRs ignored): a second one ends
    /// the head, whether lines end in CRLF or bare LF as httparse allows.
    after_lf: bool,
    /// When the current head must be complete.
    head_by: Instant,
    /// The last time a byte was written (a read ends the idle wait at once).
    last_activity: Instant,
    sleep: Pin<Box<Sleep>>,
    cut: Arc<AtomicU64>,
}

impl<S> Deadlines<S> {
    /// Wraps `inner`; the first head must arrive within `limits.head` from now. `cut`
    /// counts connections closed by the head deadline.
    pub fn new(inner: S, limits: Limits, cut: Arc<AtomicU64>) -> Self {
        let now = Instant::now();
        Deadlines {
            inner,
            limits,
            phase: Phase::Head,
            after_lf: false,
            head_by: now + limits.head,
            last_activity: now,
            sleep: Box::pin(tokio::time::sleep_until(now + limits.head)),
            cut,
        }
    }

    /// Scans newly read head bytes; true when they complete the head: an empty line, a
    /// line feed after a line feed with nothing but carriage returns between them.
    /// `after_lf` carries "only `\r` since the last line feed" from one read to the next.
    /// Jumps from line feed to line feed (`memchr`), so a request head costs a few steps
    /// rather than a step per byte.
    fn scan(&mut self, bytes: &[u8]) -> bool {
        let only_cr = |s: &[u8]| s.iter().all(|&b| b == b'\r');
        let mut line_start = 0;
        let mut at_line_start = self.after_lf;
        for lf in memchr::memchr_iter(b'\n', bytes) {
            if at_line_start && only_cr(&bytes[line_start..lf]) {
                return true;
            }
            at_line_start = true;
            line_start = lf + 1;
        }
        self.after_lf = at_line_start && only_cr(&bytes[line_start..]);
        false
    }

    /// Polls the timer; `Some(error)` when the deadline of the current phase has passed.
    /// A timer that fired early (the deadline moved later meanwhile) is re-armed.
    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return None;
            }
            let due = match self.phase {
                Phase::Head => self.head_by,
                Phase::Idle => self.last_activity + self.limits.idle,
                // Nothing to bound; park the timer until the next phase change needs it.
                Phase::Handling => Instant::now() + self.limits.idle,
            };
            if due <= Instant::now() {
                return Some(match self.phase {
                    Phase::Head => {
                        self.cut.fetch_add(1, Ordering::Relaxed);
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            "request head not complete within the header deadline",
                        )
                    }
                    _ => io::Error::new(io::ErrorKind::TimedOut, "idle connection closed"),
                });
            }
            self.sleep.as_mut().reset(due);
        }
    }

    fn wrote(&mut self) {
        // A response is going out: the next bytes read start a new request.
        let now = Instant::now();
        self.last_activity = now;
        if self.phase != Phase::Idle {
            self.phase = Phase::Idle;
            // The timer may stand for a later deadline than the idle bound (a head
            // deadline longer than the idle bound); bring it forward. Otherwise it stays,
            // and is moved on lazily when it fires.
            let due = now + self.limits.idle;
            if self.sleep.deadline() > due {
                self.sleep.as_mut().reset(due);
            }
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Deadlines<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.phase != Phase::Handling {
            if let Some(e) = this.expired(cx) {
                return Poll::Ready(Err(e));
            }
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            let new = buf.filled().len() - before;
            if new > 0 {
                // Bytes read always end an idle wait, so only writes need to stamp
                // `last_activity`.
                if this.phase == Phase::Idle {
                    // First byte of the next request: its head gets the full deadline, and
                    // the timer moves earlier than the idle bound it stood for.
                    this.phase = Phase::Head;
                    this.after_lf = false;
                    this.head_by = Instant::now() + this.limits.head;
                    let head_by = this.head_by;
                    this.sleep.as_mut().reset(head_by);
                }
                if this.phase == Phase::Head && this.scan(&buf.filled()[before..]) {
                    this.phase = Phase::Handling;
                }
            }
        }
        res
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Deadlines<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            if n > 0 {
                self.wrote();
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
                self.wrote();
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

    fn limits() -> Limits {
        Limits {
            head: Duration::from_millis(200),
            idle: Duration::from_millis(400),
        }
    }

    /// The byte-at-a-time definition `scan` must agree with.
    fn head_ends_at(bytes: &[u8]) -> Option<usize> {
        let mut after_lf = false;
        for (i, &b) in bytes.iter().enumerate() {
            match b {
                b'\n' if after_lf => return Some(i),
                b'\n' => after_lf = true,
                b'\r' => {}
                _ => after_lf = false,
            }
        }
        None
    }

    #[tokio::test]
    async fn the_head_scan_agrees_with_the_byte_definition_across_every_split() {
        let heads: [&[u8]; 7] = [
            b"GET /metrics HTTP/1.1\r\nHost: a\r\n\r\nGET /x",
            b"GET / HTTP/1.1\nHost: a\n\nrest",
            b"GET / HTTP/1.1\r\nA: b\r\r\n\r\r\n",
            b"GET / HTTP/1.1\r\nA: \rb\r\nC: d\r\n",
            b"\r\n\r\n",
            b"GET / HTTP/1.1\r\nA: b\r\n \r\n\r\n",
            b"no line feed at all",
        ];
        for head in heads {
            let want = head_ends_at(head).is_some();
            for a in 0..=head.len() {
                for b in a..=head.len() {
                    let (_client, server) = tokio::io::duplex(64);
                    let mut d = Deadlines::new(server, limits(), Arc::new(AtomicU64::new(0)));
                    let got = d.scan(&head[..a]) || d.scan(&head[a..b]) || d.scan(&head[b..]);
                    assert_eq!(
                        got,
                        want,
                        "{:?} split at {a}, {b}",
                        String::from_utf8_lossy(head)
                    );
                }
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickled_head_is_cut_at_the_deadline_not_per_read() {
        let (client, server) = tokio::io::duplex(1024);
        let cut = Arc::new(AtomicU64::new(0));
        let mut s = Deadlines::new(server, limits(), cut.clone());
        let writer = tokio::spawn(async move {
            let mut client = client;
            for b in b"GET /metrics HTTP/1.1\r\n" {
                let _ = client.write_all(&[*b]).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            client
        });
        let started = Instant::now();
        let mut buf = [0u8; 64];
        let err = loop {
            match s.read(&mut buf).await {
                Ok(0) => panic!("closed instead of timing out"),
                Ok(_) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert!(started.elapsed() < Duration::from_millis(260));
        assert_eq!(cut.load(Ordering::Relaxed), 1);
        drop(writer);
    }

    #[tokio::test(start_paused = true)]
    async fn writes_keep_a_streaming_connection_alive_and_silence_ends_it() {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let cut = Arc::new(AtomicU64::new(0));
        let mut s = Deadlines::new(server, limits(), cut.clone());
        client
            .write_all(b"GET /events HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 64];
        assert!(s.read(&mut buf).await.unwrap() > 0);
        // Streaming: a write every 300 ms for 3 s, never 400 ms of silence.
        let reader = tokio::spawn(async move {
            let mut sink = [0u8; 64];
            while client.read(&mut sink).await.unwrap_or(0) > 0 {}
        });
        let mut s2 = s;
        let pump = async {
            for _ in 0..10 {
                s2.write_all(b"data: x\n\n").await.unwrap();
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            s2
        };
        let mut s = pump.await;
        // Then silence: the next read fails once the idle bound passes.
        let started = Instant::now();
        let err = s.read(&mut buf).await.expect_err("idle bound");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() <= Duration::from_millis(400));
        assert_eq!(cut.load(Ordering::Relaxed), 0, "idle is not a head timeout");
        reader.abort();
    }
}
