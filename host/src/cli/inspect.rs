//! `plugind inspect LIB.so [--probe] [--json]`: what a library says about itself and
//! whether the daemon would load it, without running its code in this process.

use std::{path::Path, process::ExitCode};

use serde::Serialize;

use crate::{
    cli::{EXIT_FAILURE, EXIT_USAGE, fail},
    loader::{self, Checked, Policy, ProbeCommand, ProbeReport},
};

/// The report, as printed with `--json`.
#[derive(Debug, Serialize)]
struct Report<'a> {
    path: &'a Path,
    manifest: Option<&'a plugind_api::manifest::Manifest>,
    sha256: Option<String>,
    size: Option<u64>,
    /// `accepted` or `refused`.
    verdict: &'static str,
    /// `declared` (nothing loaded) or `probed` (loaded in a child process).
    verdict_kind: &'static str,
    error: Option<String>,
}

/// Runs `inspect`.
pub fn run(library: &Path, probe: bool, json: bool, trusted: &[String]) -> ExitCode {
    let mut trusted_owners = vec![0];
    for name in trusted {
        match loader::uid_of(name) {
            Some(uid) => trusted_owners.push(uid),
            None => {
                return fail(
                    EXIT_USAGE,
                    format_args!("--trusted-owner {name}: no such user"),
                );
            }
        }
    }
    let policy = Policy {
        trusted_owners,
        ..Policy::default()
    };
    let checked = loader::check(library, &policy);
    // Refused before any loading (the file, the ELF, the manifest): a declared verdict even
    // with --probe, since no child process ever loaded it.
    let verdict_kind = if probe && checked.is_ok() {
        "probed"
    } else {
        "declared"
    };
    let error = match (&checked, probe) {
        (Err(e), _) => Some(e.to_string()),
        (Ok(checked), true) => {
            let Some(command) = ProbeCommand::current_exe() else {
                return fail(
                    EXIT_FAILURE,
                    "inspect --probe: cannot find the plugind executable",
                );
            };
            checked.probe(&command).err().map(|e| e.to_string())
        }
        (Ok(_), false) => None,
    };
    let ok = checked.as_ref().ok();
    let report = Report {
        path: library,
        manifest: ok.map(Checked::manifest),
        sha256: ok.map(|c| hex::encode(c.sha256())),
        size: ok.map(Checked::size),
        verdict: if error.is_none() {
            "accepted"
        } else {
            "refused"
        },
        verdict_kind,
        error,
    };
    if json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("the report serializes")
        );
    } else {
        print_text(&report);
    }
    if report.error.is_none() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILURE)
    }
}

fn print_text(report: &Report<'_>) {
    println!("{}", report.path.display());
    if let Some(m) = report.manifest {
        println!("  name         {}", m.name);
        println!("  version      {}", m.version);
        println!("  api version  {}", m.api_version);
        let topics = if m.topics.is_empty() {
            "(none: set `topics` in plugins.toml)".to_owned()
        } else {
            m.topics.join(", ")
        };
        println!("  topics       {topics}");
        if !m.description.is_empty() {
            println!("  description  {}", m.description);
        }
    }
    if let (Some(sha), Some(size)) = (&report.sha256, report.size) {
        println!("  sha256       {sha}");
        println!("  size         {size} bytes");
    }
    let how = match (report.verdict_kind, &report.error) {
        ("probed", _) => "probed: loaded and checked in a child process",
        ("declared", Some(_)) => "declared: refused from the file alone, before any loading",
        _ => "declared: checked without loading; --probe also checks the ABI",
    };
    match &report.error {
        None => println!("  verdict      accepted ({how})"),
        Some(error) => println!("  verdict      refused ({how})\n  reason       {error}"),
    }
}

/// The hidden `probe-load` command: the child side of the probe.
pub fn probe_load(fd: i32, path: &Path, configs: &str) -> ExitCode {
    // Instance → its config as JSON: the configs the plugin is asked to check.
    let configs = serde_json::from_str(configs).unwrap_or_default();
    let report = loader::probe_child(fd, path, &configs);
    println!(
        "{}",
        serde_json::to_string(&report).expect("the report serializes")
    );
    match report {
        ProbeReport::Accepted { .. } => ExitCode::SUCCESS,
        ProbeReport::Refused { .. } => ExitCode::from(EXIT_FAILURE),
    }
}
