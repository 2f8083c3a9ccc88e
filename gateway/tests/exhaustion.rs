//! Slowloris and connection exhaustion (issue 6, item 4): many connections trickling a
//! request head, and many TLS handshakes left half-done (TCP connect, maybe the start of
//! a ClientHello, then nothing).
//!
//! The short form runs in the normal test command (100 of each); the long form
//! (`EXHAUST_CONNS`, default 1,000 of each, with timings) is ignored and run by
//! `tests/bench/gateway_exhaustion`, which prints the figures.

mod common;

use std::{
    net::SocketAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use common::*;
use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinHandle,
};

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn client_config(pki: &Pki) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes()).unwrap())
        .unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_client_auth_cert(
        vec![CertificateDer::from_pem_slice(pki.client.cert_pem.as_bytes()).unwrap()],
        PrivateKeyDer::from_pem_slice(pki.client.key_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    Arc::new(cfg)
}

/// How one hostile connection ended.
#[derive(Debug, Clone, Copy)]
struct Cut {
    /// When the deadline's clock started.
    started: Instant,
    /// From the moment the deadline's clock started (handshake done for a trickler,
    /// TCP connect for a half-done handshake) to the gateway closing the connection.
    after: Duration,
    /// Whether the gateway answered anything that looks like an HTTP response.
    answered: bool,
}

/// Reads until the gateway closes the connection (EOF or error); `give_up` bounds it.
async fn wait_closed<R: AsyncReadExt + Unpin>(rd: &mut R, give_up: Duration) -> Option<bool> {
    let mut answered = false;
    let mut buf = [0u8; 512];
    let deadline = tokio::time::Instant::now() + give_up;
    loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(answered),
            Ok(Ok(n)) => answered |= buf[..n].windows(5).any(|w| w == b"HTTP/"),
        }
    }
}

/// A TLS connection (full handshake, client certificate) that then trickles a request
/// head one byte per `every`, never finishing it.
fn trickler(
    gw: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
    every: Duration,
    give_up: Duration,
) -> JoinHandle<Option<Cut>> {
    tokio::spawn(async move {
        let tcp = TcpStream::connect(gw).await.ok()?;
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .ok()?;
        let start = Instant::now();
        let (mut rd, mut wr) = tokio::io::split(tls);
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(b"GET /metrics HTTP/1.1\r\nx-slow: ").await;
            loop {
                if wr.write_all(b"a").await.is_err() || wr.flush().await.is_err() {
                    break;
                }
                tokio::time::sleep(every).await;
            }
        });
        let closed = wait_closed(&mut rd, give_up).await;
        writer.abort();
        closed.map(|answered| Cut {
            started: start,
            after: start.elapsed(),
            answered,
        })
    })
}

/// The start of a TLS ClientHello: a handshake record announcing 512 bytes, then a few.
const PARTIAL_HELLO: &[u8] = &[
    0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03, 0x5a, 0x5a, 0x5a,
];

/// A TCP connection to the TLS port that sends nothing, or only `PARTIAL_HELLO`.
fn half_handshake(gw: SocketAddr, partial: bool, give_up: Duration) -> JoinHandle<Option<Cut>> {
    tokio::spawn(async move {
        let mut tcp = TcpStream::connect(gw).await.ok()?;
        let start = Instant::now();
        if partial {
            tcp.write_all(PARTIAL_HELLO).await.ok()?;
        }
        let closed = wait_closed(&mut tcp, give_up).await;
        closed.map(|answered| Cut {
            started: start,
            after: start.elapsed(),
            answered,
        })
    })
}

/// Authorized requests on one keep-alive TLS connection, one every `every`, until
/// `until`: when each was sent and its latency in µs (a failure reconnects and is
/// counted in `.1`).
async fn authorized_at(
    gw: SocketAddr,
    pki: &Pki,
    every: Duration,
    until: Instant,
) -> (Vec<(Instant, u64)>, u64) {
    let client = Client::tls(&pki.ca, Some(&pki.client));
    let mut conn = client
        .connect(gw)
        .await
        .expect("authorized client connects");
    let (mut lat, mut failed) = (Vec::new(), 0);
    while Instant::now() < until {
        let t = Instant::now();
        match send(&mut conn, "/metrics", Some(TOKEN_A)).await {
            Ok((200, _)) => lat.push((t, t.elapsed().as_micros() as u64)),
            Ok((status, _)) => panic!("authorized request answered {status}"),
            Err(_) => {
                failed += 1;
                conn = client
                    .connect(gw)
                    .await
                    .expect("authorized client reconnects");
            }
        }
        tokio::time::sleep(every).await;
    }
    (lat, failed)
}

/// [`authorized_at`] without the send times.
async fn authorized(gw: SocketAddr, pki: &Pki, every: Duration, until: Instant) -> (Vec<u64>, u64) {
    let (lat, failed) = authorized_at(gw, pki, every, until).await;
    (lat.into_iter().map(|(_, l)| l).collect(), failed)
}

fn header_timeouts(body: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix("taskgate_gateway_header_timeouts "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .expect("taskgate_gateway_header_timeouts") as u64
}

async fn gateway_metrics(gw: SocketAddr, pki: &Pki) -> String {
    let (status, body) = Client::tls(&pki.ca, Some(&pki.client))
        .get(gw, "/gateway/metrics", Some(TOKEN_A))
        .await
        .unwrap();
    assert_eq!(status, 200);
    body
}

async fn start(dir: &std::path::Path, header_timeout: &str) -> (Gateway, Pki, Upstream) {
    let pki = Pki::new(dir);
    let up = Upstream::start(dir).await;
    let tokens = dir.join("tokens");
    write_tokens(&tokens, &[TOKEN_A]);
    let mut args = tls_args(&pki, &up, &tokens);
    args.extend(["--header-timeout".to_string(), header_timeout.to_string()]);
    let threads: String = env_or("EXHAUST_GATEWAY_THREADS", "2".to_string());
    args.extend(["--threads".to_string(), threads]);
    let gw = Gateway::start(&args, &[("GATEWAY_LOG", "warn")]).await;
    (gw, pki, up)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundred_tricklers_are_cut_and_half_done_handshakes_starve_nobody() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, pki, up) = start(dir.path(), "1s").await;
    let cfg = client_config(&pki);
    let give_up = Duration::from_secs(50);
    let half: Vec<_> = (0..100)
        .map(|i| half_handshake(gw.addr, i % 2 == 0, give_up))
        .collect();
    let tricklers: Vec<_> = (0..100)
        .map(|_| trickler(gw.addr, cfg.clone(), Duration::from_millis(200), give_up))
        .collect();

    // While all of them are open, an authorized client is served.
    let (lat, failed) = authorized(
        gw.addr,
        &pki,
        Duration::from_millis(50),
        Instant::now() + Duration::from_millis(500),
    )
    .await;
    assert!(!lat.is_empty());
    assert_eq!(failed, 0);

    for t in tricklers {
        let cut = t
            .await
            .unwrap()
            .expect("a trickling connection was cut by the header deadline");
        assert!(!cut.answered, "a trickled head got an answer");
    }
    assert!(header_timeouts(&gateway_metrics(gw.addr, &pki).await) >= 100);
    assert_eq!(
        up.calls(),
        lat.len(),
        "no trickled request reached the worker"
    );
    // The half-done handshakes are cut by the same deadline (1 s), each audited as a
    // TLS denial, and none got an answer.
    for h in half {
        let cut = h
            .await
            .unwrap()
            .expect("a half-done handshake was cut by the header deadline");
        assert!(!cut.answered, "a half-done handshake got an answer");
        assert!(
            cut.after >= Duration::from_millis(900) && cut.after < Duration::from_secs(10),
            "half-done handshake cut after {:?} (deadline 1 s)",
            cut.after
        );
    }
    gw.wait_audit("tls", 100).await;
    // The gateway serves regardless.
    assert_eq!(
        Client::tls(&pki.ca, Some(&pki.client))
            .get(gw.addr, "/metrics", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );
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

fn summary(cuts: &[Option<Cut>]) -> (usize, usize, String) {
    let mut ms: Vec<u64> = cuts
        .iter()
        .flatten()
        .map(|c| c.after.as_millis() as u64)
        .collect();
    let answered = cuts.iter().flatten().filter(|c| c.answered).count();
    let cut = ms.len();
    let s = format!(
        "min {} / p50 {} / p99 {} / max {} ms",
        pct(&mut ms, 0.0),
        pct(&mut ms, 0.5),
        pct(&mut ms, 0.99),
        pct(&mut ms, 1.0)
    );
    (cut, answered, s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "minutes long; run by tests/bench/gateway_exhaustion"]
async fn thousand_tricklers_and_thousand_half_done_handshakes() {
    let n: usize = env_or("EXHAUST_CONNS", 1000);
    let header_timeout: u64 = env_or("EXHAUST_HEADER_TIMEOUT_SECS", 5);
    let baseline_secs: u64 = env_or("EXHAUST_BASELINE_SECS", 10);
    let every = Duration::from_millis(env_or("EXHAUST_AUTH_EVERY_MS", 20));
    // The header deadline bounds the TLS handshake too.
    let handshake_deadline = Duration::from_secs(header_timeout);
    let dir = tempfile::tempdir().unwrap();
    let (gw, pki, up) = start(dir.path(), &format!("{header_timeout}s")).await;
    let cfg = client_config(&pki);
    let rss_start = gw.rss_kb();

    let (mut base, base_failed) = authorized(
        gw.addr,
        &pki,
        every,
        Instant::now() + Duration::from_secs(baseline_secs),
    )
    .await;

    let give_up = handshake_deadline + Duration::from_secs(30);
    let attack_start = Instant::now();
    let half: Vec<_> = (0..n)
        .map(|i| half_handshake(gw.addr, i % 2 == 0, give_up))
        .collect();
    let mut tricklers = Vec::new();
    for _ in 0..n {
        tricklers.push(trickler(
            gw.addr,
            cfg.clone(),
            Duration::from_secs(1),
            give_up,
        ));
    }
    let opened = attack_start.elapsed();
    let fds_peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let rss_peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let (fds_peak, rss_peak, pid) = (fds_peak.clone(), rss_peak.clone(), gw.pid());
        tokio::spawn(async move {
            loop {
                let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
                fds_peak.fetch_max(fds as u64, std::sync::atomic::Ordering::Relaxed);
                let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .unwrap_or_default()
                    .lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                    .unwrap_or(0);
                rss_peak.fetch_max(rss, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    // Authorized traffic throughout the attack and for a while after every cut; split
    // into phases afterwards.
    let attack_for = handshake_deadline * 2 + Duration::from_secs(10);
    let (under_at, under_failed) =
        authorized_at(gw.addr, &pki, every, attack_start + attack_for).await;
    let load_during = loadavg();
    let mut trickle_cuts = Vec::new();
    for t in tricklers {
        trickle_cuts.push(t.await.unwrap());
    }
    let mut half_cuts = Vec::new();
    for h in half {
        half_cuts.push(h.await.unwrap());
    }
    sampler.abort();
    let metrics = gateway_metrics(gw.addr, &pki).await;

    let (t_cut, t_answered, t_sum) = summary(&trickle_cuts);
    let (h_cut, h_answered, h_sum) = summary(&half_cuts);
    let t_late = trickle_cuts
        .iter()
        .flatten()
        .filter(|c| c.after > Duration::from_secs(header_timeout + 2))
        .count();
    let h_late = half_cuts
        .iter()
        .flatten()
        .filter(|c| c.after > handshake_deadline + Duration::from_secs(2))
        .count();
    let (b50, b99) = (pct(&mut base, 0.5), pct(&mut base, 0.99));
    // Phases: (1) the tricklers' TLS handshakes (until the last one completed), (2) all
    // of them trickling (until the first cut), (3) only the half-done handshakes held.
    let cuts: Vec<Cut> = trickle_cuts.iter().flatten().copied().collect();
    let handshakes_done = cuts.iter().map(|c| c.started).max().unwrap_or(attack_start);
    let first_cut = cuts
        .iter()
        .map(|c| c.started + c.after)
        .min()
        .unwrap_or(handshakes_done);
    let last_cut = cuts
        .iter()
        .map(|c| c.started + c.after)
        .max()
        .unwrap_or(first_cut);
    let phase_end = attack_start + attack_for;
    let phases = [
        ("  1. tricklers' handshakes", attack_start, handshakes_done),
        ("  2. all 2000 held, trickling", handshakes_done, first_cut),
        ("  3. after the cuts", last_cut, phase_end),
    ];
    let mut under: Vec<u64> = under_at.iter().map(|(_, l)| *l).collect();
    let (u50, u99) = (pct(&mut under, 0.5), pct(&mut under, 0.99));
    println!(
        "\n== slowloris and half-done handshakes: figures (load now {}, during {load_during})",
        loadavg()
    );
    let fig = |k: &str, v: String| println!("{k:<44} {v}");
    fig(
        "hostile connections opened",
        format!("{n} trickling + {n} half-done handshakes ({} with a partial ClientHello) in {opened:?}", n.div_ceil(2)),
    );
    fig(
        "tricklers cut / answered / later than deadline+2s",
        format!("{t_cut}/{n} / {t_answered} / {t_late} (header deadline {header_timeout}s)"),
    );
    fig("trickler cut after (from handshake)", t_sum);
    fig(
        "half handshakes cut / answered / later than deadline + 2s",
        format!("{h_cut}/{n} / {h_answered} / {h_late} (the header deadline bounds the handshake)"),
    );
    fig("half handshake cut after (from connect)", h_sum);
    fig(
        "taskgate_gateway_header_timeouts",
        header_timeouts(&metrics).to_string(),
    );
    fig(
        "gateway fds peak / RSS start / RSS peak (kB)",
        format!(
            "{} / {rss_start} / {}",
            fds_peak.load(std::sync::atomic::Ordering::Relaxed),
            rss_peak.load(std::sync::atomic::Ordering::Relaxed)
        ),
    );
    fig(
        "authorized baseline: n / failed / p50 / p99",
        format!("{} / {base_failed} / {b50} µs / {b99} µs", base.len()),
    );
    fig(
        "authorized under attack: n / failed / p50 / p99",
        format!("{} / {under_failed} / {u50} µs / {u99} µs", under.len()),
    );
    for (name, from, to) in phases {
        let mut v: Vec<u64> = under_at
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, l)| *l)
            .collect();
        let (p50, p99) = (pct(&mut v, 0.5), pct(&mut v, 0.99));
        fig(
            name,
            format!(
                "{:.1}s..{:.1}s: n {} / p50 {p50} µs / p99 {p99} µs / p99 {:.2}x baseline",
                from.saturating_duration_since(attack_start).as_secs_f64(),
                to.saturating_duration_since(attack_start).as_secs_f64(),
                v.len(),
                p99 as f64 / b99.max(1) as f64
            ),
        );
    }
    fig(
        "p99 whole attack / baseline (goal <= 2x)",
        format!("{:.2}x", u99 as f64 / b99.max(1) as f64),
    );
    assert_eq!(t_cut, n, "every trickler is cut");
    assert_eq!(h_cut, n, "every half-done handshake is cut");
    assert_eq!(t_answered + h_answered, 0);
    assert_eq!(up.calls(), base.len() + under.len());
}
