//! Listen and upstream addresses: `unix:/path` or `IP:PORT` (`[v6]:PORT`).

use std::{fmt, net::SocketAddr, path::PathBuf, str::FromStr};

use crate::config::ConfigError;

/// Where a server listens or where an upstream is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// A Unix domain socket path (`unix:/run/worker.sock`).
    Unix(PathBuf),
    /// A TCP address (`127.0.0.1:9100`, `[::1]:9100`).
    Tcp(SocketAddr),
}

/// Why an address string was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Neither `unix:PATH` nor `IP:PORT`.
    #[error("{input:?} is not an address; write unix:/path/to.sock, 127.0.0.1:PORT or [::1]:PORT")]
    Malformed {
        /// What was given.
        input: String,
    },
    /// `unix:` with nothing after it.
    #[error("unix: needs a socket path, e.g. unix:/run/worker.sock")]
    EmptyPath,
    /// A TCP address that is not loopback where only loopback is allowed.
    #[error("{addr} is not a loopback address; the worker serves only on a Unix socket, 127.0.0.1 or [::1] (put the gateway in front of it for remote access)")]
    NotLoopback {
        /// The rejected address.
        addr: SocketAddr,
    },
}

impl FromStr for Addr {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(path) = s.strip_prefix("unix:") {
            let path = path.strip_prefix("//").unwrap_or(path);
            if path.is_empty() {
                return Err(AddrError::EmptyPath);
            }
            return Ok(Addr::Unix(PathBuf::from(path)));
        }
        s.parse::<SocketAddr>()
            .map(Addr::Tcp)
            .map_err(|_| AddrError::Malformed {
                input: s.to_string(),
            })
    }
}

impl fmt::Display for Addr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(a) => write!(f, "{a}"),
        }
    }
}

impl Addr {
    /// Parses an address that must be a Unix socket or a loopback TCP address.
    pub fn parse_local(s: &str) -> Result<Self, AddrError> {
        let addr: Addr = s.parse()?;
        if let Addr::Tcp(sa) = addr {
            if !sa.ip().is_loopback() {
                return Err(AddrError::NotLoopback { addr: sa });
            }
        }
        Ok(addr)
    }

    /// [`Addr::parse_local`] with the error attributed to a config `key`.
    pub fn parse_local_for(key: &str, s: &str) -> Result<Self, ConfigError> {
        Self::parse_local(s).map_err(|e| ConfigError::new(key, e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_forms() {
        assert_eq!(
            "unix:/run/worker.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/run/worker.sock".into())
        );
        assert_eq!(
            "unix:///run/w.sock".parse::<Addr>().unwrap(),
            Addr::Unix("/run/w.sock".into())
        );
        assert!(matches!(
            "[::1]:9100".parse::<Addr>().unwrap(),
            Addr::Tcp(_)
        ));
        assert_eq!("unix:".parse::<Addr>(), Err(AddrError::EmptyPath));
        assert!(matches!(
            "localhost:80".parse::<Addr>(),
            Err(AddrError::Malformed { .. })
        ));
    }

    #[test]
    fn local_only() {
        assert!(Addr::parse_local("127.0.0.1:9100").is_ok());
        assert!(Addr::parse_local("[::1]:9100").is_ok());
        for bad in ["0.0.0.0:9100", "10.1.2.3:9100", "[::]:9100"] {
            let e = Addr::parse_local(bad).unwrap_err();
            assert!(matches!(e, AddrError::NotLoopback { .. }), "{bad}");
            assert!(e.to_string().contains("loopback"));
        }
    }
}
