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
    /// For a tcps: endpoint: the CA certificate (PEM) that signed the daemon's certificate
    /// (default: $PLUGIND_TLS_CA, else the configuration's tls_cert_file).
    #[arg(long, value_name = "FILE", global = true)]
    pub tls_ca: Option<std::path::PathBuf>,
}

/// Prints `plugind: <message>` to stderr and returns `code`.
pub fn fail(code: u8, message: impl std::fmt::Display) -> ExitCode {
    eprintln!("plugind: {message}");
    ExitCode::from(code)
}

/// What a client command presents to a TCP endpoint.
#[derive(Debug, Default)]
pub struct Credentials {
    /// The bearer token.
    pub token: Option<String>,
    /// The CA certificate (PEM) of a `tcps:` endpoint.
    pub tls_ca: Option<Vec<u8>>,
}

/// The credentials for `endpoint`. The bearer token: `$PLUGIND_TOKEN`, else the
/// configuration's token file for the permission the command needs (`operate`:
/// `tcp_operator_token_file`, else `tcp_token_file`; publishing: the other way round) when
/// readable. The CA of a `tcps:` endpoint: `--tls-ca`, `$PLUGIND_TLS_CA`, else the
/// configuration's `tls_cert_file` (a self-signed certificate is its own CA).
///
/// # Errors
/// A CA file named by `--tls-ca` or `$PLUGIND_TLS_CA` that cannot be read.
pub fn credentials(
    endpoint: &crate::config::Endpoint,
    args: &ClientArgs,
    operate: bool,
) -> Result<Credentials, String> {
    if endpoint.tcp_address().is_none() {
        return Ok(Credentials::default());
    }
    let config = crate::config::locate(args.config.as_deref())
        .ok()
        .and_then(|(path, _)| crate::config::load(&path).ok());
    let token = std::env::var("PLUGIND_TOKEN").ok().or_else(|| {
        let host = &config.as_ref()?.host;
        let mut files = [
            ("tcp_operator_token_file", &host.tcp_operator_token_file),
            ("tcp_token_file", &host.tcp_token_file),
        ];
        if !operate {
            files.reverse();
        }
        files
            .into_iter()
            .find_map(|(key, file)| crate::control::server::read_token(key, file.as_ref()?).ok())
    });
    let tls_ca = if matches!(endpoint, crate::config::Endpoint::Tls(_)) {
        let named =
            args.tls_ca.clone().map(|p| ("--tls-ca", p)).or_else(|| {
                std::env::var_os("PLUGIND_TLS_CA").map(|p| ("$PLUGIND_TLS_CA", p.into()))
            });
        match named {
            Some((origin, path)) => Some(
                std::fs::read(&path).map_err(|e| format!("{origin} {}: {e}", path.display()))?,
            ),
            None => config
                .as_ref()
                .and_then(|c| c.host.tls_cert_file.as_ref())
                .and_then(|path| std::fs::read(path).ok()),
        }
    } else {
        None
    };
    Ok(Credentials { token, tls_ca })
}
