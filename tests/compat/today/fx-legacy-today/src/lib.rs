//! Fixture: `tests/compat/fx-legacy`'s source built against today's plugin-api: the same
//! plugin (same manifest name and version) as the 1.0-built library, for the hot swap
//! between the two.

/// Which build this is; in the record lines and the log events.
const BUILD: &str = "today";

include!("../../../fx-legacy/src/legacy.rs");
