//! Engine tests: dedup, identity, traits, quarantine and restart, through the public API.

use serde_json::{Value, json};

use super::*;
use crate::hot::HotEvent;
use crate::message::ParseContext;
use crate::message::parse_message;
use crate::quality::flags;
use crate::{BatchOutcome, Durability};

const NOW: i64 = 1_777_636_800_000; // 2026-05-01T12:00:00Z

fn ingest(engine: &Engine, messages: &[Value]) -> BatchOutcome {
    let items = messages
        .iter()
        .map(|m| parse_message(m.clone(), None, &ParseContext::at(NOW)).into())
        .collect();
    engine.ingest(items, "test", Durability::Sync, NOW).unwrap()
}

fn track(
    id: &str,
    user: Option<&str>,
    anonymous: Option<&str>,
    event: &str,
    minutes_ago: i64,
) -> Value {
    let mut message = json!({
        "type": "track", "messageId": id, "event": event,
        "timestamp": crate::time::format_ms(NOW - minutes_ago * 60_000),
    });
    if let Some(user) = user {
        message["userId"] = json!(user);
    }
    if let Some(anonymous) = anonymous {
        message["anonymousId"] = json!(anonymous);
    }
    message
}

fn identify(
    id: &str,
    user: &str,
    anonymous: Option<&str>,
    traits: Value,
    minutes_ago: i64,
) -> Value {
    let mut message = json!({
        "type": "identify", "messageId": id, "userId": user, "traits": traits,
        "timestamp": crate::time::format_ms(NOW - minutes_ago * 60_000),
    });
    if let Some(anonymous) = anonymous {
        message["anonymousId"] = json!(anonymous);
    }
    message
}

/// The liveness readers see is the writer's.
fn assert_liveness_mirrors_the_writer(engine: &Engine) {
    let decided =
        crate::liveness::Liveness::from_flags(engine.state.lock().profiles.iter().map(|m| m.alive));
    assert_eq!(*engine.liveness.read(), decided);
}

fn events_of(engine: &Engine, id: &str) -> Vec<String> {
    let profile = engine.find_profile(id).expect("profile exists");
    let mut ids: Vec<String> = engine
        .timeline(profile, None, 0, usize::MAX)
        .unwrap()
        .into_iter()
        .map(|e| e.message.message_id)
        .collect();
    ids.sort();
    ids
}

#[test]
fn duplicates_are_dropped_within_a_batch_and_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        let a = track("m1", Some("u1"), None, "Email Opened", 5);
        let outcome = ingest(
            &engine,
            &[
                a.clone(),
                a.clone(),
                track("m2", Some("u1"), None, "Email Opened", 4),
            ],
        );
        assert_eq!((outcome.accepted, outcome.duplicates), (2, 1));
    }
    let engine = Engine::open(dir.path()).unwrap();
    let outcome = ingest(&engine, &[track("m1", Some("u1"), None, "Email Opened", 5)]);
    assert_eq!((outcome.accepted, outcome.duplicates), (0, 1));
    assert_eq!(engine.load_stats().events, 2);
    assert_eq!(events_of(&engine, "u1"), ["m1", "m2"]);
}

#[test]
fn anonymous_history_joins_the_identified_profile_and_unmerge_splits_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    ingest(
        &engine,
        &[track("k1", Some("u1"), None, "Order Completed", 100)],
    );
    ingest(
        &engine,
        &[
            track("a1", None, Some("d1"), "Page Viewed", 50),
            track("a2", None, Some("d1"), "Product Added", 40),
        ],
    );
    assert_ne!(engine.find_profile("u1"), engine.find_profile("d1"));
    let outcome = ingest(
        &engine,
        &[identify("i1", "u1", Some("d1"), json!({"plan": "pro"}), 30)],
    );
    assert_eq!(outcome.profiles_merged, 1);
    assert_eq!(engine.find_profile("u1"), engine.find_profile("d1"));
    assert_eq!(events_of(&engine, "u1"), ["a1", "a2", "i1", "k1"]);
    let survivor = engine.find_profile("u1").unwrap();
    assert_eq!(engine.hot().events(survivor).len(), 4);
    assert_liveness_mirrors_the_writer(&engine);

    let merge = engine
        .merges_into(survivor)
        .unwrap()
        .pop()
        .expect("merge recorded");
    assert!(merge.cause.contains("a:d1"), "{}", merge.cause);
    assert!(!engine.is_alive(merge.from) && engine.is_alive(survivor));
    let undone = engine.unmerge(merge.id, NOW).unwrap();
    assert_eq!(undone.events_moved, 2);
    assert_eq!(events_of(&engine, "d1"), ["a1", "a2"]);
    assert_eq!(events_of(&engine, "u1"), ["i1", "k1"]);
    assert_liveness_mirrors_the_writer(&engine);
    assert!(engine.is_alive(undone.restored_profile));
    assert!(
        engine.unmerge(merge.id, NOW).is_err(),
        "a merge is undone once"
    );

    // The split survives a restart.
    drop(engine);
    let engine = Engine::open(dir.path()).unwrap();
    assert_ne!(engine.find_profile("u1"), engine.find_profile("d1"));
    let d1 = engine.find_profile("d1").unwrap();
    assert_eq!(engine.hot().events(d1).len(), 2);
}

#[test]
fn a_shared_device_does_not_merge_two_users() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    ingest(
        &engine,
        &[identify("i1", "alice", Some("family-ipad"), json!({}), 10)],
    );
    let outcome = ingest(
        &engine,
        &[identify("i2", "bob", Some("family-ipad"), json!({}), 5)],
    );
    assert_eq!(outcome.profiles_merged, 0);
    assert_ne!(engine.find_profile("alice"), engine.find_profile("bob"));
    assert_eq!(events_of(&engine, "bob"), ["i2"]);
    // Same with a shared e-mail address.
    ingest(
        &engine,
        &[identify(
            "i3",
            "carol",
            None,
            json!({"email": "home@example.com"}),
            4,
        )],
    );
    let outcome = ingest(
        &engine,
        &[identify(
            "i4",
            "dave",
            None,
            json!({"email": "HOME@example.com"}),
            3,
        )],
    );
    assert_eq!(
        (outcome.profiles_merged, outcome.identity_conflicts),
        (0, 1)
    );
    assert_eq!(engine.quality().unwrap().counters.identity_conflicts, 2);
    // An explicit alias does merge them.
    let alias =
        json!({"type": "alias", "messageId": "al1", "previousId": "carol", "userId": "dave"});
    assert_eq!(ingest(&engine, &[alias]).profiles_merged, 1);
    assert_eq!(engine.find_profile("carol"), engine.find_profile("dave"));
}

#[test]
fn traits_merge_by_message_time_not_arrival() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    ingest(
        &engine,
        &[identify(
            "i1",
            "u1",
            None,
            json!({"plan": "pro", "country": "FR"}),
            10,
        )],
    );
    // Arrives later but happened earlier: must not override plan.
    ingest(
        &engine,
        &[identify(
            "i0",
            "u1",
            None,
            json!({"plan": "free", "age": 31}),
            60,
        )],
    );
    let record = engine
        .profile_record(engine.find_profile("u1").unwrap())
        .unwrap();
    assert_eq!(record.traits["plan"].value, "pro");
    assert_eq!(record.traits["age"].value, 31);
    assert_eq!(record.traits["country"].value, "FR");
    let history = engine
        .timeline(record.id, Some(MessageType::Identify), 0, 10)
        .unwrap();
    assert_eq!(history.len(), 2, "every identify call is kept");
}

#[test]
fn quarantined_messages_are_kept_whole_and_replayed_after_a_fix() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let future = json!({"type": "track", "messageId": "f1", "userId": "u1", "event": "Email Opened",
        "timestamp": crate::time::format_ms(NOW + 3 * DAY)});
    let outcome = ingest(
        &engine,
        &[future.clone(), json!({"type": "track", "userId": "u1"})],
    );
    assert_eq!(outcome.accepted, 0);
    let reasons: Vec<Reason> = outcome.quarantined.iter().map(|q| q.reason).collect();
    assert_eq!(reasons, [Reason::FutureTimestamp, Reason::MissingEvent]);
    let kept = engine.quarantined(None, 10).unwrap();
    assert_eq!(serde_json::from_str::<Value>(&kept[0].raw).unwrap(), future);

    // Replaying now changes nothing; replaying once the date has come accepts it.
    assert_eq!(engine.replay_quarantine(None, NOW).unwrap().accepted, 0);
    assert_eq!(engine.quarantined(None, 10).unwrap().len(), 2);
    let later = engine
        .replay_quarantine(Some(Reason::FutureTimestamp), NOW + 3 * DAY)
        .unwrap();
    assert_eq!(later.accepted, 1);
    let left: Vec<Reason> = engine
        .quarantined(None, 10)
        .unwrap()
        .iter()
        .map(|q| q.reason)
        .collect();
    assert_eq!(left, [Reason::MissingEvent]);
    let report = engine.quality().unwrap();
    assert_eq!(report.in_quarantine.get(&Reason::MissingEvent), Some(&1));
    assert_eq!(report.counters.by_source["replay"].accepted, 1);
}

const DAY: i64 = crate::time::DAY_MS;

/// `quarantine_days`: quarantined messages received before the cutoff are purged, newer ones
/// stay, and the report counts what went.
#[test]
fn retention_purges_quarantined_messages_received_before_the_cutoff() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let missing = |id: &str| json!({"type": "track", "messageId": id, "userId": "q1"});
    let at = |messages: &[Value], now: i64| {
        let items = messages
            .iter()
            .map(|m| parse_message(m.clone(), None, &ParseContext::at(now)).into())
            .collect();
        engine.ingest(items, "test", Durability::Sync, now).unwrap()
    };
    at(&[missing("old-1"), missing("old-2")], NOW - 10 * DAY);
    at(&[missing("new-1")], NOW - DAY);
    assert_eq!(engine.quarantined(None, 10).unwrap().len(), 3);
    drop(engine);
    std::fs::write(
        dir.path().join(crate::retention::FILE_NAME),
        "quarantine_days = 7\n",
    )
    .unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let receipt = engine.purge_expired(NOW).unwrap();
    assert_eq!(receipt.quarantined_removed, 2);
    assert_eq!(receipt.events_removed, 0);
    let left = engine.quarantined(None, 10).unwrap();
    assert_eq!(left.len(), 1);
    assert!(left[0].raw.contains("new-1"), "{}", left[0].raw);
    let report = engine.quality().unwrap();
    assert_eq!(report.in_quarantine.get(&Reason::MissingEvent), Some(&1));
    assert_eq!(engine.purge_expired(NOW).unwrap().quarantined_removed, 0);
}

#[test]
fn anomalies_are_flagged_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let mut messages = vec![json!({"type": "page", "messageId": "long", "userId": "u1",
        "properties": {"url": "https://x.io/a", "duration_s": 20000}})];
    for i in 0..70 {
        messages.push(
            json!({"type": "track", "messageId": format!("b{i}"), "userId": "bot", "event": "Click",
            "timestamp": crate::time::format_ms(NOW - 30_000 + i * 100)}),
        );
    }
    let outcome = ingest(&engine, &messages);
    assert_eq!(outcome.accepted, 71);
    let report = engine.quality().unwrap();
    assert_eq!(report.counters.anomalies_by_flag["long_time_on_page"], 1);
    let bursts = report.counters.anomalies_by_flag["burst"];
    assert!(
        (10..=11).contains(&bursts),
        "events past the 60th in a minute are flagged, got {bursts}"
    );
    let bot = engine.find_profile("bot").unwrap();
    assert!(
        engine
            .hot()
            .events(bot)
            .iter()
            .filter(|e| e.anomalies() & flags::BURST != 0)
            .count()
            >= 10
    );
}

#[test]
fn restart_rebuilds_the_same_hot_store() {
    let dir = tempfile::tempdir().unwrap();
    let options = crate::generate::GenerateOptions {
        profiles: 200,
        days: 30,
        seed: 3,
        end_ms: NOW,
    };
    let mut out = Vec::new();
    crate::generate::generate(&options, &mut out).unwrap();
    let path = dir.path().join("events.jsonl");
    std::fs::write(&path, out).unwrap();
    let data = dir.path().join("data");
    let (before, n_slots) = {
        let engine = Engine::open(&data).unwrap();
        let progress = std::sync::Arc::default();
        let summary =
            crate::import::import_files(&engine, std::slice::from_ref(&path), NOW, &progress)
                .unwrap();
        assert!(summary.accepted > 1000 && summary.duplicates > 0 && summary.profiles_merged > 0);
        let again =
            crate::import::import_files(&engine, std::slice::from_ref(&path), NOW, &progress)
                .unwrap();
        assert_eq!(
            again.accepted, 0,
            "importing the same file twice adds nothing"
        );
        let report = engine.quality().unwrap();
        let c = &report.counters;
        let quarantined: u64 = c.quarantined_by_reason.values().sum();
        assert_eq!(
            c.received,
            c.accepted + c.duplicates + quarantined,
            "every message is counted once"
        );
        assert_eq!(
            quarantined,
            2 * summary.quarantined,
            "bad lines are reported at each import"
        );
        let waiting: u64 = report.in_quarantine.values().sum();
        assert_eq!(waiting, summary.quarantined, "... and kept once");
        let hot = engine.hot();
        let snapshot: Vec<Vec<HotEvent>> = (0..hot.n_slots() as u32)
            .map(|p| hot.events(p).to_vec())
            .collect();
        (snapshot, hot.n_slots())
    };
    let engine = Engine::open(&data).unwrap();
    let hot = engine.hot();
    // The hot store keeps seconds: events within one second may come in any order, so compare
    // each timeline as a sorted list of (time, name, key, flags, kind).
    let canonical = |events: &[HotEvent]| {
        let mut rows: Vec<(u32, u16, u32, u8, u8)> = events
            .iter()
            .map(|e| (e.ts, e.name, e.key, e.flags, e.kind))
            .collect();
        rows.sort_unstable();
        rows
    };
    for profile in 0..n_slots as u32 {
        let (a, b) = (&before[profile as usize], hot.events(profile));
        assert!(
            b.windows(2).all(|w| w[0].ts <= w[1].ts),
            "profile {profile} is sorted"
        );
        assert!(
            a.windows(2).all(|w| w[0].ts <= w[1].ts),
            "profile {profile} was sorted"
        );
        assert_eq!(canonical(a), canonical(b), "profile {profile}");
    }
}

/// Every byte of the event log's segment files.
fn log_files_bytes(dir: &std::path::Path) -> Vec<u8> {
    let mut bytes = Vec::new();
    for entry in std::fs::read_dir(dir.join("events")).unwrap() {
        bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
    }
    bytes
}

/// A kill -9 after fjall's journal was synced but before the segment worker retired the redo
/// records (here: a copy of the directory then): the next open zeroes them, so that erasing the
/// person leaves no byte of their identifiers in the event log (without it the redo records,
/// behind the committed head, were never scanned again).
#[test]
fn redo_records_a_kill_left_behind_are_zeroed_and_erasure_reaches_them() {
    let work = tempfile::tempdir().unwrap();
    let (data, killed) = (work.path().join("data"), work.path().join("killed"));
    {
        let engine = Engine::open(&data).unwrap();
        for (i, at) in [(1, 50), (2, 40), (3, 30)] {
            ingest(
                &engine,
                &[identify(
                    &format!("i{i}"),
                    "u1",
                    None,
                    json!({"email": "kill@y.com", "plan": format!("p{i}")}),
                    at,
                )],
            );
        }
        engine.sync().unwrap();
        copy_dir(&data, &killed);
        assert!(
            log_files_bytes(&killed)
                .windows(10)
                .any(|w| w == b"kill@y.com"),
            "the kill left the identifiers in redo records (or bodies)"
        );
    }
    let engine = Engine::open(&killed).unwrap();
    assert_eq!(events_of(&engine, "u1"), ["i1", "i2", "i3"]);
    let outcome = engine
        .remove_profile(engine.find_profile("u1").unwrap())
        .unwrap();
    assert_eq!(outcome.events_removed, 3);
    let bytes = log_files_bytes(&killed);
    for gone in [b"kill@y.com".as_slice(), b"\x02u1"] {
        assert!(
            !bytes.windows(gone.len()).any(|w| w == gone),
            "the event log still holds {:?}",
            String::from_utf8_lossy(gone)
        );
    }
}

/// A store written before the retired position was committed has its whole log walked at its
/// first open (light or full), and only at that one: the open commits the position.
#[test]
fn a_store_without_a_retired_position_is_walked_once() {
    let dir = tempfile::tempdir().unwrap();
    let retired = |engine: &Engine| engine.store.meta.get(crate::eventlog::RETIRED_KEY).unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(&engine, &[track("a1", Some("u1"), None, "Page Viewed", 50)]);
        ingest(&engine, &[track("a2", Some("u1"), None, "Page Viewed", 40)]);
        assert!(retired(&engine).is_some());
        engine
            .store
            .meta
            .remove(crate::eventlog::RETIRED_KEY)
            .unwrap();
    }
    let head = {
        let engine = Engine::open_light(dir.path()).unwrap();
        let head = engine.store.meta.get(crate::eventlog::HEAD_KEY).unwrap();
        assert!(head.is_some());
        assert_eq!(retired(&engine), head);
        head
    };
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(
        retired(&engine),
        head,
        "committed by the light open's close"
    );
    assert_eq!(events_of(&engine, "u1"), ["a1", "a2"]);
}

/// A store of layout 2 (event bodies as JSON in `events`) opens as layout 3: bodies in the
/// event log, timelines, dedup and the hot store unchanged, and the migration is not redone.
#[test]
fn a_layout_2_store_moves_its_bodies_into_the_event_log() {
    let dir = tempfile::tempdir().unwrap();
    let messages = [
        identify("i1", "u1", Some("d1"), json!({"email": "a@b.com"}), 30),
        track("t1", Some("u1"), None, "Order Completed", 20),
        track("t2", None, Some("d2"), "Page Viewed", 10),
    ];
    let (before, hot_before) = {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(&engine, &messages);
        let profile = engine.find_profile("u1").unwrap();
        let before = engine.timeline(profile, None, 0, 10).unwrap();
        // Rewrite the store as layout 2 wrote it.
        let store = &engine.store;
        let hot = store
            .db
            .keyspace("hot", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        for entry in store.events.iter() {
            let (key, value) = entry.into_inner().unwrap();
            let message = message_of(store, &value).unwrap();
            hot.insert(key.clone(), entry_of(&value).unwrap().record.encode())
                .unwrap();
            store.events.insert(key, to_json(&message)).unwrap();
        }
        store.meta.remove(crate::eventlog::HEAD_KEY).unwrap();
        store.meta.insert(crate::store::SCHEMA_KEY, "2").unwrap();
        // Layout 2 kept memberships as bitmaps too; this one lost its entry.
        let members = store
            .db
            .keyspace("members", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        let mut bitmap = roaring::RoaringBitmap::new();
        bitmap.insert(profile);
        let mut bytes = Vec::new();
        bitmap.serialize_into(&mut bytes).unwrap();
        members.insert("vip", bytes).unwrap();
        engine.checkpoint().unwrap();
        (
            before.into_iter().map(|e| e.message).collect::<Vec<_>>(),
            engine.hot().events(profile).to_vec(),
        )
    };
    std::fs::remove_dir_all(dir.path().join("events")).unwrap();
    for _ in 0..2 {
        let engine = Engine::open(dir.path()).unwrap();
        let profile = engine.find_profile("u1").unwrap();
        let after: Vec<Message> = engine
            .timeline(profile, None, 0, 10)
            .unwrap()
            .into_iter()
            .map(|e| e.message)
            .collect();
        assert_eq!(after, before);
        // Compared as text: the hot rows hold NaN for "no value".
        assert_eq!(
            format!("{:?}", engine.hot().events(profile)),
            format!("{hot_before:?}")
        );
        assert_eq!(
            engine
                .store
                .meta
                .get(crate::store::SCHEMA_KEY)
                .unwrap()
                .as_deref(),
            Some(crate::store::SCHEMA_VERSION.to_string().as_bytes())
        );
        for entry in engine.store.events.iter() {
            let (_, value) = entry.into_inner().unwrap();
            assert!(EventEntry::decode(&value).is_some());
        }
        assert!(
            !engine.store.db.keyspace_exists("hot"),
            "the old keyspace is gone"
        );
        assert!(!engine.store.db.keyspace_exists("members"));
        assert!(engine.members("vip").unwrap().contains(profile));
        let outcome = ingest(&engine, &messages);
        assert_eq!((outcome.accepted, outcome.duplicates), (0, 3));
    }
    assert!(log_files_bytes(dir.path()).windows(2).any(|w| w == b"t2"));
}

/// Bodies appended to the log by a batch that never committed (a crash between the log's sync
/// and the commit) are cut off at the next open; the committed ones read back.
#[test]
fn log_bytes_of_an_uncommitted_batch_are_cut_off_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let committed_head = {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(
            &engine,
            &[track("t1", Some("u1"), None, "Order Completed", 20)],
        );
        let head = engine.store.log.head();
        engine
            .store
            .log
            .append([
                crate::codec::encode(&engine.timeline(0, None, 0, 1).unwrap()[0].message)
                    .as_slice(),
            ])
            .unwrap();
        engine.store.log.sync().unwrap();
        assert_ne!(engine.store.log.head(), head);
        head
    };
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(engine.store.log.head(), committed_head);
    assert_eq!(events_of(&engine, "u1"), ["t1"]);
    ingest(
        &engine,
        &[track("t2", Some("u1"), None, "Order Completed", 10)],
    );
    drop(engine);
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(events_of(&engine, "u1"), ["t1", "t2"]);
}

/// Copies a directory tree.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A power loss after acknowledgements whose fjall journal entries never reached the disk
/// (fjall's journal is not synced on the acknowledgement path): the data directory as of the
/// last sync of fjall, with the event log as it was synced at the last acknowledgement. Every
/// acknowledged batch comes back from its redo record (events, identities, traits, dedup,
/// counters), the hot store snapshot that predates them is not trusted, and a redo record cut
/// short (a write the crash interrupted, never acknowledged) is dropped with its batch.
#[test]
fn acknowledged_batches_lost_from_the_journal_are_redone_from_the_event_log() {
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("data");
    {
        let engine = Engine::open(&data).unwrap();
        ingest(&engine, &[track("a1", None, Some("d1"), "Page Viewed", 50)]);
    }
    // The directory as a sync of fjall left it (here: a clean close, hot store snapshot and all).
    let synced = work.path().join("synced");
    copy_dir(&data, &synced);
    let log_at_last_ack = work.path().join("log");
    let torn = {
        let engine = Engine::open(&data).unwrap();
        let identified = ingest(
            &engine,
            &[identify(
                "i1",
                "u1",
                Some("d1"),
                json!({"email": "x@y.com", "plan": "pro"}),
                40,
            )],
        );
        assert_eq!(identified.accepted, 1);
        ingest(
            &engine,
            &[track("t1", Some("u1"), None, "Order Completed", 30)],
        );
        let before_last = engine.store.log.head();
        ingest(
            &engine,
            &[track("t2", Some("u1"), None, "Order Completed", 20)],
        );
        copy_dir(&data.join("events"), &log_at_last_ack);
        before_last
    };
    let power_loss = |keep_last: bool| {
        let dir = work.path().join(if keep_last { "whole" } else { "torn" });
        copy_dir(&synced, &dir);
        std::fs::remove_dir_all(dir.join("events")).unwrap();
        copy_dir(&log_at_last_ack, &dir.join("events"));
        if !keep_last {
            // The last batch's redo record was being written when the power went.
            let segment = dir
                .join("events")
                .join(format!("{:08}.events", torn.segment));
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(&segment)
                .unwrap();
            let len = file.metadata().unwrap().len();
            file.set_len(len - 3).unwrap();
        }
        dir
    };

    let dir = power_loss(true);
    {
        let engine = Engine::open(&dir).unwrap();
        assert!(
            !engine.from_snapshot,
            "the snapshot predates the redone batches"
        );
        assert_eq!(events_of(&engine, "x@y.com"), ["a1", "i1", "t1", "t2"]);
        assert_eq!(engine.find_profile("d1"), engine.find_profile("u1"));
        let profile = engine.find_profile("u1").unwrap();
        let record = read_profile(&engine.store, profile).unwrap().unwrap();
        assert_eq!(record.traits["plan"].value, json!("pro"));
        let quality = engine.quality().unwrap();
        assert_eq!(quality.counters.accepted, 4);
        assert!(
            !engine.store.log.has_redo_through(engine.store.log.head()),
            "redo records are retired once applied"
        );
        let again = ingest(
            &engine,
            &[track("t2", Some("u1"), None, "Order Completed", 20)],
        );
        assert_eq!(again.duplicates, 1, "dedup entries redone");
    }
    let engine = Engine::open(&dir).unwrap();
    assert_eq!(events_of(&engine, "u1"), ["a1", "i1", "t1", "t2"]);
    drop(engine);

    let dir = power_loss(false);
    let engine = Engine::open(&dir).unwrap();
    assert_eq!(engine.store.log.head(), torn, "the torn batch is cut off");
    assert_eq!(events_of(&engine, "u1"), ["a1", "i1", "t1"]);
    let again = ingest(
        &engine,
        &[track("t2", Some("u1"), None, "Order Completed", 20)],
    );
    assert_eq!(
        again.accepted, 1,
        "the batch never acknowledged can be sent again"
    );
}

fn ingest_bulk(engine: &Engine, messages: &[Value]) -> BatchOutcome {
    let items = messages
        .iter()
        .map(|m| parse_message(m.clone(), None, &ParseContext::at(NOW)).into())
        .collect();
    engine
        .ingest(items, "import", Durability::Bulk, NOW)
        .unwrap()
}

/// Bulk batches (imports) keep their index entries in memory until written as tables: while
/// they wait, duplicates are still caught and merges still move them, and the result is the
/// same as with ordinary batches, after a reopen too.
#[test]
fn bulk_batches_dedup_and_merge_like_ordinary_ones() {
    let batches = [
        vec![
            track("a1", None, Some("d1"), "Page Viewed", 50),
            track("a2", None, Some("d1"), "Product Viewed", 45),
            track("k0", Some("u1"), None, "Page Viewed", 60),
        ],
        vec![
            track("a1", None, Some("d1"), "Page Viewed", 50),
            identify("i1", "u1", Some("d1"), json!({"email": "x@y.com"}), 40),
            track("t1", Some("u1"), None, "Order Completed", 30),
        ],
    ];
    let runs: Vec<(Vec<String>, String, u64, Vec<u32>)> = [false, true]
        .into_iter()
        .map(|bulk| {
            let dir = tempfile::tempdir().unwrap();
            let mut duplicates = 0;
            {
                let engine = Engine::open(dir.path()).unwrap();
                for batch in &batches {
                    let outcome = if bulk {
                        ingest_bulk(&engine, batch)
                    } else {
                        ingest(&engine, batch)
                    };
                    duplicates += outcome.duplicates;
                }
                if bulk {
                    assert!(!engine.state.lock().bulk.is_empty(), "entries wait");
                    engine.finish_bulk().unwrap();
                }
            }
            let engine = Engine::open(dir.path()).unwrap();
            let profile = engine.find_profile("u1").unwrap();
            let merged: Vec<u32> = engine
                .merges_into(profile)
                .unwrap()
                .iter()
                .map(|merge| merge.from)
                .collect();
            (
                events_of(&engine, "u1"),
                format!("{:?}", engine.hot().events(profile)),
                duplicates,
                merged,
            )
        })
        .collect();
    assert_eq!(runs[0], runs[1]);
    assert_eq!(runs[1].0, ["a1", "a2", "i1", "k0", "t1"]);
    assert_eq!(runs[1].2, 1);
    assert_eq!(runs[1].3.len(), 1, "the merge is found by its survivor");
}

/// An import cut short before its entries were written: at the next open its last events are
/// dropped (their bodies zeroed in the log, their messageIds forgotten), so importing again
/// adds each once. Cut short after the tables were written: they are kept.
#[test]
fn an_import_cut_short_is_undone_or_kept_at_open() {
    let messages = [
        track("k1", Some("u1"), None, "Order Completed", 30),
        track("s3cr3t-1", Some("u1"), None, "Order Completed", 20),
    ];
    // Cut short before the tables: what waited in memory is lost with the process.
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(&engine, &messages[..1]);
        ingest_bulk(&engine, &messages[1..]);
        engine.state.lock().bulk = Default::default();
    }
    {
        let engine = Engine::open(dir.path()).unwrap();
        assert_eq!(events_of(&engine, "u1"), ["k1"]);
        assert!(
            engine
                .store
                .meta
                .get(crate::ingest::BULK_KEY)
                .unwrap()
                .is_none()
        );
        let bytes = log_files_bytes(dir.path());
        assert!(
            !bytes.windows(8).any(|w| w == b"s3cr3t-1"),
            "the dropped body is zeroed"
        );
        let quality = engine.quality().unwrap();
        assert_eq!(
            (quality.counters.received, quality.counters.accepted),
            (1, 1),
            "the dropped part is not counted"
        );
        let again = ingest_bulk(&engine, &messages);
        assert_eq!((again.accepted, again.duplicates), (1, 1));
    }
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(events_of(&engine, "u1"), ["k1", "s3cr3t-1"]);
    let quality = engine.quality().unwrap();
    assert_eq!(
        (quality.counters.accepted, quality.counters.duplicates),
        (2, 1)
    );
    drop(engine);

    // Cut short after the tables, before the marker was removed.
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        let from = engine.store.log.head();
        ingest_bulk(&engine, &messages);
        engine.finish_bulk().unwrap();
        let probe = engine.store.events.iter().next().unwrap().key().unwrap();
        engine
            .store
            .meta
            .insert(
                crate::ingest::BULK_KEY,
                crate::ingest::bulk_marker(from, true, Some(&probe)),
            )
            .unwrap();
        engine.store.msgids.remove("s3cr3t-1").unwrap();
    }
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(events_of(&engine, "u1"), ["k1", "s3cr3t-1"]);
    let again = ingest(&engine, &messages);
    assert_eq!(
        (again.accepted, again.duplicates),
        (0, 2),
        "messageIds redone"
    );
}

#[test]
fn removing_a_profile_removes_everything_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    ingest(&engine, &[track("a1", None, Some("d1"), "Page Viewed", 50)]);
    ingest(
        &engine,
        &[identify(
            "i1",
            "u1",
            Some("d1"),
            json!({"email": "x@y.com"}),
            30,
        )],
    );
    ingest(
        &engine,
        &[track("t1", Some("u1"), None, "Order Completed", 20)],
    );
    ingest(
        &engine,
        &[track("k1", Some("keep"), None, "Order Completed", 20)],
    );
    let profile = engine.find_profile("u1").unwrap();
    let outcome = engine.remove_profile(profile).unwrap();
    assert_eq!(outcome.events_removed, 3);
    let log_bytes = log_files_bytes(dir.path());
    for gone in [
        b"x@y.com".as_slice(),
        b"\x02u1",
        b"\x02d1",
        b"\x02t1",
        b"\x02a1",
    ] {
        assert!(
            !log_bytes.windows(gone.len()).any(|w| w == gone),
            "the event log still holds {:?}",
            String::from_utf8_lossy(gone)
        );
    }
    assert!(log_bytes.windows(2).any(|w| w == b"k1"), "kept bodies stay");
    for id in ["u1", "d1", "x@y.com", &profile.to_string()] {
        assert_eq!(engine.find_profile(id), None, "{id}");
    }
    assert!(engine.hot().events(profile).is_empty());
    assert!(!engine.is_alive(profile));
    assert_liveness_mirrors_the_writer(&engine);
    assert_eq!(engine.load_stats().profiles, 1);
    assert!(engine.remove_profile(profile).is_err());
    assert!(engine.store.merges.is_empty().unwrap());
    assert!(engine.store.merged_into.is_empty().unwrap());
    drop(engine);
    let engine = Engine::open(dir.path()).unwrap();
    assert_eq!(engine.find_profile("u1"), None);
    assert_eq!(engine.load_stats().events, 1);
    assert_eq!(events_of(&engine, "keep"), ["k1"]);
    let mut exported = 0;
    engine
        .for_each_event(|_| {
            exported += 1;
            Ok(())
        })
        .unwrap();
    assert_eq!(
        exported, 1,
        "nothing of the removed profile is left in the store"
    );
    // Its messages are forgotten too: sent again, they are new.
    assert_eq!(
        ingest(
            &engine,
            &[track("t1", Some("u1"), None, "Order Completed", 20)]
        )
        .accepted,
        1
    );
}

#[test]
fn a_numeric_user_id_wins_over_a_profile_number() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    for user in ["a", "b", "c", "1"] {
        ingest(
            &engine,
            &[track(
                &format!("m-{user}"),
                Some(user),
                None,
                "Email Opened",
                5,
            )],
        );
    }
    let by_user = engine.lookup_profile("1").unwrap();
    assert_eq!(by_user.profile, engine.find_profile("1").unwrap());
    assert_eq!(
        engine.profile_record(by_user.profile).unwrap().identifiers,
        ["u:1"]
    );
    assert_eq!(by_user.merged_from, None);
    // A profile number still works when no identifier has that text.
    assert_eq!(engine.lookup_profile("2").unwrap().profile, 2);
    let view = crate::view::profile_view(&engine, "1", Default::default(), NOW).unwrap();
    assert!(view.requested_merged_profile.is_none());
}

/// Layout 3 had no `merged_into`: opening such a store indexes its merges by survivor.
#[test]
fn a_layout_3_store_gets_its_merges_indexed_by_survivor() {
    let dir = tempfile::tempdir().unwrap();
    let survivor = {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(&engine, &[track("k1", Some("u1"), None, "Page Viewed", 60)]);
        ingest(&engine, &[track("a1", None, Some("d1"), "Page Viewed", 50)]);
        ingest(&engine, &[track("a2", None, Some("d2"), "Page Viewed", 40)]);
        ingest(
            &engine,
            &[
                identify("i1", "u1", Some("d1"), json!({}), 30),
                identify("i2", "u1", Some("d2"), json!({}), 20),
            ],
        );
        let survivor = engine.find_profile("u1").unwrap();
        assert_eq!(engine.merges_into(survivor).unwrap().len(), 2);
        // What a layout 3 store looks like: no index, version 3.
        let mut batch = engine.store.db.batch();
        for entry in engine.store.merged_into.iter() {
            batch.remove(&engine.store.merged_into, entry.key().unwrap());
        }
        batch.insert(&engine.store.meta, crate::store::SCHEMA_KEY, b"3");
        batch.commit().unwrap();
        assert!(engine.merges_into(survivor).unwrap().is_empty());
        survivor
    };
    let engine = Engine::open_light(dir.path()).unwrap();
    let merges = engine.merges_into(survivor).unwrap();
    assert_eq!(merges.len(), 2);
    assert!(merges.iter().all(|merge| merge.into == survivor));
    assert!(merges[0].id < merges[1].id, "oldest first");
}

/// A store written by a newer cible (a layout this build does not know) is refused with a
/// message saying so, and left as it is.
#[test]
fn a_store_of_a_newer_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(
            &engine,
            &[track("t1", Some("u1"), None, "Order Completed", 20)],
        );
        engine
            .store
            .meta
            .insert(crate::store::SCHEMA_KEY, "99")
            .unwrap();
    }
    for open in [Engine::open, Engine::open_light] {
        let error = open(dir.path()).err().expect("refused").to_string();
        assert!(
            error.contains("layout version 99") && error.contains("upgrade cible"),
            "{error}"
        );
    }
}

/// Closing an engine writes its memtables out: the next open replays nothing into memory.
#[test]
fn closing_leaves_nothing_to_replay() {
    let dir = tempfile::tempdir().unwrap();
    {
        let engine = Engine::open(dir.path()).unwrap();
        ingest(
            &engine,
            &[track("t1", Some("u1"), None, "Order Completed", 20)],
        );
        assert!(
            engine.store.db.write_buffer_size() > 0,
            "written, not flushed"
        );
    }
    let engine = Engine::open(dir.path()).unwrap();
    // Only the open's own write: spending the hot store snapshot's token.
    assert!(engine.from_snapshot);
    let replayed = engine.store.db.write_buffer_size();
    assert!(replayed < 128, "{replayed} bytes in memory after the open");
    assert_eq!(events_of(&engine, "u1"), ["t1"]);
}

/// Closing checkpoints even when the memtables are empty: a store whose writes fjall flushed
/// into tables but kept in its journal (fjall's own flushes, then a crash) is read by a light
/// open without filling a memtable, and each later command would read the journal through.
#[test]
fn closing_leaves_no_journal_even_after_fjall_flushed_its_memtables() {
    let dir = tempfile::tempdir().unwrap();
    drop(Engine::open(dir.path()).unwrap());
    {
        let store = Store::open(dir.path()).unwrap();
        store.meta.insert(b"written", b"then flushed").unwrap();
        for keyspace in store.keyspaces() {
            keyspace.rotate_memtable_and_wait().unwrap();
        }
        // Dropped without a checkpoint, as a crash would leave it.
    }
    assert_eq!(crate::store::journal_entries(dir.path()), 1);
    let engine = Engine::open_light(dir.path()).unwrap();
    assert_eq!(engine.store.db.write_buffer_size(), 0);
    drop(engine);
    assert_eq!(crate::store::journal_entries(dir.path()), 0);
}

#[test]
fn packed_bodies_read_back_as_imported_after_a_reopen() {
    let end = 1_795_000_000_000;
    let (dir, engine) = crate::test_support::generated_store(2_000, 30, 3, end);
    assert!(
        engine.store.log.packer().trained(),
        "a dictionary was trained"
    );
    drop(engine);
    let engine = Engine::open(&dir.path().join("data")).unwrap();
    let text = std::fs::read_to_string(dir.path().join("events.jsonl")).unwrap();
    let ctx = ParseContext::at(end);
    let mut originals: std::collections::HashMap<String, Message> = text
        .lines()
        .filter_map(|line| crate::message::parse_message_text(line, &ctx).ok())
        .map(|m| (m.message_id.clone(), m))
        .collect();
    let mut codec_bytes = 0;
    let mut read = 0;
    for entry in engine.store.events.iter() {
        let (_, value) = entry.into_inner().unwrap();
        let mut message = message_of(&engine.store, &value).unwrap();
        codec_bytes += crate::codec::encode(&message).len() as u64;
        message.flags = 0;
        let original = originals
            .remove(&message.message_id)
            .expect("every stored event was imported once");
        assert_eq!(message, original);
        read += 1;
    }
    assert!(read > 50_000, "{read} events");
    // The first bodies, written while samples were gathered, stay unpacked.
    let log_bytes = engine.store.log.disk_space();
    let unpacked = codec_bytes + 8 * read;
    assert!(
        log_bytes * 100 < unpacked * 92,
        "the log holds {log_bytes} bytes, {unpacked} unpacked"
    );
}

/// The hot store and dedup hashes as a scan of the store builds them, encoded.
fn scanned_hot(engine: &Engine) -> (Vec<u8>, Vec<u64>) {
    let state = engine.state.lock();
    let columns = engine.hot().columns();
    let (hot, mut hashes) = load_hot(
        &engine.store,
        &[(0, state.counters.next_profile)],
        &columns,
        None,
    )
    .unwrap();
    hashes.sort_unstable();
    hashes.dedup();
    let mut bytes = Vec::new();
    hot.encode_into(&mut bytes);
    (bytes, hashes)
}

fn loaded_hot(engine: &Engine) -> (Vec<u8>, Vec<u64>) {
    let mut bytes = Vec::new();
    engine.hot().encode_into(&mut bytes);
    (bytes, engine.state.lock().seen.all())
}

#[test]
fn a_clean_close_leaves_a_snapshot_that_the_next_open_loads_as_a_scan_would() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    {
        let engine = Engine::open(&data).unwrap();
        let mut batch = Vec::new();
        for i in 0..300 {
            let anonymous = format!("anon-{}", i % 40);
            batch.push(track(
                &format!("t{i}"),
                None,
                Some(&anonymous),
                "Page Viewed",
                i,
            ));
        }
        ingest(&engine, &batch);
        assert!(!engine.from_snapshot, "a new store has no snapshot");
    }
    assert!(crate::snapshot::path(&data).exists());
    // Reopened from the snapshot: the same as a scan; the token is gone until the next close.
    {
        let engine = Engine::open(&data).unwrap();
        assert!(engine.from_snapshot, "loaded from the snapshot");
        assert!(
            engine
                .store
                .meta
                .get(crate::snapshot::TOKEN_KEY)
                .unwrap()
                .is_none(),
            "a crash from here on finds no token"
        );
        assert!(!crate::snapshot::path(&data).exists(), "nor a file");
        assert_eq!(loaded_hot(&engine), scanned_hot(&engine));
        // Changes of every kind: new events, a merge (anonymous to user), a removal.
        ingest(
            &engine,
            &[
                identify("i1", "user-1", Some("anon-1"), json!({"plan": "pro"}), 5),
                track("t-late", Some("user-1"), None, "Order Completed", 2000),
            ],
        );
        engine
            .remove_profile(engine.find_profile("anon-2").unwrap())
            .unwrap();
    }
    {
        let engine = Engine::open(&data).unwrap();
        assert!(engine.from_snapshot);
        assert_eq!(loaded_hot(&engine), scanned_hot(&engine));
        assert_eq!(events_of(&engine, "user-1").len(), 10);
    }
    // A light open neither uses nor spends it.
    drop(Engine::open_light(&data).unwrap());
    assert!(Engine::open(&data).unwrap().from_snapshot);
    // A damaged snapshot is not used: the open scans the store.
    let path = crate::snapshot::path(&data);
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&path, bytes).unwrap();
    let engine = Engine::open(&data).unwrap();
    assert!(!engine.from_snapshot, "the damaged snapshot was not loaded");
    assert_eq!(loaded_hot(&engine), scanned_hot(&engine));
    drop(engine);
    // A damaged profile number is refused before anything is sized by it (no huge allocation).
    let mut bytes = std::fs::read(&path).unwrap();
    let first_profile = 28 + 1 + usize::from(bytes[28]) + 64 + 4;
    bytes[first_profile..first_profile + 4].copy_from_slice(&0xFFFF_FFF0_u32.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    let engine = Engine::open(&data).unwrap();
    assert!(!engine.from_snapshot);
    assert_eq!(loaded_hot(&engine), scanned_hot(&engine));
    assert!(!path.exists(), "the open removed the file it did not use");
}

#[test]
fn a_lost_compression_dictionary_is_refused_naming_the_file() {
    let end = 1_795_000_000_000;
    let (dir, engine) = crate::test_support::generated_store(2_000, 30, 3, end);
    assert!(engine.store.log.packer().trained());
    drop(engine);
    let dictionary = dir.path().join("data/events/dict-001.zstd");
    std::fs::remove_file(&dictionary).unwrap();
    let error = Engine::open(&dir.path().join("data"))
        .err()
        .expect("refused");
    assert!(
        error.to_string().contains("dict-001.zstd is missing"),
        "{error}"
    );
}

/// A rebuild of the hot store with a new property column scans the store beside the writer:
/// a batch acknowledged while the scan cannot even start (every thread of its pool held) goes
/// through, and the rebuilt store holds that batch, a merge and a removal made meanwhile, as a
/// scan made afterwards would. Fails on a hang: the old rebuild held the writer lock throughout.
#[test]
fn a_column_rebuild_runs_beside_the_writer_and_catches_up() {
    let dir = tempfile::tempdir().unwrap();
    let engine = std::sync::Arc::new(Engine::open(dir.path()).unwrap());
    let viewed = |id: &str, user: Option<&str>, anonymous: Option<&str>, category: &str| {
        let mut message = track(id, user, anonymous, "Product Viewed", 30);
        message["properties"] = json!({"category": category});
        message
    };
    ingest(
        &engine,
        &(0..50)
            .map(|i| viewed(&format!("v{i}"), Some(&format!("u{i}")), None, "shoes"))
            .collect::<Vec<_>>(),
    );
    ingest(&engine, &[viewed("a1", None, Some("d1"), "hats")]);
    let category = crate::computed::CATEGORY_KEY as u8;
    assert!(!engine.hot().columns().contains(&category));
    // Every thread of the pool the scan runs on (the global one), held.
    let held = crate::threads::hold();
    let rebuilding = std::sync::Arc::clone(&engine);
    let rebuild = std::thread::spawn(move || rebuilding.ensure_column_indexes(&[category], true));
    // Meanwhile: new events, a merge of d1 into u1, a removal.
    let writing = std::sync::Arc::clone(&engine);
    let written = crate::threads::within(std::time::Duration::from_secs(30), move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        ingest(
            &writing,
            &[
                viewed("n1", Some("u1"), None, "bags"),
                viewed("n2", Some("new"), None, "bags"),
                identify("i1", "u1", Some("d1"), json!({}), 20),
            ],
        );
        writing
            .remove_profile(writing.find_profile("u2").unwrap())
            .unwrap();
    });
    drop(held);
    written.expect("the writer went on while the column was being built");
    rebuild.join().unwrap().unwrap();
    assert!(engine.hot().columns().contains(&category));
    assert_eq!(loaded_hot(&engine), scanned_hot(&engine));
    let u1 = engine.find_profile("u1").unwrap();
    assert_eq!(engine.hot().events(u1).len(), 4, "v1, n1, i1 and d1's a1");
}

/// A segment edit that needs a new property column builds it before it takes the segments'
/// lock: a batch committed while the scan cannot even start (every thread of its pool held) is
/// evaluated for the existing segments meanwhile, and the new segment, once built, is exact.
/// Fails on a hang: the edit used to scan under the segments' lock, so every batch's evaluation
/// (the worker's hand-offs) waited for the whole scan (about 76 s at 1M profiles).
#[test]
fn a_segment_edit_builds_its_column_before_it_takes_the_segments_lock() {
    let dir = tempfile::tempdir().unwrap();
    let engine = std::sync::Arc::new(Engine::open(dir.path()).unwrap());
    // `category` hidden behind `product_id`: a rule on it needs the category column.
    let viewed = |id: &str, user: &str, category: &str| {
        let mut message = track(id, Some(user), None, "Product Viewed", 30);
        message["properties"] = json!({"product_id": format!("p-{id}"), "category": category});
        message
    };
    ingest(
        &engine,
        &(0..50)
            .map(|i| {
                viewed(
                    &format!("v{i}"),
                    &format!("u{i}"),
                    if i % 5 == 0 { "hats" } else { "shoes" },
                )
            })
            .collect::<Vec<_>>(),
    );
    let rule = |source: &str| cible_lang::parse(source).unwrap();
    engine
        .create_segment("viewers", rule(r#"did("Product Viewed", 1d)"#), "", NOW)
        .unwrap();
    let category = crate::computed::CATEGORY_KEY as u8;
    assert!(!engine.hot().columns().contains(&category));
    let held = crate::threads::hold();
    let creating = std::sync::Arc::clone(&engine);
    let create = std::thread::spawn(move || {
        let hats = r#"did("Product Viewed" where category = "hats", 1d)"#;
        creating.create_segment("hats", rule(hats), hats, NOW)
    });
    let writing = std::sync::Arc::clone(&engine);
    let evaluated = crate::threads::within(std::time::Duration::from_secs(30), move || {
        std::thread::sleep(std::time::Duration::from_millis(50));
        // Evaluated inline by this thread, under the segments' lock.
        ingest(&writing, &[viewed("n1", "newcomer", "hats")]);
        writing.live_members("viewers").map(|m| m.len())
    });
    drop(held);
    assert_eq!(
        evaluated.expect("a batch was evaluated while the column was being built"),
        Some(51)
    );
    create.join().unwrap().unwrap();
    assert!(engine.hot().columns().contains(&category));
    let expected: roaring::RoaringBitmap = (0..50)
        .step_by(5)
        .map(|i| format!("u{i}"))
        .chain(["newcomer".to_string()])
        .map(|user| engine.find_profile(&user).unwrap())
        .collect();
    assert_eq!(engine.live_members("hats"), Some(expected));
}

/// Every file under `dir` that holds one of `needles`, with the needle.
fn files_holding(dir: &std::path::Path, needles: &[&str]) -> Vec<(std::path::PathBuf, String)> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).unwrap() {
                stack.push(entry.unwrap().path());
            }
            continue;
        }
        let bytes = std::fs::read(&path).unwrap().to_ascii_lowercase();
        for needle in needles {
            if memchr::memmem::find(&bytes, needle.to_ascii_lowercase().as_bytes()).is_some() {
                found.push((path.clone(), needle.to_string()));
            }
        }
    }
    found
}

/// An erasure on a store with merges, quarantined messages, segments and a trained model leaves
/// no byte of the person's identifiers in any file of the data directory, and their later
/// messages (sent or imported) are quarantined as `erased`, not brought back.
#[test]
fn an_erased_person_leaves_no_byte_in_any_file_and_stays_erased() {
    let (dir, engine) = crate::test_support::generated_store(200, 30, 7, NOW);
    let data = dir.path().join("data");
    let (user, device, email) = (
        "zq7-erase-user-X9K2",
        "zq7-erase-device-W4M8",
        "zq7.erase.person@example.org",
    );
    let rule = r#"did("Order Completed", 30d)"#;
    engine
        .create_segment("buyers", cible_lang::parse(rule).unwrap(), rule, NOW)
        .unwrap();
    ingest(
        &engine,
        &[
            track("e1", None, Some(device), "Page Viewed", 90),
            identify("e2", user, None, json!({"email": email, "plan": "pro"}), 80),
            identify("e3", user, Some(device), json!({"consent_email": true}), 70),
            track("e4", Some(user), None, "Order Completed", 60),
            // Three days ahead: quarantined, naming them.
            json!({"type": "track", "userId": user, "event": "Order Completed", "messageId": "e5",
                "timestamp": crate::time::format_ms(NOW + 3 * 86_400_000)}),
        ],
    );
    crate::test_support::save_two_clusters(&engine, 200, NOW);
    engine.drain_segments().unwrap();
    let person = engine.find_profile(user).unwrap();
    assert!(engine.members("buyers").unwrap().contains(person));
    assert_eq!(engine.merges_into(person).unwrap().len(), 1);
    let quarantined = engine.quarantined(None, 100).unwrap();
    assert!(quarantined.iter().any(|q| q.raw.contains(user)));
    // Before: their identifiers are in the files (the test can fail).
    drop(engine);
    assert!(!files_holding(&data, &[user, device, email]).is_empty());

    let engine = Engine::open(&data).unwrap();
    let person = engine.find_profile(user).unwrap();
    let named = |engine: &Engine| -> Vec<crate::segment::feed::FeedChange> {
        engine
            .changes_after(0, 1_000_000)
            .unwrap()
            .into_iter()
            .filter(|c| c.profile == person)
            .collect()
    };
    assert!(
        named(&engine).iter().any(|c| c.entered),
        "the test can fail"
    );
    let receipt = engine.erase_profile(person).unwrap();
    // Of the feed, only their last exits are left, naming the ordinal and nothing else.
    let left = named(&engine);
    assert!(!left.is_empty());
    for change in &left {
        assert!(!change.entered, "{change:?}");
        assert_eq!(change.cause, crate::segment::feed::Cause::Erasure);
    }
    assert!(receipt.feed_entries_removed >= 2, "{receipt:?}");
    assert!(
        engine
            .segment_changes("buyers")
            .unwrap()
            .iter()
            .all(|c| c.profile != person),
        "the size history still names them"
    );
    assert_eq!(receipt.events_removed, 4);
    assert_eq!(receipt.merged_profiles_removed.len(), 1);
    assert_eq!(receipt.quarantined_removed, 1);
    assert_eq!(receipt.subjects.len(), 3);
    engine.drain_segments().unwrap();
    assert!(!engine.members("buyers").unwrap().contains(person));
    assert!(engine.find_profile(user).is_none() && engine.find_profile(email).is_none());
    // While the engine is open, and after it closes.
    assert_eq!(files_holding(&data, &[user, device, email]), []);
    drop(engine);
    assert_eq!(files_holding(&data, &[user, device, email]), []);

    // Their next messages, sent or imported, are quarantined as erased, without content.
    let engine = Engine::open(&data).unwrap();
    let outcome = ingest(
        &engine,
        &[
            track("later-1", Some(user), None, "Page Viewed", 1),
            json!({"type": "identify", "anonymousId": "someone-new", "messageId": "later-2",
                "traits": {"email": email.to_uppercase()}}),
        ],
    );
    assert_eq!(outcome.accepted, 0);
    assert!(
        outcome
            .quarantined
            .iter()
            .all(|q| q.reason == crate::quality::Reason::Erased)
    );
    let bulk = ingest_bulk(
        &engine,
        &[track("later-3", None, Some(device), "Page Viewed", 1)],
    );
    assert_eq!(bulk.quarantined.len(), 1);
    engine.finish_bulk().unwrap();
    assert!(engine.find_profile(user).is_none() && engine.find_profile(device).is_none());
    assert!(
        engine
            .quarantined(Some(crate::quality::Reason::Erased), 10)
            .unwrap()
            .iter()
            .all(|q| !q.raw.contains(user) && !q.raw.contains(device))
    );
    drop(engine);
    assert_eq!(files_holding(&data, &[user, device, email]), []);
}

/// Erasures while two threads ingest for the same people: nothing hangs, an erased person is
/// never brought back by a message that arrives after, and the audit log stays one chain.
#[test]
fn erasures_beside_ingestion_never_hang_and_never_resurrect() {
    let dir = tempfile::tempdir().unwrap();
    let engine = std::sync::Arc::new(Engine::open(dir.path()).unwrap());
    let users: Vec<String> = (0..12).map(|i| format!("person-{i}")).collect();
    let first: Vec<Value> = users
        .iter()
        .map(|u| track(&format!("first-{u}"), Some(u), None, "Page Viewed", 100))
        .collect();
    ingest(&engine, &first);
    let erased = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<String>::new()));
    let (done, finished) = std::sync::mpsc::channel();
    for thread in 0..2 {
        let (engine, users, done) = (std::sync::Arc::clone(&engine), users.clone(), done.clone());
        std::thread::spawn(move || {
            for round in 0..40 {
                let user = &users[(round * 5 + thread * 3) % users.len()];
                ingest(
                    &engine,
                    &[track(
                        &format!("t{thread}-{round}"),
                        Some(user),
                        None,
                        "Email Opened",
                        50,
                    )],
                );
            }
            done.send(()).unwrap();
        });
    }
    {
        let (engine, erased, done) = (
            std::sync::Arc::clone(&engine),
            std::sync::Arc::clone(&erased),
            done.clone(),
        );
        let users = users.clone();
        std::thread::spawn(move || {
            for user in users.iter().step_by(4) {
                let profile = engine.find_profile(user).unwrap();
                engine.erase_profile(profile).unwrap();
                erased.lock().push(user.clone());
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..3 {
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a thread hung or panicked");
    }
    for user in erased.lock().iter() {
        assert!(engine.find_profile(user).is_none(), "{user} came back");
        let outcome = ingest(
            &engine,
            &[track(
                &format!("after-{user}"),
                Some(user),
                None,
                "Page Viewed",
                1,
            )],
        );
        assert_eq!(
            outcome.quarantined[0].reason,
            crate::quality::Reason::Erased
        );
    }
    assert!(engine.verify_audit(None).unwrap().is_ok());
}

/// Retention: events older than the policy's age go from the index, the event log's bytes,
/// the hot store and every membership, as if they had never arrived; what is newer stays;
/// the same old events sent again are duplicates; all of it beside ingestion from other
/// threads, bounded in time.
#[test]
fn retention_purges_old_events_everywhere_as_if_they_never_came() {
    let (dir, engine) = crate::test_support::generated_store(300, 40, 11, NOW);
    let data = dir.path().join("data");
    let rules = [
        ("ever_bought", r#"did("Order Completed", 3650d)"#),
        ("viewers", r#"count("Page Viewed", 3650d) >= 3"#),
        ("recent", r#"did("Page Viewed", 7d)"#),
    ];
    for (name, rule) in rules {
        engine
            .create_segment(name, cible_lang::parse(rule).unwrap(), rule, NOW)
            .unwrap();
    }
    // One person whose only order is old, with a marker only its body holds.
    let marker = "zq-retention-marker-7Y3";
    ingest(
        &engine,
        &[
            identify(
                "r1",
                "retained-user",
                None,
                json!({"plan": "pro"}),
                60 * 24 * 30,
            ),
            json!({"type": "track", "userId": "retained-user", "event": "Order Completed",
                "messageId": "r2", "properties": {"note": marker},
                "timestamp": crate::time::format_ms(NOW - 25 * 86_400_000)}),
            track("r3", Some("retained-user"), None, "Page Viewed", 60),
        ],
    );
    engine.drain_segments().unwrap();
    let person = engine.find_profile("retained-user").unwrap();
    assert!(engine.members("ever_bought").unwrap().contains(person));
    let before: Vec<u64> = rules
        .iter()
        .map(|(name, _)| engine.members(name).unwrap().len())
        .collect();
    drop(engine);
    assert!(
        !files_holding(&data, &[marker]).is_empty(),
        "the test can fail"
    );

    std::fs::write(data.join(crate::retention::FILE_NAME), "events_days = 20\n").unwrap();
    let engine = std::sync::Arc::new(Engine::open(&data).unwrap());
    let cutoff = engine.retention().events_cutoff(NOW).unwrap();
    let mut old_ids = Vec::new();
    engine
        .for_each_event(|event| {
            if event.message.timestamp < cutoff {
                old_ids.push(event.message.message_id.clone());
            }
            Ok(())
        })
        .unwrap();
    assert!(old_ids.len() > 100, "{}", old_ids.len());

    // Ingestion goes on beside the purge.
    let (done, finished) = std::sync::mpsc::channel();
    for thread in 0..2 {
        let (engine, done) = (std::sync::Arc::clone(&engine), done.clone());
        std::thread::spawn(move || {
            for round in 0..30 {
                ingest(
                    &engine,
                    &[track(
                        &format!("live-{thread}-{round}"),
                        Some(&format!("live-{thread}")),
                        None,
                        "Page Viewed",
                        5,
                    )],
                );
            }
            done.send(()).unwrap();
        });
    }
    let purging = {
        let engine = std::sync::Arc::clone(&engine);
        std::thread::spawn(move || engine.purge_expired(NOW).unwrap())
    };
    for _ in 0..2 {
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("an ingesting thread hung or panicked");
    }
    let receipt = purging.join().unwrap();
    assert_eq!(receipt.events_removed, old_ids.len() as u64);
    assert!(receipt.profiles_touched > 10);
    engine.drain_segments().unwrap();

    // Nothing dated before the cutoff is left; what is newer, and the live traffic, is.
    let mut left = 0;
    engine
        .for_each_event(|event| {
            assert!(event.message.timestamp >= cutoff, "{:?}", event.message);
            left += 1;
            Ok(())
        })
        .unwrap();
    assert!(left > 0);
    assert_eq!(engine.hot().n_events(), left);
    // The person's old order is gone, and with it their membership, with its cause.
    assert!(!engine.members("ever_bought").unwrap().contains(person));
    assert!(engine.members("recent").unwrap().contains(person));
    let exits: Vec<_> = engine
        .changes_after(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|c| c.profile == person && !c.entered)
        .collect();
    assert_eq!(exits.len(), 1);
    assert_eq!(exits[0].cause, crate::segment::feed::Cause::Retention);
    // The profile itself stays: identifiers, traits.
    assert_eq!(
        engine.profile_record(person).unwrap().traits["plan"].value,
        json!("pro")
    );
    // Live memberships equal an evaluation from scratch, on this hot store and on one
    // reloaded from the store alone (no snapshot).
    let check = |engine: &Engine| {
        for (name, rule) in rules {
            let (fresh, _, _) = engine
                .evaluate_rule(&cible_lang::parse(rule).unwrap(), NOW, &Default::default())
                .unwrap();
            assert_eq!(engine.members(name).unwrap(), fresh, "{name}");
        }
    };
    check(&engine);
    let after: Vec<u64> = rules
        .iter()
        .map(|(name, _)| engine.members(name).unwrap().len())
        .collect();
    assert!(after[0] < before[0], "{before:?} {after:?}");
    // The same old events sent again are duplicates, not back.
    let again = ingest(
        &engine,
        &[
            json!({"type": "track", "userId": "retained-user", "event": "Order Completed",
            "messageId": "r2", "timestamp": crate::time::format_ms(NOW - 25 * 86_400_000)}),
        ],
    );
    assert_eq!((again.accepted, again.duplicates), (0, 1));
    // A new event dated before the cutoff is not stored: quarantined as expired, without its
    // content.
    let late = ingest(
        &engine,
        &[
            json!({"type": "track", "userId": "retained-user", "event": "Order Completed",
            "messageId": "r9", "properties": {"note": marker},
            "timestamp": crate::time::format_ms(NOW - 25 * 86_400_000)}),
        ],
    );
    assert_eq!(late.accepted, 0);
    assert_eq!(late.quarantined[0].reason, crate::quality::Reason::Expired);
    assert!(!engine.members("ever_bought").unwrap().contains(person));
    assert!(engine.verify_audit(None).unwrap().is_ok());
    drop(engine);
    assert_eq!(files_holding(&data, &[marker]), []);
    std::fs::remove_file(crate::snapshot::path(&data)).ok();
    let reopened = Engine::open(&data).unwrap();
    assert_eq!(reopened.hot().n_events(), left);
    check(&reopened);
    // Nothing more to purge: a second run removes nothing.
    assert_eq!(reopened.purge_expired(NOW).unwrap().events_removed, 0);
}

/// Webhooks beside ingestion and erasure, from several threads at once, bounded in time:
/// subscriptions created at once get distinct ids; the queue a sender fills and settles holds,
/// at the end, exactly the wanted changes not yet delivered; an erased person's queued
/// deliveries go (their erasure's exits stay).
#[test]
fn webhook_queues_beside_ingestion_and_erasure_stay_exact() {
    use crate::webhooks::{Mode, Settle, Target};
    let dir = tempfile::tempdir().unwrap();
    let engine = std::sync::Arc::new(Engine::open(dir.path()).unwrap());
    let rule = r#"did("Order Completed", 30d)"#;
    engine
        .create_segment("buyers", cible_lang::parse(rule).unwrap(), rule, NOW)
        .unwrap();
    let spec = || crate::engine::NewWebhook {
        url: "http://127.0.0.1:9/hook".into(),
        target: Target::Segment {
            name: "buyers".into(),
        },
        on_enter: true,
        on_exit: true,
        mode: Mode::Events,
        purpose: "analytics".into(),
        after: None,
    };
    let (done, finished) = std::sync::mpsc::channel();
    let created = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    for _ in 0..2 {
        let (engine, created, done) = (
            std::sync::Arc::clone(&engine),
            std::sync::Arc::clone(&created),
            done.clone(),
        );
        std::thread::spawn(move || {
            for _ in 0..5 {
                created
                    .lock()
                    .push(engine.create_webhook(spec(), NOW).unwrap().id);
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .expect("a creating thread hung or panicked");
    }
    let mut ids = created.lock().clone();
    ids.sort();
    assert_eq!(ids, (1..=10).collect::<Vec<u32>>(), "distinct ids");
    let id = ids[0];

    // Ingestion, a sender (fill, settle every other delivery) and erasures at once.
    let users: Vec<String> = (0..16).map(|i| format!("hook-{i}")).collect();
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let delivered = std::sync::Arc::new(parking_lot::Mutex::new(Vec::<u64>::new()));
    {
        let (engine, users, done) = (std::sync::Arc::clone(&engine), users.clone(), done.clone());
        std::thread::spawn(move || {
            for (i, user) in users.iter().enumerate() {
                ingest(
                    &engine,
                    &[track(
                        &format!("o-{i}"),
                        Some(user),
                        None,
                        "Order Completed",
                        30,
                    )],
                );
                engine.drain_segments().unwrap();
            }
            done.send(()).unwrap();
        });
    }
    let sender = {
        let (engine, stop, delivered) = (
            std::sync::Arc::clone(&engine),
            std::sync::Arc::clone(&stop),
            std::sync::Arc::clone(&delivered),
        );
        std::thread::spawn(move || {
            let mut turn = 0u64;
            loop {
                let last_round = stop.load(Ordering::Acquire);
                let queued = engine.enqueue_webhook_changes(id, NOW, 3).unwrap();
                let mut settles = Vec::new();
                for delivery in queued {
                    turn += 1;
                    if turn.is_multiple_of(2) {
                        delivered.lock().push(delivery.seq);
                        settles.push(Settle::Done { seq: delivery.seq });
                    }
                }
                engine.settle_webhook(id, &settles).unwrap();
                if last_round && engine.webhook_cursor(id).unwrap().0 == engine.feed_head() {
                    return;
                }
            }
        })
    };
    {
        let (engine, users, done) = (std::sync::Arc::clone(&engine), users.clone(), done.clone());
        std::thread::spawn(move || {
            for user in users.iter().step_by(5) {
                // Erase whoever already arrived.
                let started = std::time::Instant::now();
                let profile = loop {
                    if let Some(profile) = engine.find_profile(user) {
                        break profile;
                    }
                    assert!(started.elapsed() < std::time::Duration::from_secs(30));
                    std::thread::yield_now();
                };
                engine.erase_profile(profile).unwrap();
            }
            done.send(()).unwrap();
        });
    }
    for _ in 0..2 {
        finished
            .recv_timeout(std::time::Duration::from_secs(120))
            .expect("ingestion or erasure hung or panicked");
    }
    stop.store(true, Ordering::Release);
    let (sent, received) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        sender.join().unwrap();
        sent.send(()).unwrap();
    });
    received
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("the sender hung or panicked");

    // What is queued = every change still in the feed, minus what was delivered.
    let feed = engine.changes_after(0, 100_000).unwrap();
    let delivered: std::collections::HashSet<u64> = delivered.lock().iter().copied().collect();
    let expected: Vec<u64> = feed
        .iter()
        .map(|c| c.seq)
        .filter(|seq| !delivered.contains(seq))
        .collect();
    let queued: Vec<u64> = engine
        .webhook_queue(id)
        .unwrap()
        .iter()
        .map(|d| d.seq)
        .collect();
    assert_eq!(queued, expected);
    // The erased: only their erasure's exits are left, anywhere in the queue.
    let erasure_exits = feed
        .iter()
        .filter(|c| c.cause == crate::segment::feed::Cause::Erasure)
        .count();
    assert!(erasure_exits >= 1, "{feed:?}");
    for delivery in engine.webhook_queue(id).unwrap() {
        let change = feed.iter().find(|c| c.seq == delivery.seq).unwrap();
        assert_eq!(Some(change.profile), delivery.pending.profile);
    }
    // Another subscription, created before any change, owes every change still in the feed.
    let other = ids[1];
    while !engine
        .enqueue_webhook_changes(other, NOW, 1000)
        .unwrap()
        .is_empty()
    {}
    assert_eq!(engine.webhook_queue(other).unwrap().len(), feed.len());
}
