//! Durability: a client streams batches while the server is SIGKILLed and restarted; every
//! acknowledged event is stored exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};

use super::common::*;

#[test]
fn acknowledged_events_survive_sigkill_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let mut server = Server::start(dir.path(), &[]);
    let base = Arc::new(Mutex::new(server.base.clone()));
    let done = Arc::new(AtomicBool::new(false));
    let client = {
        let (base, done, write) = (Arc::clone(&base), Arc::clone(&done), write.clone());
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut batch_no = 0;
            // Keep streaming until the killer is done, and at least 100 batches.
            while batch_no < 100 || !done.load(Ordering::Relaxed) {
                let ids: Vec<String> = (0..200).map(|i| format!("crash-{batch_no}-{i}")).collect();
                let messages: Vec<Value> = ids
                    .iter()
                    .enumerate()
                    .map(|(i, id)| {
                        json!({"type": "track", "userId": format!("user-{}", i % 37),
                        "event": "Page Scrolled", "messageId": id})
                    })
                    .collect();
                let body = json!({"batch": messages}).to_string();
                loop {
                    let url = format!("{}/v1/batch", base.lock().unwrap());
                    match try_post(&url, &[("Authorization", &basic(&write))], body.as_bytes()) {
                        Ok(answer) if answer.status == 200 => {
                            assert_eq!(
                                answer.body["accepted"].as_u64().unwrap()
                                    + answer.body["duplicates"].as_u64().unwrap(),
                                200
                            );
                            acknowledged.extend(ids);
                            break;
                        }
                        // Refused or cut off: the server is down or saturated; send the same batch again.
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                batch_no += 1;
            }
            acknowledged
        })
    };
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(350));
        server.kill();
        server = Server::start(dir.path(), &[]);
        *base.lock().unwrap() = server.base.clone();
    }
    done.store(true, Ordering::Relaxed);
    let acknowledged = client.join().expect("client thread");
    server.stop();

    let mut counts: HashMap<String, usize> = HashMap::new();
    for event in export_events(dir.path()) {
        *counts
            .entry(event["messageId"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(acknowledged.len() >= 20_000);
    for id in &acknowledged {
        assert_eq!(
            counts.get(id),
            Some(&1),
            "{id} acknowledged but stored {:?} times",
            counts.get(id)
        );
    }
    assert!(counts.values().all(|n| *n == 1), "no event is stored twice");
}

/// The change feed across SIGKILLs: every change exactly once, and after the last restart the
/// feed replayed, the stored memberships and a batch rebuild agree.
#[test]
fn the_change_feed_survives_sigkill_with_every_change_once() {
    use super::concurrency::{all_changes, rebuilt_members, replay, settle, stored_members};
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let admin = create_key(dir.path(), "--admin");
    let mut server = Server::start(dir.path(), &[]);
    let rules = [
        ("openers", r#"count("Email Opened", 7d) >= 2"#),
        ("buyers", r#"sum("Order Completed".revenue, 30d) > 100"#),
        (
            "openers-not-buyers",
            r#"in_segment("openers") and not in_segment("buyers")"#,
        ),
    ];
    let seed = json!({"batch": [
        {"type": "track", "userId": "seed", "event": "Email Opened", "messageId": "seed-1"},
        {"type": "track", "userId": "seed", "event": "Order Completed", "messageId": "seed-2",
            "properties": {"revenue": 1}}]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &seed).status, 200);
    for (name, rule) in rules {
        let answer = try_post(
            &server.url("/api/segments"),
            &[("Authorization", &format!("Bearer {admin}"))],
            json!({"name": name, "rule": rule}).to_string().as_bytes(),
        )
        .unwrap();
        assert_eq!(answer.status, 201, "{}", answer.body);
    }
    // Each batch touches people no other batch touches: a batch whose evaluation a kill cut
    // short is never made good by later traffic, only by the worker's recovery at start.
    let batch_of = |batch_no: usize| -> String {
        let messages: Vec<Value> = (0..50)
            .map(|i| {
                let number = batch_no * 25 + i / 2;
                let id = format!("feed-{batch_no}-{i}");
                let user = format!("user-{number}");
                if i % 2 == 1 && number.is_multiple_of(3) {
                    json!({"type": "track", "userId": user, "event": "Order Completed",
                        "messageId": id, "properties": {"revenue": 150}})
                } else {
                    json!({"type": "track", "userId": user, "event": "Email Opened",
                        "messageId": id})
                }
            })
            .collect();
        json!({"batch": messages}).to_string()
    };
    let base = Arc::new(Mutex::new(server.base.clone()));
    let done = Arc::new(AtomicBool::new(false));
    let client = {
        let (base, done, write) = (Arc::clone(&base), Arc::clone(&done), write.clone());
        std::thread::spawn(move || {
            let mut batch_no = 0;
            // At most 38 batches (950 people): the batch rebuild below sees every member.
            while batch_no < 38 && !done.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(30));
                let body = batch_of(batch_no);
                loop {
                    let url = format!("{}/v1/batch", base.lock().unwrap());
                    match try_post(&url, &[("Authorization", &basic(&write))], body.as_bytes()) {
                        Ok(answer) if answer.status == 200 => break,
                        _ => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
                batch_no += 1;
            }
            batch_no
        })
    };
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(400));
        server.kill();
        server = Server::start(dir.path(), &[]);
        *base.lock().unwrap() = server.base.clone();
    }
    done.store(true, Ordering::Relaxed);
    let sent = client.join().expect("client thread");
    // Last batches, each killed right after its acknowledgement: its evaluation is often still
    // to come, so only the recovery at the next start can produce its changes.
    for extra in 0..4 {
        let body: Value = serde_json::from_str(&batch_of(sent + extra)).unwrap();
        assert_eq!(post(&server.url("/v1/batch"), &write, &body).status, 200);
        server.kill();
        server = Server::start(dir.path(), &[]);
    }
    settle(&server.base);
    let changes = all_changes(&server.base, &admin);
    assert_eq!(changes.first().unwrap()["seq"], 1, "the feed starts at 1");
    // Gap-free, each profile alternating enter and exit, sizes consistent.
    let replayed = replay(&changes);
    for (name, rule) in rules {
        let stored = stored_members(&server.base, &admin, name);
        assert!(!stored.is_empty(), "{name} has members");
        let rebuilt = rebuilt_members(&server.base, &admin, rule);
        if stored != rebuilt {
            eprintln!(
                "{name}: only stored {:?}, only rebuilt {:?}, feed head {}",
                stored.difference(&rebuilt).collect::<Vec<_>>(),
                rebuilt.difference(&stored).collect::<Vec<_>>(),
                changes.len()
            );
            let first = *rebuilt.difference(&stored).next().unwrap_or(&0);
            for change in changes.iter().filter(|c| c["profile"] == first) {
                eprintln!("  {change}");
            }
            eprintln!("  last: {:?}", changes.last());
        }
        assert_eq!(stored, rebuilt, "{name}");
        assert_eq!(replayed[name], stored, "{name}: the feed replayed");
    }
    server.stop();
}

/// `cible import` killed at different points, then run again: the store ends with every
/// message of the file once, as a clean import does.
#[test]
fn an_import_killed_midway_and_run_again_holds_every_message_once() {
    let work = tempfile::tempdir().unwrap();
    let file = work.path().join("messages.jsonl");
    run_ok(cible(&work.path().join("unused")).args([
        "generate",
        "--profiles",
        "2000",
        "--days",
        "30",
        "--out",
        file.to_str().unwrap(),
    ]));
    let ids = |data: &std::path::Path| -> Vec<String> {
        let mut ids: Vec<String> = export_events(data)
            .iter()
            .map(|e| e["messageId"].as_str().expect("messageId").to_string())
            .collect();
        ids.sort();
        ids
    };
    let accepted = |data: &std::path::Path| -> u64 {
        let report: serde_json::Value =
            serde_json::from_str(&run_ok(cible(data).args(["quality", "--json"]))).unwrap();
        report["accepted"].as_u64().expect("accepted")
    };
    let clean = work.path().join("clean");
    run_ok(cible(&clean).arg("import").arg(&file));
    let expected = ids(&clean);
    assert!(expected.len() > 40_000, "{} events", expected.len());
    for delay_ms in [300, 1500] {
        let data = work.path().join(format!("killed-{delay_ms}"));
        let mut child = cible(&data)
            .arg("import")
            .arg(&file)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().unwrap();
        child.wait().unwrap();
        run_ok(cible(&data).arg("import").arg(&file));
        let found = ids(&data);
        assert_eq!(found.len(), expected.len(), "killed after {delay_ms} ms");
        assert!(
            found == expected,
            "killed after {delay_ms} ms: other messages"
        );
        assert_eq!(
            accepted(&data),
            expected.len() as u64,
            "killed after {delay_ms} ms: accepted counts what is stored"
        );
    }
}
