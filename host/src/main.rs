//! The `plugind` command: parses arguments, hands over to the library, maps the result to an
//! exit code (0 success, 1 runtime failure, 2 usage error, 78 invalid configuration).

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use plugind::cli;

/// plugind hosts native plugins and delivers messages to them reliably.
#[derive(Debug, Parser)]
#[command(name = "plugind", version, about, long_about = None, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Show a plugin library's manifest, sha256, size and verdict, without running its code.
    #[command(after_help = "\
The declared verdict comes from the file alone (permissions, ELF, manifest, API version).
--probe adds the full ABI verdict by loading the library in a short-lived child process,
so a library that crashes when loaded cannot take this command down.

Examples:
  plugind inspect plugins.d/file-sink.so
  plugind inspect --probe target/release/libmy_plugin.so
  plugind inspect --json plugins.d/file-sink.so | jq .verdict

Exit status: 0 accepted, 1 refused, 2 usage error.")]
    Inspect {
        /// The library file (a plugin cdylib, e.g. libmy_plugin.so).
        library: PathBuf,
        /// Also load it in a child process and check its ABI.
        #[arg(long)]
        probe: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
        /// A user trusted to own plugin files, besides root and you (repeatable).
        #[arg(long = "trusted-owner", value_name = "USER")]
        trusted_owners: Vec<String>,
    },
    /// Internal: load a library from an inherited memfd and report (used by the probe).
    #[command(hide = true)]
    ProbeLoad {
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Inspect {
            library,
            probe,
            json,
            trusted_owners,
        } => cli::inspect::run(&library, probe, json, &trusted_owners),
        Command::ProbeLoad { fd, path } => cli::inspect::probe_load(fd, &path),
    }
}
