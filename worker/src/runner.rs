//! The `worker run` loop: claim in batches, run each task as an executor, renew leases in
//! batches, write completions in batches, and shut down without losing work.
//!
//! Four cooperating parts share one table of the leases this worker holds:
//!
//! - the **claimer** waits for free executor slots and claims that many tasks in one
//!   statement (so a busy worker claims in batches, an idle one wakes on NOTIFY or a poll);
//! - one **executor task** per claim runs the subprocess and hands its outcome on;
//! - the **heartbeater** renews every held lease in one statement every third of the TTL,
//!   stops an executor at once when its lease is gone (taken over, or not renewed within
//!   the TTL because the database is unreachable), and relays operator cancels;
//! - the **completer** writes finished attempts in batches, each fenced by its token, and
//!   only then forgets the lease, so a lease stays renewed until its outcome is stored.
//!
//! No transaction or pooled connection is held while a task runs.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use taskgate_shared::redact::redact;
use tokio::sync::{mpsc, watch, Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    events::EventBus,
    executor::{self, Ending, Execution, StopReason},
    metrics::Metrics,
    modules::AllowList,
    plan::Plan,
    retry::Backoff,
    store::{
        state, ClaimParams, ClaimedTask, CompleteParams, Completion, HeartbeatParams, Lease,
        Outcome, Store,
    },
};

/// Longest error text stored with a task.
pub const MAX_ERROR_LEN: usize = 2048;

/// Settings of the run loop.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This worker's id, stored as the lease owner.
    pub owner: String,
    /// Queues to claim from.
    pub queues: Vec<String>,
    /// Executors running at once.
    pub concurrency: usize,
    /// Lease length; renewed every third of it.
    pub lease_ttl: Duration,
    /// Poll interval when idle (NOTIFY wakes PostgreSQL workers sooner).
    pub poll_interval: Duration,
    /// Tasks claimed ahead of free executor slots (leased, waiting to start).
    pub claim_ahead: usize,
    /// Most tasks claimed in one statement.
    pub claim_batch: usize,
    /// Most completions written in one statement.
    pub completion_batch: usize,
    /// Exit when nothing is left to do.
    pub drain: bool,
    /// How long a shutdown lets running tasks finish before stopping them.
    pub shutdown_grace: Duration,
    /// Retry back-off.
    pub backoff: Backoff,
    /// Modules allowed to run (checked again at claim).
    pub allow: AllowList,
}

/// A finished attempt on its way to the store.
struct Done {
    lease: Lease,
    outcome: Outcome,
    queue: String,
    module: String,
    attempt: i32,
    duration: Option<Duration>,
}

/// A lease this worker holds.
struct Held {
    fence: i64,
    stop: watch::Sender<Option<StopReason>>,
    /// Last time the store confirmed the lease (or the claim itself).
    renewed: Instant,
    /// The attempt ended and its outcome is queued for the completer.
    finished: bool,
}

type HeldTable = Arc<Mutex<HashMap<i64, Held>>>;

fn lock(t: &HeldTable) -> std::sync::MutexGuard<'_, HashMap<i64, Held>> {
    // A panic elsewhere must not wedge lease bookkeeping.
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything the run loop's parts share.
struct Shared {
    store: Arc<dyn Store>,
    settings: Settings,
    plan: Plan,
    metrics: Metrics,
    events: Arc<EventBus>,
    held: HeldTable,
    /// Wakes the claimer: new tasks (NOTIFY) or finished ones (drain re-check).
    wake: Arc<Notify>,
}

/// Runs until `shutdown` fires (or, with `drain`, until nothing is left), then stops
/// cleanly: running tasks get `shutdown_grace` to finish, the rest are stopped and their
/// leases released so another worker takes them at once.
pub async fn run(
    store: Arc<dyn Store>,
    settings: Settings,
    plan: Plan,
    metrics: Metrics,
    events: Arc<EventBus>,
    shutdown: CancellationToken,
) {
    let shared = Arc::new(Shared {
        store,
        settings,
        plan,
        metrics,
        events,
        held: HeldTable::default(),
        wake: Arc::new(Notify::new()),
    });
    let background = CancellationToken::new();
    let (done_tx, done_rx) = mpsc::unbounded_channel();

    let watcher = {
        let (s, stop) = (shared.clone(), background.clone());
        tokio::spawn(async move { s.store.watch(s.wake.clone(), stop).await })
    };
    let heartbeater = tokio::spawn(heartbeat_loop(shared.clone(), background.clone()));
    let reaper = tokio::spawn(reap_loop(shared.clone(), background.clone()));
    let completer = tokio::spawn(complete_loop(shared.clone(), done_rx));

    let tracker = TaskTracker::new();
    claim_loop(&shared, &tracker, &done_tx, &shutdown).await;
    tracker.close();

    if tokio::time::timeout(shared.settings.shutdown_grace, tracker.wait())
        .await
        .is_err()
    {
        let n = lock(&shared.held).len();
        tracing::info!(
            running = n,
            "grace period over; stopping running tasks and releasing their leases"
        );
        for h in lock(&shared.held).values() {
            let _ = h.stop.send(Some(StopReason::Shutdown));
        }
        tracker.wait().await;
    }
    drop(done_tx);
    // The completer flushes everything queued; give up on the store only if it stays
    // unreachable, in which case the leases expire and the tasks run again elsewhere.
    if tokio::time::timeout(Duration::from_secs(30), completer)
        .await
        .is_err()
    {
        tracing::error!("could not store the last task outcomes within 30s; their leases will expire and the tasks will run again");
    }
    background.cancel();
    let _ = heartbeater.await;
    let _ = reaper.await;
    let _ = watcher.await;
}

// === claimer ===

async fn claim_loop(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    done_tx: &mpsc::UnboundedSender<Done>,
    shutdown: &CancellationToken,
) {
    let s = &shared.settings;
    // A worker holds its running tasks plus `claim_ahead` claimed ahead, so the next
    // claim's round trip (and commit) overlaps running executors instead of sitting
    // between two tasks in a slot. Claimed-ahead tasks are leased and heartbeated like
    // running ones, and released at once on shutdown.
    let slots = Arc::new(Semaphore::new(s.concurrency + s.claim_ahead));
    let running = Arc::new(Semaphore::new(s.concurrency));
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let mut permits = vec![first];
        // Gather the slots that free up in the next moment too, so a busy worker claims
        // several tasks per statement instead of one.
        let gather_until = tokio::time::Instant::now() + Duration::from_millis(2);
        while permits.len() < s.claim_batch {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => {
                    match tokio::time::timeout_at(gather_until, slots.clone().acquire_owned()).await
                    {
                        Ok(Ok(p)) => permits.push(p),
                        _ => break,
                    }
                }
            }
        }

        let limit = permits.len();
        let claimed = match shared
            .store
            .claim(ClaimParams {
                queues: s.queues.clone(),
                limit: limit as u32,
                owner: s.owner.clone(),
                lease_ttl: s.lease_ttl,
                now: None,
            })
            .await
        {
            Ok(c) => {
                shared.metrics.database_up.set(1);
                c
            }
            Err(e) => {
                shared.metrics.database_up.set(0);
                tracing::warn!(error = %e, "claiming tasks failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(s.poll_interval) => {}
                }
                continue;
            }
        };
        let got = claimed.len();
        for task in claimed {
            let Some(permit) = permits.pop() else { break };
            start(shared, tracker, done_tx, task, permit, &running, shutdown);
        }
        drop(permits);
        if got == limit {
            continue; // more may be waiting
        }
        if s.drain && lock(&shared.held).is_empty() {
            match shared.store.outstanding(&s.queues, None).await {
                Ok(0) => {
                    tracing::info!("drain: no task left in the queues; exiting");
                    return;
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "drain: cannot count outstanding tasks"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(s.poll_interval) => {}
        }
    }
}

/// Every poll interval, ends expired tasks that must not run again. Its own loop, so its
/// round trip never sits between two claims.
async fn reap_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(shared.settings.poll_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => reap(&shared).await,
        }
    }
}

/// Ends expired tasks that must not run again (final attempt used, or cancelled).
async fn reap(shared: &Shared) {
    match shared.store.reap(None).await {
        Ok(reaped) => {
            for r in reaped {
                tracing::warn!(task_id = r.id, module = %r.module, queue = %r.queue, state = %r.state, attempt = r.attempt,
                    "task's lease expired on its final attempt or after a cancel; ended without another run");
                shared
                    .metrics
                    .tasks_finished
                    .with_label_values(&[&r.queue, &r.module, &r.state])
                    .inc();
                shared
                    .events
                    .emit(r.id, &r.module, &r.queue, &r.state, r.attempt, None);
            }
        }
        Err(e) => tracing::warn!(error = %e, "reaping expired tasks failed"),
    }
}

/// Registers the lease and spawns the executor task.
fn start(
    shared: &Arc<Shared>,
    tracker: &TaskTracker,
    done_tx: &mpsc::UnboundedSender<Done>,
    task: ClaimedTask,
    permit: OwnedSemaphorePermit,
    running: &Arc<Semaphore>,
    shutdown: &CancellationToken,
) {
    let (stop_tx, stop_rx) = watch::channel(None);
    lock(&shared.held).insert(
        task.id,
        Held {
            fence: task.fence,
            stop: stop_tx,
            renewed: Instant::now(),
            finished: false,
        },
    );
    shared
        .metrics
        .tasks_claimed
        .with_label_values(&[&task.queue, &task.module])
        .inc();
    shared.events.emit(
        task.id,
        &task.module,
        &task.queue,
        state::RUNNING,
        task.attempt,
        None,
    );
    tracing::debug!(task_id = task.id, module = %task.module, queue = %task.queue, attempt = task.attempt, fence = task.fence, "claimed");
    let (shared, done_tx, running, shutdown) = (
        shared.clone(),
        done_tx.clone(),
        running.clone(),
        shutdown.clone(),
    );
    tracker.spawn(async move {
        // Wait for an executor slot; a task still waiting when the worker shuts down is
        // released unstarted, and one whose lease is lost or cancelled meanwhile is not run.
        let mut waiting = stop_rx.clone();
        let slot = tokio::select! {
            s = running.acquire_owned() => s.ok(),
            _ = shutdown.cancelled() => None,
            _ = waiting.wait_for(Option::is_some) => None,
        };
        let done = match slot {
            Some(slot) => {
                let done = execute(&shared, task, stop_rx).await;
                drop(slot);
                done
            }
            None => unstarted(task, *stop_rx.borrow()),
        };
        drop(permit);
        match done {
            Some(done) => {
                if let Some(h) = lock(&shared.held).get_mut(&done.lease.id) {
                    h.finished = true;
                }
                let _ = done_tx.send(done);
            }
            None => {
                // Lease lost: the heartbeater already forgot it; nothing may be written.
            }
        }
    });
}

/// The outcome of a claimed task that never started: released (shutdown), cancelled, or
/// nothing at all when its lease was lost.
fn unstarted(task: ClaimedTask, reason: Option<StopReason>) -> Option<Done> {
    let outcome = match reason {
        Some(StopReason::LeaseLost) => return None,
        Some(StopReason::Cancelled) => Outcome::Cancelled,
        Some(StopReason::Shutdown) | None => Outcome::Released,
    };
    Some(Done {
        lease: task.lease(),
        outcome,
        queue: task.queue,
        module: task.module,
        attempt: task.attempt,
        duration: None,
    })
}

/// Runs one attempt and decides its outcome; `None` when the lease was lost.
async fn execute(
    shared: &Shared,
    task: ClaimedTask,
    stop: watch::Receiver<Option<StopReason>>,
) -> Option<Done> {
    let done = |outcome, duration| {
        Some(Done {
            lease: task.lease(),
            outcome,
            queue: task.queue.clone(),
            module: task.module.clone(),
            attempt: task.attempt,
            duration,
        })
    };
    // Checked again here: the allow-list may have narrowed since the task was enqueued,
    // or the row may not have come through `worker enqueue` at all.
    if let Err(e) = shared.settings.allow.check(&task.module) {
        tracing::warn!(task_id = task.id, error = %e, "refusing to run task: module not allowed");
        return done(
            Outcome::Dead {
                error: truncate(&redact(&e.to_string())),
            },
            None,
        );
    }
    let (spec, credential) = shared.plan.spec(&task);
    shared.metrics.executors_running.inc();
    let exec = executor::run(&spec, task.id, task.fence, &task.payload, stop).await;
    shared.metrics.executors_running.dec();
    drop(credential);
    let duration = Some(exec.duration);
    let error = match &exec.ending {
        Ending::Exited(0) => return done(Outcome::Succeeded, duration),
        Ending::Stopped(StopReason::LeaseLost) => {
            tracing::warn!(
                task_id = task.id,
                fence = task.fence,
                "executor stopped: lease lost"
            );
            return None;
        }
        Ending::Stopped(StopReason::Cancelled) => return done(Outcome::Cancelled, duration),
        Ending::Stopped(StopReason::Shutdown) => return done(Outcome::Released, duration),
        Ending::Exited(code) => format!(
            "exited with status {code}{}",
            stderr_suffix(&exec, &task.payload)
        ),
        Ending::Signaled(sig) => format!(
            "killed by signal {sig}{}",
            stderr_suffix(&exec, &task.payload)
        ),
        Ending::TimedOut => format!(
            "timed out after {}",
            humantime::format_duration(spec.timeout)
        ),
        Ending::SpawnFailed(why) => why.clone(),
    };
    let error = truncate(&redact(&error));
    tracing::warn!(task_id = task.id, module = %task.module, attempt = task.attempt, max_attempts = task.max_attempts, error = %error, "task attempt failed");
    let outcome = if task.attempt >= task.max_attempts {
        Outcome::Dead { error }
    } else {
        Outcome::Retry {
            error,
            delay: shared.settings.backoff.delay(task.attempt),
        }
    };
    done(outcome, duration)
}

/// The end of the executor's stderr for the stored error, with secret-like values and
/// anything the task echoed of its own payload redacted *before* the tail is cut, so a cut
/// cannot separate a value from the key or the payload text that marks it.
fn stderr_suffix(exec: &Execution, payload: &[u8]) -> String {
    let all = String::from_utf8_lossy(&exec.stderr);
    let all = redact(&scrub_payload(&all, payload)).into_owned();
    let tail = all.trim();
    if tail.is_empty() {
        String::new()
    } else {
        // The end of stderr is where the reason usually is.
        let start = tail.len().saturating_sub(MAX_ERROR_LEN / 2);
        let start = (start..tail.len())
            .find(|&i| tail.is_char_boundary(i))
            .unwrap_or(0);
        format!(": {}", &tail[start..])
    }
}

/// Shortest payload piece [`scrub_payload`] replaces: shorter ones (`1`, `ok`) would blank
/// out ordinary words of the error without hiding anything worth hiding.
const MIN_SCRUBBED: usize = 4;

/// Most payload pieces looked for, so a huge payload cannot make a failure expensive.
const MAX_SCRUBBED: usize = 4096;

/// Replaces every piece of `payload` found in `text` with `[REDACTED]`: the whole payload,
/// each string value of a JSON payload, each line of a text payload. The payload is
/// secret by contract; a task that prints its input when it fails must not move it into
/// the stored error, `worker status` and the log.
pub fn scrub_payload(text: &str, payload: &[u8]) -> String {
    let Ok(whole) = std::str::from_utf8(payload) else {
        return text.to_string();
    };
    let parsed = serde_json::from_str::<serde_json::Value>(whole).ok();
    let mut pieces: Vec<&str> = vec![whole.trim()];
    match &parsed {
        Some(v) => json_strings(v, &mut pieces),
        None => pieces.extend(whole.lines().map(str::trim)),
    }
    pieces.retain(|p| p.len() >= MIN_SCRUBBED);
    // Longest first, so a value inside a longer piece is not replaced half-way.
    pieces.sort_by_key(|p| std::cmp::Reverse(p.len()));
    pieces.dedup();
    let mut out = text.to_string();
    for p in pieces.into_iter().take(MAX_SCRUBBED) {
        if out.contains(p) {
            out = out.replace(p, taskgate_shared::redact::REDACTED);
        }
    }
    out
}

fn json_strings<'a>(v: &'a serde_json::Value, out: &mut Vec<&'a str>) {
    match v {
        serde_json::Value::String(s) => out.push(s),
        serde_json::Value::Array(a) => a.iter().for_each(|x| json_strings(x, out)),
        serde_json::Value::Object(o) => o.values().for_each(|x| json_strings(x, out)),
        _ => {}
    }
}

/// Cuts text to [`MAX_ERROR_LEN`] bytes on a character boundary.
pub fn truncate(text: &str) -> String {
    if text.len() <= MAX_ERROR_LEN {
        return text.to_string();
    }
    let mut end = MAX_ERROR_LEN - 3;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

// === heartbeater ===

async fn heartbeat_loop(shared: Arc<Shared>, stop: CancellationToken) {
    let ttl = shared.settings.lease_ttl;
    let every = (ttl / 3).max(Duration::from_millis(50));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let leases: Vec<Lease> = lock(&shared.held)
            .iter()
            .map(|(&id, h)| Lease { id, fence: h.fence })
            .collect();
        if !leases.is_empty() {
            let sent = Instant::now();
            let result = shared
                .store
                .heartbeat(HeartbeatParams {
                    leases: leases.clone(),
                    lease_ttl: ttl,
                    now: None,
                })
                .await;
            match result {
                Ok(still) => {
                    shared.metrics.heartbeats.inc();
                    shared.metrics.database_up.set(1);
                    let still: HashMap<i64, bool> = still
                        .into_iter()
                        .map(|h| (h.id, h.cancel_requested))
                        .collect();
                    let mut held = lock(&shared.held);
                    for lease in &leases {
                        let Some(h) = held.get_mut(&lease.id) else {
                            continue;
                        };
                        if h.fence != lease.fence {
                            continue;
                        }
                        match still.get(&lease.id) {
                            Some(&cancel) => {
                                h.renewed = sent;
                                if cancel {
                                    let _ = h.stop.send(Some(StopReason::Cancelled));
                                }
                            }
                            // Finished attempts may have been completed meanwhile; the
                            // completer settles those.
                            None if h.finished => {}
                            None => {
                                lose(
                                    &shared,
                                    &mut held,
                                    lease,
                                    "the task was claimed by another worker or ended",
                                );
                            }
                        }
                    }
                }
                Err(e) => {
                    shared.metrics.heartbeat_errors.inc();
                    shared.metrics.database_up.set(0);
                    tracing::warn!(error = %e, leases = leases.len(), "lease heartbeat failed");
                }
            }
        }
        // A lease not confirmed within its TTL may already belong to someone else: stop
        // the executor rather than risk two copies of the task running at once.
        let mut held = lock(&shared.held);
        let expired: Vec<Lease> = held
            .iter()
            .filter(|(_, h)| !h.finished && h.renewed.elapsed() >= ttl)
            .map(|(&id, h)| Lease { id, fence: h.fence })
            .collect();
        for lease in expired {
            lose(
                &shared,
                &mut held,
                &lease,
                "it could not be renewed within the lease TTL",
            );
        }
    }
}

fn lose(shared: &Shared, held: &mut HashMap<i64, Held>, lease: &Lease, why: &str) {
    if let Some(h) = held.remove(&lease.id) {
        let _ = h.stop.send(Some(StopReason::LeaseLost));
        shared.metrics.leases_lost.inc();
        tracing::warn!(
            task_id = lease.id,
            fence = lease.fence,
            "lease lost: {why}; stopping the executor"
        );
    }
}

// === completer ===

async fn complete_loop(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Done>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < shared.settings.completion_batch {
            match rx.try_recv() {
                Ok(d) => batch.push(d),
                Err(_) => break,
            }
        }
        let params = CompleteParams {
            completions: batch
                .iter()
                .map(|d| Completion {
                    lease: d.lease,
                    outcome: d.outcome.clone(),
                })
                .collect(),
            now: None,
        };
        let mut delay = Duration::from_millis(100);
        let applied = loop {
            match shared.store.complete(params.clone()).await {
                Ok(a) => {
                    shared.metrics.database_up.set(1);
                    break a;
                }
                Err(e) => {
                    shared.metrics.database_up.set(0);
                    tracing::warn!(error = %e, outcomes = batch.len(), "storing task outcomes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        };
        settle(&shared, batch, &applied);
        shared.wake.notify_one();
    }
}

/// Records what the store accepted, counts what the fence rejected, forgets the leases.
fn settle(shared: &Shared, batch: Vec<Done>, applied: &[i64]) {
    let mut held = lock(&shared.held);
    for d in batch {
        if held
            .get(&d.lease.id)
            .is_some_and(|h| h.fence == d.lease.fence)
        {
            held.remove(&d.lease.id);
        }
        let state = match &d.outcome {
            Outcome::Succeeded => state::SUCCEEDED,
            Outcome::Retry { .. } => state::FAILED,
            Outcome::Dead { .. } => state::DEAD,
            Outcome::Cancelled => state::CANCELLED,
            Outcome::Released => state::QUEUED,
        };
        if !applied.contains(&d.lease.id) {
            shared.metrics.fenced_writes_rejected.inc();
            tracing::warn!(
                task_id = d.lease.id,
                fence = d.lease.fence,
                state,
                "stale write rejected: the task was claimed again since this attempt started"
            );
            continue;
        }
        let ms = d.duration.map(|t| t.as_millis() as u64);
        tracing::info!(task_id = d.lease.id, module = %d.module, queue = %d.queue, state, attempt = d.attempt, duration_ms = ms, "task attempt finished");
        shared
            .metrics
            .tasks_finished
            .with_label_values(&[&d.queue, &d.module, state])
            .inc();
        if let Some(t) = d.duration {
            shared
                .metrics
                .task_duration
                .with_label_values(&[&d.queue, &d.module])
                .observe(t.as_secs_f64());
        }
        shared
            .events
            .emit(d.lease.id, &d.module, &d.queue, state, d.attempt, ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrub_payload_hides_what_a_task_echoes_of_its_payload() {
        let json =
            br#"{"note": "CANARY-one", "n": 12345, "deep": {"list": ["CANARY-two"]}, "s": "ab"}"#;
        let text = format!(
            "bad input {} (CANARY-one, CANARY-two), ab",
            std::str::from_utf8(json).unwrap()
        );
        let out = scrub_payload(&text, json);
        assert!(!out.contains("CANARY"), "{out}");
        assert!(out.starts_with("bad input [REDACTED]"), "{out}");
        assert!(out.ends_with(", ab"), "short values stay: {out}");

        let lines = b"first-secret-line\nsecond-secret-line\n";
        let out = scrub_payload("got second-secret-line", lines);
        assert_eq!(out, "got [REDACTED]");

        let binary = [0xff, 0xfe, 0x00, 0x41];
        assert_eq!(scrub_payload("nothing to hide", &binary), "nothing to hide");
    }
}
