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
