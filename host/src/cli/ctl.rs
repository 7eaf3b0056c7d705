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

use std::{
    fmt::Write as _,
    io::{BufRead as _, IsTerminal as _, Write as _},
    os::unix::fs::{MetadataExt as _, PermissionsExt as _},
    path::Path,
    process::ExitCode,
    time::Duration,
};

use sha2::{Digest as _, Sha256};
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
        /// At most this many.
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
    let (endpoint, _) = config::client_endpoint(args.connect.as_deref(), args.config.as_deref())
        .map_err(|e| Failure(EXIT_FAILURE, e.to_string()))?;
    let token = super::token(&endpoint, args.config.as_deref());
    let mut c = client::connect(&endpoint, token.as_deref())
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
                        "{name}: {} waiting deliveries forgotten ({what}d)\n",
                        r.count
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
                let event = event?;
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
    if let Endpoint::Tcp(address) = endpoint {
        return Err(Failure(
            EXIT_FAILURE,
            format!(
                "refused over tcp:{address}: `enable` and `disable` edit the daemon's \
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
    let hash = edit_enabled(path, name, enabled).map_err(|e| Failure(EXIT_FAILURE, e))?;
    let r = c
        .control
        .reload(c.request(pb::ReloadRequest {
            expected_sha256: hex::encode(hash),
            instance: String::new(),
        }))
        .await
        .map_err(|status| match status.code() {
            Code::Aborted => Failure(
                EXIT_FAILURE,
                format!(
                    "{} changed again before the daemon read it; nothing applied: {}",
                    path.display(),
                    status.message()
                ),
            ),
            _ => Failure::from(status),
        })?;
    let r = r.into_inner();
    let verb = if enabled { "enabled" } else { "disabled" };
    print(json, &reload_json(&r), || {
        format!("{name}: {verb} in {}\n{}", path.display(), reload_text(&r))
    });
    Ok(())
}

/// Sets `enabled` of `[plugins.NAME]` in `path`, keeping everything else as written; writes
/// a temporary file with the same mode and owner and renames it over `path`. Returns the
/// new file's SHA-256.
fn edit_enabled(path: &Path, name: &str, enabled: bool) -> Result<[u8; 32], String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut document: toml_edit::DocumentMut = text
        .parse()
        .map_err(|e| format!("{}: cannot edit: {e}", path.display()))?;
    let table = document
        .get_mut("plugins")
        .and_then(|p| p.as_table_like_mut())
        .and_then(|p| p.get_mut(name))
        .and_then(|i| i.as_table_like_mut())
        .ok_or_else(|| {
            format!(
                "{}: no [plugins.{name}] table (an autoloaded instance is switched off by \
                 adding one with enabled = false)",
                path.display()
            )
        })?;
    table.insert("enabled", toml_edit::value(enabled));
    let edited = document.to_string();
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = dir.join(format!(".{file_name}.plugind-ctl.{}", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(edited.as_bytes())?;
        file.set_permissions(std::fs::Permissions::from_mode(metadata.mode() & 0o7777))?;
        // The same owner where this user may set it (root editing a service's file).
        let _ = std::os::unix::fs::fchown(&file, Some(metadata.uid()), Some(metadata.gid()));
        file.sync_all()?;
        std::fs::rename(&temp, path)?;
        std::fs::File::open(dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_file(&temp);
        return Err(format!("cannot write {}: {e}", path.display()));
    }
    Ok(Sha256::digest(edited.as_bytes()).into())
}

/// `2026-11-26 03:04:05` (UTC) from Unix ms.
fn time(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_millis(ms))
        .to_string()
        .replace('T', " ")
        .trim_end_matches('Z')
        .to_owned()
}

fn status_json(s: &pb::StatusResponse) -> serde_json::Value {
    let ledger = s.ledger.clone().unwrap_or_default();
    serde_json::json!({
        "version": s.version, "pid": s.pid, "uptime_ms": s.uptime_ms,
        "config": s.config_path, "config_sha256": s.config_sha256, "durability": s.durability,
        "ledger": {"accepted": ledger.accepted, "acked": ledger.acked,
            "dead_lettered": ledger.dead_lettered, "commits": ledger.commits,
            "fsyncs": ledger.fsyncs, "commit_us": ledger.commit_us},
        "instances": s.instances.iter().map(|i| serde_json::json!({
            "name": i.name, "state": i.state, "backlog": i.backlog, "in_flight": i.in_flight,
        })).collect::<Vec<_>>(),
    })
}

fn status_text(s: &pb::StatusResponse) -> String {
    let ledger = s.ledger.clone().unwrap_or_default();
    let mut out = format!(
        "plugind {}, pid {}, up {}, durability {}\nconfig {} (sha256 {})\n",
        s.version,
        s.pid,
        humantime::format_duration(Duration::from_secs(s.uptime_ms / 1000)),
        s.durability,
        s.config_path,
        &s.config_sha256.get(..12).unwrap_or_default(),
    );
    let _ = writeln!(
        out,
        "ledger: {} accepted, {} acked, {} dead-lettered; {} commits, {} fsyncs{}",
        ledger.accepted,
        ledger.acked,
        ledger.dead_lettered,
        ledger.commits,
        ledger.fsyncs,
        ledger
            .commit_us
            .get(1)
            .map(|p99| format!(", commit p99 {p99} µs"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "{:<24} {:<12} {:>9} {:>9}",
        "INSTANCE", "STATE", "BACKLOG", "IN FLIGHT"
    );
    for i in &s.instances {
        let _ = writeln!(
            out,
            "{:<24} {:<12} {:>9} {:>9}",
            i.name, i.state, i.backlog, i.in_flight
        );
    }
    out
}

fn instances_json(r: &pb::InstancesResponse) -> serde_json::Value {
    serde_json::json!({
        "instances": r.instances.iter().map(|i| serde_json::json!({
            "name": i.name, "state": i.state, "plugin": i.plugin, "version": i.version,
            "generation": i.generation, "draining": i.draining, "library": i.library,
            "sha256": i.sha256, "queue_depth": i.queue_depth, "backlog": i.backlog,
            "backlog_bytes": i.backlog_bytes, "in_flight": i.in_flight, "acked": i.acked,
            "failures": i.failures, "dead_lettered": i.dead_lettered, "circuit": i.circuit,
            "hung": i.hung, "last_error": i.last_error, "topics": i.topics,
        })).collect::<Vec<_>>(),
        "retained": r.retained.iter().map(|l| serde_json::json!({
            "plugin": l.plugin, "version": l.version, "origin": l.origin, "size": l.size,
        })).collect::<Vec<_>>(),
    })
}

fn instances_text(r: &pb::InstancesResponse) -> String {
    let mut out = format!(
        "{:<20} {:<11} {:<24} {:>4} {:>7} {:>7} {:>5} {:>6} {:<9}\n",
        "INSTANCE", "STATE", "PLUGIN", "GEN", "QUEUE", "BACKLOG", "FLY", "DEAD", "CIRCUIT"
    );
    for i in &r.instances {
        let plugin = if i.version.is_empty() {
            i.plugin.clone()
        } else {
            format!("{} {}", i.plugin, i.version)
        };
        let generation = if i.draining.is_empty() {
            i.generation.to_string()
        } else {
            format!("{}+{}", i.generation, i.draining.len())
        };
        let _ = writeln!(
            out,
            "{:<20} {:<11} {:<24} {:>4} {:>7} {:>7} {:>5} {:>6} {:<9}{}",
            i.name,
            i.state,
            plugin,
            generation,
            i.queue_depth,
            i.backlog,
            i.in_flight,
            i.dead_lettered,
            i.circuit,
            if i.hung { " HUNG" } else { "" }
        );
        if !i.last_error.is_empty() {
            let _ = writeln!(out, "    last error: {}", i.last_error);
        }
    }
    if !r.retained.is_empty() {
        let _ = writeln!(
            out,
            "retained libraries (still mapped after their generation retired): {}",
            r.retained.len()
        );
    }
    out
}

fn message_json(m: &pb::ShowMessageResponse) -> serde_json::Value {
    serde_json::json!({
        "id": m.id, "topic": m.topic, "published_ms": m.published_ms,
        "headers": m.headers.iter().map(|h| [&h.name, &h.value]).collect::<Vec<_>>(),
        "payload_size": m.payload_size,
        "payload_preview": String::from_utf8_lossy(&m.payload_preview),
        "deliveries": m.deliveries.iter().map(|d| serde_json::json!({
            "instance": d.instance, "state": d.state, "deliveries": d.deliveries,
            "failures": d.failures, "last_reason": d.last_reason,
            "attempts": d.attempts.iter().map(|a| serde_json::json!({
                "number": a.number, "started_ms": a.started_ms, "ended_ms": a.ended_ms,
                "result": a.result,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

fn message_text(m: &pb::ShowMessageResponse) -> String {
    let mut out = format!(
        "message {} on {}, published {}\n",
        m.id,
        m.topic,
        time(m.published_ms)
    );
    for h in &m.headers {
        let _ = writeln!(out, "  {}: {}", h.name, h.value);
    }
    let more = if (m.payload_preview.len() as u64) < m.payload_size {
        "…"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "payload ({} bytes): {:?}{more}",
        m.payload_size,
        String::from_utf8_lossy(&m.payload_preview)
    );
    if m.deliveries.is_empty() {
        let _ = writeln!(out, "no delivery waits or failed (acked, or never routed)");
    }
    for d in &m.deliveries {
        let _ = writeln!(
            out,
            "{}: {}, {} deliveries, {} failures{}",
            d.instance,
            d.state.replace('_', " "),
            d.deliveries,
            d.failures,
            if d.last_reason.is_empty() {
                String::new()
            } else {
                format!(", last: {}", d.last_reason)
            }
        );
        for a in &d.attempts {
            let _ = writeln!(
                out,
                "  attempt {} at {}: {}",
                a.number,
                time(a.started_ms),
                a.result
            );
        }
    }
    out
}

fn reload_json(r: &pb::ReloadResponse) -> serde_json::Value {
    serde_json::json!({
        "config_sha256": r.config_sha256,
        "changes": r.changes.iter()
            .map(|c| (c.instance.clone(), serde_json::Value::from(c.change.clone())))
            .collect::<serde_json::Map<_, _>>(),
        "restart_required": r.restart_required,
        "failures": r.failures.iter().map(|f| serde_json::json!({
            "instance": f.instance, "error": f.error,
        })).collect::<Vec<_>>(),
    })
}

fn reload_text(r: &pb::ReloadResponse) -> String {
    let changed: Vec<String> = r
        .changes
        .iter()
        .filter(|c| c.change != "unchanged")
        .map(|c| format!("{} {}", c.instance, c.change.replace('_', " ")))
        .collect();
    let mut out = format!(
        "applied (config sha256 {}): {}\n",
        r.config_sha256.get(..12).unwrap_or_default(),
        if changed.is_empty() {
            "nothing changed".to_owned()
        } else {
            changed.join(", ")
        }
    );
    for key in &r.restart_required {
        let _ = writeln!(
            out,
            "[host] {key} changed: it takes effect at the next start"
        );
    }
    for f in &r.failures {
        let _ = writeln!(out, "{}: not running: {}", f.instance, f.error);
    }
    out
}

fn dead_letters_json(r: &pb::DeadLettersResponse) -> serde_json::Value {
    serde_json::json!({
        "dead_letters": r.dead_letters.iter().map(|d| serde_json::json!({
            "id": d.id, "instance": d.instance, "topic": d.topic, "at_ms": d.at_ms,
            "deliveries": d.deliveries, "failures": d.failures, "reason": d.reason,
        })).collect::<Vec<_>>(),
        "next": (!r.next_instance.is_empty() || r.next_id > 0)
            .then(|| format!("{}/{}", r.next_id, r.next_instance)),
    })
}

fn dead_letters_text(r: &pb::DeadLettersResponse) -> String {
    if r.dead_letters.is_empty() {
        return "no dead letters\n".to_owned();
    }
    let mut out = format!(
        "{:>10} {:<20} {:<24} {:>8}  REASON\n",
        "ID", "INSTANCE", "TOPIC", "FAILURES"
    );
    for d in &r.dead_letters {
        let _ = writeln!(
            out,
            "{:>10} {:<20} {:<24} {:>8}  {}",
            d.id, d.instance, d.topic, d.failures, d.reason
        );
    }
    if !r.next_instance.is_empty() || r.next_id > 0 {
        let _ = writeln!(out, "more: --after {}/{}", r.next_id, r.next_instance);
    }
    out
}
