//! The audit log: an append-only, hash-chained record of what was done with people's data
//! (consent changes, merges and unmerges, removals, exports, keys, admin actions), holding no
//! personal data: a person appears only as keyed hashes of their identifiers ([`subject`]).
//!
//! Each record carries the hash of the one before it and its own hash over its content, so
//! that [`verify`] finds a record edited (its hash no longer matches), removed or reordered
//! (numbers not consecutive, or a link to the previous hash broken) and a log cut short (the
//! last record is not the head stored with every append). The head hash, printed by
//! `cible audit verify`, can be kept outside cible: given back later (`--head SEQ:HASH`), it
//! proves that nothing before it was rewritten, even by someone who rewrote the head too.
//!
//! Records are written in the same batch as the change they describe wherever the change is a
//! batch of the engine (the writer's consent changes and merges, unmerges, removals, keys); the
//! chain's head is behind the `Audit` lock, taken after the writer's and held until that batch
//! commits, so that records are numbered in commit order.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `meta` key: the last record's number and hash (`SEQ:HASH`).
pub const HEAD_KEY: &str = "audit_head";
/// `meta` key: the secret the subjects' hashes are keyed with (random, made at first use).
pub const SECRET_KEY: &str = "audit_secret";

thread_local! {
    static ACTOR: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Runs `work` with `actor` as who acts (the server sets `api:` and the key's prefix around an
/// admin call's work); audit records written meanwhile on this thread name it.
pub fn with_actor<R>(actor: &str, work: impl FnOnce() -> R) -> R {
    let before = ACTOR.with(|a| a.replace(Some(actor.to_string())));
    let result = work();
    ACTOR.with(|a| *a.borrow_mut() = before);
    result
}

/// Who acts on this thread: what [`with_actor`] set, else `cli` (a command on the store).
pub fn actor() -> String {
    ACTOR
        .with(|a| a.borrow().clone())
        .unwrap_or_else(|| "cli".into())
}

/// What was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    ConsentChange,
    Merge,
    Unmerge,
    ProfileRemoval,
    Erasure,
    Export,
    Import,
    KeyCreate,
    KeyRevoke,
    SegmentCreate,
    SegmentEdit,
    SegmentDelete,
    ModelTrain,
    ModelActivate,
    TraitsRefresh,
    PseudonymRotate,
    RetentionPurge,
    WebhookChange,
}

impl Action {
    /// Every action, in declaration order.
    pub const ALL: [Action; 18] = [
        Action::ConsentChange,
        Action::Merge,
        Action::Unmerge,
        Action::ProfileRemoval,
        Action::Erasure,
        Action::Export,
        Action::Import,
        Action::KeyCreate,
        Action::KeyRevoke,
        Action::SegmentCreate,
        Action::SegmentEdit,
        Action::SegmentDelete,
        Action::ModelTrain,
        Action::ModelActivate,
        Action::TraitsRefresh,
        Action::PseudonymRotate,
        Action::RetentionPurge,
        Action::WebhookChange,
    ];
}

/// What a caller records: the action, who did it (`cli`, or `api:` and the key's prefix), the
/// people concerned as [`subject`] hashes, and details without personal data.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub action: Action,
    pub actor: String,
    pub subjects: Vec<String>,
    pub detail: Value,
}

/// One record as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    /// When it was written, ms.
    pub at: i64,
    pub action: Action,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subjects: Vec<String>,
    #[serde(default, skip_serializing_if = "Value::is_null")]
    pub detail: Value,
    /// The previous record's hash (64 zeros for the first).
    pub prev: String,
    /// SHA-256 of this record's other fields (see [`digest`]).
    pub hash: String,
}

/// The hash a record must carry: SHA-256 over its fields but `hash`, in a fixed order.
pub fn digest(record: &AuditRecord) -> String {
    let content = serde_json::json!([
        record.seq,
        record.at,
        record.action,
        record.actor,
        record.subjects,
        record.detail,
        record.prev,
    ]);
    hex::encode(Sha256::digest(content.to_string().as_bytes()))
}

/// A person's identifier as the log names it: a hash keyed with the store's secret (so that the
/// log alone does not tell who, and a known identifier can still be looked up).
pub fn subject(secret: &[u8], identifier: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(secret);
    hasher.update([0]);
    hasher.update(identifier.as_bytes());
    format!("h:{}", &hex::encode(hasher.finalize())[..32])
}

/// The end of the chain: the next number and the last hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

impl Default for Head {
    fn default() -> Self {
        Self {
            seq: 0,
            hash: "0".repeat(64),
        }
    }
}

impl Head {
    pub fn encode(&self) -> String {
        format!("{}:{}", self.seq, self.hash)
    }

    pub fn parse(text: &str) -> Option<Self> {
        let (seq, hash) = text.split_once(':')?;
        let hash_ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
        Some(Self {
            seq: seq.parse().ok()?,
            hash: hash_ok.then(|| hash.to_ascii_lowercase())?,
        })
    }

    /// The record that follows, chained to this head; the head moves to it.
    pub fn seal(&mut self, at: i64, entry: Entry) -> AuditRecord {
        let mut record = AuditRecord {
            seq: self.seq + 1,
            at,
            action: entry.action,
            actor: entry.actor,
            subjects: entry.subjects,
            detail: entry.detail,
            prev: self.hash.clone(),
            hash: String::new(),
        };
        record.hash = digest(&record);
        self.seq = record.seq;
        self.hash = record.hash.clone();
        record
    }
}

/// What verification found wrong, at the first place it did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Tamper {
    #[error("record {seq} was edited: its content does not match its hash")]
    Edited { seq: u64 },
    #[error("record {expected} is missing or out of order (found {found} in its place)")]
    Missing { expected: u64, found: u64 },
    #[error("record {seq} does not follow the record before it (its previous hash differs)")]
    BrokenLink { seq: u64 },
    #[error("the log ends at record {last}, but its head says {head}: records were cut off")]
    Truncated { last: u64, head: u64 },
    #[error("record {seq} is not the one anchored: {detail}")]
    NotAnchored { seq: u64, detail: String },
    #[error("record {seq} cannot be read: {detail}")]
    Unreadable { seq: u64, detail: String },
}

/// What a verification checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Verified {
    pub records: u64,
    pub head: String,
}

/// Checks a log, records in key order: each hash, each link, consecutive numbers from 1, the
/// stored head, and `anchor` (a head kept outside) when given.
pub fn verify(
    records: impl IntoIterator<Item = Result<AuditRecord, Tamper>>,
    stored_head: &Head,
    anchor: Option<&Head>,
) -> Result<Verified, Tamper> {
    let mut head = Head::default();
    let mut anchored = anchor.is_none_or(|a| a.seq == 0);
    for record in records {
        let record = record?;
        if record.seq != head.seq + 1 {
            return Err(Tamper::Missing {
                expected: head.seq + 1,
                found: record.seq,
            });
        }
        if digest(&record) != record.hash {
            return Err(Tamper::Edited { seq: record.seq });
        }
        if record.prev != head.hash {
            return Err(Tamper::BrokenLink { seq: record.seq });
        }
        head = Head {
            seq: record.seq,
            hash: record.hash,
        };
        if let Some(anchor) = anchor
            && anchor.seq == head.seq
        {
            if anchor.hash != head.hash {
                return Err(Tamper::NotAnchored {
                    seq: head.seq,
                    detail: format!("its hash is {}, the anchor says {}", head.hash, anchor.hash),
                });
            }
            anchored = true;
        }
    }
    if head.seq < stored_head.seq {
        return Err(Tamper::Truncated {
            last: head.seq,
            head: stored_head.seq,
        });
    }
    if head != *stored_head {
        return Err(Tamper::NotAnchored {
            seq: head.seq,
            detail: "the stored head names another record".into(),
        });
    }
    if !anchored {
        let seq = anchor.map_or(0, |a| a.seq);
        return Err(Tamper::Truncated {
            last: head.seq,
            head: seq,
        });
    }
    Ok(Verified {
        records: head.seq,
        head: head.encode(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> (Vec<AuditRecord>, Head) {
        let mut head = Head::default();
        let records = (0..n)
            .map(|i| {
                head.seal(
                    i as i64,
                    Entry {
                        action: Action::ConsentChange,
                        actor: "cli".into(),
                        subjects: vec![subject(b"secret", &format!("u:{i}"))],
                        detail: serde_json::json!({"purpose": "email", "granted": i % 2 == 0}),
                    },
                )
            })
            .collect();
        (records, head)
    }

    fn check(records: &[AuditRecord], head: &Head, anchor: Option<&Head>) -> Result<u64, Tamper> {
        verify(records.iter().cloned().map(Ok), head, anchor).map(|v| v.records)
    }

    /// Every kind of tampering is found, at the record where it is.
    #[test]
    fn verification_finds_each_kind_of_tampering() {
        let (records, head) = chain(5);
        assert_eq!(check(&records, &head, None), Ok(5));
        let anchor = Head {
            seq: 3,
            hash: records[2].hash.clone(),
        };
        assert_eq!(check(&records, &head, Some(&anchor)), Ok(5));

        let mut edited = records.clone();
        edited[2].detail = serde_json::json!({"purpose": "email", "granted": false});
        assert_eq!(check(&edited, &head, None), Err(Tamper::Edited { seq: 3 }));

        let mut removed = records.clone();
        removed.remove(1);
        assert_eq!(
            check(&removed, &head, None),
            Err(Tamper::Missing {
                expected: 2,
                found: 3
            })
        );

        let mut reordered = records.clone();
        reordered.swap(1, 2);
        assert!(matches!(
            check(&reordered, &head, None),
            Err(Tamper::Missing { expected: 2, .. })
        ));

        // Renumbered and rehashed after a removal: the links give it away.
        let mut rewritten = records.clone();
        rewritten.remove(1);
        for (i, record) in rewritten.iter_mut().enumerate().skip(1) {
            record.seq = i as u64 + 1;
            record.hash = digest(record);
        }
        assert_eq!(
            check(&rewritten, &head, None),
            Err(Tamper::BrokenLink { seq: 2 })
        );

        let truncated = &records[..3];
        assert_eq!(
            check(truncated, &head, None),
            Err(Tamper::Truncated { last: 3, head: 5 })
        );

        // The whole log rewritten from record 2, head included: only an anchor kept outside
        // finds it.
        let mut forged = records[..1].to_vec();
        let mut forged_head = Head {
            seq: 1,
            hash: records[0].hash.clone(),
        };
        for i in 1..5 {
            forged.push(forged_head.seal(
                i,
                Entry {
                    action: Action::Export,
                    actor: "cli".into(),
                    subjects: Vec::new(),
                    detail: Value::Null,
                },
            ));
        }
        assert_eq!(check(&forged, &forged_head, None), Ok(5));
        assert!(matches!(
            check(&forged, &forged_head, Some(&anchor)),
            Err(Tamper::NotAnchored { seq: 3, .. })
        ));
        // An anchor beyond the end: cut off.
        let beyond = Head {
            seq: 9,
            hash: records[0].hash.clone(),
        };
        assert!(matches!(
            check(&records, &head, Some(&beyond)),
            Err(Tamper::Truncated { last: 5, head: 9 })
        ));
    }

    /// docs/openapi.json lists every action, and only those.
    #[test]
    fn the_api_document_names_every_action() {
        let document: Value =
            serde_json::from_str(include_str!("../../../docs/openapi.json")).unwrap();
        let listed =
            &document["components"]["schemas"]["AuditRecord"]["properties"]["action"]["enum"];
        let actions: Vec<Value> = Action::ALL
            .iter()
            .map(|a| serde_json::to_value(a).unwrap())
            .collect();
        assert_eq!(listed, &Value::Array(actions));
    }

    #[test]
    fn heads_parse_back_and_subjects_hide_the_identifier() {
        let (_, head) = chain(2);
        assert_eq!(Head::parse(&head.encode()), Some(head.clone()));
        assert_eq!(Head::parse("2:abc"), None);
        let hashed = subject(b"secret", "u:alice@example.com");
        assert!(!hashed.contains("alice"));
        assert_eq!(hashed, subject(b"secret", "u:alice@example.com"));
        assert_ne!(hashed, subject(b"other", "u:alice@example.com"));
    }
}
