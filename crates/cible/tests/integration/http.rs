//! The tracking and admin HTTP APIs.

use std::io::Write;

use serde_json::{Value, json};

use super::common::*;

fn started() -> (tempfile::TempDir, Server, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let admin = create_key(dir.path(), "--admin");
    let server = Server::start(dir.path(), &[]);
    (dir, server, write, admin)
}

#[test]
fn every_segment_endpoint_lands_in_the_profile() {
    let (_dir, server, write, admin) = started();
    let calls = [
        (
            "page",
            json!({"anonymousId": "d1", "messageId": "m-page", "name": "Pricing",
            "properties": {"url": "https://Shop.io/pricing?utm_source=ads"}, "timestamp": "2026-04-30T10:00:00Z"}),
        ),
        (
            "identify",
            json!({"userId": "u1", "anonymousId": "d1", "messageId": "m-identify",
            "traits": {"email": "Ann@Example.com", "plan": "pro"}, "timestamp": "2026-04-30T10:01:00Z"}),
        ),
        (
            "track",
            json!({"userId": "u1", "event": "Order Completed", "messageId": "m-track",
            "properties": {"revenue": 42}, "timestamp": "2026-04-30T10:02:00Z"}),
        ),
        (
            "screen",
            json!({"userId": "u1", "name": "Home", "messageId": "m-screen"}),
        ),
        (
            "group",
            json!({"userId": "u1", "groupId": "acme", "messageId": "m-group"}),
        ),
        (
            "alias",
            json!({"userId": "u1", "previousId": "old-id", "messageId": "m-alias"}),
        ),
    ];
    for (kind, body) in calls {
        let answer = post(&server.url(&format!("/v1/{kind}")), &write, &body);
        assert_eq!(answer.status, 200, "{kind}: {:?}", answer.body);
        assert_eq!(answer.body["accepted"], 1, "{kind}: {:?}", answer.body);
    }
    let batch = json!({"batch": [
        {"type": "track", "userId": "u1", "event": "Email Opened", "messageId": "m-b1"},
        {"type": "track", "userId": "u1", "event": "Email Opened", "messageId": "m-track"},
    ]});
    let answer = post(&server.url("/v1/batch"), &write, &batch);
    assert_eq!(
        (
            answer.body["accepted"].clone(),
            answer.body["duplicates"].clone()
        ),
        (json!(1), json!(1))
    );

    // The same person under every identifier, page calls named "Page Viewed".
    for id in ["u1", "d1", "ann@example.com", "old-id"] {
        let profile = get(&server.url(&format!("/api/profiles/{id}")), &admin);
        assert_eq!(profile.status, 200, "{id}: {:?}", profile.body);
        assert_eq!(profile.body["event_count"], 7, "{id}");
    }
    let profile = get(&server.url("/api/profiles/u1?type=page"), &admin).body;
    let page = &profile["timeline"]["events"][0];
    assert_eq!(page["event"], "Page Viewed");
    assert_eq!(page["properties"]["url"], "https://shop.io/pricing");
    assert_eq!(page["context"]["campaign"]["source"], "ads");
    let profile = get(&server.url("/api/profiles/u1?limit=2"), &admin).body;
    assert_eq!(profile["traits"]["plan"]["value"], "pro");
    assert_eq!(profile["traits"]["email"]["value"], "ann@example.com");
    assert_eq!(profile["timeline"]["events"].as_array().unwrap().len(), 2);
    assert_eq!(profile["timeline"]["total"], 7);
    assert_eq!(
        profile["identifiers"]["anonymous_ids"],
        json!(["d1", "old-id"])
    );

    // Removing the profile removes it under every identifier.
    let removed = ureq::delete(&server.url("/api/profiles/ann@example.com"))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(removed["events_removed"], 7);
    for id in ["u1", "d1", "old-id"] {
        assert_eq!(
            get(&server.url(&format!("/api/profiles/{id}")), &admin).status,
            404
        );
    }
    assert_eq!(get(&server.url("/api/quality"), &admin).body["events"], 0);
}

#[test]
fn gzip_bodies_are_accepted() {
    let (_dir, server, write, admin) = started();
    let body = json!({"batch": [{"type": "track", "userId": "gz", "event": "Email Opened", "messageId": "gz1"}]});
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(body.to_string().as_bytes()).unwrap();
    let compressed = encoder.finish().unwrap();
    let headers = [
        ("Authorization", basic(&write)),
        ("Content-Encoding", "gzip".into()),
    ];
    let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let answer = try_post(&server.url("/v1/batch"), &headers, &compressed).unwrap();
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        get(&server.url("/api/profiles/gz"), &admin).body["event_count"],
        1
    );
}

#[test]
fn bad_requests_get_clear_errors_and_change_nothing() {
    let (_dir, server, write, admin) = started();
    let track = json!({"userId": "u", "event": "E"});
    let no_key = try_post(&server.url("/v1/track"), &[], track.to_string().as_bytes()).unwrap();
    assert_eq!(no_key.status, 401);
    assert!(
        no_key.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Basic")
    );
    assert_eq!(
        post(&server.url("/v1/track"), "cible_w_wrong", &track).status,
        401
    );
    assert_eq!(
        get(&server.url("/api/quality"), &write).status,
        403,
        "a write key is not an admin key"
    );

    let invalid = try_post(
        &server.url("/v1/batch"),
        &[("Authorization", &basic(&write))],
        b"{\"batch\": [",
    )
    .unwrap();
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.body["error"]["code"], "invalid_json");
    assert!(
        invalid.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("line 1 column")
    );
    let answer = post(&server.url("/v1/batch"), &write, &json!({"events": []}));
    assert_eq!(
        (answer.status, answer.body["error"]["field"].clone()),
        (400, json!("batch"))
    );

    let big = "x".repeat(33 * 1024);
    let answer = post(
        &server.url("/v1/track"),
        &write,
        &json!({"userId": "u", "event": "E", "properties": {"b": big}}),
    );
    assert_eq!(answer.status, 413);
    let in_batch = json!({"batch": [{"type": "track", "userId": "u", "event": "E", "properties": {"b": big}}]});
    let answer = post(&server.url("/v1/batch"), &write, &in_batch);
    assert_eq!(answer.status, 413);
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("batch[0]")
    );
    let messages: Vec<Value> = (0..40)
        .map(|i| {
            json!({"type": "track", "userId": "u", "event": "E",
        "messageId": format!("big{i}"), "properties": {"b": "y".repeat(14_000)}})
        })
        .collect();
    assert_eq!(
        post(
            &server.url("/v1/batch"),
            &write,
            &json!({"batch": messages})
        )
        .status,
        413
    );

    // Semantically bad messages are accepted into quarantine, and the answer says why.
    let answer = post(
        &server.url("/v1/batch"),
        &write,
        &json!({"batch": [
            {"type": "track", "userId": "u", "event": "Fine", "messageId": "ok1"},
            {"type": "track", "userId": "u", "messageId": "no-event"},
            {"type": "track", "event": "Orphan", "messageId": "no-identity"},
            {"type": "track", "userId": "u", "event": "Later", "timestamp": "2030-01-01T00:00:00Z"},
        ]}),
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["accepted"], 1);
    let notes: Vec<(u64, String, String)> = answer.body["quarantined"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| {
            (
                q["index"].as_u64().unwrap(),
                q["reason"].as_str().unwrap().into(),
                q["field"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        notes,
        [
            (1, "missing_event".into(), "event".into()),
            (2, "missing_identity".into(), "userId".into()),
            (3, "future_timestamp".into(), "timestamp".into())
        ]
    );
    let quality = get(&server.url("/api/quality"), &admin).body;
    assert_eq!(quality["accepted"], 1);
    assert_eq!(quality["in_quarantine"]["missing_event"], 1);
    assert_eq!(quality["by_source"]["http"]["quarantined"], 3);
    let kept = get(
        &server.url("/api/quality/quarantine?reason=missing_identity"),
        &admin,
    )
    .body;
    assert_eq!(
        serde_json::from_str::<Value>(kept[0]["raw"].as_str().unwrap()).unwrap()["messageId"],
        "no-identity"
    );
    assert_eq!(get(&server.url("/api/profiles/nobody"), &admin).status, 404);
    assert_eq!(
        get(&server.url("/api/quality/quarantine?reason=bogus"), &admin).status,
        400
    );
}

#[test]
fn overload_answers_503_with_retry_after_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let server = Server::start(dir.path(), &["--queue", "1"]);
    let url = server.url("/v1/batch");
    let barrier = std::sync::Barrier::new(16);
    let answers: Vec<(Answer, Vec<String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..16)
            .map(|t| {
                let (url, write, barrier) = (&url, &write, &barrier);
                scope.spawn(move || {
                    let ids: Vec<String> = (0..1500).map(|i| format!("o{t}-{i}")).collect();
                    let batch: Vec<Value> = ids
                        .iter()
                        .map(|id| {
                            json!({"type": "track", "userId": format!("u{t}"),
                        "event": "Email Opened", "messageId": id})
                        })
                        .collect();
                    barrier.wait();
                    (post(url, write, &json!({"batch": batch})), ids)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let refused = answers.iter().filter(|(a, _)| a.status == 503).count();
    assert!(
        refused > 0,
        "16 simultaneous batches against a queue of 1 must see refusals"
    );
    for (answer, _) in &answers {
        assert!(
            answer.status == 200
                || (answer.status == 503 && answer.retry_after.as_deref() == Some("1")),
            "{answer:?}"
        );
    }
    server.stop();
    let stored: std::collections::HashSet<String> = export_events(dir.path())
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    for (answer, ids) in &answers {
        let present = ids.iter().filter(|id| stored.contains(*id)).count();
        let expected = if answer.status == 200 { ids.len() } else { 0 };
        assert_eq!(
            present, expected,
            "a batch is stored whole iff it was acknowledged"
        );
    }
}

#[test]
fn an_admin_key_is_refused_on_the_tracking_api() {
    let (dir, server, write, admin) = started();
    let track = json!({"userId": "u", "event": "E", "messageId": "by-admin"});
    let batch = json!({"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": "by-admin-in-batch"}]});
    let bearer = format!("Bearer {admin}");
    let refusals = [
        post(&server.url("/v1/track"), &admin, &track),
        post(&server.url("/v1/batch"), &admin, &batch),
        try_post(
            &server.url("/v1/identify"),
            &[("Authorization", &bearer)],
            json!({"userId": "u", "traits": {"plan": "pro"}})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
        // In the body, as some Segment libraries send it.
        try_post(
            &server.url("/v1/batch"),
            &[],
            json!({"writeKey": admin, "batch": batch["batch"]})
                .to_string()
                .as_bytes(),
        )
        .unwrap(),
    ];
    for answer in &refusals {
        assert_eq!(answer.status, 403, "{answer:?}");
        assert_eq!(answer.body["error"]["code"], "forbidden", "{answer:?}");
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("needs a write key"), "{message}");
    }
    // The write key still works, and nothing sent with the admin key was stored.
    assert_eq!(
        post(
            &server.url("/v1/track"),
            &write,
            &json!({"userId": "u", "event": "E", "messageId": "by-write"})
        )
        .status,
        200
    );
    server.stop();
    let ids: Vec<String> = export_events(dir.path())
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["by-write"]);
}

#[test]
fn model_parameters_are_bounded_with_the_field_and_range_named() {
    let (_dir, server, _write, admin) = started();
    let train = |body: Value| {
        try_post(
            &server.url("/api/models"),
            &[("Authorization", &format!("Bearer {admin}"))],
            body.to_string().as_bytes(),
        )
        .unwrap()
    };
    let started = std::time::Instant::now();
    for (body, field, says) in [
        (
            json!({"kind": "cluster", "max_k": 100_000}),
            "max_k",
            "`max_k` must be between 2 and 50, found 100000",
        ),
        (
            json!({"kind": "cluster", "min_k": 1}),
            "min_k",
            "between 2 and 50",
        ),
        (
            json!({"kind": "cluster", "min_k": 9, "max_k": 4}),
            "min_k",
            "`min_k` must be at most `max_k`",
        ),
        (
            json!({"kind": "cluster", "restarts": 21}),
            "restarts",
            "`restarts` must be between 1 and 20, found 21",
        ),
        (
            json!({"kind": "cluster", "restarts": 0}),
            "restarts",
            "between 1 and 20",
        ),
        (
            json!({"kind": "cluster", "sample": 100_001}),
            "sample",
            "`sample` must be between 1 and 100000, found 100001",
        ),
        (
            json!({"kind": "propensity", "target": "purchase", "days": 366}),
            "days",
            "`days` must be between 1 and 365, found 366",
        ),
        (
            json!({"kind": "propensity", "target": "churn", "days": 0}),
            "days",
            "between 1 and 365",
        ),
    ] {
        let answer = train(body.clone());
        assert_eq!(answer.status, 400, "{body}: {answer:?}");
        assert_eq!(answer.body["error"]["code"], "invalid_request");
        assert_eq!(answer.body["error"]["field"], field, "{body}: {answer:?}");
        let message = answer.body["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }
    assert!(
        started.elapsed() < std::time::Duration::from_secs(10),
        "refused without training: {:?}",
        started.elapsed()
    );
    assert_eq!(
        get(&server.url("/api/models"), &admin).body,
        json!([]),
        "nothing was trained"
    );
}

/// `/metrics` is valid Prometheus text (every family typed, every sample a number), and its
/// families are exactly those the README's Observability table documents.
#[test]
fn metrics_are_prometheus_text_and_the_readme_lists_every_family() {
    let (_dir, server, write, admin) = started();
    let batch = json!({"batch": [
        {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "m1"},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &batch).status, 200);
    let created = ureq::post(&server.url("/api/segments"))
        .set("Authorization", &format!("Bearer {admin}"))
        .send_json(json!({"name": "buyers", "rule": r#"did("Order Completed", 30d)"#}));
    assert!(created.is_ok());
    let text = ureq::get(&server.url("/metrics"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    let mut typed = std::collections::BTreeSet::new();
    let mut sampled = std::collections::BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            typed.insert(rest.split_whitespace().next().unwrap().to_string());
        } else if !line.starts_with('#') && !line.is_empty() {
            let (series, value) = line.rsplit_once(' ').expect("name value");
            assert!(value.parse::<f64>().is_ok(), "{line}");
            let name = series.split('{').next().unwrap();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    name.strip_suffix(suffix)
                        .filter(|base| typed.contains(*base))
                })
                .unwrap_or(name);
            assert!(typed.contains(family), "{family} has no # TYPE");
            sampled.insert(family.to_string());
        }
    }
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let documented: std::collections::BTreeSet<String> = readme
        .lines()
        .filter(|l| l.starts_with("| `cible_"))
        .flat_map(|l| {
            let first_cell = l.split('|').nth(1).unwrap_or_default().to_string();
            first_cell
                .split('`')
                .filter(|s| s.starts_with("cible_"))
                .map(|s| s.split('{').next().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(typed, documented, "README table vs /metrics families");
    assert_eq!(sampled, typed, "every family has a sample");
}
