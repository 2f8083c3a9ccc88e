//! Bearer-token sets: loaded from a file (one a line, several for rotation) or given
//! directly, and checked in constant time.

use std::{fmt, path::Path};

use subtle::ConstantTimeEq;

use crate::config::ConfigError;

/// Tokens shorter than this are accepted but logged as weak at start-up.
pub const WEAK_TOKEN_LEN: usize = 16;

/// A set of accepted bearer tokens. Its `Debug` never shows a token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct TokenSet {
    tokens: Vec<Box<[u8]>>,
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TokenSet({} tokens)", self.tokens.len())
    }
}

impl TokenSet {
    /// Builds a set from token values, checking each one's syntax.
    pub fn from_values<S: AsRef<str>>(key: &str, values: &[S]) -> Result<Self, ConfigError> {
        let mut tokens = Vec::with_capacity(values.len());
        for (i, v) in values.iter().enumerate() {
            let v = v.as_ref().trim();
            check_syntax(v)
                .map_err(|why| ConfigError::new(key, format!("token #{} {why}", i + 1)))?;
            tokens.push(v.as_bytes().into());
        }
        if tokens.is_empty() {
            return Err(ConfigError::new(key, "no token given"));
        }
        Ok(Self { tokens })
    }

    /// Parses a token file: one token a line; blank lines and lines starting with `#`
    /// are ignored. An error names the line, never the token.
    pub fn parse_file_text(key: &str, text: &str) -> Result<Self, ConfigError> {
        let mut tokens = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            check_syntax(line)
                .map_err(|why| ConfigError::new(key, format!("line {}: token {why}", n + 1)))?;
            tokens.push(line.as_bytes().into());
        }
        if tokens.is_empty() {
            return Err(ConfigError::new(
                key,
                "the token file holds no token (one token a line; # starts a comment)",
            ));
        }
        Ok(Self { tokens })
    }

    /// Reads and parses a token file.
    pub fn load_file(key: &str, path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError::new(
                key,
                format!("cannot read token file {}: {e}", path.display()),
            )
        })?;
        Self::parse_file_text(key, &text)
    }

    /// True when `presented` equals one of the tokens. Every token is compared, in
    /// constant time for equal lengths, so timing tells neither which token matched nor
    /// how much of one did.
    pub fn verify(&self, presented: &[u8]) -> bool {
        let mut ok = subtle::Choice::from(0);
        for t in &self.tokens {
            ok |= t.as_ref().ct_eq(presented);
        }
        ok.into()
    }

    /// Number of tokens (for logs; never the tokens themselves).
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// True when the set is empty.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many tokens are shorter than [`WEAK_TOKEN_LEN`].
    pub fn weak_count(&self) -> usize {
        self.tokens
            .iter()
            .filter(|t| t.len() < WEAK_TOKEN_LEN)
            .count()
    }
}

/// Tokens must be RFC 6750 `b64token`-like: visible ASCII, no spaces.
fn check_syntax(token: &str) -> Result<(), &'static str> {
    if token.is_empty() {
        return Err("is empty");
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("holds a space or a non-printable or non-ASCII character");
    }
    Ok(())
}

/// Extracts the credential from an `Authorization: Bearer <token>` header value.
///
/// The scheme is case-insensitive; anything else (another scheme, no token, a token with
/// spaces) is `None`.
pub fn parse_bearer(header: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer";
    if header.len() <= SCHEME.len() || !header[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let rest = &header[SCHEME.len()..];
    let start = rest.iter().position(|&b| b != b' ')?;
    if start == 0 {
        return None; // "Bearerxyz"
    }
    let token = &rest[start..];
    let end = token.iter().rposition(|&b| b != b' ').map_or(0, |p| p + 1);
    let token = &token[..end];
    (!token.is_empty() && token.iter().all(|b| b.is_ascii_graphic())).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_with_rotation_and_comments() {
        let s = TokenSet::parse_file_text(
            "f",
            "# old\nold-token-aaaaaaaaaa\n\n  new-token-bbbbbbbbbb  \n",
        )
        .unwrap();
        assert_eq!(s.len(), 2);
        assert!(s.verify(b"old-token-aaaaaaaaaa"));
        assert!(s.verify(b"new-token-bbbbbbbbbb"));
        assert!(!s.verify(b"new-token-bbbbbbbbb"));
        assert!(!s.verify(b""));
    }

    #[test]
    fn errors_name_line_not_token() {
        let e = TokenSet::parse_file_text("--auth-token-file", "good-one\nbad one\n").unwrap_err();
        assert!(e.reason.contains("line 2"), "{e}");
        assert!(!e.reason.contains("bad one"));
        assert!(TokenSet::parse_file_text("f", "# only\n\n").is_err());
    }

    #[test]
    fn debug_hides_tokens() {
        let s = TokenSet::from_values("k", &["s3cr3t-value"]).unwrap();
        assert_eq!(format!("{s:?}"), "TokenSet(1 tokens)");
        assert_eq!(s.weak_count(), 1);
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(parse_bearer(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(parse_bearer(b"bearer   abc  "), Some(&b"abc"[..]));
        assert_eq!(parse_bearer(b"Basic abc"), None);
        assert_eq!(parse_bearer(b"Bearer"), None);
        assert_eq!(parse_bearer(b"Bearer "), None);
        assert_eq!(parse_bearer(b"Bearerabc"), None);
        assert_eq!(parse_bearer(b"Bearer a b"), None);
    }
}
