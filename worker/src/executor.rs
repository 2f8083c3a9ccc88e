//! Runs one task attempt as a subprocess (started by [`crate::spawn`], which never copies
//! the worker's memory).
//!
//! The child gets an empty environment plus an allow-list, its own process group (so a
//! stop reaches everything it started), `PR_SET_PDEATHSIG` (so it dies with the worker),
//! and the payload on stdin, in a private 0600 file, or — only in non-prod builds — as
//! its last argument. Stopping it (timeout, lost lease, cancel, shutdown) sends SIGTERM
//! to the group, then SIGKILL after a grace period. Output is captured with a size cap.

use std::{
    ffi::OsString,
    io::Write,
    os::unix::{ffi::OsStringExt, fs::OpenOptionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWriteExt},
    sync::watch,
};

pub use crate::sys::Isolation;
use crate::{spawn, sys};

/// How the payload reaches the executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadMode {
    /// Written to the child's stdin, which is then closed.
    Stdin,
    /// Written to a 0600 file in the worker's private directory; the path is in
    /// `TASK_PAYLOAD_FILE`. Removed when the attempt ends, however it ends.
    File,
    /// Passed as the last argument: visible in `ps`. Refused by prod builds.
    Inline,
}

impl std::str::FromStr for PayloadMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stdin" => Ok(Self::Stdin),
            "file" => Ok(Self::File),
            "inline" => Ok(Self::Inline),
            other => Err(format!(
                "{other:?} is not a payload mode; use stdin, file or inline"
            )),
        }
    }
}

/// Why the worker stopped an executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// The lease was taken over or could not be renewed in time.
    LeaseLost,
    /// An operator cancelled the task.
    Cancelled,
    /// The worker is shutting down.
    Shutdown,
}

/// What to run for one attempt.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Program and arguments (not including an inline payload).
    pub argv: Vec<String>,
    /// The complete environment of the child.
    pub env: Vec<(String, String)>,
    /// Payload delivery.
    pub payload_mode: PayloadMode,
    /// Wall-clock limit for the attempt.
    pub timeout: Duration,
    /// Time between SIGTERM and SIGKILL.
    pub kill_grace: Duration,
    /// Bytes of stdout and of stderr kept (the tail).
    pub output_cap: usize,
    /// Private directory for payload files.
    pub payload_dir: PathBuf,
    /// Namespaces the child gets (egress enforcement).
    pub isolation: Isolation,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Exited with this status code.
    Exited(i32),
    /// Killed by this signal (not by us).
    Signaled(i32),
    /// Ran past its timeout and was stopped.
    TimedOut,
    /// Stopped by the worker.
    Stopped(StopReason),
    /// Could not be started.
    SpawnFailed(String),
}

/// The result of one attempt.
#[derive(Debug, Clone)]
pub struct Execution {
    /// How it ended.
    pub ending: Ending,
    /// Last `output_cap` bytes of stdout.
    pub stdout: Vec<u8>,
    /// Last `output_cap` bytes of stderr.
    pub stderr: Vec<u8>,
    /// Wall time from spawn to exit.
    pub duration: Duration,
}

/// Removes the payload file when dropped, whatever path the attempt took.
struct PayloadFile(PathBuf);

impl Drop for PayloadFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.0) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.0.display(), error = %e, "could not remove payload file");
            }
        }
    }
}

/// Runs one attempt of task `task_id` (fence `fence`) until it ends or `stop` says why it
/// must stop.
pub async fn run(
    spec: &Spec,
    task_id: i64,
    fence: i64,
    payload: &[u8],
    mut stop: watch::Receiver<Option<StopReason>>,
) -> Execution {
    let started = Instant::now();
    let failed = |why: String| Execution {
        ending: Ending::SpawnFailed(why),
        stdout: Vec::new(),
        stderr: Vec::new(),
        duration: started.elapsed(),
    };
    if spec.argv.is_empty() {
        return failed("the module's command is empty".into());
    }
    let mut argv: Vec<OsString> = spec.argv.iter().map(OsString::from).collect();
    let mut env = spec.env.clone();
    let mut _payload_file = None;
    match spec.payload_mode {
        PayloadMode::Stdin => {}
        PayloadMode::File => {
            let path = spec
                .payload_dir
                .join(format!("task-{task_id}-{fence}.payload"));
            if let Err(e) = write_private(&path, payload) {
                return failed(format!("cannot write the payload file: {e}"));
            }
            env.push(("TASK_PAYLOAD_FILE".into(), path.display().to_string()));
            _payload_file = Some(PayloadFile(path));
        }
        PayloadMode::Inline => argv.push(OsString::from_vec(payload.to_vec())),
    }
    let program = &spec.argv[0];
    let spawned = spawn::Command::new(&argv, &env).and_then(|cmd| {
        let cmd = cmd.isolation(spec.isolation);
        if spec.payload_mode == PayloadMode::Stdin {
            cmd.stdin_piped().spawn()
        } else {
            cmd.spawn()
        }
    });
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => return failed(format!("cannot start {program:?}: {e}")),
    };
    let pgid = child.id();

    if let Some(mut stdin) = child.stdin.take() {
        let payload = payload.to_vec();
        // A child that exits without reading its stdin gets EPIPE here; that is its choice.
        tokio::spawn(async move {
            let _ = stdin.write_all(&payload).await;
            let _ = stdin.shutdown().await;
        });
    }
    let out = tokio::spawn(read_tail(child.stdout.take(), spec.output_cap));
    let err = tokio::spawn(read_tail(child.stderr.take(), spec.output_cap));

    let stop_reason = async {
        let reason = stop.wait_for(Option::is_some).await.ok().map(|r| *r);
        match reason {
            Some(r) => r,
            // The sender is gone: nobody can ask us to stop any more.
            None => std::future::pending().await,
        }
    };
    let ending = tokio::select! {
        status = child.wait() => exit_ending(status),
        _ = tokio::time::sleep(spec.timeout) => {
            terminate(&mut child, pgid, spec.kill_grace).await;
            Ending::TimedOut
        }
        reason = stop_reason => {
            terminate(&mut child, pgid, spec.kill_grace).await;
            Ending::Stopped(reason.unwrap_or(StopReason::Shutdown))
        }
    };
    // Whatever the leader did, nothing it started outlives the attempt.
    sys::signal_group(pgid, Signal::SIGKILL);
    let duration = started.elapsed();
    // A grandchild that escaped the group could hold the pipes open; don't wait for it.
    let collect = |h: tokio::task::JoinHandle<Vec<u8>>| async move {
        tokio::time::timeout(Duration::from_secs(2), h)
            .await
            .ok()
            .and_then(Result::ok)
            .unwrap_or_default()
    };
    Execution {
        ending,
        stdout: collect(out).await,
        stderr: collect(err).await,
        duration,
    }
}

fn exit_ending(status: std::io::Result<std::process::ExitStatus>) -> Ending {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Ok(s) => match (s.code(), s.signal()) {
            (Some(code), _) => Ending::Exited(code),
            (None, Some(sig)) => Ending::Signaled(sig),
            (None, None) => Ending::Exited(-1),
        },
        Err(e) => Ending::SpawnFailed(format!("waiting for the executor failed: {e}")),
    }
}

/// SIGTERM to the group, then SIGKILL if it is still there after `grace`.
async fn terminate(child: &mut spawn::Child, pgid: u32, grace: Duration) {
    sys::signal_group(pgid, Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        sys::signal_group(pgid, Signal::SIGKILL);
        let _ = child.wait().await;
    }
}

/// Creates `path` readable by the owner only and writes `data`.
fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    f.sync_data()
}

/// Reads a stream to its end, keeping only the last `cap` bytes.
async fn read_tail<R: AsyncRead + Unpin>(reader: Option<R>, cap: usize) -> Vec<u8> {
    let Some(mut reader) = reader else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match reader.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > cap.saturating_mul(2) {
                    let cut = kept.len() - cap;
                    kept.drain(..cut);
                }
            }
        }
    }
    if kept.len() > cap {
        let cut = kept.len() - cap;
        kept.drain(..cut);
    }
    kept
}
