//! The worker's local HTTP surface: `/metrics`, `/healthz`, `/events`, served only on a
//! Unix socket or a loopback address (the gateway is the only way in from outside).
//!
//! The server loop is hand-rolled on hyper rather than `axum::serve` because operators
//! need limits `axum::serve` does not offer: a deadline for reading request headers
//! (which also bounds idle keep-alive connections), a cap on concurrent connections, and
//! a graceful shutdown that also ends long-lived `/events` streams.

use std::{
    convert::Infallible,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use axum::{
    extract::State,
    http::{header, HeaderMap, StatusCode},
    response::{
        sse::{Event, KeepAlive, Sse},
        IntoResponse, Response,
    },
    routing::get,
    Router,
};
use futures_util::{stream, Stream, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use taskgate_shared::listen::Addr;
use tokio::sync::Semaphore;
use tokio_stream::wrappers::{errors::BroadcastStreamRecvError, BroadcastStream};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower_http::timeout::TimeoutLayer;

use crate::{events::EventBus, metrics::Metrics, store::Store};

/// Why the listener could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Something that is not a socket is at the socket path.
    #[error("{path} exists and is not a socket; refusing to replace it (remove it or choose another --metrics-listen path)")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
    /// A live process already serves on the socket.
    #[error(
        "{path} is in use by a running process (another worker?); stop it or choose another path"
    )]
    InUse {
        /// The path.
        path: PathBuf,
    },
    /// The socket group does not exist.
    #[error("--socket-group {group:?} does not exist")]
    NoSuchGroup {
        /// The group.
        group: String,
    },
    /// Binding or preparing the listener failed.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Server limits.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A client must send a complete request head within this time (also bounds how
    /// long an idle keep-alive connection is kept).
    pub header_timeout: Duration,
    /// Time limit for `/metrics` and `/healthz` (not for `/events`).
    pub request_timeout: Duration,
    /// Connections served at once; more wait in the kernel's accept queue.
    pub max_connections: usize,
    /// How long `/healthz` waits for the database.
    pub health_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            max_connections: 256,
            health_timeout: Duration::from_secs(2),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// For `/healthz`.
    pub store: Arc<dyn Store>,
    /// For `/metrics`.
    pub metrics: Metrics,
    /// For `/events`.
    pub events: Arc<EventBus>,
    /// Ends `/events` streams.
    pub shutdown: CancellationToken,
    /// Limits.
    pub limits: Limits,
}

/// The routes. A function, so tests can call it without a server.
pub fn router(state: AppState) -> Router {
    let bounded = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            state.limits.request_timeout,
        ));
    Router::new()
        .route("/events", get(events))
        .merge(bounded)
        .fallback(|| async { (StatusCode::NOT_FOUND, "not found\n") })
        .with_state(state)
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// `200 {"status":"ok"}` or `503 {"status":"unavailable"}`; the cause goes to the log,
/// never into the body.
async fn healthz(State(s): State<AppState>) -> Response {
    let ok = match tokio::time::timeout(s.limits.health_timeout, s.store.ping()).await {
        Ok(Ok(())) => true,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: database unavailable");
            false
        }
        Err(_) => {
            tracing::warn!(timeout = ?s.limits.health_timeout, "health check: database did not answer in time");
            false
        }
    };
    s.metrics.database_up.set(i64::from(ok));
    let (code, body) = if ok {
        (StatusCode::OK, "{\"status\":\"ok\"}")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "{\"status\":\"unavailable\"}",
        )
    };
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// Server-Sent Events: one per task state change. `Last-Event-ID` resumes from the
/// in-memory ring. A subscriber that falls behind gets a `lagged` event and skips ahead.
async fn events(
    State(s): State<AppState>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let last_seen = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let (backlog, rx) = s.events.subscribe(last_seen);
    let to_event = |e: &crate::events::TaskEvent| {
        Event::default()
            .id(e.seq.to_string())
            .event("task")
            .json_data(e)
            .unwrap_or_else(|_| Event::default().comment("unencodable event"))
    };
    let live = BroadcastStream::new(rx).map(move |r| match r {
        Ok(e) => to_event(&e),
        Err(BroadcastStreamRecvError::Lagged(n)) => Event::default()
            .event("lagged")
            .data(format!("{{\"missed\":{n}}}")),
    });
    let stream = stream::iter(backlog.iter().map(|e| to_event(e)).collect::<Vec<_>>())
        .chain(live)
        .map(Ok)
        .take_until(s.shutdown.clone().cancelled_owned());
    Sse::new(stream).keep_alive(
        KeepAlive::new()
            .interval(Duration::from_secs(15))
            .text("keep-alive"),
    )
}

/// A bound listener.
pub enum Listener {
    /// A Unix socket (removed again on drop when we created it).
    Unix(tokio::net::UnixListener, Option<SocketFile>),
    /// A loopback TCP socket.
    Tcp(tokio::net::TcpListener),
}

/// Removes the socket file we created when dropped.
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Binds `addr` — or takes the socket systemd passed (`LISTEN_FDS`) — with the socket
/// file's mode and group set. Must run inside the runtime.
pub fn bind(addr: &Addr, mode: u32, group: Option<&str>) -> Result<Listener, HttpError> {
    let bind_err = |source| HttpError::Bind {
        addr: addr.to_string(),
        source,
    };
    let mut fds = listenfd::ListenFd::from_env();
    if let Ok(Some(l)) = fds.take_unix_listener(0) {
        l.set_nonblocking(true).map_err(bind_err)?;
        tracing::info!("using the Unix socket passed by systemd");
        return Ok(Listener::Unix(
            tokio::net::UnixListener::from_std(l).map_err(bind_err)?,
            None,
        ));
    }
    if let Ok(Some(l)) = fds.take_tcp_listener(0) {
        l.set_nonblocking(true).map_err(bind_err)?;
        let local = l.local_addr().map_err(bind_err)?;
        if !local.ip().is_loopback() {
            return Err(bind_err(std::io::Error::other(format!(
                "systemd passed {local}, which is not loopback"
            ))));
        }
        return Ok(Listener::Tcp(
            tokio::net::TcpListener::from_std(l).map_err(bind_err)?,
        ));
    }
    match addr {
        Addr::Tcp(sa) => {
            let l = std::net::TcpListener::bind(sa).map_err(bind_err)?;
            l.set_nonblocking(true).map_err(bind_err)?;
            Ok(Listener::Tcp(
                tokio::net::TcpListener::from_std(l).map_err(bind_err)?,
            ))
        }
        Addr::Unix(path) => {
            clear_stale_socket(path)?;
            let gid = match group {
                None => None,
                Some(g) => Some(
                    nix::unistd::Group::from_name(g)
                        .ok()
                        .flatten()
                        .ok_or_else(|| HttpError::NoSuchGroup {
                            group: g.to_string(),
                        })?
                        .gid,
                ),
            };
            let l = tokio::net::UnixListener::bind(path).map_err(bind_err)?;
            let file = SocketFile(path.clone());
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
                .map_err(bind_err)?;
            if gid.is_some() {
                nix::unistd::chown(path.as_path(), None, gid)
                    .map_err(|e| bind_err(std::io::Error::from(e)))?;
            }
            Ok(Listener::Unix(l, Some(file)))
        }
    }
}

/// Replaces a socket file left by a dead worker; refuses a live one or a non-socket.
/// How long a socket must keep accepting connections before it counts as in use.
///
/// A worker killed with SIGKILL can leave a child that was forked but has not reached
/// `exec` yet (an executor being spawned): it still holds the listening socket, and the
/// kernel completes connections for it, until its death signal or `exec` closes it a few
/// milliseconds later. A supervisor restarting the worker at once must not be told the
/// path is in use by that dying child (found by `tests/chaos/worker`).
const IN_USE_GRACE: Duration = Duration::from_secs(2);

fn clear_stale_socket(path: &Path) -> Result<(), HttpError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.file_type().is_socket() => Err(HttpError::NotASocket {
            path: path.to_path_buf(),
        }),
        Ok(_) if still_listening(path) => Err(HttpError::InUse {
            path: path.to_path_buf(),
        }),
        Ok(_) => {
            tracing::info!(path = %path.display(), "replacing a stale socket file");
            std::fs::remove_file(path).map_err(|source| HttpError::Bind {
                addr: format!("unix:{}", path.display()),
                source,
            })
        }
    }
}

/// True when something accepts connections on `path` for all of [`IN_USE_GRACE`].
fn still_listening(path: &Path) -> bool {
    let deadline = std::time::Instant::now() + IN_USE_GRACE;
    loop {
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            return false;
        }
        if std::time::Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Serves `router` until `shutdown`; then lets open connections finish briefly.
pub async fn serve(
    listener: Listener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let tracker = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = accept(&listener) => a,
        };
        let io = match accepted {
            Ok(io) => io,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let svc = hyper_util::service::TowerToHyperService::new(router.clone());
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(io, svc);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
                }
            }
            drop(permit);
        });
    }
    tracker.close();
    let _ = tokio::time::timeout(Duration::from_secs(6), tracker.wait()).await;
    drop(listener);
}

type Io = TokioIo<Box<dyn Stream2>>;

/// A connected socket of either kind.
trait Stream2: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream2 for T {}

async fn accept(l: &Listener) -> std::io::Result<Io> {
    Ok(match l {
        Listener::Unix(l, _) => TokioIo::new(Box::new(l.accept().await?.0) as Box<dyn Stream2>),
        Listener::Tcp(l) => {
            let (s, _) = l.accept().await?;
            let _ = s.set_nodelay(true);
            TokioIo::new(Box::new(s) as Box<dyn Stream2>)
        }
    })
}

/// `worker healthcheck`: GET /healthz on the local listener; true on 200.
pub async fn probe(addr: &Addr, timeout: Duration) -> Result<bool, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n";
    let exchange = async {
        let mut buf = Vec::new();
        match addr {
            Addr::Unix(p) => {
                let mut s = tokio::net::UnixStream::connect(p).await?;
                s.write_all(request).await?;
                s.take(4096).read_to_end(&mut buf).await?;
            }
            Addr::Tcp(a) => {
                let mut s = tokio::net::TcpStream::connect(a).await?;
                s.write_all(request).await?;
                s.take(4096).read_to_end(&mut buf).await?;
            }
        }
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("{addr} did not answer within {timeout:?}"))?
        .map_err(|e| format!("cannot query {addr}: {e}"))?;
    Ok(buf.starts_with(b"HTTP/1.1 200 "))
}
