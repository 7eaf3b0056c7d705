//! The history checker of the fault campaign: what producers were answered, against what
//! the recording plugins saw. It reports every message answered OK that some target never
//! saw (lost), every delivery of a message never published or refused (unexpected), a
//! delivery whose id is not the one its publish was answered with, duplicates (allowed: at
//! least once, counted), attempt numbers past `max_attempts`, and retries that came sooner
//! than the backoff allows.
//!
//! Payloads are unique per publish: they tie a record to its publish (and a pipeline child,
//! whose payload is derived from its parent's, to its parent).

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use crate::record::Recorded;

/// How a publish was answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Accepted, with this id: it must be delivered to every target.
    Ok(u64),
    /// Refused with a status: it must never be delivered.
    Refused(String),
    /// No answer (the connection broke): it may or may not have been accepted.
    Unknown,
}

/// One publish, as its producer logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub topic: String,
    pub payload: String,
    pub answer: Answer,
}

/// One recording instance and what it must see.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    pub name: &'a str,
    pub records: &'a [Recorded],
    /// The topic of the publishes it gets (directly, or as the parents of what it gets).
    pub topic: &'a str,
    /// For a pipeline's sink: the payload of the child of a parent with this payload.
    pub derive: Option<fn(&str) -> String>,
}

/// What the checker found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Report {
    pub published: usize,
    pub answered_ok: usize,
    pub refused: usize,
    pub unknown: usize,
    /// (target, payload) answered OK and never seen.
    pub lost: Vec<(String, String)>,
    /// (target, payload) seen but never published, or refused.
    pub unexpected: Vec<(String, String)>,
    /// (target, payload, recorded id, answered id) for a direct target.
    pub wrong_id: Vec<(String, String, u64, u64)>,
    /// Deliveries beyond the first of each message and target.
    pub duplicates: usize,
    /// (target, payload, attempt) past `max_attempts`.
    pub over_attempts: Vec<(String, String, u32)>,
    /// (target, payload, attempt, ms after the previous attempt) sooner than the backoff.
    pub early_retries: Vec<(String, String, u32, u64)>,
}

impl Report {
    /// Nothing lost, unexpected, misnumbered, over the limit or early.
    pub fn is_clean(&self) -> bool {
        self.lost.is_empty()
            && self.unexpected.is_empty()
            && self.wrong_id.is_empty()
            && self.over_attempts.is_empty()
            && self.early_retries.is_empty()
    }
}

/// Checks the history. `min_retry_ms`: the smallest backoff between an attempt and the next
/// one of the same delivery (a tolerance is the caller's to subtract).
pub fn check(
    published: &[Published],
    targets: &[Target<'_>],
    max_attempts: u32,
    min_retry_ms: u64,
) -> Report {
    let mut report = Report {
        published: published.len(),
        ..Report::default()
    };
    for p in published {
        match p.answer {
            Answer::Ok(_) => report.answered_ok += 1,
            Answer::Refused(_) => report.refused += 1,
            Answer::Unknown => report.unknown += 1,
        }
    }
    for target in targets {
        let derive = |payload: &str| {
            target
                .derive
                .map_or_else(|| payload.to_owned(), |d| d(payload))
        };
        // What it must see (with the id, for a direct target) and what it may see.
        let mut must: BTreeMap<String, Option<u64>> = BTreeMap::new();
        let mut may: BTreeSet<String> = BTreeSet::new();
        for p in published.iter().filter(|p| p.topic == target.topic) {
            match p.answer {
                Answer::Ok(id) => {
                    let expected_id = target.derive.is_none().then_some(id);
                    must.insert(derive(&p.payload), expected_id);
                    may.insert(derive(&p.payload));
                }
                Answer::Unknown => {
                    may.insert(derive(&p.payload));
                }
                Answer::Refused(_) => {}
            }
        }
        let mut seen: BTreeMap<&str, Vec<&Recorded>> = BTreeMap::new();
        for r in target.records {
            seen.entry(r.payload.as_str()).or_default().push(r);
        }
        for (payload, expected_id) in &must {
            if !seen.contains_key(payload.as_str()) {
                report.lost.push((target.name.to_owned(), payload.clone()));
            }
            if let (Some(expected), Some(records)) = (expected_id, seen.get(payload.as_str())) {
                for r in records.iter().filter(|r| r.id != *expected) {
                    report.wrong_id.push((
                        target.name.to_owned(),
                        payload.clone(),
                        r.id,
                        *expected,
                    ));
                }
            }
        }
        for (payload, records) in &seen {
            if !may.contains(*payload) {
                report
                    .unexpected
                    .push((target.name.to_owned(), (*payload).to_owned()));
            }
            report.duplicates += records.len() - 1;
            for r in records.iter().filter(|r| r.attempt > max_attempts) {
                report
                    .over_attempts
                    .push((target.name.to_owned(), r.payload.clone(), r.attempt));
            }
            // A charged failure moves the attempt number on: attempt n+1 may not start
            // sooner than the backoff after attempt n started (it started no later).
            for next in records.iter() {
                let earlier = records
                    .iter()
                    .filter(|r| r.id == next.id && r.attempt + 1 == next.attempt)
                    .map(|r| r.at_ms)
                    .max();
                if let Some(at) = earlier
                    && next.at_ms < at + min_retry_ms
                {
                    report.early_retries.push((
                        target.name.to_owned(),
                        next.payload.clone(),
                        next.attempt,
                        next.at_ms.saturating_sub(at),
                    ));
                }
            }
        }
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(id: u64, attempt: u32, at_ms: u64, payload: &str) -> Recorded {
        Recorded {
            id,
            attempt,
            at_ms,
            topic: "t".into(),
            payload: payload.into(),
        }
    }

    fn publish(payload: &str, answer: Answer) -> Published {
        Published {
            topic: "t".into(),
            payload: payload.into(),
            answer,
        }
    }

    #[test]
    fn every_kind_of_problem_is_found_and_duplicates_are_only_counted() {
        let published = [
            publish("a", Answer::Ok(1)),
            publish("b", Answer::Ok(2)),
            publish("c", Answer::Refused("full".into())),
            publish("d", Answer::Unknown),
            publish("e", Answer::Ok(5)),
        ];
        let records = [
            rec(1, 1, 100, "a"),
            rec(1, 1, 300, "a"), // a redelivery after a crash: a duplicate
            rec(3, 1, 100, "c"), // refused, yet delivered
            rec(4, 1, 100, "d"), // unknown answer: allowed
            rec(9, 1, 100, "x"), // never published
            rec(6, 1, 100, "e"), // the wrong id
            rec(6, 2, 120, "e"), // a retry 20 ms later
            rec(6, 7, 900, "e"), // past max_attempts
        ];
        let target = Target {
            name: "rec",
            records: &records,
            topic: "t",
            derive: None,
        };
        let report = check(&published, &[target], 5, 50);
        assert_eq!(report.lost, vec![("rec".into(), "b".into())]);
        assert_eq!(
            report.unexpected,
            vec![("rec".into(), "c".into()), ("rec".into(), "x".into())]
        );
        assert_eq!(report.wrong_id.len(), 3, "all three records of e");
        assert_eq!(report.duplicates, 3, "a once more, e twice more");
        assert_eq!(report.over_attempts, vec![("rec".into(), "e".into(), 7)]);
        assert_eq!(
            report.early_retries,
            vec![("rec".into(), "e".into(), 2, 20)]
        );
        assert!(!report.is_clean());
        assert_eq!(
            (report.answered_ok, report.refused, report.unknown),
            (3, 1, 1)
        );
    }

    #[test]
    fn a_pipeline_sink_is_checked_through_the_derived_payload() {
        let published = [publish("p-1", Answer::Ok(1)), publish("p-2", Answer::Ok(2))];
        let records = [rec(40, 1, 0, "P-1"), rec(41, 1, 0, "P-1")];
        let target = Target {
            name: "sink",
            records: &records,
            topic: "t",
            derive: Some(|p| p.to_ascii_uppercase()),
        };
        let report = check(&published, &[target], 5, 0);
        assert_eq!(report.lost, vec![("sink".into(), "P-2".into())]);
        assert!(report.wrong_id.is_empty(), "children get ids of their own");
        assert_eq!(report.duplicates, 1);
    }
}
