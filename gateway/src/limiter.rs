//! The per-host limiter of unauthorized hits: GCRA (what `governor` implements) in a
//! table with a hard bound on entries.
//!
//! # Why not `governor`'s keyed store
//!
//! `governor`'s keyed limiters keep their state in a `DashMap` (or a `HashMap`) that
//! only shrinks when `retain_recent` is called; nothing bounds it, and the only way to
//! bound it is to drop entries without looking at them, which lets a flood of fresh
//! addresses wash out a penalty. The eviction rule we need (DESIGN.md, "Notes on the hard
//! parts") looks at each entry's GCRA state, so the table is our own: a host's whole state
//! is its theoretical arrival time (TAT), exactly governor's representation, kept in
//! three preallocated arrays:
//!
//! - `index`: host key → slot number (`HashMap<u64, u32>`, SipHash, so an attacker who
//!   picks source addresses cannot pick collisions);
//! - `slots`: key, TAT and the audit-summary counters, 32 bytes each;
//! - `heap`: slot numbers in a min-heap ordered by TAT.
//!
//! The heap answers "is any tracked host fully refilled, and which refilled first" in
//! O(1): a host whose TAT is in the past is indistinguishable from one never seen, so
//! evicting it loses nothing. When the smallest TAT is still in the future, *every*
//! tracked host still carries state, and a newcomer is charged to one shared overflow
//! bucket instead. A penalized host is therefore never evicted before its penalty has
//! run out, however many fresh addresses arrive, and memory never grows past the bound.
//!
//! # GCRA in one paragraph
//!
//! With `limit` hits per `window`, each hit costs the emission interval `T = window /
//! limit`, and a burst of up to `limit` hits is tolerated (`tau = window - T`). A hit at
//! time `now` is allowed when `max(TAT, now) - now <= tau`, and then moves TAT to
//! `max(TAT, now) + T`; a denied hit changes nothing, so a flood cannot extend its own
//! penalty. A host is *penalized* while its next hit would be denied.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::Mutex,
    time::{Duration, Instant},
};

use crate::config::LimitConfig;

/// The key of a host: IPv4 addresses one by one, IPv6 by /64 (one subscriber's usual
/// allocation, so rotating through a /64 gains nothing).
///
/// IPv4 keys are tagged with `0xff` in the top byte, which as an IPv6 prefix is
/// `ff00::/8`, multicast, and never a source address; so the two families cannot collide
/// in one `u64`. IPv4-mapped IPv6 sources count as the IPv4 host.
pub fn host_key(ip: IpAddr) -> u64 {
    match taskgate_shared::cidr::canonical(ip) {
        IpAddr::V4(v4) => 0xff00_0000_0000_0000 | u64::from(u32::from(v4)),
        IpAddr::V6(v6) => (u128::from(v6) >> 64) as u64,
    }
}

/// What the limiter decided about one unauthorized hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    /// The hit is within the host's allowance: answer 401.
    pub allowed: bool,
    /// The host (or the overflow bucket) is over its limit and this denial opens a new
    /// audit window: log one summary line with this many denials (including this one).
    pub summary: Option<u32>,
    /// A fully refilled host was evicted to make room.
    pub evicted: bool,
    /// The table was full of hosts that still carry state; the hit was charged to the
    /// shared overflow bucket.
    pub overflow: bool,
}

/// One tracked host. 32 bytes; see the module docs for the layout.
#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    /// Theoretical arrival time, nanoseconds since the limiter's epoch.
    tat: u64,
    /// Where this slot sits in `heap`.
    heap_pos: u32,
    /// Denials since the last summary line.
    denied: u32,
    /// When the last summary line was written, seconds since the epoch plus one (0 = never).
    summary_at: u32,
}

/// GCRA state without a key: the overflow bucket.
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    tat: u64,
    denied: u32,
    summary_at: u32,
}

#[derive(Debug)]
struct Table {
    index: HashMap<u64, u32>,
    slots: Vec<Slot>,
    heap: Vec<u32>,
    overflow: Bucket,
}

/// The bounded limiter table. Cheap to share: one mutex, held for a hash lookup and at
/// most a heap sift of `log2(max_entries)` steps.
#[derive(Debug)]
pub struct Limiter {
    table: Mutex<Table>,
    epoch: Instant,
    /// Emission interval T, nanoseconds.
    t: u64,
    /// Burst tolerance tau = window - T, nanoseconds.
    tau: u64,
    window_secs: u32,
    cap: usize,
}

impl Limiter {
    /// Builds an empty table with room for `cfg.max_entries` hosts, allocated now so the
    /// table's memory is fixed from start-up.
    pub fn new(cfg: LimitConfig) -> Self {
        let window = cfg.window.as_nanos().min(u128::from(u64::MAX / 4)) as u64;
        let t = (window / u64::from(cfg.limit.max(1))).max(1);
        Limiter {
            table: Mutex::new(Table {
                index: HashMap::with_capacity(cfg.max_entries),
                slots: Vec::with_capacity(cfg.max_entries),
                heap: Vec::with_capacity(cfg.max_entries),
                overflow: Bucket::default(),
            }),
            epoch: Instant::now(),
            t,
            tau: window.saturating_sub(t),
            window_secs: cfg.window.as_secs().clamp(1, u64::from(u32::MAX)) as u32,
            cap: cfg.max_entries,
        }
    }

    /// Nanoseconds since the limiter's epoch, the clock every method takes.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// True while `key`'s next unauthorized hit would be denied; such a host gets 429 for
    /// every request. Untracked hosts are never penalized here, so an authorized client
    /// is not refused because strangers filled the overflow bucket.
    pub fn is_penalized(&self, key: u64, now: u64) -> bool {
        let table = self.lock();
        match table.index.get(&key) {
            Some(&i) => table.slots[i as usize].tat > now.saturating_add(self.tau),
            None => false,
        }
    }

    /// For a request from `key` at `now`: `None` when the host is not penalized;
    /// otherwise the denial is counted and `Some(summary)` says whether it opens a new
    /// audit summary window (see [`Verdict::summary`]).
    pub fn penalty(&self, key: u64, now: u64) -> Option<Option<u32>> {
        let mut table = self.lock();
        let i = *table.index.get(&key)? as usize;
        let slot = &mut table.slots[i];
        if slot.tat <= now.saturating_add(self.tau) {
            return None;
        }
        Some(self.count_denial(&mut slot.denied, &mut slot.summary_at, secs(now)))
    }

    /// Records one unauthorized hit from `key` at `now`.
    pub fn hit(&self, key: u64, now: u64) -> Verdict {
        let mut table = self.lock();
        let now_s = secs(now);
        let mut verdict = Verdict {
            allowed: true,
            summary: None,
            evicted: false,
            overflow: false,
        };
        if let Some(&i) = table.index.get(&key) {
            let i = i as usize;
            if let Some(tat) = self.gcra(table.slots[i].tat, now) {
                table.slots[i].tat = tat;
                let pos = table.slots[i].heap_pos as usize;
                table.sift_down(pos);
            } else {
                let slot = &mut table.slots[i];
                verdict.allowed = false;
                verdict.summary = self.count_denial(&mut slot.denied, &mut slot.summary_at, now_s);
            }
            return verdict;
        }
        // A newcomer. Its first hit is always allowed (limit >= 1), unless it has to
        // share the overflow bucket.
        let tat = now.saturating_add(self.t);
        if table.slots.len() < self.cap {
            let slot_no = table.slots.len() as u32;
            let heap_pos = table.heap.len() as u32;
            table.slots.push(Slot {
                key,
                tat,
                heap_pos,
                denied: 0,
                summary_at: 0,
            });
            table.heap.push(slot_no);
            table.index.insert(key, slot_no);
            table.sift_up(heap_pos as usize);
            return verdict;
        }
        let root = table.heap[0] as usize;
        if table.slots[root].tat <= now {
            // Fully refilled: nothing is lost by forgetting it. Reuse its slot.
            let old_key = table.slots[root].key;
            table.index.remove(&old_key);
            table.slots[root] = Slot {
                key,
                tat,
                heap_pos: 0,
                denied: 0,
                summary_at: 0,
            };
            table.index.insert(key, root as u32);
            table.sift_down(0);
            verdict.evicted = true;
            return verdict;
        }
        // Every tracked host still carries state: charge the shared overflow bucket.
        verdict.overflow = true;
        let bucket = &mut table.overflow;
        if let Some(tat) = self.gcra(bucket.tat, now) {
            bucket.tat = tat;
        } else {
            verdict.allowed = false;
            verdict.summary = self.count_denial(&mut bucket.denied, &mut bucket.summary_at, now_s);
        }
        verdict
    }

    /// Hosts tracked now (never more than `max_entries`).
    pub fn len(&self) -> usize {
        self.lock().slots.len()
    }

    /// True when no host is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The configured bound.
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// The window, for messages.
    pub fn window(&self) -> Duration {
        Duration::from_secs(u64::from(self.window_secs))
    }

    /// GCRA: the new TAT when a hit at `now` is allowed, `None` when it is denied.
    fn gcra(&self, tat: u64, now: u64) -> Option<u64> {
        let base = tat.max(now);
        (base - now <= self.tau).then(|| base.saturating_add(self.t))
    }

    /// Counts a denial and says whether it starts a new summary window.
    fn count_denial(&self, denied: &mut u32, summary_at: &mut u32, now_s: u32) -> Option<u32> {
        *denied = denied.saturating_add(1);
        if *summary_at == 0 || now_s.saturating_sub(*summary_at) >= self.window_secs {
            let n = *denied;
            *denied = 0;
            *summary_at = now_s;
            Some(n)
        } else {
            None
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-written in a way
        // that breaks memory bounds, and refusing every request afterwards would turn a
        // bug into an outage; keep going with the data as it is.
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Seconds since the epoch plus one, so 0 can mean "never".
fn secs(now: u64) -> u32 {
    (now / 1_000_000_000).min(u64::from(u32::MAX - 1)) as u32 + 1
}

// === impl Table (the min-heap on TAT) ===

impl Table {
    fn tat_at(&self, pos: usize) -> u64 {
        self.slots[self.heap[pos] as usize].tat
    }

    fn swap(&mut self, a: usize, b: usize) {
        self.heap.swap(a, b);
        let (sa, sb) = (self.heap[a] as usize, self.heap[b] as usize);
        self.slots[sa].heap_pos = a as u32;
        self.slots[sb].heap_pos = b as u32;
    }

    fn sift_up(&mut self, mut pos: usize) {
        while pos > 0 {
            let parent = (pos - 1) / 2;
            if self.tat_at(parent) <= self.tat_at(pos) {
                break;
            }
            self.swap(parent, pos);
            pos = parent;
        }
    }

    fn sift_down(&mut self, mut pos: usize) {
        let n = self.heap.len();
        loop {
            let (l, r) = (2 * pos + 1, 2 * pos + 2);
            let mut min = pos;
            if l < n && self.tat_at(l) < self.tat_at(min) {
                min = l;
            }
            if r < n && self.tat_at(r) < self.tat_at(min) {
                min = r;
            }
            if min == pos {
                break;
            }
            self.swap(pos, min);
            pos = min;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn limiter(limit: u32, window_s: u64, max: usize) -> Limiter {
        Limiter::new(LimitConfig {
            limit,
            window: Duration::from_secs(window_s),
            max_entries: max,
        })
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> u64 {
        host_key(IpAddr::from([a, b, c, d]))
    }

    #[test]
    fn keys_group_ipv6_by_64_and_keep_families_apart() {
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(host_key(a), host_key(b));
        assert_ne!(host_key(a), host_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(host_key(mapped), v4(10, 0, 0, 1));
        assert_ne!(v4(0, 0, 0, 0), host_key("::".parse().unwrap()));
    }

    #[test]
    fn limit_hits_then_penalized_then_recovers_after_window() {
        let l = limiter(3, 60, 10);
        let k = v4(10, 0, 0, 1);
        for _ in 0..3 {
            assert!(l.hit(k, 0).allowed);
        }
        assert!(l.is_penalized(k, 0));
        let v = l.hit(k, SEC);
        assert!(!v.allowed);
        assert_eq!(v.summary, Some(1), "first denial opens a summary window");
        assert_eq!(
            l.hit(k, 2 * SEC).summary,
            None,
            "later denials are only counted"
        );
        assert!(
            !l.is_penalized(v4(10, 0, 0, 2), 0),
            "other hosts unaffected"
        );
        assert!(!l.is_penalized(k, 60 * SEC));
        assert!(l.hit(k, 60 * SEC).allowed);
    }

    #[test]
    fn summary_once_per_window_with_count() {
        let l = limiter(1, 10, 10);
        let k = v4(1, 1, 1, 1);
        assert!(l.hit(k, 0).allowed);
        assert_eq!(l.hit(k, 1).summary, Some(1));
        for i in 0..50 {
            assert_eq!(l.hit(k, 2 + i).summary, None);
        }
        // Still penalized (denials do not move TAT, but the host keeps hitting).
        // After the window a denial opens the next summary with the count so far.
        let l2 = limiter(1, 10, 10);
        assert!(l2.hit(k, 0).allowed);
        assert_eq!(l2.hit(k, 1).summary, Some(1));
        assert_eq!(l2.hit(k, 2).summary, None);
        assert!(l2.hit(k, 10 * SEC).allowed);
        assert_eq!(
            l2.hit(k, 10 * SEC + 1).summary,
            Some(2),
            "a window after the last line"
        );
        assert_eq!(
            l2.hit(k, 12 * SEC).summary,
            None,
            "window not over since that line"
        );
    }

    #[test]
    fn flood_never_evicts_a_penalized_host_and_never_grows() {
        let l = limiter(2, 300, 100);
        let victim = v4(10, 9, 9, 9);
        assert!(l.hit(victim, 0).allowed);
        assert!(l.hit(victim, 0).allowed);
        assert!(!l.hit(victim, 0).allowed);
        let mut overflow = 0;
        for i in 0..50_000u32 {
            let [_, b, c, d] = i.to_be_bytes();
            let v = l.hit(v4(127, b, c, d), u64::from(i) * 1000);
            overflow += u32::from(v.overflow);
            assert!(l.len() <= 100);
            assert!(l.is_penalized(victim, u64::from(i) * 1000));
        }
        assert!(overflow > 49_000, "{overflow}");
        assert_eq!(l.len(), 100);
    }

    #[test]
    fn refilled_hosts_are_evicted_oldest_first() {
        let l = limiter(10, 10, 3);
        // T = 1 s. a refills at 1 s, b at 2 s (two hits), c at 1.5 s.
        let (a, b, c, d, e) = (
            v4(1, 0, 0, 1),
            v4(1, 0, 0, 2),
            v4(1, 0, 0, 3),
            v4(1, 0, 0, 4),
            v4(1, 0, 0, 5),
        );
        assert!(l.hit(a, 0).allowed);
        assert!(l.hit(b, 0).allowed);
        assert!(l.hit(b, 0).allowed);
        assert!(l.hit(c, SEC / 2).allowed);
        // At 0.9 s nobody has refilled: overflow.
        assert!(l.hit(d, SEC * 9 / 10).overflow);
        // At 1.6 s a and c have refilled; a refilled first and goes.
        let v = l.hit(d, SEC * 16 / 10);
        assert!(v.evicted && !v.overflow);
        let v = l.hit(e, SEC * 16 / 10);
        assert!(v.evicted, "c goes next");
        // b (refills at 2 s) is still tracked: its next hits count from its state.
        assert!(l.hit(b, SEC * 17 / 10).allowed);
        assert_eq!(l.len(), 3);
        assert!(l.hit(v4(1, 0, 0, 6), SEC * 17 / 10).overflow);
    }

    #[test]
    fn overflow_bucket_is_shared_and_limited() {
        let l = limiter(2, 60, 1);
        assert!(l.hit(v4(1, 1, 1, 1), 0).allowed);
        assert!(l.hit(v4(2, 2, 2, 2), 0).allowed);
        assert!(l.hit(v4(3, 3, 3, 3), 0).allowed);
        let v = l.hit(v4(4, 4, 4, 4), 0);
        assert!(v.overflow && !v.allowed && v.summary == Some(1));
        assert!(
            !l.is_penalized(v4(4, 4, 4, 4), 0),
            "untracked hosts are not refused outright"
        );
    }
}
