//! Pseudonymization for exports: identifiers replaced by a keyed HMAC-SHA256, so that rows of
//! one person still join (across the events and profiles exports made with the same key) while
//! no file names them. The key lives in the store (`meta` entry [`KEY`]); rotating it
//! (`cible pseudonym rotate`) makes a new version and destroys the old one, so exports made
//! before can no longer be linked to exports made after, nor checked against a guess.
//!
//! A pseudonym is `p<version>_` and 32 hex characters (128 bits of the HMAC). What is replaced:
//! in an event, `userId`, `anonymousId`, `previousId`, `email`, `context.ip` and the identifying traits
//! [`IDENTIFYING_TRAITS`] (in `traits` and `context.traits`); the profile number (as
//! `profile`); in a profile, each identifier (`u:`, `a:`, `e:` kept as the prefix) and the
//! identifying traits.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::Sha256;

/// The `meta` entry holding the current key.
pub const KEY: &str = "pseudonym_key";

/// Traits that name a person (Segment's reserved identifying traits); their values are
/// replaced, whatever their type, by the pseudonym of their JSON text.
pub const IDENTIFYING_TRAITS: &[&str] = &[
    "email",
    "phone",
    "name",
    "firstName",
    "lastName",
    "first_name",
    "last_name",
    "username",
    "address",
];

/// The stored key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PseudonymKey {
    pub version: u32,
    /// 32 random bytes, hex.
    secret: String,
    pub created_at: i64,
}

impl PseudonymKey {
    /// A new random key of `version`.
    pub fn generate(version: u32, created_at: i64) -> Self {
        let mut secret = [0u8; 32];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
        Self {
            version,
            secret: hex::encode(secret),
            created_at,
        }
    }

    pub fn pseudonymizer(&self) -> Pseudonymizer {
        let secret = hex::decode(&self.secret).unwrap_or_else(|_| self.secret.as_bytes().to_vec());
        Pseudonymizer {
            version: self.version,
            mac: Hmac::<Sha256>::new_from_slice(&secret).expect("HMAC takes any key length"),
        }
    }
}

/// Replaces identifiers by their pseudonyms under one key version.
#[derive(Clone)]
pub struct Pseudonymizer {
    version: u32,
    mac: Hmac<Sha256>,
}

impl Pseudonymizer {
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The pseudonym of one value.
    pub fn of(&self, value: &str) -> String {
        let mut mac = self.mac.clone();
        mac.update(value.as_bytes());
        let digest = mac.finalize().into_bytes();
        format!("p{}_{}", self.version, hex::encode(&digest[..16]))
    }

    fn replace(&self, slot: &mut Value) {
        let text = match &mut *slot {
            Value::Null => return,
            Value::String(text) => std::mem::take(text),
            other => other.to_string(),
        };
        *slot = Value::String(self.of(&text));
    }

    fn traits(&self, traits: Option<&mut Value>) {
        if let Some(Value::Object(traits)) = traits {
            for name in IDENTIFYING_TRAITS {
                if let Some(value) = traits.get_mut(*name) {
                    self.replace(value);
                }
            }
        }
    }

    fn profile_number(&self, object: &mut serde_json::Map<String, Value>) {
        if let Some(profile) = object.get_mut("profile") {
            *profile = Value::String(self.of(&format!("profile:{profile}")));
        }
    }

    /// An exported event (as [`crate::view::event_json`] writes it), in place.
    pub fn event(&self, event: &mut Value) {
        let Some(object) = event.as_object_mut() else {
            return;
        };
        for field in ["userId", "anonymousId", "previousId", "email"] {
            if let Some(value) = object.get_mut(field) {
                self.replace(value);
            }
        }
        self.profile_number(object);
        self.traits(object.get_mut("traits"));
        if let Some(Value::Object(context)) = object.get_mut("context") {
            if let Some(ip) = context.get_mut("ip") {
                self.replace(ip);
            }
            self.traits(context.get_mut("traits"));
        }
    }

    /// An exported profile (`identifiers`, `traits`, `profile`), in place.
    pub fn profile(&self, profile: &mut Value) {
        let Some(object) = profile.as_object_mut() else {
            return;
        };
        self.profile_number(object);
        if let Some(Value::Array(identifiers)) = object.get_mut("identifiers") {
            for identifier in identifiers {
                if let Value::String(text) = identifier {
                    // `u:ann` → `u:` and the pseudonym of `ann`, as events name her.
                    *text = match text.split_once(':') {
                        Some((kind, value)) => format!("{kind}:{}", self.of(value)),
                        None => self.of(text),
                    };
                }
            }
        }
        self.traits(object.get_mut("traits"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn identifiers_become_keyed_pseudonyms_that_still_join() {
        let key = PseudonymKey::generate(1, 0);
        let p = key.pseudonymizer();
        let mut event = json!({"userId": "ann", "anonymousId": "d-1", "profile": 7,
            "traits": {"email": "ann@example.com", "plan": "pro", "address": {"city": "Lyon"}},
            "context": {"ip": "203.0.113.9", "traits": {"phone": "+33 6"}}, "event": "Viewed"});
        p.event(&mut event);
        let mut profile = json!({"profile": 7, "identifiers": ["u:ann", "e:ann@example.com"],
            "traits": {"email": "ann@example.com", "plan": "pro"}});
        p.profile(&mut profile);
        let text = format!("{event}{profile}");
        for secret in ["ann", "d-1", "203.0.113", "Lyon", "+33"] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(
            text.contains("pro") && text.contains("Viewed"),
            "the rest is kept"
        );
        // One person's rows join across both exports.
        assert_eq!(event["profile"], profile["profile"]);
        assert_eq!(
            format!("u:{}", event["userId"].as_str().unwrap()),
            profile["identifiers"][0]
        );
        assert_eq!(event["traits"]["email"], profile["traits"]["email"]);
        assert!(event["userId"].as_str().unwrap().starts_with("p1_"));
        assert_eq!(event["userId"].as_str().unwrap().len(), 3 + 32);
        // Another key (a rotation) gives other pseudonyms.
        let other = PseudonymKey::generate(2, 0).pseudonymizer();
        assert_ne!(other.of("ann"), p.of("ann"));
        assert_eq!(p.of("ann"), key.pseudonymizer().of("ann"), "deterministic");
    }
}
