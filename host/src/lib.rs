//! plugind: a daemon that hosts native plugins and delivers messages to them reliably.
//!
//! # Layout
//!
//! - [`loader`]: turns a plugin library file into callable plugin code (the only module
//!   that loads libraries).
//! - [`config`]: `plugins.toml`: search order, schema, validation, the plan between two.
//! - [`topic`]: topics and topic patterns.
//! - [`cli`]: the commands of the `plugind` binary (`src/main.rs` only parses arguments).

pub mod cli;
pub mod config;
pub mod loader;
pub mod topic;
