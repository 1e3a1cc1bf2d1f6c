//! The lock order, in code: every lock of the engine has a [`Level`], and a thread may only take
//! a lock whose level is above every level it already holds. Taking one out of order panics at
//! once, naming both locks, instead of deadlocking some day under load.
//!
//! The order is the declaration order of [`Level`]:
//!
//! `Segments` (the segment worker and the change feed) → `ColumnBuild` (a rebuild of the hot
//! store's columns) → `Writer` (identity graph, counters,
//! dictionaries) → `Hot` (hot store) → `Liveness` → `TraitColumns` → `Consents` → `Pseudonym` → `Audit` → `ModelWrites` (saving a model version)
//! → `Cache` (calibration, product model,
//! models, API keys) → `Queue` (work handed from the writer to the segment worker) → `EventLog`
//! (the event log's end, what is unsynced) → `EventLogFiles` (its open files) → `Dictionaries`
//! (how bodies are packed).
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
    /// One rebuild of the hot store's property columns at a time (taken before the writer).
    ColumnBuild,
    /// The single writer: identity graph, counters, dictionaries, dedup set.
    Writer,
    /// The in-memory hot store.
    Hot,
    /// Which profiles are live (`liveness`), mirrored by the writer after each commit.
    Liveness,
    /// The traits rules read, by profile.
    TraitColumns,
    /// The current consent of every purpose, by profile (`consent::ConsentIndex`).
    Consents,
    /// The exports' pseudonym key (read, or replaced by a rotation), taken before `Audit`.
    Pseudonym,
    /// Webhook subscriptions and their delivery queue (`webhooks` keyspace), held until a
    /// batch changing them commits (with its audit record: before `Audit`).
    Webhooks,
    /// The audit chain's head, held until the batch carrying its new records commits.
    Audit,
    /// Saving a model version (the next version number is read, then written).
    ModelWrites,
    /// Caches loaded on first use (calibration, product model, models, API keys).
    Cache,
    /// Batches committed by the writer, waiting for the segment worker.
    Queue,
    /// One sync of the event log at a time, and how far its retired redo records are durable
    /// (taken before `EventLog`: a sync returns only once every write before it is on disk).
    EventLogSync,
    /// The event log's end and what is not yet synced (held for an append or a sync).
    EventLog,
    /// The event log's open segment files (read to clone a handle, written to add one).
    EventLogFiles,
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

/// A value kept in memory that is loaded from the store on first use and replaced by writers.
///
/// A writer stores the new value durably first, then calls [`Cached::set`]. A load keeps what
/// it read only if no `set` happened while it read: otherwise a load racing a write could put
/// the old value back for good (found by the model registry's concurrency test).
pub struct Cached<T> {
    /// How many `set`s there were, and the value once known.
    slot: OrderedRwLock<(u64, Option<std::sync::Arc<T>>)>,
}

impl<T> Cached<T> {
    pub fn new(level: Level) -> Self {
        Self {
            slot: OrderedRwLock::new(level, (0, None)),
        }
    }

    /// The value in memory, if loaded.
    pub fn get(&self) -> Option<std::sync::Arc<T>> {
        self.slot.read().1.clone()
    }

    /// The value in memory, or what `load` reads from the store (kept unless a `set` happened
    /// meanwhile). No lock is held while `load` runs.
    pub fn get_or_load<E>(
        &self,
        load: impl FnOnce() -> Result<Option<T>, E>,
    ) -> Result<Option<std::sync::Arc<T>>, E> {
        let generation = {
            let slot = self.slot.read();
            if let Some(value) = &slot.1 {
                return Ok(Some(std::sync::Arc::clone(value)));
            }
            slot.0
        };
        let Some(value) = load()? else {
            return Ok(None);
        };
        let value = std::sync::Arc::new(value);
        let mut slot = self.slot.write();
        if slot.0 == generation {
            slot.1 = Some(std::sync::Arc::clone(&value));
        }
        Ok(Some(value))
    }

    /// Replaces the value (`None`: forget it, the next read loads it), after the store holds it.
    pub fn set(&self, value: Option<std::sync::Arc<T>>) {
        let mut slot = self.slot.write();
        *slot = (slot.0 + 1, value);
    }

    /// Stores a new value with `store` and serves it, as one step: two writers cannot leave the
    /// one stored first in memory and the other in the store.
    pub fn store_and_set<E>(
        &self,
        value: std::sync::Arc<T>,
        store: impl FnOnce(&T) -> Result<(), E>,
    ) -> Result<std::sync::Arc<T>, E> {
        let mut slot = self.slot.write();
        store(&value)?;
        *slot = (slot.0 + 1, Some(std::sync::Arc::clone(&value)));
        Ok(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_load_that_raced_a_write_is_not_kept() {
        let cached = Cached::<u32>::new(Level::Cache);
        // A writer stores 2 while the load is reading the old 1.
        let loaded = cached
            .get_or_load(|| -> Result<_, ()> {
                cached.set(Some(std::sync::Arc::new(2)));
                Ok(Some(1))
            })
            .unwrap();
        assert_eq!(loaded.as_deref(), Some(&1), "the caller gets what it read");
        assert_eq!(cached.get().as_deref(), Some(&2), "the write wins");
        // An invalidation during a load leaves nothing: the next read loads again.
        cached.set(None);
        let _ = cached.get_or_load(|| -> Result<_, ()> {
            cached.set(None);
            Ok(Some(3))
        });
        assert_eq!(cached.get(), None);
        assert_eq!(
            cached
                .get_or_load(|| -> Result<_, ()> { Ok(Some(4)) })
                .unwrap()
                .as_deref(),
            Some(&4)
        );
        assert_eq!(cached.get().as_deref(), Some(&4));
    }

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
