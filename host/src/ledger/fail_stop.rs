//! [`FailStop`]: the daemon's one answer to a storage failure it cannot go on from
//! (docs/design.md §7: fail-stop). The ledger's writer and syncer, an in-flight marker that cannot
//! be written, and the dispatcher (a commit or a read that failed) all end here. What it does
//! is the assembly's to say — the binary says so on stderr and exits 1 at once — so library
//! code never exits the process itself.

use std::sync::Arc;

use super::LedgerError;

/// What the assembly does with a storage failure, given in words.
type Hook = Arc<dyn Fn(&str) + Send + Sync>;

/// The fail-stop hook, cheap to clone: one per daemon, shared by everything that records or
/// reads delivery state. [`FailStop::default`] has no hook: a [`FailStop::halt`] then only
/// ends the failing thread.
#[derive(Clone, Default)]
pub struct FailStop {
    hook: Option<Hook>,
}

impl std::fmt::Debug for FailStop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FailStop")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl FailStop {
    /// A fail-stop that hands the failure, in words, to `hook`, which is to end the process
    /// (nothing more can be recorded, so nothing more may be accepted or handed out).
    pub fn new(hook: impl Fn(&str) + Send + Sync + 'static) -> Self {
        Self {
            hook: Some(Arc::new(hook)),
        }
    }

    /// Hands `error` to the hook; returns if the hook does (the ledger then refuses every
    /// later commit: it is poisoned).
    pub fn report(&self, error: &str) {
        if let Some(hook) = &self.hook {
            hook(error);
        }
    }

    /// A storage failure the calling thread cannot go on from: logged and handed to the hook.
    /// Never returns: should the hook return (none was given, or one that does not end the
    /// process), the thread panics, so that it never goes on on state that was not recorded
    /// or could not be read.
    pub fn halt(&self, error: &LedgerError) -> ! {
        tracing::error!(error = %error, "the ledger failed; stopping the daemon");
        self.report(&error.to_string());
        panic!("the ledger failed: {error}");
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn a_halt_hands_the_failure_to_the_hook_and_goes_no_further() {
        let told = Arc::new(Mutex::new(Vec::new()));
        let fail_stop = FailStop::new({
            let told = told.clone();
            move |error: &str| told.lock().unwrap().push(error.to_owned())
        });
        let halted = std::thread::spawn(move || {
            fail_stop.halt(&LedgerError::Fatal("disk I/O error".into()));
        })
        .join();
        assert!(
            halted.is_err(),
            "the thread went on after the hook returned"
        );
        assert_eq!(told.lock().unwrap().len(), 1);
        assert!(told.lock().unwrap()[0].contains("disk I/O error"));
    }
}
