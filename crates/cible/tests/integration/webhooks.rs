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
    run_ok(cible(&data).args([
        "segment",
        "create",
        "one_order",
        "--rule",
        r#"count("Order Completed", 30d) = 1"#,
    ]));
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
    let shown = webhook_json(&data, &["show", &toggle]);
    assert_eq!(
        (shown["queued"].clone(), shown["dead"].clone()),
        (json!(0), json!(0))
    );

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
