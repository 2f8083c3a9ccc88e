//! Bytes of memory per tracked limiter host, measured with a counting allocator: the
//! table is filled to 100,000 hosts and the heap growth divided by the host count.
//! The goal (issue 3) is at most 100 bytes per host. `tests/bench/gateway` prints the
//! figure from this test's output.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::{IpAddr, Ipv4Addr},
    sync::atomic::{AtomicIsize, Ordering},
    time::Duration,
};

use taskgate_gateway::{
    config::LimitConfig,
    limiter::{host_key, Limiter},
};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged and only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[test]
fn bytes_per_tracked_host_are_at_most_100() {
    for n in [10_000usize, 100_000] {
        let before = LIVE.load(Ordering::SeqCst);
        let limiter = Limiter::new(LimitConfig {
            limit: 10,
            window: Duration::from_secs(60),
            max_entries: n,
        });
        for i in 0..n as u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limiter.hit(host_key(ip), 0).allowed);
        }
        assert_eq!(limiter.len(), n);
        // More hosts than the bound: no growth at all.
        let full = LIVE.load(Ordering::SeqCst);
        for i in 0..n as u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + i));
            limiter.hit(host_key(ip), 0);
        }
        assert_eq!(
            LIVE.load(Ordering::SeqCst),
            full,
            "the table grew past its bound"
        );
        let per_host = (full - before) as f64 / n as f64;
        println!("limiter bytes per tracked host at {n} entries: {per_host:.1}");
        assert!(per_host <= 100.0, "{per_host} bytes per host");
        drop(limiter);
    }
}
