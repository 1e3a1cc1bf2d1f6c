//! Slow and idle clients: body and header timeouts, caps on connections.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::json;

use super::common::*;

fn address(server: &Server) -> String {
    server.base.trim_start_matches("http://").to_string()
}

/// Reads until the server closes the connection (`None` if it has not within `limit`).
fn read_until_closed(stream: &mut TcpStream, limit: Duration) -> Option<String> {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut text = Vec::new();
    match stream.read_to_end(&mut text) {
        Ok(_) => Some(String::from_utf8_lossy(&text).into_owned()),
        // A reset after the answer is a close too.
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
            Some(String::from_utf8_lossy(&text).into_owned())
        }
        Err(_) => None,
    }
}

#[test]
fn slow_bodies_time_out_with_408_and_free_the_tracking_api() {
    let dir = tempfile::tempdir().unwrap();
    let write = create_key(dir.path(), "--write");
    // 4 × 2 = 8 requests may be in flight.
    let server = Server::start(dir.path(), &["--queue", "2", "--body-timeout-secs", "1"]);
    let started = Instant::now();
    let head = format!(
        "POST /v1/batch HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: 10000\r\n\r\n{{",
        basic(&write)
    );
    let mut slow: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut stream = TcpStream::connect(address(&server)).unwrap();
            stream.write_all(head.as_bytes()).unwrap();
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let batch =
        json!({"batch": [{"type": "track", "userId": "u", "event": "E", "messageId": "normal"}]});
    let first = post(&server.url("/v1/batch"), &write, &batch);
    assert_eq!(
        first.status, 503,
        "the slow requests hold every in-flight place for now: {first:?}"
    );
    // A normal client retrying as told gets through once the slow bodies time out.
    let answer = loop {
        let answer = post(&server.url("/v1/batch"), &write, &batch);
        if answer.status != 503 || started.elapsed() > Duration::from_secs(15) {
            break answer;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "took {:?}",
        started.elapsed()
    );
    // Each slow request was answered and its connection closed: 408 for those that held a
    // place, 503 for those refused (their body drained until the same deadline).
    let mut timed_out = 0;
    for stream in &mut slow {
        let text = read_until_closed(stream, Duration::from_secs(5))
            .expect("the server closes a slow connection");
        let status = text.get(9..12).unwrap_or("");
        assert!(status == "408" || status == "503", "{text}");
        if status == "408" {
            timed_out += 1;
            assert!(
                text.contains(r#""code":"request_timeout""#)
                    && text.contains("did not arrive within 1 s"),
                "{text}"
            );
        }
    }
    assert_eq!(
        timed_out, 8,
        "every in-flight place was held by a slow body"
    );
    server.stop();
    assert_eq!(export_events(dir.path()).len(), 1);
}

#[test]
fn idle_connections_are_closed_and_capped_per_address_and_overall() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &[
            "--header-timeout-secs",
            "3",
            "--max-connections-per-ip",
            "4",
        ],
    );
    let started = Instant::now();
    let mut idle: Vec<TcpStream> = (0..4)
        .map(|i| {
            let mut stream = TcpStream::connect(address(&server)).unwrap();
            if i % 2 == 1 {
                // Headers begun, never finished.
                stream
                    .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                    .unwrap();
            }
            stream
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    // A fifth connection from the same address is closed at once, before any timeout.
    let mut fifth = TcpStream::connect(address(&server)).unwrap();
    let _ = fifth.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n");
    let text = read_until_closed(&mut fifth, Duration::from_secs(2)).expect("closed at once");
    assert!(!text.contains("200 OK"), "{text}");
    // The idle ones are closed by the header timeout.
    for stream in &mut idle {
        read_until_closed(stream, Duration::from_secs(8)).expect("closed after the timeout");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(2500) && elapsed < Duration::from_secs(9),
        "{elapsed:?}"
    );
    // A keep-alive connection is closed once idle for as long.
    let mut kept = TcpStream::connect(address(&server)).unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let answered = Instant::now();
    let text = read_until_closed(&mut kept, Duration::from_secs(8)).expect("idle close");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(answered.elapsed() >= Duration::from_millis(2500));
    server.stop();

    // Overall: past --max-connections, a connection waits to be accepted until one closes.
    let server = Server::start(
        dir.path(),
        &["--header-timeout-secs", "2", "--max-connections", "2"],
    );
    let _idle: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(address(&server)).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let waited = Instant::now();
    let health = ureq::get(&server.url("/healthz"))
        .timeout(Duration::from_secs(10))
        .call()
        .unwrap();
    assert_eq!(health.status(), 200);
    assert!(
        waited.elapsed() >= Duration::from_millis(1500),
        "served before a place was free: {:?}",
        waited.elapsed()
    );
    server.stop();
}
