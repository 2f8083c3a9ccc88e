//! Several worker processes compete for 1,000 tasks: each task succeeds exactly once and
//! no task ever runs twice, on PostgreSQL and on SQLite.

mod common;

use std::{collections::HashMap, time::Duration};

use common::Env;

async fn thousand_tasks_three_workers(env: Env) {
    let runner = env.script(
        "exec.sh",
        "echo \"start $TASK_ID $TASK_ATTEMPT\" >> LEDGER\ncat > /dev/null\necho \"end $TASK_ID\" >> LEDGER",
    );
    let ids = env.enqueue_many("tasks.count", 1000, &[]);
    assert_eq!(ids.len(), 1000);
    let mut workers: Vec<_> = (0..3)
        .map(|i| {
            env.worker(
                &format!("w{i}"),
                &runner,
                &["--drain", "--concurrency", "8"],
            )
        })
        .collect();
    for w in &mut workers {
        let status = w.wait(Duration::from_secs(180));
        assert!(status.success(), "worker failed: {}", w.logs());
    }
    let mut starts: HashMap<i64, usize> = HashMap::new();
    let mut ends: HashMap<i64, usize> = HashMap::new();
    for line in env.ledger_lines() {
        let mut parts = line.split(' ');
        let (kind, id) = (
            parts.next().unwrap(),
            parts.next().unwrap().parse().unwrap(),
        );
        let counter = if kind == "start" {
            &mut starts
        } else {
            &mut ends
        };
        *counter.entry(id).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(
            starts.get(id),
            Some(&1),
            "task {id} started {:?} times",
            starts.get(id)
        );
        assert_eq!(
            ends.get(id),
            Some(&1),
            "task {id} ended {:?} times",
            ends.get(id)
        );
    }
    let counts = env.store().await.count_by_state().await.unwrap();
    let succeeded: i64 = counts
        .iter()
        .filter(|c| c.state == "succeeded")
        .map(|c| c.count)
        .sum();
    assert_eq!(succeeded, 1000, "{counts:?}");
    // Every worker did some of the work (they really competed).
    for w in &workers {
        assert!(
            w.logs().contains("task attempt finished"),
            "a worker ran nothing: {}",
            w.logs()
        );
    }
}

#[tokio::test]
async fn postgres_thousand_tasks_three_workers() {
    thousand_tasks_three_workers(Env::postgres().await).await;
}

#[tokio::test]
async fn sqlite_thousand_tasks_three_workers() {
    thousand_tasks_three_workers(Env::sqlite().await).await;
}
