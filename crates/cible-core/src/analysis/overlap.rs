//! The overlap of segments' memberships: each segment's size and, for every pair, the size of
//! the intersection, of the union, and their ratio (the Jaccard index, 0 when both are empty).
//! Memberships are roaring bitmaps, so a pair costs two container-wise passes.

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};

/// Most segments one overlap takes (the pairs grow with the square).
pub const MAX_SEGMENTS: usize = 64;

/// A segment and its size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSize {
    pub name: String,
    pub size: u64,
}

/// Two segments, in the order they were asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    pub a: String,
    pub b: String,
    /// |A ∩ B|.
    pub intersection: u64,
    /// |A ∪ B|.
    pub union: u64,
    /// |A ∩ B| / |A ∪ B|, 0 when both are empty.
    pub jaccard: f64,
}

/// What `cible segment overlap` prints and `GET /api/segments/overlap` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Overlap {
    /// In the order asked for.
    pub segments: Vec<SegmentSize>,
    /// Every pair `(i, j)` with `i < j` in that order.
    pub pairs: Vec<Pair>,
}

/// Checks a list of segment names: at least two, at most [`MAX_SEGMENTS`], none twice. The
/// error names the offending value.
pub fn check_names(names: &[String]) -> Result<(), String> {
    if names.len() < 2 {
        return Err(format!(
            "names: give at least two segments (got {})",
            names.len()
        ));
    }
    if names.len() > MAX_SEGMENTS {
        return Err(format!(
            "names: at most {MAX_SEGMENTS} segments (got {})",
            names.len()
        ));
    }
    for (i, name) in names.iter().enumerate() {
        if name.is_empty() {
            return Err("names: a segment name is empty".into());
        }
        if names[..i].contains(name) {
            return Err(format!("names: segment {name:?} is given twice"));
        }
    }
    Ok(())
}

/// The overlap of these memberships.
pub fn overlap(sets: &[(String, RoaringBitmap)]) -> Overlap {
    let segments = sets
        .iter()
        .map(|(name, members)| SegmentSize {
            name: name.clone(),
            size: members.len(),
        })
        .collect();
    let mut pairs = Vec::new();
    for (i, (a, first)) in sets.iter().enumerate() {
        for (b, second) in &sets[i + 1..] {
            let intersection = first.intersection_len(second);
            let union = first.len() + second.len() - intersection;
            pairs.push(Pair {
                a: a.clone(),
                b: b.clone(),
                intersection,
                union,
                jaccard: if union == 0 {
                    0.0
                } else {
                    intersection as f64 / union as f64
                },
            });
        }
    }
    Overlap { segments, pairs }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(name: &str, members: &[u32]) -> (String, RoaringBitmap) {
        (name.to_string(), members.iter().copied().collect())
    }

    #[test]
    fn sizes_intersections_and_jaccard_of_every_pair() {
        let result = overlap(&[
            set("a", &[1, 2, 3, 4]),
            set("b", &[3, 4, 5]),
            set("empty", &[]),
            set("none", &[]),
        ]);
        let sizes: Vec<u64> = result.segments.iter().map(|s| s.size).collect();
        assert_eq!(sizes, [4, 3, 0, 0]);
        let cells: Vec<(&str, &str, u64, u64, f64)> = result
            .pairs
            .iter()
            .map(|p| {
                (
                    p.a.as_str(),
                    p.b.as_str(),
                    p.intersection,
                    p.union,
                    p.jaccard,
                )
            })
            .collect();
        assert_eq!(
            cells,
            [
                ("a", "b", 2, 5, 0.4),
                ("a", "empty", 0, 4, 0.0),
                ("a", "none", 0, 4, 0.0),
                ("b", "empty", 0, 3, 0.0),
                ("b", "none", 0, 3, 0.0),
                // Both empty: 0, not NaN.
                ("empty", "none", 0, 0, 0.0),
            ]
        );
        let same = overlap(&[set("x", &[7, 100_000]), set("y", &[7, 100_000])]);
        assert_eq!(same.pairs[0].jaccard, 1.0);
    }

    #[test]
    fn names_are_checked() {
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(check_names(&names(&["a", "b"])).is_ok());
        assert!(
            check_names(&names(&["a"]))
                .unwrap_err()
                .contains("at least two")
        );
        assert!(
            check_names(&names(&["a", "b", "a"]))
                .unwrap_err()
                .contains("\"a\" is given twice")
        );
        assert!(
            check_names(&names(&["a", ""]))
                .unwrap_err()
                .starts_with("names:")
        );
        let many: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(check_names(&many).unwrap_err().contains("at most 64"));
    }
}
