//! The secret canary sweep: one end-to-end run of the real `worker` (PostgreSQL) behind
//! the real `gateway` (TLS, mTLS, token file), with canaries in a task payload, the
//! database password, the gateway's token, a wrong token a client sends, and executor
//! output. Afterwards every output the system made is searched for them: both
//! processes' stderr logs, the worker's rolling log files, `/events` (direct and through
//! the gateway), `/metrics` (worker, direct and through the gateway), `/gateway/metrics`,
//! `worker status`, `ps` while tasks run, and the gateway's audit lines.
//!
//! The worker binary comes from this target directory (built here when missing or older
//! than its sources), as the quick-start test does.

mod common;

use std::{
    io::Read,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, SystemTime},
};

use common::{Client, Gateway, Pki};
use taskgate_test_support::{eventually::eventually_blocking, pg::TestDb};

const PAYLOAD: &str = "CANARY-payload-5e1d";
const PAYLOAD_SECRET: &str = "CANARY-payload-pw-77aa";
const DB_PASSWORD: &str = "CANARYdbpw9c2e";
const TOKEN: &str = "CANARY-token-0b8f4e2a91";
const WRONG_TOKEN: &str = "CANARY-wrong-token-31d7";
const EXEC_PASSWORD: &str = "CANARY-exec-pw-d40c";
const EXEC_BEARER: &str = "CANARY-exec-bearer-6f19";
const EXEC_API_KEY: &str = "CANARY-exec-key-a2b3";

const ALL: [&str; 8] = [
    PAYLOAD,
    PAYLOAD_SECRET,
    DB_PASSWORD,
    TOKEN,
    WRONG_TOKEN,
    EXEC_PASSWORD,
    EXEC_BEARER,
    EXEC_API_KEY,
];

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn newest(dir: &Path) -> SystemTime {
    let mut t = SystemTime::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        let m = if p.is_dir() {
            newest(&p)
        } else {
            e.metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        t = t.max(m);
    }
    t
}

/// `target/<profile>/worker`, built first when missing or older than its sources.
fn worker_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap().to_path_buf();
    let bin = profile.join("worker");
    let sources = ["worker/src", "shared/src", "migrations", "Cargo.lock"]
        .iter()
        .map(|d| {
            newest(&repo(d)).max(
                std::fs::metadata(repo(d))
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH),
            )
        })
        .max()
        .unwrap();
    let fresh = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .is_ok_and(|t| t >= sources);
    if !fresh {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo("."))
            .args([
                "build",
                "--bin",
                "worker",
                "-p",
                "taskgate-worker",
                "--target-dir",
            ])
            .arg(profile.parent().unwrap());
        if profile.file_name() == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "building the worker failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    bin
}

fn ps() -> String {
    let out = Command::new("ps")
        .args(["-eww", "-o", "pid,args"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `GET path` on the worker's Unix socket, reading for at most `read_for` (SSE never ends).
fn worker_get(sock: &Path, path: &str, read_for: Duration) -> String {
    use std::io::Write;
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(read_for)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_canary_reaches_any_output() {
    let worker = worker_bin();
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Trust auth ignores the password; the worker still holds it in its URL.
    let db_url = db.url.replacen(
        "postgres://postgres@",
        &format!("postgres://postgres:{DB_PASSWORD}@"),
        1,
    );
    assert!(
        db_url.contains(DB_PASSWORD),
        "unexpected test URL {}",
        db.url
    );
    let ledger = d.join("ledger");
    // Executors hold until the gate file exists, so `ps` sees them running.
    let gate = d.join("gate");
    let script = d.join("exec.sh");
    std::fs::write(
        &script,
        format!(
            "payload=$(cat)\n\
             echo \"running $TASK_ID\" >> {ledger}\n\
             echo \"got $payload\"\n\
             echo \"could not handle $payload\" >&2\n\
             echo \"login password={EXEC_PASSWORD} ok\"\n\
             echo \"sent Authorization: Bearer {EXEC_BEARER}\" >&2\n\
             echo '{{\"api_key\": \"{EXEC_API_KEY}\"}}' >&2\n\
             while [ ! -e {gate} ]; do sleep 0.05; done\n\
             case \"$1\" in *fail) exit 3;; esac\n",
            ledger = ledger.display(),
            gate = gate.display()
        ),
    )
    .unwrap();
    let wcmd = |args: &[&str]| {
        let mut c = Command::new(&worker);
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &db_url)
            .env("ALLOWED_TASK_MODULES", "tasks.*")
            .env("TASKGATE_LOG_FORMAT", "json")
            // A secret of the worker's own environment.
            .env("METRICS_AUTH_TOKEN", TOKEN)
            .current_dir(d)
            .args(args);
        c
    };
    let out = wcmd(&["migrate"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The worker, with rolling log files and debug logging.
    let sock = d.join("worker.sock");
    let log_dir = d.join("worker-logs");
    std::fs::create_dir(&log_dir).unwrap();
    let worker_log = d.join("worker.stderr");
    let runner = format!("sh {} {{module}}", script.display());
    let mut w = wcmd(&[
        "run",
        "--allow-root",
        "--poll-interval",
        "50ms",
        "--payload-dir",
        &d.display().to_string(),
        "--module-runner",
        &runner,
        "--metrics-listen",
        &format!("unix:{}", sock.display()),
        "--log-dir",
        &log_dir.display().to_string(),
        "--log-level",
        "debug",
    ])
    .stdin(Stdio::null())
    .stdout(std::fs::File::create(&worker_log).unwrap())
    .stderr(std::fs::File::create(&worker_log).unwrap())
    .spawn()
    .unwrap();
    eventually_blocking("worker socket", Duration::from_secs(20), || {
        std::os::unix::net::UnixStream::connect(&sock).ok()
    });

    // The gateway in front of it: TLS, mTLS, the canary token in a token file.
    let pki = Pki::new(d);
    let tokens = d.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let args: Vec<String> = [
        "--upstream",
        &format!("unix:{}", sock.display()),
        "--tls-cert",
        &pki.cert.display().to_string(),
        "--tls-key",
        &pki.key.display().to_string(),
        "--tls-client-ca",
        &pki.ca_file.display().to_string(),
        "--auth-token-file",
        &tokens.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let gw = Gateway::start(&args, &[("GATEWAY_LOG", "debug")]).await;
    let client = Client::tls(&pki.ca, Some(&pki.client));

    // Events, through the gateway and directly, collected while the tasks run.
    let mut gw_events = client.connect(gw.addr).await.unwrap();
    let gw_events_task = tokio::spawn(async move {
        use http_body_util::BodyExt;
        gw_events.ready().await.unwrap();
        let resp = gw_events
            .send_request(common::request("/events", Some(TOKEN)))
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.into_body();
        let mut text = String::new();
        while let Ok(Some(Ok(frame))) =
            tokio::time::timeout(Duration::from_secs(8), body.frame()).await
        {
            if let Some(b) = frame.data_ref() {
                text.push_str(&String::from_utf8_lossy(b));
            }
            if text.matches("\"state\":\"succeeded\"").count() >= 1
                && text.matches("\"state\":\"dead\"").count() >= 1
            {
                break;
            }
        }
        text
    });
    let direct_sock = sock.clone();
    let direct_events =
        std::thread::spawn(move || worker_get(&direct_sock, "/events", Duration::from_secs(8)));

    // Two tasks carry the canary payload; one succeeds, one fails for good.
    let payload = format!("{{\"note\": \"{PAYLOAD}\", \"password\": \"{PAYLOAD_SECRET}\"}}");
    let mut ids = Vec::new();
    let mut enqueue_out = String::new();
    for module in ["tasks.ok", "tasks.fail"] {
        let mut child = wcmd(&[
            "enqueue",
            "--module",
            module,
            "--payload-stdin",
            "--max-attempts",
            "1",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(payload.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        enqueue_out.push_str(&String::from_utf8_lossy(&out.stdout));
        enqueue_out.push_str(&String::from_utf8_lossy(&out.stderr));
        ids.push(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    // `ps` while both executors run.
    let ps_running = eventually_blocking("both executors running", Duration::from_secs(20), || {
        let lines = std::fs::read_to_string(&ledger).unwrap_or_default();
        (lines.lines().count() == 2).then(ps)
    });
    assert!(
        ps_running.matches("exec.sh").count() >= 2,
        "both executors should be in ps:\n{ps_running}"
    );

    // Traffic through the gateway: authorized scrapes and a wrong token.
    let (code, gw_metrics_before) = client.get(gw.addr, "/metrics", Some(TOKEN)).await.unwrap();
    assert_eq!(code, 200);
    let (code, _) = client
        .get(gw.addr, "/metrics", Some(WRONG_TOKEN))
        .await
        .unwrap();
    assert_eq!(code, 401);
    let (code, _) = client
        .get(gw.addr, &format!("/metrics?token={WRONG_TOKEN}"), None)
        .await
        .unwrap();
    assert_eq!(code, 401);
    let (code, health) = client.get(gw.addr, "/healthz", Some(TOKEN)).await.unwrap();
    assert_eq!((code, health.as_str()), (200, "{\"status\":\"ok\"}"));

    std::fs::write(&gate, "").unwrap();
    // Both tasks end; then every output is collected.
    let statuses: Vec<String> = ids
        .iter()
        .map(|id| {
            eventually_blocking(&format!("task {id} ended"), Duration::from_secs(30), || {
                let out = wcmd(&["status", id]).output().unwrap();
                let s = String::from_utf8_lossy(&out.stdout).into_owned()
                    + &String::from_utf8_lossy(&out.stderr);
                (s.contains("\"succeeded\"") || s.contains("\"dead\"")).then_some(s)
            })
        })
        .collect();
    assert!(statuses[0].contains("\"succeeded\""), "{}", statuses[0]);
    assert!(statuses[1].contains("\"dead\""), "{}", statuses[1]);
    assert!(
        statuses[1].contains("[REDACTED]"),
        "the failure's stderr should be kept, redacted: {}",
        statuses[1]
    );
    let metrics_direct = worker_get(&sock, "/metrics", Duration::from_secs(5));
    let (_, gw_metrics) = client.get(gw.addr, "/metrics", Some(TOKEN)).await.unwrap();
    let (code, gateway_metrics) = client
        .get(gw.addr, "/gateway/metrics", Some(TOKEN))
        .await
        .unwrap();
    assert_eq!(code, 200);
    assert!(
        gateway_metrics.contains("taskgate_gateway_"),
        "{gateway_metrics}"
    );
    let gw_events = gw_events_task.await.unwrap();
    assert!(gw_events.contains("\"state\":\"dead\""), "{gw_events}");
    let direct_events = direct_events.join().unwrap();
    assert!(
        direct_events.contains("\"state\":\"succeeded\""),
        "{direct_events}"
    );
    let ps_after = ps();

    w.kill().unwrap();
    w.wait().unwrap();
    let worker_stderr = std::fs::read_to_string(&worker_log).unwrap();
    assert!(
        worker_stderr.contains("task attempt failed"),
        "{worker_stderr}"
    );
    let mut rolling = String::new();
    for e in std::fs::read_dir(&log_dir).unwrap().flatten() {
        rolling.push_str(&std::fs::read_to_string(e.path()).unwrap());
    }
    assert!(
        rolling.contains("task attempt failed"),
        "rolling files are empty"
    );
    let gw_logs = gw.logs().join("\n");
    let audit: Vec<String> = gw.audit().iter().map(|v| v.to_string()).collect();
    assert!(
        audit.iter().any(|l| l.contains("bad_token")),
        "the wrong token should be audited: {gw_logs}"
    );
    assert!(
        audit.iter().any(|l| l.contains("no_token")),
        "the query-string token is no token: {gw_logs}"
    );
    let audit = audit.join("\n");

    let outputs = [
        ("worker stderr log", worker_stderr.as_str()),
        ("worker rolling log files", &rolling),
        ("worker /events (direct)", &direct_events),
        ("worker /events (through the gateway)", &gw_events),
        ("worker /metrics (direct)", &metrics_direct),
        ("worker /metrics (through the gateway)", &gw_metrics),
        ("worker /metrics before the tasks ended", &gw_metrics_before),
        ("gateway /gateway/metrics", &gateway_metrics),
        ("worker status", &statuses.join("\n")),
        ("worker enqueue output", &enqueue_out),
        ("ps while tasks ran", &ps_running),
        ("ps afterwards", &ps_after),
        ("gateway stderr log", &gw_logs),
        ("gateway audit lines", &audit),
    ];
    let mut leaks = Vec::new();
    for (what, text) in outputs {
        for canary in ALL {
            if text.contains(canary) {
                leaks.push(format!("{canary} in {what}"));
            }
        }
    }
    assert!(leaks.is_empty(), "leaked: {leaks:#?}");
}
