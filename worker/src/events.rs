//! Task state-change events: a bounded ring for `Last-Event-ID` resumption and a
//! broadcast channel for live subscribers. Never the payload or output.
//!
//! The broadcast channel is bounded: a subscriber that falls behind is told it lagged
//! (and skips ahead) instead of slowing the worker or growing memory.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;
use tokio::sync::broadcast;

/// One task state change.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TaskEvent {
    /// Monotonic event number (the SSE `id`).
    #[serde(skip)]
    pub seq: u64,
    /// Task id.
    pub id: i64,
    /// Module.
    pub module: String,
    /// Queue.
    pub queue: String,
    /// New state.
    pub state: String,
    /// Attempt number.
    pub attempt: i32,
    /// Attempt wall time, when an attempt ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    /// When it happened (RFC 3339, UTC).
    pub time: String,
}

/// Publishes events to subscribers and keeps the last `capacity` for resumption.
#[derive(Debug)]
pub struct EventBus {
    tx: broadcast::Sender<Arc<TaskEvent>>,
    ring: Mutex<Ring>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Ring {
    next_seq: u64,
    events: VecDeque<Arc<TaskEvent>>,
}

impl EventBus {
    /// A bus keeping `capacity` recent events.
    pub fn new(capacity: usize) -> Self {
        let (tx, _) = broadcast::channel(capacity.max(16));
        Self {
            tx,
            ring: Mutex::new(Ring {
                next_seq: 1,
                events: VecDeque::with_capacity(capacity),
            }),
            capacity: capacity.max(1),
        }
    }

    /// Records and broadcasts a state change.
    pub fn emit(
        &self,
        id: i64,
        module: &str,
        queue: &str,
        state: &str,
        attempt: i32,
        duration_ms: Option<u64>,
    ) {
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let event = Arc::new(TaskEvent {
            seq: ring.next_seq,
            id,
            module: module.to_string(),
            queue: queue.to_string(),
            state: state.to_string(),
            attempt,
            duration_ms,
            time: rfc3339(SystemTime::now()),
        });
        ring.next_seq += 1;
        if ring.events.len() == self.capacity {
            ring.events.pop_front();
        }
        ring.events.push_back(event.clone());
        // Sent under the ring lock so a subscriber's backlog and live stream don't overlap
        // or leave a gap. No receivers is fine.
        let _ = self.tx.send(event);
    }

    /// Subscribes; returns the retained events after `last_seen` (all retained ones when
    /// `None`... only when resuming) and the live receiver.
    pub fn subscribe(
        &self,
        last_seen: Option<u64>,
    ) -> (Vec<Arc<TaskEvent>>, broadcast::Receiver<Arc<TaskEvent>>) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let backlog = match last_seen {
            Some(seen) => ring
                .events
                .iter()
                .filter(|e| e.seq > seen)
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        (backlog, self.tx.subscribe())
    }
}

/// Formats a time as RFC 3339 UTC with milliseconds.
pub fn rfc3339(t: SystemTime) -> String {
    let dt: time::OffsetDateTime = t.into();
    dt.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// Formats milliseconds since the epoch as RFC 3339.
pub fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_and_resume() {
        let bus = EventBus::new(3);
        for i in 0..5 {
            bus.emit(i, "m", "q", "running", 1, None);
        }
        let (backlog, _rx) = bus.subscribe(Some(2));
        assert_eq!(
            backlog.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let (backlog, _rx) = bus.subscribe(None);
        assert!(backlog.is_empty());
        let json = serde_json::to_string(&*bus.subscribe(Some(4)).0[0]).unwrap();
        assert!(json.contains("\"state\":\"running\"") && !json.contains("seq"));
    }
}
