//! The HTTP side: one [`ProxyHttp`] impl whose methods appear in the order pingora calls
//! them. Each check returns early with its status; denials are written here, with a small
//! fixed body, and keep the connection alive (401, 404) unless the host is over its limit
//! (429 closes). Writing the answer ourselves matters: pingora's `respond_error` closes
//! the connection, so every rejected request would cost the client a new TLS handshake.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::header;
use pingora::{
    http::{RequestHeader, ResponseHeader},
    proxy::{ProxyHttp, Session},
    upstreams::peer::HttpPeer,
    Error, ErrorSource, Result,
};
use taskgate_shared::{
    listen::Addr,
    tokens::{parse_bearer, TokenSet},
};

use crate::{
    audit::{self, Reason},
    config::{Config, GATEWAY_METRICS_PATH},
    limiter::{host_key, Limiter},
    metrics::Metrics,
};

/// Why the gateway could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The upstream address is unusable.
    #[error("--upstream {addr}: {reason}")]
    Upstream {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
    /// A fixed response could not be built (a bug).
    #[error("building fixed responses: {0}")]
    Response(String),
}

/// Denial responses, built once.
struct Fixed {
    unauthorized: ResponseHeader,
    not_found: ResponseHeader,
    too_many: ResponseHeader,
}

const BODY_401: &[u8] = b"unauthorized\n";
const BODY_404: &[u8] = b"not found\n";
const BODY_429: &[u8] = b"too many unauthorized requests\n";

fn fixed(
    status: u16,
    body: &[u8],
    close: bool,
    extra: Option<(&'static str, &'static str)>,
) -> Result<ResponseHeader> {
    let mut h = ResponseHeader::build(status, Some(6))?;
    h.insert_header(header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
    // A denial is never cached by a shared cache nor sniffed into another type
    // (testssl rates a response without any of these headers MEDIUM; tests/tls/scan).
    h.insert_header(header::CACHE_CONTROL, "no-store")?;
    h.insert_header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")?;
    if close {
        h.insert_header(header::CONNECTION, "close")?;
    }
    if let Some((k, v)) = extra {
        h.insert_header(k, v)?;
    }
    Ok(h)
}

/// The tokens in force, swapped on reload; `None` is `--no-auth`.
pub type Tokens = Option<Arc<ArcSwap<TokenSet>>>;

/// State shared by every request.
pub struct Gateway {
    tokens: Tokens,
    allow_paths: Vec<String>,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    peer: HttpPeer,
    idle_secs: u64,
    fixed: Fixed,
}

/// What one request has met so far.
#[derive(Debug, Default)]
pub struct Ctx {
    /// Set when the request was proxied.
    proxied: bool,
}

impl Gateway {
    /// Builds the proxy from the configuration and the shared pieces.
    pub fn new(
        cfg: &Config,
        tokens: Tokens,
        limiter: Arc<Limiter>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, ProxyError> {
        let up_err = |reason: String| ProxyError::Upstream {
            addr: cfg.upstream.to_string(),
            reason,
        };
        let mut peer = match &cfg.upstream {
            Addr::Unix(path) => HttpPeer::new_uds(&path.to_string_lossy(), false, String::new())
                .map_err(|e| up_err(e.to_string()))?,
            Addr::Tcp(sa) => HttpPeer::new(*sa, false, String::new()),
        };
        peer.options.connection_timeout = Some(cfg.upstream_connect_timeout);
        peer.options.total_connection_timeout = Some(cfg.upstream_connect_timeout);
        peer.options.read_timeout = Some(cfg.upstream_read_timeout);
        peer.options.write_timeout = Some(cfg.upstream_read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        let mk = |r: Result<ResponseHeader>| r.map_err(|e| ProxyError::Response(e.to_string()));
        Ok(Gateway {
            tokens,
            allow_paths: cfg.allow_paths.clone(),
            limiter,
            metrics,
            peer,
            idle_secs: cfg.idle_timeout.as_secs().max(1),
            fixed: Fixed {
                unauthorized: mk(fixed(
                    401,
                    BODY_401,
                    false,
                    Some(("www-authenticate", "Bearer")),
                ))?,
                not_found: mk(fixed(404, BODY_404, false, None))?,
                too_many: mk(fixed(429, BODY_429, true, None))?,
            },
        })
    }

    async fn answer(&self, session: &mut Session, status: u16) -> Result<bool> {
        let (head, body) = match status {
            401 => (&self.fixed.unauthorized, BODY_401),
            404 => (&self.fixed.not_found, BODY_404),
            _ => {
                // Over the limit: close, so the client pays for a new handshake.
                session.set_keepalive(None);
                (&self.fixed.too_many, BODY_429)
            }
        };
        session.write_response_header_ref(head, false).await?;
        session
            .write_response_body(Some(Bytes::from_static(body)), true)
            .await?;
        Ok(true)
    }

    /// A request from a host over its limit, or one that just went over.
    async fn rate_limited(
        &self,
        session: &mut Session,
        remote: Option<SocketAddr>,
        summary: Option<u32>,
    ) -> Result<bool> {
        self.metrics.deny(Reason::RateLimited);
        if let Some(count) = summary {
            let req = session.req_header();
            let host = remote.map(|a| a.ip().to_string()).unwrap_or_default();
            audit::rate_limited_summary(
                remote,
                &host,
                req.method.as_str(),
                req.uri.path(),
                count,
                self.limiter.window().as_secs(),
            );
        }
        self.answer(session, 429).await
    }

    async fn serve_own_metrics(&self, session: &mut Session) -> Result<bool> {
        let body = self
            .metrics
            .render(self.limiter.len(), self.limiter.capacity());
        let mut h = ResponseHeader::build(200, Some(2))?;
        h.insert_header(header::CONTENT_TYPE, "text/plain; version=0.0.4")?;
        h.insert_header(header::CONTENT_LENGTH, body.len().to_string())?;
        session.write_response_header(Box::new(h), false).await?;
        session
            .write_response_body(Some(Bytes::from(body)), true)
            .await?;
        self.metrics.served.inc();
        Ok(true)
    }
}

fn remote_addr(session: &Session) -> Option<SocketAddr> {
    session.client_addr().and_then(|a| a.as_inet()).copied()
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx::default()
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut Ctx) -> Result<bool> {
        // The downstream idle keep-alive bound, applied to the wait for the next request.
        session.set_keepalive(Some(self.idle_secs));
        let remote = remote_addr(session);
        let key = remote.map(|a| host_key(a.ip()));
        let now = self.limiter.now();

        // A host over its limit gets 429 for everything until its bucket refills.
        if let Some(k) = key {
            if let Some(summary) = self.limiter.penalty(k, now) {
                return self.rate_limited(session, remote, summary).await;
            }
        }

        let req = session.req_header();
        let path = req.uri.path();
        let own_metrics = path == GATEWAY_METRICS_PATH;
        if !own_metrics && !self.allow_paths.iter().any(|p| p == path) {
            self.metrics.deny(Reason::Path);
            audit::denied(remote, req.method.as_str(), path, Reason::Path);
            return self.answer(session, 404).await;
        }

        if let Some(tokens) = &self.tokens {
            let presented = req
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| parse_bearer(v.as_bytes()));
            let failure = match presented {
                None => Some(Reason::NoToken),
                Some(t) if !tokens.load().verify(t) => Some(Reason::BadToken),
                Some(_) => None,
            };
            if let Some(reason) = failure {
                let verdict = match key {
                    Some(k) => self.limiter.hit(k, now),
                    // No peer address (a Unix listener): nothing to key on; never limit.
                    None => crate::limiter::Verdict {
                        allowed: true,
                        summary: None,
                        evicted: false,
                        overflow: false,
                    },
                };
                if verdict.evicted {
                    self.metrics.evictions.inc();
                }
                if verdict.overflow {
                    self.metrics.overflow_hits.inc();
                }
                if !verdict.allowed {
                    return self.rate_limited(session, remote, verdict.summary).await;
                }
                self.metrics.deny(reason);
                let req = session.req_header();
                audit::denied(remote, req.method.as_str(), req.uri.path(), reason);
                return self.answer(session, 401).await;
            }
        }

        if own_metrics {
            return self.serve_own_metrics(session).await;
        }
        Ok(false)
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        ctx.proxied = true;
        Ok(Box::new(self.peer.clone()))
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        upstream_request: &mut RequestHeader,
        _ctx: &mut Ctx,
    ) -> Result<()> {
        // The worker has no authentication of its own and must never see a credential.
        upstream_request.remove_header(&header::AUTHORIZATION);
        upstream_request.remove_header(&header::PROXY_AUTHORIZATION);
        Ok(())
    }

    async fn logging(&self, _session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        if !ctx.proxied {
            return;
        }
        match e {
            Some(err) if err.esource() == &ErrorSource::Upstream => {
                self.metrics.upstream_errors.inc();
                tracing::warn!(error = %err, "upstream request failed");
            }
            _ => self.metrics.proxied.inc(),
        }
    }
}
