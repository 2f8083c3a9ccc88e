//! What a task author and an operator see: retries with growing delays ending `dead`
//! with the last error (redacted), the module allow-list at enqueue and at claim, the
//! CLI's handling of bad input, and schema checks.

mod common;

use std::time::Duration;

use common::Env;
use taskgate_worker::store::{EnqueueParams, NewTask};

#[tokio::test]
async fn failing_task_backs_off_then_dies_with_its_last_error() {
    let env = Env::sqlite().await;
    let runner = env.script(
        "fail.sh",
        "echo \"try $TASK_ID $TASK_ATTEMPT $(date +%s%N)\" >> LEDGER\n\
         echo \"connecting with password=hunter2 failed\" >&2\nexit 3",
    );
    let id = env.enqueue_many("tasks.flaky", 1, &["--max-attempts", "4"])[0];
    let mut w = env.worker("w", &runner, &["--drain", "--retry-backoff", "400ms"]);
    assert!(w.wait(Duration::from_secs(60)).success(), "{}", w.logs());
    let s = env.status(id);
    assert_eq!(
        (s["state"].as_str(), s["attempt"].as_i64()),
        (Some("dead"), Some(4))
    );
    let err = s["last_error"].as_str().unwrap();
    assert!(err.contains("exited with status 3"), "{err}");
    assert!(
        err.contains("password=[REDACTED]") && !err.contains("hunter2"),
        "{err}"
    );
    let times: Vec<i64> = env
        .ledger_lines()
        .iter()
        .map(|l| l.split(' ').nth(3).unwrap().parse::<i64>().unwrap() / 1_000_000)
        .collect();
    assert_eq!(times.len(), 4);
    let gaps: Vec<i64> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Equal jitter: attempt n waits between half and all of 400ms * 2^(n-1).
    // The floors double; adjacent gaps may overlap by jitter plus scheduling noise, gaps
    // two attempts apart cannot.
    assert!(gaps[0] >= 200, "{gaps:?}");
    assert!(gaps[1] >= 400, "{gaps:?}");
    assert!(gaps[2] >= 800 && gaps[2] > gaps[0], "{gaps:?}");
    assert!(!w.logs().contains("hunter2"));
}

#[tokio::test]
async fn disallowed_and_malformed_modules_refused_at_enqueue() {
    let env = Env::sqlite().await;
    for (module, expect) in [
        ("evil.mod", "not allowed"),
        ("tasks.x;id", "malformed"),
        ("tasks..x", "malformed"),
    ] {
        let out = env.run(&["enqueue", "--module", module]);
        assert_eq!(out.status.code(), Some(64), "{module}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{module}: {err}");
        assert!(out.stdout.is_empty());
    }
    // Nothing reached the store.
    assert!(env.store().await.count_by_state().await.unwrap().is_empty());
}

#[tokio::test]
async fn disallowed_task_in_store_never_runs() {
    let env = Env::postgres().await;
    // Rows written behind the CLI's back (or before the allow-list was narrowed).
    let store = env.store().await;
    let task = |module: &str| NewTask {
        queue: "default".into(),
        module: module.into(),
        payload: Vec::new(),
        priority: 0,
        max_attempts: 5,
        run_at: None,
    };
    let ids = store
        .enqueue(EnqueueParams {
            tasks: vec![
                task("evil.mod"),
                task("tasks.x;touch pwned"),
                task("tasks.ok"),
            ],
            now: None,
        })
        .await
        .unwrap();
    let runner = env.script("exec.sh", "echo \"ran $TASK_MODULE\" >> LEDGER");
    let mut w = env.worker("w", &runner, &["--drain"]);
    assert!(w.wait(Duration::from_secs(30)).success(), "{}", w.logs());
    assert_eq!(env.ledger_lines(), vec!["ran tasks.ok".to_string()]);
    for id in &ids[..2] {
        let s = env.status(*id);
        assert_eq!(
            (s["state"].as_str(), s["attempt"].as_i64()),
            (Some("dead"), Some(1)),
            "{s}"
        );
        assert!(s["last_error"].as_str().unwrap().contains("module"), "{s}");
    }
    assert!(!env.path().join("pwned").exists());
    assert_eq!(env.status(ids[2])["state"], "succeeded");
}

#[tokio::test]
async fn jsonl_batch_is_all_or_nothing_and_names_the_bad_line() {
    let env = Env::postgres().await;
    let input = b"{\"a\":1}\n{\"token\":\"sekrit-canary\"}\n{\"broken\": \n{\"c\":3}\n";
    let out = env.run_with_stdin(
        &["enqueue", "--module", "tasks.x", "--payloads-jsonl", "-"],
        input,
    );
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("line 3"), "{err}");
    assert!(
        !err.contains("broken") && !err.contains("sekrit"),
        "the error must not echo payloads: {err}"
    );
    assert!(env.store().await.count_by_state().await.unwrap().is_empty());
    // A good batch: one id per line, in order.
    let ids = env.enqueue_many("tasks.x", 3, &["--queue", "q2", "--priority", "-2"]);
    assert_eq!(ids.len(), 3);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
    let s = env.status(ids[0]);
    assert_eq!(
        (s["queue"].as_str(), s["priority"].as_i64()),
        (Some("q2"), Some(-2))
    );
}

#[tokio::test]
async fn delayed_and_scheduled_tasks() {
    let env = Env::sqlite().await;
    let id = env
        .ok(&["enqueue", "--module", "tasks.x", "--delay", "1h"])
        .trim()
        .parse::<i64>()
        .unwrap();
    let s = env.status(id);
    assert_eq!(s["state"], "queued");
    let run_at = s["run_at"].as_str().unwrap();
    assert!(run_at > s["created_at"].as_str().unwrap());
    let id2 = env
        .ok(&[
            "enqueue",
            "--module",
            "tasks.x",
            "--run-at",
            "2099-01-01T00:00:00Z",
        ])
        .trim()
        .parse::<i64>()
        .unwrap();
    assert!(env.status(id2)["run_at"]
        .as_str()
        .unwrap()
        .starts_with("2099-01-01T00:00:00"));
    let bad = env.run(&["enqueue", "--module", "tasks.x", "--run-at", "tomorrow"]);
    assert_eq!(bad.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("RFC 3339"));
    // A drain does not wait for tasks scheduled in the future.
    let runner = env.script("exec.sh", "echo ran >> LEDGER");
    let mut w = env.worker("w", &runner, &["--drain"]);
    assert!(w.wait(Duration::from_secs(20)).success());
    assert!(env.ledger_lines().is_empty());
}

#[tokio::test]
async fn unmigrated_database_is_refused_with_a_hint() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "sqlite://{}?mode=rwc",
        dir.path().join("fresh.db").display()
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_worker"))
        .env_clear()
        .env("DATABASE_URL", &url)
        .env("ALLOWED_TASK_MODULES", "tasks.*")
        .args(["run", "--allow-root"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("run `worker migrate`"));
}

#[tokio::test]
async fn newer_schema_is_refused() {
    let env = Env::sqlite().await;
    let store = taskgate_worker::store::SqliteStore::connect(&env.db_url, 1)
        .await
        .unwrap();
    sqlx::query("INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) VALUES (99991231000000, 'future', true, x'00', 0)")
        .execute(store.pool())
        .await
        .unwrap();
    let out = env.run(&["status", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("upgrade the worker"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn bad_configuration_exits_64_naming_every_key() {
    let env = Env::sqlite().await;
    let cfg = env.path().join("worker.toml");
    std::fs::write(&cfg, "[worker]\nconcurency = 3\n").unwrap();
    let out = env.run(&["--config", cfg.to_str().unwrap(), "run"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("concurency"));
    let out = env.run(&[
        "run",
        "--lease-ttl",
        "soon",
        "--metrics-listen",
        "10.1.2.3:9100",
        "--allowed-modules",
        "*",
    ]);
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    for key in ["--lease-ttl", "--metrics-listen", "ALLOWED_TASK_MODULES"] {
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[tokio::test]
async fn root_without_user_is_refused() {
    if !nix::unistd::geteuid().is_root() {
        return; // only meaningful as root
    }
    let env = Env::sqlite().await;
    let out = env.run(&["run"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--user"));
}
