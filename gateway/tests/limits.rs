//! The per-host limiter of unauthorized hits: the limit, recovery, isolation between
//! hosts, and a flood from 50,000 addresses against a table of 1,000.

mod common;

use std::{
    net::SocketAddr,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use taskgate_test_support::eventually::eventually;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn over_the_limit_gets_429_other_hosts_unaffected_and_recovery_after_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let up = Upstream::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[TOKEN_A]);
    let gw = Gateway::start(
        &tls_args(&pki, &up, &tokens),
        &[("METRICS_AUTH_LIMIT", "3"), ("METRICS_AUTH_WINDOW", "6s")],
    )
    .await;
    let a = Client::tls(&pki.ca, Some(&pki.client)).from("127.0.0.2");
    let b = Client::tls(&pki.ca, Some(&pki.client)).from("127.0.0.3");

    let mut conn = a.connect(gw.addr).await.unwrap();
    for _ in 0..3 {
        assert_eq!(
            send(&mut conn, "/metrics", Some("bad-token-xxxxxxxxxxxxx"))
                .await
                .unwrap()
                .0,
            401
        );
    }
    let (status, _) = send(&mut conn, "/metrics", Some("bad-token-xxxxxxxxxxxxx"))
        .await
        .unwrap();
    assert_eq!(status, 429);
    assert!(
        send(&mut conn, "/metrics", Some(TOKEN_A)).await.is_err(),
        "429 closes the connection"
    );
    // While penalized, even a good token is refused, and more hits add no log lines.
    for _ in 0..5 {
        assert_eq!(
            a.get(gw.addr, "/metrics", Some(TOKEN_A)).await.unwrap().0,
            429
        );
    }
    // Another host is unaffected.
    assert_eq!(
        b.get(gw.addr, "/metrics", Some(TOKEN_A)).await.unwrap().0,
        200
    );
    assert_eq!(b.get(gw.addr, "/metrics", None).await.unwrap().0, 401);

    eventually("host A recovers after the window", Duration::from_secs(15), || {
        let a = a.clone();
        let addr = gw.addr;
        async move { (a.get(addr, "/metrics", Some(TOKEN_A)).await.ok()?.0 == 200).then_some(()) }
    })
    .await;

    assert_eq!(gw.wait_audit("bad_token", 3).await, 3);
    let limited: Vec<_> = gw
        .audit()
        .into_iter()
        .filter(|v| v["reason"] == "rate_limited")
        .collect();
    assert_eq!(
        limited.len(),
        1,
        "one summary line per window, not one per request: {limited:?}"
    );
    assert_eq!(limited[0]["host"], "127.0.0.2");
}

/// One unauthorized request on a fresh plain connection from `source`; the status code.
async fn bad_hit(gw: SocketAddr, source: std::net::IpAddr) -> u16 {
    let client = Client::plain().from(&source.to_string());
    let mut tcp = client.tcp(gw).await.expect("connect");
    tcp.write_all(
        b"GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer wrong-token-xxxxxxxxx\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = [0u8; 12];
    tcp.read_exact(&mut buf).await.expect("status line");
    std::str::from_utf8(&buf[9..12]).unwrap().parse().unwrap()
}

fn metric(body: &str, name: &str) -> u64 {
    body.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .and_then(|v| v.trim().parse::<f64>().ok())
        })
        .unwrap_or_else(|| panic!("{name} missing")) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_from_50000_addresses_keeps_the_table_bounded_and_the_penalty() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &[]);
    let gw = Gateway::start(
        &args,
        &[
            ("METRICS_AUTH_TOKEN", TOKEN_A),
            ("METRICS_AUTH_LIMIT", "3"),
            ("METRICS_AUTH_WINDOW", "600s"),
            ("METRICS_AUTH_MAX_ENTRIES", "1000"),
            ("GATEWAY_LOG", "warn"),
        ],
    )
    .await;
    let victim: std::net::IpAddr = "127.0.0.2".parse().unwrap();
    for _ in 0..3 {
        assert_eq!(bad_hit(gw.addr, victim).await, 401);
    }
    assert_eq!(bad_hit(gw.addr, victim).await, 429);
    let scraper = Client::plain().from("127.0.0.1");
    let victim_client = Client::plain().from("127.0.0.2");

    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    const TOTAL: usize = 50_000;
    let mut rss_after_first_batch = 0;
    let mut max_entries = 0;
    for batch in 0..10 {
        let end = (batch + 1) * TOTAL / 10;
        let mut tasks = Vec::new();
        for _ in 0..24 {
            let next = next.clone();
            let addr = gw.addr;
            tasks.push(tokio::spawn(async move {
                let mut statuses = [0usize; 2];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= end {
                        next.fetch_min(end, Ordering::Relaxed);
                        return statuses;
                    }
                    let ip =
                        std::net::Ipv4Addr::new(127, 1 + (i >> 16) as u8, (i >> 8) as u8, i as u8);
                    match bad_hit(addr, ip.into()).await {
                        401 => statuses[0] += 1,
                        429 => statuses[1] += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        // Throughout: the penalized host stays penalized, the table stays bounded.
        assert_eq!(
            victim_client
                .get(gw.addr, "/metrics", Some(TOKEN_A))
                .await
                .unwrap()
                .0,
            429,
            "batch {batch}"
        );
        let (status, body) = scraper
            .get(gw.addr, "/gateway/metrics", Some(TOKEN_A))
            .await
            .unwrap();
        assert_eq!(status, 200);
        let entries = metric(&body, "taskgate_gateway_limiter_entries");
        assert!(entries <= 1000, "table grew to {entries}");
        max_entries = max_entries.max(entries);
        if batch == 0 {
            rss_after_first_batch = gw.rss_kb();
        }
    }
    let (_, body) = scraper
        .get(gw.addr, "/gateway/metrics", Some(TOKEN_A))
        .await
        .unwrap();
    assert_eq!(metric(&body, "taskgate_gateway_limiter_entries"), 1000);
    assert!(metric(&body, "taskgate_gateway_limiter_overflow_hits_total") >= 48_000);
    assert_eq!(
        metric(&body, "taskgate_gateway_limiter_evictions_total"),
        0,
        "nobody had refilled"
    );
    let rss_end = gw.rss_kb();
    eprintln!(
        "50k flood: {:?}, max entries {max_entries}, RSS after 5k {rss_after_first_batch} kB, after 50k {rss_end} kB",
        started.elapsed()
    );
    assert!(
        rss_end < rss_after_first_batch + 8 * 1024,
        "memory grew from {rss_after_first_batch} kB to {rss_end} kB"
    );
    // The flood did not flood the log: summaries, not a line per 429.
    let limited = gw.audit_reasons("rate_limited");
    assert!(limited <= 3, "{limited} rate_limited lines");
}
