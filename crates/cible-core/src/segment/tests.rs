//! Segment evaluation checked against an independent reference: each rule written again as
//! plain Rust over the full messages, on generated data.

use crate::engine::Engine;
use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::*;

const NOW_MS: i64 = 1_777_593_600_000; // 2026-05-01T00:00:00Z
const NOW: i64 = NOW_MS / 1000;
const DAY: i64 = 86_400;

/// One profile's events as the reference sees them: (seconds, name, properties).
type Timeline = Vec<(i64, String, serde_json::Map<String, Value>)>;

fn loaded() -> (tempfile::TempDir, Engine) {
    crate::test_support::generated_store(1500, 120, 11, NOW_MS)
}

fn timelines(engine: &Engine) -> Reference {
    let mut by_profile: BTreeMap<u32, (Timeline, BTreeMap<String, TraitValue>)> = BTreeMap::new();
    engine
        .for_each_event(|event| {
            if let Some(name) = event.message.behavioral_name() {
                let entry = by_profile.entry(event.profile).or_default();
                entry.0.push((
                    event.message.timestamp.div_euclid(1000),
                    name.to_string(),
                    event.message.properties,
                ));
            }
            Ok(())
        })
        .unwrap();
    for profile in engine.live_profiles() {
        let traits = engine.profile_record(profile).unwrap().traits;
        by_profile.entry(profile).or_default().1 = traits;
    }
    by_profile
}

fn in_window(ts: i64, days: i64) -> bool {
    NOW - days * DAY < ts && ts <= NOW
}

fn count(
    t: &Timeline,
    name: &str,
    days: i64,
    keep: impl Fn(&serde_json::Map<String, Value>) -> bool,
) -> usize {
    t.iter()
        .filter(|(ts, n, p)| n == name && in_window(*ts, days) && keep(p))
        .count()
}

type Reference = BTreeMap<u32, (Timeline, BTreeMap<String, TraitValue>)>;

fn check(
    &(engine, reference_data): &(&Engine, &Reference),
    rule: &str,
    reference: impl Fn(&Timeline, &BTreeMap<String, TraitValue>) -> bool,
) -> u64 {
    let expr = cible_lang::parse(rule).unwrap();
    let (members, _, _) = engine
        .evaluate_rule(&expr, NOW_MS, &AtomicU64::new(0))
        .unwrap();
    let expected: BTreeSet<u32> = reference_data
        .iter()
        .filter(|(_, (t, traits))| reference(t, traits))
        .map(|(p, _)| *p)
        .collect();
    let got: BTreeSet<u32> = members.iter().collect();
    assert_eq!(got, expected, "{rule}");
    got.len() as u64
}

#[test]
fn the_issue_rules_mean_what_they_say() {
    let (_dir, engine) = loaded();
    let data = timelines(&engine);
    let engine = (&engine, &data);
    let all = |_: &serde_json::Map<String, Value>| true;
    let n = check(
        &engine,
        r#"count("Email Opened", 7d) >= 3 and did("Product Viewed" where product_id = "P123", 30d) and not did("Order Completed", 30d)"#,
        |t, _| {
            count(t, "Email Opened", 7, all) >= 3
                && count(t, "Product Viewed", 30, |p| {
                    p.get("product_id") == Some(&Value::from("P123"))
                }) > 0
                && count(t, "Order Completed", 30, all) == 0
        },
    );
    let _ = n; // Rare in 1,500 profiles: the same meaning, looser thresholds, must select someone.
    let n = check(
        &engine,
        r#"count("Email Opened", 7d) >= 1 and did("Product Viewed" where product_id = "P123", 30d) and not did("Order Completed", 30d)"#,
        |t, _| {
            count(t, "Email Opened", 7, all) >= 1
                && count(t, "Product Viewed", 30, |p| {
                    p.get("product_id") == Some(&Value::from("P123"))
                }) > 0
                && count(t, "Order Completed", 30, all) == 0
        },
    );
    assert!(n > 0, "someone read P123 and opened an e-mail: {n}");
    assert!(
        check(&engine, r#"count("Email Opened", 7d) >= 3"#, |t, _| count(
            t,
            "Email Opened",
            7,
            all
        ) >= 3)
            > 0
    );
    let n = check(
        &engine,
        r#"sum("Order Completed".revenue, 365d) > 500"#,
        |t, _| {
            let sum: f64 = t
                .iter()
                .filter(|(ts, n, _)| n == "Order Completed" && in_window(*ts, 365))
                .map(|(_, _, p)| p.get("revenue").and_then(Value::as_f64).unwrap_or(0.0))
                .sum();
            sum > 500.0
        },
    );
    assert!(n > 10, "the rule should select someone: {n}");
    let n = check(
        &engine,
        r#"did("Product Added", 3d) and not did("Order Completed", 3d)"#,
        |t, _| count(t, "Product Added", 3, all) > 0 && count(t, "Order Completed", 3, all) == 0,
    );
    assert!(n > 0);
    let n = check(&engine, r#"days_since("Order Completed") > 60"#, |t, _| {
        t.iter()
            .filter(|(ts, n, _)| n == "Order Completed" && *ts <= NOW)
            .map(|(ts, _, _)| *ts)
            .max()
            .is_some_and(|last| (NOW - last) as f64 / DAY as f64 > 60.0)
    });
    assert!(n > 0);
    let n = check(
        &engine,
        r#"count("Page Viewed" where path starts_with "/blog/", 14d) >= 2 or trait.plan = "pro""#,
        |t, traits| {
            count(t, "Page Viewed", 14, |p| {
                p.get("path")
                    .and_then(Value::as_str)
                    .is_some_and(|s| s.starts_with("/blog/"))
            }) >= 2
                || traits.get("plan").is_some_and(|v| v.value == "pro")
        },
    );
    assert!(n > 0);
}

#[test]
fn properties_outside_the_hot_rows_sequences_and_aggregates() {
    let (_dir, engine) = loaded();
    let data = timelines(&engine);
    let engine = (&engine, &data);
    // category is never the hot key of Product Viewed (product_id is): full-message path.
    check(
        &engine,
        r#"count("Product Viewed" where category = "shoes", 30d) >= 2"#,
        |t, _| {
            count(t, "Product Viewed", 30, |p| {
                p.get("category") == Some(&Value::from("shoes"))
            }) >= 2
        },
    );
    check(
        &engine,
        r#"avg("Order Completed".revenue, 90d) >= 150 and max("Product Viewed".price, 30d) < 100"#,
        |t, _| {
            let revenues: Vec<f64> = t
                .iter()
                .filter(|(ts, n, _)| n == "Order Completed" && in_window(*ts, 90))
                .filter_map(|(_, _, p)| p.get("revenue").and_then(Value::as_f64))
                .collect();
            let prices: Vec<f64> = t
                .iter()
                .filter(|(ts, n, _)| n == "Product Viewed" && in_window(*ts, 30))
                .filter_map(|(_, _, p)| p.get("price").and_then(Value::as_f64))
                .collect();
            !revenues.is_empty()
                && revenues.iter().sum::<f64>() / revenues.len() as f64 >= 150.0
                && prices
                    .iter()
                    .copied()
                    .reduce(f64::max)
                    .is_some_and(|m| m < 100.0)
        },
    );
    let n = check(
        &engine,
        r#""Product Added" then not "Order Completed" within 1d"#,
        |t, _| {
            let Some(last_add) = t
                .iter()
                .filter(|(ts, n, _)| n == "Product Added" && *ts <= NOW)
                .map(|(ts, _, _)| *ts)
                .max()
            else {
                return false;
            };
            let ordered = t.iter().any(|(ts, n, _)| {
                n == "Order Completed" && *ts > last_add && *ts <= last_add + DAY && *ts <= NOW
            });
            !ordered && NOW >= last_add + DAY
        },
    );
    assert!(n > 0);
}

#[test]
fn segments_store_members_log_changes_and_refuse_cycles() {
    let (_dir, engine) = loaded();
    let buyers = cible_lang::parse(r#"did("Order Completed", 30d)"#).unwrap();
    let record = engine.create_segment("buyers", buyers, "", NOW_MS).unwrap();
    let report = record.last_backfill.clone().unwrap();
    assert_eq!(report.entered, record.size);
    assert!(record.size > 0);
    let rule = r#"in_segment("buyers") and trait.plan = "pro""#;
    let pro = engine
        .create_segment("pro-buyers", cible_lang::parse(rule).unwrap(), rule, NOW_MS)
        .unwrap();
    assert!(pro.size > 0 && pro.size < record.size);
    assert!(
        engine
            .members("pro-buyers")
            .unwrap()
            .is_subset(&engine.members("buyers").unwrap())
    );

    // Editing buyers to a 7-day window makes people exit, with the time logged.
    let later = NOW_MS + 86_400_000;
    let edited = engine
        .edit_segment(
            "buyers",
            cible_lang::parse(r#"did("Order Completed", 7d)"#).unwrap(),
            "",
            later,
        )
        .unwrap();
    let changes = engine.segment_changes("buyers").unwrap();
    let exits = changes
        .iter()
        .filter(|c| !c.entered && c.at == later)
        .count() as u64;
    assert_eq!(exits, edited.last_backfill.unwrap().exited);
    assert_eq!(changes.last().unwrap().size, edited.size);
    // Members keep the time they entered; those who left have none.
    let exited = changes
        .iter()
        .find(|c| !c.entered && c.at == later)
        .expect("someone left")
        .profile;
    assert_eq!(engine.entered_at("buyers", exited).unwrap(), None);
    let stayed = engine
        .members("buyers")
        .unwrap()
        .min()
        .expect("someone stayed");
    assert_eq!(engine.entered_at("buyers", stayed).unwrap(), Some(NOW_MS));

    let cycle = r#"in_segment("pro-buyers")"#;
    let error = engine
        .edit_segment("buyers", cible_lang::parse(cycle).unwrap(), cycle, later)
        .unwrap_err();
    assert!(
        error.to_string().contains("buyers -> pro-buyers -> buyers"),
        "{error}"
    );
    assert!(
        engine
            .delete_segment("buyers", later)
            .unwrap_err()
            .to_string()
            .contains("used by pro-buyers")
    );
    let buyers = engine.members("buyers").unwrap();
    assert!(buyers.len() > 1);
    engine.delete_segment("pro-buyers", later).unwrap();
    engine.delete_segment("buyers", later).unwrap();
    assert!(engine.segments().unwrap().is_empty());
    let prefix = crate::store::segment_prefix("buyers");
    assert_eq!(engine.store.entries.prefix(&prefix).count(), 0);
    assert_eq!(engine.store.segment_log.prefix(&prefix).count(), 0);

    // A deletion cut short after its record went leaves memberships no segment reads: a new
    // segment of that name does not inherit them.
    let stray = buyers.min().unwrap();
    engine
        .store
        .entries
        .insert(
            crate::store::entry_key("buyers", stray),
            NOW_MS.to_be_bytes(),
        )
        .unwrap();
    let nobody = r#"did("No Such Event", 1d)"#;
    let created = engine
        .create_segment("buyers", cible_lang::parse(nobody).unwrap(), nobody, later)
        .unwrap();
    assert_eq!(created.size, 0);
    assert!(engine.members("buyers").unwrap().is_empty());
    assert!(engine.segment_changes("buyers").unwrap().is_empty());
}

/// A random rule over events A, B, C with product_id, category (hidden behind product_id in the
/// hot rows: a property column) and revenue properties.
fn random_rule(rng: &mut rand_chacha::ChaCha8Rng, depth: u32) -> String {
    use rand::Rng;
    let event = |rng: &mut rand_chacha::ChaCha8Rng| ["A", "B", "C"][rng.random_range(0..3)];
    let window = |rng: &mut rand_chacha::ChaCha8Rng| {
        format!(
            "{}{}",
            rng.random_range(1..6),
            ["d", "h"][rng.random_range(0..2)]
        )
    };
    let filter = |rng: &mut rand_chacha::ChaCha8Rng| {
        let name = event(rng);
        match rng.random_range(0..4) {
            0 => format!(
                "{name:?} where product_id = \"P{}\"",
                rng.random_range(1..4)
            ),
            3 => format!(
                "{name:?} where category {}",
                ["= \"shoes\"", "!= \"bags\"", "in (\"bags\", \"hats\")"][rng.random_range(0..3)]
            ),
            1 => format!("{name:?} where revenue > {}", rng.random_range(0..50)),
            _ => format!("{name:?}"),
        }
    };
    if depth > 0 && rng.random_bool(0.4) {
        let left = random_rule(rng, depth - 1);
        let right = random_rule(rng, depth - 1);
        return match rng.random_range(0..3) {
            0 => format!("({left}) and ({right})"),
            1 => format!("({left}) or ({right})"),
            _ => format!("not ({left})"),
        };
    }
    match rng.random_range(0..10) {
        // Model outputs, from `property_models`.
        9 => [
            format!("cluster.id = {}", rng.random_range(0..3)),
            "cluster.name != \"c1\"".to_string(),
            format!(
                "predicted.p_1d >= {}",
                rng.random_range(1..10) as f64 / 10.0
            ),
        ][rng.random_range(0..3)]
        .clone(),
        6 => format!("trait.plan = {:?}", ["pro", "free"][rng.random_range(0..2)]),
        // Computed traits, configured by `PROPERTY_TRAITS` over A, B and C.
        7 => [
            format!(
                "lifecycle = {:?}",
                crate::computed::STAGES[rng.random_range(0..7)]
            ),
            format!("score.engagement >= {}", rng.random_range(0..100)),
            format!(
                "intent.level = {:?}",
                ["low", "medium", "high"][rng.random_range(0..3)]
            ),
            "intent.category = \"bags\"".to_string(),
        ][rng.random_range(0..4)]
        .clone(),
        8 => [
            format!("rfm.f >= {}", rng.random_range(1..4)),
            format!(
                "rfm.segment != {:?}",
                ["champions", "lost"][rng.random_range(0..2)]
            ),
            "affinity.category = \"shoes\"".to_string(),
            format!("send_time.hour < {}", rng.random_range(0..24)),
        ][rng.random_range(0..4)]
        .clone(),
        0 => format!("did({}, {})", filter(rng), window(rng)),
        1 => format!(
            "count({}, {}) >= {}",
            filter(rng),
            window(rng),
            rng.random_range(1..4)
        ),
        2 => format!(
            "sum({:?}.revenue, {}) > {}",
            event(rng),
            window(rng),
            rng.random_range(10..120)
        ),
        3 => format!("days_since({}) > {}", filter(rng), rng.random_range(1..5)),
        4 => format!(
            "{} then {}{} within {}",
            filter(rng),
            if rng.random_bool(0.5) { "not " } else { "" },
            filter(rng),
            window(rng)
        ),
        _ => format!("days_since_last_seen() < {}", rng.random_range(1..4)),
    }
}

/// Members of `rule` evaluated on every profile's full messages (no hot rows, no columns).
fn members_on_messages(engine: &Engine, rule: &str, now: i64) -> RoaringBitmap {
    let dictionaries = engine.dictionaries();
    let plan = plan::plan(&cible_lang::parse(rule).unwrap(), &dictionaries);
    // Computed traits come from the hot rows whatever the events evaluated.
    let computed = engine
        .segmenter()
        .computed_setup(std::slice::from_ref(&plan), &dictionaries, now)
        .unwrap();
    let mut members = RoaringBitmap::new();
    let profiling = engine.consent_check("profiling").unwrap();
    for profile in engine.live_profiles() {
        let record = engine.profile_record(profile).unwrap();
        let traits = record.traits;
        let hot = engine.hot();
        let lazy = computed.as_ref().map(|setup| {
            Lazy::new(
                hot.timeline(profile),
                (now / 1000) as u32,
                setup,
                profiling.permits(profile),
            )
        });
        // From the profile's own record, not the engine's index.
        let consented = |purpose: &str| {
            record
                .consents
                .current(purpose)
                .is_some_and(|change| change.granted)
        };
        let ctx = Context {
            now: (now / 1000) as u32,
            traits: &traits,
            in_segment: &|_| false,
            consented: &consented,
            computed: lazy.as_ref(),
        };
        let events =
            MessageEvents(super::full_events(&engine.store, profile, &dictionaries, None).unwrap());
        if evaluate(&plan, &events, &ctx).unwrap().member {
            members.insert(profile);
        }
    }
    members
}

/// Computed traits over the property test's events A, B and C, with short windows so that time
/// moves them within the test.
const PROPERTY_TRAITS: &str = r#"
[engagement]
half_life_days = 2
weights = { A = 1.0, B = 2.0, C = 3.0 }
[rfm]
order_event = "C"
window_days = 5
[intent]
window_days = 3
medium = 3.0
high = 6.0
signals = [{ event = "A", weight = 1.0 }, { event = "B", weight = 2.5, strength = "strong" }]
[lifecycle]
new_days = 1
active_days = 2
dormant_days = 4
churned_days = 7
reactivated_days = 2
loyal_orders = 2
loyal_window_days = 5
[send_time]
events = ["A"]
min_events = 2
[affinity]
window_days = 3
weights = { A = 1.0, B = 2.0 }
"#;

/// A 3-centroid cluster model and a logistic model `p_1d` with random parameters over every
/// feature (what the property test's events give: days since, engagement, RFM, categories).
fn property_models(engine: &Engine, rng: &mut rand_chacha::ChaCha8Rng, now: i64) {
    use crate::models::saved::{ModelKind, SavedModel};
    use rand::Rng;
    let mut features: Vec<String> = crate::features::FEATURES
        .iter()
        .map(|f| f.to_string())
        .collect();
    features.extend(["category_shoes".to_string(), "category_bags".to_string()]);
    let n = features.len();
    let model = |name: &str, kind: ModelKind| SavedModel {
        name: name.to_string(),
        version: 0,
        trained_at: now,
        training_seconds: 0.0,
        features: features.clone(),
        // log1p only: values of a few days or events land in 0..3.
        scales: vec![(0.0, 1.0); n],
        kind,
        training: crate::models::Training::KMeans(crate::models::ClusterParams {
            min_k: 3,
            max_k: 3,
            restarts: 1,
            sample: 10,
            seed: 0,
        }),
        report: serde_json::Value::Null,
    };
    let centroids = (0..3)
        .map(|_| (0..n).map(|_| rng.random_range(0.0..2.5)).collect())
        .collect();
    let clusters = ModelKind::KMeans {
        centroids,
        names: vec!["c0".into(), "c1".into(), "c2".into()],
    };
    engine.save_model(model("cluster", clusters), now).unwrap();
    let logistic = ModelKind::Logistic {
        target: crate::models::propensity::Target::Purchase,
        horizon_days: 1,
        weights: (0..n).map(|_| rng.random_range(-1.5..1.5)).collect(),
        intercept: rng.random_range(-1.0..1.0),
    };
    engine.save_model(model("p_1d", logistic), now).unwrap();
}

#[test]
fn incremental_timed_and_batch_evaluation_agree() {
    use rand::{Rng, SeedableRng};
    const HOUR_MS: i64 = 3_600_000;
    // 120 seeds pass in a release build (`cargo test --release -p cible-core incremental`);
    // CI runs fewer in debug.
    for seed in 0..24u64 {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("traits.toml"), PROPERTY_TRAITS).unwrap();
        let engine = Engine::open(dir.path()).unwrap();
        let start = NOW_MS;
        // Seed one event of each name so that rules compile against known names, then segments.
        let seed_batch: Vec<crate::Incoming> = ["A", "B", "C"]
            .iter()
            .map(|name| {
                let message = serde_json::json!({"type": "track", "userId": "seed", "event": name,
                    "messageId": format!("seed-{name}"), "timestamp": crate::time::format_ms(start)});
                crate::message::parse_message(message, None, &crate::ParseContext::at(start)).into()
            })
            .collect();
        engine
            .ingest(seed_batch, "test", crate::Durability::Buffered, start)
            .unwrap();
        property_models(&engine, &mut rng, start);
        let rules: Vec<String> = (0..6).map(|_| random_rule(&mut rng, 2)).collect();
        for (i, rule) in rules.iter().enumerate() {
            engine
                .create_segment(
                    &format!("s{i}"),
                    cible_lang::parse(rule).unwrap(),
                    rule,
                    start,
                )
                .unwrap();
        }
        engine.start_live_segments(start).unwrap();

        // Stream batches over 10 days; events arrive late, out of order, across 25 people.
        let mut now = start;
        let mut message = 0;
        for _ in 0..40 {
            now += rng.random_range(1..12) * HOUR_MS;
            engine.tick_segments(now).unwrap();
            let batch: Vec<crate::Incoming> = (0..rng.random_range(1..15))
                .map(|_| {
                    message += 1;
                    let ts = now - rng.random_range(0..48) * HOUR_MS - rng.random_range(0..3_600_000);
                    let name = ["A", "B", "C"][rng.random_range(0..3)];
                    let person = rng.random_range(0..25);
                    let plan = ["pro", "free"][rng.random_range(0..2)];
                    let category = [Some("shoes"), Some("bags"), None][rng.random_range(0..3)];
                    let timestamp = crate::time::format_ms(ts.max(start));
                    // Some people browse anonymously first and are identified later (merges).
                    let value = match rng.random_range(0..10) {
                        0 => serde_json::json!({"type": "identify", "userId": format!("u{person}"),
                            "anonymousId": format!("d{person}"), "messageId": format!("m{message}"), "timestamp": timestamp,
                            "traits": {"plan": plan}}),
                        1 | 2 => serde_json::json!({"type": "track", "anonymousId": format!("d{person}"),
                            "event": name, "messageId": format!("m{message}"), "timestamp": timestamp,
                            "properties": {"product_id": format!("P{}", rng.random_range(1..4)), "revenue": rng.random_range(0..60),
                                "category": category}}),
                        _ => serde_json::json!({"type": "track", "userId": format!("u{person}"),
                            "event": name, "messageId": format!("m{message}"), "timestamp": timestamp,
                            "properties": {"product_id": format!("P{}", rng.random_range(1..4)), "revenue": rng.random_range(0..60),
                                "category": category}}),
                    };
                    crate::message::parse_message(value, None, &crate::ParseContext::at(now)).into()
                })
                .collect();
            engine
                .ingest(batch, "test", crate::Durability::Buffered, now)
                .unwrap();
            for (i, rule) in rules.iter().enumerate() {
                let live = engine.live_members(&format!("s{i}")).unwrap();
                let (batch_members, _, _) = engine
                    .evaluate_rule(&cible_lang::parse(rule).unwrap(), now, &AtomicU64::new(0))
                    .unwrap();
                if live != batch_members {
                    for p in (&live ^ &batch_members).iter() {
                        eprintln!(
                            "profile {p}: alive={:?} events={:?} record={:?}",
                            engine.live_profiles().contains(&p),
                            engine.hot().events(p),
                            engine.profile_record(p).ok()
                        );
                    }
                }
                assert_eq!(
                    live, batch_members,
                    "seed {seed}, after a batch at {now}: {rule}"
                );
            }
        }
        // Then time alone: windows expire, delays elapse, thresholds are crossed.
        for _ in 0..30 {
            now += rng.random_range(1..20) * HOUR_MS;
            engine.tick_segments(now).unwrap();
            for (i, rule) in rules.iter().enumerate() {
                let live = engine.live_members(&format!("s{i}")).unwrap();
                let (batch_members, _, _) = engine
                    .evaluate_rule(&cible_lang::parse(rule).unwrap(), now, &AtomicU64::new(0))
                    .unwrap();
                assert_eq!(
                    live, batch_members,
                    "seed {seed}, time alone at {now}: {rule}"
                );
            }
        }
        // Property columns, kept up to date through merges and late events, answer as the
        // full messages do.
        // All rules in one pass, as a rebuild does (timelines grouped by event name).
        let exprs: Vec<Expr> = rules
            .iter()
            .map(|r| cible_lang::parse(r).unwrap())
            .collect();
        let together = engine
            .evaluate_rules(&exprs, now, &AtomicU64::new(0))
            .unwrap();
        for (rule, (batch_members, via_messages)) in rules.iter().zip(together) {
            assert_eq!(via_messages, 0, "{rule}");
            assert_eq!(
                batch_members,
                members_on_messages(&engine, rule, now),
                "seed {seed}, on full messages: {rule}"
            );
        }
        // The stored membership is the live one, and its log ends at the live size.
        for i in 0..rules.len() {
            let name = format!("s{i}");
            assert_eq!(
                engine.members(&name).unwrap(),
                engine.live_members(&name).unwrap()
            );
            if let Some(last) = engine.segment_changes(&name).unwrap().last() {
                assert_eq!(last.size, engine.members(&name).unwrap().len(), "{name}");
            }
        }
    }
}

#[test]
fn a_segment_on_an_event_not_yet_seen_fills_when_it_arrives() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let rule = r#"count("Email Opened", 7d) >= 2"#;
    // The drivers run first (a server), then the segment is created (through the API).
    engine.start_live_segments(NOW_MS).unwrap();
    engine
        .create_segment("openers", cible_lang::parse(rule).unwrap(), rule, NOW_MS)
        .unwrap();
    let items = (1..=2)
        .map(|day| {
            let ts = crate::time::format_ms(NOW_MS - day * 86_400_000);
            let message = serde_json::json!({"type": "track", "userId": "ann", "event": "Email Opened", "timestamp": ts});
            crate::message::parse_message(message, None, &crate::ParseContext::at(NOW_MS)).into()
        })
        .collect();
    engine
        .ingest(items, "test", crate::Durability::Buffered, NOW_MS)
        .unwrap();
    assert_eq!(engine.live_members("openers").unwrap().len(), 1);
    assert_eq!(engine.members("openers").unwrap().len(), 1);
}

#[test]
fn a_known_profile_enters_on_the_first_event_of_a_name_never_seen() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let ingest = |name: &str, days: &[i64]| {
        let items = days
            .iter()
            .map(|day| {
                let ts = crate::time::format_ms(NOW_MS - day * 86_400_000);
                let message = serde_json::json!({"type": "track", "userId": "ann", "event": name, "timestamp": ts});
                crate::message::parse_message(message, None, &crate::ParseContext::at(NOW_MS))
                    .into()
            })
            .collect();
        engine
            .ingest(items, "test", crate::Durability::Buffered, NOW_MS)
            .unwrap();
    };
    // Ann exists before the segment does; the event its rule reads does not exist yet.
    ingest("Page Viewed", &[3]);
    engine.start_live_segments(NOW_MS).unwrap();
    let rule = r#"count("Email Opened", 7d) >= 2"#;
    engine
        .create_segment("openers", cible_lang::parse(rule).unwrap(), rule, NOW_MS)
        .unwrap();
    // The batch that brings the name is the one that must select Ann for the segment.
    ingest("Email Opened", &[1, 2]);
    assert_eq!(engine.live_members("openers").unwrap().len(), 1);
    assert_eq!(engine.members("openers").unwrap().len(), 1);
}

#[test]
fn hot_rows_defer_to_full_messages_when_a_property_is_not_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    let engine = Engine::open(dir.path()).unwrap();
    let messages = [
        serde_json::json!({"type": "track", "userId": "num", "event": "Product Viewed", "properties": {"product_id": 123}}),
        serde_json::json!({"type": "track", "userId": "text", "event": "Order Completed", "properties": {"revenue": "n/a"}}),
        serde_json::json!({"type": "track", "userId": "both", "event": "Product Viewed",
            "properties": {"product_id": "P1", "category": "shoes"}}),
    ];
    let items = messages
        .iter()
        .map(|m| {
            crate::message::parse_message(m.clone(), None, &crate::ParseContext::at(NOW_MS)).into()
        })
        .collect();
    engine
        .ingest(items, "test", crate::Durability::Buffered, NOW_MS)
        .unwrap();
    let members = |rule: &str| -> Vec<u32> {
        let (members, _, _) = engine
            .evaluate_rule(
                &cible_lang::parse(rule).unwrap(),
                NOW_MS,
                &AtomicU64::new(0),
            )
            .unwrap();
        members.iter().collect()
    };
    let id = |user: &str| engine.find_profile(user).unwrap();
    assert_eq!(
        members(r#"did("Product Viewed" where product_id = 123)"#),
        [id("num")]
    );
    assert_eq!(
        members(r#"did("Order Completed" where revenue != 5)"#),
        [id("text")]
    );
    assert_eq!(
        members(r#"did("Product Viewed" where category = "shoes")"#),
        [id("both")]
    );
    assert_eq!(
        members(r#"did("Product Viewed" where product_id = "P1")"#),
        [id("both")]
    );
}

#[test]
fn compiled_sql_on_sqlite_and_duckdb_selects_the_same_members() {
    let (dir, engine) = loaded();
    // Export the documented layout's inputs as cible export would.
    let events = dir.path().join("export.jsonl");
    let profiles = dir.path().join("profiles.jsonl");
    let mut out = String::new();
    engine
        .for_each_event(|event| {
            out.push_str(&crate::view::event_json(event).to_string());
            out.push('\n');
            Ok(())
        })
        .unwrap();
    std::fs::write(&events, out).unwrap();
    let mut out = String::new();
    for profile in engine.live_profiles() {
        let traits: serde_json::Map<String, Value> = engine
            .profile_record(profile)
            .unwrap()
            .traits
            .into_iter()
            .map(|(k, t)| (k, t.value))
            .collect();
        out.push_str(&serde_json::json!({"profile": profile, "traits": traits}).to_string());
        out.push('\n');
    }
    std::fs::write(&profiles, out).unwrap();

    let mut expected = BTreeMap::new();
    for (i, rule) in super::BATTERY.iter().enumerate() {
        let expr = cible_lang::parse(rule).unwrap();
        let (members, _, _) = engine
            .evaluate_rule(&expr, NOW_MS, &AtomicU64::new(0))
            .unwrap();
        expected.insert(
            format!("r{i}"),
            members.iter().map(u64::from).collect::<Vec<u64>>(),
        );
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let install = std::process::Command::new("bash")
        .arg(root.join("tests/clients/install.sh"))
        .output()
        .unwrap();
    assert!(
        install.status.success(),
        "installing duckdb: {}",
        String::from_utf8_lossy(&install.stderr)
    );
    let python_path =
        std::path::PathBuf::from(String::from_utf8(install.stdout).unwrap().trim()).join("py");
    for (engine_name, dialect) in [
        ("sqlite", cible_lang::sql::Dialect::Sqlite),
        ("duckdb", cible_lang::sql::Dialect::DuckDb),
    ] {
        let queries: BTreeMap<String, String> = super::BATTERY
            .iter()
            .enumerate()
            .map(|(i, rule)| {
                (
                    format!("r{i}"),
                    cible_lang::sql::to_sql_for(&cible_lang::parse(rule).unwrap(), NOW, dialect),
                )
            })
            .collect();
        let queries_file = dir.path().join(format!("queries-{engine_name}.json"));
        std::fs::write(&queries_file, serde_json::to_string(&queries).unwrap()).unwrap();
        let output = std::process::Command::new("python3")
            .arg(root.join("tests/sql/sql_members.py"))
            .arg(engine_name)
            .arg(&events)
            .arg(&profiles)
            .arg(&queries_file)
            .env("PYTHONPATH", &python_path)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{engine_name}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
        let got: BTreeMap<String, Vec<u64>> =
            serde_json::from_value(answer["members"].clone()).unwrap();
        for (i, rule) in super::BATTERY.iter().enumerate() {
            let name = format!("r{i}");
            assert_eq!(
                got[&name], expected[&name],
                "{engine_name}: {rule}\n{}",
                queries[&name]
            );
        }
    }
    let non_empty = expected.values().filter(|m| !m.is_empty()).count();
    assert!(
        non_empty >= 16,
        "the battery should select people: {non_empty} of {} rules did",
        super::BATTERY.len()
    );
}

/// A pass of 256 profiles or more runs in parallel: on the segment worker's own pool, so a
/// global pool kept busy by admin work (a product model at a million profiles takes minutes)
/// does not hold it. Fails on a hang: without its own pool, the pass queues behind the jobs.
#[test]
fn a_large_pass_does_not_wait_for_admin_work_on_the_global_pool() {
    let dir = tempfile::tempdir().unwrap();
    let engine = std::sync::Arc::new(Engine::open(dir.path()).unwrap());
    engine.start_live_segments(NOW_MS).unwrap();
    let rule = r#"did("Email Opened", 7d)"#;
    engine
        .create_segment("openers", cible_lang::parse(rule).unwrap(), rule, NOW_MS)
        .unwrap();
    // Every thread of the global pool busy until released.
    let held = crate::threads::hold();
    let ingesting = std::sync::Arc::clone(&engine);
    let outcome = crate::threads::within(std::time::Duration::from_secs(30), move || {
        let ts = crate::time::format_ms(NOW_MS - 86_400_000);
        let items = (0..600)
            .map(|i| {
                let message = serde_json::json!({"type": "track", "userId": format!("u{i}"), "event": "Email Opened", "timestamp": ts});
                crate::message::parse_message(message, None, &crate::ParseContext::at(NOW_MS))
                    .into()
            })
            .collect();
        ingesting
            .ingest(items, "test", crate::Durability::Buffered, NOW_MS)
            .unwrap();
    });
    drop(held);
    outcome.expect("the pass ran while the global pool was busy");
    assert_eq!(engine.live_members("openers").unwrap().len(), 600);
}

/// A stopping process ends a pass over everyone at its next chunk (the server then exits in
/// seconds instead of finishing a segment edit over a million profiles); small passes still
/// run; the next start evaluates everyone and lands where a full pass would have.
#[test]
fn a_stop_ends_a_long_pass_and_the_next_start_completes_it() {
    let dir = tempfile::tempdir().unwrap();
    let ts = crate::time::format_ms(NOW_MS - 86_400_000);
    let openers = |from: usize, to: usize| -> Vec<_> {
        (from..to)
            .map(|i| {
                let message = serde_json::json!({"type": "track", "userId": format!("u{i}"), "event": "Email Opened", "timestamp": ts});
                crate::message::parse_message(message, None, &crate::ParseContext::at(NOW_MS))
                    .into()
            })
            .collect()
    };
    let rule = r#"did("Email Opened", 7d)"#;
    {
        let engine = Engine::open(dir.path()).unwrap();
        engine
            .ingest(
                openers(0, 3000),
                "test",
                crate::Durability::Buffered,
                NOW_MS,
            )
            .unwrap();
        engine.start_live_segments(NOW_MS).unwrap();
        engine.stop_segment_passes();
        let created =
            engine.create_segment("openers", cible_lang::parse(rule).unwrap(), rule, NOW_MS);
        assert!(
            matches!(created, Err(crate::EngineError::Cancelled)),
            "{created:?}"
        );
        assert!(engine.members("openers").unwrap().len() < 3000);
        // The batches committed after the stop are still evaluated, in full: a new member,
        // and the exit of a removed one.
        engine
            .ingest(
                openers(5000, 5001),
                "test",
                crate::Durability::Buffered,
                NOW_MS,
            )
            .unwrap();
        let new = engine.find_profile("u5000").unwrap();
        assert!(engine.live_members("openers").unwrap().contains(new));
        engine.remove_profile(new).unwrap();
        assert!(!engine.members("openers").unwrap().contains(new));
    }
    let engine = Engine::open(dir.path()).unwrap();
    engine.start_live_segments(NOW_MS).unwrap();
    assert_eq!(engine.members("openers").unwrap().len(), 3000);
    let changes = engine.changes_after(0, 10_000).unwrap();
    let entered: std::collections::BTreeSet<u32> = changes
        .iter()
        .filter(|c| c.segment == "openers" && c.entered)
        .map(|c| c.profile)
        .collect();
    assert_eq!(entered.len(), 3001, "each member entered once in the feed");
    assert_eq!(
        changes.iter().filter(|c| c.segment == "openers").count(),
        3002,
        "and u5000 left once"
    );
    // After a stop, a small pass (an acknowledged batch) still runs.
    engine.stop_segment_passes();
    engine
        .ingest(
            openers(3000, 3001),
            "test",
            crate::Durability::Buffered,
            NOW_MS,
        )
        .unwrap();
    assert_eq!(engine.live_members("openers").unwrap().len(), 3001);
}
