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
//! - [`record`]: reads what the `fx-record` fixture recorded (restart and crash tests).
//! - [`recording`]: host services that record what a plugin logs and publishes, tagged the
//!   way the daemon tags them.
//! - [`sandbox`]: a private temporary directory laid out as an operator would.

pub mod binary;
pub mod daemon;
pub mod fixtures;
pub mod record;
pub mod recording;
pub mod sandbox;
