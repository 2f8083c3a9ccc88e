//! The gateway's own denials (401, 404, 429) tell caches not to store them and browsers
//! not to sniff them (found by tests/tls/scan: testssl rates a response without any
//! security header MEDIUM).

mod common;

use std::net::SocketAddr;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One request on a fresh plain connection; the response head, lower-cased.
async fn head(gw: SocketAddr, path: &str, token: Option<&str>) -> String {
    let mut tcp = Client::plain().tcp(gw).await.expect("connect");
    let auth = token.map_or(String::new(), |t| format!("authorization: Bearer {t}\r\n"));
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tcp.read(&mut chunk).await.expect("read");
        assert!(n > 0, "closed before the head ended: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8_lossy(&buf).to_ascii_lowercase()
}

#[tokio::test]
async fn denials_carry_no_store_and_nosniff() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &[]);
    let gw = Gateway::start(
        &args,
        &[("METRICS_AUTH_TOKEN", TOKEN_A), ("METRICS_AUTH_LIMIT", "1")],
    )
    .await;
    let not_found = head(gw.addr, "/not-proxied", Some(TOKEN_A)).await;
    let unauthorized = head(gw.addr, "/metrics", None).await;
    let limited = head(gw.addr, "/metrics", None).await;
    for (status, h) in [
        ("404", &not_found),
        ("401", &unauthorized),
        ("429", &limited),
    ] {
        assert!(h.starts_with(&format!("http/1.1 {status}")), "{h}");
        assert!(h.contains("\r\ncache-control: no-store\r\n"), "{h}");
        assert!(h.contains("\r\nx-content-type-options: nosniff\r\n"), "{h}");
    }
    assert_eq!(up.calls(), 0, "no denial reached the worker");
}
