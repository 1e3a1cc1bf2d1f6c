//! Which profile ordinals are live (not merged away, not removed), readable without the
//! writer lock.
//!
//! The writer's `State` decides liveness while it builds a batch; this mirror is updated after
//! the batch is committed, as the hot store is, so readers (the segment worker above all) never
//! wait for a commit in progress to learn whether a profile still exists.

/// A bit per profile ordinal; ordinals past the end are not live.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Liveness {
    words: Vec<u64>,
}

impl Liveness {
    /// From each ordinal's flag, in order.
    pub fn from_flags(flags: impl IntoIterator<Item = bool>) -> Self {
        let mut liveness = Self::default();
        for (profile, alive) in flags.into_iter().enumerate() {
            if alive {
                liveness.set(profile as u32, true);
            }
        }
        liveness
    }

    pub fn set(&mut self, profile: u32, alive: bool) {
        let (word, bit) = (profile as usize / 64, profile % 64);
        if word >= self.words.len() {
            if !alive {
                return;
            }
            self.words.resize(word + 1, 0);
        }
        if alive {
            self.words[word] |= 1 << bit;
        } else {
            self.words[word] &= !(1 << bit);
        }
    }

    pub fn get(&self, profile: u32) -> bool {
        self.words
            .get(profile as usize / 64)
            .is_some_and(|word| word & (1 << (profile % 64)) != 0)
    }

    /// Live ordinals, ascending.
    pub fn iter(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(index, &word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros();
                    rest &= rest - 1;
                    index as u32 * 64 + bit
                })
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::Liveness;

    #[test]
    fn set_get_and_iterate() {
        let mut liveness = Liveness::from_flags([true, false, true]);
        liveness.set(200, true);
        liveness.set(2, false);
        liveness.set(10_000, false); // past the end: nothing to clear, nothing grows
        assert!(liveness.get(0) && !liveness.get(1) && !liveness.get(2) && liveness.get(200));
        assert!(!liveness.get(64) && !liveness.get(1_000_000));
        assert_eq!(liveness.iter().collect::<Vec<_>>(), vec![0, 200]);
        assert_eq!(liveness.words.len(), 4);
    }
}
