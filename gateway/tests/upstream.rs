//! The worker side of the gateway: what a client sees when the worker is down, comes
//! back, or closes a kept-alive connection between requests.

mod common;

use std::{
    path::Path,
    sync::{
        atomic::{AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use common::*;
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::UnixListener,
};

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_worker_that_is_down_gets_502_and_the_gateway_recovers_when_it_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("absent.sock");
    let args = args_for(&socket, &[]);
    let gw = Gateway::start(&args, &[("METRICS_AUTH_TOKEN", TOKEN_A)]).await;

    let mut conn = Client::plain().connect(gw.addr).await.unwrap();
    let (status, body) = send(&mut conn, "/metrics", Some(TOKEN_A)).await.unwrap();
    assert_eq!(status, 502);
    assert!(body.contains("worker could not be reached"), "{body}");
    // The client's connection survives the upstream failure.
    let (status, text) = send(&mut conn, "/gateway/metrics", Some(TOKEN_A))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(metric(&text, "taskgate_gateway_upstream_errors_total"), 1);

    // The worker comes up at that path: the same client connection is served.
    let up = Upstream::start_at(&socket).await;
    let (status, _) = send(&mut conn, "/metrics", Some(TOKEN_A)).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(up.calls(), 1);
}

/// A plain-HTTP gateway in front of the worker socket `socket`.
fn args_for(socket: &Path, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--upstream".to_string(),
        format!("unix:{}", socket.display()),
        "--insecure-plaintext".to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A worker on `listener` that counts its connections and answers `ok` to every request.
/// With `keep_alive` false it closes each connection shortly after its first answer,
/// without saying so (no `Connection: close`), as a worker does when its idle bound
/// passes.
async fn fake_worker(listener: UnixListener, accepted: Arc<AtomicUsize>, keep_alive: bool) {
    while let Ok((stream, _)) = listener.accept().await {
        accepted.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut rd = BufReader::new(stream);
            let mut line = String::new();
            loop {
                line.clear();
                if rd.read_line(&mut line).await.unwrap_or(0) == 0 {
                    return;
                }
                if line != "\r\n" {
                    continue;
                }
                let answered = rd
                    .get_mut()
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
                    .await
                    .is_ok();
                if !answered || !keep_alive {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    return;
                }
            }
        });
    }
}

#[tokio::test]
async fn a_worker_closing_a_kept_alive_connection_costs_the_client_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("worker.sock");
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn(fake_worker(
        UnixListener::bind(&socket).unwrap(),
        accepted.clone(),
        false,
    ));
    let args = args_for(&socket, &[]);
    let gw = Gateway::start(&args, &[("METRICS_AUTH_TOKEN", TOKEN_A)]).await;

    let mut conn = Client::plain().connect(gw.addr).await.unwrap();
    for i in 0..5 {
        let (status, body) = send(&mut conn, "/metrics", Some(TOKEN_A)).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "ok\n"), "request {i}");
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        5,
        "one worker connection per request"
    );
}

#[tokio::test]
async fn client_connections_share_pooled_worker_connections() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("worker.sock");
    let accepted = Arc::new(AtomicUsize::new(0));
    tokio::spawn(fake_worker(
        UnixListener::bind(&socket).unwrap(),
        accepted.clone(),
        true,
    ));
    let args = args_for(&socket, &["--threads", "1"]);
    let gw = Gateway::start(&args, &[("METRICS_AUTH_TOKEN", TOKEN_A)]).await;

    // Three client connections, one request at a time: one worker connection serves
    // them all, and none is held by a client connection between its requests.
    let mut conns = Vec::new();
    for _ in 0..3 {
        conns.push(Client::plain().connect(gw.addr).await.unwrap());
    }
    for round in 0..3 {
        for conn in conns.iter_mut() {
            let (status, body) = send(conn, "/metrics", Some(TOKEN_A)).await.unwrap();
            assert_eq!((status, body.as_str()), (200, "ok\n"), "round {round}");
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn hop_by_hop_headers_and_credentials_stay_on_the_client_hop() {
    use tokio::io::AsyncReadExt;
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let gw = Gateway::start(
        &plaintext_args(&up, &[]),
        &[("METRICS_AUTH_TOKEN", TOKEN_A)],
    )
    .await;
    let mut tcp = Client::plain().tcp(gw.addr).await.unwrap();
    let req = format!(
        "GET /metrics HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN_A}\r\n\
         connection: keep-alive, x-hop-secret\r\nx-hop-secret: 1\r\nkeep-alive: timeout=5\r\n\
         proxy-authorization: Basic Zm9vOmJhcg==\r\nx-end-to-end: kept\r\n\r\n"
    );
    tcp.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tcp.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let head = up
        .heads()
        .pop()
        .expect("the upstream saw the request")
        .to_lowercase();
    assert!(head.contains("x-end-to-end: kept"), "{head}");
    for gone in ["authorization", "x-hop-secret", "keep-alive", "connection"] {
        assert!(!head.contains(gone), "{gone} reached the worker: {head}");
    }
}
