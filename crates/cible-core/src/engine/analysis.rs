//! The engine's side of aggregate analysis ([`crate::analysis`]): cohort retention over the hot
//! store (a whole-population pass: the active events' times of 512 profiles copied under the
//! `Hot` read guard, then counted on the copies in parallel, no lock held), the overlap of
//! stored memberships, and the size history bucketed into a series.

use rayon::prelude::*;

use super::Engine;
use crate::analysis::overlap::{Overlap, check_names, overlap};
use crate::analysis::retention::{Active, Period, RetentionTable, Tally, active_times};
use crate::analysis::series::{Every, SizeSeries, series};
use crate::error::{EngineError, Result};
use crate::hot::READ_CHUNK;
use crate::time::format_ms;

/// What a cohort retention table is asked for.
#[derive(Debug, Clone)]
pub struct RetentionQuery {
    pub period: Period,
    /// The event names that count as activity; `None`: every named event (track, page, screen).
    pub active: Option<Vec<String>>,
    /// Only the current members of this segment.
    pub segment: Option<String>,
}

impl Engine {
    /// The cohort retention table at `now` (epoch ms) over every live profile (of
    /// `query.segment`, if given) that the `analytics` consent purpose permits.
    pub fn cohort_retention(&self, query: &RetentionQuery, now: i64) -> Result<RetentionTable> {
        if self.is_light() {
            return Err(EngineError::Invalid(
                "cohort retention reads every timeline: not on a light open".into(),
            ));
        }
        let active = match &query.active {
            None => Active::every(),
            Some(names) => {
                if names.is_empty() {
                    return Err(EngineError::Invalid(
                        "active: list at least one event name (or leave it out: every event counts)"
                            .into(),
                    ));
                }
                let dictionary = self.name_dictionary();
                let mut ids = Vec::with_capacity(names.len());
                for name in names {
                    match dictionary.names.get(name) {
                        Some(id) => ids.push(*id),
                        None => {
                            return Err(EngineError::Invalid(format!(
                                "active: no event named {name:?} was ever received"
                            )));
                        }
                    }
                }
                Active::names(ids)
            }
        };
        let analytics = self.consent_check("analytics")?;
        let mut profiles = self.live_profiles();
        if let Some(segment) = &query.segment {
            self.segment(segment)?;
            let members = self.members(segment)?;
            profiles.retain(|p| members.contains(*p));
        }
        profiles.retain(|p| analytics.permits(*p));
        let until = now.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32;
        let period = query.period;
        let tally = profiles
            .par_chunks(READ_CHUNK)
            .map(|chunk| {
                let (times, ends) = self.copy_active_times(chunk, &active, until);
                let mut tally = Tally::default();
                let mut start = 0;
                for end in ends {
                    tally.add_times(&times[start..end], period);
                    start = end;
                }
                tally
            })
            .reduce(Tally::default, Tally::merge);
        let profiles = tally.profiles();
        let cohorts = tally.table(period, until);
        Ok(RetentionTable {
            period,
            active: query.active.clone(),
            segment: query.segment.clone(),
            at: format_ms(now),
            profiles,
            active_profiles: cohorts.iter().map(|c| c.size).sum(),
            cohorts,
        })
    }

    /// The times of the active events up to `until` of these profiles, one profile after the
    /// other, and where each profile's end: copied under the `Hot` read guard (4 bytes an
    /// event), which is released before anyone counts them (the writer waits for one copy at
    /// most).
    fn copy_active_times(
        &self,
        profiles: &[u32],
        active: &Active,
        until: u32,
    ) -> (Vec<u32>, Vec<usize>) {
        let hot = self.hot();
        let total = profiles.iter().map(|p| hot.events(*p).len()).sum();
        let mut times = Vec::with_capacity(total);
        let mut ends = Vec::with_capacity(profiles.len());
        for profile in profiles {
            active_times(hot.events(*profile), active, until, &mut times);
            ends.push(times.len());
        }
        (times, ends)
    }

    /// Sizes and pairwise intersections and Jaccard indexes of these segments' memberships.
    pub fn segment_overlap(&self, names: &[String]) -> Result<Overlap> {
        check_names(names).map_err(EngineError::Invalid)?;
        let mut sets = Vec::with_capacity(names.len());
        for name in names {
            self.segment(name)?;
            sets.push((name.clone(), self.members(name)?));
        }
        Ok(overlap(&sets))
    }

    /// A segment's size at the end of every hour or day from its first change to `now`.
    pub fn size_series(&self, name: &str, every: Every, now: i64) -> Result<SizeSeries> {
        self.segment(name)?;
        let changes: Vec<(i64, u64)> = self
            .segment_changes(name)?
            .into_iter()
            .map(|change| (change.at, change.size))
            .collect();
        series(name, &changes, every, now).map_err(EngineError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;
    use crate::ingest::Durability;
    use crate::message::{ParseContext, parse_message};

    const NOW: i64 = 1_777_636_800_000; // 2026-05-01T12:00:00Z, a Friday

    fn send(engine: &Engine, messages: &[Value]) {
        let items = messages
            .iter()
            .map(|m| parse_message(m.clone(), None, &ParseContext::at(NOW)).into())
            .collect();
        let outcome = engine.ingest(items, "test", Durability::Sync, NOW).unwrap();
        assert!(outcome.quarantined.is_empty(), "{:?}", outcome.quarantined);
    }

    fn track(user: &str, event: &str, at: &str) -> Value {
        json!({"type": "track", "userId": user, "event": event, "timestamp": at})
    }

    fn query(period: Period, active: Option<&[&str]>, segment: Option<&str>) -> RetentionQuery {
        RetentionQuery {
            period,
            active: active.map(|names| names.iter().map(|n| n.to_string()).collect()),
            segment: segment.map(str::to_string),
        }
    }

    fn counts(table: &RetentionTable) -> Vec<(&str, &[u64])> {
        table
            .cohorts
            .iter()
            .map(|c| (c.start.as_str(), c.counts.as_slice()))
            .collect()
    }

    #[test]
    fn retention_reads_live_profiles_permitted_by_analytics_and_in_the_segment() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        send(
            &engine,
            &[
                // Week of Monday 2026-04-13, back the week after and this week.
                track("a", "Signed Up", "2026-04-13T09:00:00Z"),
                track("a", "Order Completed", "2026-04-21T09:00:00Z"),
                track("a", "Page Viewed", "2026-04-29T09:00:00Z"),
                // Same cohort, never back; an identify is no activity.
                track("b", "Signed Up", "2026-04-19T23:59:59Z"),
                json!({"type": "identify", "userId": "b", "timestamp": "2026-04-20T10:00:00Z", "traits": {"plan": "pro"}}),
                // Week of 2026-04-20: the Sunday before and the Monday after are two weeks.
                track("c", "Order Completed", "2026-04-20T00:00:00Z"),
                track("c", "Signed Up", "2026-04-26T23:59:59Z"),
                track("c", "Order Completed", "2026-04-27T00:00:00Z"),
                // Withdrew analytics: left out of every table.
                track("d", "Signed Up", "2026-04-13T09:00:00Z"),
                json!({"type": "identify", "userId": "d", "timestamp": "2026-04-13T10:00:00Z", "traits": {"consent_analytics": false}}),
                // After now: left out.
                track("e", "Signed Up", "2026-05-02T09:00:00Z"),
            ],
        );
        let table = engine
            .cohort_retention(&query(Period::Week, None, None), NOW)
            .unwrap();
        assert_eq!(
            counts(&table),
            [("2026-04-13", &[2, 1, 1][..]), ("2026-04-20", &[1, 1][..])]
        );
        assert_eq!((table.profiles, table.active_profiles), (4, 3));
        assert_eq!(table.cohorts[0].shares, [1.0, 0.5, 0.5]);

        // Orders only: a's cohort is the week of its first order; b never ordered.
        let table = engine
            .cohort_retention(&query(Period::Week, Some(&["Order Completed"]), None), NOW)
            .unwrap();
        assert_eq!(
            counts(&table),
            [("2026-04-20", &[2, 1][..])],
            "a and c ordered in the week of 04-20, only c the week after"
        );

        // Days and months.
        let table = engine
            .cohort_retention(&query(Period::Month, None, None), NOW)
            .unwrap();
        assert_eq!(counts(&table), [("2026-04-01", &[3, 0][..])]);
        let table = engine
            .cohort_retention(&query(Period::Day, Some(&["Signed Up"]), None), NOW)
            .unwrap();
        assert_eq!(table.cohorts.len(), 3);
        assert_eq!(table.cohorts[0].start, "2026-04-13");
        assert_eq!(table.cohorts[0].counts.len(), 19, "04-13 to 05-01");

        // A segment's current members only.
        let rule = r#"did("Order Completed")"#;
        engine
            .create_segment("buyers", cible_lang::parse(rule).unwrap(), rule, NOW)
            .unwrap();
        let table = engine
            .cohort_retention(&query(Period::Week, None, Some("buyers")), NOW)
            .unwrap();
        assert_eq!(
            counts(&table),
            [("2026-04-13", &[1, 1, 1][..]), ("2026-04-20", &[1, 1][..])]
        );
        assert_eq!(table.profiles, 2);

        // Mistakes name what is wrong.
        let error = engine
            .cohort_retention(&query(Period::Week, None, Some("nope")), NOW)
            .unwrap_err();
        assert!(
            matches!(&error, EngineError::NotFound(what) if what.contains("nope")),
            "{error}"
        );
        let error = engine
            .cohort_retention(&query(Period::Week, Some(&["Nope"]), None), NOW)
            .unwrap_err();
        assert!(
            matches!(&error, EngineError::Invalid(what) if what.starts_with("active:") && what.contains("Nope")),
            "{error}"
        );
        let error = engine
            .cohort_retention(&query(Period::Week, Some(&[]), None), NOW)
            .unwrap_err();
        assert!(error.to_string().starts_with("active:"), "{error}");
    }

    #[test]
    fn the_parallel_pass_equals_one_tally_over_the_hot_store() {
        let (_dir, engine) = crate::test_support::generated_store(300, 60, 3, NOW);
        let analytics = engine.consent_check("analytics").unwrap();
        let until = (NOW / 1000) as u32;
        for period in [Period::Day, Period::Week, Period::Month] {
            let table = engine
                .cohort_retention(&query(period, None, None), NOW)
                .unwrap();
            let mut tally = Tally::default();
            {
                let hot = engine.hot();
                for profile in engine.live_profiles() {
                    if analytics.permits(profile) {
                        tally.add(hot.events(profile), &Active::every(), period, until);
                    }
                }
            }
            assert_eq!(table.profiles, tally.profiles());
            assert_eq!(table.cohorts, tally.table(period, until), "{period:?}");
            assert!(table.cohorts.len() > 1, "{period:?}");
        }
    }

    #[test]
    fn overlap_and_series_of_stored_segments() {
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        send(
            &engine,
            &[
                track("a", "Order Completed", "2026-04-30T09:00:00Z"),
                track("b", "Order Completed", "2026-04-30T09:00:00Z"),
                track("b", "Email Opened", "2026-04-30T09:00:00Z"),
                track("c", "Email Opened", "2026-04-30T09:00:00Z"),
            ],
        );
        for (name, rule) in [
            ("buyers", r#"did("Order Completed")"#),
            ("openers", r#"did("Email Opened")"#),
            ("nobody", r#"did("Never Sent")"#),
        ] {
            engine
                .create_segment(name, cible_lang::parse(rule).unwrap(), rule, NOW)
                .unwrap();
        }
        let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let result = engine
            .segment_overlap(&names(&["buyers", "openers", "nobody"]))
            .unwrap();
        assert_eq!(result.segments[0].size, 2);
        assert_eq!(
            (result.pairs[0].intersection, result.pairs[0].union),
            (1, 3)
        );
        assert!((result.pairs[0].jaccard - 1.0 / 3.0).abs() < 1e-12);
        let error = engine
            .segment_overlap(&names(&["buyers", "ghost"]))
            .unwrap_err();
        assert!(
            matches!(&error, EngineError::NotFound(what) if what.contains("ghost")),
            "{error}"
        );

        // The series: one change instant (the creation at NOW), carried to a later now.
        let later = NOW + 3 * 3_600_000;
        let series = engine.size_series("buyers", Every::Hour, later).unwrap();
        let sizes: Vec<u64> = series.points.iter().map(|p| p.size).collect();
        assert_eq!(sizes, [2, 2, 2, 2]);
        assert_eq!(series.points[0].t, "2026-05-01T12:00:00.000Z");
        assert!(engine.size_series("ghost", Every::Day, later).is_err());
    }
}
