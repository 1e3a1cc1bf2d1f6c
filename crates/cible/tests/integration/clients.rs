//! Compatibility with clients nobody here wrote: the official Segment Python and Node libraries
//! send every kind of call, and each message is stored exactly once. `tests/clients/install.sh`
//! installs them (pip and npm registries).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;

use super::common::*;

fn run_client(command: &mut Command) -> Vec<String> {
    let output = command.output().expect("client runs");
    assert!(
        output.status.success(),
        "{command:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).expect("the client prints the ids it sent")
}

#[test]
fn official_python_and_node_libraries_deliver_every_call_exactly_once() {
    let clients = clients_dir();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients");
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    let server = Server::start_unpinned(dir.path());

    let python_ids = run_client(
        Command::new("python3")
            .arg(root.join("python_client.py"))
            .args([&server.base, &write, "py"])
            .env("PYTHONPATH", clients.join("py")),
    );
    let node_ids = run_client(
        Command::new("node")
            .arg(root.join("node_client.js"))
            .args([&server.base, &write, "node"])
            .env("NODE_PATH", clients.join("node/node_modules")),
    );
    server.stop();

    let events = export_events(dir.path());
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for event in &events {
        *counts
            .entry(event["messageId"].as_str().unwrap())
            .or_default() += 1;
    }
    for id in python_ids.iter().chain(&node_ids) {
        assert_eq!(counts.get(id.as_str()), Some(&1), "{id}");
    }
    assert_eq!(
        events.len(),
        python_ids.len() + node_ids.len(),
        "nothing else arrived"
    );
    for prefix in ["py", "node"] {
        let page = events
            .iter()
            .find(|e| e["messageId"] == format!("{prefix}-page"))
            .unwrap();
        assert_eq!(page["event"], "Page Viewed");
        assert_eq!(page["type"], "page");
        // The anonymous page view, the identify and the tracks are one profile.
        let profile_of = |id: &str| {
            events
                .iter()
                .find(|e| e["messageId"] == format!("{prefix}-{id}"))
                .unwrap()["profile"]
                .clone()
        };
        assert_eq!(profile_of("page"), profile_of("track-3"));
        assert_eq!(profile_of("alias"), profile_of("identify"));
    }
}

/// A port free now, for a page the browser test serves from another origin than cible's.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn segment_browser_library_works_unchanged_in_chromium_from_an_allowed_origin() {
    let clients = clients_dir();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/clients");
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let origin = format!("http://127.0.0.1:{port}");
    let write = run_ok(cible(dir.path()).args(["key", "create", "--write", "--origin", &origin]))
        .trim()
        .to_string();
    let server = Server::start_unpinned(dir.path());

    let output = Command::new("node")
        .arg(root.join("browser_client.js"))
        .args([&server.base, &write, &port.to_string()])
        .env("NODE_PATH", clients.join("node/node_modules"))
        .output()
        .expect("node runs");
    assert!(
        output.status.success(),
        "analytics.js in Chromium failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    server.stop();

    // The short endpoints, then one batch.
    let strings = |field: &str| -> Vec<String> {
        serde_json::from_value(report[field].clone()).expect("a list of strings")
    };
    let posts = strings("posts");
    for path in ["/v1/p", "/v1/t", "/v1/i", "/v1/g", "/v1/a", "/v1/b"] {
        assert!(
            posts.iter().any(|p| p == path),
            "{path} not posted: {posts:?}"
        );
    }
    let events = export_events(dir.path());
    let ids = strings("ids");
    assert_eq!(ids.len(), 8);
    assert_eq!(events.len(), ids.len(), "each call once, nothing else");
    let event = |id: &str| {
        events
            .iter()
            .find(|e| e["messageId"] == id)
            .unwrap_or_else(|| panic!("{id} missing"))
    };
    let page = event(&ids[0]);
    assert_eq!(page["type"], "page");
    assert_eq!(page["anonymousId"], report["anonymousId"]);
    assert!(
        page["context"]["page"]["url"]
            .as_str()
            .unwrap()
            .starts_with(&origin),
        "{page}"
    );
    assert!(page.get("writeKey").is_none(), "the key is not stored");
    assert_eq!(event(&ids[1])["event"], "Product Viewed");
    // The anonymous visit, the identify and the later batched tracks are one profile.
    let identify = event(&ids[2]);
    assert_eq!(identify["userId"], "browser-user");
    for id in &ids {
        assert_eq!(event(id)["profile"], page["profile"], "{id}");
    }
    let batched = event(&ids[7]);
    assert_eq!(batched["event"], "Added To Cart");
    assert_eq!(batched["userId"], "browser-user");
}
