//! `plugind ctl …`: the operator's commands against a running daemon, over the `Control`
//! service. Each prints readable text, or one JSON object with `--json` (`watch`: one per
//! event). Errors read `plugind: ctl <command>: <cause>` and exit 1 (2 for usage).
//!
//! `enable` and `disable` edit `plugins.toml` here, with the operator's own permissions
//! (the daemon never writes it): the file the daemon runs, as `status` names it, is edited
//! with `toml_edit` (comments and layout kept), written to a temporary file with the same
//! mode and owner and renamed over it, and then `Reload` is called with the new file's hash,
//! so the daemon applies exactly what was written. Over TCP they are refused: the file would
//! not be the daemon's.

mod edit;
mod render;

use std::{
    io::{BufRead as _, IsTerminal as _, Write as _},
    path::Path,
    process::ExitCode,
};

use render::{
    dead_letters_json, dead_letters_text, instances_json, instances_text, message_json,
    message_text, reload_json, reload_text, status_json, status_text, time,
};
use tokio_stream::StreamExt as _;
use tonic::{Code, Status};

use crate::{
    cli::{ClientArgs, EXIT_FAILURE, EXIT_USAGE, fail},
    config::{self, Endpoint},
    control::{client, pb},
};

/// What to do.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Action {
    /// The daemon, its ledger and every instance in one line each.
    Status,
    /// Every instance in detail: state, plugin and version, generation, queues, circuit,
    /// last error.
    Plugins,
    /// One message: topic, headers, payload preview, attempt history per instance.
    Show {
        /// The message id.
        id: u64,
    },
    /// Set `enabled = true` for an instance in plugins.toml and reload.
    Enable {
        /// The instance name.
        name: String,
    },
    /// Set `enabled = false` for an instance in plugins.toml and reload.
    Disable {
        /// The instance name.
        name: String,
    },
    /// Read plugins.toml and plugin_dir again and apply them; with NAME, also release that
    /// instance from quarantine and instantiate it anew.
    Reload {
        /// An instance to instantiate anew.
        name: Option<String>,
    },
    /// Hand nothing more to an instance until `resume`.
    Pause {
        /// The instance name.
        name: String,
    },
    /// Undo `pause`.
    Resume {
        /// The instance name.
        name: String,
    },
    /// List dead letters, a page at a time.
    DeadLetters {
        /// Only this instance's.
        #[arg(long, value_name = "NAME")]
        instance: Option<String>,
        /// At most this many (the daemon sends at most 1000 a page).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Continue after ID/INSTANCE (printed at the end of a full page).
        #[arg(long, value_name = "ID/INSTANCE")]
        after: Option<String>,
    },
    /// Put dead letters back in their instance's queue (failures reset, history kept).
    Replay(Selected),
    /// Remove dead letters for good.
    Purge(Selected),
    /// End an instance's waiting deliveries for good (dead-lettered, or removed with
    /// --purge).
    Forget {
        /// The instance name.
        name: String,
        /// Remove them instead of dead-lettering them.
        #[arg(long)]
        purge: bool,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Change the daemon's log filter (info, debug, plugind=trace, …).
    LogLevel {
        /// An env-filter directive.
        level: String,
    },
    /// Print events as they happen (after the ones the daemon kept), until interrupted.
    Watch {
        /// Stop after this many events (the kept ones included).
        #[arg(long)]
        count: Option<usize>,
    },
}

/// Which dead letters `replay` or `purge` act on.
#[derive(Debug, Clone, clap::Args)]
pub struct Selected {
    /// Message ids (none: every message of --instance, or --all).
    ids: Vec<u64>,
    /// Only this instance's.
    #[arg(long, value_name = "NAME")]
    instance: Option<String>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    yes: bool,
}

/// The command's name, for messages.
fn name(action: &Action) -> &'static str {
    match action {
        Action::Status => "status",
        Action::Plugins => "plugins",
        Action::Show { .. } => "show",
        Action::Enable { .. } => "enable",
        Action::Disable { .. } => "disable",
        Action::Reload { .. } => "reload",
        Action::Pause { .. } => "pause",
        Action::Resume { .. } => "resume",
        Action::DeadLetters { .. } => "dead-letters",
        Action::Replay(_) => "replay",
        Action::Purge(_) => "purge",
        Action::Forget { .. } => "forget",
        Action::LogLevel { .. } => "log-level",
        Action::Watch { .. } => "watch",
    }
}

/// Why a command failed: the exit code and the message.
struct Failure(u8, String);

impl From<Status> for Failure {
    fn from(status: Status) -> Self {
        let message = status.message();
        let cause = if message.is_empty() {
            format!("{:?}", status.code())
        } else if status.code() == Code::PermissionDenied {
            // The daemon's message names the permission and how to grant it.
            format!("permission denied: {message}")
        } else {
            message.to_owned()
        };
        Self(EXIT_FAILURE, cause)
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure(EXIT_USAGE, message.into())
}

/// Runs `plugind ctl ACTION`.
pub fn run(client_args: &ClientArgs, action: Action) -> ExitCode {
    let command = name(&action);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => return fail(EXIT_FAILURE, format_args!("ctl {command}: {e}")),
    };
    match runtime.block_on(execute(client_args, action)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => fail(code, format_args!("ctl {command}: {message}")),
    }
}

async fn execute(args: &ClientArgs, action: Action) -> Result<(), Failure> {
    let config::Connect {
        endpoint,
        config_problem,
        ..
    } = config::client_endpoint(args.connect.as_deref(), args.config.as_deref())
        .map_err(|e| Failure(EXIT_FAILURE, e.clone()))?;
    // (`reload` is answered with the daemon's own account of the file.)
    if let Some(problem) = config_problem.filter(|_| !matches!(action, Action::Reload { .. })) {
        // The daemon runs its last good configuration; the operator should know this one
        // would be refused.
        eprintln!(
            "plugind: warning: ctl {}: {problem}; the daemon keeps running its last good \
             configuration (`plugind check` lists every problem)",
            name(&action)
        );
    }
    let credentials = super::credentials(&endpoint, args, true).map_err(usage)?;
    let mut c = client::connect_with(
        &endpoint,
        credentials.token.as_deref(),
        credentials.tls_ca.as_deref(),
    )
    .await
    .map_err(|e| Failure(EXIT_FAILURE, e))?;
    let json = args.json;
    match action {
        Action::Status => {
            let s = c
                .control
                .status(c.request(pb::StatusRequest {}))
                .await?
                .into_inner();
            print(json, &status_json(&s), || status_text(&s));
        }
        Action::Plugins => {
            let r = c
                .control
                .instances(c.request(pb::InstancesRequest {}))
                .await?
                .into_inner();
            print(json, &instances_json(&r), || instances_text(&r));
        }
        Action::Show { id } => {
            let m = c
                .control
                .show_message(c.request(pb::ShowMessageRequest { id }))
                .await?
                .into_inner();
            print(json, &message_json(&m), || message_text(&m));
        }
        Action::Enable { name } => toggle(&mut c, &endpoint, &name, true, json).await?,
        Action::Disable { name } => toggle(&mut c, &endpoint, &name, false, json).await?,
        Action::Reload { name } => {
            let r = c
                .control
                .reload(c.request(pb::ReloadRequest {
                    expected_sha256: String::new(),
                    instance: name.unwrap_or_default(),
                }))
                .await?
                .into_inner();
            print(json, &reload_json(&r), || reload_text(&r));
        }
        Action::Pause { name } | Action::Resume { name } if name.is_empty() => {
            return Err(usage("name the instance"));
        }
        Action::Pause { name } => {
            let r = c
                .control
                .pause(c.request(pb::InstanceRequest { name }))
                .await?
                .into_inner();
            print(
                json,
                &serde_json::json!({"instance": r.name, "state": r.state}),
                || {
                    format!(
                        "{}: paused (nothing more is handed to it until resume)\n",
                        r.name
                    )
                },
            );
        }
        Action::Resume { name } => {
            let r = c
                .control
                .resume(c.request(pb::InstanceRequest { name }))
                .await?
                .into_inner();
            print(
                json,
                &serde_json::json!({"instance": r.name, "state": r.state}),
                || format!("{}: resumed\n", r.name),
            );
        }
        Action::DeadLetters {
            instance,
            limit,
            after,
        } => {
            let (after_id, after_instance) = match after.as_deref().map(|a| a.split_once('/')) {
                None => (0, String::new()),
                Some(Some((id, instance))) => (
                    id.parse()
                        .map_err(|_| usage(format!("--after {id}/…: not a message id")))?,
                    instance.to_owned(),
                ),
                Some(None) => return Err(usage("--after takes ID/INSTANCE")),
            };
            let r = c
                .control
                .dead_letters(c.request(pb::DeadLettersRequest {
                    instance: instance.unwrap_or_default(),
                    after_id,
                    after_instance,
                    limit,
                }))
                .await?
                .into_inner();
            print(json, &dead_letters_json(&r), || dead_letters_text(&r));
        }
        Action::Replay(selected) => {
            let request = selection(&selected, "Replay")?;
            let r = c.control.replay(c.request(request)).await?.into_inner();
            print(
                json,
                &serde_json::json!({"queued": r.queued, "waiting": r.waiting}),
                || {
                    format!(
                        "replayed: {} back in a queue, {} waiting for an instance not configured now\n",
                        r.queued, r.waiting
                    )
                },
            );
        }
        Action::Purge(selected) => {
            let request = selection(&selected, "Purge")?;
            let r = c.control.purge(c.request(request)).await?.into_inner();
            print(json, &serde_json::json!({"purged": r.count}), || {
                format!("purged {} dead letter(s)\n", r.count)
            });
        }
        Action::Forget { name, purge, yes } => {
            let what = if purge { "remove" } else { "dead-letter" };
            confirm(
                yes,
                &format!("Forget every waiting delivery of `{name}` ({what} them)?"),
            )?;
            let r = c
                .control
                .forget(c.request(pb::ForgetRequest {
                    instance: name.clone(),
                    purge,
                }))
                .await?
                .into_inner();
            print(
                json,
                &serde_json::json!({"instance": name, "forgotten": r.count, "purged": purge}),
                || {
                    format!(
                        "{name}: {} waiting deliveries forgotten ({})\n",
                        r.count,
                        if purge { "removed" } else { "dead-lettered" }
                    )
                },
            );
        }
        Action::LogLevel { level } => {
            let r = c
                .control
                .set_log_level(c.request(pb::LogLevelRequest { level }))
                .await?
                .into_inner();
            print(json, &serde_json::json!({"level": r.level}), || {
                format!("log level: {}\n", r.level)
            });
        }
        Action::Watch { count } => {
            let mut stream = c
                .control
                .watch(c.request(pb::WatchRequest {}))
                .await?
                .into_inner();
            let mut seen = 0;
            while count.is_none_or(|n| seen < n) {
                let Some(event) = stream.next().await else {
                    break;
                };
                let event = event.map_err(|status| match status.code() {
                    // The daemon's own words: shutting down, or this watcher fell behind.
                    Code::Unavailable | Code::ResourceExhausted => Failure::from(status),
                    // The transport's (an HTTP/2 reset when the daemon went away).
                    _ => Failure(
                        EXIT_FAILURE,
                        "the connection to the daemon closed (it stopped or restarted)".into(),
                    ),
                })?;
                seen += 1;
                let line = if json {
                    format!(
                        "{{\"seq\":{},\"at_ms\":{},\"snapshot\":{},\"event\":{}}}",
                        event.seq, event.at_ms, event.snapshot, event.json
                    )
                } else {
                    format!(
                        "{:>6} {} {:<14} {:<16} {}",
                        event.seq,
                        time(event.at_ms),
                        event.kind,
                        event.instance,
                        event.json
                    )
                };
                let mut out = std::io::stdout().lock();
                if writeln!(out, "{line}").and_then(|()| out.flush()).is_err() {
                    break;
                }
            }
        }
    }
    Ok(())
}

/// Prints `value` as JSON, or `text()`.
fn print(json: bool, value: &serde_json::Value, text: impl FnOnce() -> String) {
    let out = if json { format!("{value}\n") } else { text() };
    // A reader that stops early (`| head`) is no error.
    let _ = std::io::stdout().write_all(out.as_bytes());
}

/// Asks on the terminal unless `yes`; refuses without a terminal.
fn confirm(yes: bool, question: &str) -> Result<(), Failure> {
    if yes {
        return Ok(());
    }
    if !std::io::stdin().is_terminal() {
        return Err(usage(format!(
            "{question} — add --yes to confirm without a terminal"
        )));
    }
    eprint!("{question} [y/N] ");
    let mut answer = String::new();
    let _ = std::io::stdin().lock().read_line(&mut answer);
    if matches!(answer.trim(), "y" | "Y" | "yes") {
        Ok(())
    } else {
        Err(Failure(EXIT_FAILURE, "not confirmed; nothing done".into()))
    }
}

fn selection(selected: &Selected, verb: &str) -> Result<pb::SelectionRequest, Failure> {
    let scope = match (&selected.instance, selected.ids.is_empty(), selected.all) {
        (None, true, false) => {
            return Err(usage(
                "name message ids, --instance NAME, or --all (every dead letter)",
            ));
        }
        (None, true, true) => "every dead letter".to_owned(),
        (Some(i), true, _) => format!("every dead letter of `{i}`"),
        (instance, false, _) => format!(
            "dead letters {:?}{}",
            selected.ids,
            instance
                .as_ref()
                .map(|i| format!(" of `{i}`"))
                .unwrap_or_default()
        ),
    };
    confirm(selected.yes, &format!("{verb} {scope}?"))?;
    Ok(pb::SelectionRequest {
        instance: selected.instance.clone().unwrap_or_default(),
        ids: selected.ids.clone(),
        all: selected.all,
    })
}

/// `enable` / `disable`: edit the daemon's plugins.toml, then reload exactly that file.
async fn toggle(
    c: &mut client::Client,
    endpoint: &Endpoint,
    name: &str,
    enabled: bool,
    json: bool,
) -> Result<(), Failure> {
    if endpoint.tcp_address().is_some() {
        return Err(Failure(
            EXIT_FAILURE,
            format!(
                "refused over {endpoint}: `enable` and `disable` edit the daemon's \
                 plugins.toml on its own machine; run them there (Unix socket)"
            ),
        ));
    }
    let status = c
        .control
        .status(c.request(pb::StatusRequest {}))
        .await?
        .into_inner();
    let path = Path::new(&status.config_path);
    let hash = edit::edit_enabled(path, name, enabled).map_err(|e| Failure(EXIT_FAILURE, e))?;
    // The daemon is asked to apply exactly the bytes written; when the file already said so,
    // whatever it holds now (the daemon may not have applied it yet).
    let r = c
        .control
        .reload(c.request(pb::ReloadRequest {
            expected_sha256: hash.map(hex::encode).unwrap_or_default(),
            instance: String::new(),
        }))
        .await
        .map_err(|status| {
            // The file is written whatever the daemon answers: say so.
            let written = format!("{} was written (enabled = {enabled})", path.display());
            match status.code() {
                Code::Aborted => Failure(
                    EXIT_FAILURE,
                    format!(
                        "{written}, but it changed again before the daemon read it; nothing \
                         applied: {}",
                        status.message()
                    ),
                ),
                _ => Failure(
                    EXIT_FAILURE,
                    format!(
                        "{written}, but the daemon did not apply it: {}",
                        Failure::from(status).1
                    ),
                ),
            }
        })?;
    let r = r.into_inner();
    let verb = if enabled { "enabled" } else { "disabled" };
    let already = if hash.is_none() { "already " } else { "" };
    print(json, &reload_json(&r), || {
        format!(
            "{name}: {already}{verb} in {}\n{}",
            path.display(),
            reload_text(&r)
        )
    });
    Ok(())
}
