//! plugind: a daemon that hosts native plugins and delivers messages to them reliably.
//!
//! # Layout
//!
//! - [`loader`]: turns a plugin library file into callable plugin code (the only module
//!   that loads libraries).
//!
//! The binary (`src/main.rs`) only parses arguments and calls into this library.

pub mod loader;
