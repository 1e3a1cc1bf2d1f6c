//! The CLI beside a running server: commands go through its API (the store is locked by it)
//! and print what they print on the store alone; a key made through it works at once.

use std::time::Duration;

use serde_json::json;

use super::common::*;

/// Commands that read, as a user types them.
const READS: [&[&str]; 7] = [
    &["segment", "list"],
    &["segment", "show", "buyers"],
    &["segment", "history", "buyers"],
    &["profile", "show", "ann"],
    &["changes", "--after", "0"],
    &["quality"],
    &["traits", "show", "ann"],
];

#[test]
fn cli_commands_go_through_the_server_with_the_same_output() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let write = create_key(data, "--write");
    let server = Server::start(data, &[]);
    assert!(
        data.join("server.json").is_file(),
        "the server says where it is"
    );
    let batch = json!({"batch": [
        {"type": "identify", "userId": "ann", "traits": {"email": "ann@example.com"}, "messageId": "b1"},
        {"type": "track", "userId": "ann", "event": "Order Completed", "properties": {"revenue": 90}, "messageId": "b2"},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &batch).status, 200);
    run_ok(cible(data).args([
        "segment",
        "create",
        "buyers",
        "--rule",
        r#"did("Order Completed", 30d)"#,
    ]));
    // A key made beside the server is known to it at once.
    let second = create_key(data, "--write");
    let more = json!({"batch": [{"type": "track", "userId": "bob", "event": "Order Completed", "messageId": "b3"}]});
    assert_eq!(post(&server.url("/v1/batch"), &second, &more).status, 200);
    super::concurrency::settle(&server.base);
    let beside: Vec<String> = READS
        .iter()
        .map(|args| run_ok(cible(data).args(*args)))
        .collect();
    assert!(beside[0].contains("buyers"), "{}", beside[0]);
    assert!(
        beside[0].contains("        2"),
        "ann and bob: {}",
        beside[0]
    );
    server.stop();
    assert!(
        !data.join("server.json").exists(),
        "removed when the server stops"
    );
    for (args, through_server) in READS.iter().zip(&beside) {
        let alone = run_ok(cible(data).args(*args));
        assert_eq!(&alone, through_server, "cible {}", args.join(" "));
    }
}

#[test]
fn a_stale_server_file_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    create_key(data, "--admin");
    let server = Server::start(data, &[]);
    server.kill();
    // SIGKILL left the file behind; nobody answers at its address.
    assert!(data.join("server.json").is_file());
    let started = std::time::Instant::now();
    let listed = run_ok(cible(data).args(["key", "list"]));
    assert!(listed.contains("admin"), "{listed}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

/// `cible changes --follow` prints changes as they come; when the server stops it says so,
/// with the sequence number to resume from, and exits with an error.
#[test]
fn following_changes_ends_with_where_to_resume_when_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path();
    let write = create_key(data, "--write");
    let server = Server::start(data, &[]);
    run_ok(cible(data).args([
        "segment",
        "create",
        "buyers",
        "--rule",
        r#"did("Order Completed", 30d)"#,
    ]));
    let follower = cible(data)
        .args(["changes", "--follow", "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let batch = json!({"batch": [
        {"type": "track", "userId": "ann", "event": "Order Completed", "messageId": "f1"},
    ]});
    assert_eq!(post(&server.url("/v1/batch"), &write, &batch).status, 200);
    std::thread::sleep(Duration::from_millis(500));
    server.stop();
    let output = follower.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.contains("\"buyers\""), "{stdout}");
    assert!(!output.status.success());
    assert!(
        stderr.contains("ended the stream") && stderr.contains("--after 1 --follow"),
        "{stderr}"
    );
}
