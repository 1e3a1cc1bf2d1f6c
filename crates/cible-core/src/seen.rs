//! The in-memory dedup filter: 64-bit hashes of every accepted messageId.
//!
//! It only says "maybe seen": a hit is confirmed against the `msgids` keyspace, so a hash
//! collision can never drop a message. Hashes loaded at start sit in a sorted vector (8 bytes
//! each, built with one parallel sort); hashes added since sit in a hash set that is folded into
//! the vector when it grows past an eighth of it.
//!
//! A lookup in the vector first reads where the hashes starting with its top bits begin (a
//! radix index, 2 to 4 bytes per hash), then searches the few hashes there: two or three
//! cache misses per message instead of the twenty-odd of a binary search over millions.

use rayon::prelude::*;
use rustc_hash::FxHashSet;

#[derive(Debug, Default)]
pub struct SeenSet {
    base: Vec<u64>,
    /// `starts[p]`: the position in `base` of the first hash whose top `bits` bits are `p` or
    /// more (`2^bits + 1` entries; empty while `base` is).
    starts: Vec<u32>,
    bits: u32,
    recent: FxHashSet<u64>,
}

impl SeenSet {
    /// Builds the set from unsorted hashes.
    pub fn from_hashes(mut hashes: Vec<u64>) -> Self {
        hashes.par_sort_unstable();
        hashes.dedup();
        let mut seen = Self {
            base: hashes,
            ..Self::default()
        };
        seen.index();
        seen
    }

    /// About two hashes per radix bucket: `bits` grows with the set, up to 2^24 buckets.
    fn index(&mut self) {
        self.starts.clear();
        if self.base.is_empty() {
            self.bits = 0;
            return;
        }
        self.bits = (usize::BITS - (self.base.len() / 2).leading_zeros()).min(24);
        let buckets = 1usize << self.bits;
        self.starts.reserve(buckets + 1);
        let mut at = 0;
        for bucket in 0..buckets {
            while at < self.base.len() && self.bucket(self.base[at]) < bucket {
                at += 1;
            }
            self.starts.push(at as u32);
        }
        self.starts.push(self.base.len() as u32);
    }

    fn bucket(&self, hash: u64) -> usize {
        hash.checked_shr(64 - self.bits).unwrap_or(0) as usize
    }

    pub fn contains(&self, hash: u64) -> bool {
        if self.recent.contains(&hash) {
            return true;
        }
        if self.starts.is_empty() {
            return false;
        }
        let bucket = self.bucket(hash);
        let (from, to) = (
            self.starts[bucket] as usize,
            self.starts[bucket + 1] as usize,
        );
        self.base[from..to].binary_search(&hash).is_ok()
    }

    pub fn insert(&mut self, hash: u64) {
        self.recent.insert(hash);
        if self.recent.len() > 1_000_000 && self.recent.len() > self.base.len() / 8 {
            self.fold();
        }
    }

    /// Forgets hashes (their messages were removed from the store).
    pub fn remove_all(&mut self, hashes: &[u64]) {
        for hash in hashes {
            self.recent.remove(hash);
        }
        let gone: FxHashSet<u64> = hashes.iter().copied().collect();
        self.base.retain(|hash| !gone.contains(hash));
        self.index();
    }

    fn fold(&mut self) {
        self.base.extend(self.recent.drain());
        self.base.par_sort_unstable();
        self.base.dedup();
        self.index();
    }

    /// Every hash, sorted.
    pub fn all(&self) -> Vec<u64> {
        let mut all = self.base.clone();
        all.extend(self.recent.iter().copied());
        all.par_sort_unstable();
        all.dedup();
        all
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.base.capacity() * 8 + self.starts.capacity() * 4 + self.recent.capacity() * 9
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_loaded_and_added_hashes_and_forgets_removed_ones() {
        let mut seen = SeenSet::from_hashes(vec![9, 3, 7, 3]);
        seen.insert(5);
        assert!([3, 5, 7, 9].iter().all(|h| seen.contains(*h)));
        assert!(!seen.contains(4));
        seen.remove_all(&[3, 5]);
        assert!(!seen.contains(3) && !seen.contains(5) && seen.contains(7));
        seen.fold();
        assert_eq!(seen.base, [7, 9]);
    }

    #[test]
    fn the_radix_index_finds_what_a_binary_search_finds() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        // Hashes bunched at both ends of the range as well as spread, and sizes that give
        // 0 to many index bits.
        for n in [0usize, 1, 2, 3, 17, 1000, 50_000] {
            let mut hashes: Vec<u64> = (0..n).map(|_| rng.random()).collect();
            hashes.extend([0, 1, u64::MAX, u64::MAX - 1].iter().take(n.min(4)));
            let seen = SeenSet::from_hashes(hashes.clone());
            let mut sorted = hashes.clone();
            sorted.sort_unstable();
            for &hash in &hashes {
                assert!(seen.contains(hash), "{hash} of {n}");
            }
            for _ in 0..2000 {
                let probe: u64 = rng.random();
                assert_eq!(seen.contains(probe), sorted.binary_search(&probe).is_ok());
            }
            for probe in [0, 1, 2, u64::MAX, u64::MAX - 2] {
                assert_eq!(seen.contains(probe), sorted.binary_search(&probe).is_ok());
            }
        }
    }
}
