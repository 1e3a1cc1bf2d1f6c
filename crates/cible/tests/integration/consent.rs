//! Consent per purpose, as a user meets it: set by a consent tool, an identify trait, an
//! unsubscribe and the API; read by a rule; asked by every export; beside a running server
//! and without one.

use std::process::Command;

use serde_json::{Value, json};

use super::common::*;

fn put(url: &str, admin: &str, body: &Value) -> Answer {
    let result = ureq::put(url)
        .set("Authorization", &format!("Bearer {admin}"))
        .set("User-Agent", "consent-form/1.0")
        .send_string(&body.to_string());
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => panic!("PUT {url}: {other}"),
    };
    let status = response.status();
    let body = response.into_json().unwrap_or(Value::Null);
    Answer {
        status,
        body,
        retry_after: None,
    }
}

fn output(command: &mut Command) -> (bool, String) {
    let output = command.output().expect("cible runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn consent_from_each_source_reaches_rules_exports_and_the_history() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    std::fs::write(
        data.join("consent.toml"),
        "[purposes]\nsms = \"opt-in\"\n[categories]\nMarketing = \"email\"\n[traits]\nnewsletter = \"email\"\n",
    )
    .unwrap();
    let write = create_key(data, "--write");
    let admin = create_key(data, "--admin");
    let server = Server::start(data, &[]);
    let created = ureq::post(&server.url("/api/segments"))
        .set("Authorization", &format!("Bearer {admin}"))
        .send_json(json!({"name": "mailable", "rule": "consent.email and not consent.sms"}))
        .unwrap();
    assert_eq!(created.status(), 201);
    let batch = json!({"batch": [
        // A consent tool's preferences, on every event of the visit.
        {"type": "page", "anonymousId": "d1", "messageId": "m1", "timestamp": "2026-05-01T10:00:00Z",
         "context": {"consent": {"categoryPreferences": {"Marketing": true, "Advertising": false}}}},
        {"type": "identify", "userId": "u2", "messageId": "m2", "timestamp": "2026-05-01T10:00:00Z",
         "traits": {"newsletter": true, "consent_sms": true}},
        {"type": "identify", "userId": "u3", "messageId": "m3", "timestamp": "2026-05-01T10:00:00Z",
         "traits": {"newsletter": true}},
        {"type": "track", "userId": "u3", "event": "Unsubscribed", "messageId": "m4",
         "timestamp": "2026-05-01T11:00:00Z"},
        {"type": "identify", "userId": "u4", "messageId": "m5", "timestamp": "2026-05-01T10:00:00Z"},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &batch).status, 200);

    // The API: a grant with its basis and proof; errors name the field.
    let url = server.url("/api/profiles/u4/consents");
    let granted = put(
        &url,
        &admin,
        &json!({"purposes": {"email": true}, "basis": "consent", "ip": "192.0.2.9", "request_id": "f-1"}),
    );
    assert_eq!(granted.status, 200, "{:?}", granted.body);
    let since = &granted.body["current"]["email"]["since"];
    assert_eq!(
        (
            &since["source"],
            &since["ip"],
            &since["user_agent"],
            &since["message_id"]
        ),
        (
            &json!("api"),
            &json!("192.0.2.9"),
            &json!("consent-form/1.0"),
            &json!("f-1")
        )
    );
    assert_eq!(granted.body["current"]["profiling"]["permitted"], true);
    assert_eq!(granted.body["current"]["sms"]["rule"], "opt-in");
    let again = put(
        &url,
        &admin,
        &json!({"purposes": {"email": true}, "request_id": "f-1"}),
    );
    assert_eq!(
        (again.status, &again.body["error"]["code"]),
        (409, &json!("conflict"))
    );
    let bad = put(&url, &admin, &json!({"purposes": {"mail": true}}));
    assert_eq!(bad.status, 400);
    assert!(
        bad.body["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("purposes.mail: \"mail\" is not a purpose"),
        "{:?}",
        bad.body
    );
    let unknown = put(&url, &admin, &json!({"purpose": {"email": true}}));
    assert_eq!(unknown.status, 400);
    let nobody = put(
        &server.url("/api/profiles/nobody/consents"),
        &admin,
        &json!({"purposes": {"email": true}}),
    );
    assert_eq!(nobody.status, 404);

    // The rule: d1 (consent tool) and u4 (API) may be mailed; u2 granted sms too, u3
    // unsubscribed.
    let members = get(&server.url("/api/segments/mailable/members"), &admin).body;
    let mut ids: Vec<String> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["primary_id"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    assert_eq!(ids, ["d1", "u4"], "{members}");
    let u3 = get(&server.url("/api/profiles/u3/consents"), &admin).body;
    let history: Vec<(&str, bool, &str)> = u3["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["purpose"].as_str().unwrap(),
                c["granted"].as_bool().unwrap(),
                c["source"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            ("email", true, "identify_trait"),
            ("email", false, "unsubscribe")
        ]
    );
    let profile = get(&server.url("/api/profiles/d1"), &admin).body;
    assert_eq!(profile["consents"]["current"]["email"]["granted"], true);

    // The CLI beside the server goes through it.
    let shown =
        run_ok(cible(data).args(["profile", "consent", "u2", "--withdraw", "sms", "--json"]));
    let shown: Value = serde_json::from_str(&shown).unwrap();
    assert_eq!(shown["current"]["sms"]["granted"], false);
    server.stop();

    // Exports ask for a purpose: only the profiles it may process leave.
    let exported = run_ok(cible(data).args(["export", "profiles", "--purpose", "email"]));
    let mut emailable: Vec<String> = exported
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .map(|p| {
            assert_eq!(p["consents"]["email"], true);
            p["identifiers"][0].as_str().unwrap().to_string()
        })
        .collect();
    emailable.sort();
    assert_eq!(emailable, ["a:d1", "u:u2", "u:u4"]);
    let events = run_ok(cible(data).args(["export", "events", "--purpose", "advertising"]));
    assert_eq!(
        events.lines().count(),
        0,
        "nobody granted advertising: {events}"
    );
    let (ok, stderr) = output(cible(data).args(["export", "events", "--purpose", "spam"]));
    assert!(
        !ok && stderr.contains("\"spam\" is not a purpose"),
        "{stderr}"
    );
    let (ok, stderr) = output(cible(data).args(["export", "events"]));
    assert!(!ok && stderr.contains("--purpose"), "{stderr}");

    // Everything above is in the audit log, which verifies.
    let verified = run_ok(cible(data).args(["audit", "verify"]));
    assert!(
        verified.starts_with("the audit log is intact:"),
        "{verified}"
    );
    let records: Vec<Value> =
        serde_json::from_str(&run_ok(cible(data).args(["audit", "list", "--json"]))).unwrap();
    let seen: Vec<(&str, &str)> = records
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["actor"].as_str().unwrap()))
        .collect();
    for expected in [
        ("key_create", "cli"),
        ("segment_create", &*format!("api:{}", &admin[..12])),
        ("consent_change", "http"),
        ("consent_change", &*format!("api:{}", &admin[..12])),
        ("consent_change", "cli"),
        ("export", "cli"),
    ] {
        assert!(seen.contains(&expected), "{expected:?} not in {seen:?}");
    }
    let text = serde_json::to_string(&records).unwrap();
    for identifier in ["\"u2\"", "u:u2", "a:d1", "\"d1\""] {
        assert!(!text.contains(identifier), "{identifier} in {text}");
    }

    // Without a server, the CLI records a change itself; a bad consent.toml names its field.
    let text = run_ok(cible(data).args([
        "profile", "consent", "u3", "--grant", "email", "--basis", "contract",
    ]));
    assert!(
        text.contains("email") && text.contains("granted since"),
        "{text}"
    );
    std::fs::write(
        data.join("consent.toml"),
        "[traits]\nnewsletter = \"mail\"\n",
    )
    .unwrap();
    let (ok, stderr) = output(cible(data).args(["segment", "list"]));
    assert!(!ok && stderr.contains("traits.newsletter"), "{stderr}");
}

/// The right of access: one document with everything held on the person, through the server
/// and through the CLI alone, the same.
#[test]
fn an_access_export_holds_everything_on_the_person() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let write = create_key(data, "--write");
    let admin = create_key(data, "--admin");
    let server = Server::start(data, &[]);
    let created = ureq::post(&server.url("/api/segments"))
        .set("Authorization", &format!("Bearer {admin}"))
        .send_json(json!({"name": "buyers", "rule": "did(\"Order Completed\", 30d)"}))
        .unwrap();
    assert_eq!(created.status(), 201);
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "dev-9", "messageId": "a1", "timestamp": "2026-05-01T09:00:00Z"},
        {"type": "identify", "userId": "ann", "messageId": "a2", "timestamp": "2026-05-01T09:30:00Z",
         "traits": {"email": "Ann@Example.com", "plan": "pro", "consent_email": true}},
        {"type": "identify", "userId": "ann", "anonymousId": "dev-9", "messageId": "a3",
         "timestamp": "2026-05-01T10:00:00Z", "traits": {"plan": "team"}},
        {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "a4",
         "timestamp": "2026-05-01T11:00:00Z", "properties": {"revenue": 30}},
        // Dated three days ahead: quarantined, kept whole, naming her.
        {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "a5",
         "timestamp": "2026-05-04T11:00:00Z"},
        {"type": "track", "userId": "bob", "event": "Order Completed", "messageId": "b1",
         "timestamp": "2026-05-01T11:00:00Z"},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &batch).status, 200);
    let document = get(&server.url("/api/profiles/ann/export"), &admin);
    assert_eq!(document.status, 200, "{:?}", document.body);
    let doc = document.body;
    assert_eq!(doc["identifiers"]["user_ids"], json!(["ann"]));
    assert_eq!(doc["identifiers"]["anonymous_ids"], json!(["dev-9"]));
    assert_eq!(doc["identifiers"]["emails"], json!(["ann@example.com"]));
    let ids: Vec<&str> = doc["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["messageId"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(ids, ["a1", "a2", "a3", "a4"], "{}", doc["events"]);
    assert_eq!(doc["traits"]["plan"]["value"], "team");
    assert_eq!(doc["trait_history"].as_array().unwrap().len(), 2);
    assert_eq!(doc["memberships"]["current"], json!(["buyers"]));
    assert!(
        doc["memberships"]["history"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["segment"] == "buyers" && c["entered"] == true)
    );
    assert_eq!(doc["consents"]["current"]["email"]["granted"], true);
    assert_eq!(doc["merges"].as_array().unwrap().len(), 1);
    let quarantined = doc["quarantined"].as_array().unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0]["raw"].as_str().unwrap().contains("a5"));
    let audit: Vec<&str> = doc["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert!(
        audit.contains(&"consent_change") && audit.contains(&"merge"),
        "{audit:?}"
    );
    assert!(
        !doc.to_string().contains("\"bob\""),
        "nothing of another person"
    );
    assert_eq!(
        get(&server.url("/api/profiles/nobody/export"), &admin).status,
        404
    );
    server.stop();

    // The same document from the CLI on the store alone (and the export is audited).
    let out = dir.path().join("ann.json");
    run_ok(
        cible(data)
            .args(["profile", "export", "ann", "--out"])
            .arg(&out),
    );
    let alone: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    for field in [
        "identifiers",
        "events",
        "traits",
        "memberships",
        "consents",
        "merges",
        "quarantined",
    ] {
        assert_eq!(alone[field], doc[field], "{field}");
    }
    let records: Vec<Value> =
        serde_json::from_str(&run_ok(cible(data).args(["audit", "list", "--json"]))).unwrap();
    let accesses = records
        .iter()
        .filter(|r| r["action"] == "export" && r["detail"]["what"] == "access")
        .count();
    assert_eq!(accesses, 2);
}

fn files_holding(dir: &std::path::Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
        } else {
            let bytes = std::fs::read(&path).unwrap();
            if memchr::memmem::find(&bytes, needle.as_bytes()).is_some() {
                found.push(path);
            }
        }
    }
    found
}

/// Erasure as a user runs it, over HTTP and with the CLI beside the server: a receipt, the
/// person gone from every file once the server stops, their next message refused.
#[test]
fn erasure_through_the_api_and_the_cli_leaves_nothing_and_refuses_the_person_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let write = create_key(data, "--write");
    let admin = create_key(data, "--admin");
    let server = Server::start(data, &[]);
    let batch = json!({"batch": [
        {"type": "page", "anonymousId": "qv8-device-eve", "messageId": "e1"},
        {"type": "identify", "userId": "qv8-user-eve", "anonymousId": "qv8-device-eve",
         "messageId": "e2", "traits": {"email": "qv8.eve@example.net"}},
        {"type": "track", "userId": "qv8-user-eve", "event": "Order Completed", "messageId": "e3"},
        {"type": "track", "userId": "qv8-user-mallory", "event": "Order Completed", "messageId": "m1"},
        {"type": "track", "userId": "keep-me", "event": "Order Completed", "messageId": "k1"},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &batch).status, 200);
    let erased = ureq::delete(&server.url("/api/profiles/qv8-user-eve?erase=true"))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(erased["events_removed"], 3, "{erased}");
    assert_eq!(erased["subjects"].as_array().unwrap().len(), 3);
    assert!(
        !erased.to_string().contains("qv8"),
        "the receipt names no identifier: {erased}"
    );
    assert_eq!(
        get(&server.url("/api/profiles/qv8-user-eve"), &admin).status,
        404
    );
    let later = post(
        &server.url("/v1/track"),
        &write,
        &json!({"userId": "qv8-user-eve", "event": "Page Viewed", "messageId": "e4"}),
    );
    assert_eq!(later.status, 200, "{:?}", later.body);
    assert_eq!(
        get(&server.url("/api/profiles/qv8-user-eve"), &admin).status,
        404
    );
    let quarantine = get(&server.url("/api/quality/quarantine?reason=erased"), &admin).body;
    assert_eq!(quarantine.as_array().map(Vec::len), Some(1), "{quarantine}");
    // The CLI beside the server goes through it.
    let text = run_ok(cible(data).args(["profile", "erase", "qv8-user-mallory", "--yes"]));
    assert!(
        text.contains("erased") && text.contains("feed entries"),
        "{text}"
    );
    assert!(text.contains("rewrite"), "where the time went: {text}");
    let (ok, stderr) = output(cible(data).args(["profile", "erase", "keep-me"]));
    assert!(!ok && stderr.contains("--yes"), "{stderr}");
    server.stop();
    for needle in [
        "qv8-user-eve",
        "qv8-device-eve",
        "qv8.eve@example.net",
        "qv8-user-mallory",
    ] {
        assert_eq!(
            files_holding(data, needle),
            Vec::<std::path::PathBuf>::new(),
            "{needle}"
        );
    }
    assert!(
        !files_holding(data, "keep-me").is_empty(),
        "the others stay"
    );
    let verified = run_ok(cible(data).args(["audit", "verify"]));
    assert!(verified.contains("intact"), "{verified}");
}

/// Key scopes and revocation: a read key reads the admin API and changes nothing; a revoked
/// key is refused at its next request; both audited.
#[test]
fn read_keys_only_read_and_revoked_keys_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let write = create_key(data, "--write");
    let admin = create_key(data, "--admin");
    let read = create_key(data, "--read");
    assert!(read.starts_with("cible_r_"), "{read}");
    let server = Server::start(data, &[]);
    let track = |key: &str| {
        post(
            &server.url("/v1/track"),
            key,
            &json!({"userId": "u", "event": "E"}),
        )
        .status
    };
    assert_eq!(get(&server.url("/api/segments"), &read).status, 200);
    let refused = ureq::post(&server.url("/api/segments"))
        .set("Authorization", &format!("Bearer {read}"))
        .send_json(json!({"name": "x", "rule": "did(\"E\")"}));
    let Err(ureq::Error::Status(403, response)) = refused else {
        panic!("a read key created a segment: {refused:?}")
    };
    let body: Value = response.into_json().unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("read key"),
        "{body}"
    );
    assert_eq!(track(&read), 403);
    assert_eq!(track(&write), 200);

    // Revoked beside the server (by its prefix), then refused; the API revokes too.
    let revoked = run_ok(cible(data).args(["key", "revoke", &read[..12]]));
    assert!(revoked.starts_with("revoked read key"), "{revoked}");
    assert_eq!(get(&server.url("/api/segments"), &read).status, 401);
    let removed = ureq::delete(&server.url(&format!("/api/keys/{write}")))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap();
    assert_eq!(removed.status(), 200);
    assert_eq!(track(&write), 401);
    server.stop();
    let records: Vec<Value> =
        serde_json::from_str(&run_ok(cible(data).args(["audit", "list", "--json"]))).unwrap();
    let revocations = records
        .iter()
        .filter(|r| r["action"] == "key_revoke")
        .count();
    assert_eq!(revocations, 2);
    let (ok, stderr) = output(cible(data).args(["key", "revoke", "cible_a_none"]));
    assert!(!ok && stderr.contains("not found"), "{stderr}");
}

#[test]
fn pseudonymized_exports_name_nobody_join_on_pseudonyms_and_rotate() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let file = data.join("events.jsonl");
    let lines = [
        json!({"type": "identify", "userId": "ann-secret", "anonymousId": "dev-secret",
            "traits": {"email": "ann.secret@example.com", "firstName": "Annabelle", "plan": "pro"},
            "context": {"ip": "203.0.113.77"}, "timestamp": "2026-04-30T10:00:00Z", "messageId": "m1"}),
        json!({"type": "track", "userId": "ann-secret", "event": "Order Completed",
            "properties": {"revenue": 40}, "timestamp": "2026-04-30T11:00:00Z", "messageId": "m2"}),
        json!({"type": "track", "userId": "bob-secret", "event": "Order Completed",
            "timestamp": "2026-04-30T11:00:00Z", "messageId": "m3"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    run_ok(cible(data).arg("import").arg(&file));
    let export = |what: &str| -> (String, Vec<Value>) {
        let text =
            run_ok(cible(data).args(["export", what, "--purpose", "analytics", "--pseudonymize"]));
        let rows = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        (text, rows)
    };
    let (events_text, events) = export("events");
    let (profiles_text, profiles) = export("profiles");
    for secret in [
        "ann-secret",
        "dev-secret",
        "ann.secret",
        "Annabelle",
        "203.0.113.77",
        "bob-secret",
    ] {
        assert!(
            !events_text.contains(secret),
            "{secret} in the events export"
        );
        assert!(
            !profiles_text.contains(secret),
            "{secret} in the profiles export"
        );
    }
    assert_eq!(events.len(), 3);
    assert_eq!(
        events[0]["traits"]["plan"], "pro",
        "what does not name a person stays"
    );
    assert_eq!(events[1]["properties"]["revenue"], 40);
    // Ann's two events and her profile join on the pseudonyms.
    let ann = events.iter().find(|e| e["messageId"] == "m2").unwrap();
    let identify = events.iter().find(|e| e["messageId"] == "m1").unwrap();
    assert_eq!(ann["userId"], identify["userId"]);
    assert_eq!(ann["profile"], identify["profile"]);
    let pseudonym = ann["userId"].as_str().unwrap().to_string();
    assert!(pseudonym.starts_with("p1_"), "{pseudonym}");
    let profile = profiles
        .iter()
        .find(|p| p["profile"] == ann["profile"])
        .expect("Ann's profile under the same pseudonym");
    assert!(
        profile["identifiers"]
            .as_array()
            .unwrap()
            .contains(&json!(format!("u:{pseudonym}"))),
        "{profile}"
    );
    assert_eq!(profile["traits"]["email"], identify["traits"]["email"]);
    assert_ne!(
        events.iter().find(|e| e["messageId"] == "m3").unwrap()["userId"],
        ann["userId"]
    );

    // A rotation: new pseudonyms, the old ones gone for good; audited.
    let rotated = run_ok(cible(data).args(["pseudonym", "rotate"]));
    assert!(rotated.contains("version 2"), "{rotated}");
    let (_, after) = export("events");
    let ann_after = after.iter().find(|e| e["messageId"] == "m2").unwrap();
    assert!(ann_after["userId"].as_str().unwrap().starts_with("p2_"));
    assert_ne!(ann_after["userId"], ann["userId"]);
    // The same through a running server.
    let admin = create_key(data, "--admin");
    let server = Server::start(data, &[]);
    let answer = ureq::post(&server.url("/api/pseudonym/rotate"))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(answer["version"], 3);
    server.stop();
    let records: Vec<Value> =
        serde_json::from_str(&run_ok(cible(data).args(["audit", "list", "--json"]))).unwrap();
    let rotations = records
        .iter()
        .filter(|r| r["action"] == "pseudonym_rotate")
        .count();
    assert_eq!(rotations, 2);
    let exports: Vec<&Value> = records.iter().filter(|r| r["action"] == "export").collect();
    assert_eq!(exports[0]["detail"]["pseudonym_key"], 1);
    assert!(run_ok(cible(data).args(["audit", "verify"])).starts_with("the audit log is intact:"));
}

#[test]
fn retention_purges_on_start_and_on_demand_through_the_cli_and_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    // NOW is 2026-05-01T12:00:00Z; events_days = 30 keeps what is dated from 2026-04-01.
    let file = data.join("events.jsonl");
    let lines = [
        json!({"type": "track", "userId": "old-buyer", "event": "Order Completed",
            "timestamp": "2026-02-01T10:00:00Z", "messageId": "old-1"}),
        json!({"type": "track", "userId": "old-buyer", "event": "Page Viewed",
            "timestamp": "2026-04-20T10:00:00Z", "messageId": "new-1"}),
        json!({"type": "track", "userId": "new-buyer", "event": "Order Completed",
            "timestamp": "2026-04-25T10:00:00Z", "messageId": "new-2"}),
    ];
    let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, text).unwrap();
    run_ok(cible(data).arg("import").arg(&file));
    run_ok(cible(data).args([
        "segment",
        "create",
        "buyers",
        "--rule",
        r#"did("Order Completed", 365d)"#,
    ]));
    let shown = run_ok(cible(data).args(["retention", "show"]));
    assert!(shown.contains("kept for ever"), "{shown}");

    // A bad policy is refused, naming the field.
    std::fs::write(data.join("retention.toml"), "events_days = 0\n").unwrap();
    let (ok, stderr) = output(cible(data).args(["retention", "show"]));
    assert!(
        !ok && stderr.contains("events_days") && stderr.contains("retention.toml"),
        "{stderr}"
    );

    std::fs::write(data.join("retention.toml"), "events_days = 30\n").unwrap();
    let admin = create_key(data, "--admin");
    // The server purges at start.
    let server = Server::start(data, &[]);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let changes = get(&server.url("/api/changes?after=0"), &admin);
        let exits = changes.body["changes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["cause"] == "retention" && c["entered"] == false)
            .count();
        if exits == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no retention exit: {}",
            changes.body
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let members = get(&server.url("/api/segments/buyers/members"), &admin);
    assert_eq!(members.body["total"], 1, "{}", members.body);
    // On demand, through the server: nothing more to purge.
    let receipt: Value =
        serde_json::from_str(&run_ok(cible(data).args(["retention", "run", "--json"]))).unwrap();
    assert_eq!(receipt["events_removed"], 0);
    assert_eq!(receipt["events_before"], "2026-04-01T12:00:00.000Z");
    server.stop();

    let ids: Vec<String> = export_events(data)
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, ["new-1", "new-2"]);
    // Importing the old file again brings nothing back.
    let imported = run_ok(cible(data).arg("import").arg(&file).arg("--json"));
    assert!(
        imported.contains("\"duplicates\": 3") || imported.contains("\"duplicates\":3"),
        "{imported}"
    );
    let records: Vec<Value> =
        serde_json::from_str(&run_ok(cible(data).args(["audit", "list", "--json"]))).unwrap();
    let purge = records
        .iter()
        .find(|r| r["action"] == "retention_purge")
        .expect("audited");
    assert_eq!(purge["actor"], "retention");
    assert_eq!(purge["detail"]["events"], 1);
}
