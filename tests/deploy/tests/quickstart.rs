//! `deploy/local/run.sh`, the README's run command: `--check` starts the worker and the
//! gateway, runs the curl line it prints (mTLS + token) and finds `taskgate_` metrics; a
//! second run reuses the PKI, the token and the database; Ctrl-C stops both.
//!
//! Building release binaries here would double a CI run, so the script is given the
//! binaries of this target directory (`TASKGATE_BIN_DIR`): the ones `cargo test
//! --workspace` has just built, or built now when missing or older than the sources.

use std::{
    fs,
    io::{BufRead, BufReader},
    net::TcpListener,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant, SystemTime},
};

use taskgate_deploy_tests::{repo, require, run};

/// `target/<profile>`: this test binary lives in `target/<profile>/deps/`.
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps")
        .to_path_buf()
}

fn newest_source(dir: &Path) -> SystemTime {
    let mut newest = SystemTime::UNIX_EPOCH;
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_source(&p)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH)
        };
        newest = newest.max(t);
    }
    newest
}

/// The folder holding up-to-date `worker` and `gateway` binaries.
fn binaries() -> PathBuf {
    let dir = profile_dir();
    let sources = ["worker", "gateway", "shared", "migrations"]
        .iter()
        .map(|d| newest_source(&repo(d)))
        .chain([newest_source(&repo("Cargo.lock"))])
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let fresh = |name: &str| {
        fs::metadata(dir.join(name))
            .and_then(|m| m.modified())
            .is_ok_and(|t| t >= sources)
    };
    if !(fresh("worker") && fresh("gateway")) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let target = dir.parent().expect("target dir");
        let mut cmd = Command::new(cargo);
        cmd.current_dir(repo("."))
            .args([
                "build",
                "--bins",
                "-p",
                "taskgate-worker",
                "-p",
                "taskgate-gateway",
            ])
            .arg("--target-dir")
            .arg(target);
        if dir.file_name() == Some("release".as_ref()) {
            cmd.arg("--release");
        }
        let out = run(&mut cmd);
        assert!(out.ok, "building the binaries failed:\n{}", out.stderr);
    }
    dir
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn port_is_closed(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
}

fn script(bin: &Path, state: &Path, port: u16) -> Command {
    for tool in ["openssl", "curl", "python3", "bash"] {
        require(tool, "deploy/local/run.sh uses it");
    }
    let mut cmd = Command::new("bash");
    cmd.arg(repo("deploy/local/run.sh"))
        .env("TASKGATE_BIN_DIR", bin)
        .env("TASKGATE_STATE_DIR", state)
        .env("TASKGATE_PORT", port.to_string())
        .env_remove("TASKGATE_CHECK")
        .stdin(Stdio::null());
    cmd
}

/// Runs `run.sh --check` with a deadline; returns its combined output.
fn check(bin: &Path, state: &Path, port: u16) -> String {
    let mut cmd = script(bin, state, port);
    cmd.arg("--check")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let child = cmd.spawn().expect("start run.sh --check");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(180)) {
        Ok(out) => out.expect("wait for run.sh"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
            panic!("run.sh --check did not finish within 180 s");
        }
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "run.sh --check failed ({:?}):\n{text}",
        out.status.code()
    );
    assert!(text.contains("check passed"), "{text}");
    text
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p).expect("stat").permissions().mode() & 0o777
}

#[test]
fn check_mode_returns_metrics_and_a_second_run_reuses_the_state() {
    let bin = binaries();
    let state = tempfile::tempdir().expect("state dir");
    let port = free_port();

    let first = check(&bin, state.path(), port);
    assert!(first.contains("creating a dev CA"), "{first}");
    assert!(
        first.contains("--cacert")
            && first.contains("--cert")
            && first.contains("Authorization: Bearer $(cat "),
        "the printed curl line uses the CA, the client certificate and the token file:\n{first}"
    );
    let token = fs::read_to_string(state.path().join("token")).expect("token");
    assert!(
        !first.contains(token.trim()),
        "the token itself must never be printed"
    );
    assert_eq!(mode(state.path()), 0o700, "state folder");
    for private in ["token", "ca.key", "server.key", "client.key"] {
        assert_eq!(mode(&state.path().join(private)), 0o600, "{private}");
    }
    let ca = fs::read(state.path().join("ca.pem")).expect("ca.pem");
    let server = fs::read(state.path().join("server.pem")).expect("server.pem");
    assert!(
        port_is_closed(port),
        "the gateway is still listening after --check"
    );
    assert!(
        !state.path().join("worker.sock").exists(),
        "the worker's socket outlived it"
    );

    let second = check(&bin, state.path(), port);
    assert!(
        !second.contains("creating"),
        "second run re-created state:\n{second}"
    );
    assert!(
        !second.contains("issuing"),
        "second run re-issued a certificate:\n{second}"
    );
    assert_eq!(fs::read(state.path().join("ca.pem")).expect("ca"), ca);
    assert_eq!(
        fs::read(state.path().join("server.pem")).expect("server"),
        server
    );
    assert_eq!(
        fs::read_to_string(state.path().join("token")).expect("token"),
        token
    );
    assert!(port_is_closed(port));
}

#[test]
fn ctrl_c_stops_both_processes() {
    let bin = binaries();
    let state = tempfile::tempdir().expect("state dir");
    let port = free_port();
    let mut child = script(&bin, state.path(), port)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("start run.sh");
    let pgid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut pids = Vec::new();
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
                if let Some(rest) = line.strip_prefix("taskgate is running: worker (pid ") {
                    // "taskgate is running: worker (pid N) behind the gateway (pid M)."
                    pids = rest
                        .split(|c: char| !c.is_ascii_digit())
                        .filter(|s| !s.is_empty())
                        .map(|s| s.parse::<u32>().expect("pid"))
                        .collect();
                }
                if line.contains("Press Ctrl-C") {
                    break;
                }
            }
            Err(_) => {
                let _ = Command::new("kill")
                    .args(["-KILL", "--", &format!("-{pgid}")])
                    .status();
                panic!("run.sh did not come up within 120 s:\n{seen}");
            }
        }
    }
    assert_eq!(pids.len(), 2, "worker and gateway pids in:\n{seen}");
    assert!(!port_is_closed(port), "the gateway is not listening");

    // What a terminal does on Ctrl-C: SIGINT to the whole foreground process group.
    let sent = Command::new("kill")
        .args(["-INT", "--", &format!("-{pgid}")])
        .status()
        .expect("kill");
    assert!(sent.success());
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{pgid}")])
                .status();
            panic!("run.sh did not stop within 60 s of Ctrl-C");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(130), "exit status after Ctrl-C");
    for pid in pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} outlived run.sh"
        );
    }
    assert!(port_is_closed(port), "the gateway still listens");
}

/// The configuration files shipped in `deploy/` are accepted by the binaries they are
/// for: unknown or misspelt keys fail there (both binaries reject unknown keys).
#[test]
fn shipped_config_files_are_accepted_by_the_binaries() {
    let bin = binaries();
    require("openssl", "makes a throw-away certificate");
    let tmp = tempfile::tempdir().expect("temp dir");
    let (cert, key, token) = (
        tmp.path().join("c.pem"),
        tmp.path().join("k.pem"),
        tmp.path().join("tokens"),
    );
    let out = run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args(["-nodes", "-days", "2", "-subj", "/CN=localhost"])
        .args(["-addext", "subjectAltName=DNS:localhost", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&cert));
    assert!(out.ok, "openssl: {}", out.stderr);
    fs::write(&token, "0123456789abcdef0123456789abcdef\n").expect("token file");

    // The files name paths and users of a real host: point those at throw-away ones
    // (flags beat the file), so everything else is checked as written.
    for config in ["deploy/systemd/gateway.toml", "deploy/ingress/gateway.toml"] {
        let out = run(Command::new(bin.join("gateway"))
            .arg("--config")
            .arg(repo(config))
            .arg("--check-config")
            .arg("--tls-cert")
            .arg(&cert)
            .arg("--tls-key")
            .arg(&key)
            .arg("--tls-client-ca")
            .arg(&cert)
            .arg("--auth-token-file")
            .arg(&token)
            .args(["--user", "nobody", "--group", "nogroup"]));
        assert!(
            out.ok && out.stdout.contains("configuration ok"),
            "gateway --check-config refuses {config} ({:?}):\n{}{}",
            out.code,
            out.stdout,
            out.stderr
        );
    }
    // The worker has no --check-config; every subcommand loads the whole file, and
    // `migrate` on a throw-away database has no other effect.
    let db = format!("sqlite://{}?mode=rwc", tmp.path().join("t.db").display());
    let out = run(Command::new(bin.join("worker"))
        .arg("--config")
        .arg(repo("deploy/systemd/worker.toml"))
        .args(["--database-url", &db, "migrate"]));
    assert!(
        out.ok,
        "worker refuses deploy/systemd/worker.toml ({:?}):\n{}",
        out.code, out.stderr
    );
}
