//! The in-memory dedup filter: 64-bit hashes of every accepted messageId.
//!
//! It only says "maybe seen": a hit is confirmed against the `msgids` keyspace, so a hash
//! collision can never drop a message. Hashes loaded at start sit in a sorted vector (8 bytes
//! each, built with one parallel sort); hashes added since sit in a hash set that is folded into
//! the vector when it grows past an eighth of it.

use rayon::prelude::*;
use rustc_hash::FxHashSet;

#[derive(Debug, Default)]
pub struct SeenSet {
    base: Vec<u64>,
    recent: FxHashSet<u64>,
}

impl SeenSet {
    /// Builds the set from unsorted hashes.
    pub fn from_hashes(mut hashes: Vec<u64>) -> Self {
        hashes.par_sort_unstable();
        hashes.dedup();
        Self {
            base: hashes,
            recent: FxHashSet::default(),
        }
    }

    pub fn contains(&self, hash: u64) -> bool {
        self.recent.contains(&hash) || self.base.binary_search(&hash).is_ok()
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
    }

    fn fold(&mut self) {
        self.base.extend(self.recent.drain());
        self.base.par_sort_unstable();
        self.base.dedup();
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
        self.base.capacity() * 8 + self.recent.capacity() * 9
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
}
