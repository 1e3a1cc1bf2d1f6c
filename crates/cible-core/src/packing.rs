//! Event bodies as the event log stores them: [`crate::codec`]'s binary form, compressed with
//! zstd against a dictionary trained on this store's own messages. A body is about 140 bytes,
//! too small for a compressor to find repeats inside it; against a dictionary of what messages
//! share (property and context keys, event names, URLs, user agents) it shrinks about 2x, and
//! each record still reads, checks and erases alone.
//!
//! Stored form (the first byte tells them apart; a codec body starts with its version, 1):
//!
//! ```text
//! u8 2 · u8 flags · u8 dictionary id · varint length of the codec body · zstd frame
//! ```
//!
//! The frame is stored without its 4-byte magic number, content size, checksum or dictionary id (the log's CRC
//! covers the record). The anomaly flags sit at the codec's [`crate::codec::FLAGS_OFFSET`] in
//! both forms, so the writer sets them on either. Bodies written before a dictionary existed
//! stay in the codec form and read as they are.
//!
//! **The dictionary.** The first [`SAMPLE_TARGET`] bodies packed (at most [`PER_PERSON`] per
//! person) are kept as samples, then a dictionary is trained from them once, written to
//! `DATA/events/dict-NNN.zstd` and synced before any record uses it. **Samples keep what
//! describes events and software, not people:** messageId, userId, anonymousId, previousId,
//! groupId, the e-mail and every trait are removed; of the context only `library`,
//! `userAgent`, `locale`, `timezone`, `os`, `screen`, `app`, `campaign` and `page` stay (device
//! and advertising ids, location, ip, external ids go); properties and nested keys named like
//! personal data (name, email, phone, address, ip, token, id, ...) go; text with an `@` (or
//! `%40`) is cleared and URLs lose their query string. Free-form properties can still hold
//! anything: this is a careful filter, not a proof. With at most 16 samples per person among
//! 20,000, a 16 KiB dictionary keeps substrings many people share; erasure leaves it as it is.

use std::borrow::Cow;
use std::cell::RefCell;
use std::hash::{BuildHasher, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustc_hash::{FxBuildHasher, FxHashMap};
use serde_json::Value;
use zstd::zstd_safe::{self, CCtx, CDict, CParameter, DCtx, DDict};

use crate::error::StoreError;
use crate::lock::{Level, OrderedMutex, OrderedRwLock};

/// What every zstd frame starts with, left out of the stored form.
const MAGIC: [u8; 4] = 0xFD2F_B528_u32.to_le_bytes();
/// First byte of a packed body.
const PACKED: u8 = 2;
/// Samples kept before training.
pub const SAMPLE_TARGET: usize = 20_000;
/// Samples kept per person, so that no one's messages weigh on the dictionary.
pub const PER_PERSON: u8 = 16;
/// Longest codec body a packed record may claim (messages are at most 32 KiB of JSON).
const MAX_BODY: usize = 1 << 20;
/// Size of a trained dictionary (64 KiB packed the generated messages no tighter).
const DICT_BYTES: usize = 16 << 10;
/// zstd level. Measured on generated messages against one dictionary: -1 packs to 88 bytes in
/// 0.66 µs a body, 3 to 87 bytes in 0.93 µs, 5 to 84 bytes in 1.23 µs.
const LEVEL: i32 = -1;

/// A trained dictionary, digested for both directions.
struct Dictionary {
    id: u8,
    compress: CDict<'static>,
    decompress: DDict<'static>,
}

enum Sampler {
    Collecting {
        samples: Vec<Vec<u8>>,
        per_person: FxHashMap<u64, u8>,
    },
    /// Training, trained, or given up on (a failed training is logged; bodies stay unpacked).
    Done,
}

/// Packs and unpacks the log's bodies (see the module documentation).
pub struct Packer {
    dir: PathBuf,
    sample_target: usize,
    /// By id; the last one packs.
    dictionaries: OrderedRwLock<Vec<Arc<Dictionary>>>,
    sampler: OrderedMutex<Sampler>,
    /// How many dictionaries the store says its records may use (see [`Packer::to_record`]).
    recorded: std::sync::atomic::AtomicU8,
}

thread_local! {
    static COMPRESSOR: RefCell<CCtx<'static>> = RefCell::new(CCtx::create());
    static DECOMPRESSOR: RefCell<DCtx<'static>> = RefCell::new(DCtx::create());
}

fn dictionary_path(dir: &Path, id: u8) -> PathBuf {
    dir.join(format!("dict-{id:03}.zstd"))
}

impl Packer {
    /// Loads the dictionaries in `dir` (the event log's directory).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, SAMPLE_TARGET)
    }

    pub(crate) fn open_with(dir: &Path, sample_target: usize) -> Result<Self, StoreError> {
        let mut dictionaries = Vec::new();
        for id in 1..=u8::MAX {
            let path = dictionary_path(dir, id);
            match std::fs::read(&path) {
                Ok(bytes) => match Dictionary::new(id, &bytes) {
                    Some(dictionary) => dictionaries.push(Arc::new(dictionary)),
                    None => {
                        return Err(StoreError::event_log(format!(
                            "{} is not a zstd dictionary",
                            path.display()
                        )));
                    }
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => break,
                Err(e) => return Err(StoreError::io(&path, e)),
            }
        }
        let sampler = if dictionaries.is_empty() {
            Sampler::Collecting {
                samples: Vec::new(),
                per_person: FxHashMap::default(),
            }
        } else {
            Sampler::Done
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            sample_target,
            dictionaries: OrderedRwLock::new(Level::Dictionaries, dictionaries),
            sampler: OrderedMutex::new(Level::Dictionaries, sampler),
            recorded: std::sync::atomic::AtomicU8::new(0),
        })
    }

    /// Replaces a codec body with its packed form when a dictionary exists (a packed body is
    /// left as it is); until then, keeps a sample of it. Call it on parsing threads: it costs
    /// about a microsecond.
    pub fn pack(&self, body: &mut Vec<u8>) {
        if body.first() != Some(&crate::codec::VERSION) {
            return;
        }
        let dictionary = self.dictionaries.read().last().cloned();
        match dictionary {
            Some(dictionary) => {
                if let Some(packed) = dictionary.pack(body) {
                    *body = packed;
                }
            }
            None => self.sample(body),
        }
    }

    /// The codec body of a stored one.
    pub fn unpack<'a>(&self, stored: &'a [u8]) -> Result<Cow<'a, [u8]>, StoreError> {
        if stored.first() != Some(&PACKED) {
            return Ok(Cow::Borrowed(stored));
        }
        let bad = |what: &str| StoreError::event_log(format!("a packed event body {what}"));
        let (&flags, rest) = stored
            .get(1..)
            .and_then(<[u8]>::split_first)
            .ok_or_else(|| bad("is cut short"))?;
        let (&id, rest) = rest.split_first().ok_or_else(|| bad("is cut short"))?;
        let (len, frame) = varint(rest).ok_or_else(|| bad("has a bad length"))?;
        let dictionary = self
            .dictionaries
            .read()
            .get(usize::from(id).wrapping_sub(1))
            .cloned()
            .ok_or_else(|| bad(&format!("names dictionary {id}, which does not exist")))?;
        if len > MAX_BODY {
            return Err(bad("claims an impossible length"));
        }
        let mut out = Vec::with_capacity(len);
        DECOMPRESSOR.with(|d| -> Result<(), StoreError> {
            let mut d = d.borrow_mut();
            let zstd = |e: usize| {
                bad(&format!(
                    "does not decompress: {}",
                    zstd_safe::get_error_name(e)
                ))
            };
            d.reset(zstd_safe::ResetDirective::SessionAndParameters)
                .map_err(zstd)?;
            let mut whole = Vec::with_capacity(MAGIC.len() + frame.len());
            whole.extend_from_slice(&MAGIC);
            whole.extend_from_slice(frame);
            let decompressed = d
                .ref_ddict(&dictionary.decompress)
                .and_then(|_| d.decompress(&mut out, &whole));
            // Forget the dictionary whatever happened: the context outlives this borrow of it.
            let reset = d.reset(zstd_safe::ResetDirective::SessionAndParameters);
            decompressed.map_err(zstd)?;
            reset.map_err(zstd)?;
            Ok(())
        })?;
        if out.len() != len {
            return Err(bad("decompresses to the wrong length"));
        }
        if let Some(byte) = out.get_mut(crate::codec::FLAGS_OFFSET) {
            *byte = flags;
        }
        Ok(Cow::Owned(out))
    }

    /// Whether bodies are packed now.
    #[cfg(test)]
    pub(crate) fn trained(&self) -> bool {
        !self.dictionaries.read().is_empty()
    }

    /// How many dictionaries there are (records name them 1 to this).
    pub fn count(&self) -> u8 {
        self.dictionaries.read().len() as u8
    }

    /// Refuses when fewer dictionaries were found than committed records may use.
    pub fn expect(&self, committed: u8) -> Result<(), StoreError> {
        let found = self.count();
        if found < committed {
            return Err(StoreError::event_log(format!(
                "{} is missing: committed records were packed with it (restore it from a backup of the data directory)",
                dictionary_path(&self.dir, found + 1).display()
            )));
        }
        self.recorded
            .store(committed, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    /// The count a batch must commit because a dictionary was trained since the last one that
    /// did; `None` (nothing to write) otherwise. A batch that fails to commit poisons the
    /// engine, so counting it as recorded loses nothing.
    pub fn to_record(&self) -> Option<u8> {
        let count = self.count();
        let before = self
            .recorded
            .fetch_max(count, std::sync::atomic::Ordering::Relaxed);
        (count > before).then_some(count)
    }

    fn sample(&self, body: &[u8]) {
        let Ok(mut message) = crate::codec::decode(body) else {
            return;
        };
        let person = message
            .user_id
            .as_ref()
            .or(message.anonymous_id.as_ref())
            .map(|id| {
                let mut hasher = FxBuildHasher.build_hasher();
                hasher.write(id.as_bytes());
                hasher.finish()
            });
        strip_identifiers(&mut message);
        let samples = {
            let mut sampler = self.sampler.lock();
            let Sampler::Collecting {
                samples,
                per_person,
            } = &mut *sampler
            else {
                return;
            };
            if let Some(person) = person {
                let count = per_person.entry(person).or_default();
                if *count >= PER_PERSON {
                    return;
                }
                *count += 1;
            }
            samples.push(crate::codec::encode(&message));
            if samples.len() < self.sample_target {
                return;
            }
            let samples = std::mem::take(samples);
            *sampler = Sampler::Done;
            samples
        };
        if let Err(error) = self.train(&samples) {
            tracing::warn!(%error, "event bodies stay unpacked: no dictionary could be trained");
        }
    }

    /// Trains, writes and syncs a dictionary, then packs with it.
    fn train(&self, samples: &[Vec<u8>]) -> Result<(), StoreError> {
        let bytes = zstd::dict::from_samples(samples, DICT_BYTES)
            .map_err(|e| StoreError::io(&self.dir, e))?;
        let id = u8::try_from(self.dictionaries.read().len() + 1).map_err(|_| {
            StoreError::event_log("the event log has 255 dictionaries already".into())
        })?;
        // Digested before it is written: a file that is there always loads.
        let dictionary =
            Arc::new(Dictionary::new(id, &bytes).ok_or_else(|| {
                StoreError::event_log("a trained dictionary does not load".into())
            })?);
        let path = dictionary_path(&self.dir, id);
        let temporary = path.with_extension("tmp");
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&temporary)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&temporary, &path)?;
            std::fs::File::open(&self.dir)?.sync_all()
        };
        write().map_err(|e| StoreError::io(&path, e))?;
        self.dictionaries.write().push(dictionary);
        tracing::info!(
            id,
            samples = samples.len(),
            "event bodies are packed from now on"
        );
        Ok(())
    }
}

impl Dictionary {
    /// `None` when zstd cannot digest the bytes (a damaged file).
    fn new(id: u8, bytes: &[u8]) -> Option<Self> {
        Some(Self {
            id,
            compress: CDict::try_create(bytes, LEVEL)?,
            decompress: DDict::try_create(bytes)?,
        })
    }

    fn pack(&self, body: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(body.len() + 16);
        out.extend_from_slice(&[PACKED, *body.get(crate::codec::FLAGS_OFFSET)?, self.id]);
        put_varint(&mut out, body.len());
        let mut frame = Vec::with_capacity(zstd_safe::compress_bound(body.len()));
        COMPRESSOR
            .with(|c| -> zstd_safe::SafeResult {
                let mut c = c.borrow_mut();
                c.reset(zstd_safe::ResetDirective::SessionAndParameters)?;
                c.set_parameter(CParameter::ContentSizeFlag(false))?;
                c.set_parameter(CParameter::ChecksumFlag(false))?;
                c.set_parameter(CParameter::DictIdFlag(false))?;
                let written = c
                    .ref_cdict(&self.compress)
                    .and_then(|_| c.compress2(&mut frame, body));
                // Forget the dictionary whatever happened: the context outlives this borrow.
                c.reset(zstd_safe::ResetDirective::SessionAndParameters)?;
                written
            })
            .ok()?;
        out.extend_from_slice(frame.strip_prefix(&MAGIC)?);
        // A body that does not shrink is kept as it is.
        (out.len() < body.len()).then_some(out)
    }
}

/// Removes what could name a person (see the module documentation).
fn strip_identifiers(message: &mut crate::Message) {
    message.message_id.clear();
    message.user_id = None;
    message.anonymous_id = None;
    message.previous_id = None;
    message.group_id = None;
    message.email = None;
    message.traits.clear();
    // Of the context, only what describes the software and the page, not the person or the
    // device (ids, advertising ids, location, ip, traits, external ids are all dropped).
    message
        .context
        .retain(|key, _| CONTEXT_KEPT.contains(&key.as_str()));
    message.properties.retain(|key, _| !is_personal(key));
    for value in message
        .properties
        .values_mut()
        .chain(message.context.values_mut())
    {
        strip_free_text(value);
    }
}

/// The context keys a sample keeps.
const CONTEXT_KEPT: [&str; 9] = [
    "library",
    "userAgent",
    "locale",
    "timezone",
    "os",
    "screen",
    "app",
    "campaign",
    "page",
];

/// Property (or nested) keys that name personal data by their name.
fn is_personal(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["@", "email", "phone", "password", "token", "address"]
        .iter()
        .any(|part| key.contains(part))
        || [
            "name",
            "first_name",
            "last_name",
            "full_name",
            "firstname",
            "lastname",
            "username",
            "mail",
            "mobile",
            "street",
            "zip",
            "zipcode",
            "postal_code",
            "postcode",
            "birthday",
            "birthdate",
            "dob",
            "ip",
            "ssn",
            "iban",
            "card_number",
            "user_id",
            "userid",
            "anonymous_id",
            "device_id",
            "advertising_id",
            "customer_id",
        ]
        .contains(&key.as_str())
}

/// Clears text that may carry an address or a token: anything with an `@` (or `%40`), and
/// query strings of URLs; drops personal-looking keys in nested objects.
fn strip_free_text(value: &mut Value) {
    match value {
        Value::String(text) => {
            if text.contains('@') || text.to_ascii_lowercase().contains("%40") {
                text.clear();
            } else if let Some(at) = text.find(['?', '#']) {
                text.truncate(at);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_free_text),
        Value::Object(map) => {
            map.retain(|key, _| !is_personal(key));
            map.values_mut().for_each(strip_free_text);
        }
        _ => {}
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: usize) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn varint(bytes: &[u8]) -> Option<(usize, &[u8])> {
    let mut value = 0usize;
    for (i, &byte) in bytes.iter().enumerate().take(5) {
        value |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((value, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{ParseContext, parse_message_text};

    fn body(i: usize) -> Vec<u8> {
        let person = i % 500;
        let line = format!(
            r#"{{"type":"track","event":"Product Viewed","messageId":"m-{i}","userId":"user-{person}",
            "anonymousId":"anon-{person}-7f3a","timestamp":"2026-10-0{}T08:52:43.696Z",
            "properties":{{"category":"shoes","price":{}.5,"product_id":"P{:03}","url":"https://shop.example.com/p/{}?token=tok{person}x&e=a%40b","contact":"someone{person}@example.org","first_name":"Alice{person}"}},
            "context":{{"ip":"10.1.{}.{}","userAgent":"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36","library":{{"name":"analytics.js","version":"5.2.0"}},
                "device":{{"id":"dev-{person}-x","advertisingId":"adv-{person}"}},"location":{{"city":"Lyon-{person}"}}}},
            "traits":{{"name":"Person {person}"}}}}"#,
            1 + i % 9,
            i % 200,
            i % 120,
            i % 120,
            person / 200,
            person % 200,
        );
        let message = parse_message_text(&line, &ParseContext::at(1_795_000_000_000)).unwrap();
        crate::codec::encode(&message)
    }

    #[test]
    fn bodies_pack_after_training_and_unpack_to_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Packer::open_with(dir.path(), 1_000).unwrap();
        let mut raw_total = 0;
        let mut packed_total = 0;
        for i in 0..3_000 {
            let original = body(i);
            let mut stored = original.clone();
            stored[crate::codec::FLAGS_OFFSET] = (i % 7) as u8;
            let expected = stored.clone();
            packer.pack(&mut stored);
            assert_eq!(
                packer.unpack(&stored).unwrap().as_ref(),
                expected.as_slice()
            );
            if i >= 2_000 {
                assert_eq!(stored[0], PACKED, "body {i} is packed once trained");
                raw_total += original.len();
                packed_total += stored.len();
                // Packing twice changes nothing.
                let again = stored.clone();
                packer.pack(&mut stored);
                assert_eq!(stored, again);
            }
        }
        assert!(packer.trained());
        // The count is for one batch to commit, once.
        assert_eq!(packer.to_record(), Some(1));
        assert_eq!(packer.to_record(), None);
        // These bodies carry much per-person text (tokens, device ids) that no dictionary holds.
        assert!(
            packed_total * 10 < raw_total * 7,
            "{packed_total} bytes packed for {raw_total} raw"
        );
        // A reopened packer reads what the first one packed.
        let mut stored = body(4_000);
        let expected = stored.clone();
        packer.pack(&mut stored);
        let reopened = Packer::open_with(dir.path(), 1_000).unwrap();
        assert!(reopened.trained());
        assert_eq!(
            reopened.unpack(&stored).unwrap().as_ref(),
            expected.as_slice()
        );
    }

    #[test]
    fn a_dictionary_holds_no_identifier_of_anyone() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Packer::open_with(dir.path(), 1_000).unwrap();
        for i in 0..1_500 {
            packer.pack(&mut body(i));
        }
        let dictionary = std::fs::read(dictionary_path(dir.path(), 1)).unwrap();
        let text = String::from_utf8_lossy(&dictionary);
        assert!(text.contains("Product Viewed") || text.contains("shop.example.com"));
        for needle in [
            "user-",
            "anon-",
            "@example.org",
            "Person ",
            "10.1.",
            "m-1",
            "tok",
            "Alice",
            "dev-",
            "adv-",
            "Lyon-",
        ] {
            assert!(!text.contains(needle), "the dictionary holds {needle:?}");
        }
    }

    #[test]
    fn damaged_packed_bodies_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Packer::open_with(dir.path(), 1_000).unwrap();
        for i in 0..1_000 {
            packer.pack(&mut body(i));
        }
        let mut stored = body(1_001);
        packer.pack(&mut stored);
        assert_eq!(stored[0], PACKED);
        let mut wrong_dictionary = stored.clone();
        wrong_dictionary[2] = 9;
        let mut cut = stored.clone();
        cut.truncate(stored.len() / 2);
        let mut wrong_length = stored.clone();
        wrong_length[3] ^= 0x05;
        for (what, bytes) in [
            ("unknown dictionary", wrong_dictionary),
            ("cut short", cut),
            ("wrong length", wrong_length),
            ("header only", vec![PACKED, 0]),
        ] {
            assert!(packer.unpack(&bytes).is_err(), "{what}");
        }
    }

    #[test]
    fn packing_from_several_threads_while_training() {
        let dir = tempfile::tempdir().unwrap();
        let packer = Arc::new(Packer::open_with(dir.path(), 2_000).unwrap());
        let (done, finished) = std::sync::mpsc::channel();
        for t in 0..4 {
            let (packer, done) = (Arc::clone(&packer), done.clone());
            std::thread::spawn(move || {
                for i in 0..2_000 {
                    let original = body(t * 10_000 + i);
                    let mut stored = original.clone();
                    packer.pack(&mut stored);
                    assert_eq!(
                        packer.unpack(&stored).unwrap().as_ref(),
                        original.as_slice()
                    );
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("a packing thread finished in time (a hang or a panic otherwise)");
        }
        assert!(packer.trained());
        assert!(!dictionary_path(dir.path(), 2).exists(), "trained once");
    }
}
