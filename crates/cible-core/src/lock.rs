//! The lock order, in code: every lock of the engine has a [`Level`], and a thread may only take
//! a lock whose level is above every level it already holds. Taking one out of order panics at
//! once, naming both locks, instead of deadlocking some day under load.
//!
//! The order is the declaration order of [`Level`]:
//!
//! `Segments` (the segment worker and the change feed) → `Writer` (identity graph, counters,
//! dictionaries) → `Hot` (hot store) → `TraitColumns` → `Cache` (calibration, product model,
//! models, API keys) → `Queue` (work handed from the writer to the segment worker) → `EventLog`
//! (the event log's end and open files) → `Dictionaries` (how bodies are packed).
//!
//! The checks are per thread (a thread-local list of the levels held), so they cost a few
//! nanoseconds per acquisition and catch an inversion on the first run that takes it, whatever
//! the timing: the concurrency tests need not be lucky to find one.

use std::cell::RefCell;

use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Lock levels, lowest first: a thread holding a level may only take higher ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// The segment worker's state: live segments, timers, the change feed's next number.
    Segments,
    /// The single writer: identity graph, counters, dictionaries, dedup set.
    Writer,
    /// The in-memory hot store.
    Hot,
    /// The traits rules read, by profile.
    TraitColumns,
    /// Caches loaded on first use (calibration, product model, models, API keys).
    Cache,
    /// Batches committed by the writer, waiting for the segment worker.
    Queue,
    /// The event log's end and its open segment files (held for a write or a handle's clone).
    EventLog,
    /// The event log's compression dictionaries and their training samples.
    Dictionaries,
}

thread_local! {
    static HELD: RefCell<Vec<Level>> = const { RefCell::new(Vec::new()) };
}

fn enter(level: Level) {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if let Some(top) = held.iter().max()
            && *top >= level
        {
            panic!("lock order violated: taking {level:?} while holding {top:?} (see lock.rs)");
        }
        held.push(level);
    });
}

fn leave(level: Level) {
    HELD.with(|held| {
        let mut held = held.borrow_mut();
        if let Some(position) = held.iter().rposition(|l| *l == level) {
            held.remove(position);
        }
    });
}

/// Levels this thread holds now.
#[cfg(test)]
fn held() -> Vec<Level> {
    HELD.with(|held| held.borrow().clone())
}

/// A guard that gives its level back when dropped.
pub struct Ordered<G> {
    guard: G,
    level: Level,
}

impl<G> Drop for Ordered<G> {
    fn drop(&mut self) {
        leave(self.level);
    }
}

impl<G: std::ops::Deref> std::ops::Deref for Ordered<G> {
    type Target = G::Target;
    fn deref(&self) -> &Self::Target {
        &self.guard
    }
}

impl<G: std::ops::DerefMut> std::ops::DerefMut for Ordered<G> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.guard
    }
}

/// A mutex with a place in the lock order.
pub struct OrderedMutex<T> {
    level: Level,
    inner: Mutex<T>,
}

impl<T> OrderedMutex<T> {
    pub fn new(level: Level, value: T) -> Self {
        Self {
            level,
            inner: Mutex::new(value),
        }
    }

    pub fn lock(&self) -> Ordered<MutexGuard<'_, T>> {
        enter(self.level);
        Ordered {
            guard: self.inner.lock(),
            level: self.level,
        }
    }
}

impl<T> Ordered<MutexGuard<'_, T>> {
    /// Waits on a condition variable, releasing the mutex meanwhile (the level stays held:
    /// nothing else may be taken while waiting either).
    pub fn wait_for(&mut self, condvar: &parking_lot::Condvar, timeout: std::time::Duration) {
        condvar.wait_for(&mut self.guard, timeout);
    }
}

/// A reader-writer lock with a place in the lock order.
pub struct OrderedRwLock<T> {
    level: Level,
    inner: RwLock<T>,
}

impl<T> OrderedRwLock<T> {
    pub fn new(level: Level, value: T) -> Self {
        Self {
            level,
            inner: RwLock::new(value),
        }
    }

    pub fn read(&self) -> Ordered<RwLockReadGuard<'_, T>> {
        enter(self.level);
        Ordered {
            guard: self.inner.read(),
            level: self.level,
        }
    }

    pub fn write(&self) -> Ordered<RwLockWriteGuard<'_, T>> {
        enter(self.level);
        Ordered {
            guard: self.inner.write(),
            level: self.level,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_in_order_are_fine_and_released_levels_can_be_taken_again() {
        let writer = OrderedMutex::new(Level::Writer, 0);
        let hot = OrderedRwLock::new(Level::Hot, 0);
        {
            let _w = writer.lock();
            let _h = hot.read();
            assert_eq!(held(), vec![Level::Writer, Level::Hot]);
        }
        assert!(held().is_empty());
        let _h = hot.write();
        drop(_h);
        let _w = writer.lock();
    }

    #[test]
    fn an_inversion_panics_at_once_naming_both_locks() {
        let writer = OrderedMutex::new(Level::Writer, 0);
        let hot = OrderedRwLock::new(Level::Hot, 0);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _h = hot.read();
            let _w = writer.lock();
        }));
        let message = *outcome.unwrap_err().downcast::<String>().unwrap();
        assert!(
            message.contains("taking Writer while holding Hot"),
            "{message}"
        );
        // The panic unwound the guards: nothing is left held.
        assert!(held().is_empty());
    }

    #[test]
    fn the_same_level_twice_is_refused() {
        let a = OrderedMutex::new(Level::Cache, 0);
        let b = OrderedMutex::new(Level::Cache, 0);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _a = a.lock();
            let _b = b.lock();
        }));
        assert!(outcome.is_err());
    }
}
