//! Webhooks against a real HTTP receiver (`tests/clients/webhook_receiver.py`, which checks
//! every signature with Python's own `hmac`): ordering per profile, retries then success,
//! `Retry-After`, 410, dead letters and replay, list syncs, consent and erasure, kill -9 in
//! the middle of deliveries, and a hanging endpoint beside ingestion. Every wait is bounded.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::common::*;

/// The receiver, killed when dropped.
struct Receiver {
    child: Child,
    port: u16,
    log: PathBuf,
    secrets: PathBuf,
    known: HashMap<String, Vec<String>>,
}

impl Receiver {
    fn start(dir: &Path) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let log = dir.join("received.jsonl");
        let secrets = dir.join("secrets.json");
        std::fs::write(&secrets, "{}").unwrap();
        let mut child = Command::new("python3")
            .arg(root.join("tests/clients/webhook_receiver.py"))
            .arg(&log)
            .arg(&secrets)
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs the receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("port ")
            .expect("the receiver prints its port")
            .parse()
            .unwrap();
        Self {
            child,
            port,
            log,
            secrets,
            known: HashMap::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Tells the receiver the secrets that sign requests to paths starting with `prefix`.
    fn trust(&mut self, prefix: &str, secrets: Vec<String>) {
        self.known.insert(prefix.to_string(), secrets);
        std::fs::write(&self.secrets, serde_json::to_vec(&self.known).unwrap()).unwrap();
    }

    /// Every request received, in order.
    fn requests(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    fn requests_to(&self, prefix: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| r["path"].as_str().unwrap().starts_with(prefix))
            .collect()
    }

    /// Waits (at most `secs`) until `done` holds of the requests received.
    fn wait_for(&self, secs: u64, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let started = Instant::now();
        loop {
            let requests = self.requests();
            if done(&requests) {
                return requests;
            }
            assert!(
                started.elapsed() < Duration::from_secs(secs),
                "timed out after {secs} s waiting for {what}; received {}",
                requests.len()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn body(request: &Value) -> Value {
    serde_json::from_str(request["body"].as_str().unwrap()).unwrap()
}

/// `cible webhook create ...` beside the server; returns (id, secret).
fn create_webhook(data: &Path, args: &[&str]) -> (u32, String) {
    let out = run_ok(cible(data).args(["webhook", "create"]).args(args));
    let answer: Value = serde_json::from_str(&out).unwrap();
    let webhook = &answer["webhook"];
    (
        webhook["id"].as_u64().unwrap() as u32,
        webhook["secrets"][0]["secret"]
            .as_str()
            .unwrap()
            .to_string(),
    )
}

fn webhook_json(data: &Path, args: &[&str]) -> Value {
    serde_json::from_str(&run_ok(cible(data).arg("webhook").args(args))).unwrap()
}

/// A consenting buyer: identify with `consent_email`, then one order.
fn buyer(user: &str, order: u32, consent: bool) -> Vec<Value> {
    vec![
        json!({"type": "identify", "userId": user, "messageId": format!("{user}-id"),
            "timestamp": "2026-05-01T10:00:00Z",
            "traits": {"email": format!("{user}@example.org"), "consent_email": consent}}),
        json!({"type": "track", "userId": user, "event": "Order Completed",
            "messageId": format!("{user}-o{order}"), "timestamp": "2026-05-01T11:00:00Z"}),
    ]
}

fn second_order(user: &str) -> Value {
    json!({"type": "track", "userId": user, "event": "Order Completed",
        "messageId": format!("{user}-o2"), "timestamp": "2026-05-01T11:30:00Z"})
}

#[test]
fn deliveries_are_signed_ordered_retried_dead_lettered_and_replayed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut receiver = Receiver::start(dir.path());
    let write = create_key(&data, "--write");
    let server = Server::start(&data, &["--webhook-retries", "100ms,200ms"]);
    // One order: in; a second one: out (enter, then exit, for every buyer).
    create_segment(&data, "one_order", r#"count("Order Completed", 30d) = 1"#);
    let flag = format!("cible-webhook-toggle-{}", std::process::id());
    std::fs::write(format!("/tmp/{flag}"), "").unwrap();
    let endpoints = [
        ("ok", "/ok/a".to_string()),
        ("flaky", "/flaky/2/b".to_string()),
        ("toggle", format!("/toggle/{flag}")),
        ("gone", "/gone/d".to_string()),
        ("retry_after", "/retry-after/e".to_string()),
    ];
    let mut ids = HashMap::new();
    for (name, path) in &endpoints {
        let (id, secret) = create_webhook(
            &data,
            &["--url", &receiver.url(path), "--segment", "one_order"],
        );
        receiver.trust(path, vec![secret]);
        ids.insert(*name, id);
    }
    let users: Vec<String> = (0..20).map(|i| format!("wh-user-{i}")).collect();
    let mut batch: Vec<Value> = users.iter().flat_map(|u| buyer(u, 1, true)).collect();
    // No consent to e-mail: never sent (the subscriptions' purpose is `email`).
    batch.extend(buyer("wh-no-consent", 1, false));
    assert_eq!(
        post(&server.url("/v1/batch"), &write, &json!({"batch": batch})).status,
        200
    );
    let exits: Vec<Value> = users.iter().map(|u| second_order(u)).collect();
    assert_eq!(
        post(&server.url("/v1/batch"), &write, &json!({"batch": exits})).status,
        200
    );

    // 40 changes (20 enters, 20 exits) to each endpoint.
    let delivered = |requests: &[Value], prefix: &str| -> HashSet<String> {
        requests
            .iter()
            .filter(|r| r["path"].as_str().unwrap().starts_with(prefix) && r["status"] == 200)
            .map(|r| r["id"].as_str().unwrap().to_string())
            .collect()
    };
    receiver.wait_for(60, "every change to ok, flaky and retry-after", |r| {
        delivered(r, "/ok/").len() == 40
            && delivered(r, "/flaky/").len() == 40
            && delivered(r, "/retry-after/").len() == 40
    });
    let requests = receiver.requests();
    assert!(
        requests.iter().all(|r| r["verified"] == true),
        "every signature verifies with Python's hmac"
    );
    for request in &requests {
        assert!(!request["body"].as_str().unwrap().contains("wh-no-consent"));
    }
    // The same id on every attempt, with the same body; an id per change.
    let mut bodies: HashMap<String, String> = HashMap::new();
    for request in receiver.requests_to("/flaky/") {
        let id = request["id"].as_str().unwrap().to_string();
        let text = request["body"].as_str().unwrap().to_string();
        assert_eq!(bodies.entry(id).or_insert_with(|| text.clone()), &text);
    }
    assert_eq!(bodies.len(), 40);
    assert_eq!(
        receiver.requests_to("/flaky/").len(),
        120,
        "2 failures, then 200"
    );
    // Retry-After: 1 s is honoured over the 100 ms schedule.
    let first: HashMap<String, f64> = receiver
        .requests_to("/retry-after/")
        .iter()
        .filter(|r| r["status"] == 429)
        .map(|r| {
            (
                r["id"].as_str().unwrap().to_string(),
                r["received_at"].as_f64().unwrap(),
            )
        })
        .collect();
    for request in receiver.requests_to("/retry-after/") {
        if request["status"] == 200 {
            let waited =
                request["received_at"].as_f64().unwrap() - first[request["id"].as_str().unwrap()];
            assert!(
                waited >= 0.9,
                "retried after {waited} s, before Retry-After"
            );
        }
    }
    // Ordered per profile: a profile's exit is first tried after its enter was delivered.
    for prefix in ["/ok/", "/flaky/"] {
        let mut entered_ok: HashMap<u64, f64> = HashMap::new();
        for request in receiver.requests_to(prefix) {
            let payload = body(&request);
            let profile = payload["data"]["profile"]["id"].as_u64().unwrap();
            let at = request["received_at"].as_f64().unwrap();
            match payload["type"].as_str().unwrap() {
                "segment.entered" if request["status"] == 200 => {
                    entered_ok.insert(profile, at);
                }
                "segment.exited" => assert!(
                    entered_ok.get(&profile).is_some_and(|e| *e <= at),
                    "{prefix}: profile {profile} exit sent before its enter was delivered"
                ),
                _ => {}
            }
        }
    }
    let payload = body(&receiver.requests_to("/ok/")[0]);
    assert_eq!(payload["type"], "segment.entered");
    assert_eq!(payload["data"]["segment"], "one_order");
    assert_eq!(payload["data"]["cause"], "events");
    assert!(
        payload["data"]["profile"]["user_id"]
            .as_str()
            .unwrap()
            .starts_with("wh-user-")
    );
    assert!(
        payload["data"]["profile"]["email"]
            .as_str()
            .unwrap()
            .ends_with("@example.org")
    );

    // 410: the subscription is disabled with the reason.
    let gone = ids["gone"].to_string();
    let started = Instant::now();
    loop {
        let shown = webhook_json(&data, &["show", &gone]);
        if shown["webhook"]["disabled"].is_object() {
            assert!(
                shown["webhook"]["disabled"]["reason"]
                    .as_str()
                    .unwrap()
                    .contains("410")
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "not disabled: {shown}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Only the attempts already in flight when the first 410 came (one per profile at most:
    // the exits were never sent), none retried.
    let gone_requests = receiver.requests_to("/gone/");
    let gone_ids: HashSet<&str> = gone_requests
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(gone_ids.len(), gone_requests.len(), "no retry after a 410");
    assert!(gone_requests.len() <= 20, "{}", gone_requests.len());
    assert!(
        gone_requests
            .iter()
            .all(|r| body(r)["type"] == "segment.entered")
    );

    // The toggled endpoint failed 3 times each: 40 dead letters; replayed once it answers.
    let toggle = ids["toggle"].to_string();
    let started = Instant::now();
    loop {
        let dead = webhook_json(&data, &["dead", &toggle, "--limit", "1000"]);
        if dead["dead_letters"].as_array().unwrap().len() == 40 {
            assert_eq!(dead["dead_letters"][0]["attempts"], 3);
            assert_eq!(dead["dead_letters"][0]["last_status"], 500);
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "dead letters: {dead}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(receiver.requests_to("/toggle/").len(), 120);
    std::fs::remove_file(format!("/tmp/{flag}")).unwrap();
    let replayed = webhook_json(&data, &["replay", &toggle]);
    assert_eq!(replayed["replayed"], 40);
    receiver.wait_for(30, "the replayed dead letters", |r| {
        delivered(r, "/toggle/").len() == 40
    });
    // Settled within a moment (outcomes are recorded every 20 ms).
    let started = Instant::now();
    loop {
        let shown = webhook_json(&data, &["show", &toggle]);
        if (&shown["queued"], &shown["dead"]) == (&json!(0), &json!(0)) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "{shown}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // A rotation: both secrets sign until the old one expires.
    let rotated = webhook_json(&data, &["rotate", &ids["ok"].to_string()]);
    let secrets: Vec<String> = rotated["webhook"]["secrets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["secret"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(secrets.len(), 2);
    let new_secret = secrets[1].clone();
    receiver.trust("/ok/", vec![new_secret]);
    let batch: Vec<Value> = buyer("wh-after-rotation", 1, true);
    assert_eq!(
        post(&server.url("/v1/batch"), &write, &json!({"batch": batch})).status,
        200
    );
    let requests = receiver.wait_for(30, "a delivery after the rotation", |r| {
        delivered(r, "/ok/").len() == 41
    });
    let last = requests
        .iter()
        .rev()
        .find(|r| r["path"].as_str().unwrap().starts_with("/ok/"))
        .unwrap();
    assert_eq!(last["verified"], true, "the new secret verifies");
    assert_eq!(last["signature"].as_str().unwrap().split(' ').count(), 2);
    // Errors name the field.
    let bad = cible(&data)
        .args([
            "webhook",
            "create",
            "--url",
            "ftp://x",
            "--segment",
            "one_order",
        ])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("url:"),
        "{bad:?}"
    );
    let bad = cible(&data)
        .args([
            "webhook",
            "create",
            "--url",
            &receiver.url("/ok/x"),
            "--segment",
            "nope",
        ])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("nope"),
        "{bad:?}"
    );
    server.stop();
}

/// Applies list syncs in order, as a destination would, by profile id: the user ids on the
/// list, and the profile ids removed without identifiers (erased).
fn apply_lists(requests: &[Value], prefix: &str) -> (HashSet<String>, Vec<u64>) {
    let (mut list, mut anonymous_removes) = (HashMap::new(), Vec::new());
    for request in requests
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with(prefix) && r["status"] == 200)
    {
        let payload = body(request);
        assert_eq!(payload["type"], "list.sync");
        for add in payload["data"]["adds"].as_array().unwrap() {
            let user = add["user_id"].as_str().unwrap().to_string();
            list.insert(add["id"].as_u64().unwrap(), user);
        }
        for remove in payload["data"]["removes"].as_array().unwrap() {
            let id = remove["id"].as_u64().unwrap();
            assert!(list.remove(&id).is_some(), "{id} removed but not listed");
            if remove["user_id"].is_null() {
                anonymous_removes.push(id);
            }
        }
    }
    (list.into_values().collect(), anonymous_removes)
}

#[test]
fn list_syncs_send_net_changes_and_erasure_drops_queued_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut receiver = Receiver::start(dir.path());
    let write = create_key(&data, "--write");
    let admin = create_key(&data, "--admin");
    // Retries every second for a while: the failing endpoint's deliveries stay queued.
    let server = Server::start(
        &data,
        &[
            "--webhook-retries",
            "1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s,1s",
        ],
    );
    create_segment(&data, "one_order", r#"count("Order Completed", 30d) = 1"#);
    let (_, secret) = create_webhook(
        &data,
        &[
            "--url",
            &receiver.url("/ok/list"),
            "--segment",
            "one_order",
            "--list-every",
            "1",
        ],
    );
    receiver.trust("/ok/list", vec![secret]);
    let flag = format!("cible-webhook-erase-{}", std::process::id());
    std::fs::write(format!("/tmp/{flag}"), "").unwrap();
    let toggle = format!("/toggle/{flag}");
    let (_, secret) = create_webhook(
        &data,
        &["--url", &receiver.url(&toggle), "--segment", "one_order"],
    );
    receiver.trust(&toggle, vec![secret]);

    let users: Vec<String> = (0..10).map(|i| format!("ls-user-{i}")).collect();
    let mut batch: Vec<Value> = users.iter().flat_map(|u| buyer(u, 1, true)).collect();
    batch.extend(buyer("qz7-eve", 1, true));
    batch.extend(buyer("ls-no-consent", 1, false));
    assert_eq!(
        post(&server.url("/v1/batch"), &write, &json!({"batch": batch})).status,
        200
    );
    receiver.wait_for(30, "a list sync with every consenting buyer", |r| {
        apply_lists(r, "/ok/list").0.len() == 11
    });
    // Five leave (and one orders twice in one batch: never in the segment, in no list).
    let mut batch: Vec<Value> = users[..5].iter().map(|u| second_order(u)).collect();
    batch.extend(buyer("ls-brief", 1, true));
    batch.push(second_order("ls-brief"));
    assert_eq!(
        post(&server.url("/v1/batch"), &write, &json!({"batch": batch})).status,
        200
    );
    receiver.wait_for(30, "a list sync with the five removes", |r| {
        apply_lists(r, "/ok/list").0.len() == 6
    });
    let (list, _) = apply_lists(&receiver.requests(), "/ok/list");
    let mut expected: HashSet<String> = users[5..].iter().cloned().collect();
    expected.insert("qz7-eve".into());
    assert_eq!(list, expected);
    assert!(
        receiver
            .requests_to("/ok/list")
            .iter()
            .all(|r| r["verified"] == true)
    );
    assert!(
        !receiver
            .requests()
            .iter()
            .any(|r| r["body"].as_str().unwrap().contains("ls-brief"))
    );

    // The event subscription failed its first attempts: eve's enter waits in the queue.
    receiver.wait_for(30, "first attempts to the failing endpoint", |r| {
        r.iter().filter(|r| r["path"] == json!(toggle)).count() >= 11
    });
    let erased: Value = ureq::delete(&server.url("/api/profiles/qz7-eve?erase=true"))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert!(
        erased["webhook_deliveries_removed"].as_u64().unwrap() >= 1,
        "{erased}"
    );
    let erased_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let eve = erased["profile"].as_u64().unwrap();
    std::fs::remove_file(format!("/tmp/{flag}")).unwrap();
    // Everyone else's changes arrive; eve's queued enter does not, her erasure's exit does,
    // naming only her profile number.
    let requests = receiver.wait_for(30, "the queue after the erasure", |r| {
        let ok: Vec<&Value> = r
            .iter()
            .filter(|r| r["path"] == json!(toggle) && r["status"] == 200)
            .collect();
        ok.iter().any(|r| body(r)["data"]["cause"] == "erasure")
            && ok
                .iter()
                .filter(|r| body(r)["type"] == "segment.entered")
                .count()
                == 10
    });
    for request in &requests {
        if request["received_at"].as_f64().unwrap() > erased_at {
            assert!(
                !request["body"].as_str().unwrap().contains("qz7-eve"),
                "{request}"
            );
        }
    }
    let exit = requests
        .iter()
        .find(|r| r["path"] == json!(toggle) && body(r)["data"]["cause"] == "erasure")
        .unwrap();
    let exit = body(exit);
    assert_eq!(exit["data"]["profile"], json!({"id": eve}));
    receiver.wait_for(30, "eve's removal from the list", |r| {
        let (list, anonymous) = apply_lists(r, "/ok/list");
        anonymous.contains(&eve) && !list.contains("qz7-eve") && list.len() == 5
    });
    server.stop();
}

/// kill -9 while deliveries are under way, then a restart: every change arrives, each under
/// one id with one body; what was in flight at the kill may come twice (receivers dedup on
/// `webhook-id`, as the specification asks).
#[test]
fn kill_9_in_the_middle_of_deliveries_loses_none() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut receiver = Receiver::start(dir.path());
    let write = create_key(&data, "--write");
    let args = ["--webhook-retries", "200ms", "--webhook-concurrency", "4"];
    let server = Server::start(&data, &args);
    create_segment(&data, "buyers", r#"did("Order Completed", 30d)"#);
    let (_, secret) = create_webhook(
        &data,
        &["--url", &receiver.url("/slow/20/k"), "--segment", "buyers"],
    );
    receiver.trust("/slow/", vec![secret]);
    let batch: Vec<Value> = (0..300)
        .flat_map(|i| buyer(&format!("k9-{i}"), 1, true))
        .collect();
    assert_eq!(
        post(&server.url("/v1/batch"), &write, &json!({"batch": batch})).status,
        200
    );
    receiver.wait_for(60, "the first deliveries", |r| r.len() >= 40);
    server.kill();
    let before = receiver.requests().len();
    assert!(
        before < 300,
        "the kill came too late to test anything: {before}"
    );
    let server = Server::start(&data, &args);
    let requests = receiver.wait_for(120, "every change after the restart", |r| {
        r.iter()
            .filter(|r| r["status"] == 200)
            .map(|r| r["id"].as_str().unwrap())
            .collect::<HashSet<_>>()
            .len()
            == 300
    });
    let mut bodies: HashMap<&str, &str> = HashMap::new();
    for request in &requests {
        let (id, text) = (
            request["id"].as_str().unwrap(),
            request["body"].as_str().unwrap(),
        );
        assert_eq!(*bodies.entry(id).or_insert(text), text, "one body per id");
    }
    let duplicates = requests.len() - bodies.len();
    eprintln!("{before} delivered before the kill; {duplicates} sent again after it");
    assert!(
        duplicates <= 8,
        "only what was in flight comes again: {duplicates}"
    );
    assert!(requests.iter().all(|r| r["verified"] == true));
    server.stop();
}

/// An endpoint that never answers holds only its own attempts: acknowledgements and another
/// endpoint's deliveries go on. Bounded in time: a hang fails the test.
#[test]
fn a_hanging_endpoint_slows_neither_ingestion_nor_other_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mut receiver = Receiver::start(dir.path());
    let write = create_key(&data, "--write");
    let server = Server::start(&data, &["--webhook-timeout-secs", "3"]);
    create_segment(&data, "buyers", r#"did("Order Completed", 30d)"#);
    let mut hang_id = 0;
    for path in ["/hang/h", "/ok/o"] {
        let (id, secret) = create_webhook(
            &data,
            &["--url", &receiver.url(path), "--segment", "buyers"],
        );
        receiver.trust(path, vec![secret]);
        if path.starts_with("/hang/") {
            hang_id = id;
        }
    }
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for round in 0..30 {
        let batch: Vec<Value> = (0..20)
            .flat_map(|i| buyer(&format!("hang-{round}-{i}"), 1, true))
            .collect();
        let sent = Instant::now();
        assert_eq!(
            post(&server.url("/v1/batch"), &write, &json!({"batch": batch})).status,
            200
        );
        slowest = slowest.max(sent.elapsed());
    }
    assert!(
        slowest < Duration::from_secs(3),
        "an acknowledgement took {slowest:?}"
    );
    receiver.wait_for(60, "every change at the answering endpoint", |r| {
        r.iter()
            .filter(|r| r["path"] == "/ok/o" && r["status"] == 200)
            .count()
            == 600
    });
    assert!(started.elapsed() < Duration::from_secs(60));
    // The hanging endpoint got its first attempts, still unanswered. Its attempts are bounded: 64 in flight at most (the sender's own count), each until its
    // 3 s timeout.
    let hanging = receiver.requests_to("/hang/");
    assert!(!hanging.is_empty());
    let shown = webhook_json(&data, &["show", &hang_id.to_string()]);
    let in_flight = shown["sender"]["in_flight"].as_u64().unwrap();
    assert!((1..=64).contains(&in_flight), "{shown}");
    assert!(hanging.iter().all(|r| r["verified"] == true));
    server.stop();
}
