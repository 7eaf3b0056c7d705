//! The `plugins.toml` schema as written: every key optional (defaults and overrides are merged
//! later, field by field), unknown keys refused, values kept with their spans where a later
//! check needs to point at them.

use std::{fmt, time::Duration};

use serde::{Deserialize, Deserializer, de};
use toml::Spanned;

/// `[host]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Host {
    pub(super) plugin_dir: Option<Spanned<String>>,
    pub(super) state_dir: Option<Spanned<String>>,
    pub(super) listen: Option<Spanned<String>>,
    pub(super) metrics: Option<Spanned<String>>,
    pub(super) durability: Option<Durability>,
    pub(super) autoload: Option<bool>,
    pub(super) grace_period: Option<Spanned<HumanDuration>>,
    pub(super) max_message_size: Option<Spanned<Size>>,
    pub(super) watch: Option<WatchMode>,
    pub(super) trusted_owners: Option<Vec<Spanned<String>>>,
    pub(super) socket_mode: Option<Spanned<String>>,
    pub(super) socket_group: Option<String>,
    pub(super) allowed_users: Option<Vec<String>>,
    pub(super) tcp_token_file: Option<Spanned<String>>,
    pub(super) operator_users: Option<Vec<Spanned<String>>>,
    pub(super) operator_groups: Option<Vec<Spanned<String>>>,
    pub(super) tcp_operator_token_file: Option<Spanned<String>>,
    pub(super) tls_cert_file: Option<Spanned<String>>,
    pub(super) tls_key_file: Option<Spanned<String>>,
    pub(super) max_connections: Option<Spanned<u32>>,
    pub(super) idle_timeout: Option<Spanned<HumanDuration>>,
    pub(super) handshake_timeout: Option<Spanned<HumanDuration>>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) max_ledger_bytes: Option<Spanned<Size>>,
    pub(super) dedupe_window: Option<Spanned<HumanDuration>>,
    pub(super) dead_letter_retention: Option<Spanned<HumanDuration>>,
    pub(super) hop_limit: Option<Spanned<u32>>,
    pub(super) unrouted: Option<Unrouted>,
}

/// The per-instance delivery settings: `[defaults]`, and overridable in each instance.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Settings {
    pub(super) queue_capacity: Option<Spanned<u32>>,
    pub(super) max_in_flight: Option<Spanned<u32>>,
    pub(super) ack_timeout: Option<Spanned<HumanDuration>>,
    pub(super) max_attempts: Option<Spanned<u32>>,
    pub(super) backoff: Option<Backoff>,
    pub(super) max_backlog: Option<Spanned<Size>>,
    pub(super) circuit: Option<Circuit>,
    pub(super) init_timeout: Option<Spanned<HumanDuration>>,
    pub(super) shutdown_timeout: Option<Spanned<HumanDuration>>,
    pub(super) hang_grace: Option<Spanned<HumanDuration>>,
    pub(super) max_age: Option<Spanned<MaxAge>>,
    pub(super) workers: Option<Spanned<u32>>,
    pub(super) rate_limit: Option<Spanned<RateLimit>>,
    pub(super) ordering_key: Option<Spanned<String>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Backoff {
    pub(super) initial: Option<Spanned<HumanDuration>>,
    pub(super) max: Option<Spanned<HumanDuration>>,
    pub(super) multiplier: Option<Spanned<f64>>,
    pub(super) jitter: Option<Spanned<f64>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Circuit {
    pub(super) failures: Option<Spanned<u32>>,
    pub(super) window: Option<Spanned<HumanDuration>>,
    pub(super) probe: Option<Spanned<HumanDuration>>,
}

/// `[plugins.<name>]`: the instance's own keys, then any setting override.
///
/// The settings are spelled out again rather than `#[serde(flatten)]`ed: flatten disables
/// `deny_unknown_fields`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Instance {
    pub(super) plugin: Option<Spanned<String>>,
    pub(super) enabled: Option<bool>,
    pub(super) topics: Option<Spanned<Vec<Spanned<String>>>>,
    pub(super) sha256: Option<Spanned<String>>,
    pub(super) config: Option<toml::Table>,
    pub(super) queue_capacity: Option<Spanned<u32>>,
    pub(super) max_in_flight: Option<Spanned<u32>>,
    pub(super) ack_timeout: Option<Spanned<HumanDuration>>,
    pub(super) max_attempts: Option<Spanned<u32>>,
    pub(super) backoff: Option<Backoff>,
    pub(super) max_backlog: Option<Spanned<Size>>,
    pub(super) circuit: Option<Circuit>,
    pub(super) init_timeout: Option<Spanned<HumanDuration>>,
    pub(super) shutdown_timeout: Option<Spanned<HumanDuration>>,
    pub(super) hang_grace: Option<Spanned<HumanDuration>>,
    pub(super) max_age: Option<Spanned<MaxAge>>,
    pub(super) workers: Option<Spanned<u32>>,
    pub(super) rate_limit: Option<Spanned<RateLimit>>,
    pub(super) ordering_key: Option<Spanned<String>>,
}

impl Instance {
    /// The setting overrides of this instance, as a `Settings`.
    pub(super) fn overrides(&self) -> Settings {
        Settings {
            queue_capacity: self.queue_capacity.clone(),
            max_in_flight: self.max_in_flight.clone(),
            ack_timeout: self.ack_timeout.clone(),
            max_attempts: self.max_attempts.clone(),
            backoff: self.backoff.clone(),
            max_backlog: self.max_backlog.clone(),
            circuit: self.circuit.clone(),
            init_timeout: self.init_timeout.clone(),
            shutdown_timeout: self.shutdown_timeout.clone(),
            hang_grace: self.hang_grace.clone(),
            max_age: self.max_age.clone(),
            workers: self.workers.clone(),
            rate_limit: self.rate_limit.clone(),
            ordering_key: self.ordering_key.clone(),
        }
    }
}

/// How accepted messages are made durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// Fsynced before Publish answers (group commit).
    Fsync,
    /// Written to the OS: survives a daemon crash, not a machine crash.
    Buffered,
    /// Nothing survives a restart.
    Memory,
}

impl std::fmt::Display for Durability {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Fsync => "fsync",
            Self::Buffered => "buffered",
            Self::Memory => "memory",
        })
    }
}

/// How `plugin_dir` and the config file are watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WatchMode {
    /// inotify where it works, polling otherwise.
    Auto,
    Inotify,
    /// For filesystems without change events (NFS, some overlays).
    Poll,
}

/// What a publish that matches no instance gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unrouted {
    /// Accepted and not stored (pub/sub semantics): counted, logged, and the answer says it
    /// reached 0 instances.
    Accept,
    /// Refused with FAILED_PRECONDITION.
    Refuse,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

/// A duration written the humantime way: `"250ms"`, `"10s"`, `"1m 30s"`, `"2h"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct HumanDuration(pub(super) Duration);

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration such as \"250ms\", \"10s\" or \"1m 30s\"")
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<HumanDuration, E> {
                humantime::parse_duration(text)
                    .map(HumanDuration)
                    .map_err(|e| {
                        E::custom(format!(
                            "invalid duration \"{text}\" ({e}); expected a duration such as \
                         \"250ms\", \"10s\" or \"1m 30s\""
                        ))
                    })
            }
        }
        deserializer.deserialize_str(Visitor)
    }
}

/// `max_age`: a duration, or `"off"` (an instance's way to undo a `[defaults]` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MaxAge(pub(super) Option<Duration>);

impl<'de> Deserialize<'de> for MaxAge {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        if text == "off" {
            return Ok(Self(None));
        }
        humantime::parse_duration(&text)
            .map(|d| Self(Some(d)))
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid max_age \"{text}\" ({e}); expected a duration such as \"7d\" or \
                     \"12h\", or \"off\""
                ))
            })
    }
}

/// `rate_limit`: deliveries per second (a number), or `"off"`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct RateLimit(pub(super) Option<f64>);

impl<'de> Deserialize<'de> for RateLimit {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = RateLimit;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("deliveries per second (a number such as 50 or 0.5), or \"off\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RateLimit, E> {
                Ok(RateLimit(Some(v as f64)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RateLimit, E> {
                Ok(RateLimit(Some(v as f64)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<RateLimit, E> {
                Ok(RateLimit(Some(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RateLimit, E> {
                if v == "off" {
                    Ok(RateLimit(None))
                } else {
                    Err(E::custom(format!(
                        "invalid rate_limit \"{v}\"; expected deliveries per second (a number \
                         such as 50 or 0.5), or \"off\""
                    )))
                }
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

/// A size in bytes: an integer, or a string such as `"4MiB"`, `"1GiB"`, `"512KB"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Size(pub(super) u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = Size;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"4MiB\", \"1GiB\" or a number of bytes")
            }
            fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<Size, E> {
                u64::try_from(bytes)
                    .map(Size)
                    .map_err(|_| E::custom(format!("invalid size {bytes}: it is negative")))
            }
            fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<Size, E> {
                Ok(Size(bytes))
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<Size, E> {
                // "MB" is 10^6 and "MiB" 2^20, as written.
                parse_size::parse_size(text).map(Size).map_err(|e| {
                    E::custom(format!(
                        "invalid size \"{text}\" ({e}); expected a size such as \"4MiB\", \
                             \"1GiB\" or a number of bytes"
                    ))
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
