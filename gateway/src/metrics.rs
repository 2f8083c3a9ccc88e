//! The gateway's own `taskgate_gateway_*` metrics, served at `/gateway/metrics` behind
//! the same token check as the proxied paths.
//!
//! Counters with labels are resolved to plain handles once, at start-up, so counting on
//! the request path is one atomic add with no label lookup or allocation.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

use crate::audit::Reason;

/// Every metric the gateway exports.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    /// Requests proxied to the worker.
    pub proxied: IntCounter,
    /// Requests answered by the gateway itself with 2xx (its metrics).
    pub served: IntCounter,
    /// Requests denied (any reason).
    pub denied: IntCounter,
    denials: [IntCounter; 6],
    /// Requests that failed at the upstream (connect, read, timeout).
    pub upstream_errors: IntCounter,
    /// Hosts evicted from the limiter table (all fully refilled).
    pub evictions: IntCounter,
    /// Unauthorized hits charged to the shared overflow bucket.
    pub overflow_hits: IntCounter,
    limiter_entries: IntGauge,
    limiter_capacity: IntGauge,
    header_timeouts: IntGauge,
    /// Successful reloads of TLS material or tokens.
    pub reloads_ok: IntCounter,
    /// Failed reloads (old material kept).
    pub reloads_failed: IntCounter,
    /// Connections closed by the header deadline, counted by the stream wrapper.
    pub header_timeout_count: Arc<AtomicU64>,
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("taskgate_gateway_requests_total", "Requests by outcome"),
            &["outcome"],
        )?;
        let denials = IntCounterVec::new(
            Opts::new(
                "taskgate_gateway_denials_total",
                "Denied requests and connections by reason",
            ),
            &["reason"],
        )?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(denials.clone()))?;
        let reloads = IntCounterVec::new(
            Opts::new(
                "taskgate_gateway_reloads_total",
                "Reloads of TLS material and tokens by result",
            ),
            &["result"],
        )?;
        registry.register(Box::new(reloads.clone()))?;
        Ok(Metrics {
            proxied: requests.with_label_values(&["proxied"]),
            served: requests.with_label_values(&["served"]),
            denied: requests.with_label_values(&["denied"]),
            denials: Reason::ALL.map(|r| denials.with_label_values(&[r.as_str()])),
            upstream_errors: counter("taskgate_gateway_upstream_errors_total", "Requests that failed at the upstream")?,
            evictions: counter(
                "taskgate_gateway_limiter_evictions_total",
                "Fully refilled hosts evicted from the limiter table",
            )?,
            overflow_hits: counter(
                "taskgate_gateway_limiter_overflow_hits_total",
                "Unauthorized hits charged to the shared overflow bucket (table full of penalized hosts)",
            )?,
            limiter_entries: gauge("taskgate_gateway_limiter_entries", "Hosts tracked by the limiter")?,
            limiter_capacity: gauge("taskgate_gateway_limiter_capacity", "Most hosts the limiter tracks")?,
            header_timeouts: gauge(
                "taskgate_gateway_header_timeouts",
                "Connections closed because the request head missed the header deadline",
            )?,
            reloads_ok: reloads.with_label_values(&["ok"]),
            reloads_failed: reloads.with_label_values(&["failed"]),
            header_timeout_count: Arc::new(AtomicU64::new(0)),
            registry,
        })
    }

    /// Counts one denial.
    pub fn deny(&self, reason: Reason) {
        self.denials[reason as usize].inc();
        if reason != Reason::Cidr && reason != Reason::Tls {
            self.denied.inc();
        }
    }

    /// The text exposition, with the gauges brought up to date.
    pub fn render(&self, limiter_entries: usize, limiter_capacity: usize) -> Vec<u8> {
        self.limiter_entries.set(limiter_entries as i64);
        self.limiter_capacity.set(limiter_capacity as i64);
        self.header_timeouts
            .set(self.header_timeout_count.load(Ordering::Relaxed) as i64);
        let mut out = Vec::with_capacity(4096);
        // Encoding into a Vec cannot fail for well-formed metrics; an error would only
        // lose this scrape, so it is logged rather than propagated.
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!(error = %e, "cannot encode the gateway's metrics");
        }
        out
    }
}
