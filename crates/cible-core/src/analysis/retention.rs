//! Cohort retention as a pure function of hot timelines. A profile's cohort is the period (UTC
//! day, ISO week starting on Monday, or calendar month) of its first *active* event; cell `k` of
//! a cohort counts its profiles active (any active event) in period `cohort + k`. Periods are
//! integers (days since 1970-01-01, weeks since Monday 1969-12-29, `year * 12 + month - 1`), so
//! a cell is one subtraction away; a profile's distinct periods come from one pass over its
//! sorted timeline, computing a period only for an event past the end of the last one counted
//! (one comparison for every other event).
//!
//! [`Tally`] accumulates profiles (one per thread of a parallel pass, then merged);
//! [`Tally::table`] turns it into the cohorts of a [`RetentionTable`].

use chrono::{Datelike, NaiveDate};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::hot::{HotEvent, NO_NAME};

/// Days from 0001-01-01 (chrono's day 1 of the common era) to 1970-01-01.
const EPOCH_FROM_CE: i64 = 719_163;
const DAY_SECONDS: u32 = 86_400;

/// The length of a retention period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Period {
    /// A UTC day.
    Day,
    /// An ISO week: Monday 00:00 UTC to the next Monday.
    Week,
    /// A calendar month, UTC.
    Month,
}

impl Period {
    /// `day`, `week` or `month`.
    pub fn parse(text: &str) -> Option<Period> {
        match text {
            "day" => Some(Period::Day),
            "week" => Some(Period::Week),
            "month" => Some(Period::Month),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Week => "week",
            Period::Month => "month",
        }
    }

    /// The index of the period holding `day` (days since 1970-01-01): the day itself; the
    /// week (1970-01-01 was a Thursday, so week 0 starts on Monday 1969-12-29); or
    /// `year * 12 + month - 1`.
    pub fn index_of_day(self, day: i64) -> i64 {
        match self {
            Period::Day => day,
            Period::Week => (day + 3).div_euclid(7),
            Period::Month => {
                let date = date_of_day(day);
                i64::from(date.year()) * 12 + i64::from(date.month0())
            }
        }
    }

    /// The first day (days since 1970-01-01) of the period with this index.
    pub fn first_day(self, index: i64) -> i64 {
        match self {
            Period::Day => index,
            Period::Week => index * 7 - 3,
            Period::Month => {
                let (year, month0) = (index.div_euclid(12), index.rem_euclid(12));
                let date = i32::try_from(year)
                    .ok()
                    .and_then(|year| NaiveDate::from_ymd_opt(year, month0 as u32 + 1, 1))
                    .unwrap_or(NaiveDate::MIN);
                i64::from(date.num_days_from_ce()) - EPOCH_FROM_CE
            }
        }
    }
}

fn date_of_day(day: i64) -> NaiveDate {
    i32::try_from(day + EPOCH_FROM_CE)
        .ok()
        .and_then(NaiveDate::from_num_days_from_ce_opt)
        .unwrap_or(NaiveDate::MIN)
}

/// A day (days since 1970-01-01) as `YYYY-MM-DD`.
pub fn format_day(day: i64) -> String {
    date_of_day(day).format("%Y-%m-%d").to_string()
}

/// Which events count as activity: every named event (track, page and screen; identify, alias
/// and group messages have no name), or those whose name id is in a set.
#[derive(Debug, Clone)]
pub struct Active {
    /// One bit per name id; `None`: every named event.
    ids: Option<Vec<u64>>,
}

impl Active {
    /// Every named event.
    pub fn every() -> Self {
        Self { ids: None }
    }

    /// The events with one of these name ids.
    pub fn names(ids: impl IntoIterator<Item = u16>) -> Self {
        let mut bits = vec![0u64; (usize::from(u16::MAX) + 1) / 64];
        for id in ids.into_iter().filter(|id| *id != NO_NAME) {
            bits[usize::from(id) / 64] |= 1 << (id % 64);
        }
        Self { ids: Some(bits) }
    }

    #[inline]
    pub fn counts(&self, name: u16) -> bool {
        name != NO_NAME
            && self
                .ids
                .as_ref()
                .is_none_or(|bits| bits[usize::from(name) / 64] & (1 << (name % 64)) != 0)
    }
}

/// Appends to `times` the times of the active events of a timeline (sorted by time) up to
/// `until` (epoch seconds): all that [`Tally::add_times`] reads of it, 4 bytes an event instead
/// of 16 (what a pass copies under the hot store's read guard).
pub fn active_times(events: &[HotEvent], active: &Active, until: u32, times: &mut Vec<u32>) {
    times.extend(
        events
            .iter()
            .take_while(|e| e.ts <= until)
            .filter(|e| active.counts(e.name))
            .map(|e| e.ts),
    );
}

/// The first second after period `index`.
fn period_end(period: Period, index: i64) -> i64 {
    period.first_day(index + 1) * i64::from(DAY_SECONDS)
}

/// Cohort counts over the profiles added so far.
#[derive(Debug, Default)]
pub struct Tally {
    /// Per cohort (period index): how many of its profiles were active `k` periods later, at
    /// index `k` (index 0 is the cohort's size).
    cohorts: FxHashMap<i64, Vec<u64>>,
    /// Profiles added, active or not.
    profiles: u64,
}

impl Tally {
    /// Adds one profile from its timeline (sorted by time, as the hot store keeps it); events
    /// after `until` (epoch seconds) are left out.
    pub fn add(&mut self, events: &[HotEvent], active: &Active, period: Period, until: u32) {
        let mut times = Vec::new();
        active_times(events, active, until, &mut times);
        self.add_times(&times, period);
    }

    /// Adds one profile from the times of its active events (epoch seconds, sorted; see
    /// [`active_times`]). One comparison an event: an event before the end of the last period
    /// counted is skipped; the period (and its end) is computed only for the others.
    pub fn add_times(&mut self, times: &[u32], period: Period) {
        self.profiles += 1;
        let Some(&first) = times.first() else {
            return;
        };
        let cohort = period.index_of_day(i64::from(first / DAY_SECONDS));
        let mut end = period_end(period, cohort);
        let counts = self.cohorts.entry(cohort).or_default();
        if counts.is_empty() {
            counts.push(0);
        }
        counts[0] += 1;
        for &ts in &times[1..] {
            if i64::from(ts) < end {
                continue;
            }
            let index = period.index_of_day(i64::from(ts / DAY_SECONDS));
            end = period_end(period, index);
            let k = (index - cohort) as usize;
            if counts.len() <= k {
                counts.resize(k + 1, 0);
            }
            counts[k] += 1;
        }
    }

    /// Adds another tally's profiles (the parts of a parallel pass).
    pub fn merge(self, other: Tally) -> Tally {
        let (mut into, from) = if self.cohorts.len() >= other.cohorts.len() {
            (self, other)
        } else {
            (other, self)
        };
        into.profiles += from.profiles;
        for (cohort, counts) in from.cohorts {
            let target = into.cohorts.entry(cohort).or_default();
            if target.len() < counts.len() {
                target.resize(counts.len(), 0);
            }
            for (x, y) in target.iter_mut().zip(counts) {
                *x += y;
            }
        }
        into
    }

    /// Profiles added, active or not.
    pub fn profiles(&self) -> u64 {
        self.profiles
    }

    /// The cohorts, oldest first, each with one cell per period from its own to the one
    /// holding `now` (epoch seconds), empty periods included.
    pub fn table(self, period: Period, now: u32) -> Vec<Cohort> {
        let current = period.index_of_day(i64::from(now / DAY_SECONDS));
        let mut cohorts: Vec<(i64, Vec<u64>)> = self.cohorts.into_iter().collect();
        cohorts.sort_unstable_by_key(|(index, _)| *index);
        cohorts
            .into_iter()
            .map(|(index, mut counts)| {
                let width = usize::try_from(current - index + 1).unwrap_or(0);
                counts.resize(width.max(counts.len()), 0);
                let size = counts[0];
                Cohort {
                    start: format_day(period.first_day(index)),
                    size,
                    shares: counts.iter().map(|n| *n as f64 / size as f64).collect(),
                    counts,
                }
            })
            .collect()
    }
}

/// One cohort of a retention table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Cohort {
    /// The first day of the cohort's period, `YYYY-MM-DD` (UTC; a Monday for weeks, the 1st
    /// for months).
    pub start: String,
    /// Profiles whose first active event falls in that period.
    pub size: u64,
    /// `counts[k]`: the cohort's profiles active in the `k`-th period after its own, up to the
    /// period holding "now" (`counts[0] == size`).
    pub counts: Vec<u64>,
    /// `counts[k] / size`.
    pub shares: Vec<f64>,
}

/// A cohort retention table: what `cible cohort retention` prints and
/// `GET /api/cohorts/retention` answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetentionTable {
    pub period: Period,
    /// The event names that count as activity; `null`: every named event (track, page and
    /// screen; identify, alias and group are not activity).
    pub active: Option<Vec<String>>,
    /// The segment whose current members the table is restricted to, if any.
    pub segment: Option<String>,
    /// "Now": events after it are left out, and the last cell of each cohort is its period.
    pub at: String,
    /// Profiles counted: live (in the segment, if any) and permitted by the `analytics`
    /// consent purpose, whether active or not.
    pub profiles: u64,
    /// Of those, the profiles with an active event (the sum of the cohorts' sizes).
    pub active_profiles: u64,
    /// Oldest first.
    pub cohorts: Vec<Cohort>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hot::{NO_KEY, NO_PROPERTY, pack_kind};

    /// Epoch seconds of an RFC 3339 instant.
    fn at(text: &str) -> u32 {
        (crate::time::parse_timestamp_str(text).unwrap() / 1000) as u32
    }

    fn event(text: &str, name: u16) -> HotEvent {
        HotEvent {
            ts: at(text),
            name,
            flags: 0,
            kind: pack_kind(0, NO_PROPERTY),
            key: NO_KEY,
            value: f32::NAN,
        }
    }

    /// The table of these timelines, as (start, counts) per cohort.
    fn check(
        timelines: &[Vec<HotEvent>],
        active: &Active,
        period: Period,
        now: &str,
        expected: &[(&str, &[u64])],
    ) {
        let mut tally = Tally::default();
        for timeline in timelines {
            tally.add(timeline, active, period, at(now));
        }
        let got: Vec<(String, Vec<u64>)> = tally
            .table(period, at(now))
            .into_iter()
            .map(|c| {
                assert_eq!(c.counts[0], c.size);
                (c.start, c.counts)
            })
            .collect();
        let expected: Vec<(String, Vec<u64>)> = expected
            .iter()
            .map(|(start, counts)| (start.to_string(), counts.to_vec()))
            .collect();
        assert_eq!(got, expected);
    }

    #[test]
    fn weeks_start_on_monday_at_midnight_utc() {
        // 2026-03-01 is a Sunday, 2026-03-02 a Monday.
        let sunday = event("2026-03-01T23:59:59Z", 1);
        let monday = event("2026-03-02T00:00:00Z", 1);
        assert_eq!(
            Period::Week.index_of_day(i64::from(sunday.ts / 86_400)) + 1,
            Period::Week.index_of_day(i64::from(monday.ts / 86_400))
        );
        check(
            &[vec![sunday, monday], vec![monday]],
            &Active::every(),
            Period::Week,
            "2026-03-10T00:00:00Z",
            &[("2026-02-23", &[1, 1, 0]), ("2026-03-02", &[1, 0])],
        );
        // The epoch's own week starts on Monday 1969-12-29.
        assert_eq!(Period::Week.index_of_day(0), 0);
        assert_eq!(format_day(Period::Week.first_day(0)), "1969-12-29");
        assert_eq!(Period::Week.index_of_day(4), 1, "1970-01-05 is a Monday");
    }

    #[test]
    fn months_are_calendar_months_and_days_are_utc_days() {
        let timeline = vec![
            event("2026-01-31T23:59:59Z", 1),
            event("2026-02-01T00:00:00Z", 1),
            event("2026-02-28T12:00:00Z", 1),
            event("2026-04-01T00:00:00Z", 1),
        ];
        check(
            std::slice::from_ref(&timeline),
            &Active::every(),
            Period::Month,
            "2026-05-01T12:00:00Z",
            &[("2026-01-01", &[1, 1, 0, 1, 0])],
        );
        check(
            &[timeline[..2].to_vec()],
            &Active::every(),
            Period::Day,
            "2026-02-02T00:00:00Z",
            &[("2026-01-31", &[1, 1, 0])],
        );
        // Leap years and the turn of a year.
        assert_eq!(
            format_day(Period::Month.first_day(2024 * 12 + 1)),
            "2024-02-01"
        );
        let day = i64::from(at("2024-02-29T00:00:00Z") / 86_400);
        assert_eq!(Period::Month.index_of_day(day), 2024 * 12 + 1);
        let day = i64::from(at("2025-12-31T23:00:00Z") / 86_400);
        assert_eq!(Period::Month.index_of_day(day) + 1, 2026 * 12);
    }

    #[test]
    fn the_cohort_is_the_period_of_the_first_active_event() {
        // Name 2 is not active: the profile's cohort is the week of its first name-1 event, and
        // its name-2 events count for nothing, nor do identify messages (no name).
        let timeline = vec![
            event("2026-03-03T10:00:00Z", 2),
            event("2026-03-04T10:00:00Z", NO_NAME),
            event("2026-03-10T10:00:00Z", 1),
            event("2026-03-18T10:00:00Z", 2),
            event("2026-03-25T10:00:00Z", 1),
        ];
        check(
            std::slice::from_ref(&timeline),
            &Active::names([1]),
            Period::Week,
            "2026-03-31T00:00:00Z",
            &[("2026-03-09", &[1, 0, 1, 0])],
        );
        // With every event active, the name-2 events count, identify messages still do not.
        check(
            std::slice::from_ref(&timeline),
            &Active::every(),
            Period::Week,
            "2026-03-31T00:00:00Z",
            &[("2026-03-02", &[1, 1, 1, 1, 0])],
        );
        // A profile with no active event is in no cohort, but is counted.
        let mut tally = Tally::default();
        tally.add(
            &[event("2026-03-03T10:00:00Z", 2)],
            &Active::names([1]),
            Period::Week,
            at("2026-03-31T00:00:00Z"),
        );
        assert_eq!(tally.profiles(), 1);
        assert!(
            tally
                .table(Period::Week, at("2026-03-31T00:00:00Z"))
                .is_empty()
        );
    }

    #[test]
    fn events_after_now_are_left_out_and_shares_divide_by_the_size() {
        let timelines = vec![
            vec![
                event("2026-03-02T10:00:00Z", 1),
                event("2026-03-09T10:00:00Z", 1),
            ],
            vec![
                event("2026-03-02T11:00:00Z", 1),
                event("2026-03-20T10:00:00Z", 1),
            ],
            vec![event("2026-03-03T11:00:00Z", 1)],
            vec![event("2026-04-03T11:00:00Z", 1)],
        ];
        let now = at("2026-03-19T00:00:00Z");
        let mut tally = Tally::default();
        for timeline in &timelines {
            tally.add(timeline, &Active::every(), Period::Week, now);
        }
        let table = tally.table(Period::Week, now);
        assert_eq!(table.len(), 1);
        assert_eq!(table[0].counts, [3, 1, 0]);
        assert_eq!(table[0].shares, [1.0, 1.0 / 3.0, 0.0]);
    }

    /// A simple LCG: the same pseudo-random timelines on every run.
    fn timelines(n: u32, seed: u64) -> Vec<Vec<HotEvent>> {
        let mut state = seed;
        let mut next = move |bound: u32| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((state >> 33) % u64::from(bound)) as u32
        };
        let origin = at("2025-11-20T00:00:00Z");
        (0..n)
            .map(|_| {
                let mut times: Vec<u32> =
                    (0..next(40)).map(|_| origin + next(150 * 86_400)).collect();
                times.sort_unstable();
                times
                    .into_iter()
                    .map(|ts| HotEvent {
                        ts,
                        name: if next(10) == 0 {
                            NO_NAME
                        } else {
                            next(4) as u16
                        },
                        ..event("2026-01-01T00:00:00Z", 0)
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn the_one_pass_count_equals_counting_distinct_periods() {
        // The obvious way: every active event's period, deduplicated per profile.
        let now = at("2026-03-15T12:00:00Z");
        for active in [Active::every(), Active::names([1, 3])] {
            for period in [Period::Day, Period::Week, Period::Month] {
                let mut expected: std::collections::BTreeMap<i64, Vec<u64>> = Default::default();
                let mut tally = Tally::default();
                for timeline in timelines(300, 7) {
                    tally.add(&timeline, &active, period, now);
                    let periods: std::collections::BTreeSet<i64> = timeline
                        .iter()
                        .filter(|e| e.ts <= now && active.counts(e.name))
                        .map(|e| period.index_of_day(i64::from(e.ts / 86_400)))
                        .collect();
                    let Some(&cohort) = periods.first() else {
                        continue;
                    };
                    let current = period.index_of_day(i64::from(now / 86_400));
                    let counts = expected
                        .entry(cohort)
                        .or_insert_with(|| vec![0; (current - cohort + 1) as usize]);
                    for index in periods {
                        counts[(index - cohort) as usize] += 1;
                    }
                }
                let got: Vec<(String, Vec<u64>)> = tally
                    .table(period, now)
                    .into_iter()
                    .map(|c| (c.start, c.counts))
                    .collect();
                let expected: Vec<(String, Vec<u64>)> = expected
                    .into_iter()
                    .map(|(index, counts)| (format_day(period.first_day(index)), counts))
                    .collect();
                assert!(expected.len() > 3, "{period:?}");
                assert_eq!(got, expected, "{period:?}");
            }
        }
    }

    #[test]
    fn merged_tallies_equal_one_tally() {
        let timelines: Vec<Vec<HotEvent>> = (0..40u32)
            .map(|i| {
                (0..i % 7)
                    .map(|j| HotEvent {
                        ts: at("2026-01-01T00:00:00Z") + i * 40_000 + j * 300_000,
                        ..event("2026-01-01T00:00:00Z", (i % 3) as u16)
                    })
                    .collect()
            })
            .collect();
        let now = at("2026-03-01T00:00:00Z");
        let active = Active::names([0, 2]);
        for period in [Period::Day, Period::Week, Period::Month] {
            let mut whole = Tally::default();
            let (mut left, mut right) = (Tally::default(), Tally::default());
            for (i, timeline) in timelines.iter().enumerate() {
                whole.add(timeline, &active, period, now);
                let part = if i % 2 == 0 { &mut left } else { &mut right };
                part.add(timeline, &active, period, now);
            }
            assert_eq!(
                left.merge(right).table(period, now),
                whole.table(period, now),
                "{period:?}"
            );
        }
    }
}
