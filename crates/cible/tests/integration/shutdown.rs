//! Long admin work never holds the server: a training whose client leaves is cancelled (nothing
//! saved), and SIGTERM ends the server within seconds even while one runs.

use std::time::{Duration, Instant};

use serde_json::json;

use super::common::*;

/// A store with a few thousand profiles, and an admin key.
fn store() -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("g.jsonl");
    run_ok(
        cible(&data)
            .args([
                "generate",
                "--profiles",
                "3000",
                "--days",
                "20",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&file),
    );
    run_ok(cible(&data).arg("import").arg(&file));
    let admin = create_key(&data, "--admin");
    (dir, admin)
}

/// The largest clustering the bounds allow: minutes of work on this store.
fn heavy_training() -> serde_json::Value {
    json!({"kind": "cluster", "min_k": 2, "max_k": 50, "restarts": 20, "sample": 100000})
}

#[test]
fn a_training_whose_client_leaves_is_cancelled_and_saves_nothing() {
    let (dir, admin) = store();
    let server = Server::start(&dir.path().join("data"), &[]);
    let left = ureq::post(&server.url("/api/models"))
        .timeout(Duration::from_secs(1))
        .set("Authorization", &format!("Bearer {admin}"))
        .send_json(heavy_training());
    assert!(left.is_err(), "the client gives up after a second");
    // The abandoned training stops at its next step.
    let started = Instant::now();
    loop {
        let metrics = ureq::get(&server.url("/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        if metrics.lines().any(|l| l == "cible_admin_jobs 0") {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the training goes on after its client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The server is free again at once: a small training answers, and it is the only model.
    let started = Instant::now();
    let small = ureq::post(&server.url("/api/models"))
        .timeout(Duration::from_secs(60))
        .set("Authorization", &format!("Bearer {admin}"))
        .send_json(json!({"kind": "cluster", "min_k": 2, "max_k": 2, "restarts": 1, "sample": 100}))
        .expect("a small training answers");
    assert_eq!(small.status(), 201);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the abandoned training kept the server busy: {:?}",
        started.elapsed()
    );
    let versions = get(&server.url("/api/models/cluster/versions"), &admin).body;
    assert_eq!(
        versions.as_array().map(Vec::len),
        Some(1),
        "only the small training was saved: {versions}"
    );
    server.stop();
}

#[test]
fn sigterm_ends_the_server_within_seconds_while_a_training_runs() {
    let (dir, admin) = store();
    let server = Server::start(&dir.path().join("data"), &[]);
    let url = server.url("/api/models");
    // What the training's client got: the status and error code, or a closed connection.
    let training = std::thread::spawn(move || -> Option<(u16, String)> {
        match ureq::post(&url)
            .timeout(Duration::from_secs(120))
            .set("Authorization", &format!("Bearer {admin}"))
            .send_json(heavy_training())
        {
            Ok(response) => Some((response.status(), String::new())),
            Err(ureq::Error::Status(status, response)) => {
                let body: serde_json::Value = response.into_json().unwrap_or_default();
                Some((
                    status,
                    body["error"]["code"].as_str().unwrap_or("").to_string(),
                ))
            }
            Err(ureq::Error::Transport(_)) => None,
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    let started = Instant::now();
    server.stop();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "SIGTERM took {:?}",
        started.elapsed()
    );
    // The answer is 503 `cancelled`, unless the stopping server closed the connection first.
    if let Some((status, code)) = training.join().unwrap() {
        assert_eq!((status, code.as_str()), (503, "cancelled"));
    }
}

#[test]
fn sigterm_right_after_the_address_is_printed_is_a_clean_stop() {
    // The handler must be in place before the address line: a supervisor (or a benchmark)
    // that stops the server as soon as it listens used to kill it with the default action.
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    for round in 0..20 {
        let mut child = cible(&data)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        while let Some(Ok(line)) = lines.next() {
            if line.starts_with("cible listening on ") {
                break;
            }
        }
        std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let status = child.wait().unwrap();
        assert!(
            status.success(),
            "round {round}: the server exited with {status}"
        );
    }
}
