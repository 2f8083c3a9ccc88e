//! The gateway's one typed configuration, built in one place from flags, environment
//! variables and the TOML file (`--config`), in that order of precedence.
//!
//! Every key is checked before failing, so an operator sees every bad key at once; the
//! binary turns [`ConfigErrors`] into one line and exit code 64.

use std::{path::PathBuf, time::Duration};

use clap::Parser;
use serde::Deserialize;
use taskgate_shared::{
    cidr::CidrList,
    config::{load_toml, parse_duration, ConfigError, ConfigErrors},
    listen::Addr,
    tokens::TokenSet,
};

/// Paths proxied when `--allow-path` / `allow_paths` is not given.
pub const DEFAULT_ALLOW_PATHS: &[&str] = &["/metrics", "/healthz", "/events"];

/// The gateway's own metrics, served behind the same token check as everything else.
pub const GATEWAY_METRICS_PATH: &str = "/gateway/metrics";

/// Upper bound on `METRICS_AUTH_MAX_ENTRIES`: the table is allocated up front, and 10
/// million hosts is already about 700 MB.
pub const MAX_AUTH_MAX_ENTRIES: usize = 10_000_000;

/// Command-line flags. Every flag can also come from its environment variable, and most
/// from the TOML file; a flag or variable beats the file.
#[derive(Debug, Clone, Default, Parser)]
#[command(
    name = "gateway",
    version,
    about = "TLS/mTLS gateway in front of the taskgate worker"
)]
pub struct Cli {
    /// TOML configuration file (see docs/gateway.md); flags and env override it.
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on, e.g. 0.0.0.0:9443.
    #[arg(long, env = "GATEWAY_LISTEN")]
    pub listen: Option<String>,
    /// The worker: unix:/run/worker.sock or 127.0.0.1:PORT.
    #[arg(long, env = "GATEWAY_UPSTREAM")]
    pub upstream: Option<String>,
    /// Server certificate chain (PEM).
    #[arg(long, env = "METRICS_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, env = "METRICS_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) that client certificates must chain to; turns on mTLS.
    #[arg(long, env = "METRICS_TLS_CLIENT_CA")]
    pub tls_client_ca: Option<PathBuf>,
    /// A client certificate must carry one of these DNS or IP SANs (repeatable).
    #[arg(
        long = "tls-client-allowed-san",
        env = "METRICS_TLS_CLIENT_ALLOWED_SANS",
        value_delimiter = ','
    )]
    pub tls_client_allowed_sans: Vec<String>,
    /// Serve plain HTTP without TLS. Only for tests and loopback set-ups.
    #[arg(long, env = "GATEWAY_INSECURE_PLAINTEXT")]
    pub insecure_plaintext: bool,
    /// File with accepted bearer tokens, one a line (several for rotation).
    #[arg(long, env = "METRICS_AUTH_TOKEN_FILE")]
    pub auth_token_file: Option<PathBuf>,
    /// An accepted bearer token (prefer --auth-token-file: argv is visible to other users).
    #[arg(long, env = "METRICS_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// Proxy without any token check. Only for set-ups where mTLS alone decides.
    #[arg(long, env = "GATEWAY_NO_AUTH")]
    pub no_auth: bool,
    /// Source networks allowed to connect (repeatable or comma-separated); empty = all.
    #[arg(
        long = "allow-cidr",
        env = "METRICS_ALLOW_CIDRS",
        value_delimiter = ','
    )]
    pub allow_cidrs: Vec<String>,
    /// Paths proxied to the worker (repeatable); default /metrics, /healthz, /events.
    #[arg(
        long = "allow-path",
        env = "GATEWAY_ALLOW_PATHS",
        value_delimiter = ','
    )]
    pub allow_paths: Vec<String>,
    /// Unauthorized hits allowed per host per --auth-window (default 10).
    #[arg(long, env = "METRICS_AUTH_LIMIT")]
    pub auth_limit: Option<u32>,
    /// The limiter's window, e.g. 60s (default 60s).
    #[arg(long, env = "METRICS_AUTH_WINDOW")]
    pub auth_window: Option<String>,
    /// Most hosts the limiter tracks (default 10000); a hard bound on its memory.
    #[arg(long, env = "METRICS_AUTH_MAX_ENTRIES")]
    pub auth_max_entries: Option<usize>,
    /// A client must send its whole request head within this (default 10s).
    #[arg(long, env = "GATEWAY_HEADER_TIMEOUT")]
    pub header_timeout: Option<String>,
    /// Idle keep-alive connections are closed after this (default 60s).
    #[arg(long, env = "GATEWAY_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// Upstream connect timeout (default 2s).
    #[arg(long, env = "GATEWAY_UPSTREAM_CONNECT_TIMEOUT")]
    pub upstream_connect_timeout: Option<String>,
    /// Upstream read timeout between bytes (default 60s; must exceed the worker's 15 s SSE heartbeat).
    #[arg(long, env = "GATEWAY_UPSTREAM_READ_TIMEOUT")]
    pub upstream_read_timeout: Option<String>,
    /// How often the cert, key, client CA and token files are checked for changes (default 2s).
    #[arg(long, env = "GATEWAY_RELOAD_POLL")]
    pub reload_poll: Option<String>,
    /// How long SIGTERM waits for in-flight requests before exiting (default 5s).
    #[arg(long, env = "GATEWAY_SHUTDOWN_GRACE")]
    pub shutdown_grace: Option<String>,
    /// Worker threads (default: number of CPUs).
    #[arg(long, env = "GATEWAY_THREADS")]
    pub threads: Option<usize>,
    /// Switch to this user after binding.
    #[arg(long, env = "GATEWAY_USER")]
    pub user: Option<String>,
    /// Switch to this group after binding.
    #[arg(long, env = "GATEWAY_GROUP")]
    pub group: Option<String>,
    /// Log format: json, human or auto.
    #[arg(long, env = "GATEWAY_LOG_FORMAT", default_value = "auto")]
    pub log_format: String,
    /// Log filter, e.g. info or info,taskgate_gateway=debug.
    #[arg(long, env = "GATEWAY_LOG", default_value = "info")]
    pub log: String,
    /// Validate the whole configuration (files included), print a summary and exit.
    #[arg(long)]
    pub check_config: bool,
}

/// `gateway.toml` as DESIGN.md shows it. Unknown keys are errors that name the key.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    listen: Option<String>,
    upstream: Option<String>,
    allow_paths: Option<Vec<String>>,
    header_timeout: Option<String>,
    idle_timeout: Option<String>,
    upstream_connect_timeout: Option<String>,
    upstream_read_timeout: Option<String>,
    user: Option<String>,
    group: Option<String>,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    tls: FileTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    auth_token: Option<String>,
    auth_token_file: Option<PathBuf>,
    allow_cidrs: Option<Vec<String>>,
    auth_limit: Option<u32>,
    auth_window: Option<String>,
    auth_max_entries: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    client_allowed_sans: Option<Vec<String>>,
}

/// Where the accepted tokens come from.
#[derive(Debug, Clone)]
pub enum AuthSource {
    /// A token file, re-read on change and on SIGHUP.
    File(PathBuf),
    /// Tokens given inline (flag, env or TOML); fixed for the process's life.
    Inline(TokenSet),
    /// `--no-auth`: no token check at all.
    Disabled,
}

/// TLS material paths; the files are loaded (and reloaded) by [`crate::tls`].
#[derive(Debug, Clone)]
pub struct TlsPaths {
    /// Server certificate chain.
    pub cert: PathBuf,
    /// Server private key.
    pub key: PathBuf,
    /// Client CA bundle; `Some` turns on mTLS.
    pub client_ca: Option<PathBuf>,
    /// DNS or IP SANs a client certificate must carry one of (empty = any from the CA).
    pub client_allowed_sans: Vec<String>,
}

/// Limiter parameters.
#[derive(Debug, Clone, Copy)]
pub struct LimitConfig {
    /// Unauthorized hits allowed per window.
    pub limit: u32,
    /// The window.
    pub window: Duration,
    /// Most hosts tracked.
    pub max_entries: usize,
}

/// The validated gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Listen address (`IP:PORT`; a Unix socket for local set-ups).
    pub listen: Addr,
    /// The worker.
    pub upstream: Addr,
    /// `None` only with `--insecure-plaintext`.
    pub tls: Option<TlsPaths>,
    /// Token source.
    pub auth: AuthSource,
    /// Source networks allowed to connect.
    pub allow_cidrs: CidrList,
    /// Paths proxied.
    pub allow_paths: Vec<String>,
    /// Limiter of unauthorized hits.
    pub limit: LimitConfig,
    /// Request-head deadline.
    pub header_timeout: Duration,
    /// Idle keep-alive bound.
    pub idle_timeout: Duration,
    /// Upstream connect timeout.
    pub upstream_connect_timeout: Duration,
    /// Upstream read timeout.
    pub upstream_read_timeout: Duration,
    /// File-change poll interval.
    pub reload_poll: Duration,
    /// SIGTERM grace period.
    pub shutdown_grace: Duration,
    /// Worker threads.
    pub threads: usize,
    /// User to switch to after binding.
    pub user: Option<String>,
    /// Group to switch to after binding.
    pub group: Option<String>,
}

/// The worker's SSE heartbeat; the upstream read timeout must be longer so `/events`
/// streams are not cut between events.
pub const WORKER_SSE_HEARTBEAT: Duration = Duration::from_secs(15);

impl Config {
    /// Builds the configuration from parsed flags (env already merged in by clap) and the
    /// TOML file they name, collecting every error.
    pub fn build(cli: &Cli) -> Result<Config, ConfigErrors> {
        let file = match &cli.config {
            Some(path) => load_toml::<FileConfig>(path).map_err(ConfigErrors::from)?,
            None => FileConfig::default(),
        };
        Self::from_parts(cli, file)
    }

    /// [`Config::build`] with the file already parsed (tests use this with TOML text).
    pub fn from_parts(cli: &Cli, file: FileConfig) -> Result<Config, ConfigErrors> {
        let mut errs = ConfigErrors::default();

        let listen = match cli.listen.as_deref().or(file.listen.as_deref()) {
            Some(s) => errs.check(
                s.parse::<Addr>()
                    .map_err(|e| ConfigError::new("--listen", e.to_string())),
            ),
            None => {
                errs.push("--listen", "required, e.g. --listen 0.0.0.0:9443");
                None
            }
        };
        let upstream = match cli.upstream.as_deref().or(file.upstream.as_deref()) {
            Some(s) => errs.check(Addr::parse_local_for("--upstream", s)),
            None => {
                errs.push(
                    "--upstream",
                    "required, e.g. --upstream unix:/run/worker.sock",
                );
                None
            }
        };

        let cert = cli.tls_cert.clone().or(file.tls.cert);
        let key = cli.tls_key.clone().or(file.tls.key);
        let client_ca = cli.tls_client_ca.clone().or(file.tls.client_ca);
        let client_allowed_sans = if cli.tls_client_allowed_sans.is_empty() {
            file.tls.client_allowed_sans.unwrap_or_default()
        } else {
            cli.tls_client_allowed_sans.clone()
        };
        let tls = match (cert, key, cli.insecure_plaintext) {
            (Some(cert), Some(key), false) => {
                if !client_allowed_sans.is_empty() && client_ca.is_none() {
                    errs.push(
                        "--tls-client-allowed-san",
                        "needs --tls-client-ca: without mTLS there is no client certificate to check",
                    );
                }
                Some(TlsPaths {
                    cert,
                    key,
                    client_ca,
                    client_allowed_sans,
                })
            }
            (Some(_), Some(_), true) | (Some(_), None, true) | (None, Some(_), true) => {
                errs.push(
                    "--insecure-plaintext",
                    "conflicts with --tls-cert/--tls-key; choose TLS or plaintext",
                );
                None
            }
            (None, None, true) => {
                if client_ca.is_some() {
                    errs.push(
                        "--tls-client-ca",
                        "mTLS needs TLS; drop --insecure-plaintext",
                    );
                }
                None
            }
            (Some(_), None, false) => {
                errs.push("--tls-key", "required with --tls-cert");
                None
            }
            (None, Some(_), false) => {
                errs.push("--tls-cert", "required with --tls-key");
                None
            }
            (None, None, false) => {
                errs.push(
                    "--tls-cert",
                    "TLS is required: give --tls-cert and --tls-key (plain HTTP only with --insecure-plaintext)",
                );
                None
            }
        };

        let auth = Self::auth(cli, &file.metrics, &mut errs);

        let cidr_items = if cli.allow_cidrs.is_empty() {
            file.metrics.allow_cidrs.unwrap_or_default()
        } else {
            cli.allow_cidrs.clone()
        };
        let allow_cidrs = errs
            .check(CidrList::parse("--allow-cidr", &cidr_items))
            .unwrap_or_default();

        let allow_paths = if !cli.allow_paths.is_empty() {
            cli.allow_paths.clone()
        } else {
            file.allow_paths
                .unwrap_or_else(|| DEFAULT_ALLOW_PATHS.iter().map(|s| s.to_string()).collect())
        };
        for p in &allow_paths {
            if !p.starts_with('/')
                || p.bytes()
                    .any(|b| !b.is_ascii_graphic() || b == b'?' || b == b'#')
            {
                errs.push(
                    "--allow-path",
                    format!("{p:?} is not an absolute path without query"),
                );
            }
            if p == GATEWAY_METRICS_PATH {
                errs.push(
                    "--allow-path",
                    format!("{p} is served by the gateway itself"),
                );
            }
        }
        if allow_paths.is_empty() {
            errs.push(
                "--allow-path",
                "the list is empty; nothing would be proxied",
            );
        }

        let limit_n = cli.auth_limit.or(file.metrics.auth_limit).unwrap_or(10);
        if limit_n == 0 {
            errs.push("METRICS_AUTH_LIMIT", "must be at least 1");
        }
        let window = dur(
            &mut errs,
            "METRICS_AUTH_WINDOW",
            cli.auth_window
                .as_deref()
                .or(file.metrics.auth_window.as_deref()),
            "60s",
        );
        if window.is_zero() {
            errs.push("METRICS_AUTH_WINDOW", "must be longer than zero");
        }
        let max_entries = cli
            .auth_max_entries
            .or(file.metrics.auth_max_entries)
            .unwrap_or(10_000);
        if max_entries == 0 || max_entries > MAX_AUTH_MAX_ENTRIES {
            errs.push(
                "METRICS_AUTH_MAX_ENTRIES",
                format!("must be between 1 and {MAX_AUTH_MAX_ENTRIES}"),
            );
        }

        let header_timeout = dur(
            &mut errs,
            "--header-timeout",
            cli.header_timeout
                .as_deref()
                .or(file.header_timeout.as_deref()),
            "10s",
        );
        let idle_timeout = dur(
            &mut errs,
            "--idle-timeout",
            cli.idle_timeout.as_deref().or(file.idle_timeout.as_deref()),
            "60s",
        );
        let upstream_connect_timeout = dur(
            &mut errs,
            "--upstream-connect-timeout",
            cli.upstream_connect_timeout
                .as_deref()
                .or(file.upstream_connect_timeout.as_deref()),
            "2s",
        );
        let upstream_read_timeout = dur(
            &mut errs,
            "--upstream-read-timeout",
            cli.upstream_read_timeout
                .as_deref()
                .or(file.upstream_read_timeout.as_deref()),
            "60s",
        );
        let reload_poll = dur(&mut errs, "--reload-poll", cli.reload_poll.as_deref(), "2s");
        let shutdown_grace = dur(
            &mut errs,
            "--shutdown-grace",
            cli.shutdown_grace.as_deref(),
            "5s",
        );
        for (key, d) in [
            ("--header-timeout", header_timeout),
            ("--idle-timeout", idle_timeout),
            ("--upstream-connect-timeout", upstream_connect_timeout),
            ("--reload-poll", reload_poll),
        ] {
            if d < Duration::from_millis(100) {
                errs.push(key, "must be at least 100ms");
            }
        }
        if upstream_read_timeout <= WORKER_SSE_HEARTBEAT {
            errs.push(
                "--upstream-read-timeout",
                format!(
                    "must be longer than the worker's {}s SSE heartbeat, or /events streams are cut",
                    WORKER_SSE_HEARTBEAT.as_secs()
                ),
            );
        }
        let threads = cli
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        if threads == 0 {
            errs.push("--threads", "must be at least 1");
        }

        errs.into_result()?;
        // Every `None` above pushed an error, so reaching here means both are set; the
        // match keeps that reasoning checked instead of unwrapped.
        let (listen, upstream) = match (listen, upstream) {
            (Some(l), Some(u)) => (l, u),
            _ => return Err(ConfigError::new("--listen", "missing").into()),
        };
        Ok(Config {
            listen,
            upstream,
            tls,
            auth,
            allow_cidrs,
            allow_paths,
            limit: LimitConfig {
                limit: limit_n,
                window,
                max_entries,
            },
            header_timeout,
            idle_timeout,
            upstream_connect_timeout,
            upstream_read_timeout,
            reload_poll,
            shutdown_grace,
            threads,
            user: cli.user.clone().or(file.user),
            group: cli.group.clone().or(file.group),
        })
    }

    fn auth(cli: &Cli, file: &FileMetrics, errs: &mut ConfigErrors) -> AuthSource {
        // Flags and env beat the file as a whole: a token given on the command line or in
        // the environment replaces the file's token settings instead of conflicting.
        let (token_file, inline) = if cli.auth_token_file.is_some() || cli.auth_token.is_some() {
            (cli.auth_token_file.clone(), cli.auth_token.clone())
        } else {
            (file.auth_token_file.clone(), file.auth_token.clone())
        };
        match (token_file, inline, cli.no_auth) {
            (Some(_), _, true) | (_, Some(_), true) => {
                errs.push("--no-auth", "conflicts with a configured token; remove one");
                AuthSource::Disabled
            }
            (None, None, true) => AuthSource::Disabled,
            (Some(_), Some(_), false) => {
                errs.push(
                    "--auth-token-file",
                    "give either a token file or an inline token (--auth-token / METRICS_AUTH_TOKEN / metrics.auth_token), not both",
                );
                AuthSource::Disabled
            }
            (Some(path), None, false) => {
                // Validate now so a bad file fails start-up (and --check-config).
                errs.check(TokenSet::load_file("--auth-token-file", &path));
                AuthSource::File(path)
            }
            (None, Some(token), false) => {
                match errs.check(TokenSet::from_values("--auth-token", &[token])) {
                    Some(set) => AuthSource::Inline(set),
                    None => AuthSource::Disabled,
                }
            }
            (None, None, false) => {
                errs.push(
                    "--auth-token-file",
                    "no token configured: give --auth-token-file, --auth-token / METRICS_AUTH_TOKEN or metrics.auth_token (or --no-auth to run without tokens)",
                );
                AuthSource::Disabled
            }
        }
    }
}

fn dur(errs: &mut ConfigErrors, key: &str, value: Option<&str>, default: &str) -> Duration {
    errs.check(parse_duration(key, value.unwrap_or(default)))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use taskgate_shared::config::parse_toml;

    fn cli(args: &[&str]) -> Cli {
        let mut v = vec!["gateway"];
        v.extend_from_slice(args);
        Cli::try_parse_from(v).unwrap()
    }

    #[test]
    fn minimal_plaintext_with_token() {
        let c = Config::from_parts(
            &cli(&[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "unix:/tmp/w.sock",
                "--insecure-plaintext",
                "--auth-token",
                "abcdefghijklmnopq",
            ]),
            FileConfig::default(),
        )
        .unwrap();
        assert!(c.tls.is_none());
        assert_eq!(c.allow_paths, DEFAULT_ALLOW_PATHS);
        assert_eq!(c.limit.limit, 10);
        assert_eq!(c.header_timeout, Duration::from_secs(10));
    }

    #[test]
    fn no_token_and_no_no_auth_is_an_error() {
        let e = Config::from_parts(
            &cli(&[
                "--listen",
                "127.0.0.1:0",
                "--upstream",
                "unix:/tmp/w.sock",
                "--insecure-plaintext",
            ]),
            FileConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("no token configured"), "{e}");
    }

    #[test]
    fn all_bad_keys_reported_at_once() {
        let e = Config::from_parts(
            &cli(&[
                "--upstream",
                "10.0.0.1:80",
                "--allow-cidr",
                "nope",
                "--auth-window",
                "soon",
                "--upstream-read-timeout",
                "5s",
            ]),
            FileConfig::default(),
        )
        .unwrap_err();
        let s = e.to_string();
        for key in [
            "--listen",
            "--upstream",
            "--tls-cert",
            "--allow-cidr",
            "METRICS_AUTH_WINDOW",
            "--upstream-read-timeout",
            "--auth-token-file",
        ] {
            assert!(s.contains(key), "{key} missing from {s}");
        }
    }

    #[test]
    fn file_is_read_and_flags_override_it() {
        let file: FileConfig = parse_toml(
            "t",
            r#"
listen = "127.0.0.1:9443"
upstream = "unix:/run/worker.sock"
allow_paths = ["/metrics"]
[metrics]
auth_token = "file-token-aaaaaaaaaaaa"
allow_cidrs = ["10.0.0.0/8", "fd00::/8"]
auth_limit = 3
auth_window = "30s"
auth_max_entries = 500
[tls]
cert = "/c.pem"
key = "/k.pem"
client_ca = "/ca.pem"
client_allowed_sans = ["prometheus.monitoring.svc"]
"#,
        )
        .unwrap();
        let c = Config::from_parts(&cli(&["--auth-limit", "5"]), file).unwrap();
        assert_eq!(c.limit.limit, 5);
        assert_eq!(c.limit.window, Duration::from_secs(30));
        assert_eq!(c.limit.max_entries, 500);
        assert_eq!(c.allow_paths, ["/metrics"]);
        let tls = c.tls.unwrap();
        assert_eq!(tls.client_allowed_sans, ["prometheus.monitoring.svc"]);
        assert!(matches!(c.auth, AuthSource::Inline(_)));
        assert!(!c.allow_cidrs.allows("192.0.2.1".parse().unwrap()));
    }

    #[test]
    fn env_token_replaces_the_files_token_file() {
        let file: FileConfig = parse_toml(
            "t",
            "listen = \"127.0.0.1:1\"\nupstream = \"unix:/w.sock\"\n[metrics]\nauth_token_file = \"/nonexistent\"\n",
        )
        .unwrap();
        let c = Config::from_parts(
            &cli(&[
                "--insecure-plaintext",
                "--auth-token",
                "flag-token-aaaaaaaaaaaa",
            ]),
            file,
        )
        .unwrap();
        assert!(matches!(c.auth, AuthSource::Inline(_)));
    }

    #[test]
    fn unknown_toml_key_is_named() {
        let e = parse_toml::<FileConfig>("t", "[metrics]\nauth_limt = 3\n").unwrap_err();
        assert!(e.reason.contains("auth_limt"), "{e}");
    }
}
