//! `cible-bench --suite spine`: the seam between acknowledging and acting, measured as a user
//! meets it, over HTTP on loopback and through the CLI binary:
//!
//! - acknowledgement latency of 4 clients sending 20-message batches, without and then with an
//!   admin loop beside them (segment create / edit / delete, traits refresh, model activation);
//! - event to change: a paced load of 50k events/s, where some batches carry a probe event
//!   that makes a new profile enter a segment; the time from sending the batch to the change
//!   arriving on the Server-Sent Events stream;
//! - CLI latency of `segment list`, `segment show` and `profile show`, on the store alone and
//!   beside a running server.

use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cible_core::keys::KeyKind;
use parking_lot::Mutex;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::Global;
use crate::bench::{
    BenchArgs, Row, imported_data, percentile, print_header, print_table, tail_lines,
};

/// How long each ack phase lasts.
const PHASE: Duration = Duration::from_secs(15);

/// Request bodies of `size` messages each from the newest generated ones, with fresh message
/// ids, serialized before a phase starts (the load generator shares the two cores with the
/// server: what it spends per request, the server waits for).
fn requests(tail: &[String], size: usize, tag: &str) -> Vec<String> {
    bodies(tail, size, tag)
        .into_par_iter()
        .map(|batch| json!({ "batch": batch }).to_string())
        .collect()
}

/// Batches of `size` messages from the newest generated ones, with fresh message ids.
fn bodies(tail: &[String], size: usize, tag: &str) -> Vec<Vec<Value>> {
    tail.par_chunks(size)
        .enumerate()
        .map(|(b, chunk)| {
            chunk
                .iter()
                .map(|line| {
                    let mut value: Value = serde_json::from_str(line).expect("generated JSON");
                    value["messageId"] = Value::from(format!(
                        "{tag}-{b}-{}",
                        value["messageId"].as_str().unwrap_or("")
                    ));
                    value
                })
                .collect()
        })
        .collect()
}

/// Four clients send batches as fast as acks come for `PHASE`; returns the ack times (ms).
fn ack_phase(url: &str, auth: &str, batches: &[String], stop_admin: &AtomicBool) -> Vec<f64> {
    let latencies = Mutex::new(Vec::new());
    let next = std::sync::atomic::AtomicUsize::new(0);
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..4 {
            scope.spawn(|| {
                let agent = ureq::AgentBuilder::new().build();
                let mut mine = Vec::new();
                while started.elapsed() < PHASE {
                    let index = next.fetch_add(1, Ordering::Relaxed) % batches.len();
                    let sent = Instant::now();
                    match agent
                        .post(url)
                        .set("Authorization", auth)
                        .send_string(&batches[index])
                    {
                        Ok(_) | Err(ureq::Error::Status(_, _)) => {}
                        Err(error) => panic!("the server did not answer: {error}"),
                    }
                    mine.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                latencies.lock().extend(mine);
            });
        }
    });
    stop_admin.store(true, Ordering::Relaxed);
    let mut latencies = latencies.into_inner();
    latencies.sort_by(f64::total_cmp);
    latencies
}

/// What the admin loop did.
#[derive(Default)]
struct AdminDone {
    rounds: u64,
    slowest_ms: f64,
}

/// Segment create / edit / delete, traits refresh and model activation, in a loop, over HTTP.
fn admin_loop(base: &str, admin: &str, stop: &AtomicBool) -> anyhow::Result<AdminDone> {
    let agent = ureq::AgentBuilder::new().build();
    let bearer = format!("Bearer {admin}");
    let call = |method: &str, path: &str, body: Option<Value>| -> anyhow::Result<f64> {
        let request = agent
            .request(method, &format!("{base}{path}"))
            .set("Authorization", &bearer);
        let started = Instant::now();
        match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        }
        .with_context(|| format!("{method} {path}"))?;
        Ok(started.elapsed().as_secs_f64() * 1000.0)
    };
    let mut done = AdminDone::default();
    while !stop.load(Ordering::Relaxed) {
        done.rounds += 1;
        let round = done.rounds;
        let mut times = vec![
            call(
                "POST",
                "/api/segments",
                Some(json!({"name": format!("bench-admin-{round}"),
                    "rule": r#"count("Email Opened", 7d) >= 2"#})),
            )?,
            call(
                "PUT",
                "/api/segments/bench-edited",
                Some(json!({"rule": if round % 2 == 0 {
                    r#"did("Order Completed", 30d)"#
                } else {
                    r#"count("Page Viewed", 7d) >= 3"#
                }})),
            )?,
            call(
                "DELETE",
                &format!("/api/segments/bench-admin-{round}"),
                None,
            )?,
        ];
        if round % 3 == 0 {
            times.push(call("POST", "/api/traits/refresh", None)?);
        }
        if round % 3 == 1 {
            times.push(call(
                "POST",
                "/api/models/cluster/activate",
                Some(json!({"version": 1})),
            )?);
        }
        done.slowest_ms = times.into_iter().fold(done.slowest_ms, f64::max);
    }
    Ok(done)
}

/// Paced load at `rate` events/s for `seconds`; every batch carries one probe event for a new
/// profile, which enters the segment `bench-probes`. Returns send-to-stream times (ms).
fn event_to_change(
    base: &str,
    auth: &str,
    admin: &str,
    batches: &[Vec<Value>],
    rate: f64,
    seconds: f64,
    tag: &str,
) -> anyhow::Result<Vec<f64>> {
    let batch_size = batches[0].len() + 1;
    let interval = Duration::from_secs_f64(batch_size as f64 / rate);
    let n_batches = (seconds / interval.as_secs_f64()) as usize;
    let bearer = format!("Bearer {admin}");
    let feed_head = || -> anyhow::Result<u64> {
        Ok(ureq::get(&format!("{base}/api/changes?limit=1"))
            .set("Authorization", &bearer)
            .call()?
            .into_json::<Value>()?["head"]
            .as_u64()
            .unwrap_or(0))
    };
    let head = feed_head()?;
    let arrivals: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let streaming = Arc::new(AtomicBool::new(true));
    let reader = {
        let (arrivals, streaming) = (Arc::clone(&arrivals), Arc::clone(&streaming));
        let url = format!("{base}/api/changes/stream?after={head}");
        let bearer = format!("Bearer {admin}");
        std::thread::spawn(move || -> anyhow::Result<()> {
            let response = ureq::get(&url).set("Authorization", &bearer).call()?;
            let reader = BufReader::new(response.into_reader());
            for line in reader.lines() {
                let line = line?;
                let Some(data) = line.strip_prefix("data:") else {
                    continue;
                };
                let change: Value = serde_json::from_str(data.trim())?;
                if change["segment"] == "bench-probes" && change["entered"] == true {
                    let profile = change["profile"].as_u64().unwrap_or(0) as u32;
                    arrivals.lock().push((profile, Instant::now()));
                }
                if !streaming.load(Ordering::Relaxed) {
                    return Ok(());
                }
            }
            Ok(())
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    // Every request serialized before the clock starts.
    let requests: Vec<(String, String)> = (0..n_batches)
        .into_par_iter()
        .map(|i| {
            let probe = format!("bench-probe-{tag}-{i}");
            let mut messages = batches[i % batches.len()].clone();
            for (m, message) in messages.iter_mut().enumerate() {
                message["messageId"] = Value::from(format!("pace-{tag}-{i}-{m}"));
            }
            messages.push(
                json!({"type": "track", "userId": probe, "event": "Bench Probe",
                "messageId": format!("probe-{tag}-{i}")}),
            );
            let body = json!({ "batch": messages }).to_string();
            (probe, body)
        })
        .collect();
    let sent: Mutex<Vec<(String, Instant, Instant)>> = Mutex::new(Vec::new());
    let started = Instant::now();
    // Four senders share the pace: batch i leaves at started + i * interval.
    std::thread::scope(|scope| {
        for client in 0..4 {
            let (sent, requests) = (&sent, &requests);
            scope.spawn(move || {
                let agent = ureq::AgentBuilder::new().build();
                let mut i = client;
                while i < n_batches {
                    let due = started + interval * i as u32;
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    let (probe, body) = &requests[i];
                    let at = Instant::now();
                    if agent
                        .post(&format!("{base}/v1/batch"))
                        .set("Authorization", auth)
                        .send_string(body)
                        .is_ok()
                    {
                        sent.lock().push((probe.clone(), at, Instant::now()));
                    }
                    i += 4;
                }
            });
        }
    });
    let achieved = (n_batches * batch_size) as f64 / started.elapsed().as_secs_f64();
    let head_after = feed_head()?;
    eprintln!(
        "paced load: {achieved:.0} events/s over {n_batches} batches; {} changes written meanwhile ({:.0}/s)",
        head_after - head,
        (head_after - head) as f64 / started.elapsed().as_secs_f64()
    );
    // Let the last changes arrive.
    let waited = Instant::now();
    while arrivals.lock().len() < sent.lock().len() && waited.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(20));
    }
    streaming.store(false, Ordering::Relaxed);
    let arrived: std::collections::HashMap<u32, Instant> =
        arrivals.lock().iter().copied().collect();
    let mut latencies = Vec::new();
    let (mut to_ack, mut ack_to_arrival) = (Vec::new(), Vec::new());
    for (probe, at, acked) in sent.into_inner() {
        let profile = ureq::get(&format!("{base}/api/profiles/{probe}?limit=1"))
            .set("Authorization", &bearer)
            .call()
            .with_context(|| format!("{probe} stored"))?
            .into_json::<Value>()?["id"]
            .as_u64()
            .unwrap_or(u64::MAX) as u32;
        let arrival = arrived
            .get(&profile)
            .with_context(|| format!("{probe} never entered bench-probes"))?;
        latencies.push(arrival.duration_since(at).as_secs_f64() * 1000.0);
        to_ack.push(acked.duration_since(at).as_secs_f64() * 1000.0);
        ack_to_arrival.push(arrival.saturating_duration_since(acked).as_secs_f64() * 1000.0);
    }
    to_ack.sort_by(f64::total_cmp);
    ack_to_arrival.sort_by(f64::total_cmp);
    eprintln!(
        "paced phase, client side: send to ack p50 {:.2} p99 {:.2} ms; ack to stream p50 {:.2} p99 {:.2} ms",
        percentile(&to_ack, 0.5),
        percentile(&to_ack, 0.99),
        percentile(&ack_to_arrival, 0.5),
        percentile(&ack_to_arrival, 0.99),
    );
    drop(reader);
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// User plus system CPU time of a process so far (Linux `/proc`), in seconds.
fn process_cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from its closing parenthesis.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("a /proc stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // In USER_HZ, which Linux's ABI fixes at 100 per second.
    Ok(ticks / 100.0)
}

/// A gauge's value in the server's `/metrics`.
fn gauge(base: &str, name: &str) -> anyhow::Result<f64> {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()?
        .into_string()?;
    text.lines()
        .find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .with_context(|| format!("{name} in /metrics"))
}

/// Waits until no admin job runs and the segment worker has caught up (what the admin loop
/// started finishes before the next phase measures).
fn settle(base: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    while gauge(base, "cible_admin_jobs")? > 0.0 || gauge(base, "cible_feed_lag_batches")? > 0.0 {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(300),
            "the server did not settle in 5 minutes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// The cumulative bucket counts of a histogram in the server's `/metrics`.
fn histogram(base: &str, name: &str) -> anyhow::Result<Vec<(String, f64)>> {
    let text = ureq::get(&format!("{base}/metrics"))
        .call()?
        .into_string()?;
    Ok(text
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&format!("{name}_bucket{{le=\""))?;
            let (bound, count) = rest.split_once("\"} ")?;
            Some((bound.to_string(), count.trim().parse().ok()?))
        })
        .collect())
}

/// The bucket bound under which `p` of the observations made between two readings fall.
fn bucket_percentile(before: &[(String, f64)], after: &[(String, f64)], p: f64) -> String {
    let total = after.last().map_or(0.0, |b| b.1) - before.last().map_or(0.0, |b| b.1);
    for ((bound, a), (_, b)) in after.iter().zip(before) {
        if total > 0.0 && a - b >= p * total {
            return format!("<= {bound} s");
        }
    }
    "-".into()
}

const CLI_COMMANDS: [(&str, &[&str]); 3] = [
    ("`segment list`", &["segment", "list"]),
    ("`segment show`", &["segment", "show", "b00"]),
    ("`profile show`", &["profile", "show", "user-7"]),
];

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, now, engine) = imported_data(global, args)?;
    let events = engine.load_stats().events;
    let profiles = engine.load_stats().profiles;
    for (i, rule) in cible_core::segment::BATTERY.iter().enumerate() {
        let expr = cible_lang::parse(rule).map_err(|d| anyhow::anyhow!(d.message))?;
        engine.create_segment(&format!("b{i:02}"), expr, rule, now)?;
    }
    for (name, rule) in [
        ("bench-edited", r#"count("Page Viewed", 7d) >= 3"#),
        ("bench-engaged", r#"score.engagement >= 50"#),
    ] {
        let expr = cible_lang::parse(rule).map_err(|d| anyhow::anyhow!(d.message))?;
        engine.create_segment(name, expr, rule, now)?;
    }
    let params = cible_core::models::ClusterParams {
        min_k: 2,
        max_k: 4,
        restarts: 1,
        sample: 2000,
        seed: 1,
    };
    let (_, model) = engine.cluster(now, &params)?;
    engine.save_model(model, now)?;
    let admin = engine.create_key(KeyKind::Admin, "bench", now)?;
    let write = engine.create_key(KeyKind::Write, "bench", now)?;
    engine.checkpoint()?;
    let data = work.path().join("store");
    drop(engine);

    // The CLI on the store alone.
    let mut rows = Vec::new();
    let mut alone = Vec::new();
    for (name, command) in CLI_COMMANDS {
        alone.push((name, crate::bench::cli_ms(&data, now, command)?));
    }

    // The server, as a user runs it: `cible serve` on the same store, over loopback.
    let (mut child, address) = crate::bench::spawn_server(&data, now)?;
    let base = format!("http://{address}");
    for (name, command) in CLI_COMMANDS {
        let beside = crate::bench::cli_ms(&data, now, command)?;
        let (_, without) = alone.iter().find(|(n, _)| *n == name).expect("same list");
        rows.push(Row {
            measure: name,
            value: format!("{without:.0} ms alone, {beside:.0} ms beside the server"),
            baseline: "-".into(),
            ratio: format!(
                "{:.2}x / {:.2}x the target",
                without / 100.0,
                beside / 100.0
            ),
            target: "<= 100 ms",
        });
    }

    let tail = tail_lines(&file, 200_000)?;
    let auth = crate::bench::basic_auth(&write);
    let url = format!("{base}/v1/batch");
    eprintln!("acks without admin work ...");
    let plain = ack_phase(
        &url,
        &auth,
        &requests(&tail, 20, "plain"),
        &AtomicBool::new(false),
    );
    eprintln!("acks with the admin loop ...");
    let stop_admin = AtomicBool::new(false);
    let busy_requests = requests(&tail, 20, "busy");
    let (busy, admin_done) = std::thread::scope(|scope| {
        let admin_thread = scope.spawn(|| admin_loop(&base, &admin, &stop_admin));
        let busy = ack_phase(&url, &auth, &busy_requests, &stop_admin);
        (busy, admin_thread.join())
    });
    let admin_done = admin_done.map_err(|_| anyhow::anyhow!("admin loop panicked"))??;
    let (p99_plain, p99_busy) = (percentile(&plain, 0.99), percentile(&busy, 0.99));
    rows.push(Row {
        measure: "ack, 4 clients x 20-message batches (ms)",
        value: format!(
            "p50 {:.2}, p90 {:.2}, p99 {:.2} with the admin loop ({} rounds, slowest call {:.0} ms)",
            percentile(&busy, 0.5),
            percentile(&busy, 0.9),
            p99_busy,
            admin_done.rounds,
            admin_done.slowest_ms
        ),
        baseline: format!(
            "p50 {:.2}, p99 {p99_plain:.2} without ({} and {} acks)",
            percentile(&plain, 0.5),
            plain.len(),
            busy.len()
        ),
        ratio: format!("{:.2}x", p99_busy / p99_plain),
        target: "p99 <= 1.5x",
    });

    settle(&base)?;
    eprintln!("event to change at 50k events/s ...");
    {
        let rule = r#"did("Bench Probe", 1d)"#;
        // The probe's event name must exist before its rule is planned.
        let seed = json!({"batch": [{"type": "track", "userId": "bench-probe-seed",
            "event": "Bench Probe", "messageId": "probe-seed"}]});
        ureq::post(&url)
            .set("Authorization", &auth)
            .send_string(&seed.to_string())?;
        ureq::post(&format!("{base}/api/segments"))
            .set("Authorization", &format!("Bearer {admin}"))
            .send_json(json!({"name": "bench-probes", "rule": rule}))?;
    }
    let ack_p99 = percentile(&plain, 0.99);
    // At the target's rate, then at half of it (no target): whether the tail is the two cores'
    // queue (the load generator shares them with the server) or waiting on the disk.
    for (rate, tag, measure, target) in [
        (
            50_000.0,
            "full",
            "event to change on the stream, 50k events/s (ms)",
            "p99 <= 10 ms",
        ),
        (
            25_000.0,
            "half",
            "event to change on the stream, 25k events/s (ms)",
            "- (half the target's rate)",
        ),
    ] {
        let feed_before = histogram(&base, "cible_batch_to_feed_seconds")?;
        let ack_before = histogram(&base, "cible_ack_seconds")?;
        let cpu_before = process_cpu_seconds(child.id())?;
        let started = Instant::now();
        let paced = event_to_change(
            &base,
            &auth,
            &admin,
            &bodies(&tail, 99, &format!("paced-{tag}")),
            rate,
            10.0,
            tag,
        )?;
        let cores =
            (process_cpu_seconds(child.id())? - cpu_before) / started.elapsed().as_secs_f64();
        let (feed_after, ack_after) = (
            histogram(&base, "cible_batch_to_feed_seconds")?,
            histogram(&base, "cible_ack_seconds")?,
        );
        eprintln!(
            "paced phase, server side: {cores:.2} cores busy; ack p50 {} p99 {}; commit to feed p50 {} p99 {}",
            bucket_percentile(&ack_before, &ack_after, 0.5),
            bucket_percentile(&ack_before, &ack_after, 0.99),
            bucket_percentile(&feed_before, &feed_after, 0.5),
            bucket_percentile(&feed_before, &feed_after, 0.99),
        );
        rows.push(Row {
            measure,
            value: format!(
                "p50 {:.2}, p90 {:.2}, p99 {:.2} ({} probes; the server used {cores:.2} of 2 cores)",
                percentile(&paced, 0.5),
                percentile(&paced, 0.9),
                percentile(&paced, 0.99),
                paced.len()
            ),
            baseline: format!("ack p99 {ack_p99:.2} (no admin)"),
            ratio: format!("{:.2}x 10 ms", percentile(&paced, 0.99) / 10.0),
            target,
        });
    }
    crate::bench::stop_server(&mut child)?;
    print_header("spine", &generated, events, profiles, "", args.days);
    print_table("Acknowledgements, the change feed and the CLI", rows);
    Ok(())
}
