//! The host services of one instance generation, lent to its plugin through the ABI: its
//! identity, logging into the daemon's log tagged with instance, plugin, version and
//! generation (`plugin_log`: the plugin's fields as fields, target `plugin::<instance>`),
//! and publishing.
//!
//! Publishing inside `handle` (on the actor's thread, during the call) *stages* the child:
//! it travels back with the attempt's settlement and is committed only if the attempt acks,
//! so a retried parent never duplicates its children. Publishing anywhere else goes to the
//! [`Publisher`] (the ingress) and returns once the message is accepted. Every child carries
//! its parent's hop count plus one; past `hop_limit` the publish is refused.

use std::{cell::RefCell, sync::Arc};

use bytes::Bytes;
use plugind_api::{
    Level, MessageId, PublishError, PublishErrorKind, abi::KeyValue, hosting::Services,
};

use crate::message::{self, HOP_HEADER};

/// Who an instance generation is, for its log lines and its plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub instance: String,
    pub plugin: String,
    pub version: String,
    pub generation: u64,
}

/// A message published by plugin code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Child {
    pub topic: String,
    pub payload: Bytes,
    pub headers: Vec<(String, String)>,
}

/// Where messages published outside `handle` go.
pub trait Publisher: Send + Sync + 'static {
    /// Accepts `child` under the configured durability, or says why not.
    ///
    /// # Errors
    /// [`PublishError`] when the message is refused.
    fn publish(&self, child: Child) -> Result<MessageId, PublishError>;

    /// Whether a message to `topic` would be taken now (`unrouted = "refuse"` refuses the
    /// ones no instance subscribes to); a child staged inside `handle` is checked here.
    ///
    /// # Errors
    /// [`PublishError`] saying why it would be refused.
    fn admits(&self, topic: &str) -> Result<(), PublishError> {
        let _ = topic;
        Ok(())
    }
}

/// The limits a publish is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishLimits {
    pub max_message_size: u64,
    pub hop_limit: u32,
}

/// The services of one instance generation.
pub struct InstanceServices {
    identity: Identity,
    limits: PublishLimits,
    publisher: Arc<dyn Publisher>,
    /// Worker threads for an async plugin's runtime (`workers`; 0: the SDK's default).
    workers: u32,
    /// Its plugin's level checks.
    levels: crate::plugin_log::Levels,
}

impl std::fmt::Debug for InstanceServices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InstanceServices")
            .field("identity", &self.identity)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

/// The children of the `handle` call in progress on this thread.
struct Stage {
    /// The services the call belongs to (their address), so that another instance's plugin
    /// publishing on this thread is not mistaken for this call.
    owner: usize,
    parent_hops: u32,
    children: Vec<Child>,
}

thread_local! {
    static STAGE: RefCell<Option<Stage>> = const { RefCell::new(None) };
}

impl InstanceServices {
    pub fn new(
        identity: Identity,
        limits: PublishLimits,
        publisher: Arc<dyn Publisher>,
    ) -> Arc<Self> {
        Arc::new(Self {
            levels: crate::plugin_log::Levels::new(&identity.instance),
            identity,
            limits,
            publisher,
            workers: 0,
        })
    }

    /// The same services with `workers` worker threads for an async plugin's runtime.
    pub fn with_workers(mut self: Arc<Self>, workers: u32) -> Arc<Self> {
        if let Some(services) = Arc::get_mut(&mut self) {
            services.workers = workers;
        }
        self
    }

    pub fn identity(&self) -> &Identity {
        &self.identity
    }

    /// Runs `call` (a `handle` of this instance, on this thread) with publishing staged;
    /// returns its result and the children it published.
    pub fn staged<R>(
        self: &Arc<Self>,
        parent_hops: u32,
        call: impl FnOnce() -> R,
    ) -> (R, Vec<Child>) {
        let owner = Arc::as_ptr(self) as usize;
        STAGE.with(|stage| {
            *stage.borrow_mut() = Some(Stage {
                owner,
                parent_hops,
                children: Vec::new(),
            });
        });
        let result = call();
        let children = STAGE
            .with(|stage| stage.borrow_mut().take())
            .map(|stage| stage.children)
            .unwrap_or_default();
        (result, children)
    }

    /// A child of an attempt, `hops` deep, checked as the ingress will check it when its
    /// parent's ack commits it (a child refused then would be lost): staged in `handle`, or
    /// published through a deferred attempt's token.
    ///
    /// # Errors
    /// [`PublishError`] saying why it would be refused.
    pub fn child(
        &self,
        hops: u32,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<Child, PublishError> {
        let headers = with_hops(headers, hops);
        self.check(topic, payload, &headers, hops)?;
        self.publisher.admits(topic)?;
        Ok(Child {
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
            headers,
        })
    }

    fn refuse(kind: PublishErrorKind, message: String) -> PublishError {
        PublishError { kind, message }
    }

    /// The ingress's rules, checked before a child is staged (a child the ingress refused
    /// at its parent's ack would be lost): topic, header and size bounds — with the hop
    /// header it will carry — and the hop limit.
    fn check(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[(String, String)],
        hops: u32,
    ) -> Result<(), PublishError> {
        message::validate(
            topic,
            payload.len(),
            headers,
            None,
            self.limits.max_message_size,
        )
        .map_err(|e| Self::refuse(PublishErrorKind::Invalid, e))?;
        if hops > self.limits.hop_limit {
            return Err(Self::refuse(
                PublishErrorKind::HopLimit,
                format!(
                    "this message would be hop {hops}, over hop_limit {} (a pipeline loop?)",
                    self.limits.hop_limit
                ),
            ));
        }
        Ok(())
    }
}

fn with_hops(headers: &[KeyValue<'_>], hops: u32) -> Vec<(String, String)> {
    let mut owned: Vec<(String, String)> = headers
        .iter()
        .filter(|kv| kv.key.as_str() != HOP_HEADER)
        .map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().to_owned()))
        .collect();
    if hops > 0 {
        owned.push((HOP_HEADER.to_owned(), hops.to_string()));
    }
    owned
}

impl Services for InstanceServices {
    fn instance_name(&self) -> &str {
        &self.identity.instance
    }

    fn generation(&self) -> u64 {
        self.identity.generation
    }

    fn workers(&self) -> u32 {
        self.workers
    }

    fn log_enabled(&self, level: Level) -> bool {
        self.levels.enabled(level)
    }

    fn log(&self, level: Level, target: &str, message: &str, fields: &[KeyValue<'_>]) {
        let fields: Vec<(&str, &str)> = fields
            .iter()
            .map(|kv| (kv.key.as_str(), kv.value.as_str()))
            .collect();
        let id = &self.identity;
        let tags = crate::plugin_log::Tags {
            instance: &id.instance,
            plugin: &id.plugin,
            version: &id.version,
            generation: id.generation,
        };
        crate::plugin_log::emit(tags, level, target, message, &fields);
    }

    fn publish(
        &self,
        topic: &str,
        payload: &[u8],
        headers: &[KeyValue<'_>],
    ) -> Result<MessageId, PublishError> {
        let owner = self as *const Self as usize;
        let staged_hops = STAGE.with(|stage| {
            stage
                .borrow()
                .as_ref()
                .filter(|s| s.owner == owner)
                .map(|s| s.parent_hops + 1)
        });
        if let Some(hops) = staged_hops {
            let child = self.child(hops, topic, payload, headers)?;
            STAGE.with(|stage| {
                if let Some(stage) = stage.borrow_mut().as_mut() {
                    stage.children.push(child);
                }
            });
            // Its id is assigned when the parent's settlement commits it.
            return Ok(MessageId(0));
        }
        let hops = headers
            .iter()
            .find(|kv| kv.key.as_str() == HOP_HEADER)
            .and_then(|kv| kv.value.as_str().parse::<u32>().ok())
            .unwrap_or(0);
        let headers = with_hops(headers, hops);
        self.check(topic, payload, &headers, hops)?;
        self.publisher.publish(Child {
            topic: topic.to_owned(),
            payload: Bytes::copy_from_slice(payload),
            headers,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Recording(Mutex<Vec<Child>>);

    impl Publisher for Recording {
        fn publish(&self, child: Child) -> Result<MessageId, PublishError> {
            let mut list = self.0.lock().unwrap();
            list.push(child);
            Ok(MessageId(list.len() as u64))
        }
    }

    fn services(publisher: Arc<Recording>) -> Arc<InstanceServices> {
        InstanceServices::new(
            Identity {
                instance: "sink".into(),
                plugin: "file-sink".into(),
                version: "1.0.0".into(),
                generation: 3,
            },
            PublishLimits {
                max_message_size: 64,
                hop_limit: 2,
            },
            publisher,
        )
    }

    #[test]
    fn inside_handle_children_are_staged_with_the_next_hop() {
        let publisher = Arc::new(Recording::default());
        let s = services(publisher.clone());
        let (result, children) =
            s.staged(1, || s.publish("out.a", b"x", &[KeyValue::new("k", "v")]));
        assert_eq!(result, Ok(MessageId(0)));
        assert_eq!(
            children,
            [Child {
                topic: "out.a".into(),
                payload: Bytes::from_static(b"x"),
                headers: vec![("k".into(), "v".into()), (HOP_HEADER.into(), "2".into())],
            }]
        );
        assert!(
            publisher.0.lock().unwrap().is_empty(),
            "nothing went to the ingress"
        );
    }

    #[test]
    fn outside_handle_a_publish_goes_to_the_publisher() {
        let publisher = Arc::new(Recording::default());
        let s = services(publisher.clone());
        assert_eq!(s.publish("out.a", b"x", &[]), Ok(MessageId(1)));
        // Another instance's staged call on this thread does not capture it either.
        let other = services(Arc::new(Recording::default()));
        let (_, staged) = other.staged(0, || s.publish("out.b", b"y", &[]));
        assert!(staged.is_empty());
        assert_eq!(publisher.0.lock().unwrap().len(), 2);
    }

    #[test]
    fn a_publish_from_another_thread_during_handle_is_not_staged() {
        let publisher = Arc::new(Recording::default());
        let s = services(publisher.clone());
        let (result, staged) = s.staged(0, || {
            let s = s.clone();
            std::thread::spawn(move || s.publish("out.a", b"x", &[]))
                .join()
                .unwrap()
        });
        assert_eq!(result, Ok(MessageId(1)));
        assert!(staged.is_empty());
        assert_eq!(publisher.0.lock().unwrap().len(), 1);
    }

    #[test]
    fn limits_refuse_with_the_right_kind() {
        let s = services(Arc::new(Recording::default()));
        let (result, children) = s.staged(2, || s.publish("loop.again", b"x", &[]));
        assert_eq!(result.unwrap_err().kind, PublishErrorKind::HopLimit);
        assert!(children.is_empty());
        let e = s.publish("bad..topic", b"x", &[]).unwrap_err();
        assert_eq!(e.kind, PublishErrorKind::Invalid);
        assert!(e.message.contains("empty token"), "{}", e.message);
        let e = s.publish("ok", &[0; 65], &[]).unwrap_err();
        assert!(
            e.message.contains("over max_message_size (64 bytes)"),
            "{}",
            e.message
        );
    }

    #[test]
    fn plugin_publishes_follow_the_ingress_rules_for_topics_and_headers() {
        let publisher = Arc::new(Recording::default());
        let s = InstanceServices::new(
            Identity {
                instance: "sink".into(),
                plugin: "file-sink".into(),
                version: "1.0.0".into(),
                generation: 1,
            },
            PublishLimits {
                max_message_size: 1 << 20,
                hop_limit: 4,
            },
            publisher.clone(),
        );
        let e = s.publish("out.a\u{200b}", b"x", &[]).unwrap_err();
        assert!(
            e.message.contains("invisible format character"),
            "{}",
            e.message
        );
        let e = s
            .publish("out.a", b"x", &[KeyValue::new("", "v")])
            .unwrap_err();
        assert!(e.message.contains("the name is empty"), "{}", e.message);
        let (result, staged) = s.staged(0, || {
            s.publish("out.a", b"x", &[KeyValue::new("bad\rname", "v")])
        });
        assert_eq!(result.unwrap_err().kind, PublishErrorKind::Invalid);
        assert!(staged.is_empty());
        // Headers count in the size, the hop header a staged child will carry included.
        let value = "v".repeat(crate::message::MAX_HEADER_VALUE);
        let headers: Vec<_> = (0..64).map(|_| KeyValue::new("h", &value)).collect();
        let (result, staged) = s.staged(0, || s.publish("out.a", b"x", &headers));
        let e = result.unwrap_err();
        assert!(
            e.message.contains("65 headers, more than 64"),
            "{}",
            e.message
        );
        assert!(staged.is_empty());
        assert!(publisher.0.lock().unwrap().is_empty());
    }
}
