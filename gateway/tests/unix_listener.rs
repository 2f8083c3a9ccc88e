//! The gateway listening on a Unix socket (`--listen unix:PATH`), as a local front for
//! processes on the same host: requests are served on every event loop, a host limit
//! never applies (there is no peer address to key on), a live socket is never taken
//! over, and a stale one left by a killed gateway is.

mod common;

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use common::*;
use taskgate_test_support::eventually::eventually;
use tokio::net::UnixStream;

fn gateway_on(socket: &Path, up: &Upstream) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("METRICS_AUTH_TOKEN", TOKEN_A)
        .env("METRICS_AUTH_LIMIT", "2")
        .args(["--listen", &format!("unix:{}", socket.display())])
        .args(["--upstream", &format!("unix:{}", up.socket.display())])
        .args(["--insecure-plaintext", "--threads", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

async fn serving(socket: &Path, child: &mut Child) {
    eventually(
        "gateway listening on its socket",
        Duration::from_secs(20),
        || {
            let exited = child.try_wait().ok().flatten();
            let socket = socket.to_path_buf();
            async move {
                if let Some(status) = exited {
                    panic!("gateway exited early: {status}");
                }
                UnixStream::connect(&socket).await.ok().map(|_| ())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn a_unix_socket_listener_serves_every_loop_and_is_never_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let socket = dir.path().join("gateway.sock");
    let mut first = gateway_on(&socket, &up).spawn().unwrap();
    serving(&socket, &mut first).await;

    // Four connections, so both loops get some; each is denied more often than the
    // limit allows and is still answered 401, never 429, then served.
    for _ in 0..4 {
        let mut conn = http1(UnixStream::connect(&socket).await.unwrap())
            .await
            .unwrap();
        for _ in 0..3 {
            let (status, _) = send(&mut conn, "/metrics", Some("bad-token-yyyyyyyyyyyy"))
                .await
                .unwrap();
            assert_eq!(status, 401);
        }
        let (status, body) = send(&mut conn, "/metrics", Some(TOKEN_A)).await.unwrap();
        assert_eq!((status, body.as_str()), (200, "upstream saw /metrics\n"));
    }

    // A second gateway on the live socket refuses to start.
    let second = gateway_on(&socket, &up).output().unwrap();
    assert_eq!(second.status.code(), Some(64));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("another process is listening"), "{err}");

    // Killed, the first leaves its socket file behind; the next gateway replaces it.
    first.kill().unwrap();
    first.wait().unwrap();
    assert!(socket.exists());
    let mut third = gateway_on(&socket, &up).spawn().unwrap();
    serving(&socket, &mut third).await;
    let mut conn = http1(UnixStream::connect(&socket).await.unwrap())
        .await
        .unwrap();
    assert_eq!(
        send(&mut conn, "/metrics", Some(TOKEN_A)).await.unwrap().0,
        200
    );
    third.kill().unwrap();
    third.wait().unwrap();
}
