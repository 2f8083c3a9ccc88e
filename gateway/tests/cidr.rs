//! The CIDR filter drops a source outside the allow-list before any TLS byte.

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncReadExt;

#[tokio::test]
async fn source_outside_the_allow_list_is_dropped_before_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let up = Upstream::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[TOKEN_A]);
    let mut args = tls_args(&pki, &up, &tokens);
    args.extend(["--allow-cidr".to_string(), "127.0.0.1/32".to_string()]);
    let gw = Gateway::start(&args, &[]).await;

    // From 127.0.0.2: the TCP connection is closed without a single byte, even though
    // the client sends a ClientHello.
    let outsider = Client::tls(&pki.ca, Some(&pki.client)).from("127.0.0.2");
    let mut tcp = outsider
        .tcp(gw.addr)
        .await
        .expect("kernel completes the TCP handshake");
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), tcp.read(&mut buf))
        .await
        .expect("closed promptly")
        .unwrap_or(0);
    assert_eq!(n, 0, "no TLS bytes from the gateway");
    assert!(outsider
        .get(gw.addr, "/metrics", Some(TOKEN_A))
        .await
        .is_err());

    // From 127.0.0.1 everything works.
    let insider = Client::tls(&pki.ca, Some(&pki.client)).from("127.0.0.1");
    assert_eq!(
        insider
            .get(gw.addr, "/metrics", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );

    gw.wait_audit("cidr", 2).await;
    let audit = gw.audit();
    let line = audit.iter().find(|v| v["reason"] == "cidr").unwrap();
    assert!(
        line["remote"].as_str().unwrap().starts_with("127.0.0.2:"),
        "{line}"
    );
    assert_eq!(
        gw.audit_reasons("tls"),
        0,
        "no handshake was attempted with the outsider"
    );
    assert_eq!(up.calls(), 1);
    let startup = gw.logs().join("\n");
    assert!(startup.contains("CIDR allow-list in force"), "{startup}");
}

#[tokio::test]
async fn empty_allow_list_allows_all_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &[]);
    let gw = Gateway::start(&args, &[("METRICS_AUTH_TOKEN", TOKEN_A)]).await;
    let c = Client::plain().from("127.0.0.9");
    assert_eq!(
        c.get(gw.addr, "/metrics", Some(TOKEN_A)).await.unwrap().0,
        200
    );
    gw.wait_log("connections from every source address are accepted")
        .await;
    gw.wait_log("--insecure-plaintext").await;
}
