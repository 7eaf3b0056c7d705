//! Background work: hot plug's CPU-heavy steps (hashing a library, probing and mapping it,
//! its `new`) run at a lower scheduling priority than delivery, so a swap does not take the
//! CPU from the actors while messages flow.
//!
//! On Linux the nice value belongs to a thread, and threads (and child processes, such as the
//! loader's probe) start with their creator's: only threads created for background work are
//! lowered, never the supervisor's own (it starts the actors' threads, which must not
//! inherit it — an unprivileged process cannot raise a priority back).

/// The nice value of background threads (delivery runs at the process's own, usually 0).
pub const NICE: i32 = 10;

/// Lowers the calling thread's priority to [`NICE`] (a no-op where it is already lower or
/// the system refuses).
pub fn lower_this_thread() {
    let current = rustix::process::getpriority_process(None).unwrap_or(0);
    if current < NICE
        && let Err(e) = rustix::process::setpriority_process(None, NICE)
    {
        tracing::debug!(error = %e, "cannot lower a background thread's priority");
    }
}

/// Runs `work` on a background thread of its own and waits for its result.
///
/// # Panics
/// If the thread cannot be started, or `work` panicked (the panic goes on here).
pub fn run<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("plugind-background".into())
            .spawn_scoped(scope, || {
                lower_this_thread();
                work()
            })
            .expect("a background thread can be started")
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn background_work_runs_at_a_lower_priority_and_the_caller_keeps_its_own() {
        let before = rustix::process::getpriority_process(None).unwrap();
        let inside = run(|| rustix::process::getpriority_process(None).unwrap());
        assert_eq!(inside, NICE.max(before));
        assert_eq!(rustix::process::getpriority_process(None).unwrap(), before);
    }
}
