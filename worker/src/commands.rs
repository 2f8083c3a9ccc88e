//! The one-shot subcommands: `migrate`, `enqueue`, `status`, `cancel`.

use std::{
    io::{BufRead, Read, Write},
    path::Path,
};

use serde_json::json;

use crate::{
    cli::EnqueueArgs,
    config::Common,
    events::rfc3339_ms,
    store::{self, EnqueueParams, NewTask, Store},
    Error,
};

/// Largest payload accepted, per task.
pub const MAX_PAYLOAD_BYTES: usize = 8 * 1024 * 1024;

/// `worker migrate`.
pub async fn migrate(common: &Common) -> Result<(), Error> {
    let store = store::connect(&common.database_url, 2)
        .await
        .map_err(Error::store)?;
    store.migrate().await.map_err(Error::store)?;
    tracing::info!(backend = store.backend(), "migrations applied");
    Ok(())
}

/// Opens the store and checks its schema (every command but `migrate`).
pub async fn open(
    common: &Common,
    max_connections: u32,
) -> Result<std::sync::Arc<dyn Store>, Error> {
    let store = store::connect(&common.database_url, max_connections)
        .await
        .map_err(Error::store)?;
    store.check_schema().await.map_err(Error::store)?;
    Ok(store)
}

/// `worker enqueue`: prints one id a line.
pub async fn enqueue(
    common: &Common,
    args: &EnqueueArgs,
    out: &mut impl Write,
) -> Result<(), Error> {
    common
        .allow
        .check(&args.module)
        .map_err(|e| Error::Usage(e.to_string()))?;
    if args.queue.trim().is_empty() {
        return Err(Error::Usage("--queue must not be empty".into()));
    }
    if args.max_attempts < 1 {
        return Err(Error::Usage("--max-attempts must be at least 1".into()));
    }
    let run_at = match (&args.run_at, &args.delay) {
        (Some(t), _) => {
            let t = time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339)
                .map_err(|e| Error::Usage(format!("--run-at {t:?} is not an RFC 3339 time ({e}); write e.g. 2026-12-04T18:00:00Z")))?;
            Some((t.unix_timestamp_nanos() / 1_000_000) as i64)
        }
        (None, Some(d)) => {
            let d = taskgate_shared::config::parse_duration("--delay", d)
                .map_err(|e| Error::Usage(e.to_string()))?;
            Some(store::now_ms() + d.as_millis() as i64)
        }
        (None, None) => None,
    };
    let payloads = read_payloads(args)?;
    let tasks = payloads
        .into_iter()
        .map(|payload| NewTask {
            queue: args.queue.clone(),
            module: args.module.clone(),
            payload,
            priority: args.priority,
            max_attempts: args.max_attempts,
            run_at,
        })
        .collect();
    let store = open(common, 2).await?;
    let ids = store
        .enqueue(EnqueueParams { tasks, now: None })
        .await
        .map_err(Error::store)?;
    for id in &ids {
        writeln!(out, "{id}").map_err(|e| Error::Failed(format!("cannot write to stdout: {e}")))?;
    }
    tracing::info!(count = ids.len(), module = %args.module, queue = %args.queue, "enqueued");
    Ok(())
}

fn read_payloads(args: &EnqueueArgs) -> Result<Vec<Vec<u8>>, Error> {
    let too_big =
        |what: String| Error::Data(format!("{what} is larger than {MAX_PAYLOAD_BYTES} bytes"));
    if let Some(path) = &args.payloads_jsonl {
        let reader: Box<dyn BufRead> = if path == Path::new("-") {
            Box::new(std::io::stdin().lock())
        } else {
            Box::new(std::io::BufReader::new(std::fs::File::open(path).map_err(
                |e| Error::Data(format!("cannot read {}: {e}", path.display())),
            )?))
        };
        let mut payloads = Vec::new();
        for (n, line) in reader.split(b'\n').enumerate() {
            let line =
                line.map_err(|e| Error::Data(format!("line {}: cannot read: {e}", n + 1)))?;
            let line = line.strip_suffix(b"\r").unwrap_or(&line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            if line.len() > MAX_PAYLOAD_BYTES {
                return Err(too_big(format!("line {}", n + 1)));
            }
            // Never echo the line: it is a payload.
            serde_json::from_slice::<serde::de::IgnoredAny>(line).map_err(|e| {
                Error::Data(format!(
                    "line {}: not valid JSON ({}); nothing was enqueued",
                    n + 1,
                    e.classify_message()
                ))
            })?;
            payloads.push(line.to_vec());
        }
        if payloads.is_empty() {
            return Err(Error::Data(
                "no payload lines found; nothing was enqueued".into(),
            ));
        }
        return Ok(payloads);
    }
    let mut buf = Vec::new();
    if let Some(path) = &args.payload_file {
        std::fs::File::open(path)
            .and_then(|f| f.take(MAX_PAYLOAD_BYTES as u64 + 1).read_to_end(&mut buf))
            .map_err(|e| Error::Data(format!("cannot read {}: {e}", path.display())))?;
    } else if args.payload_stdin {
        std::io::stdin()
            .lock()
            .take(MAX_PAYLOAD_BYTES as u64 + 1)
            .read_to_end(&mut buf)
            .map_err(|e| Error::Data(format!("cannot read stdin: {e}")))?;
    }
    if buf.len() > MAX_PAYLOAD_BYTES {
        return Err(too_big("the payload".into()));
    }
    Ok(vec![buf])
}

trait Classify {
    fn classify_message(&self) -> String;
}

impl Classify for serde_json::Error {
    /// The error's kind and column, without the line's content.
    fn classify_message(&self) -> String {
        let kind = match self.classify() {
            serde_json::error::Category::Io => "read error",
            serde_json::error::Category::Syntax => "syntax error",
            serde_json::error::Category::Data => "data error",
            serde_json::error::Category::Eof => "unexpected end of line",
        };
        format!("{kind} at column {}", self.column())
    }
}

/// `worker status ID`.
pub async fn status(common: &Common, id: i64, out: &mut impl Write) -> Result<(), Error> {
    let store = open(common, 2).await?;
    let Some(t) = store.get(id).await.map_err(Error::store)? else {
        return Err(Error::NotFound(format!("no task with id {id}")));
    };
    let ts = |ms: Option<i64>| ms.map(rfc3339_ms);
    let v = json!({
        "id": t.id,
        "queue": t.queue,
        "module": t.module,
        "state": t.state,
        "priority": t.priority,
        "attempt": t.attempt,
        "max_attempts": t.max_attempts,
        "fence": t.fence,
        "lease_owner": t.lease_owner,
        "lease_expires_at": (t.state == store::state::RUNNING).then(|| rfc3339_ms(t.available_at)),
        "run_at": (t.state == store::state::QUEUED || t.state == store::state::FAILED).then(|| rfc3339_ms(t.available_at)),
        "cancel_requested": t.cancel_requested,
        "last_error": t.last_error,
        "payload_bytes": t.payload_bytes,
        "created_at": rfc3339_ms(t.created_at),
        "updated_at": rfc3339_ms(t.updated_at),
        "started_at": ts(t.started_at),
        "finished_at": ts(t.finished_at),
    });
    writeln!(out, "{v}").map_err(|e| Error::Failed(format!("cannot write to stdout: {e}")))?;
    Ok(())
}

/// `worker cancel ID`.
pub async fn cancel(common: &Common, id: i64, out: &mut impl Write) -> Result<(), Error> {
    let store = open(common, 2).await?;
    let outcome = store.cancel(id, None).await.map_err(Error::store)?;
    if outcome == store::CancelOutcome::NotFound {
        return Err(Error::NotFound(format!("no task with id {id}")));
    }
    writeln!(out, "{}", json!({ "id": id, "result": outcome }))
        .map_err(|e| Error::Failed(format!("cannot write to stdout: {e}")))?;
    Ok(())
}
