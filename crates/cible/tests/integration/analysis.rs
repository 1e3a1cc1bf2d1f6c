//! Analysis end to end: cohort retention checked cell by cell against DuckDB computing the same
//! table in SQL (`tests/sql/cohort_retention.py`) over `cible export events --purpose analytics`;
//! segment overlap against memberships listed by `cible segment members`; the bucketed size
//! history; the same answers and their errors through the HTTP API.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use super::common::*;

/// The Python path holding DuckDB (`tests/clients/install.sh`).
fn duckdb_path() -> PathBuf {
    clients_dir().join("py")
}

fn generated_store(dir: &Path, profiles: &str, days: &str) -> PathBuf {
    let data = dir.join("data");
    let file = dir.join("events.jsonl");
    run_ok(
        cible(&data)
            .args(["generate", "--profiles", profiles, "--days", days, "--out"])
            .arg(&file),
    );
    run_ok(cible(&data).arg("import").arg(&file));
    data
}

fn json_of(command: &mut Command) -> Value {
    serde_json::from_str(&run_ok(command)).expect("JSON output")
}

/// The table DuckDB computes.
fn duckdb_table(
    python: &Path,
    events: &Path,
    period: &str,
    active: Option<&str>,
    profiles: Option<&Path>,
) -> Vec<Value> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    // NOW in epoch seconds.
    let now = "1777636800";
    let mut command = Command::new("python3");
    command
        .arg(root.join("tests/sql/cohort_retention.py"))
        .arg(events)
        .args([period, now])
        .env("PYTHONPATH", python);
    if let Some(active) = active {
        command.arg("--active").arg(active);
    }
    if let Some(profiles) = profiles {
        command.arg("--profiles").arg(profiles);
    }
    let output = command.output().expect("python3 runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let answer: Value = serde_json::from_slice(&output.stdout).unwrap();
    answer["cohorts"].as_array().unwrap().clone()
}

/// Every cohort, every cell: start, size and counts equal; shares are counts over the size.
fn assert_same_table(ours: &Value, duckdb: &[Value], what: &str) {
    let cohorts = ours["cohorts"].as_array().unwrap();
    assert!(cohorts.len() > 1, "{what}: {ours}");
    assert_eq!(cohorts.len(), duckdb.len(), "{what}: number of cohorts");
    let mut cells = 0;
    for (mine, theirs) in cohorts.iter().zip(duckdb) {
        let start = mine["start"].as_str().unwrap();
        assert_eq!(mine["start"], theirs["start"], "{what}");
        assert_eq!(mine["size"], theirs["size"], "{what}: size of {start}");
        let counts = mine["counts"].as_array().unwrap();
        let expected = theirs["counts"].as_array().unwrap();
        assert_eq!(counts.len(), expected.len(), "{what}: cells of {start}");
        for (k, (count, share)) in counts
            .iter()
            .zip(mine["shares"].as_array().unwrap())
            .enumerate()
        {
            assert_eq!(count, &expected[k], "{what}: cohort {start}, cell {k}");
            let share = share.as_f64().unwrap();
            let exact = count.as_f64().unwrap() / mine["size"].as_f64().unwrap();
            assert!((share - exact).abs() < 1e-12, "{what}: {start} +{k}");
            cells += 1;
        }
    }
    let sizes: u64 = cohorts.iter().map(|c| c["size"].as_u64().unwrap()).sum();
    assert_eq!(ours["active_profiles"].as_u64().unwrap(), sizes, "{what}");
    assert!(cells > cohorts.len(), "{what}: cells beyond the first");
}

#[test]
fn cohort_retention_equals_duckdb_cell_by_cell() {
    let python = duckdb_path();
    let dir = tempfile::tempdir().unwrap();
    let data = generated_store(dir.path(), "400", "75");
    let before = json_of(cible(&data).args(["cohort", "retention", "--json"]));
    // Two people withdraw analytics: they leave the table (and the export).
    let permitted: BTreeSet<u64> = export_events(&data)
        .iter()
        .map(|e| e["profile"].as_u64().unwrap())
        .collect();
    for profile in permitted.iter().take(2) {
        run_ok(cible(&data).args([
            "profile",
            "consent",
            &profile.to_string(),
            "--withdraw",
            "analytics",
        ]));
    }
    let after = json_of(cible(&data).args(["cohort", "retention", "--json"]));
    assert_eq!(
        before["profiles"].as_u64().unwrap(),
        after["profiles"].as_u64().unwrap() + 2,
        "analytics consent"
    );
    let events = dir.path().join("export.jsonl");
    run_ok(
        cible(&data)
            .args(["export", "events", "--purpose", "analytics", "--out"])
            .arg(&events),
    );
    for period in ["day", "week", "month"] {
        for active in [None, Some("Order Completed,Product Added")] {
            let mut command = cible(&data);
            command.args(["cohort", "retention", "--period", period, "--json"]);
            if let Some(active) = active {
                command.args(["--active", active]);
            }
            let ours = json_of(&mut command);
            assert_eq!(ours["period"], period);
            let what = format!("{period}, active {active:?}");
            assert_same_table(
                &ours,
                &duckdb_table(&python, &events, period, active, None),
                &what,
            );
        }
    }

    // A segment's members only.
    create_segment(&data, "buyers", r#"did("Order Completed", 30d)"#);
    let members: Vec<u64> =
        run_ok(cible(&data).args(["segment", "members", "buyers", "--format", "jsonl"]))
            .lines()
            .map(|line| {
                serde_json::from_str::<Value>(line).unwrap()["profile"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
    assert!(members.len() > 10, "{members:?}");
    let kept = dir.path().join("buyers.json");
    std::fs::write(&kept, serde_json::to_string(&members).unwrap()).unwrap();
    let ours = json_of(cible(&data).args([
        "cohort",
        "retention",
        "--period",
        "week",
        "--segment",
        "buyers",
        "--json",
    ]));
    assert_eq!(ours["segment"], "buyers");
    assert_same_table(
        &ours,
        &duckdb_table(&python, &events, "week", None, Some(&kept)),
        "week, segment buyers",
    );

    // The table for people: one row per cohort, shares in percent.
    let text = run_ok(cible(&data).args(["cohort", "retention", "--period", "month"]));
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines[0].starts_with("retention by month (active: any event)"),
        "{text}"
    );
    assert!(
        lines[1].starts_with("cohort") && lines[1].contains("+2"),
        "{text}"
    );
    assert!(
        lines[2].starts_with("2026-02-01") && lines[2].contains("100.0%"),
        "{text}"
    );

    // Mistakes name the field or the segment.
    for (args, expected) in [
        (
            &["--active", "Never Sent"][..],
            "active: no event named \"Never Sent\"",
        ),
        (&["--segment", "ghost"][..], "segment \"ghost\" not found"),
        (&["--period", "year"][..], "invalid value 'year'"),
    ] {
        let output = cible(&data)
            .args(["cohort", "retention"])
            .args(args)
            .output()
            .unwrap();
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}

#[test]
fn overlap_and_bucketed_history_from_the_cli_and_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let data = generated_store(dir.path(), "300", "30");
    let rules = [
        ("buyers", r#"did("Order Completed", 30d)"#),
        ("viewers", r#"did("Product Viewed", 7d)"#),
        ("carts", r#"did("Product Added", 14d)"#),
        ("nobody", r#"did("Never Sent")"#),
    ];
    let mut members = Vec::new();
    for (name, rule) in rules {
        create_segment(&data, name, rule);
        let set: BTreeSet<u64> =
            run_ok(cible(&data).args(["segment", "members", name, "--format", "jsonl"]))
                .lines()
                .map(|line| {
                    serde_json::from_str::<Value>(line).unwrap()["profile"]
                        .as_u64()
                        .unwrap()
                })
                .collect();
        members.push(set);
    }
    let overlap = json_of(cible(&data).args([
        "segment", "overlap", "buyers", "viewers", "carts", "nobody", "--json",
    ]));
    let sizes: Vec<u64> = overlap["segments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["size"].as_u64().unwrap())
        .collect();
    assert_eq!(
        sizes,
        members.iter().map(|m| m.len() as u64).collect::<Vec<_>>()
    );
    let pairs = overlap["pairs"].as_array().unwrap();
    assert_eq!(pairs.len(), 6);
    let mut index = 0;
    for i in 0..rules.len() {
        for j in i + 1..rules.len() {
            let pair = &pairs[index];
            index += 1;
            assert_eq!(
                (pair["a"].as_str().unwrap(), pair["b"].as_str().unwrap()),
                (rules[i].0, rules[j].0)
            );
            let both = members[i].intersection(&members[j]).count() as u64;
            let either = members[i].union(&members[j]).count() as u64;
            assert_eq!(pair["intersection"].as_u64().unwrap(), both, "{pair}");
            assert_eq!(pair["union"].as_u64().unwrap(), either, "{pair}");
            let jaccard = if either == 0 {
                0.0
            } else {
                both as f64 / either as f64
            };
            assert!(
                (pair["jaccard"].as_f64().unwrap() - jaccard).abs() < 1e-12,
                "{pair}"
            );
        }
    }
    assert!(
        pairs[0]["intersection"].as_u64().unwrap() > 0,
        "buyers and viewers share someone"
    );
    let text = run_ok(cible(&data).args(["segment", "overlap", "buyers", "viewers"]));
    assert!(text.contains("jaccard"), "{text}");
    let output = cible(&data)
        .args(["segment", "overlap", "buyers", "ghost"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&output.stderr).contains("segment \"ghost\" not found"));

    // The history as a series: a refresh two days later changes the size; the days between
    // carry it forward.
    let later = "2026-05-03T09:00:00Z";
    run_ok(
        cible(&data)
            .env("CIBLE_NOW", later)
            .args(["segment", "refresh", "viewers"]),
    );
    let changes = json_of(
        cible(&data)
            .env("CIBLE_NOW", later)
            .args(["segment", "history", "viewers", "--every", "day", "--json"]),
    );
    assert_eq!(changes["every"], "day");
    let points = changes["points"].as_array().unwrap();
    let days: Vec<&str> = points.iter().map(|p| p["t"].as_str().unwrap()).collect();
    assert_eq!(
        days,
        [
            "2026-05-01T00:00:00.000Z",
            "2026-05-02T00:00:00.000Z",
            "2026-05-03T00:00:00.000Z"
        ]
    );
    let sizes: Vec<u64> = points.iter().map(|p| p["size"].as_u64().unwrap()).collect();
    assert_eq!(sizes[0], sizes[1], "carried forward");
    assert_eq!(sizes[0], members[1].len() as u64);
    let now_size = json_of(cible(&data).args(["segment", "show", "viewers", "--json"]))["size"]
        .as_u64()
        .unwrap();
    assert_eq!(sizes[2], now_size, "the last point is the size now");
    assert_ne!(
        sizes[2], sizes[0],
        "the refresh two days later changed the size"
    );
    let hourly = json_of(
        cible(&data)
            .env("CIBLE_NOW", later)
            .args(["segment", "history", "viewers", "--every", "hour", "--json"]),
    );
    assert_eq!(hourly["points"].as_array().unwrap().len(), 12 + 24 + 10);

    // The API answers the same, and names what is wrong.
    let admin = create_key(&data, "--admin");
    let server = Server::start(&data, &[]);
    super::concurrency::settle(&server.base);
    let answer = get(
        &server.url("/api/segments/overlap?names=buyers,viewers,carts,nobody"),
        &admin,
    );
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    // The server re-evaluated at its own now (the refresh above was two days later): the CLI,
    // going through it, answers what it answers.
    let through_server = json_of(cible(&data).args([
        "segment", "overlap", "buyers", "viewers", "carts", "nobody", "--json",
    ]));
    assert_eq!(answer.body, through_server);
    assert_eq!(answer.body["pairs"].as_array().unwrap().len(), 6);
    let answer = get(
        &server.url("/api/segments/overlap?names=buyers,ghost"),
        &admin,
    );
    assert_eq!(answer.status, 404, "{:?}", answer.body);
    assert!(
        answer.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ghost")
    );
    let answer = get(&server.url("/api/segments/overlap?names=buyers"), &admin);
    assert_eq!(
        (answer.status, &answer.body["error"]["field"]),
        (400, &Value::from("names"))
    );
    let answer = get(
        &server.url("/api/segments/viewers/history?every=week"),
        &admin,
    );
    assert_eq!(
        (answer.status, &answer.body["error"]["field"]),
        (400, &Value::from("every"))
    );
    let answer = get(
        &server.url("/api/segments/viewers/history?every=hour"),
        &admin,
    );
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body["points"][0]["t"], "2026-05-01T12:00:00.000Z");
    let answer = get(
        &server.url("/api/cohorts/retention?period=month&active=Order%20Completed"),
        &admin,
    );
    assert_eq!(answer.status, 200, "{:?}", answer.body);
    assert_eq!(
        answer.body["active"],
        serde_json::json!(["Order Completed"])
    );
    let local = json_of(cible(&data).args([
        "cohort",
        "retention",
        "--period",
        "month",
        "--active",
        "Order Completed",
        "--json",
    ]));
    assert_eq!(
        answer.body, local,
        "the CLI through the server answers the same"
    );
    let answer = get(&server.url("/api/cohorts/retention?period=year"), &admin);
    assert_eq!(
        (answer.status, &answer.body["error"]["field"]),
        (400, &Value::from("period"))
    );
    let answer = get(&server.url("/api/cohorts/retention?active=Nope"), &admin);
    assert_eq!(answer.status, 400);
    let answer = get(&server.url("/api/cohorts/retention?segment=ghost"), &admin);
    assert_eq!(answer.status, 404);
    let answer = get(&server.url("/api/cohorts/retention?color=red"), &admin);
    assert_eq!(
        (answer.status, &answer.body["error"]["field"]),
        (400, &Value::from("color"))
    );
    let answer = get(&server.url("/api/cohorts/retention"), "nope");
    assert_eq!(answer.status, 401);
    server.stop();
}
