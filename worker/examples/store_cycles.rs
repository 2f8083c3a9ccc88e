//! Store claim+complete cycles per second, with no subprocess.
//!
//! Uses the library's store API exactly as `worker run` does: `store::connect`, `migrate`,
//! `enqueue` M tasks, then `--loops` concurrent loops that each `claim` up to `--batch`
//! tasks in one statement and write one batched `complete` (`Succeeded`, fenced by each
//! claim's token) for what they got. A cycle is one task claimed and completed. Each
//! batch size in `--batches` runs on its own queue with its own M tasks, so the figures do
//! not share rows.
//!
//! ```sh
//! cargo run --release -p taskgate-worker --example store_cycles -- \
//!     --database-url postgres://postgres@127.0.0.1:5432/bench --batches 50,1
//! ```
//!
//! Machine-readable lines: `cycles_per_sec batch=<B> value=<rate>`.

use std::time::{Duration, Instant};

use clap::Parser;
use taskgate_worker::store::{
    self, ClaimParams, CompleteParams, Completion, EnqueueParams, NewTask, Outcome,
};

/// Measures claim+complete cycles per second of the store alone.
#[derive(Debug, Parser)]
struct Args {
    /// Database URL (postgres://… or sqlite://…).
    #[arg(long, env = "DATABASE_URL")]
    database_url: String,
    /// Batch sizes to measure, one run each (claim limit = completion batch).
    #[arg(long, value_delimiter = ',', default_value = "50,1")]
    batches: Vec<u32>,
    /// Tasks enqueued for each batch size.
    #[arg(long, default_value_t = 50_000)]
    tasks: usize,
    /// Tasks enqueued for batch size 1 (it is much slower; fewer keep the run short).
    #[arg(long, default_value_t = 5_000)]
    tasks_unbatched: usize,
    /// Concurrent claim/complete loops.
    #[arg(long, default_value_t = 4)]
    loops: usize,
    /// Pool size (default: loops + 1).
    #[arg(long)]
    connections: Option<u32>,
    /// Stop a run after this many seconds and report the rate so far.
    #[arg(long, default_value_t = 20.0)]
    max_seconds: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let st = store::connect(
        &args.database_url,
        args.connections.unwrap_or(args.loops as u32 + 1),
    )
    .await?;
    st.migrate().await?;
    for &batch in &args.batches {
        if batch == 0 {
            return Err("batch sizes must be at least 1".into());
        }
        let queue = format!("bench-b{batch}");
        let n = if batch == 1 {
            args.tasks_unbatched
        } else {
            args.tasks
        };
        let t = Instant::now();
        for chunk in (0..n).collect::<Vec<_>>().chunks(5_000) {
            let tasks = chunk
                .iter()
                .map(|i| NewTask {
                    queue: queue.clone(),
                    module: "bench.noop".into(),
                    payload: format!("{{\"n\":{i}}}").into_bytes(),
                    priority: 0,
                    max_attempts: 5,
                    run_at: None,
                })
                .collect();
            st.enqueue(EnqueueParams { tasks, now: None }).await?;
        }
        eprintln!(
            "batch={batch}: enqueued {n} tasks in {:.2}s",
            t.elapsed().as_secs_f64()
        );

        let deadline = Instant::now() + Duration::from_secs_f64(args.max_seconds);
        let started = Instant::now();
        let mut loops = Vec::with_capacity(args.loops);
        for l in 0..args.loops {
            let (st, queue) = (st.clone(), queue.clone());
            loops.push(tokio::spawn(async move {
                let mut cycles = 0u64;
                let mut statements = 0u64;
                while Instant::now() < deadline {
                    let claimed = st
                        .claim(ClaimParams {
                            queues: vec![queue.clone()],
                            limit: batch,
                            owner: format!("bench:{l}"),
                            lease_ttl: Duration::from_secs(60),
                            now: None,
                        })
                        .await?;
                    statements += 1;
                    if claimed.is_empty() {
                        break;
                    }
                    let completions = claimed
                        .iter()
                        .map(|t| Completion {
                            lease: t.lease(),
                            outcome: Outcome::Succeeded,
                        })
                        .collect();
                    let applied = st
                        .complete(CompleteParams {
                            completions,
                            now: None,
                        })
                        .await?;
                    statements += 1;
                    if applied.len() != claimed.len() {
                        return Err(store::StoreError::Invalid(format!(
                            "{} of {} completions were fenced out",
                            claimed.len() - applied.len(),
                            claimed.len()
                        )));
                    }
                    cycles += applied.len() as u64;
                }
                Ok((cycles, statements))
            }));
        }
        let (mut cycles, mut statements) = (0u64, 0u64);
        for l in loops {
            let (c, s) = l.await??;
            cycles += c;
            statements += s;
        }
        let elapsed = started.elapsed().as_secs_f64();
        let rate = cycles as f64 / elapsed;
        eprintln!(
            "batch={batch}: {cycles} cycles, {statements} statements, {} loops, {elapsed:.2}s",
            args.loops
        );
        println!("cycles_per_sec batch={batch} value={rate:.1}");
    }
    Ok(())
}
