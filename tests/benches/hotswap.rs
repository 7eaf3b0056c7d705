//! Hot swap, measured end to end with the release daemon and the `fx-swap` fixture (two
//! builds, A and B, that say which one handled each message and when):
//!
//! 1. Swap latency: while `plugind bench` publishes at 2,000 msgs/s, build B (then A, …) is
//!    renamed into `plugin_dir` ten times, once a second; the latency is from just before
//!    the rename to the moment the new build handled its first message. With `watch =
//!    "inotify"` and `watch = "poll"`.
//! 2. Publish→handle latency at 10,000 msgs/s (`plugind bench --rate 10000 --batch 8`, its
//!    intended send time against the fixture's handling time), without swaps and with one
//!    swap per second, three runs of each, alternating.
//!
//! Run: `cargo bench -p plugind-tests --bench hotswap -- [DURABILITY]` (default `memory`:
//! the swap's own cost, without the disk's fsync tail).

use std::{
    fs,
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use plugind_tests::{
    binary,
    daemon::Daemon,
    fixtures::{SwapBuild, swap_build},
    record::{SwapLine, parse_swap, read_swaps},
    sandbox::Sandbox,
};

const LIBRARY: &str = "plugins.d/fx-swap.so";

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn start(label: &str, watch: &str, durability: &str) -> Daemon {
    let sandbox = Sandbox::new(label);
    sandbox.dir("plugins.d");
    sandbox.copy(LIBRARY, &swap_build(SwapBuild::A));
    let config = format!(
        "[host]\nautoload = false\ndurability = \"{durability}\"\nwatch = \"{watch}\"\n\n\
         [plugins.swap]\nplugin = \"fx-swap\"\ntopics = [\"t.>\"]\nqueue_capacity = 4096\n\
         max_backlog = \"256MiB\"\n[plugins.swap.config]\npath = \"{}\"\n",
        sandbox.path().join("rec.txt").display()
    );
    Daemon::start_release(sandbox, &config)
}

/// `plugind bench` against `d`, in the background.
fn load(d: &Daemon, count: u64, rate: u64) -> Child {
    Command::new(binary::plugind_release())
        .current_dir(d.sandbox().path())
        .args([
            "bench",
            "-c",
            "plugins.toml",
            "--topic",
            "t.x",
            "--batch",
            "8",
        ])
        .args(["--count", &count.to_string(), "--rate", &rate.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("plugind bench starts")
}

/// Renames build `build` into `plugin_dir`; returns when it was renamed (Unix µs, taken just
/// before).
fn swap_in(d: &Daemon, build: SwapBuild) -> u64 {
    let temp = d.sandbox().path().join("plugins.d/.fx-swap.so.new");
    fs::copy(swap_build(build), &temp).unwrap();
    let at = now_us();
    fs::rename(&temp, d.sandbox().path().join(LIBRARY)).unwrap();
    at
}

/// Reads a growing record from where the last call stopped.
struct Tail {
    offset: usize,
}

impl Tail {
    /// The complete lines written since the last call.
    fn next(&mut self, record: &Path) -> Vec<SwapLine> {
        let bytes = fs::read(record).unwrap_or_default();
        let Some(end) = bytes[self.offset.min(bytes.len())..]
            .iter()
            .rposition(|b| *b == b'\n')
            .map(|i| self.offset + i + 1)
        else {
            return Vec::new();
        };
        let text = std::str::from_utf8(&bytes[self.offset..end]).expect("UTF-8");
        self.offset = end;
        text.lines().filter_map(parse_swap).collect()
    }
}

/// The first line handled by `build` at or after `since` (Unix µs), waiting 10 s at most.
fn first_by(record: &Path, tail: &mut Tail, build: SwapBuild, since: u64) -> SwapLine {
    let started = Instant::now();
    loop {
        if let Some(line) = tail
            .next(record)
            .into_iter()
            .find(|l| l.build == build.letter() && l.handled_us >= since)
        {
            return line;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "build {} never took over",
            build.letter()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Ten swaps under load; the latency of each, in ms.
fn swap_latencies(watch: &str, durability: &str) -> Vec<f64> {
    let d = start(&format!("bench-swap-{watch}"), watch, durability);
    let record = d.sandbox().path().join("rec.txt");
    let mut bench = load(&d, 2_000 * 30, 2_000);
    std::thread::sleep(Duration::from_secs(1));
    let mut latencies = Vec::new();
    let mut tail = Tail { offset: 0 };
    for swap in 0..10 {
        let build = SwapBuild::nth_swap(swap);
        let at = swap_in(&d, build);
        let line = first_by(&record, &mut tail, build, at);
        latencies.push(line.handled_us.saturating_sub(at) as f64 / 1000.0);
        std::thread::sleep(Duration::from_millis(1000));
    }
    let _ = bench.kill();
    let _ = bench.wait();
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    latencies
}

/// Publish→handle latencies (µs) of 100,000 messages at 10,000 msgs/s, with a swap every
/// second or none.
fn paced(swaps: bool, durability: &str) -> Vec<u64> {
    let d = start(
        &format!("bench-paced-{}", if swaps { "swaps" } else { "still" }),
        "inotify",
        durability,
    );
    let record = d.sandbox().path().join("rec.txt");
    // Warm-up, then the measured run.
    let mut warm = load(&d, 20_000, 10_000);
    warm.wait().unwrap();
    let warmed = read_swaps(&record).len();
    let mut bench = load(&d, 100_000, 10_000);
    let mut swap = 0;
    let mut swapped_at = Vec::new();
    let mut next = Instant::now() + Duration::from_secs(1);
    while bench.try_wait().unwrap().is_none() {
        if swaps && Instant::now() >= next {
            swapped_at.push(swap_in(&d, SwapBuild::nth_swap(swap)));
            swap += 1;
            next += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = Instant::now();
    while read_swaps(&record).len() < warmed + 100_000
        && started.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = read_swaps(&record);
    let latencies: Vec<u64> = lines[warmed..]
        .iter()
        .filter_map(|l| {
            l.sent_ns
                .map(|sent| l.handled_us.saturating_sub(sent / 1000))
        })
        .collect();
    if std::env::var_os("HOTSWAP_DETAIL").is_some() {
        for at in &swapped_at {
            let near: Vec<(u64, u64)> = lines[warmed..]
                .iter()
                .filter(|l| l.handled_us >= *at && l.handled_us < at + 300_000)
                .filter_map(|l| {
                    l.sent_ns
                        .map(|s| (l.handled_us - at, l.handled_us.saturating_sub(s / 1000)))
                })
                .collect();
            let slow: Vec<&(u64, u64)> = near.iter().filter(|(_, lat)| *lat > 1500).collect();
            println!(
                "  swap: {} slow (>1.5 ms) of {} in 300 ms; first slow at +{:?} ms, worst (µs, at ms) {:?}",
                slow.len(),
                near.len(),
                slow.first().map(|(t, _)| t / 1000),
                slow.iter().map(|(t, l)| (l, t / 1000)).max()
            );
        }
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    if swaps {
        println!("  ({swap} swaps during the run)");
    }
    latencies
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() as f64 * p) as usize).min(sorted.len() - 1)]
}

fn main() {
    let durability = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .unwrap_or_else(|| "memory".to_owned());
    println!("durability = {durability}");
    for watch in ["inotify", "poll"]
        .into_iter()
        .filter(|_| std::env::var_os("HOTSWAP_DETAIL").is_none())
    {
        let mut ms = swap_latencies(watch, &durability);
        let list: Vec<String> = ms.iter().map(|m| format!("{m:.1}")).collect();
        ms.sort_by(f64::total_cmp);
        println!(
            "rename → first message handled by the new build, watch = {watch}: median {:.1} ms, \
             max {:.1} ms ({} ms)",
            ms[ms.len() / 2],
            ms[ms.len() - 1],
            list.join(", ")
        );
    }
    // Alternating, three of each: this shared 2-core machine's noise shows as the spread.
    let runs: &[bool] = if std::env::var_os("HOTSWAP_DETAIL").is_some() {
        &[true]
    } else {
        &[false, true, false, true, false, true]
    };
    for &swaps in runs {
        let mut us = paced(swaps, &durability);
        us.sort_unstable();
        println!(
            "10,000 msgs/s, {}: {} messages, publish→handle p50 {} µs, p99 {} µs, p99.9 {} µs, \
             max {} µs",
            if swaps {
                "one swap per second"
            } else {
                "no swaps"
            },
            us.len(),
            percentile(&us, 0.50),
            percentile(&us, 0.99),
            percentile(&us, 0.999),
            us[us.len() - 1]
        );
    }
}
