//! `worker run`: start-up checks, the executor environment, signal handling, and the
//! wiring of store, runner, metrics and events.

use std::{sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;

use crate::{
    commands,
    config::{Common, RunConfig},
    egress::{proxy::EgressProxy, Mode},
    events::EventBus,
    executor::Isolation,
    http::{self, AppState, Limits},
    metrics::Metrics,
    plan::EgressPlan,
    plan::Plan,
    privdrop,
    runner::{self, Settings},
    store::Store,
    Error,
};

/// Default `PATH` for executors when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

/// Runs the daemon until SIGTERM/SIGINT (or, with `--drain`, until the queues are empty).
pub async fn run(common: &Common, cfg: &RunConfig) -> Result<(), Error> {
    // Executors run as the worker's user. A dumpable process's /proc files (environ with
    // DATABASE_URL, mem) belong to that user and it may be ptraced by it: make the
    // worker non-dumpable so task code can do neither. (A privilege drop does this too,
    // but a worker started directly as its service user would otherwise stay dumpable.)
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| Error::Failed(format!("cannot make the worker non-dumpable: {e}")))?;
    if common.allow.is_empty() {
        return Err(Error::Usage(
            "no task module is allowed, so no task could run; set ALLOWED_TASK_MODULES (or --allowed-modules / worker.allowed_modules), e.g. tasks.*".into(),
        ));
    }
    if nix::unistd::geteuid().is_root() && cfg.user.is_none() && !cfg.allow_root {
        return Err(Error::Usage(
            "refusing to run tasks as root; pass --user NAME to drop privileges after binding, or --allow-root if you really mean it".into(),
        ));
    }
    // Bind first (the socket path may need root), then give root up for good.
    let listener = match &cfg.metrics_listen {
        Some(addr) => Some(
            http::bind(addr, cfg.socket_mode, cfg.socket_group.as_deref())
                .map_err(|e| Error::Usage(e.to_string()))?,
        ),
        None => {
            tracing::warn!("no --metrics-listen: /metrics, /healthz and /events are not served");
            None
        }
    };
    if let Some(user) = &cfg.user {
        let hand_over: Vec<&std::path::Path> = common.log_dir.iter().map(|p| p.as_path()).collect();
        let id = privdrop::drop_to(user, cfg.group.as_deref(), &hand_over)
            .map_err(|e| Error::Usage(e.to_string()))?;
        tracing::info!(
            uid = id.uid.as_raw(),
            gid = id.gid.as_raw(),
            "dropped privileges"
        );
    } else if cfg.group.is_some() {
        return Err(Error::Usage("--group needs --user".into()));
    }
    let pool_size = (cfg.concurrency as u32 / 4).clamp(4, 16);
    let store = commands::open(common, pool_size).await?;

    let payload_dir = {
        let base = cfg.payload_dir.clone().unwrap_or_else(std::env::temp_dir);
        // 0700 from creation on (umask can only remove bits): no other user may list or
        // open payload files, not even in the moment before a chmod.
        tempfile::Builder::new()
            .prefix("taskgate-payloads-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(&base)
            .map_err(|e| {
                Error::Failed(format!(
                    "cannot create a private payload directory in {}: {e}",
                    base.display()
                ))
            })?
    };
    let metrics = Metrics::new(store.backend())
        .map_err(|e| Error::Failed(format!("internal: metric definitions are invalid: {e}")))?;
    let events = Arc::new(EventBus::new(1024));
    let shutdown = CancellationToken::new();
    let egress = start_egress(cfg, payload_dir.path(), &metrics, &events, &shutdown).await?;
    let plan = Plan {
        runner: cfg.module_runner.clone(),
        modules: cfg.modules.clone(),
        timeout: cfg.task_timeout,
        payload_mode: cfg.payload_mode,
        kill_grace: cfg.kill_grace,
        output_cap: 64 * 1024,
        payload_dir: payload_dir.path().to_path_buf(),
        base_env: executor_env(&cfg.env_allow),
        egress,
    };
    let owner = format!(
        "{}:{}",
        nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "unknown".into()),
        std::process::id()
    );
    let settings = Settings {
        owner: owner.clone(),
        queues: cfg.queues.clone(),
        concurrency: cfg.concurrency,
        lease_ttl: cfg.lease_ttl,
        poll_interval: cfg.poll_interval,
        // Short tasks finish faster than a claim commits: keep three slots' worth per
        // slot in hand (4x concurrency leased in all, as Celery's default prefetch), which
        // measured +15% tasks/s on PostgreSQL over 2x (docs/benchmarks.md).
        claim_ahead: cfg.concurrency * 3,
        claim_batch: (cfg.concurrency * 4).min(64),
        completion_batch: 256,
        drain: cfg.drain,
        shutdown_grace: cfg.shutdown_grace,
        backoff: cfg.backoff,
        allow: common.allow.clone(),
    };
    spawn_signal_handler(shutdown.clone())?;

    let server = listener.map(|l| {
        let limits = Limits::default();
        let app = http::router(AppState {
            store: store.clone(),
            metrics: metrics.clone(),
            events: events.clone(),
            shutdown: shutdown.clone(),
            limits,
        });
        tokio::spawn(http::serve(l, app, limits, shutdown.clone()))
    });
    let sampler = tokio::spawn(sample_queue_depth(
        store.clone(),
        metrics.clone(),
        shutdown.clone(),
    ));
    notify_systemd(&shutdown);

    tracing::info!(
        owner = %owner,
        backend = store.backend(),
        queues = ?cfg.queues,
        concurrency = cfg.concurrency,
        lease_ttl = ?cfg.lease_ttl,
        payload_mode = ?cfg.payload_mode,
        prod_build = cfg!(feature = "prod"),
        "worker started"
    );
    runner::run(store, settings, plan, metrics, events, shutdown.clone()).await;
    // A drain ends the runner by itself: stop the rest too.
    shutdown.cancel();
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    if let Some(server) = server {
        let _ = server.await;
    }
    let _ = sampler.await;
    drop(payload_dir);
    tracing::info!("worker stopped");
    Ok(())
}

/// The environment executors start with: `PATH`, `LANG`, and the names the operator
/// allowed, taken from the worker's own environment. Nothing else.
fn executor_env(allow: &[String]) -> Vec<(String, String)> {
    let mut env = vec![(
        "PATH".to_string(),
        std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_string()),
    )];
    for name in std::iter::once("LANG").chain(allow.iter().map(String::as_str)) {
        if let Ok(v) = std::env::var(name) {
            env.push((name.to_string(), v));
        }
    }
    env
}

/// SIGTERM or SIGINT starts a graceful shutdown; a second one is logged and ignored
/// (the grace periods bound how long the shutdown takes).
fn spawn_signal_handler(shutdown: CancellationToken) -> Result<(), Error> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| Error::Failed(format!("cannot install the SIGTERM handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| Error::Failed(format!("cannot install the SIGINT handler: {e}")))?;
    tokio::spawn(async move {
        loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            if shutdown.is_cancelled() {
                tracing::info!(signal = name, "already shutting down");
            } else {
                tracing::info!(
                    signal = name,
                    "shutting down: no new claims; running tasks get the grace period"
                );
                shutdown.cancel();
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    });
    Ok(())
}

/// Samples task counts by queue and state every 10 s for the `taskgate_tasks` gauge, so
/// a scrape never costs a database query.
async fn sample_queue_depth(store: Arc<dyn Store>, metrics: Metrics, shutdown: CancellationToken) {
    loop {
        match store.count_by_state().await {
            Ok(counts) => {
                metrics.queue_depth.reset();
                for c in counts {
                    metrics
                        .queue_depth
                        .with_label_values(&[&c.queue, &c.state])
                        .set(c.count);
                }
            }
            Err(e) => tracing::debug!(error = %e, "sampling queue depth failed"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// Tells systemd we are ready (`Type=notify`) and pings its watchdog at half the
/// interval it asks for. Both are no-ops outside systemd.
fn notify_systemd(shutdown: &CancellationToken) {
    if let Err(e) = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]) {
        tracing::debug!(error = %e, "sd_notify READY failed");
    }
    let mut usec = 0;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        let every = Duration::from_micros(usec / 2);
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(every) => {
                        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                    }
                }
            }
        });
    }
}

/// Starts the egress proxy when a policy is on, and decides whether executors get their
/// own network namespace (enforce) or only the proxy environment (advisory).
async fn start_egress(
    cfg: &RunConfig,
    dir: &std::path::Path,
    metrics: &Metrics,
    events: &Arc<EventBus>,
    shutdown: &CancellationToken,
) -> Result<Option<EgressPlan>, Error> {
    let mode = cfg.egress.mode;
    if mode == Mode::Off {
        return Ok(None);
    }
    let exe = std::env::current_exe()
        .map_err(|e| Error::Failed(format!("cannot find this binary for the egress jail: {e}")))?;
    let jail = if mode == Mode::Enforce {
        match jail_isolation(&exe).await {
            Some(i) => {
                tracing::info!(isolation = ?i, "egress enforced: each executor gets its own network namespace whose only way out is the worker's proxy");
                Some(i)
            }
            None if cfg.egress_advisory_ok => {
                tracing::warn!("egress is ADVISORY: this worker cannot create network namespaces (needs root, or unprivileged user namespaces); executors only get HTTPS_PROXY, and a task that ignores it is not stopped");
                None
            }
            None => {
                return Err(Error::Usage(
                    "egress mode enforce needs network namespaces for executors (run as root, or allow unprivileged user namespaces; under systemd, RestrictNamespaces=user net); pass --egress-advisory-ok to run with the proxy environment only".into(),
                ))
            }
        }
    } else {
        tracing::info!("egress in report mode: everything is allowed; what the policy would deny is logged and counted");
        None
    };
    let proxy =
        EgressProxy::new(cfg.egress.clone(), metrics.registry(), events.clone()).map_err(|e| {
            Error::Failed(format!(
                "internal: egress metric definitions are invalid: {e}"
            ))
        })?;
    let bind = |what: &str, e: std::io::Error| {
        Error::Failed(format!("cannot start the egress proxy ({what}): {e}"))
    };
    let tcp = Arc::new(
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| bind("127.0.0.1", e))?,
    );
    let tcp_port = tcp.local_addr().map_err(|e| bind("127.0.0.1", e))?.port();
    let socket = dir.join("egress.sock");
    let unix =
        Arc::new(tokio::net::UnixListener::bind(&socket).map_err(|e| bind("unix socket", e))?);
    tokio::spawn(proxy.clone().serve(
        move || {
            let l = tcp.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        shutdown.clone(),
    ));
    tokio::spawn(proxy.clone().serve(
        move || {
            let l = unix.clone();
            async move { l.accept().await.map(|(s, _)| s) }
        },
        shutdown.clone(),
    ));
    tracing::info!(port = tcp_port, "egress proxy listening on 127.0.0.1");
    Ok(Some(EgressPlan {
        proxy,
        tcp_port,
        socket,
        jail,
        exe,
    }))
}

/// Which kind of network namespace executors can get here, found by trying.
async fn jail_isolation(exe: &std::path::Path) -> Option<Isolation> {
    let candidates: &[Isolation] = if nix::unistd::geteuid().is_root() {
        &[Isolation::NetNs, Isolation::UserNetNs]
    } else {
        &[Isolation::UserNetNs]
    };
    for &isolation in candidates {
        let probe = crate::spawn::Command::new(&[exe.as_os_str(), "--version".as_ref()], &[])
            .map(|cmd| cmd.isolation(isolation))
            .and_then(|cmd| cmd.spawn());
        if let Ok(mut child) = probe {
            if matches!(child.wait().await, Ok(s) if s.success()) {
                return Some(isolation);
            }
        }
    }
    None
}
