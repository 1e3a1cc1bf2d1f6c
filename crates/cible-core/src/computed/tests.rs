//! Computed traits checked against an independent reference: each trait written again from its
//! documented definition, over the full messages read back from the store (not the hot rows),
//! on generated data.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::config::TraitConfig;
use crate::engine::Engine;

const NOW_MS: i64 = 1_777_593_600_000; // 2026-05-01T00:00:00Z
const NOW: i64 = NOW_MS / 1000;
const DAY: i64 = 86_400;

/// (seconds, event name or "" for identify/alias/group, properties, anomaly flags).
type Event = (i64, String, Map<String, Value>, u8);

fn loaded() -> (tempfile::TempDir, Engine) {
    crate::test_support::generated_store(1200, 150, 5, NOW_MS)
}

fn events_by_profile(engine: &Engine) -> BTreeMap<u32, Vec<Event>> {
    let mut by_profile: BTreeMap<u32, Vec<Event>> = BTreeMap::new();
    engine
        .for_each_event(|event| {
            let name = event.message.behavioral_name().unwrap_or("").to_string();
            by_profile.entry(event.profile).or_default().push((
                event.message.timestamp.div_euclid(1000),
                name,
                event.message.properties,
                event.message.flags,
            ));
            Ok(())
        })
        .unwrap();
    for events in by_profile.values_mut() {
        events.sort_by_key(|e| e.0);
    }
    by_profile
}

fn text<'a>(properties: &'a Map<String, Value>, field: &str) -> Option<&'a str> {
    properties.get(field).and_then(Value::as_str)
}

fn number(properties: &Map<String, Value>, field: &str) -> Option<f64> {
    properties.get(field).and_then(crate::message::number_of)
}

fn engagement_sum(events: &[Event], config: &TraitConfig, at: i64) -> f64 {
    events
        .iter()
        .filter(|e| e.0 <= NOW && (e.3 == 0 || config.engagement.include_anomalies))
        .filter_map(|e| config.engagement.weights.get(&e.1).map(|w| (e.0, *w)))
        .map(|(ts, w)| {
            w * ((ts - at) as f64 / (config.engagement.half_life_days * DAY as f64)).exp2()
        })
        .sum()
}

/// Nearest rank: the value at position ceil(k% of n) in ascending order.
fn percentile(sorted: &[f64], k: usize) -> f64 {
    let rank = (k * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}

struct Rfm {
    recency_days: f64,
    frequency: u32,
    monetary: f64,
}

fn rfm(events: &[Event], config: &TraitConfig) -> Option<Rfm> {
    let start = NOW - i64::from(config.rfm.window_days) * DAY;
    let orders: Vec<&Event> = events
        .iter()
        .filter(|e| e.1 == config.rfm.order_event && e.0 > start && e.0 <= NOW)
        .collect();
    let last = orders.last()?;
    Some(Rfm {
        recency_days: (NOW - last.0) as f64 / DAY as f64,
        frequency: orders.len() as u32,
        monetary: orders
            .iter()
            .map(|e| number(&e.2, "revenue").unwrap_or(0.0))
            .sum(),
    })
}

/// The documented grid, written as rules on (R, FM).
fn segment_of(r: u8, fm: u8) -> &'static str {
    match (r, fm) {
        (5, 1) => "new",
        (5, 4..=5) => "champions",
        (4..=5, 2..=3) => "potential_loyalists",
        (4, 1) => "promising",
        (3..=4, 4..=5) => "loyal",
        (3, 3) => "need_attention",
        (3, 1..=2) => "about_to_sleep",
        (1..=2, 3..=4) => "at_risk",
        (1..=2, 5) => "cannot_lose",
        (1, 1) => "lost",
        _ => "hibernating",
    }
}

fn intent(events: &[Event], config: &TraitConfig) -> (f64, String, Option<String>) {
    let c = &config.intent;
    let start = NOW - i64::from(c.window_days) * DAY;
    let last_order = events
        .iter()
        .rposition(|e| e.1 == config.rfm.order_event && e.0 <= NOW);
    let mut scores: BTreeMap<String, f64> = BTreeMap::new();
    let mut current = "general".to_string();
    let mut viewed = std::collections::BTreeSet::new();
    for (i, e) in events.iter().enumerate() {
        if e.0 <= start || e.0 > NOW || last_order.is_some_and(|o| i <= o) {
            continue;
        }
        let mut weight = 0.0;
        for signal in c.signals.iter().filter(|s| s.event == e.1) {
            let path_ok = signal.path_prefix.as_ref().is_none_or(|p| {
                text(&e.2, "path").is_some_and(|path| path.starts_with(p.as_str()))
            });
            let duration_ok = signal
                .min_duration_s
                .is_none_or(|min| number(&e.2, "duration_s").is_some_and(|d| d >= min));
            if path_ok && duration_ok {
                weight += signal.weight;
            }
        }
        if e.1 == "Product Viewed"
            && let Some(product) = text(&e.2, "product_id")
            && !viewed.insert(product.to_string())
        {
            weight += c.repeat_view_weight;
        }
        if weight == 0.0 {
            continue;
        }
        if let Some(category) = text(&e.2, "category") {
            current = category.to_string();
        }
        *scores.entry(current.clone()).or_default() += weight;
    }
    let mut top: Option<(&String, f64)> = None;
    for (name, score) in &scores {
        if top.is_none_or(|(_, best)| *score > best) {
            top = Some((name, *score));
        }
    }
    let score = top.map_or(0.0, |t| t.1);
    let level = match score {
        s if s <= 0.0 => "none",
        s if s >= c.high => "high",
        s if s >= c.medium => "medium",
        _ => "low",
    };
    (score, level.to_string(), top.map(|t| t.0.clone()))
}

fn lifecycle(events: &[Event], config: &TraitConfig) -> Option<&'static str> {
    let l = &config.lifecycle;
    let seen: Vec<&Event> = events.iter().filter(|e| e.0 <= NOW).collect();
    let first = seen.first()?.0;
    let active: Vec<i64> = seen
        .iter()
        .filter(|e| e.3 == 0 || config.engagement.include_anomalies)
        .filter(|e| {
            config
                .engagement
                .weights
                .get(&e.1)
                .is_some_and(|w| *w > 0.0)
        })
        .map(|e| e.0)
        .collect();
    let idle = NOW - active.last().copied().unwrap_or(first);
    let days = |d: u32| i64::from(d) * DAY;
    Some(if idle >= days(l.churned_days) {
        "churned"
    } else if idle >= days(l.dormant_days) {
        "dormant"
    } else if idle >= days(l.active_days) {
        "at_risk"
    } else if NOW - first < days(l.new_days) {
        "new"
    } else if active
        .windows(2)
        .rfind(|w| w[1] - w[0] >= days(l.dormant_days))
        .is_some_and(|w| NOW - w[1] < days(l.reactivated_days))
    {
        "reactivated"
    } else if seen
        .iter()
        .filter(|e| e.1 == config.rfm.order_event && NOW - e.0 < days(l.loyal_window_days))
        .count()
        >= l.loyal_orders as usize
    {
        "loyal"
    } else {
        "engaged"
    })
}

/// (hour, ISO weekday, count) of opens and clicks.
fn send_time(events: &[Event], config: &TraitConfig) -> (u8, u8, u32) {
    let mut hours = [0u32; 24];
    let mut days = [0u32; 7];
    let mut n = 0;
    for e in events
        .iter()
        .filter(|e| e.0 <= NOW && config.send_time.events.contains(&e.1))
    {
        hours[(e.0.rem_euclid(DAY) / 3600) as usize] += 1;
        // 1970-01-01 was a Thursday (ISO 4).
        days[((e.0.div_euclid(DAY) + 3).rem_euclid(7)) as usize] += 1;
        n += 1;
    }
    let best = |counts: &[u32]| {
        let max = *counts.iter().max().unwrap();
        counts.iter().position(|c| *c == max).unwrap()
    };
    (best(&hours) as u8, best(&days) as u8 + 1, n)
}

fn affinity(events: &[Event], config: &TraitConfig) -> Option<String> {
    let start = NOW - i64::from(config.affinity.window_days) * DAY;
    let mut weights: BTreeMap<&str, f64> = BTreeMap::new();
    for e in events.iter().filter(|e| e.0 > start && e.0 <= NOW) {
        if let (Some(w), Some(category)) =
            (config.affinity.weights.get(&e.1), text(&e.2, "category"))
        {
            *weights.entry(category).or_default() += w;
        }
    }
    let max = weights.values().copied().fold(f64::NEG_INFINITY, f64::max);
    weights
        .into_iter()
        .find(|(_, w)| *w == max)
        .map(|(c, _)| c.to_string())
}

#[test]
fn every_trait_matches_its_reference_on_generated_data() {
    let (_dir, engine) = loaded();
    let config = TraitConfig::default();
    let calibration = engine.calibrate(NOW_MS).unwrap();
    let at = i64::from(calibration.at);
    let by_profile = events_by_profile(&engine);
    let profiles = engine.live_profiles();
    let none = Vec::new();
    let events_of = |p: &u32| by_profile.get(p).unwrap_or(&none);

    // Population reference: percentiles and quintiles.
    let mut sums: Vec<f64> = profiles
        .iter()
        .map(|p| engagement_sum(events_of(p), &config, at))
        .filter(|s| *s > 0.0)
        .collect();
    sums.sort_by(f64::total_cmp);
    let points: Vec<f64> = (1..=100).map(|k| percentile(&sums, k)).collect();
    let customers: Vec<Rfm> = profiles
        .iter()
        .filter_map(|p| rfm(events_of(p), &config))
        .collect();
    let quintiles = |mut values: Vec<f64>| -> Vec<f64> {
        values.sort_by(f64::total_cmp);
        [20, 40, 60, 80]
            .iter()
            .map(|k| percentile(&values, *k))
            .collect()
    };
    let recency = quintiles(customers.iter().map(|c| c.recency_days).collect());
    let frequency = quintiles(customers.iter().map(|c| f64::from(c.frequency)).collect());
    let monetary = quintiles(customers.iter().map(|c| c.monetary).collect());
    assert_eq!(calibration.recency.to_vec(), recency);
    assert_eq!(calibration.frequency.to_vec(), frequency);
    assert!(customers.len() > 100, "{} customers", customers.len());

    let computed = engine.computed_traits_of(&profiles, NOW_MS).unwrap();
    let mut seen_segments = std::collections::BTreeSet::new();
    let mut seen_stages = std::collections::BTreeSet::new();
    let mut seen_levels = std::collections::BTreeSet::new();
    for (profile, traits) in profiles.iter().zip(&computed) {
        let events = events_of(profile);
        let sum = engagement_sum(events, &config, at);
        let expected = if sum > 0.0 {
            points.iter().filter(|p| **p <= sum).count() as u8
        } else {
            0
        };
        assert_eq!(traits.score.engagement, expected, "engagement of {profile}");

        match (rfm(events, &config), &traits.rfm) {
            (None, None) => {}
            (Some(reference), Some(got)) => {
                let above = |v: f64, b: &[f64]| b.iter().filter(|x| v > **x).count() as u8;
                let r = 5 - above(reference.recency_days, &recency);
                let f = 1 + above(f64::from(reference.frequency), &frequency);
                let m = 1 + above(reference.monetary, &monetary);
                assert_eq!((got.r, got.f, got.m), (r, f, m), "rfm of {profile}");
                assert!(
                    (got.monetary - reference.monetary).abs() < 0.01 * reference.monetary.max(1.0)
                );
                assert_eq!(got.segment, segment_of(r, (f + m).div_ceil(2)), "{profile}");
                seen_segments.insert(got.segment);
            }
            (reference, got) => panic!(
                "rfm of {profile}: reference customer {}, got {got:?}",
                reference.is_some()
            ),
        }

        let (score, level, category) = intent(events, &config);
        assert!(
            (traits.intent.score - score).abs() < 1e-9,
            "intent of {profile}"
        );
        assert_eq!(traits.intent.level, level, "intent level of {profile}");
        assert_eq!(
            traits.intent.category, category,
            "intent category of {profile}"
        );
        seen_levels.insert(level);

        let stage = lifecycle(events, &config);
        assert_eq!(traits.lifecycle, stage, "lifecycle of {profile}");
        seen_stages.insert(stage);

        let (hour, weekday, n) = send_time(events, &config);
        if n >= config.send_time.min_events {
            assert_eq!(
                (
                    traits.send_time.hour,
                    traits.send_time.weekday,
                    traits.send_time.source
                ),
                (hour, weekday, "profile"),
                "send time of {profile}"
            );
        } else {
            assert_eq!(traits.send_time.source, "population");
        }

        assert_eq!(
            traits.affinity.category,
            affinity(events, &config),
            "affinity of {profile}"
        );
    }
    // The data exercises the traits, not just their defaults.
    assert!(seen_segments.len() >= 6, "{seen_segments:?}");
    assert!(seen_stages.len() >= 4, "{seen_stages:?}");
    assert!(seen_levels.len() >= 3, "{seen_levels:?}");
}

#[test]
fn the_product_model_matches_a_count_over_the_orders() {
    let (_dir, engine) = loaded();
    let model = engine.build_product_model(NOW_MS).unwrap();
    // Independently: buyers per (category, product) and viewers-who-bought pairs.
    let mut buyers: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut pairs: BTreeMap<(String, String), u64> = BTreeMap::new();
    let by_profile = events_by_profile(&engine);
    for events in by_profile.values() {
        let mut bought: BTreeMap<String, String> = BTreeMap::new();
        let mut viewed = std::collections::BTreeSet::new();
        for (_, name, properties, _) in events {
            if name == "Product Viewed"
                && let Some(product) = text(properties, "product_id")
            {
                viewed.insert(product.to_string());
            }
            if name == "Order Completed" {
                for line in properties["products"].as_array().into_iter().flatten() {
                    let product = line["product_id"].as_str().unwrap().to_string();
                    bought.insert(product, line["category"].as_str().unwrap().to_string());
                }
            }
        }
        for (product, category) in &bought {
            *buyers
                .entry((category.clone(), product.clone()))
                .or_default() += 1;
            for x in viewed.iter().filter(|x| *x != product) {
                *pairs.entry((x.clone(), product.clone())).or_default() += 1;
            }
        }
    }
    let best = |counts: &BTreeMap<(String, String), u64>, group: &str| -> Vec<String> {
        let mut items: Vec<(u64, &String)> = counts
            .iter()
            .filter(|((g, _), _)| g == group)
            .map(|((_, item), n)| (*n, item))
            .collect();
        items.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(b.1)));
        items.into_iter().take(20).map(|(_, i)| i.clone()).collect()
    };
    assert!(model.top.len() >= 5, "{:?}", model.top.keys());
    for (category, top) in &model.top {
        assert_eq!(top, &best(&buyers, category), "{category}");
    }
    for (viewed, also) in model.also_bought.iter().take(50) {
        assert_eq!(also, &best(&pairs, viewed), "{viewed}");
    }
    // Recommendations never offer what the profile bought.
    for profile in engine.live_profiles().into_iter().take(200) {
        let items = engine.recommend(profile, 6, NOW_MS).unwrap();
        let mine = &by_profile[&profile];
        for item in items {
            assert!(
                !mine.iter().any(|(_, name, p, _)| name == "Order Completed"
                    && p["products"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|l| l["product_id"] == item.product_id.as_str())),
                "profile {profile} offered {} it bought",
                item.product_id
            );
        }
    }
}

#[test]
fn rfm_grid_names_every_cell() {
    for r in 1..=5 {
        for fm in 1..=5 {
            assert_eq!(
                super::rfm_segment(r, fm),
                segment_of(r, fm),
                "R {r}, FM {fm}"
            );
        }
    }
}

#[test]
fn recommendations_follow_the_documented_order_and_skip_purchases() {
    use super::recommend::{Activity, ModelCounts, recommend};
    let props = |product: &str, category: &str| {
        let mut map = Map::new();
        map.insert("product_id".into(), Value::from(product));
        map.insert("category".into(), Value::from(category));
        map
    };
    let day = 86_400_000;
    let now = NOW_MS;
    // The population: viewers of A bought B (and one of them F); others made C the best
    // seller in shoes.
    let mut counts = ModelCounts::default();
    let order_of = |products: serde_json::Value| {
        let mut order = Map::new();
        order.insert("products".into(), products);
        order
    };
    for i in 0..3 {
        let mut viewer = Activity::default();
        viewer.add("Product Viewed", now - day, &props("A", "shoes"));
        let mut bought = vec![serde_json::json!({"product_id": "B", "category": "bags"})];
        if i == 0 {
            bought.push(serde_json::json!({"product_id": "F", "category": "shoes"}));
        }
        viewer.add("Order Completed", now - day, &order_of(Value::from(bought)));
        counts.add(&viewer);
    }
    for _ in 0..4 {
        let mut buyer = Activity::default();
        buyer.add(
            "Order Completed",
            now - day,
            &order_of(serde_json::json!([{"product_id": "C", "category": "shoes"}])),
        );
        counts.add(&buyer);
    }
    let model = counts.finish(now);
    assert_eq!(model.top["shoes"], ["C", "F"]);
    assert_eq!(model.also_bought["A"], ["B", "F"]);

    let mut me = Activity::default();
    me.add("Product Viewed", now - 40 * day, &props("OLD", "shoes"));
    me.add("Product Viewed", now - 3 * day, &props("A", "shoes"));
    me.add("Product Added", now - 2 * day, &props("E", "shoes"));
    me.add("Product Viewed", now - day, &props("D", "shoes"));
    let mut order = Map::new();
    order.insert(
        "products".into(),
        serde_json::json!([{"product_id": "D", "category": "shoes"}]),
    );
    me.add("Order Completed", now - day / 2, &order);
    let got: Vec<(String, &str)> = recommend(&me, &model, now, 10)
        .into_iter()
        .map(|r| (r.product_id, r.reason))
        .collect();
    assert_eq!(
        got,
        [
            ("E".to_string(), "abandoned_cart"),
            ("A".to_string(), "recently_viewed"),
            ("B".to_string(), "viewed_also_bought"),
            ("F".to_string(), "viewed_also_bought"),
            ("C".to_string(), "top_in_category"),
        ]
    );
    assert_eq!(recommend(&me, &model, now, 2).len(), 2);
}

#[test]
fn the_server_recalibrates_once_a_day_and_live_segments_follow() {
    let (_dir, engine) = loaded();
    let day = 86_400_000;
    assert!(
        !engine.refresh_traits_if_older(NOW_MS, day).unwrap(),
        "nothing before a first calibration"
    );
    let first = engine.calibrate(NOW_MS).unwrap();
    let rule = cible_lang::parse("score.engagement >= 50").unwrap();
    engine
        .create_segment("engaged", rule.clone(), "", NOW_MS)
        .unwrap();
    engine.start_live_segments(NOW_MS).unwrap();
    assert!(
        !engine
            .refresh_traits_if_older(NOW_MS + day - 1, day)
            .unwrap()
    );
    let later = NOW_MS + 3 * day;
    assert!(engine.refresh_traits_if_older(later, day).unwrap());
    let second = engine.calibration(later).unwrap();
    assert_eq!(i64::from(second.at), later / 1000);
    assert_ne!(first.at, second.at);
    // The live membership is the one the new calibration gives.
    let (expected, _, _) = engine
        .evaluate_rule(&rule, later, &std::sync::atomic::AtomicU64::new(0))
        .unwrap();
    assert_eq!(engine.live_members("engaged").unwrap(), expected);
}
