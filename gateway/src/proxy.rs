//! The HTTP side: [`Gateway::handle`] runs the checks in the order a request meets them,
//! each returning early with its status, then proxies what is left to the worker.
//!
//! 1. a host over its limit of unauthorized hits: 429, and the connection closes;
//! 2. a path outside the allow-list: 404, the upstream is never called;
//! 3. no bearer token or a wrong one: 401 (the hit is charged to the host's bucket);
//! 4. the gateway's own metrics, answered here;
//! 5. everything else goes to the worker without its `Authorization` header.
//!
//! Denials keep the connection alive (401, 404) so a client that got its token wrong
//! does not pay a new TLS handshake per request; only a host over its limit is cut off.

use std::{
    net::SocketAddr,
    sync::{Arc, LazyLock},
};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{
    header::{self, HeaderMap, HeaderName, HeaderValue},
    Request, Response, StatusCode, Version,
};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use taskgate_shared::tokens::{parse_bearer, TokenSet};

use crate::{
    audit::{self, Reason},
    config::{Config, GATEWAY_METRICS_PATH},
    limiter::{host_key, Limiter, Verdict},
    metrics::Metrics,
    upstream::{PooledBody, Upstream},
};

/// A response body: the worker's, streamed, or one of ours.
pub type Body = Either<PooledBody, Full<Bytes>>;

/// The tokens in force, swapped on reload; `None` is `--no-auth`.
pub type Tokens = Option<Arc<ArcSwap<TokenSet>>>;

const BODY_401: &[u8] = b"unauthorized\n";
const BODY_404: &[u8] = b"not found\n";
const BODY_429: &[u8] = b"too many unauthorized requests\n";
const BODY_502: &[u8] = b"bad gateway: the worker could not be reached\n";
const BODY_504: &[u8] = b"gateway timeout: the worker did not answer in time\n";

/// Headers that describe one hop, never forwarded in either direction (RFC 9110 7.6.1).
const HOP_BY_HOP: [HeaderName; 6] = [
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
];

/// Removes the hop-by-hop headers, those that `Connection` names, and `also`.
///
/// Most messages carry none of them but `Connection`, so the names are looked for in one
/// pass over the message's headers before any is removed; removing each listed name in
/// turn hashed a dozen names per message and was 5% of an authorized request's
/// instructions (callgrind).
fn strip_hop_by_hop(headers: &mut HeaderMap, also: &[HeaderName]) {
    // Every `Connection` line counts, not only the first.
    let mut connection: Vec<HeaderValue> = Vec::new();
    if let header::Entry::Occupied(e) = headers.entry(header::CONNECTION) {
        connection.extend(e.remove_entry_mult().1);
    }
    // A value that is not text names nothing we could match; the header itself is gone
    // either way.
    let named: Vec<&str> = connection
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let doomed = |name: &HeaderName| {
        HOP_BY_HOP.contains(name)
            || also.contains(name)
            || named.iter().any(|t| t.eq_ignore_ascii_case(name.as_str()))
    };
    if !headers.keys().any(doomed) {
        return;
    }
    let names: Vec<HeaderName> = headers.keys().filter(|n| doomed(n)).cloned().collect();
    for name in names {
        headers.remove(name);
    }
}

/// State shared by every request on every event loop.
pub struct Gateway {
    tokens: Tokens,
    allow_paths: Vec<String>,
    limiter: Arc<Limiter>,
    metrics: Arc<Metrics>,
    upstream: Upstream,
}

impl Gateway {
    /// Builds the request handler from the configuration and the shared pieces.
    pub fn new(cfg: &Config, tokens: Tokens, limiter: Arc<Limiter>, metrics: Arc<Metrics>) -> Self {
        Gateway {
            tokens,
            allow_paths: cfg.allow_paths.clone(),
            limiter,
            metrics,
            upstream: Upstream::new(
                &cfg.upstream,
                cfg.upstream_connect_timeout,
                cfg.upstream_read_timeout,
            ),
        }
    }

    /// The metrics the gateway counts into.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Answers one request from `remote` (`None` on a Unix listener).
    pub async fn handle(
        &self,
        remote: Option<SocketAddr>,
        mut req: Request<Incoming>,
    ) -> Response<Body> {
        let key = remote.map(|a| host_key(a.ip()));
        let now = self.limiter.now();

        // 1. A host over its limit gets 429 for everything until its bucket refills.
        if let Some(k) = key {
            if let Some(summary) = self.limiter.penalty(k, now) {
                return self.rate_limited(remote, &req, summary);
            }
        }

        // 2. The path allow-list.
        let path = req.uri().path();
        let own_metrics = path == GATEWAY_METRICS_PATH;
        if !own_metrics && !self.allow_paths.iter().any(|p| p == path) {
            self.metrics.deny(Reason::Path);
            audit::denied(remote, req.method().as_str(), path, Reason::Path);
            return fixed(StatusCode::NOT_FOUND, BODY_404, false);
        }

        // 3. The bearer token, compared in constant time.
        if let Some(tokens) = &self.tokens {
            let presented = req
                .headers()
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
                    None => Verdict {
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
                    return self.rate_limited(remote, &req, verdict.summary);
                }
                self.metrics.deny(reason);
                audit::denied(remote, req.method().as_str(), req.uri().path(), reason);
                return fixed(StatusCode::UNAUTHORIZED, BODY_401, false);
            }
        }

        // 4. The gateway's own metrics.
        if own_metrics {
            return self.own_metrics();
        }

        // 5. Proxy. The worker has no authentication of its own and must never see a
        // credential; hop-by-hop headers stay on this hop.
        strip_hop_by_hop(
            req.headers_mut(),
            &[header::AUTHORIZATION, header::PROXY_AUTHORIZATION],
        );
        // The upstream connection is kept alive whatever the client speaks.
        *req.version_mut() = Version::HTTP_11;
        if req.uri().authority().is_some() {
            // An absolute-form target goes upstream in origin form.
            if let Some(pq) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = pq.into();
            }
        }
        match self.upstream.send(req).await {
            Ok(resp) => {
                self.metrics.proxied.inc();
                let mut resp = resp.map(Either::Left);
                strip_hop_by_hop(resp.headers_mut(), &[]);
                resp
            }
            Err(e) => {
                self.metrics.upstream_errors.inc();
                tracing::warn!(error = %e, "upstream request failed");
                match e.status() {
                    504 => fixed(StatusCode::GATEWAY_TIMEOUT, BODY_504, false),
                    _ => fixed(StatusCode::BAD_GATEWAY, BODY_502, false),
                }
            }
        }
    }

    /// A request from a host over its limit, or one that just went over. `summary` is
    /// the count to log once per window.
    fn rate_limited(
        &self,
        remote: Option<SocketAddr>,
        req: &Request<Incoming>,
        summary: Option<u32>,
    ) -> Response<Body> {
        self.metrics.deny(Reason::RateLimited);
        if let Some(count) = summary {
            let host = remote.map(|a| a.ip().to_string()).unwrap_or_default();
            audit::rate_limited_summary(
                remote,
                &host,
                req.method().as_str(),
                req.uri().path(),
                count,
                self.limiter.window().as_secs(),
            );
        }
        // Over the limit: close, so the client pays for a new handshake.
        fixed(StatusCode::TOO_MANY_REQUESTS, BODY_429, true)
    }

    fn own_metrics(&self) -> Response<Body> {
        let body = self
            .metrics
            .render(self.limiter.len(), self.limiter.capacity());
        self.metrics.served.inc();
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body))));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        resp
    }
}

/// The headers of a response of ours, built once: a denial is never cached by a shared
/// cache nor sniffed into another type (testssl rates a response without these MEDIUM),
/// and a 401 names the scheme. Cloning them costs a third of inserting them one by one,
/// which showed in the 401 path's profile.
static FIXED_HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| {
    let mut h = HeaderMap::with_capacity(5);
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h
});
static UNAUTHORIZED_HEADERS: LazyLock<HeaderMap> = LazyLock::new(|| {
    let mut h = FIXED_HEADERS.clone();
    h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    h
});

/// A response of ours with a small fixed body and [`FIXED_HEADERS`].
fn fixed(status: StatusCode, body: &'static [u8], close: bool) -> Response<Body> {
    let mut resp = Response::new(Either::Right(Full::new(Bytes::from_static(body))));
    *resp.status_mut() = status;
    *resp.headers_mut() = if status == StatusCode::UNAUTHORIZED {
        UNAUTHORIZED_HEADERS.clone()
    } else {
        FIXED_HEADERS.clone()
    };
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut n: Vec<String> = h.keys().map(|k| k.as_str().to_string()).collect();
        n.sort();
        n
    }

    #[test]
    fn hop_by_hop_named_and_extra_headers_are_removed_with_every_value() {
        let mut h = map(&[
            ("host", "a"),
            ("connection", "keep-alive, X-One"),
            ("connection", " x-two ,close"),
            ("x-one", "1"),
            ("x-one", "1b"),
            ("x-two", "2"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("authorization", "Bearer t"),
            ("proxy-authorization", "Basic u"),
            ("accept", "*/*"),
        ]);
        strip_hop_by_hop(
            &mut h,
            &[header::AUTHORIZATION, header::PROXY_AUTHORIZATION],
        );
        assert_eq!(names(&h), ["accept", "host"]);
    }

    #[test]
    fn a_message_without_hop_by_hop_headers_keeps_every_header() {
        let pairs = [
            ("server", "nginx"),
            ("content-type", "text/plain"),
            ("content-length", "2048"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ];
        let mut h = map(&pairs);
        strip_hop_by_hop(&mut h, &[]);
        assert_eq!(h, map(&pairs));
        // `Connection` itself always goes, even when it names nothing present.
        let mut h = map(&[("connection", "keep-alive"), ("server", "nginx")]);
        strip_hop_by_hop(&mut h, &[]);
        assert_eq!(names(&h), ["server"]);
    }
}
