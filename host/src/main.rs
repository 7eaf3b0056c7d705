//! The `plugind` command: parses arguments, hands over to the library, maps the result to an
//! exit code (0 success, 1 runtime failure, 2 usage error, 78 invalid configuration).

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};
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
    /// Run the daemon: serve the API and deliver messages to the configured plugins.
    #[command(after_help = "\
The configuration is found as `check` finds it. An invalid one is refused whole (exit 78);
a library that fails to load is logged and refused while the rest runs. While it runs,
plugin_dir and the configuration are watched: a library copied in, replaced or removed,
and an edited plugins.toml, take effect at once (an invalid edit is refused whole and the
last good configuration keeps running). SIGHUP (or `plugind ctl reload`) reads both again.
SIGINT or SIGTERM stops accepting, lets the calls in hand finish within grace_period, and
exits 0. Logs go to stderr; PLUGIND_LOG sets the level (e.g. PLUGIND_LOG=debug). Under
systemd it notifies readiness, reloads and the watchdog (deploy/plugind.service).

A state dir whose ledger.db is missing or empty while its ledger.mark says a ledger lived
there is refused (exit 1): the ledger was lost with its pending deliveries. Restore a backup
(`plugind restore FILE`), or start a new, empty one on purpose with --fresh-ledger, once
(message ids continue after the last one given out).

Exit status: 0 stopped, 1 a runtime failure (the ledger failed, lost or in use by another
plugind; restarting may help once that is fixed), 78 the configuration is invalid or
state_dir cannot be created or written (restarting cannot help).

Examples:
  plugind run
  plugind run -c /etc/plugind/plugins.toml
  plugind run --fresh-ledger           # once, after the ledger was lost and not restored")]
    Run {
        /// The configuration file.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Start a new, empty ledger where state_dir's ledger.db is missing or empty (refused
        /// without it). Its pending deliveries and dead letters are gone; ids continue.
        #[arg(long)]
        fresh_ledger: bool,
    },
    /// Publish one message and print its id.
    #[command(after_help = "\
The daemon is found with --connect, then $PLUGIND_CONNECT, then the `listen` of the
configuration (-c, $PLUGIND_CONFIG, ./plugins.toml, /etc/plugind/plugins.toml), then
unix:/run/plugind/plugind.sock. A TCP endpoint takes its token from $PLUGIND_TOKEN or the
configuration's tcp_token_file.

Examples:
  plugind publish demo.hello hi
  plugind publish orders.eu.new --file order.json -H content-type=application/json
  echo hi | plugind publish demo.hello -
  plugind publish orders.eu.new '{\"n\":1}' --key order-1 --json")]
    Publish {
        /// The topic, e.g. orders.eu.new.
        topic: String,
        /// The payload; `-` reads stdin.
        data: Option<String>,
        /// Read the payload from a file (`-` for stdin).
        #[arg(long, value_name = "FILE")]
        file: Option<PathBuf>,
        /// A header NAME=VALUE (repeatable).
        #[arg(short = 'H', long = "header", value_name = "NAME=VALUE")]
        headers: Vec<String>,
        /// Idempotency key: republishing it within dedupe_window returns the first id.
        #[arg(long)]
        key: Option<String>,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Operate a running daemon: status, plugins, reloads, dead letters, events.
    #[command(after_help = "\
The daemon is found as `publish` finds it (--connect, $PLUGIND_CONNECT, the configuration's
listen, unix:/run/plugind/plugind.sock). --json prints one JSON object (watch: one per line).

Examples:
  plugind ctl status
  plugind ctl plugins --json | jq '.instances[] | select(.state != \"running\")'
  plugind ctl disable orders-sink         # edits plugins.toml here, then reloads it
  plugind ctl reload                      # as systemd's ExecReload: fails if refused
  plugind ctl dead-letters --instance orders-sink
  plugind ctl replay --instance orders-sink --yes
  plugind ctl show 42
  plugind ctl watch")]
    Ctl {
        #[command(flatten)]
        client: cli::ClientArgs,
        #[command(subcommand)]
        action: cli::ctl::Action,
    },
    /// Validate plugins.toml and every library the daemon would load, listing every problem.
    #[command(after_help = "\
The configuration is found as the daemon finds it: -c FILE, then $PLUGIND_CONFIG, then
./plugins.toml, then /etc/plugind/plugins.toml. Nothing is loaded into this process and
nothing is written. --probe also loads each library in a short-lived child process and checks
its ABI (the full verdict).

Examples:
  plugind check
  plugind check -c /etc/plugind/plugins.toml --probe
  plugind check --config-only          # as systemd's ExecStartPre: never blocks on a library
  plugind check --json | jq '.libraries[] | select(.error)'

Exit status: 0 all good, 1 the configuration is valid but a library or instance would not
start (the daemon runs the rest), 78 the configuration is invalid.")]
    Check {
        /// The configuration file.
        #[arg(short = 'c', long = "config", value_name = "FILE")]
        config: Option<PathBuf>,
        /// Also load each library in a child process and check its ABI.
        #[arg(long)]
        probe: bool,
        /// Only validate the configuration; do not look at libraries.
        #[arg(long, conflicts_with = "probe")]
        config_only: bool,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
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
    /// Load generator: publish many messages and report throughput and latency.
    #[command(after_help = "\
Publishes over PublishStream, WINDOW batches in flight; each message carries its intended
send time, which the `bench` example plugin turns into a publish→handle latency histogram
written to its `output` file. Pass that file as --report to get the latency (run an instance
of the bench plugin subscribed to --topic).

Examples:
  plugind bench --count 1000000 --report out/bench.json
  plugind bench --count 100000 --rate 10000 --report out/bench.json   # open loop
  plugind bench --batch 1 --count 20000 --json
  plugind bench --keyed --count 200000            # every message with a key of its own")]
    Bench {
        /// Messages to publish.
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Payload size in bytes.
        #[arg(long, default_value_t = 256)]
        size: usize,
        /// Messages per batch.
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Messages per second (open loop); 0 publishes as fast as accepted.
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// The topic to publish to.
        #[arg(long, default_value = "bench.load")]
        topic: String,
        /// The bench plugin's output file, for the latency report.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// Give every message an idempotency key of its own (measures keyed publishing).
        #[arg(long)]
        keyed: bool,
        #[command(flatten)]
        client: cli::ClientArgs,
    },
    /// Copy the ledger (every pending delivery, dead letter and key) to a file; safe while the
    /// daemon runs.
    #[command(after_help = "\
Reads one consistent snapshot of state_dir/ledger.db through SQLite's online backup (the
daemon keeps running and accepting; what it commits after the snapshot is not in the copy),
writes it to FILE.partial, checks it, fsyncs it and renames it to FILE. Refused inside
state_dir and over anything but a regular file; an existing FILE is replaced only with
--force.

Examples:
  plugind backup /var/backups/plugind/ledger-$(date +%F).db
  plugind backup -c /etc/plugind/plugins.toml /tmp/ledger.db --json --force")]
    Backup(cli::backup::BackupArgs),
    /// Replace the ledger with a backup; the daemon must be stopped.
    #[command(after_help = "\
Checks the backup (format, integrity), then replaces state_dir/ledger.db with it and removes
the old write-ahead log and in-flight markers. Refused while a daemon holds the state dir.
Deliveries pending in the backup are delivered again when the daemon starts (at least once).
Message ids continue past every id the state dir gave out before (state_dir/ledger.mark),
never from where the backup left off: an id never names two messages.

Examples:
  systemctl stop plugind && plugind restore /var/backups/plugind/ledger-2026-11-25.db \\
    && systemctl start plugind")]
    Restore(cli::backup::Args),
    /// Print a shell completion script.
    #[command(after_help = "\
Examples:
  plugind completions bash > /etc/bash_completion.d/plugind
  plugind completions zsh > \"${fpath[1]}/_plugind\"
  plugind completions fish > ~/.config/fish/completions/plugind.fish")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Internal: load a library from an inherited memfd and report (used by the probe).
    #[command(hide = true)]
    ProbeLoad {
        #[arg(long)]
        fd: i32,
        #[arg(long)]
        path: PathBuf,
        /// Instance → its `config` table (a JSON object) for the plugin to check.
        #[arg(long, default_value = "{}")]
        configs: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            config,
            fresh_ledger,
        } => cli::run::run(config.as_deref(), fresh_ledger),
        Command::Publish {
            topic,
            data,
            file,
            headers,
            key,
            client,
        } => cli::publish::run(cli::publish::Args {
            topic,
            data,
            file,
            headers,
            key,
            client,
        }),
        Command::Check {
            config,
            probe,
            config_only,
            json,
        } => cli::check::run(config.as_deref(), probe, config_only, json),
        Command::Bench {
            count,
            size,
            batch,
            rate,
            topic,
            report,
            keyed,
            client,
        } => cli::bench::run(cli::bench::Args {
            count,
            size,
            batch,
            rate,
            topic,
            report,
            keyed,
            client,
        }),
        Command::Ctl { client, action } => cli::ctl::run(&client, action),
        Command::Backup(args) => cli::backup::run(
            cli::backup::Action::Backup { force: args.force },
            &args.common,
        ),
        Command::Restore(args) => cli::backup::run(cli::backup::Action::Restore, &args),
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "plugind", &mut script);
            // A reader that stops early (`| head`) is no error.
            let _ = std::io::Write::write_all(&mut std::io::stdout(), &script);
            ExitCode::SUCCESS
        }
        Command::Inspect {
            library,
            probe,
            json,
            trusted_owners,
        } => cli::inspect::run(&library, probe, json, &trusted_owners),
        Command::ProbeLoad { fd, path, configs } => cli::inspect::probe_load(fd, &path, &configs),
    }
}
