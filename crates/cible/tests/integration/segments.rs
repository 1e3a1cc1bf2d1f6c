//! `/api/segments` and live membership over HTTP.

use serde_json::{Value, json};

use super::common::*;

fn send(url: &str, admin: &str, method: &str, body: &Value) -> Answer {
    let request = ureq::request(method, url).set("Authorization", &format!("Bearer {admin}"));
    let result = request.send_string(&body.to_string());
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => panic!("{other}"),
    };
    let status = response.status();
    let text = response.into_string().unwrap();
    Answer {
        status,
        body: serde_json::from_str(&text).unwrap_or(Value::String(text)),
        retry_after: None,
    }
}

#[test]
fn segments_over_http_stay_exact_as_events_arrive() {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let admin = create_key(dir.path(), "--admin");
    let server = Server::start(dir.path(), &[]);

    let created = send(
        &server.url("/api/segments"),
        &admin,
        "POST",
        &json!({"name": "openers", "rule": "count(\"Email Opened\", 7d) >= 2"}),
    );
    assert_eq!(created.status, 201, "{:?}", created.body);
    assert_eq!(created.body["size"], 0);
    assert_eq!(
        created.body["warnings"][0]["code"], "W101",
        "no such event yet: a warning"
    );

    let bad = send(
        &server.url("/api/segments"),
        &admin,
        "POST",
        &json!({"name": "x", "rule": "cout(\"A\") >= 1"}),
    );
    assert_eq!(bad.status, 400);
    assert_eq!(bad.body["error"]["code"], "invalid_rule");
    assert_eq!(bad.body["error"]["details"][0]["column"], 1);
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did you mean `count`?")
    );
    let json_form = json!({"name": "buyers", "rule_json": {"op": "did", "event": {"name": "Order Completed"}, "window": "30d"}});
    assert_eq!(
        send(&server.url("/api/segments"), &admin, "POST", &json_form).status,
        201
    );

    // Two opens within the week: in the segment once the worker has evaluated the batch (right
    // after it is acknowledged).
    let opens = json!({"batch": [
        {"type": "track", "userId": "ann", "event": "Email Opened", "timestamp": "2026-04-29T10:00:00Z", "traits": {}},
        {"type": "track", "userId": "ann", "event": "Email Opened", "timestamp": "2026-04-30T10:00:00Z"},
        {"type": "track", "userId": "bob", "event": "Email Opened", "timestamp": "2026-04-30T10:00:00Z"},
        {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com"}},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &opens).status, 200);
    super::concurrency::settle(&server.base);
    let members = get(&server.url("/api/segments/openers/members"), &admin).body;
    assert_eq!(members["total"], 1);
    assert_eq!(members["members"][0]["primary_id"], "ann");
    assert_eq!(members["members"][0]["email"], "ann@example.com");
    assert_eq!(
        members["members"][0]["entered_at"],
        "2026-05-01T12:00:00.000Z"
    );
    let csv = ureq::get(&server.url("/api/segments/openers/members?format=csv"))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert_eq!(csv.lines().nth(1).unwrap().split(',').nth(1), Some("ann"));
    assert_eq!(
        get(&server.url("/api/segments/openers"), &admin).body["size"],
        1
    );
    let why = get(
        &server.url("/api/segments/openers/explain/ann@example.com"),
        &admin,
    )
    .body;
    assert_eq!(why["member"], true);
    assert_eq!(why["conditions"][0]["value"], 2.0);

    let preview = send(
        &server.url("/api/segments/preview"),
        &admin,
        "POST",
        &json!({"rule": "did(\"Email Opened\", 7d)", "sample": 5}),
    );
    assert_eq!(preview.body["count"], 2);

    // Editing narrows it; history shows each computation.
    let edited = send(
        &server.url("/api/segments/openers"),
        &admin,
        "PUT",
        &json!({"rule": "count(\"Email Opened\", 7d) >= 3"}),
    );
    assert_eq!(
        (edited.status, edited.body["size"].clone()),
        (200, json!(0))
    );
    let history = get(&server.url("/api/segments/openers/history"), &admin).body;
    // "now" is pinned, so the enter and the exit share one instant.
    assert_eq!(
        history,
        json!([{"at": "2026-05-01T12:00:00.000Z", "size": 0, "entered": 1, "exited": 1}])
    );

    let listed = get(&server.url("/api/segments"), &admin).body;
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert_eq!(
        send(
            &server.url("/api/segments/openers"),
            &admin,
            "DELETE",
            &json!({})
        )
        .status,
        200
    );
    assert_eq!(
        get(&server.url("/api/segments/openers"), &admin).status,
        404
    );
}
