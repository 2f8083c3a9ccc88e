//! The worker's Prometheus metrics (`taskgate_` prefix), registered once and updated by
//! the runner; `http` serves them.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Every metric the worker exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Tasks claimed, by queue and module.
    pub tasks_claimed: IntCounterVec,
    /// Attempts finished, by queue, module and resulting state.
    pub tasks_finished: IntCounterVec,
    /// Attempt wall time, by queue and module.
    pub task_duration: HistogramVec,
    /// Leases this worker lost (taken over or not renewed in time).
    pub leases_lost: IntCounter,
    /// Writes refused because their fencing token was stale.
    pub fenced_writes_rejected: IntCounter,
    /// Heartbeat batches written.
    pub heartbeats: IntCounter,
    /// Heartbeat batches that failed.
    pub heartbeat_errors: IntCounter,
    /// Executor processes alive now.
    pub executors_running: IntGauge,
    /// Tasks by queue and state (sampled).
    pub queue_depth: IntGaugeVec,
    /// 1 when the last database operation succeeded.
    pub database_up: IntGauge,
}

impl Metrics {
    /// Creates and registers the metrics. Fails only on an invalid or duplicate metric
    /// definition, i.e. a bug.
    pub fn new(backend: &str) -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let tasks_claimed = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "taskgate_tasks_claimed_total",
                    "Tasks claimed by this worker.",
                ),
                &["queue", "module"],
            )?,
        )?;
        let tasks_finished = register(
            &registry,
            IntCounterVec::new(
                Opts::new(
                    "taskgate_tasks_finished_total",
                    "Task attempts finished by this worker, by the state they left the task in.",
                ),
                &["queue", "module", "state"],
            )?,
        )?;
        let task_duration = register(
            &registry,
            HistogramVec::new(
                HistogramOpts::new(
                    "taskgate_task_duration_seconds",
                    "Wall time of task attempts.",
                )
                .buckets(vec![
                    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    300.0, 900.0, 3600.0,
                ]),
                &["queue", "module"],
            )?,
        )?;
        let queue_depth = register(
            &registry,
            IntGaugeVec::new(
                Opts::new(
                    "taskgate_tasks",
                    "Tasks in the store by queue and state (sampled).",
                ),
                &["queue", "state"],
            )?,
        )?;
        let build_info = register(
            &registry,
            IntGaugeVec::new(
                Opts::new("taskgate_build_info", "Build information; always 1."),
                &["version", "backend", "prod"],
            )?,
        )?;
        build_info
            .with_label_values(&[
                env!("CARGO_PKG_VERSION"),
                backend,
                if cfg!(feature = "prod") {
                    "true"
                } else {
                    "false"
                },
            ])
            .set(1);
        let counter = |name: &str, help: &str| register(&registry, IntCounter::new(name, help)?);
        let gauge = |name: &str, help: &str| register(&registry, IntGauge::new(name, help)?);
        Ok(Self {
            tasks_claimed,
            tasks_finished,
            task_duration,
            leases_lost: counter(
                "taskgate_leases_lost_total",
                "Leases this worker lost before its task finished.",
            )?,
            fenced_writes_rejected: counter(
                "taskgate_fenced_writes_rejected_total",
                "Task writes rejected because their fencing token was stale.",
            )?,
            heartbeats: counter(
                "taskgate_heartbeats_total",
                "Lease heartbeat batches written.",
            )?,
            heartbeat_errors: counter(
                "taskgate_heartbeat_errors_total",
                "Lease heartbeat batches that failed.",
            )?,
            executors_running: gauge(
                "taskgate_executors_running",
                "Executor processes running now.",
            )?,
            database_up: gauge(
                "taskgate_database_up",
                "1 when the last database operation succeeded, else 0.",
            )?,
            queue_depth,
            registry,
        })
    }

    /// The registry, for parts that register their own metrics (the egress proxy).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Registers `metric` and hands it back.
pub fn register<C>(registry: &Registry, metric: C) -> Result<C, prometheus::Error>
where
    C: prometheus::core::Collector + Clone + 'static,
{
    registry.register(Box::new(metric.clone()))?;
    Ok(metric)
}
