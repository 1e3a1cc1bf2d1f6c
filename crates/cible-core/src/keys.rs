//! API keys: write keys for the tracking API, admin keys for `/api/*`. A key is shown once when
//! created; only its SHA-256 is stored.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Send events (`/v1/*`).
    #[default]
    Write,
    /// Everything: the admin API (`/api/*`) and sending events.
    Admin,
    /// The admin API's reads only (`GET /api/*`): dashboards, monitoring.
    Read,
}

/// The stored form of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub kind: KeyKind,
    pub name: String,
    pub created_at: i64,
    /// The first characters of the key, to recognise it in a list.
    pub prefix: String,
    /// Web origins (`https://shop.example`) whose pages may send events with this write key
    /// (CORS); `*` allows any. Empty: no browser may use it (requests carrying an `Origin`
    /// header are refused).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub origins: Vec<String>,
    /// Requests a second this key may make (a token bucket holding as many); `None`: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<u32>,
}

impl KeyRecord {
    /// Whether a page of `origin` (as browsers send it in `Origin`) may use this key.
    pub fn allows_origin(&self, origin: &str) -> bool {
        self.origins
            .iter()
            .any(|allowed| allowed == "*" || allowed.eq_ignore_ascii_case(origin))
    }
}

/// What a new key is: its kind, name and limits.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    pub kind: KeyKind,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub origins: Vec<String>,
    #[serde(default)]
    pub rate_limit: Option<u32>,
}

impl KeySpec {
    /// The spec with its origins in canonical form (`scheme://host[:port]`, lower case), or
    /// the reason one is refused, naming the field.
    pub fn validated(mut self) -> Result<Self, String> {
        if !self.origins.is_empty() && self.kind != KeyKind::Write {
            return Err("origins: only a write key may be used from a browser".into());
        }
        for origin in &mut self.origins {
            *origin = canonical_origin(origin).map_err(|reason| format!("origins: {reason}"))?;
        }
        self.origins.sort();
        self.origins.dedup();
        if self.rate_limit == Some(0) {
            return Err(
                "rate_limit: 0 requests a second would refuse everything; leave it out for no limit"
                    .into(),
            );
        }
        Ok(self)
    }
}

/// `scheme://host[:port]` as browsers send it in `Origin`, or `*`.
fn canonical_origin(text: &str) -> Result<String, String> {
    let text = text.trim();
    if text == "*" {
        return Ok(text.into());
    }
    let url = url::Url::parse(text)
        .map_err(|e| format!("{text:?} is not an origin such as https://shop.example: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
        return Err(format!(
            "{text:?} is not an origin: it needs http:// or https:// and a host"
        ));
    }
    if url.path() != "/" || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "{text:?} is not an origin: an origin has no path, query or fragment"
        ));
    }
    // `ascii_serialization` drops the default port, as browsers do.
    Ok(url.origin().ascii_serialization())
}

/// Makes a new random key: `cible_w_` or `cible_a_` and 32 hex characters.
pub fn new_key(kind: KeyKind) -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let tag = match kind {
        KeyKind::Write => "w",
        KeyKind::Admin => "a",
        KeyKind::Read => "r",
    };
    format!("cible_{tag}_{}", hex::encode(bytes))
}

/// The hash under which a key is stored.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: KeyKind, origins: &[&str]) -> KeySpec {
        KeySpec {
            kind,
            origins: origins.iter().map(|o| o.to_string()).collect(),
            ..Default::default()
        }
    }

    #[test]
    fn origins_are_canonical_and_star_allows_any() {
        let validated = spec(
            KeyKind::Write,
            &["https://Shop.Example:443", "http://localhost:8080", "*"],
        )
        .validated()
        .unwrap();
        assert_eq!(
            validated.origins,
            ["*", "http://localhost:8080", "https://shop.example"]
        );
        let record = |origins: Vec<String>| KeyRecord {
            kind: KeyKind::Write,
            name: String::new(),
            created_at: 0,
            prefix: String::new(),
            origins,
            rate_limit: None,
        };
        let any = record(vec!["*".into()]);
        assert!(any.allows_origin("https://anything.example") && any.allows_origin("null"));
        let listed = record(vec!["https://shop.example".into()]);
        assert!(listed.allows_origin("https://shop.example"));
        assert!(!listed.allows_origin("https://shop.example.evil"));
        assert!(!record(Vec::new()).allows_origin("https://shop.example"));
        for (bad, reason) in [
            ("https://shop.example/cart", "no path"),
            ("ftp://shop.example", "http:// or https://"),
            ("shop.example", "not an origin"),
        ] {
            let error = spec(KeyKind::Write, &[bad]).validated().unwrap_err();
            assert!(
                error.starts_with("origins:") && error.contains(reason),
                "{error}"
            );
        }
        let error = spec(KeyKind::Admin, &["https://shop.example"])
            .validated()
            .unwrap_err();
        assert!(error.contains("only a write key"), "{error}");
    }
}
