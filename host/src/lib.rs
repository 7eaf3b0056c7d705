//! plugind: a daemon that hosts native plugins and delivers messages to them reliably.
//!
//! # Layout
//!
//! - [`loader`]: turns a plugin library file into callable plugin code (the only module
//!   that loads libraries).
//! - [`config`]: `plugins.toml`: search order, schema, validation, the plan between two.
//! - [`topic`]: topics and topic patterns.
//! - [`clock`]: injected time for the delivery engine.
//! - [`delivery`]: the rules of one delivery (counters, backoff, leases, dead letters).
//! - [`circuit`]: the circuit breaker of one instance.
//! - [`cli`]: the commands of the `plugind` binary (`src/main.rs` only parses arguments).

pub mod circuit;
pub mod cli;
pub mod clock;
pub mod config;
pub mod delivery;
pub mod loader;
pub mod topic;
