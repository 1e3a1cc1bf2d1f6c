//! The seam between deciding and acting: the writer commits a batch, hands what it touched to
//! this queue and answers; the segment worker takes the queue's contents, evaluates, and writes
//! memberships and the change feed. **An acknowledgement never waits for segment evaluation.**
//!
//! Batches of the same cause waiting together are merged (their touched profiles united), so
//! the queue's memory is bounded by the number of profiles, not by the number of batches.
//!
//! Three modes:
//! - *inline* (the default: CLI commands, tests): the thread that committed drains the queue
//!   itself, after releasing the writer lock;
//! - *deferred* (bulk import): the queue accumulates and is drained once, at the end;
//! - *background* (`cible serve`): a worker thread drains it, and follows the timers.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::Segmenter;
use super::feed::{Cause, FeedChange};
use super::live::Touched;
use crate::error::EngineError;
use crate::lock::{Level, OrderedMutex};

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// How often the worker syncs fjall's journal to retire redo records (see [`crate::eventlog`])
/// when its own commits did not: each commit of changes syncs the journal and retires them for
/// free, so this sync runs only when batches change no membership. An acknowledged batch's
/// identifiers stay in its redo record about this long (or until the worker next wakes, within
/// a second, once ingestion stopped).
const RETIRE_EVERY: Duration = Duration::from_millis(200);

/// Called with the feed's head after a commit.
pub type FeedListener = Box<dyn Fn(u64) + Send + Sync>;

/// Committed batches waiting for the worker.
pub struct WorkQueue {
    pending: OrderedMutex<VecDeque<Work>>,
    wake: parking_lot::Condvar,
    background: AtomicBool,
    deferred: AtomicUsize,
    /// Called with the feed's head after each commit of changes (the server's streams).
    listeners: OrderedMutex<Vec<FeedListener>>,
    /// Milliseconds since `epoch` when no redo record was waiting, or one was last retired.
    retired_ms: std::sync::atomic::AtomicU64,
    epoch: Instant,
}

impl Default for WorkQueue {
    fn default() -> Self {
        Self {
            pending: OrderedMutex::new(Level::Queue, VecDeque::new()),
            wake: parking_lot::Condvar::new(),
            background: AtomicBool::new(false),
            deferred: AtomicUsize::new(0),
            listeners: OrderedMutex::new(Level::Cache, Vec::new()),
            retired_ms: std::sync::atomic::AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

/// What one or more committed batches of one cause touched.
pub(crate) struct Work {
    cause: Cause,
    touched: Touched,
    /// Evaluation time of the latest batch merged in.
    now: i64,
    /// When the oldest batch merged in was committed.
    committed: Instant,
    batches: u64,
}

/// Keeps the queue from draining inline until dropped (see `Engine::defer_segments`).
pub struct Deferral<'e> {
    work: &'e WorkQueue,
}

impl Drop for Deferral<'_> {
    fn drop(&mut self) {
        self.work.deferred.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<'a> Segmenter<'a> {
    /// Hands a committed batch's touched profiles to the segment worker. Called by the writer
    /// after it released its lock.
    pub(crate) fn hand_off(&self, touched: Touched, cause: Cause, now: i64) -> Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        self.population
            .metrics()
            .batches_handed
            .fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = self.segments.work.pending.lock();
            match pending.back_mut() {
                Some(last) if last.cause == cause => {
                    last.touched.absorb(touched);
                    last.now = last.now.max(now);
                    last.batches += 1;
                }
                _ => pending.push_back(Work {
                    cause,
                    touched,
                    now,
                    committed: Instant::now(),
                    batches: 1,
                }),
            }
            self.population.metrics().queue_depth.store(
                pending.iter().map(|w| w.touched.len()).sum::<usize>() as u64,
                Ordering::Relaxed,
            );
        }
        if self.segments.work.background.load(Ordering::Acquire) {
            self.segments.work.wake.notify_one();
            Ok(())
        } else if self.segments.work.deferred.load(Ordering::Acquire) > 0 {
            Ok(())
        } else {
            self.drain_segments().map(|_| ())
        }
    }

    /// Until the guard is dropped, committed batches wait in the queue instead of being
    /// evaluated after each one (bulk import evaluates once, at the end, with
    /// [`Segmenter::drain_segments`]).
    pub fn defer_segments(&self) -> Deferral<'a> {
        self.segments.work.deferred.fetch_add(1, Ordering::AcqRel);
        Deferral {
            work: &self.segments.work,
        }
    }

    /// Evaluates everything waiting in the queue; returns the number of batches processed.
    pub fn drain_segments(&self) -> Result<u64> {
        let mut processed = 0;
        loop {
            // Popped and evaluated under the worker's lock, one entry at a time: batches are
            // evaluated in the order they were committed, and an admin call waiting for the
            // lock gets it between two entries.
            let mut guard = self.segments.state.lock();
            let work = {
                let mut pending = self.segments.work.pending.lock();
                let work = pending.pop_front();
                self.population.metrics().queue_depth.store(
                    pending.iter().map(|w| w.touched.len()).sum::<usize>() as u64,
                    Ordering::Relaxed,
                );
                work
            };
            let Some(work) = work else {
                return Ok(processed);
            };
            self.segments_after_batch(&mut guard, &work.touched, work.now, work.cause)?;
            drop(guard);
            // Under a load whose batches change no membership the queue may never empty.
            self.retire_when_due(false);
            self.population
                .metrics()
                .batch_to_feed(work.committed.elapsed(), work.batches);
            processed += work.batches;
        }
    }

    /// The segment worker of `cible serve`: drains committed batches as they come and follows
    /// the timers, until `stop`. Batches committed meanwhile are evaluated before it returns.
    pub fn run_segment_worker(&self, stop: &AtomicBool, clock: &(dyn Fn() -> i64 + Sync)) {
        self.segments.work.background.store(true, Ordering::Release);
        loop {
            let stopping = stop.load(Ordering::Acquire);
            if let Err(error) = self.drain_segments() {
                tracing::error!(error = %error, "segment worker failed on a batch");
            }
            self.retire_when_due(stopping);
            if stopping {
                break;
            }
            // Cheap when nothing is due (a peek at the timer heap).
            let next_timer = match self.tick_segments(clock()) {
                Ok(next) => next,
                Err(error) => {
                    tracing::error!(error = %error, "segment timers failed");
                    None
                }
            };
            // Sleep until work arrives, the next timer is due, or a second has passed (the
            // clock may be pinned, and batches arm new timers).
            let wait = next_timer
                .map(|at| (at - clock()).clamp(0, 1000))
                .unwrap_or(1000);
            let mut pending = self.segments.work.pending.lock();
            if pending.is_empty() && !stop.load(Ordering::Acquire) {
                pending.wait_for(
                    &self.segments.work.wake,
                    Duration::from_millis(wait as u64 + 1),
                );
            }
        }
        self.segments
            .work
            .background
            .store(false, Ordering::Release);
    }

    /// Retires the acknowledged batches' redo records once fjall's journal is synced past them
    /// (here rather than on the acknowledgement path): when some have waited [`RETIRE_EVERY`]
    /// without a commit of changes retiring them, or with `now`.
    fn retire_when_due(&self, now: bool) {
        let work = &self.segments.work;
        let elapsed = work.epoch.elapsed().as_millis() as u64;
        let store = self.population.store();
        if !store.log.has_redo_through(store.log.committed()) {
            work.retired_ms.store(elapsed, Ordering::Relaxed);
            return;
        }
        let since = elapsed.saturating_sub(work.retired_ms.load(Ordering::Relaxed));
        if now || since >= RETIRE_EVERY.as_millis() as u64 {
            work.retired_ms.store(elapsed, Ordering::Relaxed);
            if let Err(error) = store.retire_redo() {
                tracing::error!(error = %error, "retiring redo records failed");
            }
        }
    }

    /// From now on a worker thread drains the queue: committing threads only hand off. Call it
    /// before a long first evaluation pass, so batches committed meanwhile wait for it.
    pub fn start_background_worker(&self) {
        self.segments.work.background.store(true, Ordering::Release);
    }

    /// Wakes the worker (to see `stop`).
    pub fn wake_segment_worker(&self) {
        self.segments.work.wake.notify_all();
    }

    /// Calls `listener` with the feed's head after every commit of changes.
    pub fn on_feed(&self, listener: FeedListener) {
        self.segments.work.listeners.lock().push(listener);
    }

    pub(crate) fn notify_feed(&self, head: u64) {
        for listener in self.segments.work.listeners.lock().iter() {
            listener(head);
        }
    }

    /// Up to `limit` changes after sequence number `after`, oldest first, up to the head the
    /// worker published after its commit returned: a change is readable only once durable
    /// (the store makes a commit visible a moment before its sync ends).
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<FeedChange>> {
        super::feed::read_after(self.population.store(), after, self.feed_head(), limit)
    }

    /// The sequence number of the last change written (0 when none).
    pub fn feed_head(&self) -> u64 {
        self.population.metrics().feed_head.load(Ordering::Acquire)
    }
}
