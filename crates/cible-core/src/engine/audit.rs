//! The engine's side of the audit log (see [`crate::audit`]): the chain's head behind the
//! `Audit` lock, records added to the batch of the change they describe, reads and
//! verification.

use parking_lot::MutexGuard;

use super::Engine;
use crate::audit::{AuditRecord, Entry, HEAD_KEY, Head, SECRET_KEY, Tamper, Verified};
use crate::error::{Result, corrupt};
use crate::lock::Ordered;

/// The chain's head and the secret subjects are hashed with.
#[derive(Debug, Default)]
pub(crate) struct AuditState {
    pub(crate) head: Head,
    pub(crate) secret: Vec<u8>,
}

impl AuditState {
    /// Reads the head and the secret (made and stored when missing, unless `light`).
    pub(crate) fn load(store: &crate::store::Store, light: bool) -> Result<Self> {
        let head = match store.meta.get(HEAD_KEY)? {
            Some(bytes) => std::str::from_utf8(&bytes)
                .ok()
                .and_then(Head::parse)
                .ok_or_else(|| corrupt("meta", "audit_head is not SEQ:HASH"))?,
            None => Head::default(),
        };
        let secret = match store.meta.get(SECRET_KEY)? {
            Some(bytes) => bytes.to_vec(),
            None if light => Vec::new(),
            None => {
                let mut secret = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut secret);
                store.meta.insert(SECRET_KEY, &secret)?;
                secret
            }
        };
        Ok(Self { head, secret })
    }

    /// The hashes the log names these identifiers by.
    pub(crate) fn subjects<'a>(
        &self,
        identifiers: impl IntoIterator<Item = &'a String>,
    ) -> Vec<String> {
        identifiers
            .into_iter()
            .map(|i| crate::audit::subject(&self.secret, i))
            .collect()
    }

    /// Seals `entries` into `batch`, with the new head: the caller commits the batch while it
    /// holds the guard.
    pub(crate) fn record(
        &mut self,
        store: &crate::store::Store,
        batch: &mut fjall::OwnedWriteBatch,
        entries: Vec<Entry>,
        at: i64,
    ) {
        if entries.is_empty() {
            return;
        }
        for entry in entries {
            let record = self.head.seal(at, entry);
            batch.insert(
                &store.audit,
                record.seq.to_be_bytes(),
                crate::records::to_json(&record),
            );
        }
        batch.insert(&store.meta, HEAD_KEY, self.head.encode().as_bytes());
    }
}

impl Engine {
    /// The audit chain, for a batch that records what it changes.
    pub(crate) fn audit_chain(&self) -> Ordered<MutexGuard<'_, AuditState>> {
        self.audit.lock()
    }

    /// Records `entry` alone (admin actions that are not one batch of the engine), durable
    /// when this returns.
    pub fn audit(&self, entry: Entry) -> Result<()> {
        let batch = self.store.db.batch();
        self.commit_audited(batch, entry, crate::time::wall_clock_ms())
    }

    /// Commits `batch` (synced) with `entry`'s record in it, the chain's head locked meanwhile.
    pub(crate) fn commit_audited(
        &self,
        batch: fjall::OwnedWriteBatch,
        entry: Entry,
        at: i64,
    ) -> Result<()> {
        // A light open writes too (segment deletions, keys): their records with them.
        if self.poisoned.load(std::sync::atomic::Ordering::Acquire) {
            return Err(crate::error::EngineError::Poisoned(
                "an earlier commit failed".into(),
            ));
        }
        let mut batch = batch.durability(Some(fjall::PersistMode::SyncAll));
        let mut chain = self.audit.lock();
        let before = chain.head.clone();
        chain.record(&self.store, &mut batch, vec![entry], at);
        if let Err(error) = batch.commit() {
            chain.head = before;
            return Err(error.into());
        }
        Ok(())
    }

    /// An entry of the current actor (see [`crate::audit::actor`]) about these identifiers.
    pub fn audit_entry(
        &self,
        action: crate::audit::Action,
        identifiers: &[String],
        detail: serde_json::Value,
    ) -> Entry {
        Entry {
            action,
            actor: crate::audit::actor(),
            subjects: self.audit.lock().subjects(identifiers),
            detail,
        }
    }

    /// Records after `after`, oldest first, at most `limit`.
    pub fn audit_records(&self, after: u64, limit: usize) -> Result<Vec<AuditRecord>> {
        let mut records = Vec::new();
        for entry in self.store.audit.range((after + 1).to_be_bytes()..) {
            let (_, value) = entry.into_inner()?;
            records.push(serde_json::from_slice(&value).map_err(|e| corrupt("audit", e))?);
            if records.len() >= limit {
                break;
            }
        }
        Ok(records)
    }

    /// The records naming a person by any of these identifiers (for an access request).
    pub fn audit_records_of(&self, identifiers: &[String]) -> Result<Vec<AuditRecord>> {
        let subjects = self.audit.lock().subjects(identifiers);
        let mut found = Vec::new();
        for entry in self.store.audit.iter() {
            let (_, value) = entry.into_inner()?;
            let record: AuditRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("audit", e))?;
            if record.subjects.iter().any(|s| subjects.contains(s)) {
                found.push(record);
            }
        }
        Ok(found)
    }

    /// Checks the whole log (see [`crate::audit::verify`]), against `anchor` when given.
    pub fn verify_audit(
        &self,
        anchor: Option<&Head>,
    ) -> Result<std::result::Result<Verified, Tamper>> {
        let stored = match self.store.meta.get(HEAD_KEY)? {
            Some(bytes) => match std::str::from_utf8(&bytes).ok().and_then(Head::parse) {
                Some(head) => head,
                None => {
                    return Ok(Err(Tamper::Unreadable {
                        seq: 0,
                        detail: "the stored head is not SEQ:HASH".into(),
                    }));
                }
            },
            None => Head::default(),
        };
        let records = self.store.audit.iter().map(|entry| {
            let (key, value) = entry.into_inner().map_err(|e| Tamper::Unreadable {
                seq: 0,
                detail: e.to_string(),
            })?;
            let seq = key
                .as_ref()
                .try_into()
                .map(u64::from_be_bytes)
                .unwrap_or_default();
            let record: AuditRecord =
                serde_json::from_slice(&value).map_err(|e| Tamper::Unreadable {
                    seq,
                    detail: e.to_string(),
                })?;
            if record.seq != seq {
                return Err(Tamper::Missing {
                    expected: seq,
                    found: record.seq,
                });
            }
            Ok(record)
        });
        Ok(crate::audit::verify(records, &stored, anchor))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::Durability;
    use crate::audit::{Action, Tamper};
    use crate::engine::Engine;
    use crate::message::{ParseContext, parse_message};

    const NOW: i64 = 1_777_636_800_000;

    fn send(engine: &Engine, messages: &[Value]) {
        let items = messages
            .iter()
            .map(|m| parse_message(m.clone(), None, &ParseContext::at(NOW)).into())
            .collect();
        engine.ingest(items, "http", Durability::Sync, NOW).unwrap();
    }

    fn actions(engine: &Engine) -> Vec<Action> {
        engine
            .audit_records(0, 1000)
            .unwrap()
            .into_iter()
            .map(|r| r.action)
            .collect()
    }

    #[test]
    fn changes_are_recorded_with_their_batch_without_personal_data_and_tampering_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        send(
            &engine,
            &[
                json!({"type": "page", "anonymousId": "device-alice", "messageId": "m1"}),
                json!({"type": "identify", "userId": "user-alice", "messageId": "m2",
                    "traits": {"email": "alice@example.com", "consent_email": true}}),
            ],
        );
        send(
            &engine,
            &[
                json!({"type": "identify", "userId": "user-alice", "anonymousId": "device-alice", "messageId": "m3"}),
            ],
        );
        let alice = engine.find_profile("user-alice").unwrap();
        crate::audit::with_actor("api:cible_a_1234", || {
            let request = crate::engine::ConsentRequest {
                purposes: [("profiling".to_string(), false)].into(),
                ..Default::default()
            };
            engine.set_consents(alice, &request, NOW).unwrap();
        });
        let merge = engine.merges_into(alice).unwrap().pop().unwrap();
        engine.unmerge(merge.id, NOW).unwrap();
        engine
            .create_key(crate::keys::KeyKind::Write, "site", NOW)
            .unwrap();
        let rule = "consent.email";
        engine
            .create_segment("mailable", cible_lang::parse(rule).unwrap(), rule, NOW)
            .unwrap();
        assert_eq!(
            actions(&engine),
            [
                Action::ConsentChange,
                Action::Merge,
                Action::ConsentChange,
                Action::Unmerge,
                Action::KeyCreate,
                Action::SegmentCreate
            ]
        );
        let records = engine.audit_records(0, 100).unwrap();
        assert_eq!(records[2].actor, "api:cible_a_1234");
        assert_eq!(records[0].actor, "http");
        assert_eq!(records[4].actor, "cli");
        // No identifier in clear anywhere in the log; the person's records are found by them.
        for entry in engine.store.audit.iter() {
            let (_, value) = entry.into_inner().unwrap();
            let text = String::from_utf8_lossy(&value).into_owned();
            for identifier in ["alice@example.com", "user-alice", "device-alice"] {
                assert!(!text.contains(identifier), "{text}");
            }
        }
        let identifiers = engine.profile_record(alice).unwrap().identifiers;
        let hers = engine.audit_records_of(&identifiers).unwrap();
        assert_eq!(hers.len(), 4, "{hers:?}");

        let verified = engine.verify_audit(None).unwrap().unwrap();
        assert_eq!(verified.records, 6);
        let anchor = crate::audit::Head::parse(&verified.head).unwrap();

        // An edit, found; undone, the log verifies again.
        let key = 3u64.to_be_bytes();
        let original = engine.store.audit.get(key).unwrap().unwrap();
        let mut edited: crate::audit::AuditRecord = serde_json::from_slice(&original).unwrap();
        edited.actor = "someone else".into();
        engine
            .store
            .audit
            .insert(key, serde_json::to_vec(&edited).unwrap())
            .unwrap();
        assert_eq!(
            engine.verify_audit(None).unwrap(),
            Err(Tamper::Edited { seq: 3 })
        );
        engine.store.audit.insert(key, original).unwrap();
        assert!(engine.verify_audit(Some(&anchor)).unwrap().is_ok());
        // The last record removed: cut off.
        let last = engine.store.audit.get(6u64.to_be_bytes()).unwrap().unwrap();
        engine.store.audit.remove(6u64.to_be_bytes()).unwrap();
        assert_eq!(
            engine.verify_audit(None).unwrap(),
            Err(Tamper::Truncated { last: 5, head: 6 })
        );
        engine.store.audit.insert(6u64.to_be_bytes(), last).unwrap();

        // After a restart the chain goes on from its head.
        drop(engine);
        let engine = Engine::open(dir.path()).unwrap();
        engine.delete_segment("mailable", NOW).unwrap();
        let verified = engine.verify_audit(Some(&anchor)).unwrap().unwrap();
        assert_eq!(verified.records, 7);
    }

    /// Records from several threads at once (the writer's consent changes, keys, pseudonym key
    /// rotations beside exports' reads of it, segment edits): numbered without a gap or a
    /// fork, and nothing hangs.
    #[test]
    fn records_from_many_threads_stay_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path()).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        for thread in 0..4u32 {
            let (engine, done) = (Arc::clone(&engine), done.clone());
            std::thread::spawn(move || {
                for round in 0..15u32 {
                    match thread {
                        0 | 1 => {
                            send(
                                &engine,
                                &[
                                    json!({"type": "identify", "userId": format!("u{thread}-{round}"),
                                "messageId": format!("t{thread}-{round}"),
                                "traits": {"consent_email": round % 2 == 0}}),
                                ],
                            );
                            assert!(engine.pseudonymizer().unwrap().of("ann").starts_with('p'));
                        }
                        2 if round % 2 == 0 => {
                            engine
                                .create_key(crate::keys::KeyKind::Admin, "k", NOW)
                                .unwrap();
                        }
                        2 => {
                            engine.rotate_pseudonym_key(NOW).unwrap();
                        }
                        _ => {
                            let rule = "consent.email";
                            let name = format!("s{round}");
                            engine
                                .create_segment(&name, cible_lang::parse(rule).unwrap(), rule, NOW)
                                .unwrap();
                        }
                    }
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            finished
                .recv_timeout(Duration::from_secs(60))
                .expect("a thread hung or panicked");
        }
        let verified = engine.verify_audit(None).unwrap().unwrap();
        assert_eq!(verified.records, 60);
        // Seven rotations after the first key, each one version on.
        assert_eq!(engine.pseudonymizer().unwrap().version(), 8);
    }
}
