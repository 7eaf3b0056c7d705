//! `plugind backup DEST` and `plugind restore SOURCE`: the ledger of the configuration's
//! `state_dir`, copied out while the daemon runs, and put back while it is stopped.

use std::{path::PathBuf, process::ExitCode};

use crate::{
    cli::{EXIT_CONFIG, EXIT_FAILURE, fail},
    config::{self, ConfigError},
    ledger::{
        LedgerError,
        backup::{self, Contents},
    },
};

/// The arguments of both commands.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// The backup file (written by `backup`, read by `restore`).
    pub file: PathBuf,
    /// The configuration whose state_dir to use.
    #[arg(short = 'c', long = "config", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The arguments of `backup`.
#[derive(Debug, Clone, clap::Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub common: Args,
    /// Replace FILE if it exists (a regular file only; never one inside state_dir).
    #[arg(long)]
    pub force: bool,
}

/// What to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `backup`, replacing an existing file if `force`.
    Backup {
        force: bool,
    },
    Restore,
}

/// Runs `backup` or `restore` with the state dir of the configuration found as the daemon
/// finds it.
pub fn run(action: Action, args: &Args) -> ExitCode {
    let (file, config_flag, json) = (&args.file, args.config.as_deref(), args.json);
    let name = match action {
        Action::Backup { .. } => "backup",
        Action::Restore => "restore",
    };
    let config = match config::locate(config_flag).and_then(|(path, _)| config::load(&path)) {
        Ok(config) => config,
        Err(ConfigError::Invalid(invalid)) => {
            eprintln!("{}\n", invalid.render());
            return fail(EXIT_CONFIG, format_args!("{name}: invalid configuration"));
        }
        Err(e) => return fail(EXIT_CONFIG, format_args!("{name}: {e}")),
    };
    let state_dir = &config.host.state_dir;
    let done = match action {
        Action::Backup { force } => backup::backup(state_dir, file, force),
        Action::Restore => backup::restore(state_dir, file),
    };
    match done {
        Ok(contents) => {
            print(action, &contents, json);
            ExitCode::SUCCESS
        }
        Err(e @ LedgerError::Unusable(_)) => fail(EXIT_CONFIG, format_args!("{name}: {e}")),
        Err(e) => fail(EXIT_FAILURE, format_args!("{name}: {e}")),
    }
}

fn print(action: Action, contents: &Contents, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::to_string(contents).expect("the contents serialize")
        );
        return;
    }
    let verb = match action {
        Action::Backup { .. } => "backed up to",
        Action::Restore => "restored into",
    };
    println!(
        "{verb} {} ({} bytes): {} messages, {} pending deliveries, {} dead letters",
        contents.file.display(),
        contents.bytes,
        contents.messages,
        contents.pending,
        contents.dead_letters
    );
    if action == Action::Restore {
        println!(
            "message ids continue from {} (never one the state dir gave out before)",
            contents.next_id
        );
    }
}
