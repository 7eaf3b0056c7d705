//! The commands of the `plugind` binary, one module each; `main.rs` only parses arguments.
//! Every command prints `plugind: <context>: <cause>` on failure and returns its exit code.

pub mod backup;
pub mod bench;
pub mod check;
pub mod ctl;
pub mod inspect;
pub mod logging;
pub mod publish;
pub mod run;

use std::process::ExitCode;

/// Exit code: a runtime failure (for `check` and `inspect`: a library was refused).
pub const EXIT_FAILURE: u8 = 1;
/// Exit code: a usage error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the configuration is invalid (sysexits EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// The options every client command takes.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientArgs {
    /// Print one JSON object instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The daemon's endpoint: unix:PATH or tcp:HOST:PORT.
    #[arg(long, value_name = "ENDPOINT", global = true)]
    pub connect: Option<String>,
    /// The configuration whose `listen` to use.
    #[arg(short = 'c', long = "config", value_name = "FILE", global = true)]
    pub config: Option<std::path::PathBuf>,
}

/// Prints `plugind: <message>` to stderr and returns `code`.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("plugind: {message}");
    ExitCode::from(code)
}

/// The bearer token for a TCP endpoint: `$PLUGIND_TOKEN`, else the configuration's
/// `tcp_token_file` when readable.
pub fn token(
    endpoint: &crate::config::Endpoint,
    config_flag: Option<&std::path::Path>,
) -> Option<String> {
    if !matches!(endpoint, crate::config::Endpoint::Tcp(_)) {
        return None;
    }
    if let Ok(token) = std::env::var("PLUGIND_TOKEN") {
        return Some(token);
    }
    let (path, _) = crate::config::locate(config_flag).ok()?;
    let file = crate::config::load(&path).ok()?.host.tcp_token_file?;
    crate::control::server::read_token(&file).ok()
}
