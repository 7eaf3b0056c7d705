//! What the 1.0 host prints: one JSON object per line, `event` naming its kind.
//!
//! A new case (say, what a 1.1 plugin says when it refuses this host) is a new variant here,
//! emitted where it happens; tests match on `event` and the fields they need.

use std::{collections::BTreeMap, io::Write as _};

use plugind_api::manifest::Manifest;
use serde::Serialize;

/// One line of output.
#[derive(Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub(crate) enum Report {
    /// The library passed abi_stable's header, layout and version checks against the 1.0.0
    /// source. `manifest` is what its root module returns (`manifest_error` if this host's
    /// decoder refused it).
    Loaded {
        host_api_version: &'static str,
        manifest: Option<Manifest>,
        manifest_error: Option<String>,
    },
    /// The library was refused; `stage` is `dlopen`, `symbol`, `header`, `layout` or
    /// `init` (the version check or the root module's constructor).
    LoadError {
        stage: &'static str,
        message: String,
    },
    /// `instantiate` returned an instance.
    Instantiated,
    /// `instantiate` failed: `kind` is `error`, `config`, `panic` or `unknown`.
    InstantiateError { kind: &'static str, message: String },
    /// The plugin logged (through `tracing` or `Host::log`).
    Log {
        level: &'static str,
        target: String,
        message: String,
        fields: BTreeMap<String, String>,
    },
    /// The plugin published (the id it was given is `id`).
    Published {
        id: u64,
        topic: String,
        payload: String,
        headers: BTreeMap<String, String>,
    },
    /// `handle` answered for the message at `index` (0-based, in input order).
    Outcome {
        index: usize,
        topic: String,
        /// `ack`, `retry` or `reject`.
        outcome: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// `handle` failed for the message at `index`: `kind` as for `instantiate_error`.
    CallError {
        index: usize,
        kind: &'static str,
        message: String,
    },
    /// The instance was shut down (`error`: its shutdown panicked).
    Shutdown { error: Option<String> },
}

impl Report {
    /// Prints the report as one line on stdout and flushes it (plugin threads may log too;
    /// the stdout lock keeps lines whole).
    pub(crate) fn emit(&self) {
        let line = serde_json::to_string(self).expect("reports serialize");
        let mut out = std::io::stdout().lock();
        // A closed stdout (the test stopped reading) is not this program's problem.
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    }
}
