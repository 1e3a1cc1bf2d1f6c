//! Concurrency: everything the server does at once, against the real binary. Four clients
//! ingest while an admin loop creates, edits and deletes segments, refreshes computed traits and
//! trains and activates models, and one-minute windows expire (their timers fire during the
//! test). It fails on any hang (an acknowledgement over 10 s, an admin call over 30 s, or the
//! server not answering), then checks the change feed against the stored memberships and a
//! batch rebuild.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::common::*;

/// Longest an acknowledgement may take before the test calls it a hang.
const HANG: Duration = Duration::from_secs(10);
/// Longest an admin call (a traits refresh, a training: whole-population work) may take before
/// the test calls it a hang: a debug build beside the rest of the test suite once took over 10 s.
const ADMIN_HANG: Duration = Duration::from_secs(30);

fn request(method: &str, url: &str, admin: &str, body: Option<&Value>) -> Result<Answer, String> {
    let request = ureq::request(method, url)
        .timeout(ADMIN_HANG)
        .set("Authorization", &format!("Bearer {admin}"));
    let result = match body {
        Some(body) => request.send_json(body.clone()),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => return Err(format!("{method} {url}: {other}")),
    };
    let status = response.status();
    let text = response.into_string().map_err(|e| e.to_string())?;
    Ok(Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry_after: None,
    })
}

fn admin_ok(method: &str, url: &str, admin: &str, body: Option<&Value>) -> Value {
    let started = Instant::now();
    let answer = request(method, url, admin, body).unwrap_or_else(|e| panic!("hang? {e}"));
    assert!(
        started.elapsed() < ADMIN_HANG,
        "{method} {url} took {:?}",
        started.elapsed()
    );
    assert!(
        answer.status < 300,
        "{method} {url}: {} {}",
        answer.status,
        answer.body
    );
    answer.body
}

/// Every change in the feed, in order.
pub fn all_changes(base: &str, admin: &str) -> Vec<Value> {
    let mut changes = Vec::new();
    let mut after = 0;
    loop {
        let page = admin_ok(
            "GET",
            &format!("{base}/api/changes?after={after}&limit=10000"),
            admin,
            None,
        );
        let items = page["changes"].as_array().cloned().unwrap_or_default();
        if items.is_empty() {
            return changes;
        }
        after = items.last().unwrap()["seq"].as_u64().unwrap();
        changes.extend(items);
    }
}

/// Checks the feed's numbering and replays it: the members of each segment it implies.
pub fn replay(changes: &[Value]) -> BTreeMap<String, BTreeSet<u64>> {
    let first = changes.first().map_or(1, |c| c["seq"].as_u64().unwrap());
    let mut members: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for (index, change) in changes.iter().enumerate() {
        assert_eq!(
            change["seq"].as_u64().unwrap(),
            first + index as u64,
            "the feed is gap-free and in order"
        );
        let segment = change["segment"].as_str().unwrap().to_string();
        let profile = change["profile"].as_u64().unwrap();
        let set = members.entry(segment.clone()).or_default();
        if change["entered"].as_bool().unwrap() {
            assert!(
                set.insert(profile),
                "{segment}: profile {profile} entered twice without exiting ({change})"
            );
        } else {
            assert!(
                set.remove(&profile),
                "{segment}: profile {profile} exited without being in ({change})"
            );
        }
        assert_eq!(
            change["size"].as_u64().unwrap(),
            set.len() as u64,
            "{segment}: the size after each change is the replayed one"
        );
    }
    members
}

/// A segment's stored members, through the API.
pub fn stored_members(base: &str, admin: &str, name: &str) -> BTreeSet<u64> {
    let page = admin_ok(
        "GET",
        &format!("{base}/api/segments/{name}/members?limit=100000"),
        admin,
        None,
    );
    page["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["profile"].as_u64().unwrap())
        .collect()
}

/// A batch rebuild of a rule now, over every profile (the preview); the whole set while it
/// holds at most 1000 members.
pub fn rebuilt_members(base: &str, admin: &str, rule: &str) -> BTreeSet<u64> {
    let preview = admin_ok(
        "POST",
        &format!("{base}/api/segments/preview"),
        admin,
        Some(&json!({"rule": rule, "sample": 1000})),
    );
    assert!(
        preview["count"].as_u64().unwrap() <= 1000,
        "population too big for the check"
    );
    preview["sample"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["profile"].as_u64().unwrap())
        .collect()
}

/// Waits until the segment worker has done its first pass and evaluated every committed batch.
pub fn settle(base: &str) {
    let started = Instant::now();
    loop {
        let metrics = ureq::get(&format!("{base}/metrics"))
            .timeout(HANG)
            .call()
            .expect("metrics answer")
            .into_string()
            .unwrap();
        let value = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(-1.0)
        };
        // The first evaluation after a start runs while the server already answers.
        if value("cible_segments_ready") == 1.0
            && value("cible_feed_lag_batches") == 0.0
            && value("cible_segment_queue_profiles") == 0.0
        {
            return;
        }
        assert!(
            started.elapsed() < HANG,
            "the segment worker does not catch up"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Messages of one client batch. Pings are 50 to 58 s old, so the one-minute window on them
/// closes a few seconds after they arrive: the timers fire during the test.
fn client_batch(client: usize, batch: usize) -> Value {
    let now = chrono::Utc::now();
    let messages: Vec<Value> = (0..20)
        .map(|i| {
            let user = format!("u{}", (client * 7 + batch * 3 + i) % 120);
            let id = format!("c{client}-b{batch}-m{i}");
            match i % 5 {
                0 => {
                    let ts = now - chrono::Duration::milliseconds(50_000 + (i as i64 * 400));
                    json!({"type": "track", "userId": user, "event": "Ping", "messageId": id,
                        "timestamp": ts.to_rfc3339()})
                }
                1 => json!({"type": "track", "userId": user, "event": "Order Completed",
                    "messageId": id, "properties": {"revenue": (batch % 7) * 30}}),
                2 => json!({"type": "identify", "userId": user, "messageId": id,
                    "traits": {"plan": if batch.is_multiple_of(2) { "pro" } else { "free" },
                        "consent_email": !batch.is_multiple_of(3)}}),
                3 => json!({"type": "track", "userId": user, "event": "Email Opened",
                    "messageId": id, "context": {"consent": {"categoryPreferences":
                        {"Profiling": !batch.is_multiple_of(5)}}}}),
                _ => json!({"type": "track", "userId": user, "event": "Email Opened",
                    "messageId": id}),
            }
        })
        .collect();
    json!({ "batch": messages })
}

const STABLE: [(&str, &str); 5] = [
    ("recent", r#"did("Ping", 1m)"#),
    ("buyers", r#"sum("Order Completed".revenue, 30d) > 200"#),
    (
        "recent-openers",
        r#"in_segment("recent") and count("Email Opened", 7d) >= 2"#,
    ),
    (
        "pro-engaged",
        r#"trait.plan = "pro" and score.engagement >= 30"#,
    ),
    ("mailable", r#"consent.email and did("Email Opened", 7d)"#),
];
const EDITED: [&str; 2] = [
    r#"count("Email Opened", 7d) >= 3"#,
    r#"did("Order Completed", 1d) and not did("Ping", 1m)"#,
];

/// A server on the wall clock with a write and an admin key and the `STABLE` segments (their
/// names known first, from one batch).
fn started_with_segments() -> (tempfile::TempDir, Server, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let admin = create_key(dir.path(), "--admin");
    let server = Server::start_unpinned(dir.path());
    let base = server.base.clone();
    let seed = post(&format!("{base}/v1/batch"), &write, &client_batch(9, 0));
    assert_eq!(seed.status, 200, "{}", seed.body);
    for (name, rule) in STABLE {
        admin_ok(
            "POST",
            &format!("{base}/api/segments"),
            &admin,
            Some(&json!({"name": name, "rule": rule})),
        );
    }
    (dir, server, write, admin)
}

#[test]
fn ingestion_admin_work_and_timers_at_once_never_hang_and_the_feed_matches_a_rebuild() {
    let (_dir, server, write, admin) = started_with_segments();
    let base = server.base.clone();
    admin_ok(
        "POST",
        &format!("{base}/api/segments"),
        &admin,
        Some(&json!({"name": "edited", "rule": EDITED[0]})),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let worst_ack_ms = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (stop, worst, acked) = (
                Arc::clone(&stop),
                Arc::clone(&worst_ack_ms),
                Arc::clone(&acknowledged),
            );
            let (base, write) = (base.clone(), write.clone());
            std::thread::spawn(move || {
                let mut batch = 1;
                while !stop.load(Ordering::Relaxed) {
                    let body = client_batch(client, batch).to_string();
                    let started = Instant::now();
                    let answer = try_post(
                        &format!("{base}/v1/batch"),
                        &[("Authorization", &basic(&write))],
                        body.as_bytes(),
                    )
                    .unwrap_or_else(|e| panic!("client {client}: the server did not answer: {e}"));
                    let elapsed = started.elapsed();
                    worst.fetch_max(elapsed.as_millis() as u64, Ordering::Relaxed);
                    assert!(elapsed < HANG, "client {client}: an ack took {elapsed:?}");
                    assert_eq!(answer.status, 200, "client {client}: {}", answer.body);
                    acked.fetch_add(20, Ordering::Relaxed);
                    batch += 1;
                }
            })
        })
        .collect();

    // The admin loop, beside the clients, for 20 s.
    let started = Instant::now();
    let mut round = 0;
    while started.elapsed() < Duration::from_secs(20) {
        round += 1;
        admin_ok(
            "POST",
            &format!("{base}/api/segments"),
            &admin,
            Some(&json!({"name": format!("tmp-{round}"), "rule": r#"did("Email Opened", 1d)"#})),
        );
        admin_ok(
            "PUT",
            &format!("{base}/api/segments/edited"),
            &admin,
            Some(&json!({"rule": EDITED[round % 2]})),
        );
        if round > 1 {
            admin_ok(
                "DELETE",
                &format!("{base}/api/segments/tmp-{}", round - 1),
                &admin,
                None,
            );
        }
        if round % 4 == 0 {
            admin_ok("POST", &format!("{base}/api/traits/refresh"), &admin, None);
        }
        if round % 6 == 1 {
            admin_ok(
                "POST",
                &format!("{base}/api/models"),
                &admin,
                Some(
                    &json!({"kind": "cluster", "min_k": 2, "max_k": 3, "restarts": 1, "sample": 200}),
                ),
            );
            // Back to the first version: an activation of its own.
            let version = 1;
            admin_ok(
                "POST",
                &format!("{base}/api/models/cluster/activate"),
                &admin,
                Some(&json!({"version": version})),
            );
            if round == 1 {
                // Profiling objections (API and consent tool) take profiles out of it.
                admin_ok(
                    "POST",
                    &format!("{base}/api/segments"),
                    &admin,
                    Some(&json!({"name": "clustered", "rule": "cluster.id >= 0"})),
                );
            }
        }
        // Consent through the API, beside the clients' own consent changes.
        admin_ok(
            "PUT",
            &format!("{base}/api/profiles/u{}/consents", 63 + round % 20),
            &admin,
            Some(&json!({"purposes": {"email": round % 2 == 0, "profiling": round % 3 != 0}})),
        );
        if round % 3 == 0 {
            // Readers beside the writers.
            admin_ok(
                "GET",
                &format!("{base}/api/changes?limit=100"),
                &admin,
                None,
            );
            admin_ok("GET", &format!("{base}/api/segments"), &admin, None);
        }
    }
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.join().expect("a client failed");
    }
    assert!(
        acknowledged.load(Ordering::Relaxed) > 2_000,
        "the clients made progress"
    );
    eprintln!(
        "{} messages acknowledged, {round} admin rounds, worst ack {} ms",
        acknowledged.load(Ordering::Relaxed),
        worst_ack_ms.load(Ordering::Relaxed)
    );

    // The youngest Ping was 50 s old when sent: 12 s later every Ping is over a minute old, and
    // the one-minute segments have emptied by their timers.
    settle(&base);
    std::thread::sleep(Duration::from_secs(12));
    settle(&base);
    let changes = all_changes(&base, &admin);
    let replayed = replay(&changes);
    let causes: BTreeSet<&str> = changes.iter().filter_map(|c| c["cause"].as_str()).collect();
    for cause in ["events", "timer", "segment_edit"] {
        assert!(
            causes.contains(cause),
            "no change caused by {cause}: {causes:?}"
        );
    }
    let current = admin_ok("GET", &format!("{base}/api/segments"), &admin, None);
    let rules: BTreeMap<String, String> = current
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                s["rule"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (name, rule) in &rules {
        if name.starts_with("tmp-") {
            // Re-created names do not repeat; the one left was never deleted.
            assert_eq!(name, &format!("tmp-{round}"));
        }
        let stored = stored_members(&base, &admin, name);
        let rebuilt = rebuilt_members(&base, &admin, rule);
        assert_eq!(stored, rebuilt, "{name}: stored against a batch rebuild");
        assert_eq!(
            replayed.get(name).cloned().unwrap_or_default(),
            stored,
            "{name}: the feed replayed against the stored membership"
        );
    }
    assert!(
        replayed.get("recent").is_none_or(|m| m.is_empty()),
        "one-minute windows expired by their timers"
    );
    server.stop();
}

/// Reads the change stream (from the start, or from `Last-Event-ID` when `resume` is given)
/// until `enough` says so after a change; returns what it read.
fn read_stream(
    base: &str,
    admin: &str,
    resume: Option<u64>,
    enough: impl Fn(&[Value]) -> bool,
    deadline: Instant,
) -> Vec<Value> {
    use std::io::BufRead;
    let mut request = ureq::get(&format!("{base}/api/changes/stream?after=0"))
        .set("Authorization", &format!("Bearer {admin}"));
    if let Some(seq) = resume {
        request = request.set("Last-Event-ID", &seq.to_string());
    }
    let response = request
        .timeout(HANG * 6)
        .call()
        .expect("the stream answers");
    let mut changes = Vec::new();
    for line in std::io::BufReader::new(response.into_reader()).lines() {
        let Ok(line) = line else { break };
        if let Some(data) = line.strip_prefix("data:") {
            changes.push(serde_json::from_str::<Value>(data.trim()).unwrap());
            if enough(&changes) {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the stream stalls");
    }
    changes
}

/// The change stream read while 4 clients ingest, by one reader straight through and one that
/// disconnects midway and resumes with `Last-Event-ID`: both read exactly the feed (same
/// changes, same order, none twice), bounded in time.
#[test]
fn the_change_stream_under_concurrent_ingestion_is_the_feed_resumed_or_not() {
    let (_dir, server, write, admin) = started_with_segments();
    let base = server.base.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    // How many changes the readers must read: known once ingestion is over (0 until then).
    let target = Arc::new(AtomicU64::new(0));
    let done = {
        let target = Arc::clone(&target);
        move |changes: &[Value]| {
            let target = target.load(Ordering::Acquire) as usize;
            target > 0 && changes.len() >= target
        }
    };
    let straight = {
        let (base, admin) = (base.clone(), admin.clone());
        std::thread::spawn(move || read_stream(&base, &admin, None, done, deadline))
    };
    let resumed = {
        let (base, admin, target) = (base.clone(), admin.clone(), Arc::clone(&target));
        std::thread::spawn(move || {
            let mut first = read_stream(&base, &admin, None, |c| c.len() >= 30, deadline);
            let last = first.last().unwrap()["seq"].as_u64().unwrap();
            let skip = first.len();
            let rest = read_stream(
                &base,
                &admin,
                Some(last),
                move |c: &[Value]| {
                    let target = target.load(Ordering::Acquire) as usize;
                    target > 0 && skip + c.len() >= target
                },
                deadline,
            );
            first.extend(rest);
            first
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|client| {
            let (base, write) = (base.clone(), write.clone());
            std::thread::spawn(move || {
                // One connection per client, as the SDKs keep one (a new connection per
                // request from one address runs into the server's per-address cap).
                let agent = ureq::AgentBuilder::new().timeout(HANG).build();
                for batch in 1..=40 {
                    let answer = agent
                        .post(&format!("{base}/v1/batch"))
                        .set("Authorization", &basic(&write))
                        .send_string(&client_batch(client, batch).to_string());
                    assert!(answer.is_ok(), "{answer:?}");
                }
            })
        })
        .collect();
    for client in clients {
        client.join().expect("client");
    }
    settle(&base);
    let feed = all_changes(&base, &admin);
    assert!(feed.len() > 100, "{} changes", feed.len());
    target.store(feed.len() as u64, Ordering::Release);
    // One more change wakes readers that already read the whole feed.
    let poke = json!({"batch": [{"type": "track", "userId": "poke", "event": "Ping",
        "messageId": "poke"}]});
    assert_eq!(post(&format!("{base}/v1/batch"), &write, &poke).status, 200);
    for reader in [straight, resumed] {
        let mut read = reader.join().expect("reader");
        read.truncate(feed.len());
        assert_eq!(read, feed);
    }
    // Readers that hang up in the middle of the stream: the server goes on (a write to a
    // socket closed by its client used to kill it with SIGPIPE).
    let address = base.trim_start_matches("http://").to_string();
    for _ in 0..5 {
        use std::io::{Read, Write};
        let mut socket = std::net::TcpStream::connect(&address).unwrap();
        write!(
            socket,
            "GET /api/changes/stream?after=0 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {admin}\r\n\r\n"
        )
        .unwrap();
        let mut start = [0u8; 512];
        socket.read_exact(&mut start).unwrap();
        drop(socket);
        std::thread::sleep(Duration::from_millis(100));
        let health = ureq::get(&format!("{base}/healthz")).timeout(HANG).call();
        assert!(health.is_ok(), "the server died: {health:?}");
    }
    server.stop();
}
