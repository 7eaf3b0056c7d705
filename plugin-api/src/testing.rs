//! Unit-testing a plugin without a daemon: [`Harness`] instantiates a plugin in-process through
//! the same entry points the daemon uses (config as JSON, panics caught, outcomes converted)
//! and records what it logs and publishes.
//!
//! ```
//! use plugind_api::{Host, Message, Outcome, Plugin, testing::{Harness, TestMessage}};
//!
//! struct Upper { host: Host }
//! impl Plugin for Upper {
//!     const NAME: &'static str = "upper";
//!     const VERSION: &'static str = "0.1.0";
//!     type Config = ();
//!     fn new(_: (), host: Host) -> Result<Self, plugind_api::BoxError> { Ok(Upper { host }) }
//!     fn handle(&mut self, msg: Message) -> Outcome {
//!         let upper = msg.payload().to_ascii_uppercase();
//!         match self.host.publish("out", &upper) {
//!             Ok(_) => Outcome::Ack,
//!             Err(e) => Outcome::retry(e.to_string()),
//!         }
//!     }
//! }
//!
//! let mut harness = Harness::<Upper>::new(serde_json::Value::Null).unwrap();
//! let outcome = harness.handle(TestMessage::new("in", "hi")).unwrap();
//! assert_eq!(outcome, Outcome::Ack);
//! assert_eq!(harness.published()[0].payload, b"HI");
//! ```
//!
//! A plugin that defers returns [`Outcome::Defer`] from [`Harness::handle`]; its token's
//! settlement (from any thread) is read with [`Harness::settled`] or waited for with
//! [`Harness::wait_settled`]. [`Harness::handle_to_end`] does both: it runs an async
//! plugin's handler (`Harness<AsyncAdapter<P>>`, feature `async`) to completion.

use std::{
    collections::HashMap,
    marker::PhantomData,
    sync::{
        Arc, Condvar, Mutex, MutexGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use crate::{
    abi::{KeyValue, PluginModRef, RawToken},
    bridge, export,
    hosting::{self, CallError, Completion, Delivery, Instance, Services},
    sdk::{Level, Message, MessageId, Outcome, Plugin, PublishError},
    token::{SettleError, SettleErrorKind},
};

/// A message built by a test.
#[derive(Debug, Clone)]
pub struct TestMessage {
    pub id: u64,
    pub attempt: u32,
    pub topic: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
    pub publish_time: SystemTime,
}

impl TestMessage {
    /// A first attempt of `payload` on `topic`, id 1, published now.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Self {
            id: 1,
            attempt: 1,
            topic: topic.into(),
            payload: payload.into(),
            headers: Vec::new(),
            publish_time: SystemTime::now(),
        }
    }

    pub fn id(mut self, id: u64) -> Self {
        self.id = id;
        self
    }

    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    pub fn header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((key.into(), value.into()));
        self
    }
}

impl Delivery for TestMessage {
    fn id(&self) -> u64 {
        self.id
    }
    fn attempt(&self) -> u32 {
        self.attempt
    }
    fn topic(&self) -> &str {
        &self.topic
    }
    fn payload(&self) -> &[u8] {
        &self.payload
    }
    fn publish_time_unix_nanos(&self) -> u64 {
        let since = self
            .publish_time
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(since.as_nanos()).unwrap_or(u64::MAX)
    }
    fn header_count(&self) -> usize {
        self.headers.len()
    }
    fn header_at(&self, index: usize) -> (&str, &str) {
        let (key, value) = &self.headers[index];
        (key, value)
    }
}

/// A [`Message`] over `message`, for calling a plugin's `handle` directly (without the
/// entry points a [`Harness`] goes through).
pub fn message(message: TestMessage) -> Message {
    Message::from_raw(hosting::message_handle(Arc::new(message)))
}

/// One log event a plugin recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRecord {
    pub level: Level,
    pub target: String,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

/// One message a plugin published.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub topic: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// The recording host behind a [`Harness`]: every level is enabled, every publish accepted
/// (with ids 1, 2, …) unless [`Harness::refuse_publish`] says otherwise.
#[derive(Debug)]
struct TestServices {
    instance: String,
    generation: u64,
    state: Mutex<Recorded>,
    settlements: Settlements,
}

#[derive(Debug, Default)]
struct Recorded {
    logs: Vec<LogRecord>,
    published: Vec<Published>,
    refuse: Option<PublishError>,
}

impl TestServices {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn owned_pairs(pairs: &[KeyValue<'_>]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().to_owned()))
        .collect()
}

impl Services for TestServices {
    fn instance_name(&self) -> &str {
        &self.instance
    }
    fn generation(&self) -> u64 {
        self.generation
    }
    fn log_enabled(&self, _: Level) -> bool {
        true
    }
    fn log(&self, level: Level, target: &str, message: &str, fields: &[KeyValue<'_>]) {
        self.lock().logs.push(LogRecord {
            level,
            target: target.to_owned(),
            message: message.to_owned(),
            fields: owned_pairs(fields),
        });
    }
    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError> {
        let mut state = self.lock();
        if let Some(refusal) = &state.refuse {
            return Err(refusal.clone());
        }
        state.published.push(Published {
            topic: topic.to_owned(),
            payload: payload.to_vec(),
            headers: owned_pairs(headers),
        });
        Ok(MessageId(state.published.len() as u64))
    }
}

/// How a deferred attempt ended in a [`Harness`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// Settled through its token (Ack, Retry or Reject), or returned by `handle` itself.
    Outcome(Outcome),
    /// An async handler's future panicked: the panic text.
    Panicked(String),
    /// The token was dropped unsettled (the daemon counts a `dropped` failure).
    Dropped,
}

/// The settlements of a harness's deferred attempts, by (message id, attempt).
#[derive(Debug, Default)]
struct Settlements {
    ended: Mutex<HashMap<(u64, u32), Settled>>,
    changed: Condvar,
}

impl Settlements {
    fn record(&self, key: (u64, u32), settled: Settled) {
        self.ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key, settled);
        self.changed.notify_all();
    }
}

/// A test message as the harness hands it out: its token can be taken during `handle`.
struct Handed {
    message: TestMessage,
    taken: AtomicBool,
    services: Arc<TestServices>,
}

impl Delivery for Handed {
    fn id(&self) -> u64 {
        self.message.id
    }
    fn attempt(&self) -> u32 {
        self.message.attempt
    }
    fn topic(&self) -> &str {
        &self.message.topic
    }
    fn payload(&self) -> &[u8] {
        &self.message.payload
    }
    fn publish_time_unix_nanos(&self) -> u64 {
        self.message.publish_time_unix_nanos()
    }
    fn header_count(&self) -> usize {
        self.message.headers.len()
    }
    fn header_at(&self, index: usize) -> (&str, &str) {
        self.message.header_at(index)
    }
    fn defer(&self) -> Option<RawToken> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        Some(hosting::token_handle(Arc::new(TestToken {
            key: (self.message.id, self.message.attempt),
            settled: AtomicBool::new(false),
            children: Mutex::default(),
            services: self.services.clone(),
        })))
    }
}

/// The harness's side of one token: children wait for its Ack.
struct TestToken {
    key: (u64, u32),
    settled: AtomicBool,
    children: Mutex<Vec<Published>>,
    services: Arc<TestServices>,
}

impl Completion for TestToken {
    fn settle(&self, outcome: Result<Outcome, CallError>) -> Result<(), SettleError> {
        if self.settled.swap(true, Ordering::AcqRel) {
            return Err(SettleError {
                kind: SettleErrorKind::Stale,
                message: "this attempt was already settled".to_owned(),
            });
        }
        let settled = match outcome {
            Ok(outcome) => {
                if outcome == Outcome::Ack {
                    let children = std::mem::take(
                        &mut *self.children.lock().unwrap_or_else(|p| p.into_inner()),
                    );
                    self.services.lock().published.extend(children);
                }
                Settled::Outcome(outcome)
            }
            Err(e) => Settled::Panicked(e.message),
        };
        self.services.settlements.record(self.key, settled);
        Ok(())
    }

    fn keep_alive(&self) -> Result<(), SettleError> {
        if self.settled.load(Ordering::Acquire) {
            return Err(SettleError {
                kind: SettleErrorKind::Stale,
                message: "this attempt was already settled".to_owned(),
            });
        }
        Ok(())
    }

    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError> {
        if let Some(refusal) = &self.services.lock().refuse {
            return Err(refusal.clone());
        }
        self.children
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Published {
                topic: topic.to_owned(),
                payload: payload.to_vec(),
                headers: owned_pairs(headers),
            });
        Ok(MessageId(0))
    }

    fn release(&self) {
        if !self.settled.swap(true, Ordering::AcqRel) {
            self.services.settlements.record(self.key, Settled::Dropped);
        }
    }
}

/// A plugin instance under test, called through the real entry points.
pub struct Harness<P: Plugin> {
    instance: Option<Instance>,
    services: Arc<TestServices>,
    _plugin: PhantomData<fn() -> P>,
}

impl<P: Plugin> std::fmt::Debug for Harness<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("plugin", &P::NAME)
            .field("instance", &self.services.instance)
            .finish_non_exhaustive()
    }
}

extern "C" fn no_manifest() -> abi_stable::std_types::RSlice<'static, u8> {
    abi_stable::std_types::RSlice::from_slice(&[])
}

impl<P: Plugin> Harness<P> {
    /// Instantiates `P` with `config` (the JSON form of its `config` table) as instance
    /// `"test"`, generation 1.
    ///
    /// # Errors
    /// The config error, `new` error or panic text, as the daemon would see it.
    pub fn new(config: serde_json::Value) -> Result<Self, CallError> {
        Self::with_identity(config, "test", 1)
    }

    /// [`Harness::new`] with a chosen instance name and generation.
    ///
    /// # Errors
    /// As [`Harness::new`].
    pub fn with_identity(
        config: serde_json::Value,
        instance: &str,
        generation: u64,
    ) -> Result<Self, CallError> {
        let services = Arc::new(TestServices {
            instance: instance.to_owned(),
            generation,
            state: Mutex::default(),
            settlements: Settlements::default(),
        });
        // The plugin runs in this process: keep the test's own panic output.
        bridge::hosted_in_process();
        let module: PluginModRef = export::root_module::<P>(no_manifest);
        // SAFETY: the module's code is linked into this process; it is never unloaded.
        let instance = unsafe {
            Instance::create(
                module,
                &config.to_string(),
                hosting::host_handle(services.clone()),
            )
        }?;
        Ok(Self {
            instance: Some(instance),
            services,
            _plugin: PhantomData,
        })
    }

    fn instance(&mut self) -> &mut Instance {
        self.instance
            .as_mut()
            .expect("the harness holds its instance until shutdown consumes the harness")
    }

    /// Hands `message` to the plugin's `handle`.
    ///
    /// # Errors
    /// The panic text if `handle` panicked.
    ///
    /// A plugin that deferred returns [`Outcome::Defer`]: see [`Harness::settled`].
    pub fn handle(&mut self, message: TestMessage) -> Result<Outcome, CallError> {
        let raw = hosting::message_handle(Arc::new(Handed {
            message,
            taken: AtomicBool::new(false),
            services: self.services.clone(),
        }));
        self.instance().handle(raw)
    }

    /// Hands `message` to `handle` and, if it deferred, waits up to `timeout` for its token
    /// to be settled: runs an async handler to completion. `None` on timeout.
    ///
    /// # Errors
    /// The panic text if `handle` itself panicked.
    pub fn handle_to_end(
        &mut self,
        message: TestMessage,
        timeout: Duration,
    ) -> Result<Option<Settled>, CallError> {
        let key = (message.id, message.attempt);
        match self.handle(message)? {
            Outcome::Defer => Ok(self.wait_settled(key.0, key.1, timeout)),
            outcome => Ok(Some(Settled::Outcome(outcome))),
        }
    }

    /// How attempt `attempt` of message `id` was settled through its token, if it was.
    pub fn settled(&self, id: u64, attempt: u32) -> Option<Settled> {
        self.services
            .settlements
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&(id, attempt))
            .cloned()
    }

    /// Waits up to `timeout` for attempt `attempt` of message `id` to be settled through its
    /// token (from any thread).
    pub fn wait_settled(&self, id: u64, attempt: u32, timeout: Duration) -> Option<Settled> {
        let deadline = Instant::now() + timeout;
        let settlements = &self.services.settlements;
        let mut ended = settlements.ended.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(settled) = ended.get(&(id, attempt)) {
                return Some(settled.clone());
            }
            let left = deadline.checked_duration_since(Instant::now())?;
            ended = settlements
                .changed
                .wait_timeout(ended, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Makes every later `publish` fail with `error`.
    pub fn refuse_publish(&self, error: PublishError) {
        self.services.lock().refuse = Some(error);
    }

    /// Everything the plugin logged so far (through `tracing`, `Host::log` or a panic).
    pub fn logs(&self) -> Vec<LogRecord> {
        self.services.lock().logs.clone()
    }

    /// Everything the plugin published so far.
    pub fn published(&self) -> Vec<Published> {
        self.services.lock().published.clone()
    }

    /// Runs the plugin's `shutdown`.
    ///
    /// # Errors
    /// The panic text if `shutdown` panicked.
    pub fn shutdown(mut self) -> Result<(), CallError> {
        self.instance
            .take()
            .expect("the harness holds its instance until shutdown consumes the harness")
            .shutdown()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{BoxError, Host, PublishErrorKind, hosting::CallErrorKind};

    /// Echoes what it reads back as the retry reason, so every accessor is observable.
    struct Inspect {
        host: Host,
    }

    #[derive(serde::Deserialize)]
    struct InspectConfig {
        fail_new: bool,
    }

    impl Plugin for Inspect {
        const NAME: &'static str = "inspect";
        const VERSION: &'static str = "9.9.9";
        type Config = InspectConfig;

        fn new(config: InspectConfig, host: Host) -> Result<Self, BoxError> {
            if config.fail_new {
                return Err("refused by config".into());
            }
            Ok(Self { host })
        }

        fn handle(&mut self, msg: Message) -> Outcome {
            match msg.topic() {
                "panic" => panic!("boom at attempt {}", msg.attempt()),
                "publish" => {
                    match self
                        .host
                        .publish_with_headers("out", msg.payload(), &[("h", "v")])
                    {
                        Ok(id) => Outcome::retry(format!("published {id}")),
                        Err(e) => Outcome::reject(format!("{:?}: {}", e.kind, e.message)),
                    }
                }
                _ => {
                    let copy = msg.clone();
                    drop(msg);
                    let headers: Vec<String> =
                        copy.headers().map(|(k, v)| format!("{k}={v}")).collect();
                    let since_epoch = copy.publish_time().duration_since(UNIX_EPOCH).unwrap();
                    Outcome::retry_after(
                        Duration::from_secs(copy.attempt().into()),
                        format!(
                            "id={} topic={} payload={} headers={} first-b={:?} missing={:?} \
                             t={} host={}#{}",
                            copy.id(),
                            copy.topic(),
                            String::from_utf8_lossy(copy.payload()),
                            headers.join(","),
                            copy.header("b"),
                            copy.header("zz"),
                            since_epoch.as_secs(),
                            self.host.instance_name(),
                            self.host.generation(),
                        ),
                    )
                }
            }
        }
    }

    fn harness() -> Harness<Inspect> {
        Harness::with_identity(serde_json::json!({"fail_new": false}), "inst", 4).unwrap()
    }

    #[test]
    fn every_message_accessor_reads_through_the_handle() {
        let mut h = harness();
        let mut message = TestMessage::new("a.b", "pay")
            .id(42)
            .attempt(3)
            .header("a", "1")
            .header("b", "2")
            .header("b", "3");
        message.publish_time = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(
            h.handle(message),
            Ok(Outcome::Retry {
                after: Some(Duration::from_secs(3)),
                reason: "id=42 topic=a.b payload=pay headers=a=1,b=2,b=3 first-b=Some(\"2\") \
                         missing=None t=1700000000 host=inst#4"
                    .to_owned()
            })
        );
    }

    #[test]
    fn a_panic_in_handle_is_a_failed_call_and_the_instance_keeps_working() {
        let mut h = harness();
        let e = h
            .handle(TestMessage::new("panic", "").attempt(2))
            .unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Panic);
        assert!(e.message.starts_with("panicked at "), "{}", e.message);
        assert!(e.message.ends_with("boom at attempt 2"), "{}", e.message);
        assert!(
            h.logs()
                .iter()
                .any(|l| l.target == "panic" && l.level == Level::Error)
        );
        assert!(h.handle(TestMessage::new("ok", "")).is_ok());
    }

    #[test]
    fn publish_results_and_refusals_reach_the_plugin() {
        let mut h = harness();
        assert_eq!(
            h.handle(TestMessage::new("publish", "x")),
            Ok(Outcome::retry("published 1"))
        );
        assert_eq!(
            h.published(),
            [Published {
                topic: "out".to_owned(),
                payload: b"x".to_vec(),
                headers: vec![("h".to_owned(), "v".to_owned())],
            }]
        );
        h.refuse_publish(PublishError {
            kind: PublishErrorKind::ResourceExhausted,
            message: "backlog of sink is full".to_owned(),
        });
        assert_eq!(
            h.handle(TestMessage::new("publish", "x")),
            Ok(Outcome::reject(
                "ResourceExhausted: backlog of sink is full"
            ))
        );
    }

    #[test]
    fn new_errors_and_bad_configs_are_reported_with_their_text() {
        let e = Harness::<Inspect>::new(serde_json::json!({"fail_new": true})).unwrap_err();
        assert_eq!(
            (e.kind, e.message.as_str()),
            (CallErrorKind::Error, "refused by config")
        );
        let e = Harness::<Inspect>::new(serde_json::json!({})).unwrap_err();
        assert_eq!(e.kind, CallErrorKind::Config);
        assert!(
            e.message.contains("missing field `fail_new`"),
            "{}",
            e.message
        );
    }

    #[test]
    fn unknown_kinds_from_a_newer_peer_are_kept_apart() {
        use crate::abi::{LogLevel, PublishErrorKind as Raw};
        assert_eq!(
            PublishErrorKind::from_raw(Raw(200)),
            PublishErrorKind::Other(200)
        );
        assert_eq!(PublishErrorKind::Other(200).to_raw(), Raw(200));
        assert_eq!(Level::from_raw(LogLevel(77)), Level::Trace);
        for kind in [
            PublishErrorKind::Invalid,
            PublishErrorKind::ResourceExhausted,
            PublishErrorKind::HopLimit,
            PublishErrorKind::ShuttingDown,
            PublishErrorKind::Unavailable,
        ] {
            assert_eq!(PublishErrorKind::from_raw(kind.to_raw()), kind);
        }
    }

    /// Defers every message and settles it from a thread of its own, as the payload says.
    struct Later {
        threads: Vec<std::thread::JoinHandle<()>>,
    }

    impl Plugin for Later {
        const NAME: &'static str = "later";
        const VERSION: &'static str = "0.1.0";
        const DEFERS: bool = true;
        type Config = ();

        fn new(_: (), _: Host) -> Result<Self, BoxError> {
            Ok(Later {
                threads: Vec::new(),
            })
        }

        fn handle(&mut self, msg: Message) -> Outcome {
            let token = msg.defer();
            self.threads.push(std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                match token.message().payload() {
                    b"ack" => {
                        token.publish("out", b"child").unwrap();
                        token.ack().unwrap();
                    }
                    b"retry" => {
                        token.publish("out", b"never").unwrap();
                        token.retry("later").unwrap();
                    }
                    _ => drop(token),
                }
            }));
            Outcome::Defer
        }

        fn shutdown(self) {
            for thread in self.threads {
                thread.join().unwrap();
            }
        }
    }

    #[test]
    fn a_deferred_attempt_is_settled_from_another_thread_with_its_children() {
        let mut harness = Harness::<Later>::new(serde_json::Value::Null).unwrap();
        assert_eq!(
            harness.handle(TestMessage::new("t", "ack").id(1)),
            Ok(Outcome::Defer)
        );
        assert_eq!(
            harness.wait_settled(1, 1, Duration::from_secs(10)),
            Some(Settled::Outcome(Outcome::Ack))
        );
        assert_eq!(harness.published()[0].payload, b"child");
        let retried = harness
            .handle_to_end(
                TestMessage::new("t", "retry").id(2),
                Duration::from_secs(10),
            )
            .unwrap();
        assert_eq!(retried, Some(Settled::Outcome(Outcome::retry("later"))));
        assert_eq!(harness.published().len(), 1, "a retry commits no child");
        let dropped = harness
            .handle_to_end(TestMessage::new("t", "drop").id(3), Duration::from_secs(10))
            .unwrap();
        assert_eq!(dropped, Some(Settled::Dropped));
        assert_eq!(harness.settled(4, 1), None);
        harness.shutdown().unwrap();
    }

    #[test]
    fn a_plugin_that_takes_no_config_starts_without_a_config_table() {
        // The daemon hands an instance without a `config` table an empty one.
        let mut harness = Harness::<Later>::new(serde_json::json!({})).unwrap();
        assert_eq!(
            harness.handle_to_end(TestMessage::new("t", "ack"), Duration::from_secs(10)),
            Ok(Some(Settled::Outcome(Outcome::Ack)))
        );
        harness.shutdown().unwrap();
        let e = Harness::<Later>::new(serde_json::json!({"x": 1})).unwrap_err();
        assert!(e.message.contains("invalid type: map"), "{}", e.message);
    }
}
