//! `bench`: measures publish→handle latency for `plugind bench`. Each message carries its
//! intended send time in the header `plugind-bench-sent` (Unix nanoseconds); the plugin
//! records `now - sent` in an HDR histogram and writes a JSON report to the file in its
//! config — every `flush_every` messages, when `plugind bench` sends its flush marker, and at
//! shutdown. The reset marker starts a new histogram, so a report covers one run.
//!
//! The report is written to `<output>.tmp` and renamed, so a reader never sees half of it.

use std::{
    path::PathBuf,
    time::{SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;
use plugind_api::{BoxError, Host, Message, Outcome, Plugin};

/// The header with the send time (Unix nanoseconds).
pub const SENT_HEADER: &str = "plugind-bench-sent";
/// The header asking for the report now.
pub const FLUSH_HEADER: &str = "plugind-bench-flush";
/// The header asking for a new histogram.
pub const RESET_HEADER: &str = "plugind-bench-reset";

/// The instance's `[plugins.<name>.config]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the JSON report goes (`plugind bench --report` reads it).
    pub output: PathBuf,
    /// Write the report every this many messages.
    #[serde(default = "default_flush_every")]
    pub flush_every: u64,
}

fn default_flush_every() -> u64 {
    10_000
}

/// The report.
#[derive(Debug, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Report {
    pub count: u64,
    pub unstamped: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// The plugin.
pub struct Bench {
    output: PathBuf,
    flush_every: u64,
    latency: Histogram<u64>,
    unstamped: u64,
    since_flush: u64,
}

impl std::fmt::Debug for Bench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bench")
            .field("output", &self.output)
            .field("count", &self.latency.len())
            .finish_non_exhaustive()
    }
}

fn histogram() -> Result<Histogram<u64>, BoxError> {
    // 1 µs to 1 h, 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 3_600_000_000, 3)?)
}

impl Bench {
    fn report(&self) -> Report {
        let h = &self.latency;
        Report {
            count: h.len(),
            unstamped: self.unstamped,
            min_us: if h.is_empty() { 0 } else { h.min() },
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.since_flush = 0;
        let json = serde_json::to_vec(&self.report()).map_err(std::io::Error::other)?;
        let mut temp = self.output.clone().into_os_string();
        temp.push(".tmp");
        std::fs::write(&temp, json)?;
        std::fs::rename(&temp, &self.output)
    }
}

impl Plugin for Bench {
    const NAME: &'static str = "bench";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    const TOPICS: &'static [&'static str] = &["bench.>"];
    const DESCRIPTION: &'static str = "records publish-to-handle latency for plugind bench";
    type Config = Config;

    fn new(config: Config, _host: Host) -> Result<Self, BoxError> {
        Ok(Self {
            output: config.output,
            flush_every: config.flush_every.max(1),
            latency: histogram()?,
            unstamped: 0,
            since_flush: 0,
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        if msg.header(RESET_HEADER).is_some() {
            self.latency.reset();
            self.unstamped = 0;
            return Outcome::Ack;
        }
        if msg.header(FLUSH_HEADER).is_some() {
            return match self.flush() {
                Ok(()) => Outcome::Ack,
                Err(e) => Outcome::retry(format!("cannot write {}: {e}", self.output.display())),
            };
        }
        match msg.header(SENT_HEADER).and_then(|sent| sent.parse::<u64>().ok()) {
            Some(sent) => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
                let micros = now.saturating_sub(sent) / 1_000;
                self.latency.saturating_record(micros.max(1));
            }
            None => self.unstamped += 1,
        }
        self.since_flush += 1;
        if self.since_flush >= self.flush_every
            && let Err(e) = self.flush()
        {
            tracing::warn!(output = %self.output.display(), error = %e, "cannot write the report");
        }
        Outcome::Ack
    }

    fn shutdown(mut self) {
        if let Err(e) = self.flush() {
            tracing::warn!(output = %self.output.display(), error = %e, "cannot write the report");
        }
    }
}

plugind_api::export_plugin!(Bench);

#[cfg(test)]
mod tests {
    use plugind_api::testing::{Harness, TestMessage};

    use super::*;

    fn stamped(ago_us: u64) -> TestMessage {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos() as u64;
        TestMessage::new("bench.load", "x").header(SENT_HEADER, (now - ago_us * 1_000).to_string())
    }

    fn read(path: &std::path::Path) -> Report {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn records_latency_and_reports_at_flush_every_on_request_and_at_shutdown() {
        let dir = std::env::temp_dir().join(format!("bench-plugin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let output = dir.join("report.json");
        let mut bench =
            Harness::<Bench>::new(serde_json::json!({ "output": output, "flush_every": 3 })).unwrap();
        bench.handle(stamped(1_000)).unwrap();
        bench.handle(TestMessage::new("bench.load", "no stamp")).unwrap();
        assert!(!output.exists());
        bench.handle(stamped(3_000)).unwrap();
        let report = read(&output);
        assert_eq!((report.count, report.unstamped), (2, 1));
        assert!(report.min_us >= 1_000 && report.max_us >= 3_000, "{report:?}");
        assert!(report.p50_us <= report.p99_us);

        bench.handle(stamped(500)).unwrap();
        bench.handle(TestMessage::new("bench.load", "").header(FLUSH_HEADER, "1")).unwrap();
        assert_eq!(read(&output).count, 3, "flushed on request");

        bench.handle(TestMessage::new("bench.load", "").header(RESET_HEADER, "1")).unwrap();
        bench.handle(stamped(200)).unwrap();
        bench.shutdown().unwrap();
        let report = read(&output);
        assert_eq!((report.count, report.unstamped), (1, 0), "a new run after the reset");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
