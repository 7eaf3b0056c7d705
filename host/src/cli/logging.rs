//! The daemon's logs: stderr always; text or one JSON object per line (`log_format`);
//! under journald (its `JOURNAL_STREAM` names our stderr) text lines carry syslog level
//! prefixes (`<3>` … `<7>`) instead of timestamps and colours; the filter (`PLUGIND_LOG`,
//! `info` by default) can be changed while running.

use std::{fmt, sync::Arc};

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter,
    fmt::{FmtContext, FormatEvent, FormatFields, format::Writer},
    layer::SubscriberExt as _,
    registry::LookupSpan,
    util::SubscriberInitExt as _,
};

use crate::{config::LogFormat, front::SetLogLevel, quote::quote};

/// Logs to stderr: text, or one JSON object per line; `PLUGIND_LOG` (an env-filter
/// directive) chooses the level, `info` by default. Returns how to change the filter while
/// running (`plugind ctl log-level`).
pub fn init(format: LogFormat) -> SetLogLevel {
    let filter = EnvFilter::try_from_env("PLUGIND_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    // Colour only for a person at a terminal, never into files or the journal.
    let output = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let registry = tracing_subscriber::registry().with(filter);
    let _ = match format {
        LogFormat::Text if under_journald() => registry
            .with(
                output
                    .with_ansi(false)
                    .event_format(Journal(tracing_subscriber::fmt::format().without_time())),
            )
            .try_init(),
        LogFormat::Text => registry.with(output).try_init(),
        LogFormat::Json => registry.with(output.json()).try_init(),
    };
    Arc::new(move |level: &str| {
        check_filter(level)?;
        let filter = EnvFilter::try_new(level).map_err(|e| {
            format!(
                "{} is not a log filter (e.g. info, debug, plugind=trace): {e}",
                quote(level)
            )
        })?;
        let now = filter.to_string();
        handle
            .reload(filter)
            .map_err(|e| format!("cannot change the log filter: {e}"))?;
        Ok(now)
    })
}

/// A log filter as operators write it: comma-separated `LEVEL` or `TARGET=LEVEL` (env-filter
/// would take most text as a target and silently match nothing).
fn check_filter(text: &str) -> Result<(), String> {
    let bad = |why: &str| {
        Err(format!(
            "{} is not a log filter (e.g. info, debug, plugind=trace): {why}",
            quote(text)
        ))
    };
    if text.trim().is_empty() {
        return bad("it is empty");
    }
    for directive in text.split(',') {
        let (target, level) = match directive.trim().split_once('=') {
            Some((target, level)) => (Some(target), level),
            None => (None, directive.trim()),
        };
        if level
            .parse::<tracing_subscriber::filter::LevelFilter>()
            .is_err()
        {
            return bad(&format!(
                "{} is not a level (off, error, warn, info, debug, trace)",
                quote(level)
            ));
        }
        if let Some(target) = target
            && (target.is_empty()
                || !target
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ':' | '-')))
        {
            return bad(&format!("{} is not a module path", quote(target)));
        }
    }
    Ok(())
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` is `DEV:INODE` of our stderr
/// (inherited by children whose stderr is elsewhere, hence the comparison).
fn under_journald() -> bool {
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(stat) = rustix::fs::fstat(std::io::stderr()) else {
        return false;
    };
    stream.to_string_lossy() == format!("{}:{}", stat.st_dev, stat.st_ino)
}

/// A text line for the journal: the syslog level prefix journald reads (sd-daemon(3)),
/// then the line without a timestamp (journald stamps every line itself).
struct Journal<F>(F);

impl<S, N, F> FormatEvent<S, N> for Journal<F>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
    F: FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        let prefix = match *event.metadata().level() {
            Level::ERROR => "<3>",
            Level::WARN => "<4>",
            Level::INFO => "<6>",
            Level::DEBUG | Level::TRACE => "<7>",
        };
        writer.write_str(prefix)?;
        self.0.format_event(ctx, writer, event)
    }
}
