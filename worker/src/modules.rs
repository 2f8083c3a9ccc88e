//! Task module names and the allow-list (`ALLOWED_TASK_MODULES`).
//!
//! A module is checked twice: at enqueue, so a caller learns at once, and again at claim,
//! so a task written into the database by other means (or before the allow-list was
//! narrowed) is never run.

use std::collections::BTreeSet;

use taskgate_shared::config::ConfigError;

/// Longest module name accepted.
pub const MAX_MODULE_LEN: usize = 128;

/// Why a module was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModuleError {
    /// The name does not follow `segment(.segment)*` with `[A-Za-z_][A-Za-z0-9_]*` segments.
    #[error("module name {name:?} is malformed: {why}")]
    Malformed {
        /// The name (truncated).
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Well-formed but not on the allow-list.
    #[error("module {name:?} is not allowed; add it (or a `prefix.*` pattern) to ALLOWED_TASK_MODULES / --allowed-modules")]
    NotAllowed {
        /// The name.
        name: String,
    },
}

/// Checks the module name syntax: dot-separated identifiers, as Python module paths.
pub fn validate_name(name: &str) -> Result<(), ModuleError> {
    let malformed = |why| ModuleError::Malformed {
        name: name.chars().take(MAX_MODULE_LEN).collect(),
        why,
    };
    if name.is_empty() {
        return Err(malformed("it is empty"));
    }
    if name.len() > MAX_MODULE_LEN {
        return Err(malformed("it is longer than 128 bytes"));
    }
    for seg in name.split('.') {
        let mut chars = seg.chars();
        match chars.next() {
            None => return Err(malformed("it has an empty segment")),
            Some(c) if !(c.is_ascii_alphabetic() || c == '_') => {
                return Err(malformed("each segment must start with a letter or _"))
            }
            _ => {}
        }
        if !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(malformed("only letters, digits, _ and . are allowed"));
        }
    }
    Ok(())
}

/// Exact module names and `prefix.*` patterns. Empty allows nothing (fail closed).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AllowList {
    exact: BTreeSet<String>,
    /// Stored with the trailing dot: `tasks.*` → `tasks.`.
    prefixes: BTreeSet<String>,
}

impl AllowList {
    /// Parses entries (each may hold several, comma-separated). Every bad entry is named.
    pub fn parse<S: AsRef<str>>(key: &str, items: &[S]) -> Result<Self, ConfigError> {
        let mut list = AllowList::default();
        let mut bad = Vec::new();
        for entry in items
            .iter()
            .flat_map(|i| i.as_ref().split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
        {
            if let Some(prefix) = entry.strip_suffix(".*") {
                match validate_name(prefix) {
                    Ok(()) => {
                        list.prefixes.insert(format!("{prefix}."));
                    }
                    Err(e) => bad.push(format!("{entry:?} ({e})")),
                }
            } else if entry.contains('*') {
                bad.push(format!(
                    "{entry:?} (only exact names and `prefix.*` are allowed; there is no allow-all)"
                ));
            } else {
                match validate_name(entry) {
                    Ok(()) => {
                        list.exact.insert(entry.to_string());
                    }
                    Err(e) => bad.push(format!("{entry:?} ({e})")),
                }
            }
        }
        if bad.is_empty() {
            Ok(list)
        } else {
            Err(ConfigError::new(
                key,
                format!("bad entries: {}", bad.join(", ")),
            ))
        }
    }

    /// True when nothing is allowed.
    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }

    /// Checks syntax and membership.
    pub fn check(&self, name: &str) -> Result<(), ModuleError> {
        validate_name(name)?;
        if self.exact.contains(name) || self.prefixes.iter().any(|p| name.starts_with(p.as_str())) {
            Ok(())
        } else {
            Err(ModuleError::NotAllowed {
                name: name.to_string(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for good in ["tasks", "tasks.resize", "_priv.a1_b"] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "tasks.",
            ".x",
            "1abc",
            "a-b",
            "a b",
            "a;rm -rf /",
            "a/b",
            "é",
            "a..b",
        ] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_name(&"a".repeat(129)).is_err());
    }

    #[test]
    fn allow_list() {
        let l = AllowList::parse("k", &["tasks.*, reports.daily", "ops.clean"]).unwrap();
        assert!(l.check("tasks.resize").is_ok());
        assert!(l.check("tasks.a.b").is_ok());
        assert!(matches!(
            l.check("tasks"),
            Err(ModuleError::NotAllowed { .. })
        ));
        assert!(matches!(
            l.check("tasksx.y"),
            Err(ModuleError::NotAllowed { .. })
        ));
        assert!(l.check("reports.daily").is_ok());
        assert!(matches!(
            l.check("reports.weekly"),
            Err(ModuleError::NotAllowed { .. })
        ));
        assert!(matches!(
            l.check("tasks.x;id"),
            Err(ModuleError::Malformed { .. })
        ));
    }

    #[test]
    fn no_allow_all() {
        let e = AllowList::parse("ALLOWED_TASK_MODULES", &["*"]).unwrap_err();
        assert!(e.reason.contains("no allow-all"), "{e}");
        assert!(AllowList::parse("k", &["tasks.*.x", "bad-name"]).is_err());
        assert!(AllowList::parse::<&str>("k", &[]).unwrap().is_empty());
    }
}
