//! Builders for the worker's end-to-end tests: a database (SQLite file or a fresh
//! PostgreSQL database), the real `worker` binary, and executor scripts that record
//! what they did in a ledger file.
#![allow(dead_code)]

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use taskgate_test_support::{eventually::eventually_blocking, pg::TestDb};
use tempfile::TempDir;

/// A test's world: a temp dir, a migrated database, a ledger file.
pub struct Env {
    pub dir: TempDir,
    pub db_url: String,
    pub ledger: PathBuf,
    _pg: Option<TestDb>,
}

impl Env {
    pub async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let db_url = format!(
            "sqlite://{}?mode=rwc",
            dir.path().join("tasks.db").display()
        );
        Self::new(dir, db_url, None)
    }

    pub async fn postgres() -> Self {
        let db = TestDb::new().await;
        let dir = tempfile::tempdir().unwrap();
        let url = db.url.clone();
        Self::new(dir, url, Some(db))
    }

    fn new(dir: TempDir, db_url: String, pg: Option<TestDb>) -> Self {
        let ledger = dir.path().join("ledger");
        let env = Self {
            dir,
            db_url,
            ledger,
            _pg: pg,
        };
        env.ok(&["migrate"]);
        env
    }

    /// Writes an executor script; `LEDGER` in it is replaced by the ledger path.
    pub fn script(&self, name: &str, body: &str) -> String {
        let path = self.dir.path().join(name);
        let body = body.replace("LEDGER", &self.ledger.display().to_string());
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        format!("sh {} {{module}}", path.display())
    }

    /// `worker ARGS…` with a clean environment: only what the test sets.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_worker"));
        c.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("DATABASE_URL", &self.db_url)
            .env("ALLOWED_TASK_MODULES", "tasks.*")
            .env("TASKGATE_LOG_FORMAT", "json")
            .current_dir(self.dir.path())
            .args(args);
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).stdin(Stdio::null()).output().unwrap()
    }

    pub fn run_with_stdin(&self, args: &[&str], input: &[u8]) -> Output {
        use std::io::Write;
        let mut child = self
            .cmd(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input).unwrap();
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "worker {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Enqueues `n` tasks of `module` in one batch; returns their ids.
    pub fn enqueue_many(&self, module: &str, n: usize, extra: &[&str]) -> Vec<i64> {
        let lines: String = (0..n).map(|i| format!("{{\"n\":{i}}}\n")).collect();
        let mut args = vec!["enqueue", "--module", module, "--payloads-jsonl", "-"];
        args.extend_from_slice(extra);
        let out = self.run_with_stdin(&args, lines.as_bytes());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect()
    }

    /// `worker status ID` as JSON.
    pub fn status(&self, id: i64) -> serde_json::Value {
        serde_json::from_str(&self.ok(&["status", &id.to_string()])).unwrap()
    }

    /// Starts `worker run` with test-friendly defaults plus `extra`; logs go to a file.
    pub fn worker(&self, name: &str, runner: &str, extra: &[&str]) -> Worker {
        self.worker_with(name, runner, extra, &[])
    }

    /// [`Env::worker`] with extra environment variables.
    pub fn worker_with(
        &self,
        name: &str,
        runner: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Worker {
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        // A worker that drops to another user cannot use the test's private temp dir.
        let as_user = envs.iter().any(|(k, _)| *k == "TASKGATE_USER");
        let payload_dir = self.dir.path().display().to_string();
        let mut args = vec!["run", "--poll-interval", "50ms", "--module-runner", runner];
        if !as_user {
            args.extend(["--allow-root", "--payload-dir", &payload_dir]);
        }
        args.extend_from_slice(extra);
        let child = self
            .cmd(&args)
            .envs(envs.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Worker { child, log }
    }

    pub fn ledger_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.ledger)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits for the ledger to contain a line starting with `prefix`.
    pub fn wait_ledger(&self, prefix: &str, timeout: Duration) -> String {
        eventually_blocking(&format!("ledger line {prefix:?}"), timeout, || {
            self.ledger_lines()
                .into_iter()
                .find(|l| l.starts_with(prefix))
        })
    }

    pub async fn store(&self) -> std::sync::Arc<dyn taskgate_worker::store::Store> {
        taskgate_worker::store::connect(&self.db_url, 2)
            .await
            .unwrap()
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// A running `worker run`; killed on drop.
pub struct Worker {
    pub child: Child,
    pub log: PathBuf,
}

impl Worker {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(self.child.id() as i32)
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).unwrap();
    }

    /// Waits for exit; panics after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        eventually_blocking("worker exit", timeout, || self.child.try_wait().unwrap())
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True while a process with this pid exists (and is not a zombie).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `GET path` over the worker's Unix socket; returns (status, body).
pub fn http_get(sock: &Path, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let status = buf[9..12].parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A TCP forwarder to PostgreSQL that a test can cut and restore, to simulate an outage
/// without stopping the server other tests use.
pub struct PgProxy {
    pub port: u16,
    state: std::sync::Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl PgProxy {
    pub async fn start() -> Self {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let p = Self {
            port,
            state: Default::default(),
            conns: Default::default(),
        };
        p.serve(l);
        p
    }

    fn serve(&self, l: tokio::net::TcpListener) {
        let conns = self.conns.clone();
        let h = tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = l.accept().await else {
                    return;
                };
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                conns.lock().unwrap().push(h);
            }
        });
        *self.state.lock().unwrap() = Some(h);
    }

    /// Drops the listener and every open connection.
    pub fn cut(&self) {
        if let Some(h) = self.state.lock().unwrap().take() {
            h.abort();
        }
        for h in self.conns.lock().unwrap().drain(..) {
            h.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn restore(&self) {
        let l = tokio::net::TcpListener::bind(("127.0.0.1", self.port))
            .await
            .unwrap();
        self.serve(l);
    }

    /// `url` rewritten to go through this proxy.
    pub fn url(&self, url: &str) -> String {
        url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port))
    }
}

/// Resident set size of a process in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// `Uid:`/`Gid:` lines of /proc/PID/status: (real uid, real gid).
pub fn ids_of(pid: u32) -> (u32, u32) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u32 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("Uid:"), field("Gid:"))
}

/// Children of `pid` (from /proc/*/stat).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, r)| r.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}
