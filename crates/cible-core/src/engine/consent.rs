//! The engine's side of consent (see [`crate::consent`]): the configured purposes, the index of
//! current states mirrored after each commit, the check every processing asks for, and consent
//! changes made through the API (written as messages, through the one writer).

use std::sync::Arc;

use super::Engine;
use crate::consent::{ConsentCheck, ConsentIndex, Consents, Purposes};
use crate::error::{EngineError, Result};
use crate::ingest::Durability;
use crate::message::{ParseContext, parse_message};

/// The event a consent change made through the API is recorded as (Segment's consent tools send
/// this name too).
pub const CONSENT_EVENT: &str = "Segment Consent Preference Updated";

/// A change asked through the API: purposes granted (true) or withdrawn (false), the lawful
/// basis, and the proof the caller gives.
#[derive(Debug, Clone, Default)]
pub struct ConsentRequest {
    pub purposes: std::collections::BTreeMap<String, bool>,
    pub basis: Option<String>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    /// The id of the request that asked (the proof; also the message's id).
    pub request_id: Option<String>,
}

impl Engine {
    /// The purposes this store knows (built-in and `consent.toml`'s).
    pub fn purposes(&self) -> &Purposes {
        &self.purposes
    }

    /// What a processing for `purpose` may touch, decided now: every way profiles leave the
    /// engine asks it first, naming its purpose.
    pub fn consent_check(&self, purpose: &str) -> Result<ConsentCheck> {
        let rule = self.purposes.check(purpose).map_err(EngineError::Invalid)?;
        Ok(ConsentCheck::new(purpose, rule, &self.consent_snapshot()))
    }

    /// The current consents of every profile, as of the last commit. A light open reads
    /// them on first use (a command that needs none does not pay for them).
    pub fn consent_snapshot(&self) -> Arc<ConsentIndex> {
        if self.light
            && !self
                .consents_loaded
                .load(std::sync::atomic::Ordering::Acquire)
        {
            match self.store.read_consents() {
                Ok(rows) => {
                    let mut index = ConsentIndex::default();
                    for (profile, purpose, granted, _) in &rows {
                        index.set(*profile, purpose, Some(*granted));
                    }
                    *self.consents.write() = Arc::new(index);
                    self.consents_loaded
                        .store(true, std::sync::atomic::Ordering::Release);
                }
                // A light open writes nothing: an unreadable row refuses the check instead.
                Err(error) => tracing::error!(error = %error, "consents unreadable"),
            }
        }
        Arc::clone(&self.consents.read())
    }

    /// Whether `profile` granted `purpose` and has not withdrawn it since (`consent.email`).
    pub fn has_consent(&self, purpose: &str, profile: u32) -> bool {
        self.consents.read().granted(purpose, profile)
    }

    /// Reads the current consents of every profile into the index (at a full open).
    pub(crate) fn load_consents(&self) -> Result<()> {
        if self.light {
            return Ok(());
        }
        let rows = self.store.read_consents()?;
        let mut index = ConsentIndex::default();
        for (profile, purpose, granted, _) in &rows {
            index.set(*profile, purpose, Some(*granted));
        }
        *self.consents.write() = Arc::new(index);
        self.consents_loaded
            .store(true, std::sync::atomic::Ordering::Release);
        {
            let mut state = self.state.lock();
            for (profile, purpose, granted, at) in rows {
                if let (Some(meta), Some(bit)) = (
                    state.profiles.get_mut(profile as usize),
                    self.purposes.index(&purpose),
                ) {
                    meta.consent.set(bit, granted);
                    meta.consent.at = meta.consent.at.max(at);
                }
            }
        }
        Ok(())
    }

    /// After a commit: the index shows what it wrote to `consents`.
    pub(crate) fn mirror_consents(&self, written: &[crate::consent::Written]) {
        if written.is_empty() {
            return;
        }
        let mut guard = self.consents.write();
        let index = Arc::make_mut(&mut guard);
        for (profile, states) in written {
            index.clear(*profile);
            for (purpose, granted, _) in states {
                index.set(*profile, purpose, Some(*granted));
            }
        }
    }

    /// A profile's consent history, oldest first.
    pub fn consents_of(&self, profile: u32) -> Result<Consents> {
        Ok(crate::ingest::read_profile(&self.store, profile)?
            .ok_or_else(|| EngineError::NotFound(format!("profile {profile}")))?
            .consents)
    }

    /// Records a consent change for a live profile, as a message through the writer (so it is
    /// durable when this returns, follows merges and goes with erasure). Returns the history.
    pub fn set_consents(
        &self,
        profile: u32,
        request: &ConsentRequest,
        now: i64,
    ) -> Result<Consents> {
        if request.purposes.is_empty() {
            return Err(EngineError::Invalid(
                "purposes: name at least one purpose, e.g. {\"email\": true}".into(),
            ));
        }
        for purpose in request.purposes.keys() {
            self.purposes
                .check(purpose)
                .map_err(|reason| EngineError::Invalid(format!("purposes.{purpose}: {reason}")))?;
        }
        if let Some(basis) = &request.basis
            && crate::consent::Basis::parse(basis).is_none()
        {
            return Err(EngineError::Invalid(format!(
                "basis: {basis:?} is not a lawful basis (one of {})",
                crate::consent::Basis::ALL.join(", ")
            )));
        }
        let record = crate::ingest::read_profile(&self.store, profile)?
            .filter(|r| r.merged_into.is_none() && self.is_alive(profile))
            .ok_or_else(|| EngineError::NotFound(format!("profile {profile}")))?;
        // The profile's own identifier routes the message to it: its user id, else an
        // anonymous id, else its e-mail address (as an identify trait).
        let ident = |prefix: &str| {
            record
                .identifiers
                .iter()
                .find_map(|i| i.strip_prefix(prefix).map(str::to_string))
        };
        let mut message = serde_json::json!({
            "type": "track",
            "event": CONSENT_EVENT,
            "timestamp": now,
            "messageId": request.request_id.clone().unwrap_or_else(|| {
                let mut bytes = [0u8; 8];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut bytes);
                format!("consent-{}", hex::encode(bytes))
            }),
            "context": {"consent": {
                "purposes": request.purposes,
                "basis": request.basis.as_deref().unwrap_or("consent"),
            }},
        });
        if let Some(ip) = &request.ip {
            message["context"]["ip"] = ip.clone().into();
        }
        if let Some(agent) = &request.user_agent {
            message["context"]["userAgent"] = agent.clone().into();
        }
        match (ident("u:"), ident("a:"), ident("e:")) {
            (Some(user), _, _) => message["userId"] = user.into(),
            (None, Some(anonymous), _) => message["anonymousId"] = anonymous.into(),
            (None, None, Some(email)) => {
                message["anonymousId"] = format!("cible-consent-{profile}").into();
                message["context"]["traits"] = serde_json::json!({ "email": email });
            }
            _ => {
                return Err(EngineError::Invalid(format!(
                    "profile {profile} has no identifier to record a consent under"
                )));
            }
        }
        let parsed = parse_message(message, None, &ParseContext::at(now));
        let outcome = self.ingest(vec![parsed.into()], "api", Durability::Sync, now)?;
        if let Some(rejected) = outcome.quarantined.first() {
            return Err(EngineError::Invalid(format!(
                "the consent change was refused: {}",
                rejected.detail
            )));
        }
        if outcome.duplicates > 0 {
            return Err(EngineError::Conflict(format!(
                "request id {:?} was already recorded",
                request.request_id.as_deref().unwrap_or_default()
            )));
        }
        self.consents_of(self.resolve_survivor(profile))
    }

    fn resolve_survivor(&self, profile: u32) -> u32 {
        self.state.lock().find(profile)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::{Value, json};

    use super::*;
    use crate::consent::Source;
    use crate::message::ParseContext;

    const NOW: i64 = 1_777_636_800_000; // 2026-05-01T12:00:00Z

    fn send(engine: &Engine, channel: &str, messages: &[Value]) {
        let items = messages
            .iter()
            .map(|m| parse_message(m.clone(), None, &ParseContext::at(NOW)).into())
            .collect();
        let outcome = engine
            .ingest(items, channel, Durability::Sync, NOW)
            .unwrap();
        assert!(outcome.quarantined.is_empty(), "{:?}", outcome.quarantined);
    }

    fn at(minutes_ago: i64) -> String {
        crate::time::format_ms(NOW - minutes_ago * 60_000)
    }

    /// (purpose, granted, source) of a profile's history, oldest first.
    fn history(engine: &Engine, id: &str) -> Vec<(String, bool, Source)> {
        let profile = engine.find_profile(id).unwrap();
        engine
            .consents_of(profile)
            .unwrap()
            .0
            .into_iter()
            .map(|c| (c.purpose, c.granted, c.source))
            .collect()
    }

    /// The index agrees with every profile's own history.
    fn assert_index_mirrors_records(engine: &Engine) {
        let index = engine.consent_snapshot();
        for profile in engine.live_profiles() {
            let consents = engine.consents_of(profile).unwrap();
            for purpose in engine.purposes().names() {
                let current = consents.current(purpose).map(|c| c.granted);
                assert_eq!(
                    (
                        index.granted(purpose, profile),
                        index.withdrawn(purpose, profile)
                    ),
                    (current == Some(true), current == Some(false)),
                    "profile {profile}, {purpose}"
                );
            }
        }
    }

    #[test]
    fn consent_from_every_source_keeps_its_history_follows_merges_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let rule = "consent.email";
        engine
            .create_segment("mailable", cible_lang::parse(rule).unwrap(), rule, NOW)
            .unwrap();
        let mailable = |id: &str| {
            engine.drain_segments().unwrap();
            let profile = engine.find_profile(id).unwrap();
            engine.members("mailable").unwrap().contains(profile)
        };
        // A browser's consent tool, on an anonymous visit, twice (the second repeats).
        let preferences =
            json!({"consent": {"categoryPreferences": {"Analytics": true, "Advertising": false}}});
        send(
            &engine,
            "http",
            &[
                json!({"type": "page", "anonymousId": "d1", "messageId": "p1", "timestamp": at(60), "context": preferences}),
                json!({"type": "page", "anonymousId": "d1", "messageId": "p2", "timestamp": at(59), "context": preferences}),
            ],
        );
        assert_eq!(
            history(&engine, "d1"),
            [
                ("advertising".into(), false, Source::ConsentTool),
                ("analytics".into(), true, Source::ConsentTool)
            ]
        );
        // An import's identify trait, then the user's e-mail opt-in, and the unsubscribe link.
        send(
            &engine,
            "import",
            &[
                json!({"type": "identify", "userId": "u1", "messageId": "i1", "timestamp": at(50), "traits": {"consent_profiling": false}}),
            ],
        );
        send(
            &engine,
            "http",
            &[
                json!({"type": "identify", "userId": "u1", "messageId": "i2", "timestamp": at(40), "traits": {"consent_email": "true"}}),
            ],
        );
        let u1 = engine.find_profile("u1").unwrap();
        assert!(engine.has_consent("email", u1));
        assert!(mailable("u1"));
        send(
            &engine,
            "http",
            &[
                json!({"type": "track", "userId": "u1", "event": "Unsubscribed", "messageId": "t1", "timestamp": at(30)}),
            ],
        );
        assert!(!engine.has_consent("email", u1));
        assert!(!mailable("u1"));
        assert!(!engine.consent_check("email").unwrap().permits(u1));
        assert!(!engine.consent_check("profiling").unwrap().permits(u1));
        // Through the API, with its basis and proof.
        let request = ConsentRequest {
            purposes: [("email".to_string(), true)].into(),
            basis: Some("contract".into()),
            ip: Some("192.0.2.7".into()),
            user_agent: Some("Mozilla/5.0".into()),
            request_id: Some("req-1".into()),
        };
        let consents = engine.set_consents(u1, &request, NOW).unwrap();
        let latest = consents.current("email").unwrap();
        assert_eq!(
            (
                latest.granted,
                latest.basis,
                latest.source,
                latest.message_id.as_str()
            ),
            (true, crate::consent::Basis::Contract, Source::Api, "req-1")
        );
        assert_eq!(latest.ip.as_deref(), Some("192.0.2.7"));
        assert!(mailable("u1"));
        // Granted by the consent tool on a page view (an event the rule does not read).
        send(
            &engine,
            "http",
            &[
                json!({"type": "page", "anonymousId": "d2", "messageId": "p9", "timestamp": at(20),
                "context": {"consent": {"categoryPreferences": {"Email": true}}}}),
            ],
        );
        assert!(mailable("d2"));
        // The same request again is refused, not recorded twice.
        assert!(matches!(
            engine.set_consents(u1, &request, NOW),
            Err(EngineError::Conflict(_))
        ));
        assert_index_mirrors_records(&engine);

        // The anonymous visitor logs in: one profile, both histories.
        send(
            &engine,
            "http",
            &[
                json!({"type": "identify", "userId": "u1", "anonymousId": "d1", "messageId": "i3", "timestamp": at(10)}),
            ],
        );
        let merged = history(&engine, "u1");
        assert_eq!(merged.len(), 6, "{merged:?}");
        let survivor = engine.find_profile("u1").unwrap();
        assert!(engine.has_consent("analytics", survivor));
        assert!(engine.consent_snapshot().withdrawn("advertising", survivor));
        assert_index_mirrors_records(&engine);

        // Unmerged, each change goes back with the message that carried it.
        let merge = engine.merges_into(survivor).unwrap().pop().unwrap();
        let undone = engine.unmerge(merge.id, NOW).unwrap();
        assert_eq!(history(&engine, "d1").len(), 2);
        assert_eq!(history(&engine, "u1").len(), 4);
        assert!(!engine.has_consent("analytics", survivor));
        assert!(engine.has_consent("analytics", undone.restored_profile));
        assert_index_mirrors_records(&engine);

        // A restart reads the same index back, and the writer's compact state with it: a
        // repeated preference adds nothing.
        drop(engine);
        let engine = Engine::open(dir.path()).unwrap();
        assert_index_mirrors_records(&engine);
        send(
            &engine,
            "http",
            &[
                json!({"type": "page", "anonymousId": "d1", "messageId": "p3", "timestamp": at(5), "context": preferences}),
            ],
        );
        assert_eq!(history(&engine, "d1").len(), 2);

        // Removal leaves no consent row.
        let d1 = engine.find_profile("d1").unwrap();
        engine.remove_profile(d1).unwrap();
        assert!(
            engine
                .store
                .consents
                .prefix(crate::store::profile_key(d1))
                .next()
                .is_none()
        );
        assert!(!engine.consent_snapshot().granted("analytics", d1));
    }

    /// An import's consents wait with its profile records and are written by its flush,
    /// merges included, as ordinary batches write them.
    #[test]
    fn an_import_writes_consents_with_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let bulk = |messages: &[Value]| {
            let items = messages
                .iter()
                .map(|m| parse_message(m.clone(), None, &ParseContext::at(NOW)).into())
                .collect();
            engine
                .ingest(items, "import", Durability::Bulk, NOW)
                .unwrap();
        };
        bulk(&[
            json!({"type": "page", "anonymousId": "d1", "messageId": "p1", "timestamp": at(60),
                "context": {"consent": {"categoryPreferences": {"Email": true}}}}),
            json!({"type": "identify", "userId": "u1", "messageId": "i1", "timestamp": at(50),
                "traits": {"consent_profiling": false}}),
        ]);
        bulk(&[
            json!({"type": "identify", "userId": "u1", "anonymousId": "d1", "messageId": "i2", "timestamp": at(40)}),
        ]);
        engine.finish_bulk().unwrap();
        let u1 = engine.find_profile("u1").unwrap();
        assert_eq!(
            history(&engine, "u1"),
            [
                ("email".into(), true, Source::Import),
                ("profiling".into(), false, Source::Import)
            ]
        );
        assert!(engine.has_consent("email", u1));
        assert_index_mirrors_records(&engine);
        drop(engine);
        let engine = Engine::open(dir.path()).unwrap();
        assert_index_mirrors_records(&engine);
        let rows = engine.store.read_consents().unwrap();
        assert_eq!(rows.len(), 2, "{rows:?}");
        assert!(rows.iter().all(|(profile, ..)| *profile == u1));
    }

    /// The examples of docs/segment-language.md, "Consent", select what the test expects of
    /// them (an example without an expectation here fails, as does a wrong one).
    #[test]
    fn the_documented_consent_examples_select_what_they_say() {
        let doc = include_str!("../../../../docs/segment-language.md");
        let section = &doc[doc.find("### Consent").expect("a Consent section")..];
        let section = &section[..section[3..].find("\n## ").map_or(section.len(), |i| i + 3)];
        let examples: Vec<&str> = section
            .split("```cible\n")
            .skip(1)
            .map(|block| block.split("```").next().unwrap().trim())
            .collect();
        assert_eq!(examples.len(), 3, "{examples:?}");
        let expected: [(&str, &[&str]); 3] = [
            (
                r#"consent.email and did("Product Added", 7d) and not did("Order Completed", 7d)"#,
                &["a"],
            ),
            (
                r#"not consent.email and did("Order Completed", 30d)"#,
                &["b", "c"],
            ),
            (
                r#"consent.email = true and (trait.country = "FR" or consent.advertising)"#,
                &["a", "d"],
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let track = |user: &str, event: &str, days: i64, id: &str| {
            json!({"type": "track", "userId": user, "event": event, "messageId": id,
                "timestamp": at(days * 24 * 60)})
        };
        send(
            &engine,
            "http",
            &[
                json!({"type": "identify", "userId": "a", "messageId": "a0", "timestamp": at(3000),
                    "traits": {"country": "FR", "consent_email": true}}),
                track("a", "Product Added", 1, "a1"),
                json!({"type": "identify", "userId": "b", "messageId": "b0", "timestamp": at(9000),
                    "traits": {"country": "FR", "consent_email": true}}),
                track("b", "Order Completed", 3, "b1"),
                track("b", "Unsubscribed", 2, "b2"),
                track("c", "Order Completed", 10, "c1"),
                track("c", "Product Added", 1, "c2"),
                json!({"type": "track", "userId": "d", "event": "Product Added", "messageId": "d1",
                    "timestamp": at(2 * 24 * 60), "context": {"consent": {"categoryPreferences":
                        {"Email": true, "Advertising": true}}}}),
                track("d", "Order Completed", 1, "d2"),
            ],
        );
        for (i, example) in examples.iter().enumerate() {
            let (_, members) = expected
                .iter()
                .find(|(text, _)| text == example)
                .unwrap_or_else(|| panic!("no expectation for the documented example {example}"));
            let name = format!("doc-{i}");
            engine
                .create_segment(&name, cible_lang::parse(example).unwrap(), example, NOW)
                .unwrap();
            engine.drain_segments().unwrap();
            let got = engine.members(&name).unwrap();
            let want: roaring::RoaringBitmap = members
                .iter()
                .map(|user| engine.find_profile(user).unwrap())
                .collect();
            assert_eq!(got, want, "{example}");
        }
    }

    #[test]
    fn bad_consent_requests_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        send(
            &engine,
            "http",
            &[json!({"type": "identify", "userId": "u1", "messageId": "i1", "timestamp": at(1)})],
        );
        let u1 = engine.find_profile("u1").unwrap();
        let ask = |purposes: &[(&str, bool)], basis: Option<&str>| {
            let request = ConsentRequest {
                purposes: purposes.iter().map(|(p, g)| (p.to_string(), *g)).collect(),
                basis: basis.map(str::to_string),
                ..Default::default()
            };
            match engine.set_consents(u1, &request, NOW) {
                Err(EngineError::Invalid(message)) => message,
                other => panic!("{other:?}"),
            }
        };
        assert!(ask(&[], None).starts_with("purposes:"));
        assert!(
            ask(&[("mail", true)], None).starts_with("purposes.mail: \"mail\" is not a purpose")
        );
        assert!(ask(&[("email", true)], Some("because")).starts_with("basis: \"because\""));
        assert!(engine.consents_of(u1).unwrap().is_empty());
    }

    #[test]
    fn a_profiling_objection_removes_scores_memberships_and_training_rows() {
        let (_dir, engine) = crate::test_support::generated_store(300, 60, 4, NOW);
        crate::test_support::save_two_clusters(&engine, 300, NOW);
        let rule = "cluster.id >= 0";
        engine
            .create_segment("clustered", cible_lang::parse(rule).unwrap(), rule, NOW)
            .unwrap();
        engine.drain_segments().unwrap();
        let everyone = engine.live_profiles();
        let objector = everyone[7];
        assert!(engine.members("clustered").unwrap().contains(objector));
        assert!(
            engine
                .computed_traits(objector, NOW)
                .unwrap()
                .models
                .cluster
                .is_some()
        );

        let request = ConsentRequest {
            purposes: [("profiling".to_string(), false)].into(),
            ..Default::default()
        };
        engine.set_consents(objector, &request, NOW).unwrap();
        engine.drain_segments().unwrap();
        let traits = engine.computed_traits(objector, NOW).unwrap();
        assert!(traits.models.cluster.is_none() && traits.models.predicted.is_empty());
        let members = engine.members("clustered").unwrap();
        assert!(!members.contains(objector));
        assert_eq!(members.len() as usize, everyone.len() - 1);
        let features = engine.features(NOW).unwrap();
        assert!(!features.profiles.contains(&objector));
        assert_eq!(features.profiles.len(), everyone.len() - 1);
        // Granted again, scored again.
        let request = ConsentRequest {
            purposes: [("profiling".to_string(), true)].into(),
            ..Default::default()
        };
        engine.set_consents(objector, &request, NOW + 1).unwrap();
        engine.drain_segments().unwrap();
        assert!(engine.members("clustered").unwrap().contains(objector));
    }

    /// Consent changes through the API from several threads while messages carrying consent
    /// arrive: nothing hangs, and the index ends as every profile's history says.
    #[test]
    fn consent_changes_from_many_threads_beside_ingestion() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Arc::new(Engine::open(dir.path()).unwrap());
        let users: Vec<String> = (0..20).map(|i| format!("u{i}")).collect();
        send(
            &engine,
            "http",
            &users
                .iter()
                .map(|u| json!({"type": "identify", "userId": u, "messageId": format!("i-{u}"), "timestamp": at(100)}))
                .collect::<Vec<_>>(),
        );
        let (done, finished) = std::sync::mpsc::channel();
        for thread in 0..4u32 {
            let (engine, users, done) = (Arc::clone(&engine), users.clone(), done.clone());
            std::thread::spawn(move || {
                for round in 0..30u32 {
                    let user = &users[((thread * 7 + round) % 20) as usize];
                    let granted = (round + thread) % 2 == 0;
                    if thread < 2 {
                        let context = json!({"consent": {"categoryPreferences": {"Email": granted, "Profiling": !granted}}});
                        send(
                            &engine,
                            "http",
                            &[
                                json!({"type": "track", "userId": user, "event": "Page Viewed",
                                "messageId": format!("t{thread}-{round}"), "timestamp": at(50 - i64::from(round)),
                                "context": context}),
                            ],
                        );
                    } else {
                        let profile = engine.find_profile(user).unwrap();
                        let request = ConsentRequest {
                            purposes: [
                                ("email".to_string(), granted),
                                ("analytics".to_string(), !granted),
                            ]
                            .into(),
                            ..Default::default()
                        };
                        engine
                            .set_consents(profile, &request, NOW + i64::from(round))
                            .unwrap();
                        let _ = engine.consent_check("email").unwrap();
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
        engine.drain_segments().unwrap();
        assert_index_mirrors_records(&engine);
    }
}
