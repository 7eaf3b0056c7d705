//! In-process throughput of the delivery engine: one producer thread → ingress API → routing
//! → memory ledger → dispatcher → actor thread → the fx-noop plugin (release build, loaded by
//! the real loader) → settlement recorded, delivery and message garbage-collected.
//!
//! Run: `cargo bench -p plugind-tests --bench engine` (`-- N` to change the message count,
//! default 10,000,000; `--json` for JSON; `--defer` for the fx-settler plugin instead, which
//! defers every message and acks it from a second thread: plugind-api 1.1's deferred path). Payloads are 256 bytes, published in batches of
//! 256, all slices of one shared buffer (no copy). A second, shorter run counts allocations.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use bytes::Bytes;
use plugind::{
    clock::SystemClock,
    config,
    engine::{Engine, EngineOptions},
    ingress::{NewMessage, PublishRefused},
    ledger::MemoryLedger,
};
use plugind_tests::{
    fixtures::{self, Profile},
    sandbox::Sandbox,
};

struct Counting;

static COUNTING: AtomicBool = AtomicBool::new(false);
static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

// SAFETY: forwards every call to `System` unchanged; it only counts when enabled.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Ordering::Relaxed) {
            ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        }
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const BATCH: usize = 256;

fn run(engine: &Engine, n: u64) -> Duration {
    let buffer = Bytes::from(vec![0x42u8; 256 * BATCH]);
    let ingress = engine.ingress().clone();
    let start = Instant::now();
    let mut sent = 0u64;
    let acked_before = engine.ledger().counts().acked;
    while sent < n {
        let count = BATCH.min((n - sent) as usize);
        let batch: Vec<NewMessage> = (0..count)
            .map(|i| NewMessage {
                topic: "bench.noop".to_owned(),
                payload: buffer.slice(i * 256..(i + 1) * 256),
                headers: Vec::new(),
                key: None,
            })
            .collect();
        let results = ingress.publish(batch);
        // Backpressure: a full backlog refuses; wait for the plugin to catch up.
        let refused = results
            .iter()
            .filter(|r| matches!(r, Err(PublishRefused::Backlog(_))))
            .count();
        sent += (count - refused) as u64;
        if refused > 0 {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    while engine.ledger().counts().acked - acked_before < n {
        std::thread::sleep(Duration::from_millis(1));
    }
    start.elapsed()
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let n: u64 = args
        .iter()
        .find_map(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let defer = args.iter().any(|a| a == "--defer");
    let plugin = if defer { "fx-settler" } else { "fx-noop" };
    let sandbox = Sandbox::new("bench");
    sandbox.dir("plugins.d");
    sandbox.copy(
        &format!("plugins.d/{plugin}.so"),
        &fixtures::library(plugin, Profile::Release),
    );
    let text = format!(
        "[host]\nautoload = false\n\n[plugins.noop]\nplugin = \"{plugin}\"\n\
         topics = [\"bench.>\"]\nmax_backlog = \"64MiB\"\nmax_in_flight = 4096\n"
    );
    let path = sandbox.put("plugins.toml", &text);
    let config = config::parse(&path, &text).unwrap_or_else(|e| panic!("{}", e.render()));
    let options = EngineOptions {
        clock: Arc::new(SystemClock),
        probe: None,
        watch: false,
        notifier: None,
        fail_stop: None,
    };
    let (engine, failures) = Engine::start(&config, MemoryLedger::new(), options).unwrap();
    assert!(failures.is_empty(), "{failures:?}");

    run(&engine, 100_000); // warm-up
    let elapsed = run(&engine, n);
    let rate = n as f64 / elapsed.as_secs_f64();
    let ns = elapsed.as_nanos() as f64 / n as f64;

    let counted = 1_000_000.min(n);
    ALLOCATIONS.store(0, Ordering::Relaxed);
    COUNTING.store(true, Ordering::Relaxed);
    run(&engine, counted);
    COUNTING.store(false, Ordering::Relaxed);
    let per_message = ALLOCATIONS.load(Ordering::Relaxed) as f64 / counted as f64;
    let report = engine.stop(Duration::from_secs(5));
    assert!(report.abandoned.is_empty());

    if json {
        println!(
            "{{\"plugin\":\"{plugin}\",\"messages\":{n},\"seconds\":{:.3},\"msgs_per_sec\":{rate:.0},\"ns_per_msg\":{ns:.1},\"allocations_per_msg\":{per_message:.2}}}",
            elapsed.as_secs_f64()
        );
    } else {
        println!(
            "engine, in process: {n} messages of 256 bytes, batches of {BATCH}, one {} plugin",
            if defer {
                "deferring (acks from a second thread)"
            } else {
                "no-op"
            }
        );
        println!(
            "  {:.2} s, {rate:.0} msgs/s, {ns:.0} ns/msg",
            elapsed.as_secs_f64()
        );
        println!("  {per_message:.2} allocations/msg (over {counted} messages)");
    }
}
