//! Leases under failure: a paused worker whose lease was taken over cannot write its
//! result; a SIGKILLed worker's task is finished by another worker and its executor dies
//! with it; a shutdown releases unfinished tasks for others at once.

mod common;

use std::time::Duration;

use common::{alive, Env};
use nix::sys::signal::Signal;
use taskgate_test_support::eventually::eventually_blocking;

/// The first attempt records its pid then sleeps; later attempts finish at once.
const SLOW_FIRST: &str = "echo \"start $TASK_ID $TASK_ATTEMPT $$\" >> LEDGER\n\
    if [ \"$TASK_ATTEMPT\" = 1 ]; then sleep 3; fi\n\
    echo \"end $TASK_ID $TASK_ATTEMPT\" >> LEDGER";

async fn paused_worker_is_fenced(env: Env) {
    let runner = env.script("exec.sh", SLOW_FIRST);
    let id = env.enqueue_many("tasks.slow", 1, &[])[0];
    let a = env.worker("a", &runner, &["--lease-ttl", "1s"]);
    env.wait_ledger("start", Duration::from_secs(20));
    // Freeze worker A (not its executor): it can no longer heartbeat.
    a.signal(Signal::SIGSTOP);
    let mut b = env.worker("b", &runner, &["--lease-ttl", "1s", "--drain"]);
    assert!(b.wait(Duration::from_secs(30)).success(), "{}", b.logs());
    let s = env.status(id);
    assert_eq!(s["state"], "succeeded");
    assert_eq!(s["attempt"], 2);
    assert_eq!(s["fence"], 2);
    // Let A's first executor finish, then wake A: its write for fence 1 must be refused.
    env.wait_ledger(&format!("end {id} 1"), Duration::from_secs(20));
    a.signal(Signal::SIGCONT);
    eventually_blocking(
        "A notices it lost the lease",
        Duration::from_secs(20),
        || {
            let logs = a.logs();
            (logs.contains("stale write rejected") || logs.contains("lease lost")).then_some(())
        },
    );
    let s = env.status(id);
    assert_eq!(
        (
            s["state"].as_str(),
            s["attempt"].as_i64(),
            s["fence"].as_i64()
        ),
        (Some("succeeded"), Some(2), Some(2))
    );
    assert!(s["last_error"].is_null());
}

#[tokio::test]
async fn postgres_paused_worker_is_fenced() {
    paused_worker_is_fenced(Env::postgres().await).await;
}

#[tokio::test]
async fn sqlite_paused_worker_is_fenced() {
    paused_worker_is_fenced(Env::sqlite().await).await;
}

async fn killed_worker_loses_nothing(env: Env) {
    let runner = env.script(
        "exec.sh",
        "echo \"start $TASK_ID $TASK_ATTEMPT $$\" >> LEDGER\n\
        if [ \"$TASK_ATTEMPT\" = 1 ]; then exec sleep 60; fi\n\
        echo \"end $TASK_ID $TASK_ATTEMPT\" >> LEDGER",
    );
    let id = env.enqueue_many("tasks.slow", 1, &[])[0];
    let a = env.worker("a", &runner, &["--lease-ttl", "1s"]);
    let line = env.wait_ledger("start", Duration::from_secs(20));
    let executor_pid: i32 = line.split(' ').nth(3).unwrap().parse().unwrap();
    assert!(alive(executor_pid));
    a.signal(Signal::SIGKILL);
    eventually_blocking("orphaned executor to die", Duration::from_secs(10), || {
        (!alive(executor_pid)).then_some(())
    });
    let mut b = env.worker("b", &runner, &["--lease-ttl", "1s", "--drain"]);
    assert!(b.wait(Duration::from_secs(30)).success(), "{}", b.logs());
    let s = env.status(id);
    assert_eq!(
        (s["state"].as_str(), s["attempt"].as_i64()),
        (Some("succeeded"), Some(2))
    );
    assert!(env.ledger_lines().contains(&format!("end {id} 2")));
}

#[tokio::test]
async fn postgres_killed_worker_loses_nothing() {
    killed_worker_loses_nothing(Env::postgres().await).await;
}

#[tokio::test]
async fn sqlite_killed_worker_loses_nothing() {
    killed_worker_loses_nothing(Env::sqlite().await).await;
}

#[tokio::test]
async fn shutdown_releases_unfinished_tasks() {
    let env = Env::sqlite().await;
    let runner = env.script(
        "exec.sh",
        "echo \"start $TASK_ID $$\" >> LEDGER\nexec sleep 60",
    );
    // One slot: the first task runs, the second is claimed ahead and waits for the slot.
    let ids = env.enqueue_many("tasks.slow", 2, &[]);
    let mut a = env.worker(
        "a",
        &runner,
        &[
            "--concurrency",
            "1",
            "--shutdown-grace",
            "200ms",
            "--kill-grace",
            "1s",
        ],
    );
    let line = env.wait_ledger("start", Duration::from_secs(20));
    let executor_pid: i32 = line.split(' ').nth(2).unwrap().parse().unwrap();
    eventually_blocking("second task claimed ahead", Duration::from_secs(10), || {
        (env.status(ids[1])["state"] == "running").then_some(())
    });
    a.signal(Signal::SIGTERM);
    assert!(a.wait(Duration::from_secs(20)).success(), "{}", a.logs());
    assert!(!alive(executor_pid), "executor outlived the worker");
    assert_eq!(
        env.ledger_lines().len(),
        1,
        "the waiting task must not start during shutdown"
    );
    for id in ids {
        let s = env.status(id);
        // Released: claimable at once, and the interrupted attempt does not count.
        assert_eq!(
            (s["state"].as_str(), s["attempt"].as_i64()),
            (Some("queued"), Some(0)),
            "{s}"
        );
    }
}

#[tokio::test]
async fn cancel_stops_a_running_task() {
    let env = Env::postgres().await;
    let runner = env.script(
        "exec.sh",
        "echo \"start $TASK_ID $$\" >> LEDGER\nexec sleep 60",
    );
    let id = env.enqueue_many("tasks.slow", 1, &[])[0];
    let _a = env.worker(
        "a",
        &runner,
        &["--lease-ttl", "900ms", "--kill-grace", "1s"],
    );
    let line = env.wait_ledger("start", Duration::from_secs(20));
    let executor_pid: i32 = line.split(' ').nth(2).unwrap().parse().unwrap();
    let out = env.ok(&["cancel", &id.to_string()]);
    assert!(out.contains("cancel_requested"), "{out}");
    eventually_blocking("task cancelled", Duration::from_secs(15), || {
        (env.status(id)["state"] == "cancelled").then_some(())
    });
    assert!(!alive(executor_pid));
}
