//! The listener: binding, the per-core event loops, and one downstream connection's life
//! (CIDR filter → TLS handshake → HTTP/1 with deadlines → graceful close).
//!
//! # Why per-core event loops
//!
//! nginx and HAProxy run one single-threaded event loop per core and never move a
//! connection between threads. pingora's work-stealing runtime and its proxy loop (two
//! tasks and channels per request, timers, header copies) reached half of their
//! throughput on this machine; a probe with one current-thread Tokio runtime per core
//! reached theirs (`docs/gateway.md`, "Where pingora is the ceiling"). So the gateway runs
//! `--threads` current-thread runtimes. One accept loop (on the first) checks the CIDR
//! allow-list and hands each connection, round robin, to a loop where it stays for its
//! whole life: handshake, requests, and the worker connections its requests borrow from
//! that loop's pool.
//!
//! One listening socket is shared rather than one `SO_REUSEPORT` socket per loop, so a
//! second gateway started on the same port fails with "address in use" instead of
//! silently sharing the port.
//!
//! pingora's `Server` still runs the process: signals (SIGTERM graceful, SIGINT fast),
//! the grace period, and the background reload service. [`Frontend`] is the pingora
//! service that starts the loops and stops them on its shutdown signal.

use std::{io, net::SocketAddr, os::unix::fs::FileTypeExt, sync::Arc, time::Duration};

use async_trait::async_trait;
use hyper::{body::Incoming, server::conn::http1, service::service_fn, Request};
use hyper_util::rt::TokioIo;
use pingora::{server::ShutdownWatch, services::Service};
use taskgate_shared::listen::Addr;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    runtime::Handle,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::{
    audit::{self, Reason},
    deadline::{Deadlines, Limits},
    filter::CidrFilter,
    proxy::Gateway,
};

/// Largest request head accepted (hyper answers 431 beyond it).
const MAX_HEAD: usize = 64 * 1024;

/// A bound, not yet serving, listening socket.
#[derive(Debug)]
pub enum Bound {
    /// `IP:PORT`.
    Tcp(std::net::TcpListener),
    /// A Unix socket path.
    Unix(std::os::unix::net::UnixListener),
}

/// Binds `addr` (before the privilege drop, so a port below 1024 works).
///
/// A Unix socket path that exists is replaced only when it is a socket nobody answers
/// on (left by a process that died); a live one is "address in use".
pub fn bind(addr: &Addr) -> io::Result<Bound> {
    match addr {
        Addr::Tcp(sa) => {
            use socket2::{Domain, Protocol, Socket, Type};
            let socket = Socket::new(Domain::for_address(*sa), Type::STREAM, Some(Protocol::TCP))?;
            socket.set_reuse_address(true)?;
            socket.bind(&(*sa).into())?;
            socket.listen(4096)?;
            socket.set_nonblocking(true)?;
            Ok(Bound::Tcp(socket.into()))
        }
        Addr::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                if !meta.file_type().is_socket() {
                    return Err(io::Error::new(
                        io::ErrorKind::AlreadyExists,
                        "the path exists and is not a socket",
                    ));
                }
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(io::Error::new(
                        io::ErrorKind::AddrInUse,
                        "another process is listening on this socket",
                    ));
                }
                std::fs::remove_file(path)?;
            }
            let l = std::os::unix::net::UnixListener::bind(path)?;
            l.set_nonblocking(true)?;
            Ok(Bound::Unix(l))
        }
    }
}

/// What every connection on every loop shares.
pub struct Shared {
    /// The request handler.
    pub gateway: Gateway,
    /// TLS, unless `--insecure-plaintext`.
    pub tls: Option<TlsAcceptor>,
    /// The CIDR allow-list.
    pub filter: CidrFilter,
    /// The head deadline and idle bound; the head deadline also bounds the TLS handshake.
    pub limits: Limits,
}

/// pingora's service for the listener: starts `threads` event loops and the accept loop,
/// and drains them on shutdown.
pub struct Frontend {
    bound: Option<Bound>,
    shared: Arc<Shared>,
    threads: usize,
}

impl Frontend {
    /// The service for an already bound listener.
    pub fn new(bound: Bound, shared: Shared, threads: usize) -> Self {
        Frontend {
            bound: Some(bound),
            shared: Arc::new(shared),
            threads: threads.max(1),
        }
    }
}

#[async_trait]
impl Service for Frontend {
    async fn start_service(
        &mut self,
        _fds: Option<pingora::server::ListenFds>,
        shutdown: ShutdownWatch,
        _listeners_per_fd: usize,
    ) {
        let Some(bound) = self.bound.take() else {
            return;
        };
        let shared = self.shared.clone();
        let threads = self.threads;
        // The loops run on their own threads; this pingora task only waits for them.
        let done = tokio::task::spawn_blocking(move || run_loops(bound, shared, threads, shutdown));
        match done.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "the listener failed; exiting");
                std::process::exit(1);
            }
            Err(e) => tracing::error!(error = %e, "the listener's threads panicked"),
        }
    }

    fn name(&self) -> &str {
        "taskgate gateway"
    }

    fn threads(&self) -> Option<usize> {
        Some(1)
    }
}

/// Starts the loops, runs the accept loop on the first, and returns once every loop has
/// drained after shutdown.
fn run_loops(
    bound: Bound,
    shared: Arc<Shared>,
    threads: usize,
    shutdown: ShutdownWatch,
) -> io::Result<()> {
    let mut handles = Vec::with_capacity(threads);
    let mut joins = Vec::with_capacity(threads);
    let tracker = TaskTracker::new();
    for i in 0..threads {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        handles.push(rt.handle().clone());
        let mut stop = shutdown.clone();
        let tracker = tracker.clone();
        joins.push(
            std::thread::Builder::new()
                .name(format!("gateway-loop-{i}"))
                .spawn(move || {
                    rt.block_on(async move {
                        wait_for(&mut stop).await;
                        tracker.wait().await;
                    })
                })?,
        );
    }
    // Registered with the first loop's reactor here, so a failure is returned at once.
    let listener = {
        let _in_first_loop = handles[0].enter();
        match bound {
            Bound::Tcp(l) => Listener::Tcp(TcpListener::from_std(l)?),
            Bound::Unix(l) => Listener::Unix(UnixListener::from_std(l)?),
        }
    };
    let first = handles[0].clone();
    first.spawn(async move {
        accept_loop(listener, handles, shared, &tracker, shutdown).await;
        // No new connections; the loops end when the tracked ones have drained.
        tracker.close();
    });
    for j in joins {
        let _ = j.join();
    }
    Ok(())
}

/// The listening socket, registered with the first loop.
enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A connection just accepted, with its peer address for TCP.
enum Accepted {
    Tcp(TcpStream, SocketAddr),
    Unix(UnixStream),
}

impl Listener {
    async fn accept(&self) -> io::Result<Accepted> {
        match self {
            Listener::Tcp(l) => l.accept().await.map(|(s, a)| Accepted::Tcp(s, a)),
            Listener::Unix(l) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
        }
    }
}

/// Resolves once shutdown is signalled; never, if the signal's sender is gone.
async fn wait_for(stop: &mut ShutdownWatch) {
    while !*stop.borrow_and_update() {
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Backs off after an accept error such as EMFILE, which would otherwise repeat at once.
async fn accept_failed(e: &io::Error) {
    tracing::warn!(error = %e, "accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Accepts until shutdown: drops sources outside the CIDR allow-list, then hands each
/// connection, round robin, to a loop (the first loop keeps its own share without the
/// move; a moved connection is deregistered here and registered there).
async fn accept_loop(
    listener: Listener,
    handles: Vec<Handle>,
    shared: Arc<Shared>,
    tracker: &TaskTracker,
    mut shutdown: ShutdownWatch,
) {
    let mut next = 0usize;
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => { accept_failed(&e).await; continue; }
            },
            _ = wait_for(&mut shutdown) => return,
        };
        let slot = next % handles.len();
        next = next.wrapping_add(1);
        let (target, here) = (&handles[slot], slot == 0);
        let (shared, stop) = (shared.clone(), shutdown.clone());
        match accepted {
            Accepted::Tcp(tcp, peer) => {
                if !shared.filter.should_accept(Some(&peer)) {
                    // Dropped here: closed before any TLS byte.
                    continue;
                }
                let _ = tcp.set_nodelay(true);
                if here {
                    tracker.spawn(serve_plain_or_tls(tcp, Some(peer), shared, stop));
                    continue;
                }
                let Ok(std) = tcp.into_std() else { continue };
                tracker.spawn_on(
                    async move {
                        if let Ok(tcp) = TcpStream::from_std(std) {
                            serve_plain_or_tls(tcp, Some(peer), shared, stop).await;
                        }
                    },
                    target,
                );
            }
            Accepted::Unix(unix) => {
                let Ok(std) = unix.into_std() else { continue };
                tracker.spawn_on(
                    async move {
                        if let Ok(unix) = UnixStream::from_std(std) {
                            serve_plain_or_tls(unix, None, shared, stop).await;
                        }
                    },
                    target,
                );
            }
        }
    }
}

/// The TLS handshake (when TLS is on), bounded by the head deadline and audited when it
/// fails, then HTTP.
async fn serve_plain_or_tls<S>(
    io: S,
    remote: Option<SocketAddr>,
    shared: Arc<Shared>,
    stop: ShutdownWatch,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(acceptor) = &shared.tls else {
        return serve_http(io, remote, shared, stop).await;
    };
    let who = || remote.map_or_else(|| "-".to_string(), |a| a.to_string());
    match tokio::time::timeout(shared.limits.head, acceptor.accept(io)).await {
        Ok(Ok(tls)) => serve_http(tls, remote, shared, stop).await,
        Ok(Err(e)) => {
            shared.gateway.metrics().deny(Reason::Tls);
            audit::denied_connection(&who(), Reason::Tls, &e.to_string());
        }
        Err(_) => {
            shared.gateway.metrics().deny(Reason::Tls);
            audit::denied_connection(&who(), Reason::Tls, "handshake timeout");
        }
    }
}

/// One connection's HTTP/1 requests, in order, until the client or a deadline ends it,
/// or shutdown closes it after the request in flight.
async fn serve_http<S>(
    io: S,
    remote: Option<SocketAddr>,
    shared: Arc<Shared>,
    mut stop: ShutdownWatch,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Deadlines::new(
        io,
        shared.limits,
        shared.gateway.metrics().header_timeout_count.clone(),
    );
    let service = service_fn(move |req: Request<Incoming>| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(shared.gateway.handle(remote, req).await) }
    });
    let conn = http1::Builder::new()
        .max_buf_size(MAX_HEAD)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = wait_for(&mut stop) => {
            // Finish the request in flight (if any), then close.
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
