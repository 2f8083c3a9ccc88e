//! Raw executor spawn rate: the ceiling for the worker's end-to-end throughput.
//!
//! Spawns a trivial executor N times, `--concurrency` at a time, with no queue or database,
//! and prints the rate. `--path` picks how each child is started:
//!
//! - `worker` (default): `taskgate_worker::executor::run`, exactly what the worker runs per
//!   attempt — `clone(CLONE_VM|CLONE_VFORK)` with the parent-death signal, its own process
//!   group, an empty environment plus `PATH`/`TASK_*`, a payload on stdin, stdout and stderr
//!   captured, the exit awaited through a pidfd.
//! - `std-fork`: `tokio::process` with the same settings and `PR_SET_PDEATHSIG` in a
//!   `pre_exec` hook, which makes std `fork` the whole parent (the worker's path before
//!   `worker/src/spawn.rs`).
//! - `posix-spawn`: `tokio::process` without the hook and with the program as an absolute
//!   path, the only case in which std uses `posix_spawn` (no parent-death signal).
//!
//! ```sh
//! cargo run --release -p taskgate-worker --example spawn_rate -- \
//!     --concurrency 4 --spawns 5000 --max-seconds 20
//! ```
//!
//! `--ballast-mib N` first fills N MiB of heap, to show how the cost of a `fork` grows with
//! the parent's resident memory (a running worker has several MiB of it).
//!
//! The last line of output is machine-readable: `spawns_per_sec=<rate>`.

use std::{
    process::Stdio,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use clap::Parser;
use taskgate_worker::executor::{self, Ending, Isolation, PayloadMode, Spec};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Spawns a trivial executor in a loop and prints spawns per second.
#[derive(Debug, Parser)]
struct Args {
    /// Children running at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Children to spawn in all.
    #[arg(long, default_value_t = 5000)]
    spawns: u64,
    /// Stop early (and report the rate so far) after this many seconds.
    #[arg(long, default_value_t = 30.0)]
    max_seconds: f64,
    /// The executor command, split like the worker's `--module-runner`.
    #[arg(long, default_value = "sh -c 'cat >/dev/null' bench.noop")]
    command: String,
    /// How to start each child: worker, std-fork or posix-spawn.
    #[arg(long, value_enum, default_value_t = SpawnPath::Worker)]
    path: SpawnPath,
    /// Tokio worker threads (default: one per CPU, like the worker binary).
    #[arg(long)]
    threads: Option<usize>,
    /// Allocate and touch this many MiB of heap first, so the parent has about as much
    /// anonymous memory as a running worker (`fork` copies its page tables per spawn).
    #[arg(long, default_value_t = 0)]
    ballast_mib: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SpawnPath {
    Worker,
    StdFork,
    PosixSpawn,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let argv = shell_words::split(&args.command)?;
    if argv.is_empty() {
        return Err("--command is empty".into());
    }
    if args.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n);
    }
    let rt = rt.build()?;
    // Touch every page so each one is mapped (and so copied by a fork).
    let ballast: Vec<u8> = (0..args.ballast_mib * 1024 * 1024)
        .map(|i| (i % 251) as u8)
        .collect();
    let result = rt.block_on(run(args, argv));
    std::hint::black_box(&ballast);
    result
}

async fn run(args: Args, argv: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    let argv = Arc::new(argv);
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
    let path = args.path;
    let started = Instant::now();
    let mut loops = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        let (argv, next, failed) = (argv.clone(), next.clone(), failed.clone());
        let total = args.spawns;
        loops.push(tokio::spawn(async move {
            let mut done = 0u64;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total || Instant::now() >= deadline {
                    return done;
                }
                let ok = match path {
                    SpawnPath::Worker => spawn_worker(&argv, i).await,
                    SpawnPath::StdFork => spawn_std(&argv, i, true).await,
                    SpawnPath::PosixSpawn => spawn_std(&argv, i, false).await,
                };
                if !ok {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                done += 1;
            }
        }));
    }
    let mut spawned = 0u64;
    for l in loops {
        spawned += l.await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    let rate = spawned as f64 / elapsed;
    println!(
        "spawned={spawned} failed={failed} concurrency={} path={path:?} ballast_mib={} elapsed_s={elapsed:.3}",
        args.concurrency, args.ballast_mib
    );
    println!("spawns_per_sec={rate:.1}");
    if failed > 0 {
        return Err(format!("{failed} executors did not exit 0").into());
    }
    Ok(())
}

fn child_env(i: u64) -> Vec<(String, String)> {
    vec![
        (
            "PATH".into(),
            std::env::var("PATH").unwrap_or_else(|_| "/usr/bin:/bin".into()),
        ),
        ("TASK_ID".into(), i.to_string()),
        ("TASK_ATTEMPT".into(), "1".into()),
        ("TASK_MODULE".into(), "bench.noop".into()),
        ("TASK_QUEUE".into(), "default".into()),
    ]
}

/// One attempt through the worker's own executor; true on exit 0.
async fn spawn_worker(argv: &[String], i: u64) -> bool {
    let spec = Spec {
        argv: argv.to_vec(),
        env: child_env(i),
        payload_mode: PayloadMode::Stdin,
        timeout: Duration::from_secs(60),
        kill_grace: Duration::from_secs(1),
        output_cap: 64 * 1024,
        payload_dir: std::env::temp_dir(),
        isolation: Isolation::None,
    };
    let (_keep, stop) = tokio::sync::watch::channel(None);
    let exec = executor::run(&spec, i as i64, 1, b"{\"n\":1}", stop).await;
    exec.ending == Ending::Exited(0)
}

/// One child through `tokio::process`, with or without the `pre_exec` hook.
async fn spawn_std(argv: &[String], i: u64, pre_exec: bool) -> bool {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(child_env(i))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if pre_exec {
        die_with_parent(&mut cmd);
    }
    let Ok(mut child) = cmd.spawn() else {
        return false;
    };
    if let Some(mut stdin) = child.stdin.take() {
        tokio::spawn(async move {
            let _ = stdin.write_all(b"{\"n\":1}").await;
            let _ = stdin.shutdown().await;
        });
    }
    let out = tokio::spawn(drain(child.stdout.take()));
    let err = tokio::spawn(drain(child.stderr.take()));
    let ok = matches!(child.wait().await, Ok(s) if s.success());
    let _ = out.await;
    let _ = err.await;
    ok
}

async fn drain<R: tokio::io::AsyncRead + Unpin>(r: Option<R>) {
    if let Some(mut r) = r {
        let mut buf = [0u8; 4096];
        while matches!(r.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// The parent-death hook the worker used before `worker/src/spawn.rs`.
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command) {
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: only async-signal-safe syscalls (prctl, getppid) run between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                return Err(std::io::Error::other("parent exited"));
            }
            Ok(())
        });
    }
}
