//! Fixture: a plugin built against the frozen plugind-api 1.0.0 source
//! (`tests/compat/plugind-api-1.0.0`), as a plugin author who never rebuilt it ships it.
//!
//! Config: `label` (required, in every log event and record line), `record` (a file to append
//! one line per delivery to: `<id> <attempt> <build> <api version> <label> <parent header or
//! -> <handled, Unix µs> <payload>`), `retry_after_ms` (default 50).
//!
//! Per message, driven by headers: acks by default; `outcome: retry` retries (after
//! `retry_after_ms`) while the attempt is at most `retries` (default 1), then acks;
//! `outcome: reject` rejects; `publish: <topic>` publishes the payload to `<topic>` during
//! `handle`, with the headers `parent: <id>` and `from: <label>`. Every call logs through
//! `tracing` with fields (label, id, attempt, topic, outcome, build).
//!
//! `tests/compat/today/fx-legacy-today` is the same source built against today's plugin-api;
//! the two differ only in `BUILD` and in the api version their manifests declare.

/// Which build this is; in the record lines and the log events.
const BUILD: &str = "legacy";

include!("legacy.rs");
