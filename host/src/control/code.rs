//! The front's errors as gRPC statuses: the one place status codes are chosen. The code says
//! whether to retry (and whose mistake it was), the message says why, in the front's words.

use tonic::Status;

use crate::{
    front::{OperateError, PublishRefused, WatchEnd},
    ledger::LedgerError,
    supervisor::{ActRefused, ReloadRefused},
};

/// A refused publish: `INVALID_ARGUMENT` (the message), `FAILED_PRECONDITION` (nothing
/// subscribes and unrouted publishes are refused), `RESOURCE_EXHAUSTED` (a backlog or the
/// ledger full: retry later), `UNAVAILABLE` (stopping, or the ledger failed).
pub fn publish(refused: &PublishRefused) -> Status {
    match refused {
        PublishRefused::Invalid(_) => Status::invalid_argument(refused.to_string()),
        PublishRefused::Unrouted(_) => Status::failed_precondition(refused.to_string()),
        PublishRefused::Backlog(_) | PublishRefused::LedgerFull(_) => {
            Status::resource_exhausted(refused.to_string())
        }
        PublishRefused::ShuttingDown | PublishRefused::LedgerFailed(_) => {
            Status::unavailable(refused.to_string())
        }
    }
}

/// A refused operator's call.
pub fn operate(e: &OperateError) -> Status {
    match e {
        OperateError::NothingPicked | OperateError::NoInstanceNamed | OperateError::LogLevel(_) => {
            Status::invalid_argument(e.to_string())
        }
        OperateError::UnknownInstance(_)
        | OperateError::NotYetAccepted { .. }
        | OperateError::MessageGone(_) => Status::not_found(e.to_string()),
        OperateError::Reload(e) => reload(e),
        OperateError::Act(e) => act(e),
        OperateError::Ledger(e) => ledger(e),
    }
}

/// How a watch ended.
pub fn watch_end(end: WatchEnd) -> Status {
    match end {
        WatchEnd::Lagged => Status::resource_exhausted(end.to_string()),
        WatchEnd::ShuttingDown => Status::unavailable(end.to_string()),
    }
}

fn reload(e: &ReloadRefused) -> Status {
    match e {
        ReloadRefused::Invalid(_) => Status::invalid_argument(e.to_string()),
        ReloadRefused::Changed { .. } => Status::aborted(e.to_string()),
        ReloadRefused::UnknownInstance(_) => Status::not_found(e.to_string()),
        ReloadRefused::Stopping => Status::unavailable(e.to_string()),
    }
}

fn act(e: &ActRefused) -> Status {
    match e {
        ActRefused::Configured { .. } | ActRefused::LibraryPresent { .. } => {
            Status::failed_precondition(e.to_string())
        }
        ActRefused::Unknown(_) => Status::not_found(e.to_string()),
        ActRefused::Ledger(e) => ledger(e),
        ActRefused::Stopping => Status::unavailable(e.to_string()),
    }
}

fn ledger(e: &LedgerError) -> Status {
    match e {
        LedgerError::Full(_) => Status::resource_exhausted(e.to_string()),
        LedgerError::Unsupported(_) | LedgerError::Refused(_) | LedgerError::Unusable(_) => {
            Status::failed_precondition(e.to_string())
        }
        LedgerError::Fatal(_) | LedgerError::Corrupt(_) => Status::internal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;

    #[test]
    fn refusals_map_to_codes_that_say_whether_to_retry() {
        let cases = [
            (
                PublishRefused::Invalid("empty topic".into()),
                Code::InvalidArgument,
            ),
            (
                PublishRefused::Backlog(crate::backlog::BacklogFull {
                    instance: "sink".into(),
                    backlog: 10,
                    limit: 5,
                }),
                Code::ResourceExhausted,
            ),
            (
                PublishRefused::LedgerFull("disk".into()),
                Code::ResourceExhausted,
            ),
            (PublishRefused::ShuttingDown, Code::Unavailable),
            (
                PublishRefused::Unrouted("a.b".into()),
                Code::FailedPrecondition,
            ),
        ];
        for (refused, code) in cases {
            let s = publish(&refused);
            assert_eq!(s.code(), code, "{refused}");
            assert_eq!(s.message(), refused.to_string());
        }
    }

    #[test]
    fn operators_mistakes_are_told_apart_from_the_daemons() {
        let cases = [
            (OperateError::NothingPicked, Code::InvalidArgument),
            (OperateError::NoInstanceNamed, Code::InvalidArgument),
            (OperateError::UnknownInstance("x".into()), Code::NotFound),
            (OperateError::MessageGone(3), Code::NotFound),
            (
                OperateError::Act(ActRefused::Ledger(LedgerError::Full("disk".into()))),
                Code::ResourceExhausted,
            ),
            (
                OperateError::Reload(ReloadRefused::Changed {
                    path: "p".into(),
                    expected: "a".into(),
                    found: "b".into(),
                }),
                Code::Aborted,
            ),
        ];
        for (e, code) in cases {
            let s = operate(&e);
            assert_eq!(s.code(), code, "{e}");
            assert_eq!(s.message(), e.to_string());
        }
    }
}
