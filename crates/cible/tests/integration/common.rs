//! Helpers: run the binary, start and kill servers, speak HTTP, read the store back.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::Value;

/// 2026-05-01T12:00:00Z, the pinned "now" of every test.
pub const NOW: &str = "2026-05-01T12:00:00Z";

/// The `cible` command on a data directory with "now" pinned.
pub fn cible(data: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_cible"));
    command
        .arg("--data")
        .arg(data)
        .env("CIBLE_NOW", NOW)
        .env("CIBLE_LOG", "warn");
    command
}

/// Runs a command and returns its standard output; panics with stderr on failure.
pub fn run_ok(command: &mut Command) -> String {
    let output = command.output().expect("cible runs");
    assert!(
        output.status.success(),
        "{command:?} failed: {}\n{}",
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8(output.stdout).expect("utf-8 output")
}

pub fn create_key(data: &Path, kind: &str) -> String {
    run_ok(cible(data).args(["key", "create", kind]))
        .trim()
        .to_string()
}

/// Every stored event, via `cible export events`.
pub fn export_events(data: &Path) -> Vec<Value> {
    run_ok(cible(data).args(["export", "events", "--purpose", "analytics"]))
        .lines()
        .map(|line| serde_json::from_str(line).expect("export is JSON Lines"))
        .collect()
}

/// A running `cible serve`.
pub struct Server {
    child: Option<Child>,
    pub base: String,
}

impl Server {
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        Self::spawn(cible(data), extra)
    }

    /// A server on the wall clock, for clients that stamp messages with the real time.
    pub fn start_unpinned(data: &Path) -> Self {
        let mut command = cible(data);
        command.env_remove("CIBLE_NOW");
        Self::spawn(command, &[])
    }

    fn spawn(mut command: Command, extra: &[&str]) -> Self {
        let mut child = command
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("server starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(address) = line.strip_prefix("cible listening on ") {
                    let _ = sender.send(address.to_string());
                }
            }
        });
        let base = receiver
            .recv_timeout(Duration::from_secs(60))
            .expect("server prints its address");
        Self {
            child: Some(child),
            base,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill(mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("kill");
            child.wait().expect("reaped");
        }
    }

    /// SIGTERM, and wait for a clean exit.
    pub fn stop(mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id().to_string();
            Command::new("kill")
                .args(["-TERM", &pid])
                .status()
                .expect("kill -TERM");
            let status = child.wait().expect("reaped");
            assert!(status.success(), "server exited with {status}");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<String>,
}

fn answer(result: Result<ureq::Response, ureq::Error>) -> Result<Answer, String> {
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => return Err(other.to_string()),
    };
    let status = response.status();
    let retry_after = response.header("retry-after").map(str::to_string);
    let text = response.into_string().map_err(|e| e.to_string())?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer {
        status,
        body,
        retry_after,
    })
}

pub fn basic(key: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// POSTs raw bytes with optional headers; `Err` only for transport failures.
pub fn try_post(url: &str, headers: &[(&str, &str)], body: &[u8]) -> Result<Answer, String> {
    let mut request = ureq::post(url).timeout(Duration::from_secs(30));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    answer(request.send_bytes(body))
}

/// POSTs JSON with a write key as HTTP Basic user.
pub fn post(url: &str, key: &str, body: &Value) -> Answer {
    try_post(
        url,
        &[
            ("Authorization", &basic(key)),
            ("Content-Type", "application/json"),
        ],
        body.to_string().as_bytes(),
    )
    .expect("request completes")
}

/// GETs with an admin key as Bearer token.
pub fn get(url: &str, admin: &str) -> Answer {
    answer(
        ureq::get(url)
            .set("Authorization", &format!("Bearer {admin}"))
            .call(),
    )
    .expect("request completes")
}

/// Installs what the tests need from PyPI, npm and Debian (`tests/clients/install.sh`) and
/// returns where: `py` (for PYTHONPATH) and `node` below it.
pub fn clients_dir() -> std::path::PathBuf {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let output = Command::new("bash")
        .arg(root.join("tests/clients/install.sh"))
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "installing the test clients failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    std::path::PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

/// `cible segment create NAME --rule RULE` (through the server when one runs).
pub fn create_segment(data: &Path, name: &str, rule: &str) {
    run_ok(cible(data).args(["segment", "create", name, "--rule", rule]));
}
