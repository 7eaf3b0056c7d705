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

use std::{
    marker::PhantomData,
    sync::{Arc, Mutex, MutexGuard},
    time::{SystemTime, UNIX_EPOCH},
};

use crate::{
    abi::{KeyValue, PluginModRef},
    export,
    hosting::{self, CallError, Delivery, Instance, Services},
    sdk::{Level, MessageId, Outcome, Plugin, PublishError},
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

/// A plugin instance under test, called through the real entry points.
#[derive(Debug)]
pub struct Harness<P: Plugin> {
    instance: Option<Instance>,
    services: Arc<TestServices>,
    _plugin: PhantomData<fn() -> P>,
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
        });
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
    pub fn handle(&mut self, message: TestMessage) -> Result<Outcome, CallError> {
        let raw = hosting::message_handle(Arc::new(message));
        self.instance().handle(raw)
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
