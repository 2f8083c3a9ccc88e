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
        let db_url = format!("sqlite://{}?mode=rwc", dir.path().join("tasks.db").display());
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
        let env = Self { dir, db_url, ledger, _pg: pg };
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
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
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
        let log = self.dir.path().join(format!("{name}.log"));
        let file = std::fs::File::create(&log).unwrap();
        let mut args = vec![
            "run",
            "--allow-root",
            "--poll-interval",
            "50ms",
            "--module-runner",
            runner,
            "--payload-dir",
        ];
        let payload_dir = self.dir.path().display().to_string();
        args.push(&payload_dir);
        args.extend_from_slice(extra);
        let child = self
            .cmd(&args)
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
            self.ledger_lines().into_iter().find(|l| l.starts_with(prefix))
        })
    }

    pub async fn store(&self) -> std::sync::Arc<dyn taskgate_worker::store::Store> {
        taskgate_worker::store::connect(&self.db_url, 2).await.unwrap()
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
