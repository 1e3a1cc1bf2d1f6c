//! The event log: every accepted event's body, written once, appended to segment files of our
//! own framing, never rewritten by compaction. The `events` keyspace indexes it: its key is
//! `profile · time · seq` (as before) and its value a [`Location`] here (12 bytes), so a merge or
//! an unmerge moves index entries and never copies a body.
//!
//! Files: `DATA/events/NNNNNNNN.events`, each up to [`SEGMENT_BYTES`] (a record is never split).
//! A record is `u32 length · u32 CRC-32 of the body · body` (little-endian), the body being a
//! message in [`crate::codec`]'s binary form, packed by [`crate::packing`] once the log has a
//! dictionary. `DATA/events/dict-NNN.zstd` are those dictionaries.
//!
//! A **redo record** has the top bit of its length set ([`REDO`]): its body is not an event but
//! a whole fjall batch (every key written or removed, [`crate::store::Store::redo_payload`]).
//!
//! **Durability.** The writer appends a batch's bodies, then its redo record, syncs the log
//! (the one sync an acknowledgement waits for), then commits the fjall batch, which holds the
//! bodies' index entries and the new [`Position`] of the log's end (the meta key [`HEAD_KEY`]),
//! without syncing fjall's journal, and only then acknowledges. So every location an index entry
//! holds points at bytes synced before the entry was committed, and a batch whose journal entry
//! a power loss took is still in the log: [`EventLog::open`] scans past the committed head and
//! keeps every redo record it finds whole ([`EventLog::take_redo`]), which the store applies again
//! before anything reads it. Bytes past the last whole redo record belong to a batch that never
//! committed (a crash before the log's sync ended, or a failed commit): they are cut off. A
//! segment shorter than the committed head is real corruption and is refused.
//!
//! Once fjall has synced its journal past a batch ([`EventLog::committed`] read before a sync
//! of fjall's journal), its redo record is no longer needed: [`EventLog::retire`] zeroes its
//! body, which holds identifiers (the header stays, so that scans step over it). How far the
//! zeroing is durable ([`EventLog::retired`]) is committed with each batch as [`RETIRED_KEY`]:
//! an open zeroes every redo record between it and the committed head, those a crash left
//! unretired (without it, an old store's, the whole log is scanned once).
//!
//! **Erasure.** [`EventLog::erase`] overwrites a record's body with zeros in place (the file is
//! not rewritten): once its index entry is gone, nothing of it is left to read.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::error::StoreError;
use crate::lock::{Level, OrderedMutex, OrderedRwLock};
use crate::packing::Packer;

/// The meta key holding the log's committed end.
pub const HEAD_KEY: &str = "event_log_head";

/// The meta key holding how many compression dictionaries the committed records may use (a
/// byte), committed with [`HEAD_KEY`]: an open that finds fewer files refuses, naming the
/// missing one, instead of training another under the same id.
pub const DICTIONARIES_KEY: &str = "event_log_dictionaries";

/// The meta key holding the [`Position`] before which every redo record is zeroed on disk
/// ([`EventLog::retired`]).
pub const RETIRED_KEY: &str = "event_log_retired";

/// Largest segment file (a record that would cross it starts the next segment).
pub const SEGMENT_BYTES: u64 = 256 << 20;

const HEADER: usize = 8;

/// The flag, in a record's length, of a redo record.
pub const REDO: u32 = 1 << 31;

/// A redo record found past the committed head at open: the batch it holds, where it is, and
/// the log's end just after it (the head its batch committed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redo {
    pub payload: Vec<u8>,
    pub location: Location,
    pub end: Position,
}

/// Where a record is: its segment, the offset of its header, and its body's length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub segment: u32,
    pub offset: u32,
    pub len: u32,
}

impl Location {
    pub const ENCODED_LEN: usize = 12;

    pub fn encode(self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..4].copy_from_slice(&self.segment.to_be_bytes());
        out[4..8].copy_from_slice(&self.offset.to_be_bytes());
        out[8..].copy_from_slice(&self.len.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; Self::ENCODED_LEN] = bytes.try_into().ok()?;
        Some(Self {
            segment: u32::from_be_bytes(bytes[..4].try_into().ok()?),
            offset: u32::from_be_bytes(bytes[4..8].try_into().ok()?),
            len: u32::from_be_bytes(bytes[8..].try_into().ok()?),
        })
    }
}

/// The end of the log: the segment being appended to and its length (ordered as the log is).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, PartialOrd, Ord)]
pub struct Position {
    pub segment: u32,
    pub offset: u64,
}

impl Position {
    pub fn encode(self) -> [u8; 12] {
        let mut out = [0u8; 12];
        out[..4].copy_from_slice(&self.segment.to_be_bytes());
        out[4..].copy_from_slice(&self.offset.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let bytes: &[u8; 12] = bytes.try_into().ok()?;
        Some(Self {
            segment: u32::from_be_bytes(bytes[..4].try_into().ok()?),
            offset: u64::from_be_bytes(bytes[4..].try_into().ok()?),
        })
    }
}

/// A record found by a scan: where it is, and its body unless it fails its checksum.
pub type Record = (Location, Option<Vec<u8>>);

struct Inner {
    head: Position,
    /// Segments written since the last sync, and whether a segment was created since.
    unsynced: Vec<u32>,
    created: bool,
    /// Records being appended (kept between appends for its capacity).
    buffer: Vec<u8>,
    /// Redo records not retired yet, with the log's end after each, in log order.
    redo: std::collections::VecDeque<(Location, Position)>,
    /// The end of the last batch committed to fjall ([`EventLog::committed`]).
    committed: Position,
    /// Redo records found at open, until [`EventLog::take_redo`].
    found: Vec<Redo>,
}

/// The open event log (see the module documentation).
pub struct EventLog {
    dir: PathBuf,
    packer: Arc<Packer>,
    segment_bytes: u64,
    inner: OrderedMutex<Inner>,
    /// Held for a whole sync: how far redo records were zeroed when the last finished sync
    /// began, so on disk ([`EventLog::retired`]).
    synced: OrderedMutex<Position>,
    /// Open segments by id. Readers clone a handle under the read lock and read without it, so
    /// a read never waits for an append's write nor holds one up (an append takes this lock
    /// for writing only to add a segment). Background readers run at the lowest priority:
    /// sharing `inner` with the writer let one preempted while holding it stall the writer.
    files: OrderedRwLock<Vec<Option<Arc<File>>>>,
}

impl EventLog {
    /// Opens the log in `dir` at its committed end `head` (`None`: nothing committed yet),
    /// cutting off what lies past it, and zeroing the redo records between `retired` (the
    /// committed [`RETIRED_KEY`]; `None`: unknown, from the log's start) and `head`.
    pub fn open(
        dir: &Path,
        head: Option<Position>,
        retired: Option<Position>,
    ) -> Result<Self, StoreError> {
        Self::open_with(dir, head, retired, SEGMENT_BYTES)
    }

    pub(crate) fn open_with(
        dir: &Path,
        head: Option<Position>,
        retired: Option<Position>,
        segment_bytes: u64,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::io(dir, e))?;
        let head = head.unwrap_or_default();
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))? {
            let entry = entry.map_err(|e| StoreError::io(dir, e))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".events"))
                .and_then(|n| n.parse::<u32>().ok())
            else {
                continue;
            };
            found.push(id);
        }
        found.sort_unstable();
        let committed = head;
        let stale = zero_stale_redo(dir, &found, retired.unwrap_or_default().min(head), head)?;
        if stale > 0 {
            tracing::warn!(
                records = stale,
                "redo records a crash left unretired were zeroed"
            );
        }
        let (head, redo) = scan_redo(dir, &found, head)?;
        // Before anything is cut: later segments may hold acknowledged redo records.
        if head.offset > 0 && !found.contains(&head.segment) {
            return Err(StoreError::event_log(format!(
                "{} is missing: the store committed {} bytes in it",
                segment_path(dir, head.segment).display(),
                head.offset
            )));
        }
        let mut files: Vec<Option<Arc<File>>> = Vec::new();
        let mut cut = false;
        for id in found {
            let path = segment_path(dir, id);
            if id > head.segment {
                // Written by a batch that never committed.
                std::fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
                cut = true;
                continue;
            }
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| StoreError::io(&path, e))?;
            if id == head.segment {
                let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
                if len < head.offset {
                    return Err(StoreError::event_log(format!(
                        "{} holds {len} bytes, the store committed {}: events are missing",
                        path.display(),
                        head.offset
                    )));
                }
                if len > head.offset {
                    file.set_len(head.offset)
                        .map_err(|e| StoreError::io(&path, e))?;
                    file.sync_all().map_err(|e| StoreError::io(&path, e))?;
                }
            }
            if files.len() <= id as usize {
                files.resize(id as usize + 1, None);
            }
            files[id as usize] = Some(Arc::new(file));
        }
        let log = Self {
            packer: Arc::new(Packer::open(dir)?),
            dir: dir.to_path_buf(),
            segment_bytes,
            inner: OrderedMutex::new(
                Level::EventLog,
                Inner {
                    head,
                    unsynced: Vec::new(),
                    created: cut,
                    buffer: Vec::new(),
                    redo: redo.iter().map(|r| (r.location, r.end)).collect(),
                    committed,
                    found: redo,
                },
            ),
            // `zero_stale_redo` synced what it zeroed.
            synced: OrderedMutex::new(Level::EventLogSync, committed),
            files: OrderedRwLock::new(Level::EventLogFiles, files),
        };
        {
            let mut inner = log.inner.lock();
            if log.file(head.segment).is_none() {
                log.create_segment(&mut inner, head.segment)?;
            }
        }
        if cut {
            log.sync()?;
        }
        Ok(log)
    }

    fn create_segment(&self, inner: &mut Inner, id: u32) -> Result<Arc<File>, StoreError> {
        let path = segment_path(&self.dir, id);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| StoreError::io(&path, e))?;
        let file = Arc::new(file);
        {
            let mut files = self.files.write();
            if files.len() <= id as usize {
                files.resize(id as usize + 1, None);
            }
            files[id as usize] = Some(Arc::clone(&file));
        }
        inner.created = true;
        Ok(file)
    }

    /// Appends one record per body; returns their locations and the log's new end. Not yet
    /// durable: call [`EventLog::sync`] before committing anything that points at them.
    pub fn append<'b>(
        &self,
        bodies: impl IntoIterator<Item = &'b [u8]>,
    ) -> Result<(Vec<Location>, Position), StoreError> {
        self.append_records(&mut self.inner.lock(), bodies, 0)
    }

    /// Appends one record per body, `flag` set in each length ([`REDO`] or nothing).
    fn append_records<'b>(
        &self,
        inner: &mut Inner,
        bodies: impl IntoIterator<Item = &'b [u8]>,
        flag: u32,
    ) -> Result<(Vec<Location>, Position), StoreError> {
        let mut locations = Vec::new();
        let mut buffer = std::mem::take(&mut inner.buffer);
        buffer.clear();
        let mut start = inner.head;
        for body in bodies {
            let len = u32::try_from(body.len())
                .ok()
                .filter(|len| len & REDO == 0)
                .ok_or_else(|| {
                    StoreError::event_log(format!("a record of {} bytes", body.len()))
                })?;
            let record = (HEADER + body.len()) as u64;
            let offset = start.offset + buffer.len() as u64;
            if offset > 0 && offset + record > self.segment_bytes {
                self.write_at(inner, start, &buffer)?;
                buffer.clear();
                let next = inner.head.segment + 1;
                self.create_segment(inner, next)?;
                inner.head = Position {
                    segment: next,
                    offset: 0,
                };
                start = inner.head;
            }
            let offset = start.offset + buffer.len() as u64;
            locations.push(Location {
                segment: start.segment,
                offset: offset as u32,
                len,
            });
            buffer.extend_from_slice(&(len | flag).to_le_bytes());
            buffer.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
            buffer.extend_from_slice(body);
        }
        self.write_at(inner, start, &buffer)?;
        inner.buffer = buffer;
        Ok((locations, inner.head))
    }

    /// Appends one redo record (see the module documentation) holding `payload`; returns the
    /// log's new end, which the batch it describes must commit as [`HEAD_KEY`].
    pub fn append_redo(&self, payload: &[u8]) -> Result<Position, StoreError> {
        let mut inner = self.inner.lock();
        let (locations, end) = self.append_records(&mut inner, [payload], REDO)?;
        inner.redo.push_back((locations[0], end));
        Ok(end)
    }

    /// Notes that the batch ending at `end` committed to fjall.
    pub fn mark_committed(&self, end: Position) {
        let mut inner = self.inner.lock();
        inner.committed = inner.committed.max(end);
    }

    /// The end of the last batch committed to fjall: once fjall's journal is synced after this
    /// was read, every redo record up to it can be [`EventLog::retire`]d.
    pub fn committed(&self) -> Position {
        self.inner.lock().committed
    }

    /// Whether a redo record up to `through` is still to be retired.
    pub fn has_redo_through(&self, through: Position) -> bool {
        self.inner
            .lock()
            .redo
            .front()
            .is_some_and(|(_, end)| *end <= through)
    }

    /// Zeroes the bodies of the redo records that end at or before `through` (their batches are
    /// durable in fjall); durable with the next [`EventLog::sync`].
    pub fn retire(&self, through: Position) -> Result<(), StoreError> {
        let mut inner = self.inner.lock();
        while let Some(&(location, end)) = inner.redo.front() {
            if end > through {
                break;
            }
            self.zero_body(&mut inner, location)?;
            // Dequeued once zeroed: a failed write leaves it for the next retire.
            inner.redo.pop_front();
        }
        Ok(())
    }

    /// The position before which every redo record is zeroed on disk (as of the last finished
    /// [`EventLog::sync`]): what a batch commits as [`RETIRED_KEY`].
    pub fn retired(&self) -> Position {
        *self.synced.lock()
    }

    /// The redo records found past the committed head at open, in log order (once).
    pub fn take_redo(&self) -> Vec<Redo> {
        std::mem::take(&mut self.inner.lock().found)
    }

    fn write_at(&self, inner: &mut Inner, at: Position, bytes: &[u8]) -> Result<(), StoreError> {
        if bytes.is_empty() {
            return Ok(());
        }
        let file = self
            .file(at.segment)
            .ok_or_else(|| StoreError::event_log(format!("segment {} is not open", at.segment)))?;
        file.write_all_at(bytes, at.offset)
            .map_err(|e| StoreError::io(&segment_path(&self.dir, at.segment), e))?;
        inner.head = Position {
            segment: at.segment,
            offset: at.offset + bytes.len() as u64,
        };
        if !inner.unsynced.contains(&at.segment) {
            inner.unsynced.push(at.segment);
        }
        Ok(())
    }

    /// Makes everything appended so far durable (the segments written, and the directory when
    /// a segment was created or removed).
    pub fn sync(&self) -> Result<(), StoreError> {
        // One sync at a time: a second one that found nothing left to sync must not return
        // before the first one's writes are on disk (an acknowledgement waits on it).
        let mut synced = self.synced.lock();
        let (files, created, retired) = {
            let mut inner = self.inner.lock();
            let ids = std::mem::take(&mut inner.unsynced);
            let files: Vec<(u32, Arc<File>)> = ids
                .into_iter()
                .filter_map(|id| self.file(id).map(|f| (id, f)))
                .collect();
            // Every redo record before the first one left to retire is zeroed (the open zeroed
            // those before it; the others were dequeued once zeroed), so before the end when
            // none is left.
            let retired = match inner.redo.front() {
                Some((location, _)) => Position {
                    segment: location.segment,
                    offset: u64::from(location.offset),
                },
                None => inner.head,
            };
            (files, std::mem::take(&mut inner.created), retired)
        };
        for (id, file) in files {
            file.sync_data()
                .map_err(|e| StoreError::io(&segment_path(&self.dir, id), e))?;
        }
        if created {
            File::open(&self.dir)
                .and_then(|dir| dir.sync_all())
                .map_err(|e| StoreError::io(&self.dir, e))?;
        }
        *synced = (*synced).max(retired);
        Ok(())
    }

    /// How bodies are packed: [`Packer::pack`] a body before appending it.
    pub fn packer(&self) -> &Arc<Packer> {
        &self.packer
    }

    /// The codec body at `location`, checked against its CRC and unpacked.
    pub fn read(&self, location: Location) -> Result<Vec<u8>, StoreError> {
        let file = self.file(location.segment).ok_or_else(|| {
            StoreError::event_log(format!(
                "an index entry points into segment {}, which does not exist",
                location.segment
            ))
        })?;
        let mut record = vec![0u8; HEADER + location.len as usize];
        let path = || segment_path(&self.dir, location.segment);
        file.read_exact_at(&mut record, u64::from(location.offset))
            .map_err(|e| {
                StoreError::event_log(format!("{} at {}: {e}", path().display(), location.offset))
            })?;
        let len = u32::from_le_bytes(record[..4].try_into().expect("four bytes"));
        let crc = u32::from_le_bytes(record[4..8].try_into().expect("four bytes"));
        let body = record.split_off(HEADER);
        if len != location.len || crc32fast::hash(&body) != crc {
            return Err(StoreError::event_log(format!(
                "{} at {}: the record does not match its checksum",
                path().display(),
                location.offset
            )));
        }
        self.unpacked(body)
    }

    /// A stored body's codec form (the same bytes when it was not packed).
    fn unpacked(&self, stored: Vec<u8>) -> Result<Vec<u8>, StoreError> {
        let unpacked = match self.packer.unpack(&stored)? {
            std::borrow::Cow::Owned(body) => Some(body),
            std::borrow::Cow::Borrowed(_) => None,
        };
        Ok(unpacked.unwrap_or(stored))
    }

    /// Overwrites the body at `location` with zeros (see the module documentation); durable
    /// after the next [`EventLog::sync`].
    pub fn erase(&self, location: Location) -> Result<(), StoreError> {
        self.zero_body(&mut self.inner.lock(), location)
    }

    /// Overwrites a record's body with zeros (its header stays); durable after the next sync.
    fn zero_body(&self, inner: &mut Inner, location: Location) -> Result<(), StoreError> {
        let file = self.file(location.segment).ok_or_else(|| {
            StoreError::event_log(format!("segment {} does not exist", location.segment))
        })?;
        let zeros = vec![0u8; location.len as usize];
        file.write_all_at(&zeros, u64::from(location.offset) + HEADER as u64)
            .map_err(|e| StoreError::io(&segment_path(&self.dir, location.segment), e))?;
        if !inner.unsynced.contains(&location.segment) {
            inner.unsynced.push(location.segment);
        }
        Ok(())
    }

    /// Every record from `from` to `to`, in order: its location and its codec body, or `None` when
    /// the body does not match its checksum (an erased record).
    pub fn records_between(&self, from: Position, to: Position) -> Result<Vec<Record>, StoreError> {
        let mut records = Vec::new();
        for segment in from.segment..=to.segment {
            let Some(file) = self.file(segment) else {
                continue;
            };
            let path = segment_path(&self.dir, segment);
            let mut at = if segment == from.segment {
                from.offset
            } else {
                0
            };
            let end = if segment == to.segment {
                to.offset
            } else {
                file.metadata().map_err(|e| StoreError::io(&path, e))?.len()
            };
            while at + HEADER as u64 <= end {
                let (len, redo, crc) = read_header(&file, at, &path)?;
                if at + (HEADER as u64) + u64::from(len) > end {
                    return Err(StoreError::event_log(format!(
                        "{} at {at}: a record runs past the end",
                        path.display()
                    )));
                }
                if redo {
                    at += HEADER as u64 + u64::from(len);
                    continue;
                }
                let location = Location {
                    segment,
                    offset: at as u32,
                    len,
                };
                // The header is read already: the body once, checked against its CRC.
                let mut body = vec![0u8; len as usize];
                file.read_exact_at(&mut body, at + HEADER as u64)
                    .map_err(|e| StoreError::io(&path, e))?;
                let body = match crc32fast::hash(&body) == crc {
                    true => Some(self.unpacked(body)?),
                    false => None,
                };
                records.push((location, body));
                at += HEADER as u64 + u64::from(len);
            }
        }
        Ok(records)
    }

    /// The end of what was appended.
    pub fn head(&self) -> Position {
        self.inner.lock().head
    }

    /// Bytes on disk.
    pub fn disk_space(&self) -> u64 {
        let files: Vec<Arc<File>> = self.files.read().iter().flatten().cloned().collect();
        files
            .iter()
            .filter_map(|f| f.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

impl EventLog {
    /// A handle on segment `id`, if it is open.
    fn file(&self, id: u32) -> Option<Arc<File>> {
        self.files.read().get(id as usize).and_then(Clone::clone)
    }
}

/// Zeroes, and syncs, the body of every redo record whole on disk between `from` and `to`
/// (record ends both): those a crash left unretired. Returns how many there were. Reads the
/// headers sequentially (an old store's first open walks its whole log once).
fn zero_stale_redo(
    dir: &Path,
    found: &[u32],
    from: Position,
    to: Position,
) -> Result<usize, StoreError> {
    use std::io::{BufReader, Read, Seek};
    let mut zeroed = 0;
    for &segment in found
        .iter()
        .filter(|s| (from.segment..=to.segment).contains(*s))
    {
        let path = segment_path(dir, segment);
        let io = |e| StoreError::io(&path, e);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let start = if segment == from.segment {
            from.offset
        } else {
            0
        };
        let end = if segment == to.segment {
            to.offset.min(len)
        } else {
            len
        };
        let mut reader = BufReader::with_capacity(1 << 20, &file);
        reader.seek(std::io::SeekFrom::Start(start)).map_err(io)?;
        let mut stale = Vec::new();
        let mut at = start;
        while at + HEADER as u64 <= end {
            let mut header = [0u8; HEADER];
            reader.read_exact(&mut header).map_err(io)?;
            let (body_len, is_redo, crc) = decode_header(&header);
            if at + HEADER as u64 + u64::from(body_len) > end {
                break;
            }
            if is_redo {
                let mut body = vec![0u8; body_len as usize];
                reader.read_exact(&mut body).map_err(io)?;
                // A retired record's zeros fail its checksum: only whole ones are left over.
                if crc32fast::hash(&body) == crc {
                    stale.push((at + HEADER as u64, body_len));
                }
            } else {
                reader.seek_relative(i64::from(body_len)).map_err(io)?;
            }
            at += HEADER as u64 + u64::from(body_len);
        }
        drop(reader);
        for &(offset, body_len) in &stale {
            file.write_all_at(&vec![0u8; body_len as usize], offset)
                .map_err(io)?;
        }
        if !stale.is_empty() {
            file.sync_data().map_err(io)?;
        }
        zeroed += stale.len();
    }
    Ok(zeroed)
}

/// Reads the log past the committed `head`: every whole redo record, and the end of the last one
/// (the head to keep; `head` itself when there is none). Stops at the first record that is
/// empty, runs past its file or fails its checksum (a write the crash cut short), and at a
/// segment that does not end on a record's end.
fn scan_redo(
    dir: &Path,
    found: &[u32],
    head: Position,
) -> Result<(Position, Vec<Redo>), StoreError> {
    let mut redo = Vec::new();
    let mut kept = head;
    let mut segment = head.segment;
    let mut at = head.offset;
    'segments: while found.contains(&segment) {
        let path = segment_path(dir, segment);
        let file = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
        let len = file.metadata().map_err(|e| StoreError::io(&path, e))?.len();
        if len < at {
            // Shorter than the committed head: the open refuses it.
            break;
        }
        while at + HEADER as u64 <= len {
            let (body_len, is_redo, crc) = read_header(&file, at, &path)?;
            let end = at + HEADER as u64 + u64::from(body_len);
            // No record is empty: zeros are where the crash left a hole.
            if body_len == 0 || end > len {
                break 'segments;
            }
            let mut body = vec![0u8; body_len as usize];
            file.read_exact_at(&mut body, at + HEADER as u64)
                .map_err(|e| StoreError::io(&path, e))?;
            // Nothing past the committed head was erased or retired: a record that fails its
            // checksum there is a write the crash cut short, and so is all that follows.
            if crc32fast::hash(&body) != crc {
                break 'segments;
            }
            if is_redo {
                kept = Position {
                    segment,
                    offset: end,
                };
                redo.push(Redo {
                    payload: body,
                    location: Location {
                        segment,
                        offset: at as u32,
                        len: body_len,
                    },
                    end: kept,
                });
            }
            at = end;
        }
        // The next segment was begun only once this one was full to its last record.
        if at != len {
            break;
        }
        segment += 1;
        at = 0;
    }
    Ok((kept, redo))
}

/// The header of the record at `at`: its body's length, whether it is a redo record, and the
/// body's CRC.
fn read_header(file: &File, at: u64, path: &Path) -> Result<(u32, bool, u32), StoreError> {
    let mut header = [0u8; HEADER];
    file.read_exact_at(&mut header, at)
        .map_err(|e| StoreError::io(path, e))?;
    Ok(decode_header(&header))
}

/// A record's header: its body's length, whether it is a redo record, and the body's CRC.
fn decode_header(header: &[u8; HEADER]) -> (u32, bool, u32) {
    let flagged = u32::from_le_bytes(header[..4].try_into().expect("four bytes"));
    let crc = u32::from_le_bytes(header[4..].try_into().expect("four bytes"));
    (flagged & !REDO, flagged & REDO != 0, crc)
}

fn segment_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08}.events"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(n: usize, tag: &str) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| format!("{tag}-{i}-{}", "x".repeat(i % 50)).into_bytes())
            .collect()
    }

    #[test]
    fn appended_records_read_back_across_segments_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), None, None, 1000).unwrap();
        let first = bodies(100, "a");
        let (locations, head) = log.append(first.iter().map(Vec::as_slice)).unwrap();
        log.sync().unwrap();
        assert!(head.segment > 2, "small segments roll: {head:?}");
        for (location, body) in locations.iter().zip(&first) {
            assert_eq!(&log.read(*location).unwrap(), body);
        }
        drop(log);
        let log = EventLog::open_with(dir.path(), Some(head), None, 1000).unwrap();
        for (location, body) in locations.iter().zip(&first) {
            assert_eq!(&log.read(*location).unwrap(), body);
        }
        assert_eq!(log.head(), head);
    }

    /// What a batch appended but never committed is cut off at the next open, in the same
    /// segment and in segments it created.
    #[test]
    fn an_uncommitted_tail_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), None, None, 1000).unwrap();
        let (kept, head) = log
            .append(bodies(10, "k").iter().map(Vec::as_slice))
            .unwrap();
        log.append(bodies(200, "lost").iter().map(Vec::as_slice))
            .unwrap();
        log.sync().unwrap();
        assert!(log.head().segment > head.segment);
        drop(log);
        let log = EventLog::open_with(dir.path(), Some(head), None, 1000).unwrap();
        assert_eq!(log.head(), head);
        assert_eq!(log.read(kept[9]).unwrap(), bodies(10, "k")[9]);
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, head.segment as usize + 1);
        let (next, _) = log.append([b"after".as_slice()]).unwrap();
        assert_eq!(log.read(next[0]).unwrap(), b"after");
    }

    #[test]
    fn missing_bytes_and_damaged_records_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open_with(dir.path(), None, None, 1 << 20).unwrap();
        let (locations, head) = log.append([b"one".as_slice(), b"two"]).unwrap();
        log.sync().unwrap();
        drop(log);
        let ahead = Position {
            segment: head.segment,
            offset: head.offset + 1,
        };
        let error = EventLog::open_with(dir.path(), Some(ahead), None, 1 << 20)
            .err()
            .expect("a segment shorter than committed is refused")
            .to_string();
        assert!(
            error.contains("00000000.events") && error.contains("missing"),
            "{error}"
        );

        let path = dir.path().join("00000000.events");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[HEADER + 1] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let log = EventLog::open_with(dir.path(), Some(head), None, 1 << 20).unwrap();
        let error = log.read(locations[0]).unwrap_err().to_string();
        assert!(error.contains("checksum"), "{error}");
        assert_eq!(log.read(locations[1]).unwrap(), b"two");
    }

    #[test]
    fn erased_records_leave_no_byte_of_their_body() {
        let dir = tempfile::tempdir().unwrap();
        let log = EventLog::open(dir.path(), None, None).unwrap();
        let secret = b"jane.doe@example.com".as_slice();
        let (locations, _) = log.append([secret, b"kept"]).unwrap();
        log.erase(locations[0]).unwrap();
        log.sync().unwrap();
        let bytes = std::fs::read(dir.path().join("00000000.events")).unwrap();
        assert!(!bytes.windows(secret.len()).any(|w| w == secret));
        assert!(log.read(locations[0]).is_err());
        assert_eq!(log.read(locations[1]).unwrap(), b"kept");
    }

    /// One appender and three readers at once, bounded in time: every record read while
    /// appends go on is intact.
    #[test]
    fn readers_and_an_appender_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open_with(dir.path(), None, None, 64 << 10).unwrap());
        let written = Arc::new(parking_lot::Mutex::new(Vec::<(Location, Vec<u8>)>::new()));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        std::thread::scope(|scope| {
            let appender = {
                let (log, written) = (Arc::clone(&log), Arc::clone(&written));
                scope.spawn(move || {
                    for round in 0..300 {
                        let batch = bodies(20, &format!("r{round}"));
                        let (locations, _) = log.append(batch.iter().map(Vec::as_slice)).unwrap();
                        log.sync().unwrap();
                        written.lock().extend(locations.into_iter().zip(batch));
                        assert!(std::time::Instant::now() < deadline, "appends hang");
                    }
                })
            };
            for reader in 0..3 {
                let (log, written) = (Arc::clone(&log), Arc::clone(&written));
                scope.spawn(move || {
                    let mut i = reader;
                    while !appender_done(&written) {
                        let pick = {
                            let written = written.lock();
                            (!written.is_empty()).then(|| written[i % written.len()].clone())
                        };
                        if let Some((location, body)) = pick {
                            assert_eq!(log.read(location).unwrap(), body);
                        }
                        i += 7;
                        assert!(std::time::Instant::now() < deadline, "reads hang");
                    }
                });
            }
            appender.join().unwrap();
        });
        assert_eq!(written.lock().len(), 6000);
    }

    /// The writer appends bodies and redo records while the worker retires redo records and
    /// syncs (two syncs at once, neither hanging; the retired position never passes the end): no
    /// body is touched, every redo record is zeroed once retired, and a reopen at the last
    /// committed end finds none past it.
    #[test]
    fn an_appender_and_a_retirer_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(EventLog::open_with(dir.path(), None, None, 64 << 10).unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let done = std::sync::atomic::AtomicBool::new(false);
        let mut written = Vec::new();
        std::thread::scope(|scope| {
            let retirer = scope.spawn(|| {
                let mut retires = 0u32;
                while !done.load(std::sync::atomic::Ordering::Acquire) {
                    log.retire(log.committed()).unwrap();
                    // Beside the appender's syncs, as a checkpoint or an erasure syncs.
                    log.sync().unwrap();
                    assert!(log.retired() <= log.head());
                    retires += 1;
                    assert!(std::time::Instant::now() < deadline, "retires hang");
                }
                retires
            });
            for round in 0..300 {
                let batch = bodies(10, &format!("r{round}"));
                let (locations, _) = log.append(batch.iter().map(Vec::as_slice)).unwrap();
                let end = log
                    .append_redo(format!("redo-secret-{round}").as_bytes())
                    .unwrap();
                log.sync().unwrap();
                log.mark_committed(end);
                written.extend(locations.into_iter().zip(batch));
                assert!(std::time::Instant::now() < deadline, "appends hang");
            }
            done.store(true, std::sync::atomic::Ordering::Release);
            assert!(retirer.join().unwrap() > 0);
        });
        log.retire(log.committed()).unwrap();
        log.sync().unwrap();
        assert!(!log.has_redo_through(log.committed()));
        assert_eq!(log.retired(), log.committed());
        for (location, body) in &written {
            assert_eq!(&log.read(*location).unwrap(), body);
        }
        let head = log.committed();
        drop(log);
        let mut bytes = Vec::new();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            bytes.extend(std::fs::read(entry.unwrap().path()).unwrap());
        }
        assert!(
            !bytes.windows(11).any(|w| w == b"redo-secret"),
            "a redo record was left"
        );
        assert!(bytes.windows(4).any(|w| w == b"r299"), "bodies stay");
        let log = EventLog::open_with(dir.path(), Some(head), None, 64 << 10).unwrap();
        assert!(log.take_redo().is_empty());
        assert_eq!(log.head(), head);
        let records = log.records_between(Position::default(), head).unwrap();
        assert_eq!(records.len(), written.len(), "scans step over redo records");
    }

    /// A kill -9 after batches committed but before their redo records were retired: the next
    /// open zeroes them (from the committed `retired` position, or from the log's start when
    /// none was committed), bodies untouched, and what was retired already stays retired.
    #[test]
    fn redo_records_a_crash_left_unretired_are_zeroed_at_open() {
        for known in [true, false] {
            let dir = tempfile::tempdir().unwrap();
            let log = EventLog::open_with(dir.path(), None, None, 4 << 10).unwrap();
            let mut written = Vec::new();
            for round in 0..40 {
                let batch = bodies(5, &format!("b{round}"));
                let (locations, _) = log.append(batch.iter().map(Vec::as_slice)).unwrap();
                let end = log
                    .append_redo(format!("crash-secret-{round:03}").as_bytes())
                    .unwrap();
                log.sync().unwrap();
                log.mark_committed(end);
                written.extend(locations.into_iter().zip(batch));
                if round == 10 {
                    log.retire(log.committed()).unwrap();
                    log.sync().unwrap();
                    assert_eq!(log.retired(), end, "none left: retired through the end");
                }
            }
            let head = log.committed();
            // Round 11's redo record is the first one left: retired up to its start.
            let retired = log.retired();
            assert!(retired < head, "{retired:?}");
            drop(log);
            let secrets = || {
                let mut found = std::collections::BTreeSet::new();
                for entry in std::fs::read_dir(dir.path()).unwrap() {
                    let bytes = std::fs::read(entry.unwrap().path()).unwrap();
                    for round in 0..40 {
                        let secret = format!("crash-secret-{round:03}");
                        if bytes.windows(secret.len()).any(|w| w == secret.as_bytes()) {
                            found.insert(round);
                        }
                    }
                }
                found
            };
            let left: Vec<u32> = secrets().into_iter().collect();
            assert_eq!(left, (11..40).collect::<Vec<_>>(), "the crash left them");
            let known = known.then_some(retired);
            let log = EventLog::open_with(dir.path(), Some(head), known, 4 << 10).unwrap();
            assert!(secrets().is_empty(), "left after the open: {:?}", secrets());
            assert_eq!(log.retired(), head);
            assert!(log.take_redo().is_empty());
            for (location, body) in &written {
                assert_eq!(&log.read(*location).unwrap(), body);
            }
        }
    }

    /// Past the committed head, a redo record counts only when every record before it is whole:
    /// one behind a hole (zeros where a body should be) belonged to a batch whose sync never
    /// finished, and is cut off with it.
    #[test]
    fn a_redo_record_behind_a_hole_is_not_redone() {
        for hole in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let log = EventLog::open_with(dir.path(), None, None, 1 << 20).unwrap();
            let (kept, committed) = log.append([b"kept".as_slice()]).unwrap();
            // Its record is 24 bytes: zeros there read as three empty records, realigned on
            // the redo record, unless empty records end the scan.
            let (lost, _) = log.append([b"sixteen-byte-bod".as_slice()]).unwrap();
            let end = log.append_redo(b"the batch").unwrap();
            log.sync().unwrap();
            drop(log);
            if hole {
                let file = OpenOptions::new()
                    .write(true)
                    .open(segment_path(dir.path(), 0))
                    .unwrap();
                let zeros = vec![0u8; HEADER + lost[0].len as usize];
                file.write_all_at(&zeros, u64::from(lost[0].offset))
                    .unwrap();
            }
            let log = EventLog::open_with(dir.path(), Some(committed), None, 1 << 20).unwrap();
            let redo = log.take_redo();
            if hole {
                assert!(redo.is_empty(), "{redo:?}");
                assert_eq!(log.head(), committed);
            } else {
                assert_eq!(redo.len(), 1);
                assert_eq!(redo[0].payload, b"the batch");
                assert_eq!(log.head(), end);
                assert_eq!(log.read(lost[0]).unwrap(), b"sixteen-byte-bod");
            }
            assert_eq!(log.read(kept[0]).unwrap(), b"kept");
        }
    }

    fn appender_done(written: &parking_lot::Mutex<Vec<(Location, Vec<u8>)>>) -> bool {
        written.lock().len() >= 6000
    }
}
