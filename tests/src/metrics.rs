//! The metrics endpoint from outside, as a scraper sees it: plain HTTP/1.1 GETs
//! ([`get`]), a scrape in the text format parsed into samples ([`Scrape`]), and Prometheus's
//! own checker, `promtool` ([`promtool`]: found on `PATH`; `.ci/run` installs Debian's
//! `prometheus` package for it). A test that needs promtool fails without it: a check that
//! silently did not run would read as a pass.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

/// One HTTP answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

/// `METHOD path` on `addr` with the extra request headers `headers`.
///
/// # Panics
/// If the endpoint cannot be reached or answers something that is not HTTP/1.1.
pub fn request(addr: SocketAddr, method: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("cannot connect to the metrics endpoint {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout set");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).expect("request sent");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("answer read");
    let text = String::from_utf8(raw).expect("a UTF-8 answer");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    let mut lines = head.lines();
    let status_line = lines.next().expect("a status line");
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {status_line}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Answer {
        status,
        headers,
        body: body.to_owned(),
    }
}

/// `GET path` on `addr`.
///
/// # Panics
/// As [`request`].
pub fn get(addr: SocketAddr, path: &str) -> Answer {
    request(addr, "GET", path, &[])
}

/// One sample: a metric name and its labels.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Series {
    pub name: String,
    pub labels: BTreeMap<String, String>,
}

/// A scrape in the text format, parsed.
#[derive(Debug, Clone)]
pub struct Scrape {
    pub text: String,
    pub samples: BTreeMap<Series, f64>,
}

impl Scrape {
    /// Scrapes `addr`'s `/metrics` in the default (text) format.
    ///
    /// # Panics
    /// If the scrape is not answered 200 in the text format, or does not parse.
    pub fn take(addr: SocketAddr) -> Self {
        let answer = get(addr, "/metrics");
        assert_eq!(answer.status, 200, "scrape: {answer:?}");
        let content_type = answer
            .headers
            .get("content-type")
            .cloned()
            .unwrap_or_default();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "the default format is the classic text format: {content_type}"
        );
        Self::parse(&answer.body)
    }

    /// Parses `text` (the classic text format; `# ` lines are skipped).
    ///
    /// # Panics
    /// On a sample line that does not parse.
    pub fn parse(text: &str) -> Self {
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
        {
            let (series, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("not a sample: {line}"));
            let value: f64 = match value {
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("not a value: {line}")),
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (name, labels(rest.trim_end_matches('}'))),
                None => (series, BTreeMap::new()),
            };
            samples.insert(
                Series {
                    name: name.to_owned(),
                    labels,
                },
                value,
            );
        }
        Self {
            text: text.to_owned(),
            samples,
        }
    }

    /// The value of the one sample named `name` with (at least) `labels`.
    ///
    /// # Panics
    /// If there is none, or more than one.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let found: Vec<f64> = self
            .samples
            .iter()
            .filter(|(s, _)| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, v)| *v)
            .collect();
        match found.as_slice() {
            [one] => *one,
            [] => panic!("no sample {name}{labels:?} in:\n{}", self.text),
            _ => panic!(
                "{} samples {name}{labels:?} in:\n{}",
                found.len(),
                self.text
            ),
        }
    }

    /// Every metric name (family names as the samples spell them).
    pub fn names(&self) -> std::collections::BTreeSet<&str> {
        self.samples.keys().map(|s| s.name.as_str()).collect()
    }
}

/// `a="x",b="y"` (no escapes in our label values but `\"` and `\\`).
fn labels(text: &str) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, escaped)) = chars.next() {
                        value.push(if escaped == 'n' { '\n' } else { escaped });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end..];
    }
    labels
}

/// The `promtool` on `PATH`.
///
/// # Panics
/// If there is none: install Debian's `prometheus` package (`.ci/run` does).
pub fn promtool() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("promtool"))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "promtool is not on PATH: install Debian's `prometheus` package \
                 (`apt-get install prometheus`; .ci/run does it)"
            )
        })
}

/// `promtool ARGS`, with `stdin` on its standard input; its output.
///
/// # Panics
/// If promtool is missing or cannot be run.
pub fn run_promtool(args: &[&str], stdin: Option<&str>, dir: &Path) -> Output {
    let mut child = Command::new(promtool())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    {
        let mut input = child.stdin.take().expect("stdin piped");
        if let Some(text) = stdin {
            input
                .write_all(text.as_bytes())
                .expect("promtool reads its input");
        }
    }
    child.wait_with_output().expect("promtool ends")
}

/// Where the daemon in `log` serves its metrics (it logs the address it bound).
///
/// # Panics
/// If it logged none.
pub fn address_in(log: &str) -> SocketAddr {
    let marker = "serving metrics on http://";
    let start = log
        .find(marker)
        .unwrap_or_else(|| panic!("the daemon logged no metrics address:\n{log}"))
        + marker.len();
    let end = log[start..]
        .find('/')
        .expect("the address ends with the path")
        + start;
    log[start..end].parse().expect("an address")
}
