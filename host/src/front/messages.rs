//! Messages as operators see them: one message's history, dead letters a page at a time, and
//! the selection an operator's replay or purge acts on.

use std::fmt;

use bytes::Bytes;

use super::OperateError;
use crate::{
    clock::Timestamp,
    delivery::{self, AttemptResult, Delivery},
    ledger::{DeadLetter, DeadLetterFilter, HistoryEntry, Selection},
};

/// How much of a payload [`MessageHistory`] holds.
pub const PREVIEW: usize = 256;

/// The dead letters of a page when the caller names no limit.
pub const DEFAULT_PAGE: usize = 100;

/// The most dead letters one page holds (a larger limit is cut to it; the page says where the
/// next one starts).
pub const MAX_PAGE: usize = 1000;

/// One message and every delivery of it.
#[derive(Debug, Clone, PartialEq)]
pub struct MessageHistory {
    pub id: u64,
    pub topic: String,
    pub headers: Vec<(String, String)>,
    pub payload_size: u64,
    /// The first [`PREVIEW`] bytes of the payload.
    pub payload_preview: Bytes,
    pub published: Timestamp,
    pub deliveries: Vec<DeliveryHistory>,
}

/// Where one delivery of a message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStage {
    /// Waiting for its turn (or its retry).
    Pending,
    /// Handed to the instance now.
    InFlight,
    /// Given up on; waits for an operator's replay or purge.
    DeadLettered,
}

impl DeliveryStage {
    /// Every stage.
    pub const ALL: [Self; 3] = [Self::Pending, Self::InFlight, Self::DeadLettered];

    /// The operator's name of the stage (what [`fmt::Display`] writes).
    pub fn name(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::InFlight => "in_flight",
            Self::DeadLettered => "dead_lettered",
        }
    }
}

crate::words::spelled_as_words!(DeliveryStage);

/// One delivery of a message (to one instance) and its attempts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryHistory {
    pub instance: String,
    pub stage: DeliveryStage,
    pub deliveries: u32,
    pub failures: u32,
    pub last_reason: Option<String>,
    /// Oldest first; the one in progress last.
    pub attempts: Vec<AttemptHistory>,
}

impl DeliveryHistory {
    fn new(entry: HistoryEntry) -> Self {
        let HistoryEntry {
            instance,
            dead_letter,
            delivery,
        } = entry;
        let stage = if dead_letter {
            DeliveryStage::DeadLettered
        } else if matches!(delivery.state, delivery::State::InFlight { .. }) {
            DeliveryStage::InFlight
        } else {
            DeliveryStage::Pending
        };
        let Delivery {
            deliveries,
            failures,
            last_reason,
            history,
            current,
            ..
        } = delivery;
        Self {
            instance,
            stage,
            deliveries,
            failures,
            last_reason,
            attempts: history
                .into_iter()
                .chain(current)
                .map(|a| AttemptHistory {
                    number: a.number,
                    started: a.started,
                    ended: a.ended,
                    outcome: a
                        .result
                        .map_or(AttemptOutcome::InFlight, AttemptOutcome::Ended),
                })
                .collect(),
        }
    }
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptHistory {
    pub number: u32,
    /// Milliseconds since the Unix epoch.
    pub started: u64,
    pub ended: Option<u64>,
    pub outcome: AttemptOutcome,
}

/// How an attempt ended, or that it has not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    InFlight,
    Ended(AttemptResult),
}

impl fmt::Display for AttemptOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InFlight => f.write_str("in flight"),
            Self::Ended(AttemptResult::Acked) => f.write_str("acked"),
            Self::Ended(AttemptResult::Failed { reason }) => write!(f, "failed: {reason}"),
            Self::Ended(AttemptResult::Excused { reason }) => {
                write!(f, "failed (excused): {reason}")
            }
            // The reason already says "rejected: …".
            Self::Ended(AttemptResult::Rejected { reason }) => f.write_str(reason),
            Self::Ended(AttemptResult::Released) => f.write_str("released"),
        }
    }
}

/// A message and its deliveries, as the ledger holds them.
pub(super) fn history(
    id: u64,
    message: &crate::message::StoredMessage,
    deliveries: Vec<HistoryEntry>,
) -> MessageHistory {
    MessageHistory {
        id,
        topic: message.topic.clone(),
        headers: message.headers.clone(),
        payload_size: message.payload.len() as u64,
        payload_preview: message.payload.slice(..message.payload.len().min(PREVIEW)),
        published: message.publish_time,
        deliveries: deliveries.into_iter().map(DeliveryHistory::new).collect(),
    }
}

/// Which dead letters a page lists.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// One instance's (`None`: every instance's).
    pub instance: Option<String>,
    /// Those after this cursor (the `next` of the page before).
    pub after: Option<Cursor>,
    /// At most this many (`None`: [`DEFAULT_PAGE`]; cut to [`MAX_PAGE`]).
    pub limit: Option<usize>,
}

/// Where a page of dead letters starts: after this (message, instance), in that order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub message: u64,
    pub instance: String,
}

/// One page of dead letters.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterPage {
    pub dead_letters: Vec<DeadLetter>,
    /// Where the next page starts (`None`: this is the last).
    pub next: Option<Cursor>,
}

impl PageRequest {
    /// How many this page holds, and the ledger's filter: one more than that, which says
    /// whether there is a next page.
    pub(super) fn filter(self) -> (usize, DeadLetterFilter) {
        let limit = self.limit.map_or(DEFAULT_PAGE, |l| l.min(MAX_PAGE));
        (
            limit,
            DeadLetterFilter {
                instance: self.instance,
                after: self.after.map(|c| (c.message, c.instance)),
                limit: limit + 1,
            },
        )
    }
}

/// A page of at most `limit` from what the ledger listed (at most `limit + 1`).
pub(super) fn page(mut listed: Vec<DeadLetter>, limit: usize) -> DeadLetterPage {
    let more = listed.len() > limit;
    listed.truncate(limit);
    let next = match (more, listed.last()) {
        (true, Some(last)) => Some(Cursor {
            message: last.message,
            instance: last.instance.clone(),
        }),
        _ => None,
    };
    DeadLetterPage {
        dead_letters: listed,
        next,
    }
}

/// The dead letters an operator's replay or purge takes: of one instance or every one, some
/// messages or every one. Nothing named and not `all` is refused: an empty request must not
/// mean everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pick {
    pub instance: Option<String>,
    pub messages: Vec<u64>,
    /// Every dead letter (of `instance`, if named).
    pub all: bool,
}

impl Pick {
    /// The ledger's selection.
    ///
    /// # Errors
    /// [`OperateError::NothingPicked`] when it names neither an instance nor messages, nor
    /// asks for all.
    pub(super) fn selection(self) -> Result<Selection, OperateError> {
        if self.instance.is_none() && self.messages.is_empty() && !self.all {
            return Err(OperateError::NothingPicked);
        }
        Ok(Selection {
            instance: self.instance,
            messages: self.messages,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letter(message: u64, instance: &str) -> DeadLetter {
        DeadLetter {
            message,
            topic: "t".into(),
            instance: instance.into(),
            at: 0,
            delivery: Delivery::new(Timestamp(0)),
        }
    }

    #[test]
    fn a_page_is_cut_to_its_limit_and_says_where_the_next_starts() {
        let (limit, filter) = PageRequest {
            limit: Some(5000),
            ..PageRequest::default()
        }
        .filter();
        assert_eq!((limit, filter.limit), (MAX_PAGE, MAX_PAGE + 1));
        assert_eq!(PageRequest::default().filter().0, DEFAULT_PAGE);
        let listed = vec![
            dead_letter(1, "a"),
            dead_letter(1, "b"),
            dead_letter(2, "a"),
        ];
        let full = page(listed.clone(), 2);
        assert_eq!(full.dead_letters.len(), 2);
        assert_eq!(
            full.next,
            Some(Cursor {
                message: 1,
                instance: "b".into()
            })
        );
        assert_eq!(page(listed, 3).next, None);
    }

    #[test]
    fn an_empty_pick_is_refused_and_all_is_everything() {
        assert!(matches!(
            Pick::default().selection(),
            Err(OperateError::NothingPicked)
        ));
        let all = Pick {
            all: true,
            ..Pick::default()
        };
        assert_eq!(all.selection().unwrap(), Selection::default());
    }

    #[test]
    fn a_stage_reads_back_as_the_word_it_writes() {
        for stage in DeliveryStage::ALL {
            assert_eq!(stage.to_string().parse(), Ok(stage));
        }
        assert_eq!(
            "dead lettered".parse::<DeliveryStage>(),
            Err(crate::words::UnknownState("dead lettered".into()))
        );
    }

    #[test]
    fn attempt_outcomes_read_as_operators_expect() {
        let texts: Vec<String> = [
            AttemptOutcome::InFlight,
            AttemptOutcome::Ended(AttemptResult::Acked),
            AttemptOutcome::Ended(AttemptResult::Failed { reason: "x".into() }),
            AttemptOutcome::Ended(AttemptResult::Excused { reason: "y".into() }),
            AttemptOutcome::Ended(AttemptResult::Rejected {
                reason: "rejected: z".into(),
            }),
            AttemptOutcome::Ended(AttemptResult::Released),
        ]
        .iter()
        .map(ToString::to_string)
        .collect();
        assert_eq!(
            texts,
            [
                "in flight",
                "acked",
                "failed: x",
                "failed (excused): y",
                "rejected: z",
                "released"
            ]
        );
    }
}
