//! Start-up behaviour: configuration errors, --check-config, graceful shutdown and the
//! privilege drop.

mod common;

use std::{process::Command, time::Duration};

use common::*;
use taskgate_test_support::eventually::eventually;

fn gateway(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_gateway"));
    cmd.env_clear().args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

#[test]
fn bad_configuration_exits_64_with_one_line_naming_every_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("gateway.toml");
    std::fs::write(
        &toml,
        "listen = \"127.0.0.1:9443\"\n[metrics]\nauth_limt = 3\n",
    )
    .unwrap();
    let out = gateway(&["--config", toml.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("auth_limt"), "{err}");

    let out = gateway(
        &[
            "--listen",
            "127.0.0.1:1",
            "--upstream",
            "10.0.0.1:80",
            "--allow-cidr",
            "10.0.0.0/33",
            "--insecure-plaintext",
        ],
        &[("METRICS_AUTH_WINDOW", "soon")],
    );
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    for key in [
        "--upstream",
        "--allow-cidr",
        "METRICS_AUTH_WINDOW",
        "no token configured",
    ] {
        assert!(err.contains(key), "{key} not in {err}");
    }
}

#[test]
fn check_config_validates_files_and_exits() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let tokens = dir.path().join("tokens");
    write_tokens(&tokens, &[TOKEN_A]);
    let toml = dir.path().join("gateway.toml");
    std::fs::write(
        &toml,
        format!(
            "listen = \"127.0.0.1:9443\"\nupstream = \"unix:/run/worker.sock\"\n[metrics]\nauth_token_file = \"{}\"\nallow_cidrs = [\"10.0.0.0/8\", \"fd00::/8\"]\n[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\nclient_allowed_sans = [\"prometheus.monitoring.svc\"]\n",
            tokens.display(),
            pki.cert.display(),
            pki.key.display(),
            pki.ca_file.display()
        ),
    )
    .unwrap();
    let out = gateway(&["--config", toml.to_str().unwrap(), "--check-config"], &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains("configuration ok") && said.contains("mTLS"),
        "{said}"
    );
    assert!(!said.contains(TOKEN_A));

    // A key that is not a key: a clear start-up error, not a panic.
    std::fs::write(&pki.key, "garbage").unwrap();
    let out = gateway(&["--config", toml.to_str().unwrap(), "--check-config"], &[]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--tls-key") && !err.contains("panicked"),
        "{err}"
    );
}

#[tokio::test]
async fn sigterm_shuts_down_gracefully() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &["--shutdown-grace", "1s"]);
    // Stand in for systemd: Type=notify services report READY=1 and STOPPING=1 here.
    let notify_path = dir.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let notify_env = notify_path.display().to_string();
    let mut gw = Gateway::start(
        &args,
        &[
            ("METRICS_AUTH_TOKEN", TOKEN_A),
            ("NOTIFY_SOCKET", &notify_env),
        ],
    )
    .await;
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the gateway");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    assert_eq!(
        Client::plain()
            .get(gw.addr, "/healthz", Some(TOKEN_A))
            .await
            .unwrap()
            .0,
        200
    );
    gw.signal("TERM");
    let status = eventually(
        "gateway exits after SIGTERM",
        Duration::from_secs(15),
        || {
            let s = gw.child.try_wait().ok().flatten();
            async move { s }
        },
    )
    .await;
    assert!(status.success(), "{status}");
    assert!(gw.logs().iter().any(|l| l.contains("gateway stopped")));
    let n = notify.recv(&mut buf).expect("STOPPING=1 from the gateway");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
}

#[tokio::test]
async fn privileges_are_dropped_after_binding() {
    if !std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:\t0\t"))
    {
        eprintln!("skipped: needs root to test dropping it");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start(dir.path()).await;
    let args = plaintext_args(&up, &["--user", "nobody"]);
    let gw = Gateway::start(&args, &[("METRICS_AUTH_TOKEN", TOKEN_A)]).await;
    eventually("gateway runs as nobody", Duration::from_secs(10), || {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", gw.pid())).unwrap_or_default();
        async move {
            status
                .lines()
                .any(|l| l.starts_with("Uid:\t65534\t65534\t65534"))
                .then_some(())
        }
    })
    .await;
    // Still serving on the socket bound as root.
    assert_eq!(
        Client::plain()
            .get(gw.addr, "/metrics", None)
            .await
            .unwrap()
            .0,
        401
    );
}
