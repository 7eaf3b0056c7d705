//! What applying a new configuration means for each instance: the supervisor carries it out
//! (hot plug); `check` and `Reload` report it.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::{Config, HostSettings, Instance};

/// What happens to one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Change {
    /// New, or newly enabled.
    Start,
    /// Removed, or disabled; its pending deliveries wait in the ledger.
    Stop,
    /// A new instance replaces the running one (topic and setting changes ride along).
    Reinstantiate {
        reasons: Vec<Reason>,
    },
    /// The running instance stays; its routing and/or delivery settings change.
    Update {
        reroute: bool,
        retune: bool,
    },
    Unchanged,
}

impl Change {
    /// Its name, as serialized (`start`, `stop`, `reinstantiate`, `update`, `unchanged`).
    pub fn action(&self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Stop => "stop",
            Self::Reinstantiate { .. } => "reinstantiate",
            Self::Update { .. } => "update",
            Self::Unchanged => "unchanged",
        }
    }
}

/// Why an instance must be created anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// Its `config` table changed.
    Config,
    /// It runs another plugin.
    Plugin,
    /// Its sha256 pin changed.
    Pin,
    /// An operator asked for it (`ctl reload NAME`).
    Operator,
}

/// The changes from one configuration to the next.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Plan {
    /// Every instance of either configuration, by name.
    pub instances: BTreeMap<String, Change>,
    /// `[host]` keys that changed but take effect only at the next start.
    pub restart_required: Vec<&'static str>,
}

impl Plan {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.restart_required.is_empty() && self.instances.values().all(|c| *c == Change::Unchanged)
    }
}

fn running(config: &Config, name: &str) -> Option<Instance> {
    config.instances.get(name).filter(|i| i.enabled).cloned()
}

/// The `[host]` keys that take effect only at the next start, as one list: what a reload
/// reports as needing a restart and what it keeps running as it was are the same keys.
/// Every other `[host]` key is applied by a reload (`autoload`, `trusted_owners`,
/// `unrouted`).
macro_rules! restart_only {
    ($($key:ident),* $(,)?) => {
        /// The restart-only `[host]` keys that differ between `running` and `new`.
        fn restart_only_changes(running: &HostSettings, new: &HostSettings) -> Vec<&'static str> {
            let mut changed = Vec::new();
            $(
                if running.$key != new.$key {
                    changed.push(stringify!($key));
                }
            )*
            changed
        }

        /// Gives `new` the running values of the restart-only keys: what a reload applies is
        /// what runs until the next start (a plugin's generation started after a reload
        /// checks its publishes against the same `max_message_size` as the API).
        pub fn keep_restart_only(running: &HostSettings, new: &mut HostSettings) {
            $( new.$key = running.$key.clone(); )*
        }
    };
}

restart_only!(
    plugin_dir,
    state_dir,
    listen,
    metrics,
    durability,
    grace_period,
    max_message_size,
    watch,
    socket_mode,
    socket_group,
    allowed_users,
    tcp_token_file,
    operator_users,
    operator_groups,
    tcp_operator_token_file,
    tls_cert_file,
    tls_key_file,
    max_connections,
    idle_timeout,
    handshake_timeout,
    log_format,
    max_ledger_bytes,
    dedupe_window,
    dead_letter_retention,
    hop_limit,
);

/// Compares the running configuration `old` with `new`.
pub fn plan(old: &Config, new: &Config) -> Plan {
    let names: BTreeSet<&String> = old.instances.keys().chain(new.instances.keys()).collect();
    let instances = names
        .into_iter()
        .map(|name| {
            let change = match (running(old, name), running(new, name)) {
                (None, None) => Change::Unchanged,
                (None, Some(_)) => Change::Start,
                (Some(_), None) => Change::Stop,
                (Some(before), Some(after)) => compare(&before, &after),
            };
            (name.clone(), change)
        })
        .collect();
    let (a, b) = (&old.host, &new.host);
    let restart_required = restart_only_changes(a, b);
    Plan {
        instances,
        restart_required,
    }
}

fn compare(before: &Instance, after: &Instance) -> Change {
    let mut reasons = Vec::new();
    if before.config != after.config {
        reasons.push(Reason::Config);
    }
    if before.plugin != after.plugin {
        reasons.push(Reason::Plugin);
    }
    if before.sha256 != after.sha256 {
        reasons.push(Reason::Pin);
    }
    if !reasons.is_empty() {
        return Change::Reinstantiate { reasons };
    }
    let reroute = before.topics != after.topics;
    let retune = before.settings != after.settings;
    if reroute || retune {
        Change::Update { reroute, retune }
    } else {
        Change::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_action_is_the_serialized_tag() {
        for change in [
            Change::Start,
            Change::Stop,
            Change::Reinstantiate {
                reasons: vec![Reason::Config],
            },
            Change::Update {
                reroute: true,
                retune: false,
            },
            Change::Unchanged,
        ] {
            assert_eq!(
                serde_json::to_value(&change).unwrap()["action"],
                change.action()
            );
        }
    }
}
