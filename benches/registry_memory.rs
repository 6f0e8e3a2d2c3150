//! Memory and time per client of the server's client table at scale, with a counting allocator.
//!
//!   registry_memory [CLIENTS]       (default 100000; prints one line of JSON)

use std::alloc::{GlobalAlloc, Layout, System};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use udpchat::registry::{Activity, Limits, Registry};

struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn main() {
    let n: u32 = std::env::args()
        .nth(1)
        .map_or(100_000, |s| s.parse().expect("CLIENTS"));
    // Sources spread over 127.0.0.0/8 and ports, as real clients would be.
    let addrs: Vec<SocketAddr> = (0..n)
        .map(|i| {
            SocketAddr::from((
                Ipv4Addr::from(0x7f00_0000 | (i / 100 + 1)),
                10_000 + (i % 100) as u16,
            ))
        })
        .collect();
    let limits = Limits {
        max_clients: n as usize,
        max_per_ip: n as usize,
    };
    let mut registry = Registry::new(Duration::from_secs(10), limits);
    let before = LIVE.load(Ordering::Relaxed);
    let t0 = Instant::now();
    for &a in &addrs {
        registry.touch(a, None, t0, Activity::Register);
    }
    let register = t0.elapsed();
    let table = LIVE.load(Ordering::Relaxed) - before;
    let t1 = Instant::now();
    let members = registry.members();
    let rebuild = t1.elapsed();
    let with_snapshot = LIVE.load(Ordering::Relaxed) - before;
    let t2 = Instant::now();
    for &a in &addrs {
        registry.touch(a, None, t2, Activity::Heartbeat);
    }
    let heartbeat = t2.elapsed();
    let t3 = Instant::now();
    let again = registry.members();
    let cached = t3.elapsed();
    assert!(std::sync::Arc::ptr_eq(&members, &again));
    let t4 = Instant::now();
    let mut expired = Vec::new();
    registry.expire(t4 + Duration::from_secs(11), &mut expired);
    let sweep = t4.elapsed();
    assert_eq!(expired.len(), n as usize);
    let per = |d: Duration| d.as_nanos() as f64 / f64::from(n);
    println!(
        "{{\"clients\": {n}, \"bytes_per_client\": {:.0}, \"bytes_per_client_with_fanout_snapshot\": {:.0}, \"register_ns\": {:.0}, \"heartbeat_ns\": {:.0}, \"snapshot_rebuild_ms\": {:.2}, \"snapshot_cached_ns\": {}, \"expire_all_ms\": {:.1}}}",
        table as f64 / f64::from(n),
        with_snapshot as f64 / f64::from(n),
        per(register),
        per(heartbeat),
        rebuild.as_secs_f64() * 1e3,
        cached.as_nanos(),
        sweep.as_secs_f64() * 1e3,
    );
}
