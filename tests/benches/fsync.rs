//! The disk's own fsync cost, measured in the same sitting as the ledger benchmarks: 3 × 3000
//! writes of 4 KiB, each followed by `fdatasync`, appending (the file grows) and overwriting
//! in place. Run: `cargo bench -p plugind-tests --bench fsync -- [DIR]` (default: `state`,
//! where the ledger lives).

use std::{
    fs::{self, OpenOptions},
    io::{Seek as _, SeekFrom, Write as _},
    path::PathBuf,
    time::Instant,
};

fn run(dir: &std::path::Path, overwrite: bool) -> Vec<f64> {
    let path = dir.join("fsync-bench.tmp");
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .expect("the bench file can be created");
    let block = [0x5au8; 4096];
    if overwrite {
        for _ in 0..256 {
            file.write_all(&block).unwrap();
        }
        file.sync_all().unwrap();
    }
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

fn main() {
    let dir = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map_or_else(|| PathBuf::from("state"), PathBuf::from);
    fs::create_dir_all(&dir).expect("the directory can be created");
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
