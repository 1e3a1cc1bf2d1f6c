//! Language tests: the issue's rules with their exact trees, the printer round trip, the JSON
//! form, and error messages as the user sees them.

use serde_json::json;

use super::*;
use crate::check::{Catalog, check, dependency_order};

/// Parses, prints, parses again: the same tree.
fn round_trip(source: &str) -> Expr {
    let expr = parse(source).unwrap_or_else(|d| panic!("{}", d.render(source)));
    let printed = expr.to_string();
    let again =
        parse(&printed).unwrap_or_else(|d| panic!("reprint {printed:?}: {}", d.render(&printed)));
    assert_eq!(
        strip_spans(&expr),
        strip_spans(&again),
        "printed as {printed}"
    );
    let json = serde_json::to_value(&expr).unwrap();
    assert_eq!(
        strip_spans(&from_json(&json).unwrap()),
        strip_spans(&expr),
        "JSON form {json}"
    );
    expr
}

/// Spans differ between a text and its reprint; compare trees through their JSON form.
fn strip_spans(expr: &Expr) -> serde_json::Value {
    serde_json::to_value(expr).unwrap()
}

fn error(source: &str) -> String {
    match parse(source) {
        Ok(expr) => panic!("{source:?} parsed as {expr}"),
        Err(diagnostic) => diagnostic.render(source),
    }
}

#[test]
fn the_issue_rules_parse_to_these_trees() {
    let expr = round_trip(
        r#"count("Email Opened", 7d) >= 3 and did("Product Viewed" where product_id = "P123", 30d) and not did("Order Completed", 30d)"#,
    );
    assert_eq!(
        strip_spans(&expr),
        json!({"op": "and", "args": [
            {"op": "compare", "left": {"fn": "count", "event": {"name": "Email Opened"}, "window": "7d"}, "cmp": ">=", "right": 3.0},
            {"op": "did", "event": {"name": "Product Viewed", "where": [{"property": "product_id", "cmp": "=", "value": "P123"}]}, "window": "30d"},
            {"op": "not", "arg": {"op": "did", "event": {"name": "Order Completed"}, "window": "30d"}}
        ]})
    );
    let expr = round_trip(r#"sum("Order Completed".revenue, 365d) > 500"#);
    assert_eq!(
        strip_spans(&expr),
        json!({"op": "compare", "left": {"fn": "sum", "event": {"name": "Order Completed"}, "property": "revenue", "window": "365d"}, "cmp": ">", "right": 500.0})
    );
    round_trip(r#"did("Product Added", 3d) and not did("Order Completed", 3d)"#);
    let expr = round_trip(r#"days_since("Order Completed") > 60"#);
    assert_eq!(expr.to_string(), r#"days_since("Order Completed") > 60"#);
    let expr = round_trip(
        r#"count("Page Viewed" where path starts_with "/blog/", 14d) >= 2 or trait.plan = "pro""#,
    );
    assert_eq!(
        strip_spans(&expr)["args"][1],
        json!({"op": "compare", "left": {"fn": "attribute", "name": "trait.plan"}, "cmp": "=", "right": "pro"})
    );
}

#[test]
fn every_construct_round_trips() {
    for source in [
        r#""Product Added" then not "Order Completed" within 24h"#,
        r#""Email Link Clicked" where campaign_id = "spring" then "Order Completed" within 2d"#,
        r#"avg("Order Completed".revenue where currency in ("EUR", "USD"), 90d) >= 40.5"#,
        r#"min("Page Viewed".duration_s) < 5 and max("Order Completed".revenue, 30d) >= 100"#,
        r#"days_since_first("Order Completed") <= 30 and days_since_first_seen() > 7 and days_since_last_seen() < 2"#,
        r#"trait.country in ("FR", "BE") and not (trait.plan = "free" or trait.vip = true)"#,
        r#"in_segment("vip") and trait.email contains "@example.com""#,
        r#"count("Page Viewed" where path != "/" and duration_s > 10) >= 3 -- engaged readers"#,
        r#"trait.address.city starts_with "Par""#,
    ] {
        round_trip(source);
    }
}

#[test]
fn precedence_is_not_then_and_then_or() {
    let expr = parse(r#"not did("A") and did("B") or did("C")"#).unwrap();
    assert_eq!(expr.to_string(), r#"not did("A") and did("B") or did("C")"#);
    let Expr::Or { args } = &expr else {
        panic!("or at the top: {expr:?}")
    };
    assert!(matches!(&args[0], Expr::And { args } if matches!(args[0], Expr::Not { .. })));
    let grouped = parse(r#"not (did("A") or did("B"))"#).unwrap();
    assert_eq!(grouped.to_string(), r#"not (did("A") or did("B"))"#);
}

#[test]
fn errors_point_at_the_text_with_a_caret_and_a_suggestion() {
    assert_eq!(
        error(r#"cout("Email Opened", 7d) >= 3"#),
        "error[E004]: unknown function `cout`\n --> line 1, column 1\n  |\n1 | cout(\"Email Opened\", 7d) >= 3\n  | ^^^^\n  = help: did you mean `count`?"
    );
    assert_eq!(
        error("did(\"A\", 7d)\n  and count(\"B\", 7days) >= 1"),
        "error[E006]: `7days` is not a window; use a unit of m, h, d or w (e.g. 7d)\n --> line 2, column 18\n  |\n2 |   and count(\"B\", 7days) >= 1\n  |                  ^^^^^"
    );
    assert!(error(r#"count("A", 7d)"#).contains("is a value: compare it"));
    assert!(error(r#"count("A", 7d) >= "many""#).contains("E008"));
    assert!(error(r#"did("A", 7d) did("B")"#).contains("join conditions with `and` or `or`"));
    assert!(error(r#""A" and did("B")"#).contains("an event name alone is not a condition"));
    assert!(error(r#"did("A"#).contains("E002"));
    assert!(error(r#"scores.engagement > 80"#).contains("did you mean `score`?"));
    assert_eq!(
        error(r#"score.engagment > 80"#),
        "error[E011]: unknown computed trait `score.engagment`\n --> line 1, column 1\n  |\n1 | score.engagment > 80\n  | ^^^^^^^^^^^^^^^\n  = help: did you mean `score.engagement`?"
    );
    assert!(error(r#"traits.plan = "pro""#).contains("did you mean `trait`?"));
    assert!(error(r#"trait.country in ()"#).contains("E012"));
    assert!(error(r#""A" then "B""#).contains("within"));
}

#[test]
fn computed_traits_read_like_attributes() {
    for rule in [
        r#"score.engagement >= 80"#,
        r#"rfm.segment = "champions""#,
        r#"lifecycle = "at_risk""#,
        r#"intent.level = "high" and not (lifecycle in ("churned", "dormant"))"#,
        r#"send_time.hour < 12 or affinity.category = "shoes""#,
    ] {
        round_trip(rule);
    }
    let expr = parse(r#"lifecycle = "at_risk""#).unwrap();
    assert_eq!(
        serde_json::to_value(&expr).unwrap()["left"],
        json!({"fn": "attribute", "name": "lifecycle"})
    );
}

#[test]
fn nesting_has_a_limit() {
    let deep = format!("{}did(\"A\"){}", "(".repeat(100), ")".repeat(100));
    assert!(error(&deep).contains("E007"));
    let nots = format!("{}did(\"A\")", "not ".repeat(100));
    assert!(error(&nots).contains("E007"));
}

#[test]
fn unknown_events_warn_with_the_closest_name_and_unknown_segments_fail() {
    let source = r#"did("Email Opend", 7d) and in_segment("vips")"#;
    let expr = parse(source).unwrap();
    let events = vec!["Email Opened".to_string(), "Order Completed".to_string()];
    let segments = vec!["vip".to_string()];
    let found = check(
        &expr,
        &Catalog {
            event_names: &events,
            segments: &segments,
            models: &[],
            purposes: &[],
        },
        source,
    );
    assert_eq!(found.len(), 2);
    assert_eq!(found[0].severity, Severity::Warning);
    assert_eq!(
        found[0].render(source),
        "warning[W101]: no event named \"Email Opend\" has been received yet\n --> line 1, column 5\n  |\n1 | did(\"Email Opend\", 7d) and in_segment(\"vips\")\n  |     ^^^^^^^^^^^^^\n  = help: did you mean \"Email Opened\"?"
    );
    assert_eq!(found[1].severity, Severity::Error);
    assert_eq!(found[1].suggestion.as_deref(), Some("\"vip\""));
}

#[test]
fn cycles_are_named_and_order_puts_dependencies_first() {
    let deps = |pairs: &[(&str, &[&str])]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
            .collect()
    };
    let order = dependency_order(&deps(&[("a", &["b"]), ("b", &["c"]), ("c", &[])])).unwrap();
    assert_eq!(order, ["c", "b", "a"]);
    let cycle =
        dependency_order(&deps(&[("a", &["b"]), ("b", &["c"]), ("c", &["a"])])).unwrap_err();
    assert_eq!(cycle, ["a", "b", "c", "a"]);
}

#[test]
fn json_errors_name_the_problem() {
    let error =
        from_json(&json!({"op": "did", "event": {"name": "A"}, "window": "7 days"})).unwrap_err();
    assert!(error.message.contains("not a window"), "{}", error.message);
    let error = from_json(&json!({"op": "maybe"})).unwrap_err();
    assert!(
        error.message.contains("unknown variant"),
        "{}",
        error.message
    );
}

#[test]
fn every_example_in_the_documentation_parses() {
    let doc = include_str!("../../../docs/segment-language.md");
    let mut examples = Vec::new();
    let mut current: Option<String> = None;
    for line in doc.lines() {
        match (&mut current, line.trim()) {
            (None, "```cible") => current = Some(String::new()),
            (Some(_), "```") => examples.push(current.take().expect("open block")),
            (Some(text), _) => {
                text.push_str(line);
                text.push('\n');
            }
            (None, _) => {}
        }
    }
    assert!(examples.len() >= 20, "found {} examples", examples.len());
    for example in examples {
        round_trip(&example);
    }
    // The JSON form shown in the documentation is accepted too.
    let json_start = doc.find("```json\n").expect("a JSON example") + "```json\n".len();
    let json_end = json_start + doc[json_start..].find("```").expect("closed");
    let value: serde_json::Value = serde_json::from_str(&doc[json_start..json_end]).unwrap();
    from_json(&value).unwrap();
}

#[test]
fn model_outputs_need_a_trained_model() {
    let source = r#"predicted.purchse_30d > 0.5 or cluster.id = 2"#;
    let expr = parse(source).unwrap();
    let catalog = |models: &'static [&'static str]| -> Vec<String> {
        models.iter().map(|m| m.to_string()).collect()
    };
    let models = catalog(&["purchase_30d"]);
    let found = check(
        &expr,
        &Catalog {
            event_names: &[],
            segments: &[],
            models: &models,
            purposes: &[],
        },
        source,
    );
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!(
        found[0].render(source),
        "error[E014]: no model named \"purchse_30d\" is trained: `cible model train --target <purchase|open|churn> --days N` trains <target>_<N>d\n --> line 1, column 1\n  |\n1 | predicted.purchse_30d > 0.5 or cluster.id = 2\n  | ^^^^^^^^^^^^^^^^^^^^^\n  = help: did you mean `predicted.purchase_30d`?"
    );
    assert!(found[1].message.contains("cible model cluster"));
    let models = catalog(&["purchase_30d", "cluster"]);
    let clean = Catalog {
        event_names: &[],
        segments: &[],
        models: &models,
        purposes: &[],
    };
    let source = "predicted.purchase_30d > 0.5 or cluster.id = 2";
    assert!(check(&parse(source).unwrap(), &clean, source).is_empty());
}

#[test]
fn windows_are_at_most_ten_years_and_never_overflow() {
    // The longest window is accepted, in every unit that reaches it.
    round_trip(r#"did("A", 3650d) and count("B", 87600h) > 1 and did("C", 5256000m)"#);
    // One more day, or numbers whose milliseconds do not fit in 64 bits, are refused with their
    // own code, pointing at the window.
    for window in [
        "3651d",
        "522w",
        "87601h",
        "106751991168d",
        "9223372036854775807m",
        "99999999999999999999999d",
    ] {
        let source = format!(r#"did("X", {window})"#);
        let diagnostic = parse(&source).unwrap_err();
        assert_eq!(diagnostic.code, Code::WindowTooLong, "{window}");
        assert_eq!(diagnostic.code.label(), "E015");
        assert_eq!(diagnostic.column, 10, "{window}");
        assert_eq!(
            diagnostic.render(&source),
            format!(
                "error[E015]: `{window}` is longer than the longest window, 3650d (10 years)\n --> line 1, column 10\n  |\n1 | {source}\n  |          {}",
                "^".repeat(window.len())
            )
        );
    }
    assert!(error(r#"did("A", 0d)"#).contains("E006"));
    assert!(error(r#"did("A", 1.5d)"#).contains("E006"));
    // The JSON form: every field holding a window, with the field named.
    let did = |window: &str| json!({"op": "did", "event": {"name": "A"}, "window": window});
    assert!(from_json(&did("3650d")).is_ok());
    let rules = [
        ("window", did("106751991168d")),
        ("window", did("9223372036854775807m")),
        ("window", did("3651d")),
        (
            "window",
            json!({"op": "compare", "left": {"fn": "count", "event": {"name": "A"}, "window": "1000w"}, "cmp": ">", "right": 1}),
        ),
        (
            "window",
            json!({"op": "not", "arg": {"op": "compare", "left": {"fn": "sum", "event": {"name": "A"}, "property": "p", "window": "4000d"}, "cmp": ">", "right": 1}}),
        ),
        (
            "within",
            json!({"op": "sequence", "first": {"name": "A"}, "then": {"name": "B"}, "within": "9223372036854775807w"}),
        ),
    ];
    for (field, rule) in rules {
        let error = from_json(&rule).unwrap_err();
        assert_eq!(error.code, Code::WindowTooLong, "{rule}: {}", error.message);
        assert!(
            error.message.contains(&format!("`{field}`"))
                && error
                    .message
                    .contains("longer than the longest window, 3650d (10 years)"),
            "{rule}: {}",
            error.message
        );
    }
    // As docs/segment-language.md shows it.
    assert_eq!(
        from_json(&did("4000d")).unwrap_err().message,
        "invalid rule JSON: `window`: `4000d` is longer than the longest window, 3650d (10 years)"
    );
    // The stored form (a segment record) still reads a long window saved before the limit.
    let stored: Expr = serde_json::from_value(did("4000d")).unwrap();
    assert_eq!(stored.to_string(), r#"did("A", 4000d)"#);
    let error = from_json(&did("0d")).unwrap_err();
    assert_eq!(error.code, Code::InvalidJson);
    assert!(error.message.contains("`window`"), "{}", error.message);
}

#[test]
fn consent_reads_as_a_condition_and_compares_only_with_booleans() {
    let bare = parse("consent.email and trait.country = \"FR\"").unwrap();
    let explicit = parse("consent.email = true and trait.country = \"FR\"").unwrap();
    assert_eq!(bare, explicit);
    assert_eq!(
        parse("not consent.profiling").unwrap().to_string(),
        "not consent.profiling = true"
    );
    assert!(parse("consent.email != false").is_ok());
    assert!(parse("consent.sms_marketing").is_ok());
    for bad in [
        "consent.email = \"yes\"",
        "consent.email >= 1",
        "consent.email in (true)",
    ] {
        let error = error(bad);
        assert!(
            error.contains("error[E008]: consent.email is true or false"),
            "{bad}: {error}"
        );
    }
    let source = "consent.emial or consent.profiling";
    let purposes: Vec<String> = ["email", "profiling"]
        .iter()
        .map(|p| p.to_string())
        .collect();
    let found = check(
        &parse(source).unwrap(),
        &Catalog {
            event_names: &[],
            segments: &[],
            models: &[],
            purposes: &purposes,
        },
        source,
    );
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(
        found[0].render(source),
        "error[E016]: \"emial\" is not a consent purpose (add it to consent.toml's [purposes])\n --> line 1, column 1\n  |\n1 | consent.emial or consent.profiling\n  | ^^^^^^^^^^^^^\n  = help: did you mean `consent.email`?"
    );
}
