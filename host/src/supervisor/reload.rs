//! The reload protocol: read the configuration once, refuse it (the last good one keeps
//! running) or apply it, and answer with what changed; the service manager is told.

use sha2::Digest as _;

use super::{Applied, ReloadRefused, StartFailure, Supervisor, desired::Libraries};
use crate::{
    config::{self, ConfigError},
    events::{EventKind, Events},
};

/// What asked for a reload. It decides what the reload looks at again and what it forgives;
/// each difference is one method below, so a new trigger is one variant and its answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Trigger {
    /// The watcher reported the config file (written, another file, or gone: its bytes may
    /// be the ones that run).
    Watcher,
    /// SIGHUP (`systemctl reload`): an operator's reload nobody waits to hear the result of.
    Signal,
    /// An operator's `Reload` call (`plugind ctl reload`, `enable`, `disable`), answered.
    Operator,
}

impl Trigger {
    /// Whether bytes equal to what runs (or to what was refused last) are no reload at all.
    /// An operator who asks is answered, and retried failures are retried, whatever the
    /// bytes.
    pub(super) fn skips_same_bytes(self) -> bool {
        self == Self::Watcher
    }

    /// Whether the watched directories are looked at again (one deleted and made anew, or a
    /// symlink chain swapped, is watched from now on).
    pub(super) fn refreshes_watch(self) -> bool {
        self != Self::Watcher
    }

    /// Whether `plugin_dir` is read again, every library checked anew. Not for the watcher's
    /// config event: the watcher reports each library that changes on its own, so the
    /// libraries held are current (unless what a check depends on changed: see
    /// `apply_config`).
    pub(super) fn rescans_libraries(self) -> bool {
        self != Self::Watcher
    }

    /// Whether every failed or quarantined load is tried again.
    pub(super) fn retries_failures(self) -> bool {
        self != Self::Watcher
    }
}

impl Supervisor {
    /// A reload, as the service manager sees it: `RELOADING=1`, the reload, `READY=1`.
    pub(super) fn reload(
        &mut self,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
        trigger: Trigger,
    ) -> Result<Applied, ReloadRefused> {
        if trigger.refreshes_watch()
            && let Some((watcher, _)) = &self.deps.watch
        {
            watcher.refresh();
        }
        // Read once: what is compared, refused or applied is these bytes (never blocking: a
        // FIFO in the config's place is refused, not waited on).
        let text = config::read_text(&self.deps.config.source);
        let hash = text
            .as_ref()
            .ok()
            .map(|t| <[u8; 32]>::from(sha2::Sha256::digest(t.as_bytes())));
        // A watcher event whose bytes equal what runs (or what was just refused) is no
        // reload at all.
        if trigger.skips_same_bytes()
            && hash.is_some_and(|h| h == self.deps.config.hash || Some(h) == self.refused)
        {
            let plan = config::plan(&self.deps.config, &self.deps.config);
            return Ok(self.applied(plan, Vec::new()));
        }
        if let Some(notifier) = &self.deps.notifier {
            notifier.reloading();
        }
        let result = self.apply_config(text, expected, instance, trigger);
        self.refused = match &result {
            Err(ReloadRefused::Invalid(_)) => hash,
            _ => None,
        };
        if let Some(notifier) = &self.deps.notifier {
            // Always READY again, after a refused reload too (the old configuration runs).
            let summary = self.view.load().summary();
            match &result {
                Ok(_) => notifier.ready(&format!("reloaded; {summary}")),
                Err(e) => notifier.ready(&format!(
                    "reload refused ({}); {summary}",
                    e.to_string().lines().next().unwrap_or_default()
                )),
            }
        }
        result
    }

    /// Applies the configuration file's `text` (and reads `plugin_dir` again when `trigger`
    /// asks for it, or `plugin_dir` or `trusted_owner_uids` changed).
    pub(super) fn apply_config(
        &mut self,
        text: std::io::Result<String>,
        expected: Option<[u8; 32]>,
        instance: Option<String>,
        trigger: Trigger,
    ) -> Result<Applied, ReloadRefused> {
        let path = self.deps.config.source.clone();
        let refuse = |events: &Events, error: String| {
            events.emit(EventKind::ConfigRefused {
                path: path.clone(),
                error: error.clone(),
            });
            Err(ReloadRefused::Invalid(error))
        };
        let text = match text {
            Ok(text) => text,
            Err(source) => {
                let error = ConfigError::Read {
                    path: path.clone(),
                    source,
                };
                return refuse(&self.deps.events, error.to_string());
            }
        };
        if text.trim().is_empty() {
            // What a truncation, or a write cut short, leaves behind: applying it would stop
            // every instance. A configuration with no instances says so (a `[host]` table, a
            // comment) and is applied as any other.
            let what = if text.is_empty() {
                "is empty (0 bytes)"
            } else {
                "holds only whitespace"
            };
            return refuse(
                &self.deps.events,
                format!(
                    "{}: the file {what}: refused, the last good configuration keeps running \
                     (a configuration with no instances says so with a [host] table or a \
                     comment)",
                    path.display()
                ),
            );
        }
        let mut new = match config::parse(&path, &text) {
            Ok(new) => new,
            Err(invalid) => return refuse(&self.deps.events, invalid.render()),
        };
        if let Some(expected) = expected
            && expected != new.hash
        {
            let refused = ReloadRefused::Changed {
                path: path.display().to_string(),
                expected: hex::encode(expected),
                found: hex::encode(new.hash),
            };
            self.deps.events.emit(EventKind::ConfigRefused {
                path,
                error: refused.to_string(),
            });
            return Err(refused);
        }
        let unchanged = new.hash == self.deps.config.hash;
        if let Some(name) = &instance {
            let Some(inst) = self.instances.get_mut(name) else {
                return Err(ReloadRefused::UnknownInstance(name.clone()));
            };
            // An operator's reload of one instance: released from quarantine, tried again,
            // re-instantiated if it runs.
            inst.failed = None;
            inst.reported = None;
            if let Some(running) = &inst.running {
                self.deps.quarantine.release(&running.key.sha256);
            }
            let plugin = new
                .instances
                .get(name)
                .map_or_else(|| name.clone(), |i| i.plugin.clone());
            if let Ok(checked) = self.deps.libraries.provider(&plugin) {
                self.deps.quarantine.release(&checked.sha256());
            }
        } else if trigger.retries_failures() {
            // An operator's reload: every failed or quarantined load is tried again.
            self.deps.quarantine.release_all();
            for inst in self.instances.values_mut() {
                inst.failed = None;
                inst.reported = None;
            }
        }
        let mut plan = config::plan(&self.deps.config, &new);
        if unchanged
            && instance.is_none()
            && let (Some(expected), Some((hash, applied))) = (expected, &self.last_change)
            && expected == *hash
        {
            // The operator expects these bytes and they run already: the watcher applied
            // them first. The answer is what applying them changed, not "unchanged".
            plan = applied.clone();
        } else if !unchanged {
            self.last_change = Some((new.hash, plan.clone()));
        }
        for key in plan.restart_required.iter().filter(|_| !unchanged) {
            tracing::warn!(
                key,
                "a [host] setting changed; it takes effect at the next start"
            );
        }
        let restart_required = plan
            .restart_required
            .iter()
            .map(|k| (*k).to_owned())
            .collect();
        // What a library's check depends on besides its bytes: where it is, and whose files
        // are trusted.
        let checks_changed = new.host.plugin_dir != self.deps.config.host.plugin_dir
            || new.host.trusted_owner_uids != self.deps.config.host.trusted_owner_uids;
        self.deps.ingress.set_unrouted(new.host.unrouted);
        // What needs a restart keeps running as it was until then.
        config::keep_restart_only(&self.deps.config.host, &mut new.host);
        self.deps.config = new;
        if trigger.rescans_libraries() || checks_changed {
            let (libraries, refusals) =
                Libraries::rescan(&self.deps.libraries, &self.deps.config, &self.policy());
            self.deps.libraries = libraries;
            for refusal in refusals {
                self.deps.events.emit(EventKind::Failed {
                    instance: None,
                    path: Some(refusal.path),
                    error: refusal.error,
                });
            }
        }
        if let Some(inst) = instance.as_ref().and_then(|n| self.instances.get_mut(n)) {
            // Instantiated anew at the reconcile below, even from the same bytes and config.
            inst.renew = true;
        }
        let failures = self.reconcile();
        if let Some(name) = &instance
            && !failures.iter().any(|f| f.instance == *name)
            && self
                .instances
                .get(name)
                .is_some_and(|i| i.running.is_some())
        {
            // Instantiated anew on the operator's word, whatever else the plan says.
            plan.instances.insert(
                name.clone(),
                config::Change::Reinstantiate {
                    reasons: vec![config::Reason::Operator],
                },
            );
        }
        if !unchanged {
            self.deps.events.emit(EventKind::ConfigApplied {
                path: self.deps.config.source.clone(),
                sha256: hex::encode(self.deps.config.hash),
                restart_required,
            });
        }
        Ok(self.applied(plan, failures))
    }

    pub(super) fn applied(&self, plan: config::Plan, failures: Vec<StartFailure>) -> Applied {
        Applied {
            sha256: hex::encode(self.deps.config.hash),
            plan,
            failures,
        }
    }
}
