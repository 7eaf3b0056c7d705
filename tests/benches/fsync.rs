//! The disk's own fsync cost, measured in the same sitting as the ledger benchmarks: 3 × 3000
//! writes of 4 KiB, each followed by `fdatasync`, appending (the file grows) and overwriting
//! in place. Run: `cargo bench -p plugind-tests --bench fsync -- [DIR]` (default: `state`,
//! where the ledger lives). With `--for SECS`: fsyncs back to back for that long and lists the
//! disk's stalls (over 10 ms).

use std::{
    fs::{self, OpenOptions},
    io::{Seek as _, SeekFrom, Write as _},
    path::PathBuf,
    time::Instant,
};

const BLOCK: [u8; 4096] = [0x5a; 4096];

/// The scratch file in `dir`, empty or (`filled`) 256 blocks long and synced.
fn scratch(dir: &std::path::Path, filled: bool) -> (fs::File, PathBuf) {
    let path = dir.join("fsync-bench.tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("the bench file can be created");
    if filled {
        for _ in 0..256 {
            file.write_all(&BLOCK).unwrap();
        }
        file.sync_all().unwrap();
    }
    (file, path)
}

fn run(dir: &std::path::Path, overwrite: bool) -> Vec<f64> {
    let (mut file, path) = scratch(dir, overwrite);
    let block = BLOCK;
    let mut micros = Vec::with_capacity(3000);
    for i in 0..3000u64 {
        if overwrite {
            file.seek(SeekFrom::Start((i % 256) * 4096)).unwrap();
        }
        let started = Instant::now();
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
        micros.push(started.elapsed().as_secs_f64() * 1e6);
    }
    drop(file);
    let _ = fs::remove_file(&path);
    micros
}

/// `--for SECS`: overwrites in place with `fdatasync` back to back for that long (the
/// ledger's log pattern) and reports the stalls: how often the disk itself stops.
fn soak(dir: &std::path::Path, seconds: u64) {
    let (mut file, path) = scratch(dir, true);
    let block = BLOCK;
    let start = Instant::now();
    let (mut ops, mut micros) = (0u64, Vec::new());
    let mut stalls = Vec::new();
    while start.elapsed().as_secs() < seconds {
        file.seek(SeekFrom::Start((ops % 256) * 4096)).unwrap();
        let began = Instant::now();
        file.write_all(&block).unwrap();
        file.sync_data().unwrap();
        let took = began.elapsed().as_secs_f64() * 1e6;
        if took > 10_000.0 {
            stalls.push((began.duration_since(start).as_secs_f64(), took / 1000.0));
        }
        micros.push(took);
        ops += 1;
    }
    drop(file);
    let _ = fs::remove_file(&path);
    micros.sort_by(f64::total_cmp);
    let at = |q: f64| micros[((micros.len() as f64 * q) as usize).min(micros.len() - 1)];
    let over = |ms: f64| stalls.iter().filter(|(_, t)| *t > ms).count();
    println!(
        "overwrite 4 KiB + fdatasync for {seconds} s in {}: {ops} ops, p50 {:.0} µs, p99 {:.0} µs, \
         p99.9 {:.0} µs, max {:.1} ms; stalls > 10 ms: {}, > 100 ms: {}, > 1 s: {}",
        dir.display(),
        at(0.5),
        at(0.99),
        at(0.999),
        micros[micros.len() - 1] / 1000.0,
        over(10.0),
        over(100.0),
        over(1000.0)
    );
    for (when, ms) in stalls {
        println!("  stall at {when:.1} s: {ms:.1} ms");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dir = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .map_or_else(|| PathBuf::from("state"), PathBuf::from);
    fs::create_dir_all(&dir).expect("the directory can be created");
    if let Some(i) = args.iter().position(|a| a == "--for") {
        let seconds = args
            .get(i + 1)
            .and_then(|s| s.parse().ok())
            .expect("--for takes a number of seconds");
        soak(&dir, seconds);
        return;
    }
    for (name, overwrite) in [
        ("append 4 KiB + fdatasync", false),
        ("overwrite 4 KiB + fdatasync", true),
    ] {
        let mut all = Vec::new();
        for _ in 0..3 {
            all.extend(run(&dir, overwrite));
        }
        all.sort_by(f64::total_cmp);
        let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
        println!(
            "{name} in {}: p50 {:.0} µs, p99 {:.0} µs, p99.9 {:.0} µs, max {:.0} µs ({} ops)",
            dir.display(),
            at(0.5),
            at(0.99),
            at(0.999),
            all[all.len() - 1],
            all.len()
        );
    }
}
