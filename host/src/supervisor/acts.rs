//! An operator's acts on one instance: pause or resume it, forget it.

use super::{ActRefused, Supervisor, desired};
use crate::{
    events::{EventKind, Unsubscribed},
    ledger::{Forget, Remembered},
};

impl Supervisor {
    /// An operator's pause or resume: recorded in the ledger (kept across restarts), then
    /// applied by the dispatcher.
    pub(super) fn pause(&mut self, name: &str, paused: bool) -> Result<(), ActRefused> {
        let Some(id) = self.instances.get(name).map(|i| i.id) else {
            return Err(ActRefused::Unknown(name.to_owned()));
        };
        let mut remembered = self.remembered.get(name).cloned().unwrap_or_default();
        remembered.paused = paused;
        self.deps
            .ledger
            .remember(name, &remembered)
            .map_err(ActRefused::Ledger)?;
        self.remembered.insert(name.to_owned(), remembered);
        if paused {
            self.deps.dispatcher.pause(id);
        } else {
            self.deps.dispatcher.resume(id);
        }
        Ok(())
    }

    /// An operator forgets an instance: its subscription ends (durably, routes first) and
    /// its waiting deliveries are dead-lettered or purged.
    pub(super) fn forget(&mut self, name: &str, how: Forget) -> Result<u64, ActRefused> {
        if self.deps.config.instances.contains_key(name) {
            return Err(ActRefused::Configured {
                instance: name.to_owned(),
                config: self.deps.config.source.clone(),
            });
        }
        let wants = desired::wants(&self.deps.config, &self.deps.libraries, &self.remembered);
        if let Some(want) = wants.get(name)
            && let Ok(library) = self.deps.libraries.provider(&want.plugin)
        {
            return Err(ActRefused::LibraryPresent {
                instance: name.to_owned(),
                library: library.path().to_owned(),
            });
        }
        let registered = self.instances.get(name).map(|i| i.id);
        let known = registered.is_some()
            || self.remembered.contains_key(name)
            || self
                .deps
                .ledger
                .backlog()
                .is_ok_and(|b| b.iter().any(|e| e.instance == name));
        if !known {
            return Err(ActRefused::Unknown(name.to_owned()));
        }
        // The subscription ends first, durably: nothing new is routed to it from here on.
        self.deps
            .ledger
            .remember(name, &Remembered::default())
            .map_err(ActRefused::Ledger)?;
        let was = self.remembered.remove(name).unwrap_or_default();
        let was_subscribed = was.subscription.is_some();
        if let (true, Some(id)) = (was.paused, registered) {
            // The pause went with it: should it come back, it starts afresh.
            self.deps.dispatcher.resume(id);
        }
        if let Some(inst) = self.instances.get_mut(name) {
            let subscribed = inst.subscribed.take().is_some();
            if subscribed || was_subscribed {
                self.deps.events.emit(EventKind::Unsubscribed {
                    instance: name.to_owned(),
                    reason: Unsubscribed::Forgotten,
                });
            }
        }
        self.reconcile();
        let count = match registered {
            Some(instance) => self
                .deps
                .dispatcher
                .forget(instance, how)
                .map_err(|_| ActRefused::Stopping)?,
            None => self
                .deps
                .ledger
                .forget(name, how, self.deps.clock.now())
                .map_err(ActRefused::Ledger)?,
        };
        self.publish_view();
        Ok(count)
    }
}
