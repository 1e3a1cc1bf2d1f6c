//! Thread pools. Rayon's global pool runs admin and batch work: training, recalibration, the
//! product model, previews, loading the hot store and rebuilding its columns. The segment
//! worker's passes (incremental, timed, backfills, recalibrations' re-evaluation) run their
//! parallel parts on a pool of their own, so that they never queue
//! behind a long admin job: rayon runs a job handed in from outside a pool only once the pool's
//! threads have nothing of their own left, and at a million profiles the product model alone
//! keeps a one-thread global pool busy for minutes (a segment creation beside it took 293 s
//! instead of 6 s, and every incremental pass of 256 profiles or more waited as long).

use std::sync::OnceLock;

static SEGMENTS: OnceLock<rayon::ThreadPool> = OnceLock::new();

/// Sets the segment worker's pool: `threads` threads (0: one per core) named `cible-seg-N`,
/// each running `on_start` first (a server lowers their priority, as it does the global pool's).
/// Only the first call counts, and only before the first pass; afterwards the pool stays.
pub fn configure_segment_pool(threads: usize, on_start: fn()) {
    let _ = SEGMENTS.get_or_init(|| build(threads, Some(on_start)));
}

fn build(threads: usize, on_start: Option<fn()>) -> rayon::ThreadPool {
    let builder = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cible-seg-{i}"));
    let builder = match on_start {
        Some(hook) => builder.start_handler(move |_| hook()),
        None => builder,
    };
    builder
        .build()
        .expect("the segment worker's thread pool starts")
}

/// Runs `work` on the segment worker's pool (one thread per core if none was configured): its
/// parallel iterators use that pool's threads, never the global pool's.
pub(crate) fn on_segment_pool<R: Send>(work: impl FnOnce() -> R + Send) -> R {
    SEGMENTS
        .get_or_init(|| build(rayon::current_num_threads(), None))
        .install(work)
}

/// Keeps every thread of the current pool (the global one, or the segment worker's when
/// called inside [`on_segment_pool`]) busy until the returned guard drops; returns once they all
/// are. For tests of what must not wait for a busy pool.
#[cfg(test)]
pub(crate) fn hold() -> Held {
    type Gate = (std::sync::Mutex<bool>, std::sync::Condvar);
    let gate: std::sync::Arc<Gate> = Default::default();
    let (started, busy) = std::sync::mpsc::channel();
    let threads = rayon::current_num_threads();
    for _ in 0..threads {
        let gate = std::sync::Arc::clone(&gate);
        let started = started.clone();
        rayon::spawn(move || {
            started.send(()).expect("the test waits");
            let (open, opened) = &*gate;
            let mut open = open.lock().expect("not poisoned");
            while !*open {
                open = opened.wait(open).expect("not poisoned");
            }
        });
    }
    for _ in 0..threads {
        busy.recv_timeout(std::time::Duration::from_secs(10))
            .expect("the pool's threads start");
    }
    Held(gate)
}

/// See [`hold`]: dropping it lets the pool's threads go.
#[cfg(test)]
pub(crate) struct Held(std::sync::Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

#[cfg(test)]
impl Drop for Held {
    fn drop(&mut self) {
        let (open, opened) = &*self.0;
        *open.lock().expect("not poisoned") = true;
        opened.notify_all();
    }
}

/// Runs `work` on a thread of its own and waits at most `limit` for it: `None` when it did not
/// finish in time (a hang, for the test to report; the thread is left behind). A panic in
/// `work` is raised again here.
#[cfg(test)]
pub(crate) fn within<T: Send + 'static>(
    limit: std::time::Duration,
    work: impl FnOnce() -> T + Send + 'static,
) -> Option<T> {
    let (done, finished) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        let _ = done.send(work());
    });
    match finished.recv_timeout(limit) {
        Ok(value) => Some(value),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match thread.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the thread sends before it ends"),
        },
    }
}
