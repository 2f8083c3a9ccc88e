//! Strict configuration loading shared by both binaries.
//!
//! A typo in a config file must never silently disable a control, so every file is read
//! with `deny_unknown_fields` and the error names the offending key. Values that fail
//! validation are collected into [`ConfigErrors`] so an operator sees every bad key at
//! once instead of fixing them one start-up at a time.

use std::{fmt, path::Path, time::Duration};

use serde::de::DeserializeOwned;

/// Exit code for a configuration the operator has to fix (`EX_USAGE` from sysexits.h).
pub const EX_USAGE: i32 = 64;

/// One rejected configuration key and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct ConfigError {
    /// The flag, env var or TOML key, as the operator wrote it (e.g. `--lease-ttl`).
    pub key: String,
    /// What was wrong and what to do about it.
    pub reason: String,
}

impl ConfigError {
    /// Builds an error for `key`.
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Every configuration error found while building one config.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Records an error and carries on, so later keys are still checked.
    pub fn push(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigError::new(key, reason));
    }

    /// Records the error of `result`, if any, and returns its value.
    pub fn check<T>(&mut self, result: Result<T, ConfigError>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                self.0.push(e);
                None
            }
        }
    }

    /// `Ok(())` when nothing was recorded.
    pub fn into_result(self) -> Result<(), ConfigErrors> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for e in &self.0 {
            if !first {
                f.write_str("; ")?;
            }
            first = false;
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl From<ConfigError> for ConfigErrors {
    fn from(e: ConfigError) -> Self {
        Self(vec![e])
    }
}

/// Reads and parses a TOML file into `T` (which should use `deny_unknown_fields`).
///
/// The error names the file and, through `toml`, the key and line that were rejected.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let key = format!("--config {}", path.display());
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(&key, format!("cannot read the file: {e}")))?;
    parse_toml(&key, &text)
}

/// Parses TOML text into `T`; `key` names the source in the error.
pub fn parse_toml<T: DeserializeOwned>(key: &str, text: &str) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        // toml's message already names the unknown or mistyped key and its line; keep it
        // on one line so the start-up error stays one line.
        let msg = e.to_string().replace('\n', " ").replace("  ", " ");
        ConfigError::new(key, msg.trim().to_string())
    })
}

/// Parses a human duration such as `30s`, `15m` or `1h 30m` for `key`.
pub fn parse_duration(key: &str, value: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(value.trim()).map_err(|e| {
        ConfigError::new(
            key,
            format!("{value:?} is not a duration ({e}); write e.g. 30s, 15m or 1h"),
        )
    })
}

/// Reads a secret from a file: the whole file, trailing newline removed.
///
/// An empty file is an error, since an empty secret would disable the control it guards.
pub fn read_secret_file(key: &str, path: &Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigError::new(
            key,
            format!("cannot read secret file {}: {e}", path.display()),
        )
    })?;
    let value = text.trim_end_matches(['\n', '\r']).to_string();
    if value.trim().is_empty() {
        return Err(ConfigError::new(
            key,
            format!("secret file {} is empty", path.display()),
        ));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Sample {
        listen: String,
    }

    #[test]
    fn unknown_key_is_named() {
        let err =
            parse_toml::<Sample>("--config x.toml", "listen = \"a\"\nlisen = \"b\"\n").unwrap_err();
        assert!(err.reason.contains("lisen"), "{err}");
        assert!(!err.reason.contains('\n'));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("k", "30s").unwrap(), Duration::from_secs(30));
        assert_eq!(
            parse_duration("k", "15m").unwrap(),
            Duration::from_secs(900)
        );
        let e = parse_duration("--lease-ttl", "soon").unwrap_err();
        assert_eq!(e.key, "--lease-ttl");
    }

    #[test]
    fn errors_are_collected() {
        let mut errs = ConfigErrors::default();
        errs.push("a", "bad");
        errs.push("b", "worse");
        let s = errs.clone().into_result().unwrap_err().to_string();
        assert_eq!(s, "a: bad; b: worse");
    }
}
