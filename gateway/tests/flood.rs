//! The long gateway flood (issue 6, item 3), run by `tests/bench/gateway_flood`:
//! unauthorized requests from `FLOOD_HOSTS` distinct loopback addresses (127.x.y.z, each
//! bound before connecting) against a table of `FLOOD_MAX_ENTRIES`, while an authorized
//! client scrapes at a steady pace and a fixed set of penalized hosts is probed.
//!
//! It prints figures rather than asserting speed (the machine is shared); it fails only
//! when a bound or a penalty breaks: the table above its bound, a penalized host served,
//! an unexpected status. Ignored in the normal test run (it takes minutes):
//!
//! ```text
//! cargo test --release -p taskgate-gateway --test flood -- --ignored --nocapture
//! ```

mod common;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One unauthorized request on a fresh plain connection from `source`; the status.
async fn bad_hit(gw: SocketAddr, source: IpAddr) -> Result<u16, String> {
    let client = Client::plain().from(&source.to_string());
    let mut tcp = client.tcp(gw).await.map_err(|e| format!("connect: {e}"))?;
    tcp.write_all(
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong-token-xxxxxxxxx\r\n\r\n",
    )
    .await
    .map_err(|e| format!("write: {e}"))?;
    let mut buf = [0u8; 12];
    tcp.read_exact(&mut buf)
        .await
        .map_err(|e| format!("read: {e}"))?;
    std::str::from_utf8(&buf[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {buf:?}"))
}

fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .filter(|r| r.starts_with(' '))
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("{name} missing")) as u64
}

/// The n-th flood source: 127.1.0.0 upwards, clear of the scraper and the victims.
fn flood_ip(i: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        1 + (i >> 16) as u8,
        (i >> 8) as u8,
        i as u8,
    ))
}

/// Authorized requests at a steady pace for `secs`: (scheduled, served, latencies in µs).
/// A tick whose request is still running is skipped, so a slow gateway shows up as
/// requests not served, not as a queue.
async fn paced_scrapes(
    gw: SocketAddr,
    rate: u64,
    secs: u64,
    stop: Arc<AtomicBool>,
) -> (u64, u64, Vec<u64>) {
    let client = Client::plain().from("127.0.0.1");
    let mut conn = client.connect(gw).await.expect("scraper connects");
    let period = Duration::from_micros(1_000_000 / rate);
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let start = Instant::now();
    let mut served = 0u64;
    let mut lat = Vec::new();
    while start.elapsed() < Duration::from_secs(secs) && !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let t = Instant::now();
        let answer = tokio::time::timeout(
            Duration::from_secs(2),
            send(&mut conn, "/metrics", Some(TOKEN_A)),
        )
        .await;
        match answer {
            Ok(Ok((200, _))) => {
                served += 1;
                lat.push(t.elapsed().as_micros() as u64);
            }
            Ok(Ok((status, _))) => panic!("authorized scrape answered {status}"),
            Ok(Err(_)) | Err(_) => {
                // Reconnect and go on; the miss counts as not served.
                conn = client.connect(gw).await.expect("scraper reconnects");
            }
        }
    }
    let scheduled = (start.elapsed().as_micros() / period.as_micros()) as u64;
    (scheduled, served, lat)
}

fn pct(v: &mut [u64], p: f64) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run by tests/bench/gateway_flood"]
async fn flood_from_distinct_loopback_addresses() {
    let hosts: usize = env_or("FLOOD_HOSTS", 100_000);
    let max_entries: u64 = env_or("FLOOD_MAX_ENTRIES", 10_000);
    let concurrency: usize = env_or("FLOOD_CONCURRENCY", 64);
    let rate: u64 = env_or("FLOOD_SCRAPE_RATE", 50);
    let baseline_secs: u64 = env_or("FLOOD_BASELINE_SECS", 10);
    let victims_n: u8 = env_or("FLOOD_VICTIMS", 20);
    let threads: String = env_or("FLOOD_GATEWAY_THREADS", "2".to_string());
    let limit = 3u64;

    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &["--threads", &threads]);
    let max_entries_s = max_entries.to_string();
    let gw = Gateway::start(
        &args,
        &[
            ("METRICS_AUTH_TOKEN", TOKEN_A),
            ("METRICS_AUTH_LIMIT", "3"),
            ("METRICS_AUTH_WINDOW", "600s"),
            ("METRICS_AUTH_MAX_ENTRIES", &max_entries_s),
            ("GATEWAY_LOG", "warn"),
        ],
    )
    .await;
    let addr = gw.addr;
    let rss_start = gw.rss_kb();

    // Penalize the victims: `limit` 401s, then 429.
    let victims: Vec<IpAddr> = (0..victims_n)
        .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + i)))
        .collect();
    for v in &victims {
        for _ in 0..limit {
            assert_eq!(bad_hit(addr, *v).await.unwrap(), 401);
        }
        assert_eq!(bad_hit(addr, *v).await.unwrap(), 429);
    }

    // Baseline: the paced authorized scraper alone.
    let (b_sched, b_served, mut b_lat) =
        paced_scrapes(addr, rate, baseline_secs, Arc::default()).await;

    // The flood, with the scraper, the victim prober and the sampler alongside.
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let statuses: Arc<std::sync::Mutex<HashMap<u16, u64>>> = Arc::default();
    let started = Instant::now();
    let mut flooders = Vec::new();
    for _ in 0..concurrency {
        let (next, sent, errors, statuses) =
            (next.clone(), sent.clone(), errors.clone(), statuses.clone());
        flooders.push(tokio::spawn(async move {
            let mut local: HashMap<u16, u64> = HashMap::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= hosts {
                    break;
                }
                match bad_hit(addr, flood_ip(i)).await {
                    Ok(s) => *local.entry(s).or_default() += 1,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            let mut all = statuses.lock().unwrap();
            for (k, v) in local {
                *all.entry(k).or_default() += v;
            }
        }));
    }
    let scraper = tokio::spawn(paced_scrapes(addr, rate, 3600, stop.clone()));
    let resets = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, resets, probes, victims) = (
            stop.clone(),
            resets.clone(),
            probes.clone(),
            victims.clone(),
        );
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                for v in &victims {
                    let c = Client::plain().from(&v.to_string());
                    // A good token: a penalized host is refused even so.
                    match c.get(addr, "/metrics", Some(TOKEN_A)).await {
                        Ok((429, _)) => {}
                        Ok((status, _)) => {
                            eprintln!("victim {v} answered {status}: penalty reset");
                            resets.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => continue,
                    }
                    probes.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    println!(
        "\n{:>6} {:>9} {:>8} {:>9} {:>9} {:>9} {:>10}  load",
        "t(s)", "sent", "req/s", "entries", "overflow", "evicted", "RSS(kB)"
    );
    let metrics_client = Client::plain().from("127.0.0.1");
    let mut max_seen_entries = 0;
    let mut rows = Vec::new();
    let mut last_sent = 0;
    let mut last_t = Instant::now();
    loop {
        let done = flooders.iter().all(|f| f.is_finished());
        let (status, body) = metrics_client
            .get(addr, "/gateway/metrics", Some(TOKEN_A))
            .await
            .expect("gateway metrics");
        assert_eq!(status, 200);
        let entries = metric(&body, "taskgate_gateway_limiter_entries");
        let overflow = metric(&body, "taskgate_gateway_limiter_overflow_hits_total");
        let evicted = metric(&body, "taskgate_gateway_limiter_evictions_total");
        max_seen_entries = max_seen_entries.max(entries);
        let s = sent.load(Ordering::Relaxed);
        let now = Instant::now();
        let rps = (s - last_sent) as f64 / now.duration_since(last_t).as_secs_f64();
        let rss = gw.rss_kb();
        let row = format!(
            "{:>6.1} {:>9} {:>8.0} {:>9} {:>9} {:>9} {:>10}  {}",
            started.elapsed().as_secs_f64(),
            s,
            rps,
            entries,
            overflow,
            evicted,
            rss,
            loadavg()
        );
        println!("{row}");
        rows.push((s, entries, rss));
        assert!(
            entries <= max_entries,
            "the table grew to {entries} > {max_entries}"
        );
        (last_sent, last_t) = (s, now);
        if done {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let flood_secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for f in flooders {
        f.await.unwrap();
    }
    prober.await.unwrap();
    let (f_sched, f_served, mut f_lat) = scraper.await.unwrap();
    let rss_end = gw.rss_kb();

    // Victims are still penalized after the flood.
    for v in &victims {
        let (status, _) = Client::plain()
            .from(&v.to_string())
            .get(addr, "/metrics", Some(TOKEN_A))
            .await
            .unwrap();
        if status != 429 {
            resets.fetch_add(1, Ordering::Relaxed);
        }
    }

    // Audit lines per host.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let audit = gw.audit();
    let mut per_host: HashMap<String, u64> = HashMap::new();
    let mut per_reason: HashMap<String, u64> = HashMap::new();
    for line in &audit {
        let host = line["host"]
            .as_str()
            .map(str::to_string)
            .or_else(|| {
                line["remote"]
                    .as_str()
                    .and_then(|r| r.parse::<SocketAddr>().ok())
                    .map(|a| a.ip().to_string())
            })
            .unwrap_or_default();
        *per_host.entry(host).or_default() += 1;
        *per_reason
            .entry(line["reason"].as_str().unwrap_or("?").to_string())
            .or_default() += 1;
    }
    let max_per_host = per_host.values().copied().max().unwrap_or(0);
    let (worst_host, _) = per_host
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(h, n)| (h.clone(), *n))
        .unwrap_or_default();

    // RSS flat past the bound: compare the sample when the table first filled with the end.
    let rss_at_bound = rows
        .iter()
        .find(|(_, e, _)| *e >= max_entries)
        .map(|(_, _, r)| *r)
        .unwrap_or(0);

    let statuses = statuses.lock().unwrap().clone();
    let b_p50 = pct(&mut b_lat, 0.50);
    let b_p99 = pct(&mut b_lat, 0.99);
    let f_p50 = pct(&mut f_lat, 0.50);
    let f_p99 = pct(&mut f_lat, 0.99);
    let b_rate = b_served as f64 / baseline_secs as f64;
    let f_rate = f_served as f64 / flood_secs;
    println!("\n== gateway flood: figures (load {})", loadavg());
    let fig = |k: &str, v: String| println!("{k:<46} {v}");
    fig("distinct source addresses", hosts.to_string());
    fig(
        "flood requests / duration",
        format!(
            "{} in {flood_secs:.1}s = {:.0} req/s ({} connect/read errors)",
            sent.load(Ordering::Relaxed),
            sent.load(Ordering::Relaxed) as f64 / flood_secs,
            errors.load(Ordering::Relaxed)
        ),
    );
    fig("flood statuses", format!("{statuses:?}"));
    fig(
        "METRICS_AUTH_MAX_ENTRIES / max tracked seen",
        format!("{max_entries} / {max_seen_entries}"),
    );
    fig(
        "penalized hosts / probes / penalties reset",
        format!(
            "{} / {} / {}",
            victims.len(),
            probes.load(Ordering::Relaxed),
            resets.load(Ordering::Relaxed)
        ),
    );
    fig(
        "gateway RSS start / at bound / end (kB)",
        format!("{rss_start} / {rss_at_bound} / {rss_end}"),
    );
    fig(
        "RSS growth past the bound",
        format!(
            "{} kB ({:.1}%)",
            rss_end as i64 - rss_at_bound as i64,
            (rss_end as f64 - rss_at_bound as f64) * 100.0 / rss_at_bound.max(1) as f64
        ),
    );
    fig(
        "authorized scrapes, baseline (served/scheduled)",
        format!("{b_served}/{b_sched} in {baseline_secs}s = {b_rate:.1}/s, p50 {b_p50} µs, p99 {b_p99} µs"),
    );
    fig(
        "authorized scrapes, under flood",
        format!("{f_served}/{f_sched} in {flood_secs:.1}s = {f_rate:.1}/s, p50 {f_p50} µs, p99 {f_p99} µs"),
    );
    fig(
        "served under flood vs baseline (goal >= 80%)",
        format!("{:.1}%", f_rate * 100.0 / b_rate.max(f64::MIN_POSITIVE)),
    );
    fig(
        "audit lines total / by reason",
        format!("{} / {per_reason:?}", audit.len()),
    );
    fig(
        "audit lines per host: max (host)",
        format!(
            "{max_per_host} ({worst_host}); bound {} per window",
            limit + 1
        ),
    );

    assert!(max_seen_entries <= max_entries);
    assert_eq!(
        resets.load(Ordering::Relaxed),
        0,
        "a penalized host was served"
    );
    assert!(
        max_per_host <= limit + 1,
        "{worst_host} wrote {max_per_host} audit lines in one window"
    );
    assert!(statuses.keys().all(|s| *s == 401 || *s == 429));
}
