//! Support code for plugind's tests: builds the test fixtures once into a shared target dir.
//!
//! # Layout
//!
//! - [`fixtures`]: the fixture plugins (`tests/fixtures/`), built on first use by every test
//!   binary that needs them, including the libraries built against modified copies of
//!   `plugind-api`.
//! - [`binary`]: the real `plugind` binary, built once.
//! - [`daemon`]: the real daemon in a sandbox, driven through the real CLI; killed and
//!   restarted on the same sandbox.
//! - [`history`]: the fault campaign's history checker: producers' answers against what
//!   the recording plugins saw (lost, unexpected, duplicates, attempts, early retries).
//! - [`ledger_support`]: what the durable-ledger tests share: a sandbox with `fx-record`,
//!   configurations, publishing over the real API (refusals included), polling.
//! - [`metrics`]: the metrics endpoint from outside: HTTP GETs, a scrape parsed into
//!   samples, and `promtool` (found on `PATH`; a test that needs it fails without it).
//! - [`powercut`]: the power-cut simulation's reconstructor: the ledger's files rebuilt
//!   from the `writelog` shim's log as a disk holds them after a cut (unsynced writes
//!   dropped).
//! - [`record`]: reads what the `fx-record` fixture recorded (restart and crash tests).
//! - [`recording`]: host services that record what a plugin logs and publishes, tagged the
//!   way the daemon tags them.
//! - [`sandbox`]: a private temporary directory laid out as an operator would.
//! - [`shim`]: `LD_PRELOAD` shims in C (`tests/shims/`), compiled with gcc once per process.

pub mod binary;
pub mod daemon;
pub mod fixtures;
pub mod history;
pub mod http_server;
pub mod ledger_support;
pub mod metrics;
pub mod powercut;
pub mod record;
pub mod recording;
pub mod sandbox;
pub mod shim;
