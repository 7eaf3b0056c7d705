//! plugind: a daemon that hosts native plugins and delivers messages to them reliably.
//!
//! # Layout
//!
//! - [`loader`]: turns a plugin library file into callable plugin code (the only module
//!   that loads libraries).
//! - [`config`]: `plugins.toml`: search order, schema, validation, the plan between two.
//! - [`topic`]: topics and topic patterns.
//! - [`quote`]: untrusted text in error messages, bounded and escaped.
//! - [`clock`]: injected time for the delivery engine.
//! - [`delivery`]: the rules of one delivery (counters, backoff, leases, dead letters).
//! - [`circuit`]: the circuit breaker of one instance.
//! - [`routing`]: which instances a topic goes to (an immutable snapshot).
//! - [`message`]: a message as stored, and one attempt's view of it for plugins.
//! - [`services`]: an instance's host services (tagged logs, staged publishing).
//! - [`actor`]: one actor per instance: its own thread, credit-bounded batched mailbox.
//! - [`ingress`]: the publish path: validate, route, limits, ids, ledger, dispatcher.
//! - [`ledger`]: the only writer of delivery state (interface + in-memory ledger).
//! - [`dispatch`]: the event loop that owns the live deliveries and feeds the actors.
//! - [`engine`]: all of it assembled, with the supervisor's start and the graceful stop.
//! - [`front`]: the product's use cases as plain typed Rust (every API maps these).
//! - [`metrics`]: what the hot path records for the metrics alone (lock-free histograms and
//!   counters), and the distributions snapshots carry.
//! - [`exporter`]: the Prometheus adapter over the front and its HTTP endpoint (`/metrics`,
//!   `/healthz`, `/readyz` on `[host] metrics`).
//! - [`outcomes`]: attempts counted by how they ended (the status's and the metrics' one source).
//! - [`daemon`]: `plugind run` as a library call: `daemon::run(config, options, shutdown)`.
//! - [`control`]: the gRPC API on top of the front (the only module that knows protobuf types).
//! - [`watch`]: `plugin_dir` and the config file watched: settled change events (applies nothing).
//! - [`supervisor`]: hot plug: desired state against running state, one reconcile at a time.
//! - [`events`]: every transition as an event (log, history, `Watch` subscribers).
//! - [`quarantine`]: the durable loading markers and the crash-loop verdict.
//! - [`background`]: hot plug's heavy steps at a lower priority.
//! - [`notify`]: the service manager's notification protocol.
//! - [`throttle`]: a log line that may repeat without bound, at most once an interval.
//! - [`cli`]: the commands of the `plugind` binary (`src/main.rs` only parses arguments).

pub mod actor;
pub mod background;
pub mod backlog;
pub mod circuit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod control;
pub mod daemon;
pub mod deferred;
pub mod delivery;
pub mod dispatch;
pub mod engine;
pub mod events;
pub mod exporter;
pub mod front;
pub mod ingress;
pub mod ledger;
pub mod loader;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod outcomes;
pub mod plugin_log;
pub mod quarantine;
pub mod quote;
pub mod routing;
pub mod services;
pub mod supervisor;
pub mod throttle;
pub mod topic;
pub mod watch;
pub mod words;
