//! The audit log: one JSON line per denied request or connection, on the
//! `taskgate_gateway::audit` target, through the shared (redacting) subscriber.
//!
//! Lines carry the time (the subscriber's `timestamp`), the remote address, the method,
//! the path (truncated to [`MAX_PATH`] bytes; never the query string) and the reason. A
//! token is never logged: neither the header nor anything derived from it is a field.
//! Hosts over their limit are summarised (one line per window with a count) by the
//! caller, using the limiter's verdict, so a flood cannot flood the log.

use std::net::SocketAddr;

/// Paths longer than this are cut in audit lines.
pub const MAX_PATH: usize = 128;

/// Why a request or connection was denied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Source address outside the CIDR allow-list (connection dropped before TLS).
    Cidr,
    /// TLS handshake failed (no client certificate, wrong CA, SAN not allowed, …).
    Tls,
    /// No bearer token.
    NoToken,
    /// A bearer token that matches none of the configured ones.
    BadToken,
    /// A path outside the allow-list.
    Path,
    /// The host is over its limit of unauthorized hits.
    RateLimited,
}

impl Reason {
    /// The reason as written in audit lines and metric labels.
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Cidr => "cidr",
            Reason::Tls => "tls",
            Reason::NoToken => "no_token",
            Reason::BadToken => "bad_token",
            Reason::Path => "path",
            Reason::RateLimited => "rate_limited",
        }
    }

    /// Every reason, for pre-registering metrics.
    pub const ALL: [Reason; 6] = [
        Reason::Cidr,
        Reason::Tls,
        Reason::NoToken,
        Reason::BadToken,
        Reason::Path,
        Reason::RateLimited,
    ];
}

/// Cuts `path` to at most [`MAX_PATH`] bytes on a character boundary.
pub fn truncate_path(path: &str) -> &str {
    if path.len() <= MAX_PATH {
        return path;
    }
    let mut end = MAX_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

/// Logs one denied request.
pub fn denied(remote: Option<SocketAddr>, method: &str, path: &str, reason: Reason) {
    tracing::warn!(
        target: "taskgate_gateway::audit",
        remote = %DisplayAddr(remote),
        method,
        path = truncate_path(path),
        reason = reason.as_str(),
        "denied"
    );
}

/// Logs a denied connection (no HTTP request was read).
pub fn denied_connection(remote: &str, reason: Reason, detail: &str) {
    tracing::warn!(
        target: "taskgate_gateway::audit",
        remote,
        method = "-",
        path = "-",
        reason = reason.as_str(),
        detail,
        "denied"
    );
}

/// Logs the summary line of a host over its limit: `count` denials since the last one.
pub fn rate_limited_summary(
    remote: Option<SocketAddr>,
    host: &str,
    method: &str,
    path: &str,
    count: u32,
    window_secs: u64,
) {
    tracing::warn!(
        target: "taskgate_gateway::audit",
        remote = %DisplayAddr(remote),
        host,
        method,
        path = truncate_path(path),
        reason = Reason::RateLimited.as_str(),
        denied = count,
        window_secs,
        "denied"
    );
}

struct DisplayAddr(Option<SocketAddr>);

impl std::fmt::Display for DisplayAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_paths_are_cut_on_char_boundaries() {
        let p = format!("/{}", "é".repeat(100));
        let t = truncate_path(&p);
        assert!(t.len() <= MAX_PATH && p.starts_with(t));
        assert_eq!(truncate_path("/metrics"), "/metrics");
    }
}
