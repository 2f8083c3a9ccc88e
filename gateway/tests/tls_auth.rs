//! mTLS, bearer tokens, rotation and reload, the path allow-list and header stripping,
//! seen from a real TLS client in front of the real binary.

mod common;

use std::time::Duration;

use common::*;
use taskgate_test_support::eventually::eventually;

struct Setup {
    _dir: tempfile::TempDir,
    pki: Pki,
    up: Upstream,
    tokens: std::path::PathBuf,
    gw: Gateway,
}

async fn setup(extra: &[&str]) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let up = Upstream::start(dir.path()).await;
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[TOKEN_A, TOKEN_B]);
    let mut args = tls_args(&pki, &up, &tokens);
    args.extend(extra.iter().map(|s| s.to_string()));
    let gw = Gateway::start(&args, &[]).await;
    Setup {
        _dir: dir,
        pki,
        up,
        tokens,
        gw,
    }
}

#[tokio::test]
async fn client_without_a_certificate_or_from_another_ca_fails_the_handshake() {
    let s = setup(&[]).await;
    let no_cert = Client::tls(&s.pki.ca, None);
    let e = no_cert
        .get(s.gw.addr, "/metrics", Some(TOKEN_A))
        .await
        .unwrap_err();
    assert!(
        e.contains("tls") || e.contains("request") || e.contains("handshake"),
        "{e}"
    );
    let foreign = Client::tls(&s.pki.ca, Some(&s.pki.foreign_client));
    foreign
        .get(s.gw.addr, "/metrics", Some(TOKEN_A))
        .await
        .unwrap_err();
    assert_eq!(s.up.calls(), 0, "nothing reached the upstream");
    s.gw.wait_audit("tls", 2).await;
    // The audit line names the remote address.
    let line =
        s.gw.audit()
            .into_iter()
            .find(|v| v["reason"] == "tls")
            .unwrap();
    assert!(
        line["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{line}"
    );
}

#[tokio::test]
async fn tokens_are_checked_rotated_and_never_reach_the_upstream() {
    let s = setup(&[]).await;
    let client = Client::tls(&s.pki.ca, Some(&s.pki.client));
    let mut conn = client.connect(s.gw.addr).await.unwrap();

    let (status, _) = send(&mut conn, "/metrics", None).await.unwrap();
    assert_eq!(status, 401, "no token");
    // The denial kept the connection alive: the same connection serves the next request.
    let (status, _) = send(&mut conn, "/metrics", Some("wrong-token-xxxxxxxxxxxx"))
        .await
        .unwrap();
    assert_eq!(status, 401, "wrong token");
    assert_eq!(s.up.calls(), 0);

    for token in [TOKEN_A, TOKEN_B] {
        let (status, body) = send(&mut conn, "/metrics", Some(token)).await.unwrap();
        assert_eq!(status, 200, "rotated token accepted");
        assert_eq!(body, "upstream saw /metrics\n");
    }
    assert_eq!(s.up.calls(), 2);
    for head in s.up.heads() {
        assert!(
            !head.to_ascii_lowercase().contains("authorization"),
            "credential leaked upstream: {head}"
        );
        assert!(!head.contains(TOKEN_A) && !head.contains(TOKEN_B));
    }

    // Audit: one line per denial with the reason, never the token.
    s.gw.wait_audit("bad_token", 1).await;
    s.gw.wait_audit("no_token", 1).await;
    let audit = s.gw.audit();
    assert_eq!(
        audit.iter().filter(|v| v["reason"] == "no_token").count(),
        1
    );
    let bad = audit
        .iter()
        .find(|v| v["reason"] == "bad_token")
        .expect("bad_token line");
    assert_eq!(bad["method"], "GET");
    assert_eq!(bad["path"], "/metrics");
    assert!(bad["timestamp"].is_string());
    assert!(bad["remote"].as_str().unwrap().starts_with("127.0.0.1:"));
    let all_logs = s.gw.logs().join("\n");
    for secret in [TOKEN_A, TOKEN_B, "wrong-token-xxxxxxxxxxxx"] {
        assert!(!all_logs.contains(secret), "a token reached the log");
    }
}

#[tokio::test]
async fn editing_the_token_file_takes_effect_without_restart() {
    // Until the reload lands, every poll below is a 401 charged to this host; at the
    // default limit (10) a slow reload got the host a 429 and failed the test.
    let s = setup(&["--auth-limit", "100000"]).await;
    let client = Client::tls(&s.pki.ca, Some(&s.pki.client));
    assert_eq!(
        client
            .get(s.gw.addr, "/healthz", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );
    let pid = s.gw.pid();

    write_tokens(&s.tokens, &["token-cccccccccccccccccccc"]);
    eventually("new token accepted", Duration::from_secs(10), || {
        let c = client.clone();
        let addr = s.gw.addr;
        async move {
            (c.get(addr, "/healthz", Some("token-cccccccccccccccccccc"))
                .await
                .ok()?
                .0
                == 200)
                .then_some(())
        }
    })
    .await;
    assert_eq!(
        client
            .get(s.gw.addr, "/healthz", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        401,
        "old token refused"
    );

    // A broken file keeps the old tokens and says why.
    std::fs::write(&s.tokens, "# nothing here\n").unwrap();
    s.gw.wait_log("token reload failed").await;
    assert_eq!(
        client
            .get(s.gw.addr, "/healthz", Some("token-cccccccccccccccccccc"))
            .await
            .unwrap()
            .0,
        200
    );
    assert_eq!(s.gw.pid(), pid);
}

#[tokio::test]
async fn other_paths_are_404_without_touching_the_upstream() {
    let s = setup(&[]).await;
    let client = Client::tls(&s.pki.ca, Some(&s.pki.client));
    let mut conn = client.connect(s.gw.addr).await.unwrap();
    for path in ["/anything-else", "/metrics/", "/admin", "/"] {
        let (status, body) = send(&mut conn, path, Some(TOKEN_A)).await.unwrap();
        assert_eq!(status, 404, "{path}");
        assert_eq!(body, "not found\n");
    }
    assert_eq!(s.up.calls(), 0, "upstream never called");
    assert_eq!(s.gw.wait_audit("path", 4).await, 4);
    // Events and health pass with a token.
    assert_eq!(
        send(&mut conn, "/healthz", Some(TOKEN_A)).await.unwrap().0,
        200
    );
}

#[tokio::test]
async fn client_san_allow_list_limits_identities() {
    let s = setup(&["--tls-client-allowed-san", "grafana.example"]).await;
    let prometheus = Client::tls(&s.pki.ca, Some(&s.pki.client));
    assert!(
        prometheus
            .get(s.gw.addr, "/healthz", Some(TOKEN_A))
            .await
            .is_err(),
        "SAN not allowed"
    );
    let grafana_cert = s.pki.ca.client(&["grafana.example"]);
    let grafana = Client::tls(&s.pki.ca, Some(&grafana_cert));
    assert_eq!(
        grafana
            .get(s.gw.addr, "/healthz", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );
}

#[tokio::test]
async fn certificate_reload_on_sighup_keeps_open_connections() {
    let s = setup(&[]).await;
    let client = Client::tls(&s.pki.ca, Some(&s.pki.client));
    let mut open = client.connect(s.gw.addr).await.unwrap();
    assert_eq!(
        send(&mut open, "/healthz", Some(TOKEN_A)).await.unwrap().0,
        200
    );

    // Replace the server certificate with one from a new CA and the client CA with it.
    let new_ca = taskgate_test_support::pki::Ca::new("rotated CA");
    let new_server = new_ca.server(&["localhost"]);
    std::fs::write(&s.pki.cert, &new_server.cert_pem).unwrap();
    std::fs::write(&s.pki.key, &new_server.key_pem).unwrap();
    std::fs::write(&s.pki.ca_file, &new_ca.cert_pem).unwrap();
    s.gw.signal("HUP");
    let new_client = Client::tls(
        &new_ca,
        Some(&new_ca.client(&["prometheus.monitoring.svc"])),
    );
    eventually("new certificate served", Duration::from_secs(10), || {
        let c = new_client.clone();
        let addr = s.gw.addr;
        async move { (c.get(addr, "/healthz", Some(TOKEN_A)).await.ok()?.0 == 200).then_some(()) }
    })
    .await;
    // The connection opened before the reload still works.
    assert_eq!(
        send(&mut open, "/healthz", Some(TOKEN_A)).await.unwrap().0,
        200
    );
    // A broken key is refused and the current material kept.
    std::fs::write(&s.pki.key, "not a key").unwrap();
    s.gw.signal("HUP");
    s.gw.wait_log("TLS reload failed").await;
    assert_eq!(
        new_client
            .get(s.gw.addr, "/healthz", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );
}

#[tokio::test]
async fn gateway_metrics_are_behind_the_same_auth() {
    let s = setup(&[]).await;
    let client = Client::tls(&s.pki.ca, Some(&s.pki.client));
    let mut conn = client.connect(s.gw.addr).await.unwrap();
    assert_eq!(
        send(&mut conn, "/gateway/metrics", None).await.unwrap().0,
        401
    );
    assert_eq!(
        send(&mut conn, "/nope", Some(TOKEN_A)).await.unwrap().0,
        404
    );
    let (status, body) = send(&mut conn, "/gateway/metrics", Some(TOKEN_A))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("taskgate_gateway_denials_total{reason=\"no_token\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("taskgate_gateway_denials_total{reason=\"path\"} 1"),
        "{body}"
    );
    assert!(
        body.contains("taskgate_gateway_limiter_entries 1"),
        "{body}"
    );
    assert_eq!(s.up.calls(), 0, "served by the gateway itself");
}
