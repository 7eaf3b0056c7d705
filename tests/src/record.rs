//! What the `fx-record` fixture wrote: one line per delivery it saw,
//! `<message id> <attempt> <unix ms> <topic> <payload>\n`, appended before it returned the outcome, so
//! the record outlives the daemon (a restart, a SIGKILL, an abort).

use std::{fs, io, path::Path};

/// One delivery, as `fx-record` recorded it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Recorded {
    pub id: u64,
    pub attempt: u32,
    /// When the plugin saw it (ms since the Unix epoch).
    pub at_ms: u64,
    pub topic: String,
    /// The payload, UTF-8 decoded lossily.
    pub payload: String,
}

/// Every delivery recorded in `path`, in the order they were written (torn lines, cut by a
/// kill during the write, skipped); empty if the file does not exist (no instance ever opened
/// it).
///
/// # Panics
/// If the file cannot be read or a line is not one `fx-record` writes (with the file's text).
pub fn read_record(path: &Path) -> Vec<Recorded> {
    let text = match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).expect("fx-record writes UTF-8"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read the record {}: {e}", path.display()),
    };
    // Blank lines separate records; a line without the trailing ` .` is torn (the process
    // died while writing it): an attempt in progress, skipped.
    text.lines()
        .filter_map(|line| line.strip_suffix(" ."))
        .map(|line| {
            parse(line).unwrap_or_else(|| {
                panic!(
                    "not an fx-record line in {}: {line:?}\n{text}",
                    path.display()
                )
            })
        })
        .collect()
}

fn parse(line: &str) -> Option<Recorded> {
    let mut fields = line.splitn(5, ' ');
    Some(Recorded {
        id: fields.next()?.parse().ok()?,
        attempt: fields.next()?.parse().ok()?,
        at_ms: fields.next()?.parse().ok()?,
        topic: fields.next()?.to_owned(),
        payload: fields.next()?.to_owned(),
    })
}

/// One line of the `fx-swap` fixture's record: which build handled which delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapLine {
    pub id: u64,
    pub attempt: u32,
    /// `'A'` or `'B'`.
    pub build: char,
    /// When it was handled (Unix µs).
    pub handled_us: u64,
    /// Its `plugind-bench-sent` header (Unix ns), if it had one.
    pub sent_ns: Option<u64>,
    pub label: String,
    pub payload: String,
}

/// The complete lines of the `fx-swap` record `path` (none if it does not exist), while a
/// daemon may still be writing it (a last line without its newline is left out).
///
/// # Panics
/// If the file cannot be read or a complete line is not one `fx-swap` writes.
pub fn read_swaps(path: &Path) -> Vec<SwapLine> {
    let text = match fs::read(path) {
        Ok(bytes) => String::from_utf8(bytes).expect("fx-swap writes UTF-8"),
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Vec::new(),
        Err(e) => panic!("cannot read the record {}: {e}", path.display()),
    };
    text.split_inclusive('\n')
        .filter_map(|line| line.strip_suffix('\n'))
        .map(|line| {
            parse_swap(line)
                .unwrap_or_else(|| panic!("not an fx-swap line in {}: {line:?}", path.display()))
        })
        .collect()
}

/// One `fx-swap` line (without its newline).
pub fn parse_swap(line: &str) -> Option<SwapLine> {
    let mut fields = line.splitn(7, ' ');
    Some(SwapLine {
        id: fields.next()?.parse().ok()?,
        attempt: fields.next()?.parse().ok()?,
        build: fields.next()?.chars().next()?,
        handled_us: fields.next()?.parse().ok()?,
        sent_ns: match fields.next()? {
            "-" => None,
            sent => Some(sent.parse().ok()?),
        },
        label: fields.next()?.to_owned(),
        payload: fields.next()?.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_torn_by_a_kill_is_skipped_and_the_next_one_is_whole() {
        let dir = crate::sandbox::Sandbox::new("record-unit");
        // The second write was cut after its third field; the last one too.
        let path = dir.put(
            "rec.txt",
            "\n1 1 5 t.a a .\n\n2 1 6 \n3 1 7 t.a c d .\n\n4 1 8 t.a e",
        );
        let records = read_record(&path);
        let ids: Vec<u64> = records.iter().map(|r| r.id).collect();
        assert_eq!(ids, [1, 3]);
        assert_eq!(records[1].payload, "c d");
    }

    #[test]
    fn lines_parse_and_the_payload_keeps_its_spaces() {
        assert_eq!(
            parse("7 2 1700000000123 t.a hello there"),
            Some(Recorded {
                id: 7,
                attempt: 2,
                at_ms: 1_700_000_000_123,
                topic: "t.a".into(),
                payload: "hello there".into(),
            })
        );
        assert_eq!(parse("7 1 5 t.a ").map(|r| r.payload), Some(String::new()));
        assert_eq!(parse("7 1 5 t.a"), None);
        assert_eq!(parse("x 1 5 t.a p"), None);
    }
}
