//! A snapshot of the hot store and the dedup filter, written when a full engine closes and read
//! at the next open instead of scanning every `events` entry (the open's cost at scale).
//!
//! File `DATA/hot.snapshot`: `MAGIC · token u64 · payload length u64 · CRC-32 of the payload ·
//! payload` (little-endian), the payload being [`HotStore::encode_into`] followed by the
//! messageId hashes (count u64, then each u64).
//!
//! **Valid only with its token.** Closing (`Engine`'s drop: nothing can write any more) writes
//! the file (synced, renamed into place, the directory synced), then commits the file's random
//! token under [`TOKEN_KEY`] in `meta`. A full open that finds the key and a file with the same
//! token and a good CRC uses the file; either way it removes the key (synced) and then the file
//! before it accepts any write. So a snapshot exists only between a clean close and the next
//! full open, while the store holds exactly what it does (a light open writes nothing and
//! leaves both). After a crash there is no token, and the open scans the store. Anything that
//! does not match (another token, a damaged or missing file, other property columns) is not an
//! error: the open scans the store.

use std::io::Write;
use std::path::{Path, PathBuf};

use crate::hot::HotStore;
use crate::store::{Store, StoreError};

/// The `meta` key holding the token of the snapshot that matches the store.
pub const TOKEN_KEY: &str = crate::store::SNAPSHOT_TOKEN_KEY;

const MAGIC: &[u8; 8] = b"CIBLEHS1";
const HEADER: usize = 8 + 8 + 8 + 4;

/// Where the snapshot lives in a data directory.
pub fn path(data: &Path) -> PathBuf {
    data.join("hot.snapshot")
}

/// At a full open: the hot store and hashes of the snapshot, if the token in `meta` names it and
/// it is whole (see the module documentation). Either way the token is spent, before the file
/// is read (a file that makes an open fail is not tried twice), and the file is removed
/// (including one left by a crash before its token was committed): from here on the store may
/// change, and the file holds what an erasure may remove.
pub fn take(
    store: &Store,
    data: &Path,
    columns: &[u8],
    profiles: u32,
) -> Result<Option<(HotStore, Vec<u64>)>, StoreError> {
    let token = match store.meta.get(TOKEN_KEY)? {
        Some(bytes) => Some(u64::from_le_bytes(bytes.as_ref().try_into().map_err(
            |_| StoreError::Corrupt {
                keyspace: "meta",
                detail: format!("{TOKEN_KEY} is not a token"),
            },
        )?)),
        None => None,
    };
    if token.is_some() {
        let mut batch = store.synced_batch();
        batch.remove(&store.meta, TOKEN_KEY);
        batch.commit()?;
    }
    let loaded = token.and_then(|token| read(data, token, columns, profiles));
    remove(data)?;
    Ok(loaded)
}

/// At a clean close, once nothing can write any more: writes the snapshot, then commits its
/// token.
pub fn save(store: &Store, data: &Path, hot: &HotStore, hashes: &[u64]) -> Result<(), StoreError> {
    let token = rand::random::<u64>();
    write(data, token, hot, hashes)?;
    let mut batch = store.synced_batch();
    batch.insert(&store.meta, TOKEN_KEY, token.to_le_bytes());
    batch.commit()?;
    Ok(())
}

/// Removes the snapshot, if there is one.
fn remove(data: &Path) -> Result<(), StoreError> {
    let path = path(data);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(error) => Err(StoreError::io(&path, error)),
    }
}

/// Writes the snapshot of `hot` and `hashes` under `token` (synced, then renamed into place).
fn write(data: &Path, token: u64, hot: &HotStore, hashes: &[u64]) -> Result<(), StoreError> {
    write_file(data, token, hot, hashes).map_err(|e| StoreError::io(&path(data), e))
}

fn write_file(data: &Path, token: u64, hot: &HotStore, hashes: &[u64]) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let path = path(data);
    let temporary = path.with_extension("tmp");
    let mut file = std::fs::File::create(&temporary)?;
    // The payload streams out a megabyte at a time; the header, which needs its length and
    // CRC, goes in front once it is written.
    file.write_all(&[0; HEADER])?;
    let (mut length, mut crc) = (0u64, crc32fast::Hasher::new());
    let mut out = Vec::with_capacity(2 << 20);
    let mut flush = |out: &mut Vec<u8>| -> std::io::Result<()> {
        file.write_all(out)?;
        crc.update(out);
        length += out.len() as u64;
        out.clear();
        Ok(())
    };
    hot.encode(&mut out, &mut flush)?;
    out.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
    for chunk in hashes.chunks(1 << 17) {
        for hash in chunk {
            out.extend_from_slice(&hash.to_le_bytes());
        }
        flush(&mut out)?;
    }
    flush(&mut out)?;
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&token.to_le_bytes());
    header.extend_from_slice(&length.to_le_bytes());
    header.extend_from_slice(&crc.finalize().to_le_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_all()?;
    std::fs::rename(&temporary, &path)?;
    std::fs::File::open(data)?.sync_all()
}

/// Reads a snapshot's payload as it streams: bounded by the length the header gives, with the
/// CRC computed on the way.
struct Payload<R> {
    inner: R,
    left: u64,
    crc: crc32fast::Hasher,
    buffer: Vec<u8>,
}

impl<R: std::io::Read> crate::hot::SnapshotRead for Payload<R> {
    fn take(&mut self, n: usize) -> Option<&[u8]> {
        if n as u64 > self.left {
            return None;
        }
        self.buffer.resize(n, 0);
        self.inner.read_exact(&mut self.buffer).ok()?;
        self.left -= n as u64;
        self.crc.update(&self.buffer);
        Some(&self.buffer)
    }
}

/// The hot store and hashes of the snapshot in `data`, if it carries `token`, is whole, and
/// keeps the property columns `columns`.
fn read(data: &Path, token: u64, columns: &[u8], profiles: u32) -> Option<(HotStore, Vec<u64>)> {
    use crate::hot::SnapshotRead;
    use std::io::Read;
    let file = match std::fs::File::open(path(data)) {
        Ok(file) => file,
        Err(error) => {
            tracing::warn!(%error, "the hot store's snapshot cannot be read; scanning the store");
            return None;
        }
    };
    let size = file.metadata().ok()?.len();
    let mut file = std::io::BufReader::with_capacity(1 << 20, file);
    let mut header = [0u8; HEADER];
    file.read_exact(&mut header).ok()?;
    let number = |range: std::ops::Range<usize>| {
        u64::from_le_bytes(header[range].try_into().expect("8 bytes"))
    };
    let crc = u32::from_le_bytes(header[24..28].try_into().expect("4 bytes"));
    if &header[..8] != MAGIC || number(8..16) != token || number(16..24) + HEADER as u64 != size {
        tracing::warn!("the hot store's snapshot is not this store's; scanning the store");
        return None;
    }
    let mut payload = Payload {
        inner: file,
        left: number(16..24),
        crc: crc32fast::Hasher::new(),
        buffer: Vec::new(),
    };
    let decoded = (|| {
        let hot = HotStore::decode(&mut payload, profiles)?;
        let n = usize::try_from(payload.u64()?).ok()?;
        if (n as u64).checked_mul(8)? != payload.left {
            return None;
        }
        let mut hashes = Vec::with_capacity(n);
        for _ in 0..n {
            hashes.push(payload.u64()?);
        }
        Some((hot, hashes))
    })();
    let mut rest = [0u8; 1];
    let whole = decoded.is_some()
        && payload.left == 0
        && matches!(payload.inner.read(&mut rest), Ok(0))
        && payload.crc.clone().finalize() == crc;
    match decoded {
        Some((hot, hashes)) if whole && hot.columns() == columns => Some((hot, hashes)),
        _ => {
            tracing::warn!("the hot store's snapshot is damaged; scanning the store");
            None
        }
    }
}
