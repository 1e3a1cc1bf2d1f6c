//! The webhooks suite, through `cible serve` as a user runs it: a receiver on loopback (in this
//! process: HTTP/1.1 keep-alive, a thread per connection, answers 200 at once) gets the signed
//! deliveries of a segment's changes.
//!
//! - Deliveries per second: the subscription created disabled, N changes written, then enabled:
//!   the time from the first to the last delivery. Baseline, same run: the same receiver's
//!   ceiling, the same bodies posted by a plain client from this process with as many
//!   connections as the sender uses (64).
//! - Event to webhook received at 10,000 changes/s: batches of 100 new buyers every 10 ms; each
//!   change's latency is from its batch being sent to its delivery arriving.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cible_core::Engine;
use cible_core::keys::KeyKind;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::Global;
use crate::bench::{BenchArgs, Row, percentile, print_table};

/// What the receiver saw: how many, and when each user's delivery arrived.
#[derive(Default)]
struct Seen {
    count: AtomicU64,
    arrivals: Mutex<HashMap<String, Instant>>,
    first: Mutex<Option<Instant>>,
    last: Mutex<Option<Instant>>,
}

fn receive(stream: TcpStream, seen: &Seen) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    loop {
        let mut length = 0usize;
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        loop {
            line.clear();
            reader.read_line(&mut line)?;
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0u8; length];
        reader.read_exact(&mut body)?;
        let now = Instant::now();
        seen.count.fetch_add(1, Ordering::Relaxed);
        seen.first.lock().get_or_insert(now);
        *seen.last.lock() = Some(now);
        // The user id, for the latency: `"user_id":"..."`.
        if let Some(at) = memchr_find(&body, b"\"user_id\":\"") {
            let rest = &body[at + 11..];
            if let Some(end) = rest.iter().position(|b| *b == b'"') {
                let user = String::from_utf8_lossy(&rest[..end]).into_owned();
                seen.arrivals.lock().insert(user, now);
            }
        }
        writer.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")?;
    }
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn start_receiver(seen: Arc<Seen>) -> anyhow::Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let seen = Arc::clone(&seen);
            std::thread::spawn(move || {
                let _ = receive(stream, &seen);
            });
        }
    });
    Ok(port)
}

fn wait_until(what: &str, secs: u64, done: impl Fn() -> bool) -> anyhow::Result<()> {
    let started = Instant::now();
    while !done() {
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(secs),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn buyers(tag: &str, from: usize, n: usize) -> String {
    let batch: Vec<Value> = (from..from + n)
        .map(|i| {
            json!({"type": "track", "userId": format!("{tag}-{i}"), "event": "Order Completed",
                "messageId": format!("{tag}-m{i}")})
        })
        .collect();
    json!({"batch": batch}).to_string()
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let now = global.now_ms()?;
    let work = tempfile::Builder::new()
        .prefix("cible-bench-webhooks-")
        .tempdir_in(&args.dir)?;
    let data = work.path().join("store");
    let (admin, write) = {
        let engine = Engine::open(&data)?;
        let keys = (
            engine.create_key(KeyKind::Admin, "bench", now)?,
            engine.create_key(KeyKind::Write, "bench", now)?,
        );
        engine.checkpoint()?;
        keys
    };
    let (mut child, address) = crate::bench::spawn_server(&data, now)?;
    let base = format!("http://{address}");
    let bearer = format!("Bearer {admin}");
    let auth = crate::bench::basic_auth(&write);
    let api = |method: &str, path: &str, body: Value| -> anyhow::Result<Value> {
        Ok(ureq::request(method, &format!("{base}{path}"))
            .set("Authorization", &bearer)
            .send_json(body)?
            .into_json()?)
    };
    let post_batch = |body: &str| -> anyhow::Result<()> {
        ureq::post(&format!("{base}/v1/batch"))
            .set("Authorization", &auth)
            .set("Content-Type", "application/json")
            .send_string(body)?;
        Ok(())
    };
    // The event name first, so the rule is planned against it.
    post_batch(&buyers("seed", 0, 1))?;
    api(
        "POST",
        "/api/segments",
        json!({"name": "buyers", "rule": "did(\"Order Completed\", 30d)"}),
    )?;
    let seen = Arc::new(Seen::default());
    let port = start_receiver(Arc::clone(&seen))?;
    let n = usize::try_from(args.profiles)
        .unwrap_or(100_000)
        .clamp(10_000, 1_000_000);
    let mut rows = Vec::new();

    // Deliveries per second: queue N changes with the subscription disabled, then enable.
    let created = api(
        "POST",
        "/api/webhooks",
        json!({"url": format!("http://127.0.0.1:{port}/bulk"), "segment": "buyers",
            "on": ["enter"], "purpose": "analytics"}),
    )?;
    let id = created["webhook"]["id"].as_u64().unwrap_or(1);
    api("POST", &format!("/api/webhooks/{id}/disable"), json!({}))?;
    eprintln!("writing {n} changes ...");
    for start in (0..n).step_by(1000) {
        post_batch(&buyers("bulk", start, 1000.min(n - start)))?;
    }
    let head_for = |expected: u64| -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let page: Value = ureq::get(&format!("{base}/api/changes?limit=1"))
                .set("Authorization", &bearer)
                .call()?
                .into_json()?;
            if page["head"].as_u64().unwrap_or(0) >= expected {
                return Ok(());
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(600),
                "the feed stalled"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    head_for(n as u64 + 1)?;
    eprintln!("delivering ...");
    api("POST", &format!("/api/webhooks/{id}/enable"), json!({}))?;
    wait_until("every delivery", 600, || {
        seen.count.load(Ordering::Relaxed) >= n as u64
    })?;
    let span = seen.last.lock().unwrap() - seen.first.lock().unwrap();
    let rate = n as f64 / span.as_secs_f64();

    // The baseline: the receiver's ceiling with a plain client, 64 connections.
    // A body the size of the deliveries'.
    let body = json!({"type": "segment.entered", "timestamp": "2026-05-01T12:00:00.000Z",
        "data": {"sequence": 1, "segment": "buyers", "change": "enter", "cause": "events",
            "at": "2026-05-01T12:00:00.000Z", "segment_size": 1,
            "profile": {"id": 1, "user_id": "bulk-1"}}})
    .to_string();
    let before = seen.count.load(Ordering::Relaxed);
    let started = Instant::now();
    let per_thread = n / 64;
    std::thread::scope(|scope| {
        for _ in 0..64 {
            let body = &body;
            scope.spawn(move || {
                let agent = ureq::AgentBuilder::new()
                    .max_idle_connections_per_host(1)
                    .build();
                for _ in 0..per_thread {
                    let _ = agent
                        .post(&format!("http://127.0.0.1:{port}/baseline"))
                        .set("webhook-id", "msg_1_1")
                        .set("Content-Type", "application/json")
                        .send_string(body);
                }
            });
        }
    });
    let baseline_rate =
        (seen.count.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    rows.push(Row {
        measure: "webhook deliveries per second, one subscription, loopback receiver",
        value: format!(
            "{rate:.0}/s ({n} deliveries in {:.2} s)",
            span.as_secs_f64()
        ),
        baseline: format!(
            "{baseline_rate:.0}/s: the same receiver, a plain client, 64 connections"
        ),
        ratio: format!(
            "{:.2}x the baseline, {:.2}x the target",
            rate / baseline_rate,
            rate / 20_000.0
        ),
        target: ">= 20,000/s",
    });

    // Event to webhook received at 10k changes/s.
    api(
        "POST",
        "/api/webhooks",
        json!({"url": format!("http://127.0.0.1:{port}/latency"), "segment": "buyers",
            "on": ["enter"], "purpose": "analytics"}),
    )?;
    api("DELETE", &format!("/api/webhooks/{id}"), Value::Null)?;
    let batches = 500usize;
    let bodies: Vec<String> = (0..batches).map(|b| buyers("lat", b * 100, 100)).collect();
    eprintln!("event to webhook at 10,000 changes/s ...");
    // Four clients, so that one acknowledgement's time does not hold back the pace: batch b
    // leaves at 10 ms x b.
    let sent: Mutex<Vec<Option<Instant>>> = Mutex::new(vec![None; batches]);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for client in 0..4 {
            let (bodies, sent, post_batch) = (&bodies, &sent, &post_batch);
            scope.spawn(move || {
                for b in (client..batches).step_by(4) {
                    let due = start + Duration::from_millis(10 * b as u64);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                    sent.lock()[b] = Some(Instant::now());
                    let _ = post_batch(&bodies[b]);
                }
            });
        }
    });
    let sent_at: Vec<Instant> = sent
        .into_inner()
        .into_iter()
        .map(|t| t.unwrap_or(start))
        .collect();
    let elapsed = start.elapsed().as_secs_f64();
    wait_until("the latency deliveries", 120, || {
        let arrivals = seen.arrivals.lock();
        (0..batches * 100).all(|i| arrivals.contains_key(&format!("lat-{i}")))
    })?;
    let mut latencies: Vec<f64> = {
        let arrivals = seen.arrivals.lock();
        (0..batches * 100)
            .map(|i| (arrivals[&format!("lat-{i}")] - sent_at[i / 100]).as_secs_f64() * 1000.0)
            .collect()
    };
    latencies.sort_by(f64::total_cmp);
    let sent_rate = (batches * 100) as f64 / elapsed;
    let p99 = percentile(&latencies, 0.99);
    rows.push(Row {
        measure: "event to webhook received, 10k changes/s (ms)",
        value: format!(
            "p50 {:.1}, p90 {:.1}, p99 {p99:.1}, max {:.1} ({:.0} changes/s sent)",
            percentile(&latencies, 0.5),
            percentile(&latencies, 0.9),
            latencies.last().copied().unwrap_or(0.0),
            sent_rate
        ),
        baseline: "-".into(),
        ratio: format!("{:.2}x the target", p99 / 50.0),
        target: "p99 <= 50 ms",
    });
    crate::bench::stop_server(&mut child)?;
    println!(
        "cible-bench --suite webhooks: {n} changes delivered, then 50,000 at 10k/s, {} cores\n",
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    print_table("### Webhooks, through `cible serve`", rows);
    Ok(())
}
