//! `bench`: measures publish→handle latency for `plugind bench`, the daemon's load generator.
//!
//! Each message carries its send time in the header `plugind-bench-sent` (Unix nanoseconds,
//! decimal); the plugin records `now - sent` in microseconds in an HDR histogram and writes a
//! JSON [`Report`] to the file in its config — every `flush_every` messages, when
//! `plugind bench` sends its flush marker after a run, and at shutdown. The reset marker that
//! `plugind bench` sends before a run starts a new histogram, so a report covers one run.
//!
//! The report is written to `<output>.tmp` and renamed over `<output>`, so a reader never sees
//! half of it. The plugin always acks: it measures, it must not add retries or dead letters of
//! its own to what it measures. A report that cannot be written is logged as a warning.

use std::{
    io,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use hdrhistogram::Histogram;
use plugind_api::{BoxError, Host, Message, Outcome, Plugin};

/// The header with the send time, Unix nanoseconds in decimal (as `plugind bench` sets it).
pub const SENT_HEADER: &str = "plugind-bench-sent";
/// The header of the marker asking for the report now (sent after a run).
pub const FLUSH_HEADER: &str = "plugind-bench-flush";
/// The header of the marker asking for a new histogram (sent before a run).
pub const RESET_HEADER: &str = "plugind-bench-reset";

/// The instance's `[plugins.<name>.config]` table.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the JSON report goes (`plugind bench --report` reads it). Its directory must
    /// exist. A relative path is relative to the daemon's working directory.
    pub output: PathBuf,
    /// Write the report every this many messages (at least 1; default 10 000): often enough
    /// to watch a long run, rarely enough to cost nothing measurable.
    #[serde(default = "default_flush_every")]
    pub flush_every: u64,
}

fn default_flush_every() -> u64 {
    10_000
}

/// The report, as written to `output`. Latencies are in microseconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Report {
    /// Stamped messages recorded.
    pub count: u64,
    /// Messages without a (valid) send time: counted, not measured.
    pub unstamped: u64,
    pub min_us: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
    pub mean_us: f64,
}

/// The plugin: the histogram of the current run and where its report goes.
pub struct Bench {
    output: PathBuf,
    /// `<output>.tmp`, computed once.
    temp: PathBuf,
    flush_every: u64,
    latency: Histogram<u64>,
    unstamped: u64,
    /// Messages since the report was last written.
    since_flush: u64,
}

/// Manual: `Histogram` is not `Debug`.
impl std::fmt::Debug for Bench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bench")
            .field("output", &self.output)
            .field("flush_every", &self.flush_every)
            .field("count", &self.latency.len())
            .field("unstamped", &self.unstamped)
            .finish_non_exhaustive()
    }
}

/// The microseconds from `sent` (Unix nanoseconds) to `now`; 0 when the stamp is later than
/// `now` (the sender's clock is ahead), rather than a wrapped-around huge value.
fn latency_us(sent: u64, now: SystemTime) -> u64 {
    let sent = UNIX_EPOCH + Duration::from_nanos(sent);
    let elapsed = now.duration_since(sent).unwrap_or(Duration::ZERO);
    u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX)
}

impl Bench {
    /// Records one message: its latency if it is stamped, else one more unstamped.
    fn record(&mut self, msg: &Message) {
        match msg.header(SENT_HEADER).and_then(|sent| sent.parse().ok()) {
            // Above the histogram's range (1 h) counts as its maximum.
            Some(sent) => self
                .latency
                .saturating_record(latency_us(sent, SystemTime::now())),
            None => self.unstamped += 1,
        }
    }

    fn report(&self) -> Report {
        let h = &self.latency;
        Report {
            count: h.len(),
            unstamped: self.unstamped,
            min_us: h.min(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
            mean_us: h.mean(),
        }
    }

    /// Writes the report to the temporary file, then renames it over `output`: a rename within
    /// one directory is atomic, so readers see the old report or the new one, never a mix.
    fn write_report(&self) -> io::Result<()> {
        let json = serde_json::to_vec(&self.report()).map_err(io::Error::other)?;
        std::fs::write(&self.temp, json)?;
        std::fs::rename(&self.temp, &self.output)
    }

    /// Writes the report; a failure is logged, not returned (the plugin always acks).
    fn flush(&mut self) {
        // Counted from now even if the write fails: the next attempt is `flush_every` messages
        // away, not on every message (a warning per message at full load would flood the log).
        self.since_flush = 0;
        if let Err(e) = self.write_report() {
            tracing::warn!(
                output = %self.output.display(),
                error = %e,
                "cannot write the bench report"
            );
        }
    }

    /// Starts a new run: an empty histogram, no unstamped messages.
    fn reset(&mut self) {
        self.latency.reset();
        self.unstamped = 0;
        self.since_flush = 0;
    }
}

impl Plugin for Bench {
    const NAME: &'static str = "bench";
    const VERSION: &'static str = env!("CARGO_PKG_VERSION");
    /// The topics `plugind bench` publishes to by default (`bench.load`).
    const TOPICS: &'static [&'static str] = &["bench.>"];
    const DESCRIPTION: &'static str = "records publish-to-handle latency for plugind bench";
    type Config = Config;

    fn new(config: Config, _host: Host) -> Result<Self, BoxError> {
        if config.flush_every == 0 {
            return Err("`flush_every` is 0; it must be at least 1".into());
        }
        // Refuse a report that could never be written now, not at the first flush.
        let dir = match config.output.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir,
            _ => Path::new("."),
        };
        if !dir.is_dir() {
            return Err(format!(
                "cannot write the report {}: the directory {} does not exist",
                config.output.display(),
                dir.display()
            )
            .into());
        }
        // 1 µs to 1 h with 3 significant digits: ±0.1 %, in about 200 KB.
        let latency = Histogram::new_with_bounds(1, 3_600_000_000, 3)
            .map_err(|e| format!("cannot create the latency histogram: {e}"))?;
        let mut temp = config.output.clone().into_os_string();
        temp.push(".tmp");
        Ok(Self {
            output: config.output,
            temp: temp.into(),
            flush_every: config.flush_every,
            latency,
            unstamped: 0,
            since_flush: 0,
        })
    }

    fn handle(&mut self, msg: Message) -> Outcome {
        if msg.header(RESET_HEADER).is_some() {
            self.reset();
        } else if msg.header(FLUSH_HEADER).is_some() {
            self.flush();
        } else {
            self.record(&msg);
            self.since_flush += 1;
            if self.since_flush >= self.flush_every {
                self.flush();
            }
        }
        Outcome::Ack
    }

    fn shutdown(mut self) {
        self.flush();
    }
}

plugind_api::export_plugin!(Bench);

#[cfg(test)]
mod tests {
    use plugind_api::{
        Level,
        hosting::CallErrorKind,
        testing::{Harness, TestMessage},
    };

    use super::*;

    /// A fresh directory under the system temp dir, removed when dropped (a failing test too).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(label: &str) -> Self {
            let path =
                std::env::temp_dir().join(format!("bench-test-{label}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&path);
            std::fs::create_dir_all(&path).unwrap();
            Self(path)
        }

        fn report(&self) -> PathBuf {
            self.0.join("report.json")
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn bench(dir: &TempDir, flush_every: u64) -> Harness<Bench> {
        Harness::new(serde_json::json!({ "output": dir.report(), "flush_every": flush_every }))
            .unwrap()
    }

    /// A message stamped as sent `ago` before now.
    fn sent_ago(ago: Duration) -> TestMessage {
        let sent = (SystemTime::now() - ago)
            .duration_since(UNIX_EPOCH)
            .unwrap();
        TestMessage::new("bench.load", "x").header(SENT_HEADER, sent.as_nanos().to_string())
    }

    fn read(path: &Path) -> Report {
        serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
    }

    /// `actual` µs is `expected` within the histogram's precision (0.1 %), plus `slack` for
    /// the time the test itself takes between stamping and handling.
    fn assert_near(what: &str, actual: u64, expected: Duration) {
        let expected = u64::try_from(expected.as_micros()).unwrap();
        let slack = 5_000_000;
        assert!(
            actual >= expected - expected / 500 && actual <= expected + expected / 500 + slack,
            "{what}: {actual} µs, expected about {expected} µs"
        );
    }

    #[test]
    fn reports_every_flush_every_messages_with_sane_percentiles() {
        let dir = TempDir::new("flush-every");
        let mut bench = bench(&dir, 100);
        // Latencies 10 s, 20 s, …, 1000 s: seconds apart, so the test's own running time
        // cannot blur the percentiles.
        for i in 1..=99 {
            let msg = sent_ago(Duration::from_secs(10 * i));
            assert_eq!(bench.handle(msg), Ok(Outcome::Ack));
        }
        assert!(!dir.report().exists(), "no report before flush_every");
        assert_eq!(
            bench.handle(sent_ago(Duration::from_secs(1000))),
            Ok(Outcome::Ack)
        );

        let report = read(&dir.report());
        assert_eq!((report.count, report.unstamped), (100, 0));
        assert_near("min", report.min_us, Duration::from_secs(10));
        assert_near("p50", report.p50_us, Duration::from_secs(500));
        assert_near("p90", report.p90_us, Duration::from_secs(900));
        assert_near("p99", report.p99_us, Duration::from_secs(990));
        assert_near("p99.9", report.p999_us, Duration::from_secs(1000));
        assert_near("max", report.max_us, Duration::from_secs(1000));
        assert!(
            (report.mean_us - 505e6).abs() < 5e6,
            "mean: {}",
            report.mean_us
        );
        let mut temp = dir.report().into_os_string();
        temp.push(".tmp");
        assert!(!Path::new(&temp).exists(), "the temporary file was renamed");
    }

    #[test]
    fn writes_the_report_at_shutdown_too() {
        let dir = TempDir::new("shutdown");
        let mut bench = bench(&dir, 3);
        for _ in 0..4 {
            assert_eq!(
                bench.handle(sent_ago(Duration::from_millis(5))),
                Ok(Outcome::Ack)
            );
        }
        assert_eq!(read(&dir.report()).count, 3, "written at flush_every");
        bench.shutdown().unwrap();
        let report = read(&dir.report());
        assert_eq!((report.count, report.unstamped), (4, 0));
        assert!(
            report.min_us >= 5_000 && report.max_us >= report.min_us,
            "{report:?}"
        );
    }

    #[test]
    fn counts_unstamped_messages_apart_and_acks_them() {
        let dir = TempDir::new("unstamped");
        let mut bench = bench(&dir, 10_000);
        let unstamped = TestMessage::new("bench.load", "no stamp");
        let garbled = TestMessage::new("bench.load", "").header(SENT_HEADER, "yesterday");
        assert_eq!(bench.handle(unstamped), Ok(Outcome::Ack));
        assert_eq!(bench.handle(garbled), Ok(Outcome::Ack));
        assert_eq!(
            bench.handle(sent_ago(Duration::from_millis(1))),
            Ok(Outcome::Ack)
        );
        bench.shutdown().unwrap();
        let report = read(&dir.report());
        assert_eq!((report.count, report.unstamped), (1, 2));
    }

    #[test]
    fn a_stamp_from_the_future_counts_as_no_latency() {
        let dir = TempDir::new("future");
        let mut bench = bench(&dir, 10_000);
        let sent = (SystemTime::now() + Duration::from_secs(3600))
            .duration_since(UNIX_EPOCH)
            .unwrap();
        let msg =
            TestMessage::new("bench.load", "").header(SENT_HEADER, sent.as_nanos().to_string());
        assert_eq!(bench.handle(msg), Ok(Outcome::Ack));
        bench.shutdown().unwrap();
        let report = read(&dir.report());
        assert_eq!((report.count, report.min_us, report.max_us), (1, 0, 0));
    }

    #[test]
    fn the_markers_start_a_new_run_and_write_the_report_on_request() {
        let dir = TempDir::new("markers");
        let mut bench = bench(&dir, 10_000);
        bench.handle(sent_ago(Duration::from_secs(60))).unwrap();
        bench.handle(TestMessage::new("bench.load", "")).unwrap();
        let reset = TestMessage::new("bench.load", "").header(RESET_HEADER, "1");
        assert_eq!(bench.handle(reset), Ok(Outcome::Ack));
        bench.handle(sent_ago(Duration::from_millis(2))).unwrap();
        assert!(!dir.report().exists());

        let flush = TestMessage::new("bench.load", "").header(FLUSH_HEADER, "1");
        assert_eq!(bench.handle(flush), Ok(Outcome::Ack));
        let report = read(&dir.report());
        assert_eq!((report.count, report.unstamped), (1, 0), "only the new run");
        assert!(report.max_us < 60_000_000, "{report:?}");
    }

    #[test]
    fn a_report_that_cannot_be_written_is_logged_and_the_message_acked() {
        let dir = TempDir::new("unwritable");
        let mut bench = bench(&dir, 1);
        std::fs::remove_dir_all(&dir.0).unwrap();
        assert_eq!(
            bench.handle(sent_ago(Duration::from_millis(1))),
            Ok(Outcome::Ack)
        );
        let logs = bench.logs();
        let warning = logs
            .iter()
            .find(|l| l.level == Level::Warn)
            .unwrap_or_else(|| panic!("no warning in {logs:?}"));
        assert_eq!(warning.message, "cannot write the bench report");
        let output = dir.report().display().to_string();
        assert!(
            warning.fields.contains(&("output".to_owned(), output)),
            "{warning:?}"
        );
    }

    #[test]
    fn new_refuses_a_zero_flush_every_and_a_missing_directory() {
        let dir = TempDir::new("refused");
        let e =
            Harness::<Bench>::new(serde_json::json!({ "output": dir.report(), "flush_every": 0 }))
                .unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (
                CallErrorKind::Error,
                "`flush_every` is 0; it must be at least 1"
            )
        );

        let missing = dir.0.join("no-such-dir");
        let output = missing.join("report.json");
        let e = Harness::<Bench>::new(serde_json::json!({ "output": output })).unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Error);
        assert_eq!(
            e.message,
            format!(
                "cannot write the report {}: the directory {} does not exist",
                output.display(),
                missing.display()
            )
        );
    }

    #[test]
    fn latency_saturates_at_zero() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000);
        assert_eq!(latency_us(999_000_000_000, now), 1_000_000);
        assert_eq!(latency_us(1_000_000_000_000, now), 0);
        assert_eq!(latency_us(u64::MAX, now), 0);
    }
}
