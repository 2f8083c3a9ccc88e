//! The taskgate gateway: the TLS front of the worker's Unix socket. It drops sources
//! outside a CIDR allow-list at accept, terminates TLS (rustls, 1.2 and 1.3, optionally
//! mTLS with a SAN allow-list), allows only a few paths, checks bearer tokens in constant
//! time, limits unauthorized hits per host in a bounded table, writes an audit line for
//! every denial, and proxies what is left to the worker. pingora's `Server` runs the
//! process (signals, graceful shutdown, background services); requests are served by
//! hyper on one event loop per core.
//!
//! # Layout
//!
//! - [`config`]: flags, environment and `gateway.toml` into one typed [`Config`].
//! - [`listener`]: binding, the per-core event loops, one connection's life.
//! - [`filter`]: the CIDR filter at accept.
//! - [`tls`]: certificate, key and client CA behind swappable resolver and verifier.
//! - [`deadline`]: the request-head deadline (slowloris) and the idle bound.
//! - [`proxy`]: the HTTP checks, in the order a request meets them, and the proxying.
//! - [`upstream`]: the worker connection paired with each client connection.
//! - [`limiter`]: GCRA per host in a table with a hard bound and a safe eviction rule.
//! - [`audit`]: the audit log lines.
//! - [`metrics`]: the `taskgate_gateway_*` metrics.
//! - [`reload`]: SIGHUP and file-change reloads, and readiness.
//! - [`privdrop`]: switching user and group after the listener is bound.
//! - [`logbridge`]: pingora's `log` lines into `tracing`.
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod audit;
pub mod config;
pub mod deadline;
pub mod filter;
pub mod limiter;
pub mod listener;
pub mod logbridge;
pub mod metrics;
pub mod privdrop;
pub mod proxy;
pub mod reload;
pub mod tls;
pub mod upstream;

use std::sync::Arc;

use arc_swap::ArcSwap;
use pingora::{
    server::{configuration::ServerConf, RunArgs, Server},
    services::background::background_service,
};
use taskgate_shared::{config::ConfigError, tokens::TokenSet};

pub use config::{Cli, Config};

use crate::{
    config::AuthSource,
    deadline::Limits,
    filter::CidrFilter,
    limiter::Limiter,
    listener::{Frontend, Shared},
    metrics::Metrics,
    privdrop::PrivDrop,
    proxy::Gateway,
    reload::Reloader,
    tls::TlsMaterial,
};

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// A file named by the configuration is unusable (exit 64: the operator must fix it).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS material is unusable (exit 64).
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The privilege drop cannot be done (exit 64).
    #[error(transparent)]
    Priv(#[from] privdrop::PrivError),
    /// Metrics could not be registered (a bug).
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    /// The listen address cannot be bound.
    #[error("--listen {addr}: {reason}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        reason: String,
    },
}

impl GatewayError {
    /// True for errors the operator fixes in the configuration (exit code 64).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            GatewayError::Config(_)
                | GatewayError::Tls(_)
                | GatewayError::Priv(_)
                | GatewayError::Bind { .. }
        )
    }
}

/// Everything loaded and checked, ready to serve.
pub struct Prepared {
    config: Config,
    tls: Option<Arc<TlsMaterial>>,
    tokens: proxy::Tokens,
    privdrop: Option<PrivDrop>,
}

/// Loads every file the configuration names and checks it; `--check-config` stops here.
pub fn prepare(config: Config) -> Result<Prepared, GatewayError> {
    let tls = match &config.tls {
        Some(paths) => Some(Arc::new(TlsMaterial::load(paths)?)),
        None => None,
    };
    let tokens = match &config.auth {
        AuthSource::File(path) => Some(Arc::new(ArcSwap::from_pointee(TokenSet::load_file(
            "--auth-token-file",
            path,
        )?))),
        AuthSource::Inline(set) => Some(Arc::new(ArcSwap::from_pointee(set.clone()))),
        AuthSource::Disabled => None,
    };
    let privdrop = PrivDrop::resolve(config.user.as_deref(), config.group.as_deref())?;
    Ok(Prepared {
        config,
        tls,
        tokens,
        privdrop,
    })
}

impl Prepared {
    /// A one-line summary for `--check-config` and the start-up log.
    pub fn summary(&self) -> String {
        let c = &self.config;
        format!(
            "listen {} upstream {}; tls {}; auth {}; allow-cidr {}; paths {}; limiter {} per {:?}, at most {} hosts",
            c.listen,
            c.upstream,
            match (&c.tls, &self.tls) {
                (Some(p), _) if p.client_ca.is_some() => "on with mTLS",
                (Some(_), _) => "on",
                _ => "OFF (--insecure-plaintext)",
            },
            match &self.tokens {
                Some(t) => format!("{} token(s)", t.load().len()),
                None => "OFF (--no-auth)".into(),
            },
            if c.allow_cidrs.is_empty() { "empty (all sources allowed)".to_string() } else { format!("{:?}", c.allow_cidrs.nets().iter().map(|n| n.to_string()).collect::<Vec<_>>()) },
            c.allow_paths.join(","),
            c.limit.limit,
            c.limit.window,
            c.limit.max_entries,
        )
    }
}

/// Serves until SIGTERM (graceful) or SIGINT (fast).
pub fn run(prepared: Prepared) -> Result<(), GatewayError> {
    let Prepared {
        config,
        tls,
        tokens,
        privdrop,
    } = prepared;
    let metrics = Arc::new(Metrics::new()?);
    logbridge::install();
    warn_about(&config, &tokens);

    // Bind, then drop privileges before anything else runs: no request is ever served
    // as root, and a port below 1024 still works.
    let bound = listener::bind(&config.listen).map_err(|e| GatewayError::Bind {
        addr: config.listen.to_string(),
        reason: e.to_string(),
    })?;
    if let Some(p) = &privdrop {
        p.apply()?;
    }

    let acceptor = match &tls {
        Some(material) => Some(tokio_rustls::TlsAcceptor::from(tls::server_config(
            material,
        )?)),
        None => None,
    };
    let limiter = Arc::new(Limiter::new(config.limit));
    let shared = Shared {
        gateway: Gateway::new(&config, tokens.clone(), limiter, metrics.clone()),
        tls: acceptor,
        filter: CidrFilter::new(config.allow_cidrs.clone(), metrics.clone()),
        limits: Limits {
            head: config.header_timeout,
            idle: config.idle_timeout,
        },
    };

    let conf = ServerConf {
        // pingora's own runtimes only run the reload service and wait for the loops.
        threads: 1,
        grace_period_seconds: Some(config.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    server.add_service(Frontend::new(bound, shared, config.threads));

    let token_file = match (&config.auth, &tokens) {
        (AuthSource::File(path), Some(set)) => Some((path.clone(), set.clone())),
        _ => None,
    };
    server.add_service(background_service(
        "taskgate reload",
        Reloader {
            tls,
            token_file,
            metrics,
            poll: config.reload_poll,
        },
    ));

    tracing::info!(listen = %config.listen, upstream = %config.upstream, threads = config.threads, "gateway starting");
    server.run(RunArgs::default());
    tracing::info!("gateway stopped");
    Ok(())
}

fn warn_about(config: &Config, tokens: &proxy::Tokens) {
    if config.tls.is_none() {
        tracing::warn!(
            "--insecure-plaintext: serving plain HTTP; tokens cross the network in clear text"
        );
    }
    match tokens {
        None => tracing::warn!("--no-auth: no bearer token is checked"),
        Some(t) if t.load().weak_count() > 0 => tracing::warn!(
            weak = t.load().weak_count(),
            "some tokens are shorter than {} characters",
            taskgate_shared::tokens::WEAK_TOKEN_LEN
        ),
        Some(_) => {}
    }
    if config.allow_cidrs.is_empty() {
        tracing::info!(
            "CIDR allow-list is empty: connections from every source address are accepted"
        );
    } else {
        tracing::info!(allow_cidrs = ?config.allow_cidrs.nets().iter().map(|n| n.to_string()).collect::<Vec<_>>(), "CIDR allow-list in force");
    }
}
