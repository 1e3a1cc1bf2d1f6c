//! CLI commands beside a running server. `cible serve` writes its address and a fresh local
//! credential into `server.json` in the data directory, readable by its owner only (mode 0600),
//! as database servers do with a cookie file, and removes it when it stops. A command that finds
//! the store locked by the server reads that file and goes through the HTTP API instead.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

/// The file's name in the data directory.
pub const FILE_NAME: &str = "server.json";

/// What the server writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerInfo {
    /// `http://host:port` of the running server.
    pub address: String,
    /// Accepted as an admin key by that server, and only for its life.
    pub token: String,
    pub pid: u32,
}

/// The file while the server runs; removed when dropped.
pub struct ServerFile {
    path: PathBuf,
    pub token: String,
}

/// A random credential: 32 bytes, hex.
pub fn new_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("cible_local_{}", hex_of(&bytes))
}

fn hex_of(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compares a presented key with the local token in constant time.
pub fn same_token(presented: &str, token: &str) -> bool {
    let (a, b) = (presented.as_bytes(), token.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ServerFile {
    /// Writes `server.json` for a server listening on `address`.
    pub fn write(dir: &Path, address: SocketAddr) -> anyhow::Result<Self> {
        let path = dir.join(FILE_NAME);
        let host = if address.ip().is_unspecified() {
            "127.0.0.1".to_string()
        } else {
            address.ip().to_string()
        };
        let host = if address.is_ipv6() && host.contains(':') {
            format!("[{host}]")
        } else {
            host
        };
        let info = ServerInfo {
            address: format!("http://{host}:{}", address.port()),
            token: new_token(),
            pid: std::process::id(),
        };
        let temporary = dir.join(format!("{FILE_NAME}.tmp"));
        let _ = std::fs::remove_file(&temporary);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            options.mode(0o600);
        }
        let mut file = options
            .open(&temporary)
            .with_context(|| format!("writing {}", temporary.display()))?;
        file.write_all(&serde_json::to_vec_pretty(&info)?)?;
        file.sync_all()?;
        std::fs::rename(&temporary, &path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(Self {
            path,
            token: info.token,
        })
    }
}

impl Drop for ServerFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The running server's file in `dir`, if any.
pub fn read(dir: &Path) -> Option<ServerInfo> {
    let bytes = std::fs::read(dir.join(FILE_NAME)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A client of the server holding the data directory.
pub struct Remote {
    pub info: ServerInfo,
    agent: ureq::Agent,
}

impl Remote {
    pub fn new(info: ServerInfo) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(std::time::Duration::from_secs(5))
            .build();
        Self { info, agent }
    }

    /// Whether the server answers `/healthz` (within a second).
    pub fn is_up(&self) -> bool {
        self.agent
            .get(&format!("{}/healthz", self.info.address))
            .timeout(std::time::Duration::from_secs(1))
            .call()
            .is_ok()
    }

    fn request(&self, method: &str, path: &str) -> ureq::Request {
        self.agent
            .request(method, &format!("{}{path}", self.info.address))
            .set("Authorization", &format!("Bearer {}", self.info.token))
    }

    /// Sends a request and returns the JSON answer, or the API's error message.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let request = self.request(method, path);
        let response = self.answer(match body {
            Some(body) => request.send_json(body.clone()),
            None => request.call(),
        })?;
        let text = response.into_string()?;
        if text.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(&text)
            .with_context(|| format!("the server's answer to {method} {path}"))
    }

    /// The server's answer, or its error message (or why it did not answer) as an error.
    fn answer(
        &self,
        result: Result<ureq::Response, ureq::Error>,
    ) -> anyhow::Result<ureq::Response> {
        match result {
            Ok(response) => Ok(response),
            Err(ureq::Error::Status(status, response)) => {
                let text = response.into_string().unwrap_or_default();
                let message = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
                    .unwrap_or(text);
                anyhow::bail!("{message} (HTTP {status} from the running server)")
            }
            Err(error) => Err(anyhow::anyhow!(
                "the server in this data directory ({}) does not answer: {error}",
                self.info.address
            )),
        }
    }

    /// Opens a long-lived stream (Server-Sent Events) and returns its body.
    pub fn stream(&self, path: &str) -> anyhow::Result<Box<dyn std::io::Read + Send + Sync>> {
        Ok(self.get(path)?.into_reader())
    }

    /// Sends a request and returns the raw text answer.
    pub fn text(&self, path: &str) -> anyhow::Result<String> {
        Ok(self.get(path)?.into_string()?)
    }

    fn get(&self, path: &str) -> anyhow::Result<ureq::Response> {
        self.answer(self.request("GET", path).call())
    }
}

/// A path segment percent-encoded (names, identifiers such as e-mails).
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(byte as char)
            }
            other => out.push_str(&format!("%{other:02X}")),
        }
    }
    out
}
