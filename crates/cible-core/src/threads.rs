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
