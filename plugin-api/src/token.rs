//! [`Token`]: the completion token of a deferred attempt (plugind-api 1.1).
//!
//! A plugin takes it in `handle` with [`Message::defer`], returns [`Outcome::Defer`], and
//! settles it later from any thread. The token names its attempt by message id + attempt
//! number: once the attempt ended (settled, its lease expired, a stop released it) the host
//! refuses it with [`SettleErrorKind::Stale`] instead of settling anything else. A token
//! dropped unsettled fails its attempt with reason `dropped`.
//!
//! Inside an async plugin's future, [`Host::publish`](crate::Host::publish) publishes through
//! the token of the delivery that future serves: the SDK marks the thread while it polls
//! that future ([`Current`]), with a plain pointer in a thread-local that has no destructor
//! (a destructor would pin the plugin library in the daemon's threads).

use std::{cell::Cell, fmt, time::Duration};

use abi_stable::std_types::{RResult, RStr};

use crate::{
    abi::{self, OutcomeKind, RawToken, SettleErrorKind as RawKind},
    sdk::{Message, MessageId, Outcome, PublishError, publish_through},
};

/// The completion token of one deferred attempt: owned, `Send`, `'static`, settled once.
///
/// It keeps the message readable ([`Token::message`]) until it is settled or dropped.
pub struct Token {
    raw: RawToken,
    message: Message,
}

impl Token {
    pub(crate) fn new(raw: RawToken, message: Message) -> Self {
        Self { raw, message }
    }

    #[inline]
    fn ctx(&self) -> &abi_stable::marker_type::ErasedObject {
        // SAFETY: `ctx` came from the host's token constructor and stays valid until
        // `drop_ctx`, which only `Drop` calls.
        unsafe { &*self.raw.ctx }
    }

    /// The message this token settles.
    pub fn message(&self) -> &Message {
        &self.message
    }

    /// The message id.
    pub fn id(&self) -> MessageId {
        self.message.id()
    }

    /// The 1-based attempt this token settles.
    pub fn attempt(&self) -> u32 {
        self.message.attempt()
    }

    /// Done: the delivery is settled (its children are committed with it).
    ///
    /// # Errors
    /// [`SettleError`] when the attempt already ended.
    pub fn ack(self) -> Result<(), SettleError> {
        self.settle(Outcome::Ack)
    }

    /// A failure to retry with the instance's backoff.
    ///
    /// # Errors
    /// [`SettleError`] when the attempt already ended.
    pub fn retry(self, reason: impl Into<String>) -> Result<(), SettleError> {
        self.settle(Outcome::retry(reason))
    }

    /// A failure to retry after `after`.
    ///
    /// # Errors
    /// [`SettleError`] when the attempt already ended.
    pub fn retry_after(
        self,
        after: Duration,
        reason: impl Into<String>,
    ) -> Result<(), SettleError> {
        self.settle(Outcome::retry_after(after, reason))
    }

    /// A permanent failure: dead-letter now.
    ///
    /// # Errors
    /// [`SettleError`] when the attempt already ended.
    pub fn reject(self, reason: impl Into<String>) -> Result<(), SettleError> {
        self.settle(Outcome::reject(reason))
    }

    /// Settles the attempt with `outcome` (Ack, Retry or Reject).
    ///
    /// # Errors
    /// [`SettleError`] when the attempt already ended, or for [`Outcome::Defer`].
    pub fn settle(self, outcome: Outcome) -> Result<(), SettleError> {
        let (kind, after, reason) = match outcome {
            Outcome::Ack => (OutcomeKind::ACK, None, String::new()),
            Outcome::Retry { after, reason } => (OutcomeKind::RETRY, after, reason),
            Outcome::Reject { reason } => (OutcomeKind::REJECT, None, reason),
            Outcome::Defer => {
                return Err(SettleError {
                    kind: SettleErrorKind::Invalid,
                    message: "a token settles with Ack, Retry or Reject, not Defer".to_owned(),
                });
            }
        };
        // SAFETY: the vtable belongs to `ctx`; the borrowed reason outlives the call.
        let result = unsafe {
            (self.raw.vtable.settle())(
                self.ctx(),
                kind,
                after.map(Into::into).into(),
                RStr::from_str(&reason),
            )
        };
        from_raw(result)
    }

    /// Extends the attempt's lease by the instance's `ack_timeout`, counted from now: for
    /// work that takes longer than one lease.
    ///
    /// # Errors
    /// [`SettleError`] when the attempt already ended (the lease expired first, say).
    pub fn keep_alive(&self) -> Result<(), SettleError> {
        // SAFETY: as in `settle`.
        from_raw(unsafe { (self.raw.vtable.keep_alive())(self.ctx()) })
    }

    /// Publishes a child of this attempt: committed with the settlement, and only if it is
    /// an Ack (a retried attempt never duplicates its children).
    ///
    /// # Errors
    /// [`PublishError`] when the daemon refuses the message.
    pub fn publish(&self, topic: &str, payload: &[u8]) -> Result<MessageId, PublishError> {
        self.publish_with_headers(topic, payload, &[])
    }

    /// [`Token::publish`] with headers.
    ///
    /// # Errors
    /// [`PublishError`] when the daemon refuses the message.
    pub fn publish_with_headers(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<MessageId, PublishError> {
        publish_through(topic, payload, headers, |topic, payload, headers| {
            // SAFETY: as in `settle`; every borrowed argument outlives the call.
            unsafe { (self.raw.vtable.publish())(self.ctx(), topic, payload, headers) }
        })
    }

    /// Marks this thread as polling this token's future until the guard drops (async SDK).
    #[cfg_attr(not(feature = "async"), allow(dead_code))]
    pub(crate) fn enter(&self) -> Current {
        Current {
            prev: CURRENT.replace(self as *const Token),
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        // SAFETY: the token owns its context and never uses it again.
        unsafe { (self.raw.vtable.drop_ctx())(self.raw.ctx) }
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("id", &self.id())
            .field("attempt", &self.attempt())
            .finish()
    }
}

fn from_raw(result: RResult<(), abi::SettleError>) -> Result<(), SettleError> {
    match result {
        RResult::ROk(()) => Ok(()),
        RResult::RErr(e) => Err(SettleError {
            kind: SettleErrorKind::from_raw(e.kind),
            message: e.message.into_string(),
        }),
    }
}

/// Fails the attempt of `token` with a panic's text (a panic inside an async handler).
#[cfg_attr(not(feature = "async"), allow(dead_code))]
pub(crate) fn settle_panicked(token: Token, text: String) -> Result<(), SettleError> {
    // SAFETY: as in `Token::settle`.
    let result = unsafe {
        (token.raw.vtable.settle())(
            token.ctx(),
            OutcomeKind::PANICKED,
            None.into(),
            RStr::from_str(&text),
        )
    };
    from_raw(result)
}

/// Why the daemon refused to settle or extend a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SettleError {
    pub kind: SettleErrorKind,
    pub message: String,
}

impl fmt::Display for SettleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "settlement refused: {}", self.message)
    }
}

impl std::error::Error for SettleError {}

/// The class of a refused settlement.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum SettleErrorKind {
    /// The attempt already ended: settled, its lease expired, or a stop released it.
    Stale,
    /// The settlement itself is wrong (an outcome a token cannot carry).
    Invalid,
    /// A kind this SDK version does not know (the daemon is newer).
    Other(u8),
}

impl SettleErrorKind {
    pub(crate) fn from_raw(raw: RawKind) -> Self {
        match raw {
            RawKind::STALE => Self::Stale,
            RawKind::INVALID => Self::Invalid,
            RawKind(other) => Self::Other(other),
        }
    }

    /// The raw value (for hosts).
    pub fn to_raw(self) -> RawKind {
        match self {
            Self::Stale => RawKind::STALE,
            Self::Invalid => RawKind::INVALID,
            Self::Other(other) => RawKind(other),
        }
    }
}

thread_local! {
    /// The token whose future this thread polls now (async SDK); null elsewhere. A plain
    /// pointer: no destructor, so no host thread is ever made to pin the library.
    static CURRENT: Cell<*const Token> = const { Cell::new(std::ptr::null()) };
}

/// Restores the previous current token when dropped.
pub(crate) struct Current {
    prev: *const Token,
}

impl Drop for Current {
    fn drop(&mut self) {
        CURRENT.set(self.prev);
    }
}

/// Publishes through the token of the future polled on this thread, if there is one.
pub(crate) fn publish_in_current(
    topic: &str,
    payload: &[u8],
    headers: &[(&str, &str)],
) -> Option<Result<MessageId, PublishError>> {
    let current = CURRENT.get();
    if current.is_null() {
        return None;
    }
    // SAFETY: non-null only inside an `enter` scope, whose token outlives the scope (the
    // future owning it is being polled).
    Some(unsafe { &*current }.publish_with_headers(topic, payload, headers))
}
