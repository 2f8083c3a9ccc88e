//! The one redactor every log line, stored task error and captured executor output
//! passes through.
//!
//! It replaces the *values* of secret-like keys (`password`, `passwd`, `secret`, `token`,
//! `api_key`, `apikey`, `authorization`, `cookie`, `private_key`, `credential`, matched
//! case-insensitively anywhere in a key name) with [`REDACTED`], in the forms that show up
//! in practice: `key=value`, `key: value`, JSON (`"key": "value"`, also nested objects and
//! JSON that was itself escaped into a JSON log line), Rust `Debug` output and HTTP headers
//! (`Authorization: Bearer …`). A bare `Bearer …` credential is redacted too.
//!
//! When the end of a quoted value cannot be found the rest of the line is redacted:
//! over-redacting a log line is a nuisance, under-redacting it is an incident.

use std::{borrow::Cow, sync::LazyLock};

use regex::Regex;

/// What a secret value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Fragments that make a key secret-like, lower case.
const SECRET_WORDS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "api-key",
    "apikey",
    "authorization",
    "cookie",
    "private_key",
    "private-key",
    "privatekey",
    "credential",
];

/// A secret-like key followed by a `=` or `:` separator, or a bare auth scheme.
static KEY_AND_SEPARATOR: LazyLock<Regex> = LazyLock::new(|| {
    let words =
        "password|passwd|secret|token|api[_-]?key|authorization|cookie|private[_-]?key|credential";
    let pattern = format!(
        r#"(?i)(?:[A-Za-z0-9_.\-]*(?:{words})[A-Za-z0-9_.\-]*(?:\\*["'])?\s*[:=]\s*|\b(?:bearer|basic)\s+)"#
    );
    // The pattern is a constant; a failure here is a bug caught by every test.
    Regex::new(&pattern).expect("redaction pattern compiles")
});

/// True when a key name (a log field, a TOML key, a header name) is secret-like.
pub fn is_secret_key(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    SECRET_WORDS.iter().any(|w| lower.contains(w))
}

/// Returns `text` with every secret-like value replaced by [`REDACTED`].
///
/// Every key is looked for, including keys inside a value already found: a value that
/// swallowed the next key (`token= password: hunter2`, or a quote that closes early as
/// in `key: " password: "hunter2"`) must not hide that key's value. Overlapping and
/// touching values are merged into one [`REDACTED`].
///
/// Borrows when there is nothing to redact, so the common case costs one regex scan, or
/// one byte scan for text that cannot match (see [`cannot_match`]).
pub fn redact(text: &str) -> Cow<'_, str> {
    if cannot_match(text) {
        return Cow::Borrowed(text);
    }
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let Some(m) = KEY_AND_SEPARATOR.find_at(text, pos) else {
            break;
        };
        if let Some(range) = scan_value(text, m.end()) {
            ranges.push(range);
        }
        pos = m.end();
    }
    if ranges.is_empty() {
        return Cow::Borrowed(text);
    }
    ranges.sort_unstable();
    let mut out = String::with_capacity(text.len());
    let mut copied_to = 0;
    let mut i = 0;
    while i < ranges.len() {
        let (start, mut end) = ranges[i];
        i += 1;
        while i < ranges.len() && ranges[i].0 <= end {
            end = end.max(ranges[i].1);
            i += 1;
        }
        out.push_str(&text[copied_to..start]);
        out.push_str(REDACTED);
        copied_to = end;
    }
    out.push_str(&text[copied_to..]);
    Cow::Owned(out)
}

/// Finds the secret value starting at `start`.
///
/// Returns the byte range to replace (a closing quote is kept outside it), or `None` when
/// there is no value (e.g. `token=` at end of line).
fn scan_value(text: &str, start: usize) -> Option<(usize, usize)> {
    let bytes = text.as_bytes();
    let mut i = start;
    // An HTTP auth scheme stays visible; the credential after it does not.
    for scheme in ["bearer ", "basic ", "token ", "digest "] {
        if bytes.len() >= i + scheme.len()
            && bytes[i..i + scheme.len()].eq_ignore_ascii_case(scheme.as_bytes())
        {
            i += scheme.len();
            while i < bytes.len() && bytes[i] == b' ' {
                i += 1;
            }
            break;
        }
    }
    // Quoted value, possibly escaped `level` times (JSON inside a JSON log line).
    let mut level = 0;
    while i + level < bytes.len() && bytes[i + level] == b'\\' {
        level += 1;
    }
    if i + level < bytes.len() && (bytes[i + level] == b'"' || bytes[i + level] == b'\'') {
        let quote = bytes[i + level];
        let inner_start = i + level + 1;
        return Some(match find_closing_quote(bytes, inner_start, quote, level) {
            Some(close_backslashes_at) => (inner_start, close_backslashes_at),
            None => (inner_start, line_end(bytes, inner_start)),
        });
    }
    if level > 0 {
        // Backslashes not followed by a quote: treat as an unquoted value.
        i = start;
    }
    if i < bytes.len() && (bytes[i] == b'{' || bytes[i] == b'[') {
        let end = matching_bracket(bytes, i).unwrap_or_else(|| line_end(bytes, i));
        return Some((i, end));
    }
    let end = bytes[i..]
        .iter()
        .position(|b| b.is_ascii_whitespace() || b",;&\"'\\}])<>".contains(b))
        .map_or(bytes.len(), |p| i + p);
    (end > i).then_some((i, end))
}

/// Finds the closing quote of a value quoted at escape `level`, returning the index of the
/// first backslash (or the quote itself) that closes it.
///
/// At level 0 a quote closes when preceded by an even number of backslashes; at level 1
/// (the value's own quotes are `\"`) by 1, 5, 9… backslashes; in general `k` backslashes
/// close when `k mod 2^(level+1) == 2^level - 1`.
fn find_closing_quote(bytes: &[u8], from: usize, quote: u8, level: usize) -> Option<usize> {
    let level = level.min(6);
    let modulus = 1usize << (level + 1);
    let want = (1usize << level) - 1;
    let mut i = from;
    while i < bytes.len() {
        if bytes[i] == b'\n' {
            return None;
        }
        if bytes[i] == quote {
            let mut k = 0;
            while i > from + k && bytes[i - 1 - k] == b'\\' {
                k += 1;
            }
            if k % modulus == want {
                return Some(i - k);
            }
        }
        i += 1;
    }
    None
}

/// Index just past the bracket that closes the one at `open`, ignoring brackets in strings.
fn matching_bracket(bytes: &[u8], open: usize) -> Option<usize> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut i = open;
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            if b == b'\\' {
                i += 1;
            } else if b == b'"' {
                in_string = false;
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => depth += 1,
                b'}' | b']' => {
                    depth -= 1;
                    if depth == 0 {
                        return Some(i + 1);
                    }
                }
                b'\n' => return None,
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// True when [`KEY_AND_SEPARATOR`] cannot match `text`: a secret-like key needs a `:` or
/// `=` after it, and `bearer`/`basic` need whitespace after them (`\s`: ASCII whitespace,
/// including vertical tab, or a non-ASCII character). A request path has none of these,
/// so the gateway's audit line for a flood of 401s skips the regex.
fn cannot_match(text: &str) -> bool {
    !text
        .bytes()
        .any(|b| matches!(b, b':' | b'=' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r' | b' ') || b >= 0x80)
}

fn line_end(bytes: &[u8], from: usize) -> usize {
    bytes[from..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |p| from + p)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(s: &str) -> String {
        redact(s).into_owned()
    }

    #[test]
    fn key_value_forms() {
        assert_eq!(
            r("user=bob password=hunter2 x=1"),
            "user=bob password=[REDACTED] x=1"
        );
        assert_eq!(r("PASSWD: hunter2"), "PASSWD: [REDACTED]");
        assert_eq!(r("db_password=abc&next=1"), "db_password=[REDACTED]&next=1");
        assert_eq!(r("X-Api-Key: k123"), "X-Api-Key: [REDACTED]");
        assert_eq!(r("apikey=k1,other=2"), "apikey=[REDACTED],other=2");
    }

    #[test]
    fn json_forms() {
        assert_eq!(
            r(r#"{"api_key": "sk-123", "n": 1}"#),
            r#"{"api_key": "[REDACTED]", "n": 1}"#
        );
        assert_eq!(
            r(r#"{"token":"a\"b","x":2}"#),
            r#"{"token":"[REDACTED]","x":2}"#
        );
        assert_eq!(
            r(r#"{"credentials": {"user": "a", "pw": "b"}, "ok": true}"#),
            r#"{"credentials": [REDACTED], "ok": true}"#
        );
        assert_eq!(r(r#"{"secret": 12345}"#), r#"{"secret": [REDACTED]}"#);
    }

    #[test]
    fn json_escaped_inside_json_log_line() {
        let inner = r#"{"api_key": "sk-canary", "password": "p\"w"}"#;
        let line = serde_json::json!({ "message": inner }).to_string();
        let out = r(&line);
        assert!(!out.contains("sk-canary"), "{out}");
        assert!(!out.contains("p\\\\\\\"w"), "{out}");
        assert!(!out.contains("canary"), "{out}");
        // Still valid JSON after redaction.
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert!(v["message"].as_str().unwrap().contains(REDACTED));
    }

    #[test]
    fn http_headers_and_bearer() {
        assert_eq!(
            r("Authorization: Bearer abc.def"),
            "Authorization: Bearer [REDACTED]"
        );
        assert_eq!(
            r("curl -H 'bearer xyz' url"),
            "curl -H 'bearer [REDACTED]' url"
        );
        assert_eq!(r("Cookie: sid=abc"), "Cookie: [REDACTED]");
    }

    #[test]
    fn debug_output() {
        assert_eq!(
            r(r#"Config { auth_token: "t0k", listen: "x" }"#),
            r#"Config { auth_token: "[REDACTED]", listen: "x" }"#
        );
    }

    #[test]
    fn unterminated_quote_redacts_rest_of_line() {
        assert_eq!(r("password=\"abc def\nnext"), "password=\"[REDACTED]\nnext");
    }

    #[test]
    fn a_value_that_swallowed_the_next_key_does_not_hide_its_value() {
        // Found by the `redact` fuzz target (tests/fuzz, fuzz/corpus/redact).
        assert_eq!(
            r("token= password: hunter2 x=1"),
            "token= [REDACTED] [REDACTED] x=1"
        );
        let out = r(r#"api_key: " privatekey: "hunter2"" n=1"#);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.ends_with(" n=1"), "{out}");
    }

    #[test]
    fn the_byte_prefilter_never_skips_a_match() {
        // Every text the pre-filter lets through unscanned must be one the regex does not
        // match: secret words and auth schemes next to every kind of byte.
        let pieces = [
            "token", "password", "Bearer", "basic", "API-KEY", "/metrics", "x", "%3D", "%20",
            "\u{a0}", "\u{2003}", "é", "\x0b", "\x0c", "\t", "\r", "\n", " ", "=", ":", "?", "&",
            "\"", "'", "\\", "-", "_", ".",
        ];
        let mut checked = 0;
        for a in pieces {
            for b in pieces {
                for c in pieces {
                    let text = format!("{a}{b}{c}");
                    if cannot_match(&text) {
                        assert!(!KEY_AND_SEPARATOR.is_match(&text), "{text:?}");
                        checked += 1;
                    }
                }
            }
        }
        assert!(
            checked > 1000,
            "the pre-filter let only {checked} texts through"
        );
        assert!(cannot_match("/metrics/token/bearer"));
        assert!(!cannot_match("/metrics?token=abc"));
        assert!(!cannot_match("Bearer\u{a0}abc"));
    }

    #[test]
    fn nothing_to_redact_borrows() {
        assert!(matches!(
            redact("task 5 succeeded in 3ms"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(redact("token="), Cow::Borrowed(_)));
    }

    #[test]
    fn secret_keys() {
        assert!(is_secret_key("METRICS_AUTH_TOKEN"));
        assert!(is_secret_key("Private-Key"));
        assert!(!is_secret_key("module"));
    }
}
