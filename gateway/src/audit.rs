//! The audit log: one JSON line per denied request or connection, on the
//! `taskgate_gateway::audit` target, through the shared (redacting) subscriber.
//!
//! Lines carry the time (the subscriber's `timestamp`), the remote address, the method,
//! the path (truncated to [`MAX_PATH`] bytes; never the query string) and the reason. A
//! token is never logged: neither the header nor anything derived from it is a field.
//! Hosts over their limit are summarised (one line per window with a count) by the
//! caller, using the limiter's verdict, so a flood cannot flood the log.

use std::{cell::RefCell, io::Write, net::SocketAddr};

use taskgate_shared::{redact::redact, telemetry};

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
///
/// This is the one line written per unauthorized request, so under a flood of them its
/// cost is the 401 path's: it is formatted here, in the shape the subscriber's JSON lines
/// have, into a buffer this thread reuses, and handed straight to the log writer's buffer
/// for this thread ([`telemetry::write_json_line`]); the timestamp's date and time are
/// formatted once a second. That took the gateway's CPU per 401 from about 15 us (through
/// `tracing`) to about 12 (nginx, which writes no line: 11-15). The path is the only free
/// text (the method is an HTTP token, the address and reason are ours), so it is what gets
/// redacted. With human-readable logs the line goes through `tracing` as every other.
pub fn denied(remote: Option<SocketAddr>, method: &str, path: &str, reason: Reason) {
    if !tracing::enabled!(target: "taskgate_gateway::audit", tracing::Level::WARN) {
        return;
    }
    let path = redact(truncate_path(path));
    thread_local! {
        static LINE: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(512));
    }
    let written = telemetry::direct_json()
        && LINE.try_with(|line| {
            let mut line = line.borrow_mut();
            line.clear();
            line.extend_from_slice(br#"{"timestamp":""#);
            telemetry::push_json_timestamp(&mut line);
            line.extend_from_slice(br#"","level":"WARN","message":"denied","remote":""#);
            push_addr(&mut line, remote);
            line.extend_from_slice(br#"","method":"#);
            let _ = serde_json::to_writer(&mut *line, method);
            line.extend_from_slice(b",\"path\":");
            let _ = serde_json::to_writer(&mut *line, &*path);
            let _ = writeln!(
                line,
                r#","reason":"{}","target":"taskgate_gateway::audit"}}"#,
                reason.as_str()
            );
            telemetry::write_json_line(&line)
        }) == Ok(true);
    if written {
        return;
    }
    // Human-readable logs, log files, or a writer that has stopped: through tracing.
    tracing::warn!(
        target: "taskgate_gateway::audit",
        remote = %DisplayAddr(remote),
        method,
        path = &*path,
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

/// Appends `remote` as [`DisplayAddr`] writes it. An IPv4 address, the usual case, is
/// written digit group by digit group (`itoa`): through `Display` it was the largest part
/// of the audit line's cost.
fn push_addr(out: &mut Vec<u8>, remote: Option<SocketAddr>) {
    match remote {
        Some(SocketAddr::V4(a)) => {
            let mut digits = itoa::Buffer::new();
            for (i, octet) in a.ip().octets().into_iter().enumerate() {
                if i > 0 {
                    out.push(b'.');
                }
                out.extend_from_slice(digits.format(octet).as_bytes());
            }
            out.push(b':');
            out.extend_from_slice(digits.format(a.port()).as_bytes());
        }
        other => {
            let _ = write!(out, "{}", DisplayAddr(other));
        }
    }
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
    fn addresses_are_written_as_display_writes_them() {
        for a in [
            "0.0.0.0:0",
            "127.0.0.1:443",
            "255.255.255.255:65535",
            "10.20.30.40:8080",
            "[::1]:9443",
            "[2001:db8::1]:1",
        ] {
            let addr: SocketAddr = a.parse().unwrap();
            let mut out = Vec::new();
            push_addr(&mut out, Some(addr));
            assert_eq!(String::from_utf8(out).unwrap(), addr.to_string());
        }
        let mut out = Vec::new();
        push_addr(&mut out, None);
        assert_eq!(out, b"-");
    }

    #[test]
    fn long_paths_are_cut_on_char_boundaries() {
        let p = format!("/{}", "é".repeat(100));
        let t = truncate_path(&p);
        assert!(t.len() <= MAX_PATH && p.starts_with(t));
        assert_eq!(truncate_path("/metrics"), "/metrics");
    }
}
