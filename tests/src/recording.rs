//! Host services for tests: record every log event and publish of an instance, each tagged
//! with the instance name, plugin version and generation the host passed at instantiation.

use std::sync::{Arc, Mutex, MutexGuard};

use plugind_api::{
    Level, MessageId, PublishError,
    abi::KeyValue,
    hosting::{self, Services},
};

/// One log event, with the tags the host adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Logged {
    pub instance: String,
    pub plugin_version: String,
    pub generation: u64,
    pub level: Level,
    pub target: String,
    pub message: String,
    pub fields: Vec<(String, String)>,
}

impl Logged {
    /// The value of field `name`, if the event has it.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Recording services for one instance.
#[derive(Debug)]
pub struct Recorder {
    instance: String,
    plugin_version: String,
    generation: u64,
    logs: Mutex<Vec<Logged>>,
    published: Mutex<Vec<(String, Vec<u8>)>>,
}

impl Recorder {
    pub fn new(instance: &str, plugin_version: &str, generation: u64) -> Arc<Self> {
        Arc::new(Self {
            instance: instance.to_owned(),
            plugin_version: plugin_version.to_owned(),
            generation,
            logs: Mutex::default(),
            published: Mutex::default(),
        })
    }

    /// A services handle for instantiating a plugin.
    pub fn handle(self: &Arc<Self>) -> plugind_api::abi::RawHost {
        hosting::host_handle(self.clone())
    }

    pub fn logs(&self) -> Vec<Logged> {
        lock(&self.logs).clone()
    }

    pub fn published(&self) -> Vec<(String, Vec<u8>)> {
        lock(&self.published).clone()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl Services for Recorder {
    fn instance_name(&self) -> &str {
        &self.instance
    }

    fn generation(&self) -> u64 {
        self.generation
    }

    fn log_enabled(&self, _level: Level) -> bool {
        true
    }

    fn log(&self, level: Level, target: &str, message: &str, fields: &[KeyValue<'_>]) {
        lock(&self.logs).push(Logged {
            instance: self.instance.clone(),
            plugin_version: self.plugin_version.clone(),
            generation: self.generation,
            level,
            target: target.to_owned(),
            message: message.to_owned(),
            fields: fields
                .iter()
                .map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().to_owned()))
                .collect(),
        });
    }

    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        _headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError> {
        let mut published = lock(&self.published);
        published.push((topic.to_owned(), payload.to_vec()));
        Ok(MessageId(published.len() as u64))
    }
}
