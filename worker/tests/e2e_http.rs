//! The worker's local HTTP surface and logs, as an operator meets them: metrics that
//! parse and move, health that never leaks database errors, events in order over SSE,
//! deadlines for slow clients, redaction of secrets everywhere, and privilege drop.

mod common;

use std::{
    io::{BufRead, BufReader, Read, Write},
    os::unix::net::UnixStream,
    time::{Duration, Instant},
};

use common::{children_of, http_get, ids_of, rss_kib, Env, PgProxy};
use taskgate_test_support::eventually::{eventually, eventually_blocking};

fn sock(env: &Env) -> (std::path::PathBuf, String) {
    let p = env.path().join("worker.sock");
    let arg = format!("unix:{}", p.display());
    (p, arg)
}

fn wait_socket(p: &std::path::Path) {
    eventually_blocking("worker socket", Duration::from_secs(20), || {
        UnixStream::connect(p).ok().map(|_| ())
    });
}

#[tokio::test]
async fn metrics_parse_and_move_when_tasks_run() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let runner = env.script("exec.sh", "cat > /dev/null");
    let _w = env.worker("w", &runner, &["--metrics-listen", &listen]);
    wait_socket(&path);
    let mode =
        std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o660);
    let (code, before) = http_get(&path, "/metrics");
    assert_eq!(code, 200);
    assert!(before.contains("taskgate_build_info"));
    env.enqueue_many("tasks.m", 5, &[]);
    let after = eventually_blocking("succeeded counter", Duration::from_secs(20), || {
        let (_, m) = http_get(&path, "/metrics");
        m.contains("taskgate_tasks_finished_total{module=\"tasks.m\",queue=\"default\",state=\"succeeded\"} 5").then_some(m)
    });
    assert!(after.contains("taskgate_tasks_claimed_total{module=\"tasks.m\",queue=\"default\"} 5"));
    assert!(after
        .contains("taskgate_task_duration_seconds_count{module=\"tasks.m\",queue=\"default\"} 5"));
    // promtool, where installed (deploy/local/install-deps.sh installs it), finds nothing to report.
    let file = env.path().join("metrics.txt");
    std::fs::write(&file, &after).unwrap();
    let out = std::process::Command::new("promtool")
        .arg("check")
        .arg("metrics")
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .expect("promtool is installed by deploy/local/install-deps.sh");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(http_get(&path, "/other").0, 404);
}

#[tokio::test]
async fn non_loopback_listen_addresses_are_refused() {
    let env = Env::sqlite().await;
    for addr in ["0.0.0.0:9100", "10.1.2.3:9100", "[::]:9100"] {
        let out = env.run(&["run", "--allow-root", "--metrics-listen", addr]);
        assert_eq!(out.status.code(), Some(64), "{addr}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("not a loopback address"),
            "{addr}"
        );
    }
}

#[tokio::test]
async fn socket_path_rules() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    // A regular file is never deleted.
    std::fs::write(&path, "precious").unwrap();
    let out = env.run(&["run", "--allow-root", "--metrics-listen", &listen]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    std::fs::remove_file(&path).unwrap();
    // A stale socket (no process behind it) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let runner = env.script("exec.sh", "true");
    let _w = env.worker("w", &runner, &["--metrics-listen", &listen]);
    wait_socket(&path);
    assert_eq!(http_get(&path, "/healthz").0, 200);
    // A live one is not taken over.
    let out = env.run(&["run", "--allow-root", "--metrics-listen", &listen]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
}

// Multi-threaded: the PostgreSQL proxy runs on this runtime while the test blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_hides_database_errors_and_recovers() {
    let env = Env::postgres().await;
    let proxy = PgProxy::start().await;
    let (path, listen) = sock(&env);
    let runner = env.script("exec.sh", "true");
    let url = proxy.url(&env.db_url);
    let w = env.worker_with(
        "w",
        &runner,
        &["--metrics-listen", &listen],
        &[("DATABASE_URL", &url)],
    );
    wait_socket(&path);
    let probe = |p: std::path::PathBuf| async move {
        tokio::task::spawn_blocking(move || http_get(&p, "/healthz"))
            .await
            .unwrap()
    };
    assert_eq!(
        probe(path.clone()).await,
        (200, "{\"status\":\"ok\"}".to_string())
    );
    proxy.cut();
    let started = Instant::now();
    let (_, body) = eventually("503 during the outage", Duration::from_secs(20), || {
        let p = path.clone();
        async move {
            let r = probe(p).await;
            (r.0 == 503).then_some(r)
        }
    })
    .await;
    assert_eq!(body, "{\"status\":\"unavailable\"}");
    assert!(started.elapsed() < Duration::from_secs(15));
    // The healthcheck subcommand agrees.
    let hc = env.run(&["healthcheck", "--metrics-listen", &listen]);
    assert_eq!(hc.status.code(), Some(1));
    proxy.restore().await;
    eventually("200 after the outage", Duration::from_secs(30), || {
        let p = path.clone();
        async move { (probe(p).await.0 == 200).then_some(()) }
    })
    .await;
    let hc = env.run(&["healthcheck", "--metrics-listen", &listen]);
    assert!(
        hc.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&hc.stderr),
        w.logs()
    );
    // The cause was logged for the operator, not sent to the client.
    assert!(w.logs().contains("health check"), "{}", w.logs());
}

#[tokio::test]
async fn events_arrive_in_order_over_sse() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let runner = env.script("exec.sh", "cat > /dev/null; exit 1");
    let _w = env.worker(
        "w",
        &runner,
        &["--metrics-listen", &listen, "--retry-backoff", "50ms"],
    );
    wait_socket(&path);
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(s, "GET /events HTTP/1.1\r\nHost: w\r\n\r\n").unwrap();
    let mut reader = BufReader::new(s);
    let id = env.enqueue_many("tasks.ev", 1, &["--max-attempts", "2"])[0];
    let mut states = Vec::new();
    let mut line = String::new();
    while states.len() < 4 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early"
        );
        if let Some(data) = line.strip_prefix("data: ") {
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["id"], id);
            assert!(v.get("payload").is_none());
            states.push((
                v["state"].as_str().unwrap().to_string(),
                v["attempt"].as_i64().unwrap(),
            ));
        }
    }
    assert_eq!(
        states,
        vec![
            ("running".into(), 1),
            ("failed".into(), 1),
            ("running".into(), 2),
            ("dead".into(), 2)
        ]
    );
}

#[tokio::test]
async fn a_client_that_never_reads_does_not_grow_memory() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let runner = env.script("exec.sh", "true");
    let w = env.worker(
        "w",
        &runner,
        &["--metrics-listen", &listen, "--concurrency", "8"],
    );
    wait_socket(&path);
    // Warm up, then measure.
    env.enqueue_many("tasks.warm", 200, &[]);
    eventually_blocking("warm-up done", Duration::from_secs(60), || {
        http_get(&path, "/metrics")
            .1
            .contains("module=\"tasks.warm\",queue=\"default\",state=\"succeeded\"} 200")
            .then_some(())
    });
    let before = rss_kib(w.child.id());
    let mut stalled = Vec::new();
    for _ in 0..20 {
        let mut s = UnixStream::connect(&path).unwrap();
        write!(s, "GET /events HTTP/1.1\r\nHost: w\r\n\r\n").unwrap();
        stalled.push(s); // never read
    }
    env.enqueue_many("tasks.flood", 3000, &[]);
    eventually_blocking("flood done", Duration::from_secs(120), || {
        http_get(&path, "/metrics")
            .1
            .contains("module=\"tasks.flood\",queue=\"default\",state=\"succeeded\"} 3000")
            .then_some(())
    });
    let after = rss_kib(w.child.id());
    assert!(
        after < before + 16 * 1024,
        "RSS grew from {before} KiB to {after} KiB with stalled subscribers"
    );
    // The worker still serves everyone else.
    assert_eq!(http_get(&path, "/healthz").0, 200);
    drop(stalled);
}

#[tokio::test]
async fn a_trickled_request_head_is_cut_at_the_deadline() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let runner = env.script("exec.sh", "true");
    let _w = env.worker("w", &runner, &["--metrics-listen", &listen]);
    wait_socket(&path);
    let mut s = UnixStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(900)))
        .unwrap();
    let started = Instant::now();
    let head = b"GET /metrics HTTP/1.1\r\nHost: w\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut cut = false;
    for b in head {
        if s.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        let mut buf = [0u8; 256];
        match s.read(&mut buf) {
            Ok(0) => {
                cut = true;
                break;
            }
            Ok(_) => {
                cut = true; // an error response, then close
                break;
            }
            Err(_) => {} // timeout: keep trickling
        }
    }
    let took = started.elapsed();
    assert!(cut, "the server kept waiting for the trickled head");
    assert!(
        took >= Duration::from_secs(4) && took < Duration::from_secs(9),
        "cut after {took:?}, deadline is 5s"
    );
}

#[tokio::test]
async fn secrets_never_reach_logs_events_metrics_status_or_errors() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let log_dir = env.path().join("logs");
    std::fs::create_dir(&log_dir).unwrap();
    let secrets = [
        "pw-canary-1",
        "key-canary-2",
        "bearer-canary-3",
        "CANARY-payload-4",
    ];
    let runner = env.script(
        "exec.sh",
        "cat > /dev/null\n\
         echo 'db password=pw-canary-1 rejected'\n\
         echo '{\"api_key\": \"key-canary-2\", \"user\": \"bob\"}' >&2\n\
         echo 'sent Authorization: Bearer bearer-canary-3' >&2\n\
         exit 2",
    );
    let mut w = env.worker(
        "w",
        &runner,
        &[
            "--metrics-listen",
            &listen,
            "--log-dir",
            log_dir.to_str().unwrap(),
            "--log-level",
            "debug",
            "--shutdown-grace",
            "1s",
        ],
    );
    wait_socket(&path);
    let mut sse = UnixStream::connect(&path).unwrap();
    sse.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(sse, "GET /events HTTP/1.1\r\nHost: w\r\n\r\n").unwrap();
    let payload = "{\"password\": \"pw-canary-1\", \"note\": \"CANARY-payload-4\"}";
    let out = env.run_with_stdin(
        &[
            "enqueue",
            "--module",
            "tasks.leaky",
            "--payload-stdin",
            "--max-attempts",
            "1",
        ],
        payload.as_bytes(),
    );
    assert!(out.status.success());
    let id: i64 = String::from_utf8(out.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let metrics = eventually_blocking("task dead", Duration::from_secs(20), || {
        let (_, m) = http_get(&path, "/metrics");
        m.contains("state=\"dead\"} 1").then_some(m)
    });
    // Stop the worker (not --drain: it could exit, and remove its socket, before the
    // metrics poll above saw the task dead). Shutdown ends the event stream.
    w.signal(nix::sys::signal::Signal::SIGTERM);
    let mut events = String::new();
    let _ = sse.read_to_string(&mut events);
    assert!(w.wait(Duration::from_secs(20)).success());
    let status = env.ok(&["status", &id.to_string()]);
    assert!(status.contains("[REDACTED]"), "{status}");
    let mut files = String::new();
    for e in std::fs::read_dir(&log_dir).unwrap() {
        files.push_str(&std::fs::read_to_string(e.unwrap().path()).unwrap());
    }
    assert!(
        files.contains("task attempt failed"),
        "rolling file log is empty: {files}"
    );
    let stderr_logs = w.logs();
    assert!(
        stderr_logs.contains("[REDACTED]"),
        "the failure should be logged, redacted: {stderr_logs}"
    );
    for (what, text) in [
        ("stderr log", &stderr_logs),
        ("rolling file", &files),
        ("events", &events),
        ("metrics", &metrics),
        ("status", &status),
    ] {
        for s in secrets {
            assert!(!text.contains(s), "{s} leaked into {what}:\n{text}");
        }
    }
    assert!(events.contains("\"state\":\"dead\""), "{events}");
}

#[tokio::test]
async fn root_drops_to_nobody_for_worker_and_executors() {
    if !nix::unistd::geteuid().is_root() {
        panic!("this test must run as root (CI does)");
    }
    let env = Env::postgres().await;
    let (path, listen) = sock(&env);
    // A script nobody can read: put it in a world-readable directory.
    let shared = tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .tempdir()
        .unwrap();
    let script = shared.path().join("exec.sh");
    std::fs::write(&script, "#!/bin/sh\ncat > /dev/null\nexec sleep 5\n").unwrap();
    let runner = format!("sh {} {{module}}", script.display());
    let w = env.worker_with(
        "w",
        &runner,
        &["--metrics-listen", &listen, "--user", "nobody"],
        &[("TASKGATE_USER", "nobody")],
    );
    wait_socket(&path);
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    let want = (nobody.uid.as_raw(), nobody.gid.as_raw());
    let worker_pid = w.child.id();
    eventually_blocking("worker dropped privileges", Duration::from_secs(10), || {
        (ids_of(worker_pid) == want).then_some(())
    });
    env.enqueue_many("tasks.who", 1, &[]);
    let exec_pid = eventually_blocking("executor running", Duration::from_secs(20), || {
        children_of(worker_pid).into_iter().next()
    });
    assert_eq!(ids_of(exec_pid), want, "executor identity");
    // Still serving the socket it bound as root.
    assert_eq!(http_get(&path, "/healthz").0, 200);
    let status = std::fs::read_to_string(format!("/proc/{worker_pid}/status")).unwrap();
    assert!(
        status
            .lines()
            .any(|l| l.starts_with("NoNewPrivs:") && l.ends_with('1')),
        "{status}"
    );
}

#[tokio::test]
async fn an_idle_keep_alive_connection_is_closed() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let runner = env.script("exec.sh", "true");
    let _w = env.worker("w", &runner, &["--metrics-listen", &listen]);
    wait_socket(&path);
    let mut s = UnixStream::connect(&path).unwrap();
    write!(s, "GET /healthz HTTP/1.1\r\nHost: w\r\n\r\n").unwrap();
    let mut buf = [0u8; 512];
    assert!(s.read(&mut buf).unwrap() > 0);
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let idle = Instant::now();
    assert_eq!(
        s.read(&mut buf).unwrap(),
        0,
        "expected the server to close the idle connection"
    );
    assert!(
        idle.elapsed() < Duration::from_secs(8),
        "idle connection kept {:?}",
        idle.elapsed()
    );
}

#[tokio::test]
async fn takes_the_socket_systemd_passes() {
    let env = Env::sqlite().await;
    let path = env.path().join("activated.sock");
    // What systemd does for a .socket unit: bind, then exec the service with the
    // listening socket as fd 3, LISTEN_FDS=1 and LISTEN_PID set to the service's pid.
    let launcher = format!(
        "import os, socket, sys\n\
         s = socket.socket(socket.AF_UNIX); s.bind({path:?}); s.listen(16)\n\
         os.dup2(s.fileno(), 3); os.set_inheritable(3, True)\n\
         os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid())\n\
         os.execv(sys.argv[1], sys.argv[1:])\n",
        path = path.display().to_string()
    );
    let runner = env.script("exec.sh", "true");
    let mut w = std::process::Command::new("python3")
        .arg("-c")
        .arg(&launcher)
        .arg(env!("CARGO_BIN_EXE_worker"))
        .args([
            "run",
            "--allow-root",
            "--module-runner",
            &runner,
            // Named, but the passed socket wins.
            "--metrics-listen",
            &format!("unix:{}", env.path().join("unused.sock").display()),
        ])
        .env("DATABASE_URL", &env.db_url)
        .env("ALLOWED_TASK_MODULES", "tasks.*")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let (code, body) =
        eventually_blocking("activated socket answers", Duration::from_secs(20), || {
            UnixStream::connect(&path)
                .ok()
                .map(|_| http_get(&path, "/healthz"))
        });
    assert_eq!((code, body.as_str()), (200, "{\"status\":\"ok\"}"));
    assert!(!env.path().join("unused.sock").exists());
    let _ = w.kill();
    let _ = w.wait();
}

#[tokio::test]
async fn tells_systemd_it_is_ready_and_stopping() {
    let env = Env::sqlite().await;
    let (path, listen) = sock(&env);
    let notify_path = env.path().join("notify.sock");
    let notify = std::os::unix::net::UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let runner = env.script("exec.sh", "true");
    let notify_env = notify_path.display().to_string();
    let mut w = env.worker_with(
        "w",
        &runner,
        &["--metrics-listen", &listen],
        &[("NOTIFY_SOCKET", &notify_env)],
    );
    let mut buf = [0u8; 256];
    let n = notify.recv(&mut buf).expect("READY=1 from the worker");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("READY=1"));
    // Ready means serving.
    assert_eq!(http_get(&path, "/healthz").0, 200);
    w.signal(nix::sys::signal::Signal::SIGTERM);
    let n = notify.recv(&mut buf).expect("STOPPING=1 from the worker");
    assert!(String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1"));
    assert!(w.wait(Duration::from_secs(20)).success());
}
