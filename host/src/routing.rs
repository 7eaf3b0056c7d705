//! Which instances a topic goes to: an immutable snapshot built from the configuration (and,
//! for instances without `topics`, their library's default topics). The ingress reads the
//! current snapshot to fix a message's target set at acceptance; a reload swaps in a new one.

use std::collections::BTreeMap;

use smallvec::SmallVec;

use crate::topic::Pattern;

/// The index of an instance in the engine (stable for the engine's life).
pub type InstanceId = u32;

/// Instance names and their ids: an id, once given, names one instance for the life of the
/// process (ids are indexes into the dispatcher's slots, the backlog and the ledger's keys).
#[derive(Debug, Default)]
pub struct Registry {
    names: std::sync::RwLock<Vec<String>>,
}

impl Registry {
    pub fn new(names: Vec<String>) -> Self {
        Self {
            names: std::sync::RwLock::new(names),
        }
    }

    fn names(&self) -> std::sync::RwLockReadGuard<'_, Vec<String>> {
        self.names
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The id of instance `name`.
    pub fn id(&self, name: &str) -> Option<InstanceId> {
        self.names()
            .iter()
            .position(|n| n == name)
            .map(|i| i as InstanceId)
    }

    /// The name of instance `id`.
    pub fn name(&self, id: InstanceId) -> Option<String> {
        self.names().get(id as usize).cloned()
    }

    /// Gives `name` the next id.
    pub fn push(&self, name: &str) -> InstanceId {
        let mut names = self
            .names
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names.push(name.to_owned());
        (names.len() - 1) as InstanceId
    }
}

/// The instances one message goes to; inline up to four (no allocation on the common path).
pub type Targets = SmallVec<[InstanceId; 4]>;

/// An immutable routing table.
#[derive(Debug, Clone, Default)]
pub struct Routing {
    /// (pattern, instance), in instance order; patterns of one instance are contiguous.
    routes: Vec<(Pattern, InstanceId)>,
}

impl Routing {
    /// A table from each instance's patterns. Every enabled instance is listed, loaded or
    /// not: deliveries to an instance that is down wait in the ledger (docs/design.md §7).
    pub fn new(patterns: &BTreeMap<InstanceId, Vec<Pattern>>) -> Self {
        let routes = patterns
            .iter()
            .flat_map(|(id, list)| list.iter().map(move |p| (p.clone(), *id)))
            .collect();
        Self { routes }
    }

    /// The instances `topic` goes to, each once, in instance order.
    pub fn targets(&self, topic: &str) -> Targets {
        let mut targets = Targets::new();
        for (pattern, id) in &self.routes {
            if targets.last() != Some(id) && pattern.matches(topic) {
                targets.push(*id);
            }
        }
        targets
    }

    /// Whether no instance subscribes to anything.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routing(table: &[(InstanceId, &[&str])]) -> Routing {
        Routing::new(
            &table
                .iter()
                .map(|(id, patterns)| {
                    (
                        *id,
                        patterns
                            .iter()
                            .map(|p| Pattern::parse(p).unwrap())
                            .collect(),
                    )
                })
                .collect(),
        )
    }

    #[test]
    fn a_topic_goes_to_every_matching_instance_once() {
        let r = routing(&[
            (0, &["orders.>", "orders.eu.*"]),
            (1, &["*.eu.new"]),
            (2, &["audit.>"]),
        ]);
        assert_eq!(
            r.targets("orders.eu.new").as_slice(),
            [0, 1],
            "instance 0 once despite two patterns"
        );
        assert_eq!(r.targets("audit.login").as_slice(), [2]);
        assert!(r.targets("billing.paid").is_empty());
        assert!(Routing::default().is_empty());
    }
}
