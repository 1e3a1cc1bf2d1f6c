//! A segment's size history as a series ready to plot: one point per hour or day, from the
//! bucket of the first change to the bucket holding "now", each the size at the bucket's end
//! (the last change before it, carried forward over buckets without changes).

use serde::{Deserialize, Serialize};

use crate::time::format_ms;

/// Most points a series holds (an hourly series over 11 years).
pub const MAX_POINTS: usize = 100_000;

/// The width of a bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Every {
    Hour,
    Day,
}

impl Every {
    /// `hour` or `day`.
    pub fn parse(text: &str) -> Option<Every> {
        match text {
            "hour" => Some(Every::Hour),
            "day" => Some(Every::Day),
            _ => None,
        }
    }

    /// The bucket's width in milliseconds.
    pub fn ms(self) -> i64 {
        match self {
            Every::Hour => 3_600_000,
            Every::Day => 86_400_000,
        }
    }
}

/// One bucket: its start (RFC 3339, UTC) and the size at its end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Point {
    pub t: String,
    pub size: u64,
}

/// What `cible segment history --every` prints and `GET /api/segments/{name}/history?every=`
/// answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeSeries {
    pub segment: String,
    pub every: Every,
    /// Oldest first, one per bucket, none missing; empty when the segment never changed
    /// before "now".
    pub points: Vec<Point>,
}

/// The buckets from the first change to `now` (epoch ms): `changes` are (epoch ms, size after
/// the change) in the order they happened; changes after `now` are left out. Each point is
/// (bucket start, size at the bucket's end); the last bucket, still running, holds the size at
/// `now`. Refuses a series of more than [`MAX_POINTS`] points.
pub fn bucketed(changes: &[(i64, u64)], every: Every, now: i64) -> Result<Vec<(i64, u64)>, String> {
    let width = every.ms();
    let mut changes: Vec<(i64, u64)> = changes
        .iter()
        .copied()
        .filter(|(at, _)| *at <= now)
        .collect();
    // Stable: of two changes at the same instant, the later one's size stays.
    changes.sort_by_key(|(at, _)| *at);
    let Some(&(first, _)) = changes.first() else {
        return Ok(Vec::new());
    };
    let (first_bucket, last_bucket) = (first.div_euclid(width), now.div_euclid(width));
    let n = usize::try_from(last_bucket - first_bucket + 1).unwrap_or(usize::MAX);
    if n > MAX_POINTS {
        return Err(format!(
            "every: {} buckets from the first change to now is {n} points, more than {MAX_POINTS}; use a wider bucket",
            match every {
                Every::Hour => "hourly",
                Every::Day => "daily",
            }
        ));
    }
    let mut points = Vec::with_capacity(n);
    let mut next = changes.iter().peekable();
    let mut size = 0;
    for bucket in first_bucket..=last_bucket {
        let end = (bucket + 1) * width;
        while let Some((_, after)) = next.next_if(|(at, _)| *at < end) {
            size = *after;
        }
        points.push((bucket * width, size));
    }
    Ok(points)
}

/// [`bucketed`] with the instants formatted.
pub fn series(
    segment: &str,
    changes: &[(i64, u64)],
    every: Every,
    now: i64,
) -> Result<SizeSeries, String> {
    Ok(SizeSeries {
        segment: segment.to_string(),
        every,
        points: bucketed(changes, every, now)?
            .into_iter()
            .map(|(start, size)| Point {
                t: format_ms(start),
                size,
            })
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: i64 = 3_600_000;
    const DAY: i64 = 24 * HOUR;

    #[test]
    fn one_point_per_bucket_with_gaps_carried_forward() {
        // Changes at 01:10 (size 3), 01:50 (5), 04:00 exactly (2); now 06:30.
        let base = 20_000 * DAY;
        let changes = [
            (base + HOUR + 10 * 60_000, 3),
            (base + HOUR + 50 * 60_000, 5),
            (base + 4 * HOUR, 2),
        ];
        let got = bucketed(&changes, Every::Hour, base + 6 * HOUR + 30 * 60_000).unwrap();
        let expected: Vec<(i64, u64)> = [(1, 5), (2, 5), (3, 5), (4, 2), (5, 2), (6, 2)]
            .iter()
            .map(|(h, size)| (base + h * HOUR, *size))
            .collect();
        assert_eq!(got, expected);
        // Daily: one bucket holding all of it, the size at now.
        assert_eq!(
            bucketed(&changes, Every::Day, base + 6 * HOUR).unwrap(),
            [(base, 2)]
        );
        let series = series("s", &changes, Every::Day, base + DAY + 1).unwrap();
        assert_eq!(
            series.points,
            [
                Point {
                    t: "2024-10-04T00:00:00.000Z".into(),
                    size: 2
                },
                Point {
                    t: "2024-10-05T00:00:00.000Z".into(),
                    size: 2
                },
            ]
        );
    }

    #[test]
    fn changes_after_now_and_out_of_order_changes() {
        let changes = [(5 * DAY + 2 * HOUR, 7), (5 * DAY + HOUR, 4), (9 * DAY, 1)];
        // Sorted by time: 01:00 -> 4, 02:00 -> 7; the change on day 9 is after now.
        assert_eq!(
            bucketed(&changes, Every::Day, 6 * DAY).unwrap(),
            [(5 * DAY, 7), (6 * DAY, 7)]
        );
        assert_eq!(bucketed(&changes, Every::Day, 4 * DAY).unwrap(), []);
        assert_eq!(bucketed(&[], Every::Hour, 4 * DAY).unwrap(), []);
        // Two changes in the same millisecond: the later one's size.
        assert_eq!(
            bucketed(&[(HOUR, 1), (HOUR, 0)], Every::Hour, HOUR).unwrap(),
            [(HOUR, 0)]
        );
    }

    #[test]
    fn too_many_points_are_refused_naming_the_field() {
        let error = bucketed(&[(0, 1)], Every::Hour, 20 * 365 * DAY).unwrap_err();
        assert!(error.starts_with("every:"), "{error}");
        assert!(bucketed(&[(0, 1)], Every::Day, 20 * 365 * DAY).is_ok());
    }
}
