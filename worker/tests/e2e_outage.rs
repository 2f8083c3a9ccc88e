//! A PostgreSQL outage as the worker meets it: the worker reaches the database through a
//! TCP proxy the test cuts (the shared server is never restarted). During the outage
//! `/healthz` answers 503 with the fixed body, the executors the worker holds keep
//! running, and after the outage the same process reconnects, stores their outcomes and
//! takes new work. Nothing is lost; a task whose lease could not be renewed within its TTL
//! runs again instead.

mod common;

use std::{os::unix::net::UnixStream, path::PathBuf, time::Duration};

use common::{alive, http_get, Env, PgProxy};
use taskgate_test_support::eventually::{eventually, eventually_blocking};

/// Each executor records its start, waits for the gate file, records its end.
const GATED: &str = "cat > /dev/null\n\
    echo \"start $TASK_ID $TASK_ATTEMPT $$\" >> LEDGER\n\
    while [ ! -e GATE ]; do sleep 0.05; done\n\
    echo \"end $TASK_ID $TASK_ATTEMPT\" >> LEDGER";

struct Setup {
    env: Env,
    proxy: PgProxy,
    sock: PathBuf,
    gate: PathBuf,
    worker: common::Worker,
}

async fn setup(lease_ttl: &str) -> Setup {
    let env = Env::postgres().await;
    let proxy = PgProxy::start().await;
    let sock = env.path().join("worker.sock");
    let gate = env.path().join("gate");
    let runner = env.script(
        "exec.sh",
        &GATED.replace("GATE", &gate.display().to_string()),
    );
    let url = proxy.url(&env.db_url);
    let listen = format!("unix:{}", sock.display());
    let worker = env.worker_with(
        "w",
        &runner,
        &[
            "--metrics-listen",
            &listen,
            "--concurrency",
            "4",
            "--lease-ttl",
            lease_ttl,
            "--kill-grace",
            "1s",
        ],
        &[("DATABASE_URL", &url)],
    );
    eventually_blocking("worker socket", Duration::from_secs(20), || {
        UnixStream::connect(&sock).ok().map(|_| ())
    });
    Setup {
        env,
        proxy,
        sock,
        gate,
        worker,
    }
}

async fn health(sock: &std::path::Path) -> (u16, String) {
    let p = sock.to_path_buf();
    tokio::task::spawn_blocking(move || http_get(&p, "/healthz"))
        .await
        .unwrap()
}

async fn unhealthy(sock: &std::path::Path) {
    let (code, body) = eventually("503 during the outage", Duration::from_secs(30), || {
        let s = sock.to_path_buf();
        async move {
            let r = health(&s).await;
            (r.0 == 503).then_some(r)
        }
    })
    .await;
    assert_eq!((code, body.as_str()), (503, "{\"status\":\"unavailable\"}"));
}

async fn healthy_again(sock: &std::path::Path) {
    eventually("200 after the outage", Duration::from_secs(60), || {
        let s = sock.to_path_buf();
        async move { (health(&s).await == (200, "{\"status\":\"ok\"}".to_string())).then_some(()) }
    })
    .await;
}

fn starts(env: &Env) -> Vec<Vec<String>> {
    env.ledger_lines()
        .iter()
        .filter(|l| l.starts_with("start "))
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect()
}

fn wait_all_succeeded(env: &Env, ids: &[i64]) {
    for &id in ids {
        eventually_blocking(
            &format!("task {id} succeeded"),
            Duration::from_secs(60),
            || (env.status(id)["state"] == "succeeded").then_some(()),
        );
    }
}

// Multi-threaded: the proxy runs on this runtime while the test blocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_tasks_finish_through_an_outage_and_the_worker_reconnects() {
    // A TTL far longer than the outage: the leases stay valid throughout.
    let mut s = setup("60s").await;
    let held = s.env.enqueue_many("tasks.held", 4, &[]);
    eventually_blocking("4 executors running", Duration::from_secs(20), || {
        (starts(&s.env).len() == 4).then_some(())
    });

    s.proxy.cut();
    unhealthy(&s.sock).await;
    // Work arrives while the worker cannot see the database.
    let later = s.env.enqueue_many("tasks.later", 4, &[]);
    // The held executors were not stopped: they finish during the outage.
    std::fs::write(&s.gate, "").unwrap();
    s.env
        .wait_ledger(&format!("end {} 1", held[3]), Duration::from_secs(20));
    for id in &held {
        s.env
            .wait_ledger(&format!("end {id} 1"), Duration::from_secs(20));
    }
    assert_eq!(health(&s.sock).await.0, 503, "still cut off");
    assert!(
        s.worker.child.try_wait().unwrap().is_none(),
        "the worker exited during the outage: {}",
        s.worker.logs()
    );

    s.proxy.restore().await;
    healthy_again(&s.sock).await;
    wait_all_succeeded(&s.env, &held);
    wait_all_succeeded(&s.env, &later);
    for id in &held {
        let st = s.env.status(*id);
        assert_eq!(st["attempt"], 1, "held task {id} ran again: {st}");
    }
    // Each task ran exactly once, all in the same worker process.
    let runs = starts(&s.env);
    assert_eq!(runs.len(), 8, "{runs:?}");
    assert!(
        s.worker.child.try_wait().unwrap().is_none(),
        "{}",
        s.worker.logs()
    );
    let (_, metrics) = http_get(&s.sock, "/metrics");
    assert!(metrics.contains("taskgate_database_up 1"), "{metrics}");
    // The cause went to the operator's log, not to the probe.
    assert!(
        s.worker.logs().contains("health check"),
        "{}",
        s.worker.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_lease_stops_executors_and_loses_nothing() {
    let mut s = setup("2s").await;
    let ids = s.env.enqueue_many("tasks.long", 2, &[]);
    eventually_blocking("2 executors running", Duration::from_secs(20), || {
        (starts(&s.env).len() == 2).then_some(())
    });
    let pids: Vec<i32> = starts(&s.env)
        .iter()
        .map(|l| l[3].parse().unwrap())
        .collect();

    s.proxy.cut();
    unhealthy(&s.sock).await;
    // The leases cannot be renewed: another worker may take the tasks, so this one must
    // stop its executors rather than run two copies.
    for pid in &pids {
        eventually_blocking(
            &format!("executor {pid} stopped"),
            Duration::from_secs(30),
            || (!alive(*pid)).then_some(()),
        );
    }
    assert!(s
        .worker
        .logs()
        .contains("could not be renewed within the lease TTL"));
    std::fs::write(&s.gate, "").unwrap();

    s.proxy.restore().await;
    healthy_again(&s.sock).await;
    wait_all_succeeded(&s.env, &ids);
    for id in &ids {
        assert_eq!(s.env.status(*id)["attempt"], 2, "task {id}");
    }
    assert!(
        s.worker.child.try_wait().unwrap().is_none(),
        "{}",
        s.worker.logs()
    );
}
