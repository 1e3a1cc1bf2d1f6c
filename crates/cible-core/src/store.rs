//! The durable store: the event log (event bodies, appended once: [`crate::eventlog`]) and
//! fjall (an embedded LSM-tree engine) for everything else, the log's index included:
//! keyspaces, key layouts and the fixed binary records. See `docs/architecture.md` for why.
//!
//! | keyspace     | key                                   | value                               |
//! |--------------|---------------------------------------|-------------------------------------|
//! | `events`     | profile u32 · time i64 · seq u64 (BE) | [`EventEntry`]: the body's [`crate::eventlog::Location`] (12 bytes) and the [`HotRecord`] (20 bytes + 5 per other key) |
//! | `msgids`     | messageId                             | empty (dedup across restarts)       |
//! | `idents`     | `u:`/`a:`/`e:` + identifier           | profile u32                         |
//! | `profiles`   | profile u32                           | [`crate::records::ProfileRecord`]    |
//! | `merges`     | merge id u64                          | [`crate::records::MergeRecord`]      |
//! | `merged_into`| survivor u32 · merge id u64 ([`merged_into_key`]) | empty: the merges into a profile, found without reading the others |
//! | `quarantine` | quarantine id u64                     | [`crate::records::QuarantineRecord`] |
//! | `qkeys`      | hash of a quarantined raw message     | quarantine id (dedup of bad input)  |
//! | `dict`       | `n`/`k` + text                        | dictionary id u32                   |
//! | `keys`       | SHA-256 of an API key, hex            | [`crate::keys::KeyRecord`]          |
//! | `meta`       | name                                  | counters, JSON; the log's end; each segment's size ([`segment_size_key`], u64) |
//! | `segments`   | segment name                          | [`crate::segment::SegmentRecord`]   |
//! | `segment_log`| name · 0 · time i64 · feed seq u64    | [`crate::segment::Change`]          |
//! | `entries`    | name · 0 · profile u32                | when the member entered, i64: one entry per member, the membership itself |
//! | `changes`    | feed seq u64                          | [`crate::segment::feed::FeedChange`]|
//! | `webhooks`   | tag · subscription u32 [· seq u64] ([`crate::webhooks::keys`]) | subscriptions, cursors, queued deliveries, dead letters |
//!
//! `meta` also holds [`SCHEMA_KEY`], the layout version of the store: a store written by a newer
//! cible is refused instead of misread. [`PER_PROFILE`] lists every keyspace that holds data
//! about a person, for erasure to walk.
//!
//! **Every change of a batch (event index entries, identities, profiles, counters, the log's
//! end) is one atomic fjall batch, committed after the log was synced with the batch's redo
//! record; acknowledged means synced in the log and committed** (fjall's journal is synced
//! later, [`Store::retire_redo`]; a batch it lost comes back from its redo record at open,
//! `Store::redo`).

use std::path::Path;

use fjall::{Database, Keyspace, KeyspaceCreateOptions};

use crate::eventlog::{EventLog, Location, Position};

use crate::hot::{HotEvent, OtherKeys};

pub use crate::error::StoreError;

/// Declares every keyspace once: the `Store` fields, their opening, `Store::keyspaces` and
/// `Store::NAMES` all come from this list.
macro_rules! keyspaces {
    ($($name:ident),+ $(,)?) => {
        /// The open store: one fjall database and its keyspaces, and the event log.
        pub struct Store {
            pub db: Database,
            $(pub $name: Keyspace,)+
            pub log: EventLog,
        }

        impl Store {
            /// Names of every keyspace, in [`Store::keyspaces`] order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($name)),+];

            fn open_keyspaces(db: Database, log_dir: &Path) -> Result<Self, StoreError> {
                $(let $name = db.keyspace(stringify!($name), || keyspace_options(stringify!($name)))?;)+
                let meta = db.keyspace("meta", KeyspaceCreateOptions::default)?;
                let position = |key: &str| -> Result<Option<Position>, StoreError> {
                    match meta.get(key)? {
                        Some(bytes) => Ok(Some(Position::decode(&bytes).ok_or_else(|| StoreError::Corrupt {
                            keyspace: "meta",
                            detail: format!("{key} is not a log position"),
                        })?)),
                        None => Ok(None),
                    }
                };
                let head = position(crate::eventlog::HEAD_KEY)?;
                let retired = position(crate::eventlog::RETIRED_KEY)?;
                let log = EventLog::open(log_dir, head, retired)?;
                if let (Some(head), None) = (head, retired) {
                    // A store from before the key: its whole log was walked once, not again
                    // (the close's checkpoint makes it durable; lost, the next open walks again).
                    meta.insert(crate::eventlog::RETIRED_KEY, head.encode())?;
                }
                let store = Self { $($name,)+ db, log };
                store.redo()?;
                let dictionaries = store
                    .meta
                    .get(crate::eventlog::DICTIONARIES_KEY)?
                    .and_then(|bytes| bytes.first().copied())
                    .unwrap_or(0);
                store.log.packer().expect(dictionaries)?;
                Ok(store)
            }

            /// Every keyspace.
            pub fn keyspaces(&self) -> Vec<&Keyspace> {
                vec![$(&self.$name),+]
            }

            /// The keyspace of this name.
            pub fn keyspace(&self, name: &str) -> Option<&Keyspace> {
                match name {
                    $(stringify!($name) => Some(&self.$name),)+
                    _ => None,
                }
            }
        }
    };
}

keyspaces!(
    events,
    msgids,
    idents,
    profiles,
    merges,
    merged_into,
    quarantine,
    qkeys,
    dict,
    keys,
    meta,
    segments,
    segment_log,
    entries,
    changes,
    consents,
    audit,
    suppressed,
    webhooks,
);

/// The `meta` key holding the store's layout version.
pub const SCHEMA_KEY: &str = "schema_version";
/// The `meta` key holding the token of the hot store snapshot ([`crate::snapshot`]) that
/// matches the store.
pub const SNAPSHOT_TOKEN_KEY: &str = "hot_snapshot";
/// The layout this build writes: 2 added the change feed (`changes`); 3 moved event bodies
/// out of fjall into the event log, and `events` holds their locations with the hot rows (the
/// `hot` keyspace is gone); 4 indexed merges by survivor (`merged_into`); 5 put redo records
/// in the event log (an older cible would misread them: nothing else changed, so a layout 4
/// store needs no migration); 6 added consents (`consents`, and a history in profile records:
/// an older cible would drop it; a layout 5 store holds none, so it needs no migration).
pub const SCHEMA_VERSION: u32 = 6;

/// Keyspaces that hold data about a person, and how it is keyed there: erasure must walk every
/// one of them (a test checks that each keyspace is either listed here or in [`GLOBAL`]).
pub const PER_PROFILE: [(&str, &str); 10] = [
    ("events", "profile prefix (the bodies are in the event log)"),
    ("msgids", "the messageIds of the profile's events"),
    ("idents", "the profile's identifiers"),
    ("profiles", "profile ordinal"),
    ("merges", "merge records naming the profile"),
    ("merged_into", "survivor prefix"),
    ("entries", "segment · profile"),
    (
        "changes",
        "feed entries naming the profile (and segment_log)",
    ),
    ("consents", "profile prefix (consent_key)"),
    (
        "webhooks",
        "queued deliveries and dead letters of the profile's changes (crate::webhooks)",
    ),
];

/// The keyspaces whose keys or values hold identifiers in clear (user ids, anonymous ids,
/// e-mail addresses): what an erasure rewrites ([`Store::purge`]). The others name people by
/// ordinal or keyed hash; event bodies are in the event log, overwritten in place.
pub const HOLDING_IDENTIFIERS: [&str; 5] = ["idents", "profiles", "merges", "quarantine", "qkeys"];

/// Keyspaces that hold nothing about a person by key (quarantine holds raw messages, which
/// erasure must search by identifier; audit and suppressed name people only by keyed hashes).
pub const GLOBAL: [&str; 9] = [
    "quarantine",
    "qkeys",
    "dict",
    "keys",
    "meta",
    "segments",
    "segment_log",
    "audit",
    "suppressed",
];

/// Options of a keyspace created by this build (an existing keyspace keeps the options it was
/// created with): LZ4 on every level's data blocks (fjall's default leaves the first two
/// levels uncompressed, where most of a young store's bytes are). `events` is only ever scanned
/// by prefix or range: no Bloom filters, and no index or filter blocks loaded at open (with
/// them, opening a store after a large import read every fresh table's blocks: 0.2 s at 10M
/// events, for a `segment list` that reads none of them).
fn keyspace_options(name: &str) -> KeyspaceCreateOptions {
    use fjall::config::{CompressionPolicy, FilterPolicy, PinningPolicy};
    let options = KeyspaceCreateOptions::default()
        .data_block_compression_policy(CompressionPolicy::all(fjall::CompressionType::Lz4));
    if name == "events" {
        options
            .filter_policy(FilterPolicy::disabled())
            .filter_block_pinning_policy(PinningPolicy::all(false))
            .index_block_pinning_policy(PinningPolicy::all(false))
    } else {
        options
    }
}

impl Store {
    /// Opens (or creates) the store under `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::builder(dir.join("store"))
            .open()
            .map_err(|error| match error {
                fjall::Error::Locked => StoreError::Locked {
                    dir: dir.display().to_string(),
                },
                other => StoreError::Engine(other),
            })?;
        Self::open_keyspaces(db, &dir.join("events"))
    }
}

/// A redo payload's item tags.
const REDO_INSERT: u8 = 1;
const REDO_REMOVE: u8 = 2;

impl Store {
    /// A batch as a redo record's payload (see [`crate::eventlog`]): for each item in order, a
    /// tag (insert or remove), the keyspace's name (u8 length), the key (u16 length) and for an
    /// insert the value (u32 length), little-endian.
    pub fn redo_payload(batch: &fjall::OwnedWriteBatch) -> Vec<u8> {
        let mut out = Vec::new();
        for (keyspace, key, value) in batch.items() {
            out.push(if value.is_some() {
                REDO_INSERT
            } else {
                REDO_REMOVE
            });
            out.push(keyspace.len() as u8);
            out.extend_from_slice(keyspace.as_bytes());
            out.extend_from_slice(&(key.len() as u16).to_le_bytes());
            out.extend_from_slice(key);
            if let Some(value) = value {
                out.extend_from_slice(&(value.len() as u32).to_le_bytes());
                out.extend_from_slice(value);
            }
        }
        out
    }

    /// Adds the log's end `end` to `batch` as [`HEAD_KEY`], with how far redo records are zeroed
    /// on disk as [`RETIRED_KEY`] (durable already: an open zeroes the redo records from there).
    ///
    /// [`HEAD_KEY`]: crate::eventlog::HEAD_KEY
    /// [`RETIRED_KEY`]: crate::eventlog::RETIRED_KEY
    pub fn commit_log_end(&self, batch: &mut fjall::OwnedWriteBatch, end: Position) {
        batch.insert(&self.meta, crate::eventlog::HEAD_KEY, end.encode());
        let retired = self.log.retired();
        batch.insert(&self.meta, crate::eventlog::RETIRED_KEY, retired.encode());
    }

    /// Replaces a profile's rows of `consents` in `batch` with the current state of `consents`
    /// (none for a profile merged away or removed); returns that state for the in-memory index.
    pub fn write_consents(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        profile: u32,
        consents: &crate::consent::Consents,
    ) -> Result<crate::consent::States, StoreError> {
        let states: crate::consent::States = consents
            .states()
            .into_iter()
            .map(|(purpose, change)| (purpose.to_string(), change.granted, change.at))
            .collect();
        for entry in self.consents.prefix(profile_key(profile)) {
            let key = entry.key()?;
            let (_, purpose) = consent_of(&key)?;
            if !states.iter().any(|(p, _, _)| p == purpose) {
                batch.remove(&self.consents, key.to_vec());
            }
        }
        for (purpose, granted, at) in &states {
            let mut value = vec![u8::from(*granted)];
            value.extend_from_slice(&at.to_be_bytes());
            batch.insert(&self.consents, consent_key(profile, purpose), value);
        }
        Ok(states)
    }

    /// Rewrites these keyspaces so that no earlier version of any record, and no tombstone, is
    /// left in any of their files (an erasure; call after [`Store::checkpoint`], which deletes
    /// the journals): a major compaction, then a flush of one tombstone for a key no record
    /// has, which installs a new version of the tree and lets fjall delete the files the
    /// compaction replaced (it keeps them while an older version is current).
    pub fn purge(&self, names: &[&str]) -> Result<(), StoreError> {
        for name in names {
            let keyspace = self.keyspace(name).ok_or_else(|| StoreError::Corrupt {
                keyspace: "meta",
                detail: format!("no keyspace {name}"),
            })?;
            keyspace.major_compact()?;
            keyspace.remove(PURGE_MARK)?;
            keyspace.rotate_memtable_and_wait()?;
        }
        Ok(())
    }

    /// Every profile's current consents: (profile, purpose, granted, when).
    pub fn read_consents(&self) -> Result<Vec<(u32, String, bool, i64)>, StoreError> {
        let mut out = Vec::new();
        for entry in self.consents.iter() {
            let (key, value) = entry.into_inner()?;
            let (profile, purpose) = consent_of(&key)?;
            let (granted, at) = match value.split_first() {
                Some((granted @ (0 | 1), at)) if at.len() == 8 => (
                    *granted == 1,
                    i64::from_be_bytes(at.try_into().expect("8 bytes")),
                ),
                _ => {
                    return Err(StoreError::Corrupt {
                        keyspace: "consents",
                        detail: format!("the value of profile {profile}'s {purpose:?}"),
                    });
                }
            };
            out.push((profile, purpose.to_string(), granted, at));
        }
        Ok(out)
    }

    /// The batch a redo payload holds, with the log's end after its record as [`HEAD_KEY`].
    ///
    /// [`HEAD_KEY`]: crate::eventlog::HEAD_KEY
    fn redo_batch(
        &self,
        payload: &[u8],
        end: Position,
    ) -> Result<fjall::OwnedWriteBatch, StoreError> {
        let bad = |detail: &str| StoreError::event_log(format!("a redo record {detail}"));
        let mut batch = self.db.batch();
        let mut rest = payload;
        let mut take = |n: usize| -> Result<&[u8], StoreError> {
            let (head, tail) = rest
                .split_at_checked(n)
                .ok_or_else(|| bad("is cut short"))?;
            rest = tail;
            Ok(head)
        };
        while let Ok(tag) = take(1) {
            let tag = tag[0];
            let name_len = take(1)?[0] as usize;
            let name =
                std::str::from_utf8(take(name_len)?).map_err(|_| bad("names no keyspace"))?;
            let keyspace = self.keyspace(name).ok_or_else(|| {
                bad(&format!(
                    "names the keyspace {name:?}, which does not exist"
                ))
            })?;
            let key_len = u16::from_le_bytes(take(2)?.try_into().expect("two bytes")) as usize;
            let key = take(key_len)?.to_vec();
            match tag {
                REDO_INSERT => {
                    let value_len =
                        u32::from_le_bytes(take(4)?.try_into().expect("four bytes")) as usize;
                    batch.insert(keyspace, key, take(value_len)?.to_vec());
                }
                REDO_REMOVE => batch.remove(keyspace, key),
                other => return Err(bad(&format!("holds an item of kind {other}"))),
            }
        }
        self.commit_log_end(&mut batch, end);
        Ok(batch)
    }

    /// Applies again the batches whose redo records the log found past the committed head (a
    /// power loss took fjall's journal entries of batches the log had synced), in order, then
    /// makes them durable in fjall and retires their records.
    fn redo(&self) -> Result<(), StoreError> {
        let found = self.log.take_redo();
        let Some(last) = found.last().map(|redo| redo.end) else {
            return Ok(());
        };
        for redo in &found {
            let mut batch = self.redo_batch(&redo.payload, redo.end)?;
            // A hot store snapshot taken before these batches does not hold them.
            batch.remove(&self.meta, SNAPSHOT_TOKEN_KEY);
            batch.commit()?;
        }
        self.db.persist(fjall::PersistMode::SyncAll)?;
        self.log.mark_committed(last);
        self.log.retire(last)?;
        self.log.sync()?;
        tracing::warn!(
            batches = found.len(),
            "batches the journal had lost were applied again from the event log"
        );
        Ok(())
    }

    /// Makes fjall's journal durable when redo records wait to be retired, then retires them:
    /// called off the acknowledgement path (the segment worker), so that the identifiers they
    /// hold stay in the log only briefly.
    pub fn retire_redo(&self) -> Result<(), StoreError> {
        let committed = self.log.committed();
        if !self.log.has_redo_through(committed) {
            return Ok(());
        }
        self.db.persist(fjall::PersistMode::SyncAll)?;
        self.log.retire(committed)
    }

    /// Bytes on disk of each keyspace, by name.
    pub fn disk_space(&self) -> Vec<(&'static str, u64)> {
        let mut sizes: Vec<(&'static str, u64)> = Self::NAMES
            .iter()
            .zip(self.keyspaces())
            .map(|(name, keyspace)| (*name, keyspace.disk_space()))
            .collect();
        sizes.push(("event_log", self.log.disk_space()));
        sizes
    }

    /// A batch whose commit syncs fjall's journal (for what is not also in the event log's
    /// redo records: removals, admin writes, the segment worker's memberships).
    pub fn synced_batch(&self) -> fjall::OwnedWriteBatch {
        self.db
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll))
    }

    /// Writes every memtable out to tables and deletes the journal they came from, so that
    /// the next open replays an empty journal (fjall seals a journal only past 64 MB, and an
    /// open reads through whatever the active one holds).
    pub fn checkpoint(&self) -> Result<(), StoreError> {
        self.log.sync()?;
        let committed = self.log.committed();
        // Sealing syncs the journal: every batch before it is durable from here on.
        self.db.rotate_journal()?;
        for keyspace in self.keyspaces() {
            keyspace.rotate_memtable_and_wait()?;
        }
        self.db.persist(fjall::PersistMode::SyncAll)?;
        self.db.evict_flushed_journals()?;
        self.log.retire(committed)?;
        self.log.sync()?;
        Ok(())
    }
}

/// The key [`Store::purge`] writes a tombstone for: no keyspace holds a record under it.
const PURGE_MARK: [u8; 3] = [0xff, 0xff, 0xfe];

/// Length of an event key.
pub const EVENT_KEY_LEN: usize = 20;

/// `survivor · merge id`, big-endian: a profile's merges are the keys under its
/// [`profile_key`].
pub fn merged_into_key(into: u32, merge: u64) -> [u8; 12] {
    let mut key = [0u8; 12];
    key[..4].copy_from_slice(&into.to_be_bytes());
    key[4..].copy_from_slice(&merge.to_be_bytes());
    key
}

/// `profile · time · seq`, big-endian, time with its sign bit flipped so keys sort by time.
pub fn event_key(profile: u32, ts_ms: i64, seq: u64) -> [u8; EVENT_KEY_LEN] {
    let mut key = [0u8; EVENT_KEY_LEN];
    key[..4].copy_from_slice(&profile.to_be_bytes());
    key[4..12].copy_from_slice(&((ts_ms as u64) ^ (1 << 63)).to_be_bytes());
    key[12..].copy_from_slice(&seq.to_be_bytes());
    key
}

/// Inverse of [`event_key`].
pub fn decode_event_key(key: &[u8]) -> Option<(u32, i64, u64)> {
    if key.len() != EVENT_KEY_LEN {
        return None;
    }
    let profile = u32::from_be_bytes(key[..4].try_into().ok()?);
    let ts = (u64::from_be_bytes(key[4..12].try_into().ok()?) ^ (1 << 63)) as i64;
    let seq = u64::from_be_bytes(key[12..].try_into().ok()?);
    Some((profile, ts, seq))
}

/// An `events` entry: where the event's body is in the event log, then its hot row.
#[derive(Debug, Clone)]
pub struct EventEntry {
    pub location: Location,
    pub record: HotRecord,
}

impl EventEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Location::ENCODED_LEN + HotRecord::LEN + 10);
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded entry to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.location.encode());
        self.record.encode_into(out);
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        Some(Self {
            location: Location::decode(bytes.get(..Location::ENCODED_LEN)?)?,
            record: HotRecord::decode(&bytes[Location::ENCODED_LEN..])?,
        })
    }
}

/// What the `hot` keyspace holds per event: the hot-store fields, the message-id hash, and
/// the other key properties the event has (index u8 and dictionary id u32 each), from which
/// property columns are built.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HotRecord {
    pub name: u16,
    pub flags: u8,
    pub kind: u8,
    pub key: u32,
    pub value: f32,
    pub message_hash: u64,
    pub others: OtherKeys,
}

impl HotRecord {
    /// Length without other keys.
    pub const LEN: usize = 20;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(Self::LEN + 10);
        self.encode_into(&mut out);
        out
    }

    /// Appends the encoded record to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.name.to_le_bytes());
        out.push(self.flags);
        out.push(self.kind);
        out.extend_from_slice(&self.key.to_le_bytes());
        out.extend_from_slice(&self.value.to_le_bytes());
        out.extend_from_slice(&self.message_hash.to_le_bytes());
        for (index, id) in self.others.iter() {
            out.push(index);
            out.extend_from_slice(&id.to_le_bytes());
        }
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() < Self::LEN || !(bytes.len() - Self::LEN).is_multiple_of(5) {
            return None;
        }
        let mut others = OtherKeys::default();
        for other in bytes[Self::LEN..].chunks_exact(5) {
            others.push(other[0], u32::from_le_bytes(other[1..].try_into().ok()?));
        }
        Some(Self {
            name: u16::from_le_bytes(bytes[..2].try_into().ok()?),
            flags: bytes[2],
            kind: bytes[3],
            key: u32::from_le_bytes(bytes[4..8].try_into().ok()?),
            value: f32::from_le_bytes(bytes[8..12].try_into().ok()?),
            message_hash: u64::from_le_bytes(bytes[12..20].try_into().ok()?),
            others,
        })
    }

    /// The hot-store event at `ts_ms`.
    pub fn to_hot(self, ts_ms: i64) -> HotEvent {
        HotEvent {
            ts: (ts_ms.div_euclid(1000)).clamp(0, i64::from(u32::MAX)) as u32,
            name: self.name,
            flags: self.flags,
            kind: self.kind,
            key: self.key,
            value: self.value,
        }
    }
}

/// The `meta` key of a segment's current size (u64, big-endian), written with every commit that
/// changes its membership (its JSON record is rewritten only when the segment is edited).
pub fn segment_size_key(segment: &str) -> Vec<u8> {
    let mut key = b"segment_size\0".to_vec();
    key.extend_from_slice(segment.as_bytes());
    key
}

/// `segment · 0 · profile`: a member's entry time in `entries`.
pub fn entry_key(segment: &str, profile: u32) -> Vec<u8> {
    let mut key = segment_prefix(segment);
    key.extend_from_slice(&profile.to_be_bytes());
    key
}

/// `segment · 0 · time · seq`: one change in a segment's history (`segment_log`).
pub fn segment_log_key(segment: &str, at: i64, seq: u64) -> Vec<u8> {
    let mut key = segment_prefix(segment);
    key.extend_from_slice(&((at as u64) ^ (1 << 63)).to_be_bytes());
    key.extend_from_slice(&seq.to_be_bytes());
    key
}

/// `segment · 0`: the prefix of a segment's keys in `entries` and `segment_log`.
pub fn segment_prefix(segment: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(segment.len() + 17);
    key.extend_from_slice(segment.as_bytes());
    key.push(0);
    key
}

/// Big-endian bytes of a profile ordinal (the prefix of its event keys).
pub fn profile_key(profile: u32) -> [u8; 4] {
    profile.to_be_bytes()
}

/// `consents` key: profile ordinal (big-endian) then the purpose's name; the value is one byte,
/// 1 granted, 0 withdrawn (the current state; the history is in the profile record).
pub fn consent_key(profile: u32, purpose: &str) -> Vec<u8> {
    let mut key = profile.to_be_bytes().to_vec();
    key.extend_from_slice(purpose.as_bytes());
    key
}

/// The profile and purpose of a `consents` key.
pub fn consent_of(key: &[u8]) -> Result<(u32, &str), StoreError> {
    let bad = || StoreError::Corrupt {
        keyspace: "consents",
        detail: "a key is not a profile and a purpose".into(),
    };
    let (profile, purpose) = key.split_first_chunk::<4>().ok_or_else(bad)?;
    let purpose = std::str::from_utf8(purpose).map_err(|_| bad())?;
    Ok((u32::from_be_bytes(*profile), purpose))
}

/// The (profile, time, seq) of an `events` or `hot` key.
pub(crate) fn key_of(keyspace: &'static str, key: &[u8]) -> Result<(u32, i64, u64), StoreError> {
    decode_event_key(key).ok_or_else(|| StoreError::Corrupt {
        keyspace,
        detail: "bad key".into(),
    })
}

/// An `events` entry.
pub(crate) fn entry_of(value: &[u8]) -> Result<EventEntry, StoreError> {
    EventEntry::decode(value).ok_or_else(|| StoreError::Corrupt {
        keyspace: "events",
        detail: "bad entry".into(),
    })
}

/// The fjall journals under the store `dir` that hold entries, which the next open replays.
/// fjall allocates a journal file whole and writes its entries from the start: a journal whose
/// first bytes are zeros is one an open reads nothing from.
#[cfg(test)]
pub(crate) fn journal_entries(dir: &Path) -> usize {
    use std::io::Read;
    let mut journals = 0;
    let mut with_entries = 0;
    for entry in std::fs::read_dir(dir.join("store")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|ext| ext == "jnl") {
            journals += 1;
            let mut start = [0u8; 4096];
            let read = std::fs::File::open(&path)
                .unwrap()
                .read(&mut start)
                .unwrap();
            with_entries += usize::from(start[..read].iter().any(|&b| b != 0));
        }
    }
    assert!(journals > 0, "no fjall journal under {}", dir.display());
    with_entries
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::journal_entries;

    #[test]
    fn event_keys_sort_by_profile_then_time() {
        let keys = [
            event_key(1, -5, 0),
            event_key(1, 0, 9),
            event_key(1, 1_700_000_000_000, 1),
            event_key(2, -1_000, 0),
        ];
        assert!(keys.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(decode_event_key(&keys[0]), Some((1, -5, 0)));
    }

    #[test]
    fn every_keyspace_is_either_per_profile_or_global() {
        let mut listed: Vec<&str> = PER_PROFILE.iter().map(|(name, _)| *name).collect();
        listed.extend(GLOBAL);
        for name in Store::NAMES {
            assert!(listed.contains(name), "keyspace {name} is in neither list");
        }
    }

    #[test]
    fn a_checkpoint_leaves_no_journal_to_replay() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 0u32..1_000 {
                store.meta.insert(i.to_be_bytes(), vec![7u8; 100]).unwrap();
            }
            store.checkpoint().unwrap();
            assert_eq!(journal_entries(dir.path()), 0);
            // Written again after the checkpoint: in the new journal, replayed at the next open.
            store.meta.insert(b"after", b"yes").unwrap();
            assert!(journal_entries(dir.path()) > 0);
            store.checkpoint().unwrap();
            assert_eq!(journal_entries(dir.path()), 0);
            // Nothing written since: a checkpoint has nothing to seal.
            store.checkpoint().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.meta.len().unwrap(), 1_001);
        assert_eq!(
            store.meta.get(b"after").unwrap().as_deref(),
            Some(&b"yes"[..])
        );
        assert_eq!(journal_entries(dir.path()), 0);
    }

    /// Checkpoints beside a writer: none hangs, none loses a write (sealing the journal while
    /// a batch commits must leave it either in the sealed journal, flushed, or in the new one).
    #[test]
    fn checkpoints_beside_a_writer_lose_nothing_and_never_hang() {
        let dir = tempfile::tempdir().unwrap();
        let written = 4_000u32;
        {
            let store = std::sync::Arc::new(Store::open(dir.path()).unwrap());
            let (done, finished) = std::sync::mpsc::channel();
            let writer = {
                let store = store.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    for i in 0..written {
                        store.meta.insert(i.to_be_bytes(), vec![1u8; 200]).unwrap();
                    }
                    done.send("writer").unwrap();
                })
            };
            let checkpointer = {
                let store = store.clone();
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        store.checkpoint().unwrap();
                    }
                    done.send("checkpointer").unwrap();
                })
            };
            for _ in 0..2 {
                finished
                    .recv_timeout(std::time::Duration::from_secs(60))
                    .expect("a writer or a checkpoint hung");
            }
            writer.join().unwrap();
            checkpointer.join().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        for i in 0..written {
            assert!(
                store.meta.contains_key(i.to_be_bytes()).unwrap(),
                "key {i} lost"
            );
        }
    }

    #[test]
    fn hot_record_round_trips() {
        let record = HotRecord {
            name: 7,
            flags: 2,
            kind: 0,
            key: 99,
            value: 1.5,
            message_hash: 42,
            others: OtherKeys::default(),
        };
        assert_eq!(HotRecord::decode(&record.encode()), Some(record));
        let mut others = OtherKeys::default();
        others.push(4, 12);
        others.push(5, crate::hot::NOT_TEXT);
        let record = HotRecord { others, ..record };
        assert_eq!(record.encode().len(), 30);
        assert_eq!(HotRecord::decode(&record.encode()), Some(record));
        assert_eq!(HotRecord::decode(&record.encode()[..29]), None);
    }
}
