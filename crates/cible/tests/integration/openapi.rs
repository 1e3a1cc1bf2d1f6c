//! Every endpoint answers as `docs/openapi.json` documents it: each answer recorded here
//! (successes and errors) is validated against the file with jsonschema.

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};

use super::common::*;

struct Recorder {
    base: String,
    exchanges: Vec<Value>,
}

impl Recorder {
    fn call(
        &mut self,
        method: &str,
        path: &str,
        auth: Option<String>,
        body: Option<Value>,
    ) -> Value {
        let mut request = ureq::request(method, &format!("{}{path}", self.base));
        if let Some(auth) = auth {
            request = request.set("Authorization", &auth);
        }
        let result = match body {
            Some(body) => request.send_string(&body.to_string()),
            None => request.call(),
        };
        let response = match result {
            Ok(response) => response,
            Err(ureq::Error::Status(_, response)) => response,
            Err(other) => panic!("{method} {path}: {other}"),
        };
        let status = response.status();
        let content_type = response.header("content-type").unwrap_or("").to_string();
        let text = response.into_string().unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        self.exchanges
            .push(json!({"method": method, "path": path, "status": status,
            "content_type": content_type, "body": body.clone()}));
        body
    }
}

#[test]
fn every_answer_matches_the_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let admin = create_key(dir.path(), "--admin");
    let server = Server::start(dir.path(), &[]);
    let mut r = Recorder {
        base: server.base.clone(),
        exchanges: Vec::new(),
    };
    let w = || Some(basic(&write));
    let a = || Some(format!("Bearer {admin}"));

    r.call("GET", "/healthz", None, None);
    r.call("GET", &format!("/v1/projects/{write}/settings"), None, None);
    r.call("GET", "/v1/projects/cible_w_0000/settings", None, None);
    r.call(
        "POST",
        "/v1/t",
        None,
        Some(json!({"writeKey": write, "anonymousId": "d3", "event": "Short"})),
    );
    r.call("POST", "/v1/batch", w(), Some(json!({"batch": [
        {"type": "page", "anonymousId": "d1", "properties": {"url": "https://x.io/blog/a"}, "timestamp": "2026-04-30T10:00:00Z"},
        {"type": "identify", "userId": "u1", "anonymousId": "d1", "traits": {"email": "u1@x.io", "plan": "pro"}},
        {"type": "track", "userId": "u1", "event": "Order Completed", "properties": {"revenue": 40}},
        {"type": "track", "userId": "u1"},
    ]})));
    r.call(
        "POST",
        "/v1/track",
        w(),
        Some(json!({"userId": "u2", "anonymousId": "d2", "event": "Email Opened"})),
    );
    r.call(
        "POST",
        "/v1/identify",
        w(),
        Some(json!({"userId": "u2", "traits": {"plan": "free"}})),
    );
    r.call(
        "POST",
        "/v1/alias",
        w(),
        Some(json!({"userId": "u2", "previousId": "old"})),
    );
    r.call("POST", "/v1/batch", None, Some(json!({"batch": []})));
    r.call("POST", "/v1/batch", a(), Some(json!({"batch": []})));
    r.call(
        "POST",
        "/v1/track",
        a(),
        Some(json!({"userId": "u9", "event": "E"})),
    );
    r.call("POST", "/v1/batch", w(), Some(json!({"events": 1})));
    r.call("GET", "/api/quality", a(), None);
    r.call("GET", "/api/quality", w(), None);
    r.call("GET", "/api/quality/quarantine?limit=5", a(), None);
    r.call("POST", "/api/quality/replay", a(), None);
    r.call("GET", "/api/profiles/u1?limit=2", a(), None);
    r.call("GET", "/api/profiles/nobody", a(), None);
    r.call("GET", "/api/profiles/u1?type=hover", a(), None);
    r.call(
        "PUT",
        "/api/profiles/u1/consents",
        a(),
        Some(
            json!({"purposes": {"email": true, "profiling": false}, "basis": "consent",
            "ip": "192.0.2.1", "request_id": "form-1"}),
        ),
    );
    r.call(
        "PUT",
        "/api/profiles/u1/consents",
        a(),
        Some(json!({"purposes": {"email": true}, "request_id": "form-1"})),
    );
    r.call(
        "PUT",
        "/api/profiles/u1/consents",
        a(),
        Some(json!({"purposes": {"mail": true}})),
    );
    r.call("GET", "/api/profiles/u1/consents", a(), None);
    r.call("GET", "/api/profiles/nobody/consents", a(), None);
    r.call("GET", "/api/profiles/u1/export", a(), None);
    let read_key = r.call(
        "POST",
        "/api/keys",
        a(),
        Some(json!({"kind": "read", "name": "dash"})),
    );
    let read = format!("Bearer {}", read_key["key"].as_str().unwrap());
    r.call("GET", "/api/segments", Some(read.clone()), None);
    r.call("POST", "/api/traits/refresh", Some(read.clone()), None);
    let prefix = read_key["key"].as_str().unwrap()[..12].to_string();
    r.call("DELETE", &format!("/api/keys/{prefix}"), a(), None);
    r.call("DELETE", "/api/keys/cible_x_0000", a(), None);
    r.call("GET", "/api/audit?limit=50", a(), None);
    r.call("GET", "/api/audit?limit=0", a(), None);
    r.call("GET", "/api/audit/verify", a(), None);
    r.call("GET", "/api/audit/verify?head=1:00", a(), None);
    r.call("GET", "/api/merges", a(), None);
    r.call("POST", "/api/merges/99/unmerge", a(), None);
    r.call("GET", "/api/keys", a(), None);
    r.call("GET", "/api/retention", a(), None);
    r.call("POST", "/api/retention/run", a(), None);
    r.call("POST", "/api/pseudonym/rotate", a(), None);
    r.call(
        "POST",
        "/api/keys",
        a(),
        Some(json!({"kind": "write", "name": "site"})),
    );
    r.call(
        "POST",
        "/api/segments",
        a(),
        Some(json!({"name": "buyers", "rule": "did(\"Order Completed\", 30d)"})),
    );
    r.call(
        "POST",
        "/api/segments",
        a(),
        Some(json!({"name": "bad", "rule": "did(\"Order Completed\", 30days)"})),
    );
    r.call("POST", "/api/segments", a(), Some(json!({"name": "readers", "rule_json":
        {"op": "did", "event": {"name": "Page Viewed", "where": [{"property": "path", "cmp": "starts_with", "value": "/blog/"}]}}})));
    r.call("GET", "/api/segments", a(), None);
    r.call("GET", "/api/segments/buyers", a(), None);
    r.call(
        "PUT",
        "/api/segments/buyers",
        a(),
        Some(json!({"rule": "did(\"Order Completed\", 7d)"})),
    );
    r.call(
        "POST",
        "/api/segments/preview",
        a(),
        Some(json!({"rule": "trait.plan = \"pro\"", "sample": 3})),
    );
    r.call("GET", "/api/segments/buyers/members?limit=10", a(), None);
    r.call("GET", "/api/segments/buyers/members?format=csv", a(), None);
    r.call("GET", "/api/segments/buyers/history", a(), None);
    r.call("GET", "/api/segments/buyers/history?every=hour", a(), None);
    r.call("GET", "/api/segments/buyers/history?every=week", a(), None);
    r.call(
        "GET",
        "/api/segments/overlap?names=buyers,readers",
        a(),
        None,
    );
    r.call("GET", "/api/segments/overlap?names=buyers,nope", a(), None);
    r.call("GET", "/api/segments/overlap?names=buyers", a(), None);
    let table = r.call("GET", "/api/cohorts/retention?period=week", a(), None);
    assert!(table["cohorts"][0]["counts"].is_array(), "{table}");
    r.call(
        "GET",
        "/api/cohorts/retention?period=day&active=Order%20Completed&segment=buyers",
        a(),
        None,
    );
    r.call("GET", "/api/cohorts/retention?period=year", a(), None);
    r.call("GET", "/api/cohorts/retention?segment=nope", a(), None);
    r.call("GET", "/api/cohorts/retention", None, None);
    r.call("GET", "/api/segments/buyers/explain/u1", a(), None);
    r.call("GET", "/api/segments/nope", a(), None);
    r.call("GET", "/api/profiles/u1/traits", a(), None);
    r.call("GET", "/api/profiles/nobody/traits", a(), None);
    r.call("GET", "/api/traits/config", a(), None);
    r.call("GET", "/api/traits/config", w(), None);
    r.call("POST", "/api/traits/refresh", a(), None);
    r.call("GET", "/api/profiles/u1/recommendations?n=2", a(), None);
    r.call("GET", "/api/profiles/u1/recommendations?n=0", a(), None);
    // Models: 40 people seen two months ago, half of whom ordered in the last 30 days.
    let batch: Vec<Value> = (0..40)
        .flat_map(|i| {
            let mut events = vec![json!({"type": "track", "userId": format!("m{i}"),
                "event": "Page Viewed", "timestamp": "2026-01-01T00:00:00Z"})];
            for _ in 0..i % 4 {
                events.push(json!({"type": "track", "userId": format!("m{i}"),
                    "event": "Email Opened", "timestamp": "2026-01-02T00:00:00Z"}));
            }
            if i % 2 == 0 {
                events.push(
                    json!({"type": "track", "userId": format!("m{i}"), "event": "Order Completed",
                    "properties": {"revenue": 10 + i}}),
                );
            }
            events
        })
        .collect();
    r.call("POST", "/v1/batch", w(), Some(json!({ "batch": batch })));
    r.call("GET", "/api/models", a(), None);
    let trained = r.call(
        "POST",
        "/api/models",
        a(),
        Some(json!({"kind": "propensity", "target": "purchase", "days": 30, "algorithm": "logistic"})),
    );
    assert_eq!(trained["model"]["name"], "purchase_30d", "{trained}");
    assert_eq!(trained["model"]["version"], 1);
    let clusters = r.call(
        "POST",
        "/api/models",
        a(),
        Some(json!({"kind": "cluster", "max_k": 3, "restarts": 1})),
    );
    assert_eq!(
        clusters["model"]["traits"],
        json!(["cluster.id", "cluster.name"])
    );
    let bad = r.call(
        "POST",
        "/api/models",
        a(),
        Some(json!({"kind": "propensity", "target": "purchase", "days": 0})),
    );
    assert_eq!(bad["error"]["field"], "days", "{bad}");
    for (body, field) in [
        (
            json!({"kind": "propensity", "target": "purchase", "days": "x"}),
            "days",
        ),
        (json!({"kind": "propensity", "target": "sale"}), "target"),
        (json!({"kind": "propensity"}), "target"),
        (json!({"kind": "cluster", "days": 3}), "days"),
        (json!({"kind": "cluster", "max_k": 100_000}), "max_k"),
        (json!({"kind": "forest"}), "kind"),
    ] {
        let bad = r.call("POST", "/api/models", a(), Some(body));
        assert_eq!(bad["error"]["field"], field, "{bad}");
    }
    let retrained = r.call("POST", "/api/models/purchase_30d/retrain", a(), None);
    assert_eq!(retrained["model"]["version"], 2);
    let versions = r.call("GET", "/api/models/purchase_30d/versions", a(), None);
    assert_eq!(versions.as_array().unwrap().len(), 2);
    let active = r.call(
        "POST",
        "/api/models/purchase_30d/activate",
        a(),
        Some(json!({"version": 1})),
    );
    assert_eq!(
        (active["version"].clone(), active["active"].clone()),
        (json!(1), json!(true))
    );
    r.call(
        "POST",
        "/api/models/purchase_30d/activate",
        a(),
        Some(json!({"version": 9})),
    );
    let shown = r.call("GET", "/api/models/purchase_30d?version=2", a(), None);
    assert_eq!(shown["model"]["active"], false);
    r.call("GET", "/api/models/nope", a(), None);
    let feed = r.call("GET", "/api/changes?after=0&limit=5", a(), None);
    assert_eq!(feed["changes"][0]["seq"], 1, "{feed}");
    r.call("GET", "/api/changes?limit=0", a(), None);
    r.call("GET", "/api/changes?after=x", a(), None);
    // A query parameter that does not decode, or is unknown, gets the JSON error naming it.
    let bad = r.call("GET", "/api/quality/quarantine?limit=abc", a(), None);
    assert_eq!(bad["error"]["field"], "limit", "{bad}");
    let unknown = r.call("GET", "/api/changes?foo=1", a(), None);
    assert_eq!(unknown["error"]["field"], "foo", "{unknown}");
    let none = r.call("GET", "/api/profiles/u1?limit=0", a(), None);
    assert_eq!(
        none["timeline"]["events"],
        json!([]),
        "limit=0 is an empty page"
    );
    let traits = r.call("GET", "/api/profiles/m0/traits", a(), None);
    let p = traits["predicted"]["purchase_30d"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{traits}");
    assert!(traits["cluster"]["name"].is_string(), "{traits}");
    let segment = r.call(
        "POST",
        "/api/segments",
        a(),
        Some(json!({"name": "likely", "rule": "predicted.purchase_30d >= 0.5"})),
    );
    assert!(segment["size"].as_u64().unwrap() > 0, "{segment}");
    let typo = r.call(
        "POST",
        "/api/segments",
        a(),
        Some(json!({"name": "typo", "rule": "predicted.purchase_3d >= 0.5"})),
    );
    assert!(
        typo["error"]["message"]
            .as_str()
            .unwrap()
            .contains("predicted.purchase_30d"),
        "{typo}"
    );
    // Webhooks (to a port nobody listens on: deliveries fail and wait; their answers here).
    let hook = r.call(
        "POST",
        "/api/webhooks",
        a(),
        Some(json!({"url": "http://127.0.0.1:9/hook", "segment": "buyers", "on": ["enter"]})),
    );
    let hook_path = format!("/api/webhooks/{}", hook["webhook"]["id"]);
    r.call(
        "POST",
        "/api/webhooks",
        a(),
        Some(json!({"url": "ftp://x", "segment": "buyers"})),
    );
    r.call(
        "POST",
        "/api/webhooks",
        a(),
        Some(json!({"url": "http://x/", "segment": "nope"})),
    );
    r.call(
        "POST",
        "/api/webhooks",
        a(),
        Some(json!({"url": "http://x/", "lifecycle": true, "list_every_secs": 60})),
    );
    r.call("GET", "/api/webhooks", a(), None);
    r.call("GET", &hook_path, a(), None);
    r.call("GET", "/api/webhooks/77", a(), None);
    r.call("GET", "/api/webhooks/x", a(), None);
    r.call(
        "POST",
        &format!("{hook_path}/rotate"),
        a(),
        Some(json!({"keep_old_secs": 60})),
    );
    r.call("POST", &format!("{hook_path}/disable"), a(), None);
    r.call("POST", &format!("{hook_path}/enable"), a(), None);
    r.call("GET", &format!("{hook_path}/dead?limit=10"), a(), None);
    r.call("POST", &format!("{hook_path}/replay"), a(), Some(json!({})));
    r.call("DELETE", &hook_path, a(), None);
    r.call(
        "GET",
        "/api/exports/members/buyers?purpose=analytics",
        a(),
        None,
    );
    r.call(
        "GET",
        "/api/exports/members/buyers?format=jsonl&pseudonymize=true&purpose=analytics",
        a(),
        None,
    );
    r.call("GET", "/api/exports/members/nope", a(), None);
    r.call("GET", "/api/exports/profiles", a(), None);
    r.call(
        "GET",
        "/api/exports/profiles?purpose=analytics&format=xls",
        a(),
        None,
    );
    r.call("DELETE", "/api/segments/readers", a(), None);
    r.call("DELETE", "/api/profiles/u2", a(), None);
    r.call("DELETE", "/api/profiles/u1?erase=true", a(), None);
    r.call("GET", "/api/quality/quarantine?reason=erased", a(), None);

    let exchanges = dir.path().join("exchanges.json");
    std::fs::write(&exchanges, serde_json::to_string(&r.exchanges).unwrap()).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let clients = Command::new("bash")
        .arg(root.join("tests/clients/install.sh"))
        .output()
        .unwrap();
    assert!(
        clients.status.success(),
        "{}",
        String::from_utf8_lossy(&clients.stderr)
    );
    let python_path = PathBuf::from(String::from_utf8(clients.stdout).unwrap().trim()).join("py");
    let output = Command::new("python3")
        .arg(root.join("tests/openapi/validate.py"))
        .arg(root.join("docs/openapi.json"))
        .arg(&exchanges)
        .env("PYTHONPATH", python_path)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}
