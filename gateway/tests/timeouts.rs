//! The header deadline (slowloris) and unbuffered SSE streaming.

mod common;

use std::time::{Duration, Instant};

use common::*;
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn slowloris_is_cut_within_the_header_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let up = Upstream::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[TOKEN_A]);
    let mut args = tls_args(&pki, &up, &tokens);
    args.extend(["--header-timeout".to_string(), "1s".to_string()]);
    let gw = Gateway::start(&args, &[]).await;

    let client = Client::tls(&pki.ca, Some(&pki.client));
    let cfg = {
        // A raw TLS stream, so the client controls every byte.
        let tcp = client.tcp(gw.addr).await.unwrap();
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            use rustls::pki_types::pem::PemObject;
            r.add(
                rustls::pki_types::CertificateDer::from_pem_slice(pki.ca.cert_pem.as_bytes())
                    .unwrap(),
            )
            .unwrap();
            r
        };
        use rustls::pki_types::pem::PemObject;
        let cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(
            vec![
                rustls::pki_types::CertificateDer::from_pem_slice(pki.client.cert_pem.as_bytes())
                    .unwrap(),
            ],
            rustls::pki_types::PrivateKeyDer::from_pem_slice(pki.client.key_pem.as_bytes())
                .unwrap(),
        )
        .unwrap();
        (tcp, std::sync::Arc::new(cfg))
    };
    let (tcp, cfg) = cfg;
    let tls = tokio_rustls::TlsConnector::from(cfg)
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (mut rd, mut wr) = tokio::io::split(tls);
    let start = Instant::now();
    let trickle = tokio::spawn(async move {
        let _ = wr.write_all(b"GET /metrics HTTP/1.1\r\n").await;
        for _ in 0..100 {
            if wr.write_all(b"x").await.is_err() || wr.flush().await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let mut buf = [0u8; 256];
    let n = tokio::time::timeout(Duration::from_secs(8), rd.read(&mut buf))
        .await
        .expect("the gateway cut the connection")
        .unwrap_or(0);
    let took = start.elapsed();
    trickle.abort();
    assert!(
        n == 0 || !String::from_utf8_lossy(&buf[..n]).contains("200"),
        "no answer to a trickled head"
    );
    assert!(
        took >= Duration::from_millis(900),
        "cut too early: {took:?}"
    );
    assert!(took < Duration::from_secs(3), "cut too late: {took:?}");
    assert_eq!(up.calls(), 0);

    // A client that sends nothing at all is cut too.
    let mut idle = client.connect(gw.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        send(&mut idle, "/metrics", Some(TOKEN_A)).await.is_err(),
        "silent connection was closed"
    );

    // A well-behaved client in between is served.
    assert_eq!(
        client
            .get(gw.addr, "/metrics", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &["--idle-timeout", "1s"]);
    let gw = Gateway::start(&args, &[("METRICS_AUTH_TOKEN", TOKEN_A)]).await;
    let mut tcp = Client::plain().tcp(gw.addr).await.unwrap();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nauthorization: Bearer token-aaaaaaaaaaaaaaaaaaaa\r\n\r\n")
        .await
        .unwrap();
    let start = Instant::now();
    // Read the answer, then keep reading: the gateway closes the idle connection.
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
            .await
            .expect("idle connection closed within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
    }
    let took = start.elapsed();
    assert!(
        String::from_utf8_lossy(&seen).starts_with("HTTP/1.1 200"),
        "answered first"
    );
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "closed after {took:?}"
    );
}

#[tokio::test]
async fn sse_stream_arrives_event_by_event() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let up = Upstream::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[TOKEN_A]);
    let gw = Gateway::start(&tls_args(&pki, &up, &tokens), &[]).await;

    let client = Client::tls(&pki.ca, Some(&pki.client));
    let mut conn = client.connect(gw.addr).await.unwrap();
    conn.ready().await.unwrap();
    let resp = conn
        .send_request(request("/events", Some(TOKEN_A)))
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body();
    for (i, expected) in ["data: one", "data: two", "data: three"].iter().enumerate() {
        // The upstream holds back the next event until told to send it, so receiving
        // this one proves the gateway did not wait for more.
        let mut got = String::new();
        while !got.contains(expected) {
            let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
                .await
                .unwrap_or_else(|_| {
                    panic!("event {i} not delivered while the upstream holds the next one")
                })
                .expect("stream open")
                .expect("frame");
            if let Ok(data) = frame.into_data() {
                got.push_str(&String::from_utf8_lossy(&data));
            }
        }
        up.sse_next.notify_one();
    }
    let heads = up.heads();
    assert!(!heads[0].to_ascii_lowercase().contains("authorization"));
}
