//! Plugin log events in the daemon's log, with the plugin's fields kept as fields.
//!
//! `tracing` needs every field name, and the event's target, as `&'static str` known at a
//! callsite; a plugin's events carry names only known at run time. So each *shape* of plugin
//! event — (instance, level, the plugin's field names) — gets a callsite of its own, made
//! once and registered with `tracing` like a macro's: text and JSON output then show
//! `retries=3` as a field of its own (not inside one `fields="…"` string), and filters see
//! the event like any other. The target is `plugin::<instance>`, so a filter directive
//! `plugin::enricher=debug` (`ctl log-level enricher=debug` writes it so) reaches exactly
//! that instance's events, and `log_enabled` answers the plugin's own level checks with it.
//!
//! Shapes are bounded ([`MAX_SHAPES`]): past that, an event's fields are joined into one
//! `fields` field of its instance's catch-all shape, so a plugin that invents field names
//! cannot make the daemon leak without end.

use std::{
    collections::HashMap,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicU8, Ordering},
    },
};

use tracing_core::{
    Event, Kind, Level, Metadata,
    callsite::{Callsite, Identifier},
    field::{DisplayValue, Field, FieldSet, Value, display},
    subscriber::Interest,
};

/// Distinct shapes kept at most (each is a small leaked allocation, for good).
const MAX_SHAPES: usize = 4096;
/// Fields of the plugin's own an event keeps as fields (the rest are joined into `fields`).
const MAX_FIELDS: usize = 32;
/// The fields every plugin event carries before the plugin's own.
const FIXED: [&str; 6] = [
    "message",
    "instance",
    "plugin",
    "version",
    "generation",
    "plugin_target",
];
/// Value slots of one event: the fixed fields, the plugin's, and `fields`.
const SLOTS: usize = FIXED.len() + MAX_FIELDS + 1;

/// The callsite of one shape.
struct Shape {
    meta: OnceLock<Metadata<'static>>,
    interest: AtomicU8,
}

impl Callsite for Shape {
    fn set_interest(&self, interest: Interest) {
        let value = if interest.is_never() {
            0
        } else if interest.is_always() {
            2
        } else {
            1
        };
        self.interest.store(value, Ordering::Relaxed);
    }

    fn metadata(&self) -> &Metadata<'_> {
        self.meta
            .get()
            .expect("a shape gets its metadata when it is made")
    }
}

impl Shape {
    /// Whether no subscriber wants events of this shape (a fast no).
    fn never(&self) -> bool {
        self.interest.load(Ordering::Relaxed) == 0
    }
}

#[derive(PartialEq, Eq, Hash)]
struct Key {
    instance: String,
    level: Level,
    /// The plugin's field names, in order; `None`: the catch-all shape.
    names: Option<Vec<String>>,
}

fn leak(text: &str) -> &'static str {
    Box::leak(text.to_owned().into_boxed_str())
}

/// The callsite of `key`, made and registered on first use.
fn shape(key: Key) -> &'static Shape {
    static SHAPES: OnceLock<Mutex<HashMap<Key, &'static Shape>>> = OnceLock::new();
    let shapes = SHAPES.get_or_init(Mutex::default);
    let mut shapes = shapes.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(shape) = shapes.get(&key) {
        return shape;
    }
    let key = if shapes.len() >= MAX_SHAPES && key.names.is_some() {
        let fallback = Key { names: None, ..key };
        if let Some(shape) = shapes.get(&fallback) {
            return shape;
        }
        fallback
    } else {
        key
    };
    let mut names: Vec<&'static str> = FIXED.to_vec();
    match &key.names {
        Some(own) => names.extend(own.iter().map(|n| leak(n))),
        None => names.push("fields"),
    }
    let names: &'static [&'static str] = Box::leak(names.into_boxed_slice());
    let made: &'static Shape = Box::leak(Box::new(Shape {
        meta: OnceLock::new(),
        interest: AtomicU8::new(1),
    }));
    let _ = made.meta.set(Metadata::new(
        "plugin event",
        leak(&format!("plugin::{}", key.instance)),
        key.level,
        None,
        None,
        None,
        FieldSet::new(names, Identifier(made)),
        Kind::EVENT,
    ));
    tracing_core::callsite::register(made);
    shapes.insert(key, made);
    made
}

fn level_of(level: plugind_api::Level) -> Level {
    match level {
        plugind_api::Level::Error => Level::ERROR,
        plugind_api::Level::Warn => Level::WARN,
        plugind_api::Level::Info => Level::INFO,
        plugind_api::Level::Debug => Level::DEBUG,
        plugind_api::Level::Trace => Level::TRACE,
    }
}

/// The level checks of one instance: a plugin asks before every event it might log, so the
/// callsites they consult are found once (not with a lock and an allocation per check).
#[derive(Debug, Default)]
pub struct Levels {
    instance: String,
    /// By level, most severe first; made on first use.
    shapes: [OnceLock<&'static Shape>; 5],
}

impl std::fmt::Debug for Shape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shape").finish_non_exhaustive()
    }
}

impl Levels {
    pub fn new(instance: &str) -> Self {
        Self {
            instance: instance.to_owned(),
            shapes: Default::default(),
        }
    }

    /// Whether an event of this instance at `level` would be recorded (the plugin's own
    /// level checks ask this).
    pub fn enabled(&self, level: plugind_api::Level) -> bool {
        let level = level_of(level);
        if level > tracing_core::LevelFilter::current() {
            return false;
        }
        let slot = match level {
            Level::ERROR => 0,
            Level::WARN => 1,
            Level::INFO => 2,
            Level::DEBUG => 3,
            _ => 4,
        };
        let shape = *self.shapes[slot].get_or_init(|| {
            shape(Key {
                instance: self.instance.clone(),
                level,
                names: Some(Vec::new()),
            })
        });
        !shape.never() && tracing_core::dispatcher::get_default(|d| d.enabled(shape.metadata()))
    }
}

/// Who logged a plugin event: the tags every plugin event carries.
#[derive(Debug, Clone, Copy)]
pub struct Tags<'a> {
    pub instance: &'a str,
    pub plugin: &'a str,
    pub version: &'a str,
    pub generation: u64,
}

/// Records one plugin event: its message, who logged it, and the plugin's fields as fields.
pub fn emit(
    id: Tags<'_>,
    level: plugind_api::Level,
    target: &str,
    message: &str,
    fields: &[(&str, &str)],
) {
    let level = level_of(level);
    if level > tracing_core::LevelFilter::current() {
        return;
    }
    let own = fields.len().min(MAX_FIELDS);
    // The same name twice cannot be two fields of one callsite: those go to `fields`.
    let distinct = {
        let mut seen: Vec<&str> = FIXED.to_vec();
        fields[..own].iter().all(|(name, _)| {
            let fresh = !seen.contains(name);
            seen.push(name);
            fresh
        })
    };
    let keep = if distinct { own } else { 0 };
    let shape = shape(Key {
        instance: id.instance.to_owned(),
        level,
        names: distinct.then(|| fields[..own].iter().map(|(n, _)| (*n).to_owned()).collect()),
    });
    if shape.never() {
        return;
    }
    let meta = shape.metadata();
    let set = meta.fields();
    // A catch-all shape (too many shapes) keeps none of the plugin's fields as fields.
    let keep = if set.len() == FIXED.len() + 1 && set.field("fields").is_some() {
        0
    } else {
        keep
    };
    let rest: String = fields[keep..]
        .iter()
        .map(|(name, value)| format!("{name}={value}"))
        .collect::<Vec<_>>()
        .join(" ");
    // Shown as text does `%`: `instance=a`, not `instance="a"`.
    let generation = id.generation;
    let (message, instance, plugin, version, target) = (
        display(message),
        display(id.instance),
        display(id.plugin),
        display(id.version),
        display(target),
    );
    let fixed: [&dyn Value; 6] = [&message, &instance, &plugin, &version, &generation, &target];
    let all: Vec<Field> = set.iter().collect();
    let mut slots: [(&Field, Option<&dyn Value>); SLOTS] = [(&all[0], None); SLOTS];
    for (i, value) in fixed.iter().enumerate() {
        slots[i] = (&all[i], Some(*value));
    }
    let values: Vec<DisplayValue<&str>> = fields[..keep].iter().map(|(_, v)| display(*v)).collect();
    for (i, value) in values.iter().enumerate() {
        slots[FIXED.len() + i] = (&all[FIXED.len() + i], Some(value as &dyn Value));
    }
    let rest = display(rest.as_str());
    let rest_field = set.field("fields");
    if let Some(field) = &rest_field
        && keep < fields.len()
    {
        slots[SLOTS - 1] = (field, Some(&rest as &dyn Value));
    }
    let values = set.value_set(&slots);
    tracing_core::dispatcher::get_default(|dispatch| {
        if dispatch.enabled(meta) {
            dispatch.event(&Event::new(meta, &values));
        }
    });
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_subscriber::layer::SubscriberExt as _;

    use super::*;

    /// Captures the JSON lines of a subscriber with `filter`.
    fn capture(filter: &str, body: impl FnOnce()) -> Vec<serde_json::Value> {
        #[derive(Clone, Default)]
        struct Sink(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Sink {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let sink = Sink::default();
        let writer = sink.clone();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_subscriber::EnvFilter::new(filter))
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(move || writer.clone()),
            );
        tracing::subscriber::with_default(subscriber, || {
            tracing_core::callsite::rebuild_interest_cache();
            body();
        });
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn identity(instance: &str) -> Tags<'_> {
        Tags {
            instance,
            plugin: "enrich",
            version: "1.2.3",
            generation: 4,
        }
    }

    #[test]
    fn a_plugins_fields_are_fields_of_their_own_in_json() {
        let lines = capture("info", || {
            emit(
                identity("enricher"),
                plugind_api::Level::Info,
                "enrich::http",
                "looked up",
                &[("customer", "c42"), ("retries", "3")],
            );
        });
        assert_eq!(lines.len(), 1, "{lines:?}");
        let line = &lines[0];
        assert_eq!(line["target"], "plugin::enricher");
        let fields = &line["fields"];
        assert_eq!(fields["message"], "looked up");
        assert_eq!(fields["customer"], "c42");
        assert_eq!(fields["retries"], "3");
        assert_eq!(fields["instance"], "enricher");
        assert_eq!(fields["generation"], 4);
        assert_eq!(fields["plugin_target"], "enrich::http");
        assert!(fields.get("fields").is_none(), "{line}");
    }

    #[test]
    fn a_filter_per_instance_reaches_the_plugins_own_level_checks() {
        let mut seen = None;
        let (chatty, quiet) = (Levels::new("chatty"), Levels::new("quiet"));
        let lines = capture("info,plugin::chatty=debug", || {
            seen = Some((
                chatty.enabled(plugind_api::Level::Debug),
                quiet.enabled(plugind_api::Level::Debug),
                quiet.enabled(plugind_api::Level::Info),
            ));
            for instance in ["chatty", "quiet"] {
                emit(
                    identity(instance),
                    plugind_api::Level::Debug,
                    "t",
                    "details",
                    &[],
                );
            }
        });
        assert_eq!(seen, Some((true, false, true)));
        assert_eq!(lines.len(), 1, "{lines:?}");
        assert_eq!(lines[0]["fields"]["instance"], "chatty");
    }

    #[test]
    fn repeated_names_are_joined_into_one_field() {
        let lines = capture("info", || {
            emit(
                identity("dup"),
                plugind_api::Level::Warn,
                "t",
                "twice",
                &[("k", "1"), ("k", "2"), ("message", "x")],
            );
        });
        assert_eq!(lines[0]["fields"]["fields"], "k=1 k=2 message=x");
        assert_eq!(lines[0]["fields"]["message"], "twice");
    }
}
