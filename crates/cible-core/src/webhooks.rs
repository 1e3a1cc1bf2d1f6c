//! Webhook subscriptions and their durable delivery queue: what is sent, to whom, signed how,
//! and what is still owed. Sending (HTTP, timers, concurrency) is the binary's; everything a
//! restart must remember is here, in the `webhooks` keyspace.
//!
//! | key                          | value                                   |
//! |------------------------------|-----------------------------------------|
//! | `s` · id u32                 | [`Subscription`], JSON                  |
//! | `c` · id u32                 | the feed sequence number examined last (u64): every change up to it is queued or was skipped |
//! | `q` · id u32 · seq u64       | [`Pending`]: a delivery still owed (`seq` is the change's, or a list sync's last) |
//! | `d` · id u32 · seq u64       | [`Pending`]: a dead letter, its retries exhausted |
//! | `n`                          | the next subscription id (u32)          |
//!
//! (integers big-endian). A queued delivery holds a profile ordinal and attempt counts, never
//! an identifier: the payload is built from the change feed and the profile at each attempt,
//! so an erasure (which removes the feed entries naming the person) leaves nothing to send.
//!
//! Signatures follow the Standard Webhooks specification: `webhook-id` (stable across retries,
//! the receiver's idempotency key), `webhook-timestamp` (seconds, at each attempt) and
//! `webhook-signature`: `v1,` + base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")), one per
//! live secret, space-separated, during a rotation.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

/// What a subscription listens to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Target {
    /// One segment, by name.
    Segment { name: String },
    /// Every segment but the lifecycle stages.
    AllSegments,
    /// The lifecycle stages (the segments `lifecycle-*`).
    Lifecycle,
}

impl Target {
    /// Whether a change of this segment concerns the subscription.
    pub fn matches(&self, segment: &str) -> bool {
        let lifecycle = segment.starts_with(LIFECYCLE_PREFIX);
        match self {
            Target::Segment { name } => name == segment,
            Target::AllSegments => !lifecycle,
            Target::Lifecycle => lifecycle,
        }
    }
}

/// The prefix of lifecycle-stage segments.
pub const LIFECYCLE_PREFIX: &str = "lifecycle-";

/// How changes are sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Mode {
    /// One request per change, ordered per profile.
    Events,
    /// Every `every_secs`, one request with the adds and removes since the last one.
    List { every_secs: u32 },
}

/// A signing secret: `whsec_` and the base64 of 24 random bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret {
    pub secret: String,
    pub created_at: i64,
    /// After a rotation, the old secret signs too until then (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
}

/// Why a subscription stopped sending.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disabled {
    pub at: i64,
    pub reason: String,
}

/// A webhook subscription.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub id: u32,
    pub url: String,
    pub target: Target,
    /// Which changes: enters, exits, or both.
    pub on_enter: bool,
    pub on_exit: bool,
    pub mode: Mode,
    /// The consent purpose deliveries are for: a profile it does not permit is not sent.
    pub purpose: String,
    pub secrets: Vec<Secret>,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<Disabled>,
}

impl Subscription {
    /// Whether this change is one the subscription sends.
    pub fn wants(&self, segment: &str, entered: bool) -> bool {
        self.target.matches(segment) && if entered { self.on_enter } else { self.on_exit }
    }

    /// The secrets that sign at `now`, newest first.
    pub fn live_secrets(&self, now: i64) -> Vec<&str> {
        let mut live: Vec<&Secret> = self
            .secrets
            .iter()
            .filter(|s| s.expires_at.is_none_or(|at| at > now))
            .collect();
        live.sort_by_key(|s| std::cmp::Reverse(s.created_at));
        live.into_iter().map(|s| s.secret.as_str()).collect()
    }

    /// The subscription as the API shows it: secrets only by their first characters.
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_default();
        if let Some(secrets) = value.get_mut("secrets").and_then(|s| s.as_array_mut()) {
            for secret in secrets {
                if let Some(text) = secret.get("secret").and_then(|s| s.as_str()) {
                    let shown = format!("{}…", &text[..text.len().min(10)]);
                    secret["secret"] = serde_json::Value::String(shown);
                }
            }
        }
        value
    }
}

/// A delivery still owed, or dead.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    /// The profile the change is about; `None` for a list sync.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<u32>,
    /// A list sync covers the feed after `from` up to the key's sequence number.
    #[serde(default)]
    pub from: u64,
    /// Attempts made so far.
    pub attempts: u32,
    /// Not before (ms); 0: at once.
    pub next_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dead_at: Option<i64>,
}

/// One queued delivery with its sequence number (the key's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    pub subscription: u32,
    pub seq: u64,
    #[serde(flatten)]
    pub pending: Pending,
}

impl Delivery {
    /// The `webhook-id`: the same for every attempt of this delivery.
    pub fn id(&self) -> String {
        message_id(self.subscription, self.seq, self.pending.profile.is_none())
    }
}

/// The `webhook-id` of a change (or a list sync ending at `seq`) for a subscription.
pub fn message_id(subscription: u32, seq: u64, list: bool) -> String {
    if list {
        format!("msg_{subscription}_list_{seq}")
    } else {
        format!("msg_{subscription}_{seq}")
    }
}

/// What a subscription's delivery attempt came to, as the store records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settle {
    /// Delivered (2xx), or nothing left to send (the change was erased, consent withdrawn).
    Done { seq: u64 },
    /// To try again later.
    Retry { seq: u64, pending: Pending },
    /// Retries exhausted: kept as a dead letter.
    Dead { seq: u64, pending: Pending },
}

/// Key layouts of the `webhooks` keyspace.
pub mod keys {
    pub const NEXT_ID: &[u8] = b"n";
    pub const SUBSCRIPTION: u8 = b's';
    pub const CURSOR: u8 = b'c';
    pub const QUEUED: u8 = b'q';
    pub const DEAD: u8 = b'd';

    /// `tag · id`.
    pub fn of(tag: u8, id: u32) -> [u8; 5] {
        let mut key = [0u8; 5];
        key[0] = tag;
        key[1..].copy_from_slice(&id.to_be_bytes());
        key
    }

    /// `tag · id · seq`.
    pub fn delivery(tag: u8, id: u32, seq: u64) -> [u8; 13] {
        let mut key = [0u8; 13];
        key[..5].copy_from_slice(&of(tag, id));
        key[5..].copy_from_slice(&seq.to_be_bytes());
        key
    }

    /// The sequence number of a `delivery` key.
    pub fn seq_of(key: &[u8]) -> Option<u64> {
        Some(u64::from_be_bytes(key.get(5..13)?.try_into().ok()?))
    }

    /// The subscription id of a `tag · id ...` key.
    pub fn id_of(key: &[u8]) -> Option<u32> {
        Some(u32::from_be_bytes(key.get(1..5)?.try_into().ok()?))
    }
}

/// A new signing secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 24];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
    format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// The `webhook-signature` header: `v1,<base64>` for each secret, space-separated.
/// A secret that is not `whsec_` + base64 signs with its bytes as they are.
pub fn signature(secrets: &[&str], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut out = String::new();
    for secret in secrets {
        let key = secret
            .strip_prefix("whsec_")
            .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
            .unwrap_or_else(|| secret.as_bytes().to_vec());
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("v1,");
        out.push_str(
            &base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()),
        );
    }
    out
}

/// The retry schedule of the Standard Webhooks specification (as Svix runs it): the delay
/// before each attempt after the first. Eight attempts in all, over about 28 hours.
pub const DEFAULT_SCHEDULE_MS: [i64; 7] = [
    5_000,
    5 * 60_000,
    30 * 60_000,
    2 * 3_600_000,
    5 * 3_600_000,
    10 * 3_600_000,
    10 * 3_600_000,
];

/// Parses a retry schedule: delays separated by commas, each a number and a unit (`ms`, `s`,
/// `m`, `h`), e.g. `5s,5m,30m`.
pub fn parse_schedule(text: &str) -> Result<Vec<i64>, String> {
    let mut out = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let split = part
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(|| format!("{part:?} has no unit (ms, s, m or h)"))?;
        let (number, unit) = part.split_at(split);
        let n: i64 = number
            .parse()
            .map_err(|_| format!("{part:?} does not start with a number"))?;
        let scale = match unit {
            "ms" => 1,
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            other => {
                return Err(format!(
                    "{other:?} is not a unit (ms, s, m or h) in {part:?}"
                ));
            }
        };
        let ms = n
            .checked_mul(scale)
            .filter(|ms| *ms <= 7 * 86_400_000)
            .ok_or_else(|| format!("{part:?} is longer than 7 days"))?;
        out.push(ms);
    }
    if out.len() > 20 {
        return Err(format!("{} retries; at most 20", out.len()));
    }
    Ok(out)
}

/// Checks a subscription URL: absolute `http` or `https` with a host, no credentials.
pub fn check_url(text: &str) -> Result<url::Url, String> {
    let url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?} must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!(
            "{text:?} carries credentials; the signature authenticates cible instead"
        ));
    }
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example of the Standard Webhooks specification's reference implementations.
    #[test]
    fn signatures_match_the_specification_example() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let id = "msg_p5jXN8AQM9LWM0D4loKWxJek";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&[secret], id, 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let two = signature(&[secret, "whsec_AAAA"], id, 1614265330, body);
        assert!(two.starts_with("v1,g0hM9SsE"));
        assert_eq!(two.split(' ').count(), 2);
    }

    #[test]
    fn schedules_and_urls_are_checked_with_the_reason() {
        assert_eq!(parse_schedule("0s, 100ms,5m").unwrap(), [0, 100, 300_000]);
        assert!(parse_schedule("5").unwrap_err().contains("no unit"));
        assert!(parse_schedule("5d").unwrap_err().contains("not a unit"));
        assert!(parse_schedule("999999h").unwrap_err().contains("7 days"));
        assert!(check_url("ftp://x").unwrap_err().contains("http or https"));
        assert!(
            check_url("http://u:p@x/")
                .unwrap_err()
                .contains("credentials")
        );
        assert!(check_url("nope").is_err());
        assert!(check_url("https://hooks.example.com/cible").is_ok());
    }

    #[test]
    fn targets_and_rotation_pick_what_they_should() {
        let mut sub = Subscription {
            id: 1,
            url: "http://x/".into(),
            target: Target::AllSegments,
            on_enter: true,
            on_exit: false,
            mode: Mode::Events,
            purpose: "email".into(),
            secrets: vec![Secret {
                secret: "whsec_old".into(),
                created_at: 1,
                expires_at: Some(100),
            }],
            created_at: 1,
            disabled: None,
        };
        assert!(sub.wants("vip", true));
        assert!(!sub.wants("vip", false));
        assert!(!sub.wants("lifecycle-loyal", true));
        sub.target = Target::Lifecycle;
        assert!(sub.wants("lifecycle-loyal", true));
        sub.secrets.push(Secret {
            secret: "whsec_new".into(),
            created_at: 50,
            expires_at: None,
        });
        assert_eq!(sub.live_secrets(60), ["whsec_new", "whsec_old"]);
        assert_eq!(sub.live_secrets(100), ["whsec_new"]);
        assert!(sub.redacted().to_string().contains("whsec_new…"));
        assert!(!sub.redacted().to_string().contains("whsec_new\""));
    }
}
