//! The egress proxy: HTTP `CONNECT` and plain-HTTP forwarding, one task per credential.
//!
//! Each executor's proxy URL carries a random per-attempt credential
//! (`http://task-ID:TOKEN@127.0.0.1:PORT`); the proxy maps it to the task and applies
//! that module's [`Policy`]. An unknown or missing credential gets 407. Every decision
//! is one audit log line (task, module, destination, resolved address, decision, reason)
//! and a `taskgate_egress_requests_total` sample; denials are also task events.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use base64::Engine;
use prometheus::IntCounterVec;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::TcpStream,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{Decision, Mode, Policy};
use crate::events::EventBus;

/// Largest request head the proxy reads.
const MAX_HEAD: usize = 16 * 1024;
/// A client must send its request head within this time.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Who a credential belongs to.
#[derive(Debug, Clone)]
struct TaskIdent {
    id: i64,
    module: String,
    queue: String,
    attempt: i32,
}

/// The proxy's shared state.
pub struct EgressProxy {
    policy: Policy,
    tasks: Mutex<HashMap<String, TaskIdent>>,
    requests: IntCounterVec,
    events: Arc<EventBus>,
}

/// Removes a task's credential when the attempt ends.
pub struct Credential {
    proxy: Arc<EgressProxy>,
    token: String,
    /// `task-ID:TOKEN`, for the proxy URL's userinfo.
    pub userinfo: String,
}

impl Drop for Credential {
    fn drop(&mut self) {
        self.proxy
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.token);
    }
}

impl EgressProxy {
    /// A proxy applying `policy`; registers its counter in `registry`.
    pub fn new(
        policy: Policy,
        registry: &prometheus::Registry,
        events: Arc<EventBus>,
    ) -> Result<Arc<Self>, prometheus::Error> {
        let requests = IntCounterVec::new(
            prometheus::Opts::new(
                "taskgate_egress_requests_total",
                "Egress connection requests through the worker's proxy, by module and decision (allowed, denied, would_deny, unauthenticated).",
            ),
            &["module", "decision"],
        )?;
        let requests = crate::metrics::register(registry, requests)?;
        Ok(Arc::new(Self {
            policy,
            tasks: Mutex::new(HashMap::new()),
            requests,
            events,
        }))
    }

    /// Issues the credential for one attempt.
    pub fn register(
        self: &Arc<Self>,
        id: i64,
        module: &str,
        queue: &str,
        attempt: i32,
    ) -> Credential {
        let token: String = {
            use rand::Rng;
            let mut rng = rand::rng();
            (0..32)
                .map(|_| format!("{:x}", rng.random_range(0..16u8)))
                .collect()
        };
        self.tasks.lock().unwrap_or_else(|p| p.into_inner()).insert(
            token.clone(),
            TaskIdent {
                id,
                module: module.to_string(),
                queue: queue.to_string(),
                attempt,
            },
        );
        Credential {
            proxy: self.clone(),
            userinfo: format!("task-{id}:{token}"),
            token,
        }
    }

    /// Serves connections from `accept` until `shutdown`.
    pub async fn serve<S, F, Fut>(self: Arc<Self>, mut accept: F, shutdown: CancellationToken)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<S>>,
    {
        let tracker = TaskTracker::new();
        loop {
            let stream = tokio::select! {
                _ = shutdown.cancelled() => break,
                s = accept() => s,
            };
            match stream {
                Ok(s) => {
                    let me = self.clone();
                    let stop = shutdown.clone();
                    tracker.spawn(async move {
                        tokio::select! {
                            _ = me.handle(s) => {}
                            _ = stop.cancelled() => {}
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "egress proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        tracker.close();
        tracker.wait().await;
    }

    async fn handle<S: AsyncRead + AsyncWrite + Unpin>(&self, mut client: S) {
        let Ok(Ok((head, rest))) = tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut client)).await
        else {
            let _ = client
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
            return;
        };
        let Some(req) = Request::parse(&head) else {
            let _ = client
                .write_all(
                    b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
                )
                .await;
            return;
        };
        let Some(task) = req.credential().and_then(|t| self.lookup(&t)) else {
            self.requests
                .with_label_values(&["", "unauthenticated"])
                .inc();
            tracing::warn!(target: "taskgate::egress", destination = %format!("{}:{}", req.host, req.port), decision = "denied", reason = "no_credential", "egress");
            let _ = client
                .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"taskgate\"\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
                .await;
            return;
        };
        let decision = self.policy.decide(&task.module, &req.host, req.port).await;
        self.audit(&task, &req, &decision);
        let target = match (decision.allowed, self.policy.mode) {
            (true, _) => decision.addr,
            (false, Mode::Report) => match decision.addr {
                Some(a) => Some(a),
                // Report mode still needs somewhere to connect: resolve without the policy.
                None => tokio::net::lookup_host((req.host.as_str(), req.port))
                    .await
                    .ok()
                    .and_then(|mut a| a.next()),
            },
            (false, _) => None,
        };
        let Some(target) = target else {
            let _ = client
                .write_all(b"HTTP/1.1 403 Forbidden\r\nConnection: close\r\nContent-Length: 33\r\n\r\negress denied by taskgate policy\n")
                .await;
            return;
        };
        let upstream = match tokio::time::timeout(
            self.policy.connect_timeout,
            TcpStream::connect(target),
        )
        .await
        {
            Ok(Ok(s)) => s,
            _ => {
                let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").await;
                return;
            }
        };
        relay(client, upstream, &req, &rest).await;
    }

    fn lookup(&self, token: &str) -> Option<TaskIdent> {
        self.tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            .cloned()
    }

    fn audit(&self, task: &TaskIdent, req: &Request, d: &Decision) {
        let decision = match (d.allowed, self.policy.mode) {
            (true, _) => "allowed",
            (false, Mode::Report) => "would_deny",
            (false, _) => "denied",
        };
        self.requests
            .with_label_values(&[&task.module, decision])
            .inc();
        let resolved = d.addr.map(|a| a.ip().to_string()).unwrap_or_default();
        let destination = format!("{}:{}", req.host, req.port);
        if d.allowed {
            tracing::info!(target: "taskgate::egress", task_id = task.id, module = %task.module, destination = %destination, resolved = %resolved, decision, reason = d.reason, "egress");
        } else {
            tracing::warn!(target: "taskgate::egress", task_id = task.id, module = %task.module, destination = %destination, resolved = %resolved, decision, reason = d.reason, "egress");
            self.events.emit(
                task.id,
                &task.module,
                &task.queue,
                "egress_denied",
                task.attempt,
                None,
            );
        }
    }
}

/// A parsed proxy request head.
struct Request {
    connect: bool,
    host: String,
    port: u16,
    /// For plain HTTP: the request rewritten to origin form, without proxy headers.
    forward_head: Vec<u8>,
    proxy_auth: Option<String>,
}

impl Request {
    fn parse(head: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(head).ok()?;
        let mut lines = text.split("\r\n");
        let mut first = lines.next()?.split(' ');
        let (method, target, version) = (first.next()?, first.next()?, first.next()?);
        let mut proxy_auth = None;
        let mut kept = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(':')?;
            if name.eq_ignore_ascii_case("proxy-authorization") {
                proxy_auth = Some(value.trim().to_string());
            } else if !name.eq_ignore_ascii_case("proxy-connection")
                && !name.eq_ignore_ascii_case("connection")
            {
                kept.push(line);
            }
        }
        if method == "CONNECT" {
            let (host, port) = split_host_port(target, 443)?;
            return Some(Self {
                connect: true,
                host,
                port,
                forward_head: Vec::new(),
                proxy_auth,
            });
        }
        let rest = target.strip_prefix("http://")?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = split_host_port(authority, 80)?;
        let mut forward = format!("{method} {path} {version}\r\n");
        for l in kept {
            forward.push_str(l);
            forward.push_str("\r\n");
        }
        forward.push_str("Connection: close\r\n\r\n");
        Some(Self {
            connect: false,
            host,
            port,
            forward_head: forward.into_bytes(),
            proxy_auth,
        })
    }

    /// The token from `Proxy-Authorization: Basic base64(task-ID:TOKEN)`.
    fn credential(&self) -> Option<String> {
        let value = self.proxy_auth.as_deref()?;
        let (scheme, b64) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        text.split_once(':').map(|(_, token)| token.to_string())
    }
}

fn split_host_port(authority: &str, default_port: u16) -> Option<(String, u16)> {
    if authority.contains('@') {
        return None; // userinfo in the target is never needed and only confuses checks
    }
    if let Some(rest) = authority.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None if after.is_empty() => default_port,
            None => return None,
        };
        return Some((host.to_string(), port));
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => Some((h.to_string(), p.parse().ok()?)),
        Some(_) => None,
        None => Some((authority.to_string(), default_port)),
    }
    .filter(|(h, _)| !h.is_empty())
}

/// Reads up to the end of the request head; returns the head and any bytes after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> std::io::Result<(Vec<u8>, Vec<u8>)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let n = s.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(end + 4);
            buf.truncate(end);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(std::io::ErrorKind::InvalidData.into());
        }
    }
}

async fn relay<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    mut upstream: TcpStream,
    req: &Request,
    rest: &[u8],
) {
    if req.connect {
        if client
            .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
    } else if upstream.write_all(&req.forward_head).await.is_err() {
        return;
    }
    if !rest.is_empty() && upstream.write_all(rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
