//! The short form of `tests/chaos/worker`: three workers drain a few hundred tasks while
//! workers are SIGKILLed and restarted and one is paused past its lease TTL. No task is
//! lost, none succeeds twice, and no executor outlives its worker, on PostgreSQL and on
//! SQLite. (At-least-once: a task whose worker died mid-run may *run* again; that is
//! allowed and not asserted against.) Also: a worker restarted at once after a SIGKILL
//! takes its socket path over from the dying children of the old one.

mod common;

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use common::{alive, children_of, Env, Worker};
use nix::sys::signal::Signal;
use taskgate_test_support::eventually::eventually_blocking;

const TASKS: usize = 300;
const WORKERS: usize = 3;
const KILLS: usize = 5;

/// An executor that forks nothing (bash builtins only), so every process in its group is
/// the executor itself: `start`/`end TASK_ID ATTEMPT PID` lines around a 50 ms wait.
fn executor(env: &Env) -> String {
    let fifo = env.path().join("sleep.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let script = env.path().join("exec.sh");
    let ledger = env.ledger.display();
    std::fs::write(
        &script,
        format!(
            "read -r _ || true\n\
             printf 'start %s %s %s\\n' \"$TASK_ID\" \"$TASK_ATTEMPT\" \"$$\" >> {ledger}\n\
             read -r -t 0.05 _ <> {fifo} || true\n\
             printf 'end %s %s %s\\n' \"$TASK_ID\" \"$TASK_ATTEMPT\" \"$$\" >> {ledger}\n",
            fifo = fifo.display()
        ),
    )
    .unwrap();
    format!("/usr/bin/bash {} {{module}}", script.display())
}

fn ended(env: &Env) -> usize {
    env.ledger_lines()
        .iter()
        .filter(|l| l.starts_with("end "))
        .count()
}

async fn succeeded(env: &Env) -> i64 {
    env.store()
        .await
        .count_by_state()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.state == "succeeded")
        .map(|c| c.count)
        .sum()
}

async fn chaos(env: Env) {
    let runner = executor(&env);
    let ids = env.enqueue_many("tasks.chaos", TASKS, &["--max-attempts", "50"]);
    let args = [
        "--concurrency",
        "4",
        "--lease-ttl",
        "1s",
        "--kill-grace",
        "1s",
    ];
    let mut generation = 0;
    let mut spawn = |i: usize| {
        generation += 1;
        env.worker(&format!("w{i}-{generation}"), &runner, &args)
    };
    let mut workers: Vec<Worker> = (0..WORKERS).map(&mut spawn).collect();

    let mut kills = 0;
    let mut paused: Option<(usize, Instant)> = None;
    let mut pause_done = false;
    let deadline = Instant::now() + Duration::from_secs(120);
    while ended(&env) < TASKS || paused.is_some() {
        assert!(
            Instant::now() < deadline,
            "not drained in 120s; {} ended",
            ended(&env)
        );
        let n = ended(&env);
        // Pause one worker for 2.5 lease TTLs near the end, when the others run out of
        // queued tasks and take over its expired leases.
        if !pause_done && n >= TASKS * 8 / 10 {
            workers[0].signal(Signal::SIGSTOP);
            paused = Some((0, Instant::now()));
            pause_done = true;
        }
        if let Some((i, since)) = paused {
            if since.elapsed() >= Duration::from_millis(2500) {
                workers[i].signal(Signal::SIGCONT);
                paused = None;
            }
        }
        // Kill number k once k/(KILLS+1) of the tasks ended; never the paused worker.
        if kills < KILLS && n >= (kills + 1) * TASKS / (KILLS + 1) {
            let victim = 1 + kills % (WORKERS - 1);
            let executors = children_of(workers[victim].child.id());
            workers[victim].signal(Signal::SIGKILL);
            workers[victim].wait(Duration::from_secs(10));
            for pid in executors {
                eventually_blocking(
                    &format!("executor {pid} to die with its worker"),
                    Duration::from_secs(10),
                    || (!alive(pid as i32)).then_some(()),
                );
            }
            let fresh = spawn(victim);
            let old = std::mem::replace(&mut workers[victim], fresh);
            drop(old);
            kills += 1;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(kills, KILLS);
    let mut done = 0;
    for _ in 0..600 {
        done = succeeded(&env).await;
        if done == TASKS as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(done, TASKS as i64, "tasks lost");
    for w in &mut workers {
        w.signal(Signal::SIGTERM);
        assert!(w.wait(Duration::from_secs(30)).success(), "{}", w.logs());
    }

    // No executor of any incarnation is left.
    let ps = std::process::Command::new("ps")
        .args(["-eo", "stat=,args="])
        .output()
        .unwrap();
    let script = env.path().join("exec.sh").display().to_string();
    let left: Vec<String> = String::from_utf8_lossy(&ps.stdout)
        .lines()
        .filter(|l| l.contains(&script) && !l.trim_start().starts_with('Z'))
        .map(str::to_string)
        .collect();
    assert!(
        left.is_empty(),
        "executors outlived their workers: {left:?}"
    );

    // Accepted successes, from every incarnation's log: at most one per task.
    let mut successes: HashMap<i64, usize> = HashMap::new();
    for e in std::fs::read_dir(env.path()).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "log") {
            for line in std::fs::read_to_string(e.path()).unwrap().lines() {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if v["message"] == "task attempt finished" && v["state"] == "succeeded" {
                    *successes.entry(v["task_id"].as_i64().unwrap()).or_default() += 1;
                }
            }
        }
    }
    let twice: Vec<_> = successes.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "tasks that succeeded twice: {twice:?}");
    // Every task's executor ran to its end at least once.
    let lines = env.ledger_lines();
    for id in ids {
        assert!(
            lines.iter().any(|l| l.starts_with(&format!("end {id} "))),
            "task {id} never ran to its end"
        );
    }
}

#[tokio::test]
async fn postgres_survives_kills_and_a_pause() {
    chaos(Env::postgres().await).await;
}

#[tokio::test]
async fn sqlite_survives_kills_and_a_pause() {
    chaos(Env::sqlite().await).await;
}

/// A worker SIGKILLed while spawning an executor leaves a child between fork and exec
/// that holds the listening socket for a moment. A worker restarted at once must take
/// the path over, not exit 64 saying it is in use (the chaos script found this). Here a
/// stand-in holds the socket and exits as soon as the new worker first connects.
#[tokio::test]
async fn a_socket_held_by_a_dying_process_is_taken_over() {
    let env = Env::sqlite().await;
    let sock = env.path().join("worker.sock");
    let mut holder = std::process::Command::new("python3")
        .arg("-c")
        .arg(format!(
            "import socket, os\n\
             s = socket.socket(socket.AF_UNIX); s.bind({:?}); s.listen(16)\n\
             print('ready', flush=True)\n\
             s.accept()\n\
             os._exit(0)\n",
            sock.display().to_string()
        ))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(holder.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    assert_eq!(ready.trim(), "ready");
    let runner = env.script("exec.sh", "true");
    let listen = format!("unix:{}", sock.display());
    let mut w = env.worker("w", &runner, &["--metrics-listen", &listen]);
    let (code, body) = eventually_blocking(
        "the worker serves on the taken-over path",
        Duration::from_secs(20),
        || {
            if let Some(status) = w.child.try_wait().unwrap() {
                panic!("worker exited {status}: {}", w.logs());
            }
            // Once the holder is gone, only the new worker can be listening.
            holder.try_wait().unwrap()?;
            std::os::unix::net::UnixStream::connect(&sock)
                .ok()
                .map(|_| common::http_get(&sock, "/healthz"))
        },
    );
    assert_eq!((code, body.as_str()), (200, "{\"status\":\"ok\"}"));
    // Log lines reach the pipe through the writer thread, a moment after the event.
    eventually_blocking(
        "the worker logs that it replaced the stale socket",
        Duration::from_secs(5),
        || {
            w.logs()
                .contains("replacing a stale socket file")
                .then_some(())
        },
    );
}
