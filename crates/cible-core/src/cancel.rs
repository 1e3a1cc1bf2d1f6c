//! Cancellation of long admin work (training, clustering) whose client left or whose server is
//! stopping. The work runs inside [`scope`] with a flag; its loops ask [`cancelled`] between
//! steps (a k, a restart, a boosting round) and stop early; the caller then discards the
//! partial result and answers [`crate::EngineError::Cancelled`]. Nothing half-trained is saved.

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Set when the process is stopping: every scope counts as cancelled.
static STOPPING: AtomicBool = AtomicBool::new(false);

thread_local! {
    static FLAG: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Runs `work` on this thread with `flag` as its cancellation flag.
pub fn scope<T>(flag: Arc<AtomicBool>, work: impl FnOnce() -> T) -> T {
    let previous = FLAG.with(|f| f.replace(Some(flag)));
    let result = work();
    FLAG.with(|f| *f.borrow_mut() = previous);
    result
}

/// Whether the work running on this thread should stop.
pub fn cancelled() -> bool {
    STOPPING.load(Ordering::Relaxed)
        || FLAG.with(|f| {
            f.borrow()
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::Relaxed))
        })
}

/// The calling thread's cancellation, to check from other threads (a parallel loop's workers do
/// not see the caller's scope).
#[derive(Clone, Default)]
pub struct Token(Option<Arc<AtomicBool>>);

impl Token {
    pub fn is_cancelled(&self) -> bool {
        STOPPING.load(Ordering::Relaxed)
            || self
                .0
                .as_ref()
                .is_some_and(|flag| flag.load(Ordering::Relaxed))
    }
}

/// The token of the work running on this thread.
pub fn current() -> Token {
    Token(FLAG.with(|f| f.borrow().clone()))
}

/// Cancels every scope, for good: the process is stopping.
pub fn stop_all() {
    STOPPING.store(true, Ordering::Relaxed);
}

/// An error when the work was cancelled.
pub fn check() -> Result<(), crate::EngineError> {
    if cancelled() {
        Err(crate::EngineError::Cancelled)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flag_cancels_its_scope_only() {
        let flag = Arc::new(AtomicBool::new(false));
        scope(Arc::clone(&flag), || {
            assert!(!cancelled());
            flag.store(true, Ordering::Relaxed);
            assert!(cancelled());
            assert!(check().is_err());
        });
        assert!(!cancelled(), "outside the scope nothing is cancelled");
    }
}
