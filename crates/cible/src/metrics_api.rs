//! `/metrics`: the engine's measures in the Prometheus text format (version 0.0.4). Open
//! like `/healthz`: it shows counts and timings, never data about a person.

use std::fmt::Write;
use std::sync::atomic::Ordering;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use cible_core::metrics::{BUCKETS, Histogram};

use crate::server::AppState;

fn histogram(out: &mut String, name: &str, help: &str, histogram: &Histogram) {
    let snapshot = histogram.snapshot();
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} histogram");
    for (bound, count) in BUCKETS.iter().zip(&snapshot.cumulative) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {count}");
    }
    let total = snapshot.cumulative.last().copied().unwrap_or(0);
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
    let _ = writeln!(out, "{name}_sum {}", snapshot.sum_seconds);
    let _ = writeln!(out, "{name}_count {}", snapshot.count);
}

fn scalar(out: &mut String, name: &str, kind: &str, help: &str, value: impl std::fmt::Display) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    let _ = writeln!(out, "{name} {value}");
}

/// Label values escaped as the text format asks.
fn label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let engine = std::sync::Arc::clone(&state.engine);
    let body = tokio::task::spawn_blocking(move || render(&engine))
        .await
        .unwrap_or_default();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

fn render(engine: &cible_core::Engine) -> String {
    let metrics = &engine.metrics;
    let mut out = String::new();
    let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
    scalar(
        &mut out,
        "cible_events_accepted_total",
        "counter",
        "Messages accepted and stored since start.",
        load(&metrics.events_accepted),
    );
    scalar(
        &mut out,
        "cible_events_duplicate_total",
        "counter",
        "Messages recognised as duplicates since start.",
        load(&metrics.events_duplicate),
    );
    scalar(
        &mut out,
        "cible_events_quarantined_total",
        "counter",
        "Messages quarantined since start.",
        load(&metrics.events_quarantined),
    );
    scalar(
        &mut out,
        "cible_batches_committed_total",
        "counter",
        "Group commits since start.",
        load(&metrics.batches_committed),
    );
    histogram(
        &mut out,
        "cible_ack_seconds",
        "Time from receiving a tracking request to answering it (durable).",
        &metrics.ack_latency,
    );
    scalar(
        &mut out,
        "cible_admin_jobs",
        "gauge",
        "Admin calls running now (segment edits, previews, refreshes, trainings).",
        load(&metrics.admin_jobs),
    );
    scalar(
        &mut out,
        "cible_segments_ready",
        "gauge",
        "1 once the first evaluation pass after start is done (memberships current).",
        load(&metrics.segments_ready),
    );
    scalar(
        &mut out,
        "cible_segment_queue_profiles",
        "gauge",
        "Profiles of committed batches waiting for the segment worker.",
        load(&metrics.queue_depth),
    );
    let handed = load(&metrics.batches_handed);
    let evaluated = load(&metrics.batches_evaluated);
    scalar(
        &mut out,
        "cible_feed_lag_batches",
        "gauge",
        "Committed batches the segment worker has not evaluated yet.",
        handed.saturating_sub(evaluated),
    );
    histogram(
        &mut out,
        "cible_batch_to_feed_seconds",
        "Time from a batch's commit to its membership changes being in the change feed.",
        &metrics.batch_to_feed,
    );
    scalar(
        &mut out,
        "cible_feed_head",
        "gauge",
        "Sequence number of the last change in the feed.",
        load(&metrics.feed_head),
    );
    scalar(
        &mut out,
        "cible_changes_written_total",
        "counter",
        "Membership changes written to the feed since start.",
        load(&metrics.changes_written),
    );
    let _ = writeln!(
        out,
        "# HELP cible_segment_evaluation_seconds_total Time spent evaluating each segment since start."
    );
    let _ = writeln!(out, "# TYPE cible_segment_evaluation_seconds_total counter");
    let timings = metrics.segment_timings();
    for (name, timing) in &timings {
        let _ = writeln!(
            out,
            "cible_segment_evaluation_seconds_total{{segment=\"{}\"}} {}",
            label(name),
            timing.seconds
        );
    }
    let _ = writeln!(
        out,
        "# HELP cible_segment_evaluations_total Profile evaluations of each segment since start."
    );
    let _ = writeln!(out, "# TYPE cible_segment_evaluations_total counter");
    for (name, timing) in &timings {
        let _ = writeln!(
            out,
            "cible_segment_evaluations_total{{segment=\"{}\"}} {}",
            label(name),
            timing.profiles
        );
    }
    scalar(
        &mut out,
        "cible_journal_bytes",
        "gauge",
        "Bytes of the store's journal (writes not yet in a keyspace's tables).",
        engine.journal_bytes(),
    );
    let _ = writeln!(
        out,
        "# HELP cible_store_bytes Bytes on disk per keyspace (tables; see cible_journal_bytes)."
    );
    let _ = writeln!(out, "# TYPE cible_store_bytes gauge");
    for (name, bytes) in engine.store_sizes() {
        let _ = writeln!(out, "cible_store_bytes{{keyspace=\"{name}\"}} {bytes}");
    }
    out
}
