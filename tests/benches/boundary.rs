//! What the plugin boundary costs per call.
//!
//! Cases, each `CALLS` calls, `RUNS` runs interleaved (every case once per run), median
//! reported:
//! - `direct`: the no-op plugin's `handle` called as a plain Rust function (the very same
//!   source, `include!`d from the fx-noop fixture) through a function pointer, so it is a
//!   real call, with a message clone and drop per call;
//! - `boundary`: the same function in the fx-noop library (release build) loaded by the
//!   daemon's loader, called through the ABI with a 256-byte message: handle clone, the
//!   call, catch_unwind, outcome conversion, handle drop by host code;
//! - `baseline`: a no-op `fn(&[u8]) -> usize`, for scale.
//!
//! `boundary - direct` is what the boundary adds. Run: `cargo bench -p plugind-tests --bench
//! boundary` (add `-- --json` for machine-readable output).

use std::{hint::black_box, sync::Arc, time::Instant};

use plugind::loader::{self, Policy};
use plugind_api::{
    hosting,
    testing::{self, TestMessage},
};
use plugind_tests::{
    fixtures::{self, Profile},
    recording::Recorder,
};

// `pub` in the fixture crate, where it is exported; private here.
#[allow(unreachable_pub)]
mod noop {
    include!("../fixtures/fx-noop/src/plugin.rs");
}

const CALLS: u32 = 10_000_000;
const RUNS: usize = 5;

#[inline(never)]
fn baseline(payload: &[u8]) -> usize {
    payload.len()
}

fn time(mut call: impl FnMut()) -> f64 {
    let start = Instant::now();
    for _ in 0..CALLS {
        call();
    }
    start.elapsed().as_nanos() as f64 / f64::from(CALLS)
}

fn median(mut samples: Vec<f64>) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[samples.len() / 2]
}

fn main() {
    let json = std::env::args().any(|a| a == "--json");
    let lib = loader::load(
        &fixtures::library("fx-noop", Profile::Release),
        &Policy::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let recorder = Recorder::new("bench", "0.1.0", 1);
    let mut instance = lib
        .instantiate("{}", recorder.handle())
        .expect("fx-noop starts");
    let mut direct = noop::Noop;
    // A real call of the same function: through a pointer the optimiser cannot see through,
    // as the daemon calls a plugin (the plugin's own entry point may inline it, as every
    // plugin crate's would).
    let direct_handle: fn(&mut noop::Noop, plugind_api::Message) -> plugind_api::Outcome =
        black_box(<noop::Noop as plugind_api::Plugin>::handle);
    let delivery = Arc::new(TestMessage::new("bench", vec![0x42; 256]));
    let direct_message = testing::message(TestMessage::new("bench", vec![0x42; 256]));
    let payload = vec![0x42u8; 256];

    let mut direct_ns = Vec::new();
    let mut boundary_ns = Vec::new();
    let mut baseline_ns = Vec::new();

    for _ in 0..RUNS {
        direct_ns.push(time(|| {
            black_box(direct_handle(
                &mut direct,
                black_box(&direct_message).clone(),
            ));
        }));
        boundary_ns.push(time(|| {
            let message = hosting::message_handle(black_box(&delivery).clone());
            black_box(instance.handle(message)).expect("fx-noop acks");
        }));
        baseline_ns.push(time(|| {
            black_box(baseline(black_box(&payload)));
        }));
    }
    let (direct, boundary, baseline) =
        (median(direct_ns), median(boundary_ns), median(baseline_ns));
    let added = boundary - direct;
    if json {
        println!(
            "{{\"calls\":{CALLS},\"runs\":{RUNS},\"direct_ns\":{direct:.2},\
             \"boundary_ns\":{boundary:.2},\"baseline_ns\":{baseline:.2},\
             \"boundary_added_ns\":{added:.2}}}"
        );
    } else {
        println!("plugin boundary, {CALLS} calls x {RUNS} interleaved runs, median ns/call");
        println!("  baseline  no-op fn(&[u8])                          {baseline:6.2}");
        println!("  direct    Noop::handle(Message), clone + drop      {direct:6.2}");
        println!("  boundary  same through the ABI, 256-byte message   {boundary:6.2}");
        println!("  added by the boundary                              {added:6.2}");
    }
    assert_eq!(Arc::strong_count(&delivery), 1, "every handle was dropped");
}
