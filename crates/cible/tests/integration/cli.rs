//! The command line: generate, import (twice), profile show, unmerge, quality replay.

use serde_json::Value;

use super::common::*;

#[test]
fn generate_import_twice_show_and_unmerge() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("events.jsonl.gz");
    run_ok(
        cible(&data)
            .args([
                "generate",
                "--profiles",
                "400",
                "--days",
                "40",
                "--seed",
                "9",
                "--out",
            ])
            .arg(&file),
    );
    let first: Value =
        serde_json::from_str(&run_ok(cible(&data).arg("import").arg(&file).arg("--json"))).unwrap();
    assert!(first["accepted"].as_u64().unwrap() > 5_000);
    assert!(first["duplicates"].as_u64().unwrap() > 0);
    assert!(
        first["profiles_merged"].as_u64().unwrap() > 0,
        "second devices get merged"
    );
    let second: Value =
        serde_json::from_str(&run_ok(cible(&data).arg("import").arg(&file).arg("--json"))).unwrap();
    assert_eq!(
        second["accepted"], 0,
        "importing the same file twice adds nothing"
    );
    assert_eq!(
        second["quarantined"], first["quarantined"],
        "bad lines are reported again"
    );

    // A merged profile, shown by userId, then unmerged.
    let merges = run_ok(cible(&data).args(["profile", "merges"]));
    let line = merges.lines().next().expect("at least one merge");
    let merge_id = line[1..line.find(' ').unwrap()].to_string();
    let from: String = line.split_whitespace().nth(1).unwrap().to_string();
    let show: Value = serde_json::from_str(&run_ok(
        cible(&data).args(["profile", "show", &from, "--json"]),
    ))
    .unwrap();
    let survivor = show["id"].as_u64().unwrap();
    assert_ne!(
        survivor.to_string(),
        from,
        "the absorbed profile number leads to the survivor"
    );
    assert_eq!(
        show["requested_merged_profile"],
        from.parse::<u64>().unwrap()
    );
    let before = show["event_count"].as_u64().unwrap();
    let text = run_ok(cible(&data).args(["profile", "unmerge", &merge_id]));
    assert!(text.contains("undone"), "{text}");
    let restored: Value = serde_json::from_str(&run_ok(
        cible(&data).args(["profile", "show", &from, "--json"]),
    ))
    .unwrap();
    let after: Value = serde_json::from_str(&run_ok(cible(&data).args([
        "profile",
        "show",
        &survivor.to_string(),
        "--json",
    ])))
    .unwrap();
    assert_eq!(restored["id"].as_u64().unwrap().to_string(), from);
    assert!(restored["event_count"].as_u64().unwrap() > 0);
    assert_eq!(
        restored["event_count"].as_u64().unwrap() + after["event_count"].as_u64().unwrap(),
        before,
        "unmerge moves events, never loses them"
    );

    // Quarantine: listed whole, and replay at a later --now accepts the future-dated ones.
    let quality: Value =
        serde_json::from_str(&run_ok(cible(&data).args(["quality", "--json"]))).unwrap();
    let future = quality["in_quarantine"]["future_timestamp"]
        .as_u64()
        .unwrap_or(0);
    assert!(future > 0);
    let replay = run_ok(cible(&data).args([
        "--now",
        "2028-01-01T00:00:00Z",
        "quality",
        "replay",
        "--reason",
        "future_timestamp",
    ]));
    assert!(replay.contains(&format!("{future} accepted")), "{replay}");
    let error = cible(&data)
        .args(["quality", "replay", "--reason", "nope"])
        .output()
        .unwrap();
    assert!(!error.status.success());
    assert!(String::from_utf8_lossy(&error.stderr).contains("unknown reason"));
}

#[test]
fn csv_import_uses_the_documented_layout() {
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("orders.csv");
    std::fs::write(
        &csv,
        "type,messageId,timestamp,userId,event,properties.revenue,traits.email\n\
         identify,c1,2026-04-01T10:00:00Z,u9,,,Nine@Example.com\n\
         track,c2,2026-04-02T10:00:00Z,u9,Order Completed,120.5,\n\
         track,c3,2026-04-03T10:00:00Z,,Order Completed,3,\n",
    )
    .unwrap();
    let data = dir.path().join("data");
    let summary: Value =
        serde_json::from_str(&run_ok(cible(&data).arg("import").arg(&csv).arg("--json"))).unwrap();
    assert_eq!(summary["accepted"], 2);
    assert_eq!(summary["quarantined_by_reason"]["missing_identity"], 1);
    let profile: Value = serde_json::from_str(&run_ok(cible(&data).args([
        "profile",
        "show",
        "nine@example.com",
        "--json",
    ])))
    .unwrap();
    assert_eq!(
        profile["timeline"]["events"][0]["properties"]["revenue"],
        120.5
    );
    let missing = cible(&data)
        .arg("import")
        .arg(dir.path().join("absent.csv"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no such file"));
}

#[test]
fn segment_commands_keys_and_exports() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("events.jsonl");
    run_ok(
        cible(&data)
            .args([
                "generate",
                "--profiles",
                "300",
                "--days",
                "40",
                "--seed",
                "3",
                "--out",
            ])
            .arg(&file),
    );
    run_ok(cible(&data).arg("import").arg(&file));

    let rule = r#"did("Order Completed", 30d)"#;
    let created = run_ok(cible(&data).args(["segment", "create", "buyers", "--rule", rule]));
    assert!(
        created.contains("segment buyers:") && created.contains("entered"),
        "{created}"
    );
    let rule_file = dir.path().join("rule.txt");
    std::fs::write(
        &rule_file,
        "in_segment(\"buyers\") -- built on buyers\n  and trait.plan = \"pro\"",
    )
    .unwrap();
    run_ok(
        cible(&data)
            .args(["segment", "create", "pro-buyers", "--rule-file"])
            .arg(&rule_file),
    );
    let listed = run_ok(cible(&data).args(["segment", "list"]));
    assert_eq!(listed.lines().count(), 2, "{listed}");
    let shown: Value = serde_json::from_str(&run_ok(
        cible(&data).args(["segment", "show", "buyers", "--json"]),
    ))
    .unwrap();
    let size = shown["size"].as_u64().unwrap();
    assert!(size > 0);

    let members: Vec<Value> =
        run_ok(cible(&data).args(["segment", "members", "buyers", "--format", "jsonl"]))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert_eq!(members.len() as u64, size);
    let csv = run_ok(cible(&data).args(["segment", "members", "buyers"]));
    assert_eq!(
        csv.lines().next(),
        Some("profile,primary_id,email,entered_at")
    );
    assert_eq!(csv.lines().count() as u64, size + 1);

    let primary = members[0]["primary_id"].as_str().unwrap().to_string();
    let why = run_ok(cible(&data).args(["segment", "explain", "buyers", &primary]));
    assert!(
        why.contains("is in segment buyers") && why.contains("saw"),
        "{why}"
    );

    // A week later, some buyers have left: refresh logs exits, history shows both computations.
    let later = ["--now", "2026-05-08T12:00:00Z"];
    let refreshed = run_ok(
        cible(&data)
            .args(later)
            .args(["segment", "refresh", "buyers"]),
    );
    assert!(refreshed.contains("exited"), "{refreshed}");
    let history = run_ok(cible(&data).args(["segment", "history", "buyers"]));
    assert_eq!(history.lines().count(), 2, "{history}");

    let sql = run_ok(cible(&data).args(["segment", "sql", "--rule", rule]));
    assert!(
        sql.starts_with("SELECT p.profile FROM profiles p WHERE EXISTS"),
        "{sql}"
    );
    let preview = run_ok(cible(&data).args([
        "segment",
        "preview",
        "--rule-json",
        r#"{"op": "did", "event": {"name": "Order Completed"}, "window": "30d"}"#,
    ]));
    assert!(preview.contains(&format!("{size} of ")), "{preview}");

    let edit = cible(&data)
        .args([
            "segment",
            "edit",
            "buyers",
            "--rule",
            r#"in_segment("pro-buyers")"#,
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&edit.stderr).contains("buyers -> pro-buyers -> buyers"));
    let delete = cible(&data)
        .args(["segment", "delete", "buyers"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&delete.stderr).contains("used by pro-buyers"));
    run_ok(cible(&data).args(["segment", "delete", "pro-buyers"]));
    run_ok(cible(&data).args(["segment", "delete", "buyers"]));
    assert_eq!(run_ok(cible(&data).args(["segment", "list"])), "");

    // Keys are listed without the key; profiles export with their traits.
    let key = create_key(&data, "--write");
    let keys = run_ok(cible(&data).args(["key", "list"]));
    assert!(keys.contains(&key[..12]) && !keys.contains(&key), "{keys}");
    let profiles: Vec<Value> =
        run_ok(cible(&data).args(["export", "profiles", "--purpose", "analytics"]))
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
    assert!(profiles.iter().any(|p| p["traits"]["plan"].is_string()));
    let quarantined = run_ok(cible(&data).args(["quality", "list", "--limit", "2"]));
    assert!(quarantined.lines().count() >= 2, "{quarantined}");

    // Deleting a profile removes it everywhere.
    let removed = cible(&data)
        .args(["profile", "delete", &primary])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&removed.stderr).contains("--yes"));
    run_ok(cible(&data).args(["profile", "delete", &primary, "--yes"]));
    assert!(
        !cible(&data)
            .args(["profile", "show", &primary])
            .output()
            .unwrap()
            .status
            .success()
    );
}

/// What a `serve` command prints until it listens (the server is then killed).
fn printed_until_listening(command: &mut std::process::Command) -> String {
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap())) {
        let line = line.unwrap();
        let done = line.starts_with("cible listening on");
        seen.push(line);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    seen.join("\n")
}

#[test]
fn serve_demo_loads_data_segments_and_prints_keys() {
    let dir = tempfile::tempdir().unwrap();
    let start = || {
        printed_until_listening(cible(dir.path()).args([
            "serve",
            "--demo",
            "--demo-profiles",
            "300",
            "--demo-days",
            "30",
            "--listen",
            "127.0.0.1:0",
        ]))
    };
    let text = start();
    assert!(text.contains("demo data: "), "{text}");
    assert_eq!(text.matches("demo segment ").count(), 7, "{text}");
    // 30 days of history: the purchase model predicts the next 15.
    assert!(
        text.contains("demo segment likely-buyers") && text.contains("predicted.purchase_15d"),
        "{text}"
    );
    assert_eq!(
        text.matches("lifecycle segment lifecycle-").count(),
        7,
        "{text}"
    );
    assert!(text.contains("demo segment high-intent-engaged"), "{text}");
    assert!(
        text.contains("write key: cible_w_") && text.contains("admin key: cible_a_"),
        "{text}"
    );
    // Started again: the same data, and no second pair of keys.
    let again = start();
    assert!(
        again.contains("demo data and keys already here") && !again.contains("write key:"),
        "{again}"
    );
    assert_eq!(
        run_ok(cible(dir.path()).args(["key", "list"]))
            .lines()
            .count(),
        2
    );
}

#[test]
fn computed_traits_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("events.jsonl");
    run_ok(
        cible(&data)
            .args(["generate", "--profiles", "300", "--days", "60", "--out"])
            .arg(&file),
    );
    run_ok(cible(&data).arg("import").arg(&file));

    // A bad configuration stops every command with the field named.
    std::fs::write(data.join("traits.toml"), "[lifecycle]\ndormant_days = 5\n").unwrap();
    let output = cible(&data).args(["traits", "config"]).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("traits.toml: lifecycle: active_days"),
        "{stderr}"
    );
    std::fs::write(
        data.join("traits.toml"),
        "[engagement]\nhalf_life_days = 7\n",
    )
    .unwrap();
    let config = run_ok(cible(&data).args(["traits", "config"]));
    assert!(config.contains("half_life_days = 7.0"), "{config}");

    let refresh: Value =
        serde_json::from_str(&run_ok(cible(&data).args(["traits", "refresh", "--json"]))).unwrap();
    assert_eq!(refresh["created_segments"].as_array().unwrap().len(), 7);
    assert!(refresh["calibration"]["customers"].as_u64().unwrap() > 10);
    let list = run_ok(cible(&data).args(["segment", "list"]));
    assert!(list.contains("lifecycle-at-risk"), "{list}");

    let traits: Value =
        serde_json::from_str(&run_ok(cible(&data).args(["traits", "show", "user-3"]))).unwrap();
    let engagement = traits["score"]["engagement"].as_u64().unwrap();
    assert!(engagement <= 100);
    assert!(traits["lifecycle"].is_string(), "{traits}");

    // Rules read them, and agree with what `traits show` says.
    let preview = run_ok(cible(&data).args([
        "segment",
        "preview",
        "--rule",
        &format!("score.engagement = {engagement}"),
        "--sample",
        "1000",
    ]));
    assert!(preview.contains("user-3 "), "{preview}");

    let items: Value = serde_json::from_str(&run_ok(cible(&data).args([
        "profile",
        "recommend",
        "user-3",
        "--n",
        "3",
        "--json",
    ])))
    .unwrap();
    assert!(items.as_array().unwrap().len() <= 3);
    let features = dir.path().join("features.parquet");
    run_ok(
        cible(&data)
            .args(["export", "features", "--scale", "zscore", "--out"])
            .arg(&features),
    );
    assert!(std::fs::metadata(&features).unwrap().len() > 1000);
    let clusters: Value = serde_json::from_str(&run_ok(
        cible(&data).args(["model", "cluster", "--max-k", "3", "--json"]),
    ))
    .unwrap();
    assert_eq!(clusters["curve"].as_array().unwrap().len(), 2);
    assert!(
        clusters["clusters"][0]["description"].is_string(),
        "{clusters}"
    );
    let dense: Value = serde_json::from_str(&run_ok(cible(&data).args([
        "model",
        "dbscan",
        "--min-points",
        "5",
        "--json",
    ])))
    .unwrap();
    assert!(dense["eps"].as_f64().unwrap() > 0.0, "{dense}");
    let trained: Value = serde_json::from_str(&run_ok(cible(&data).args([
        "model", "train", "--target", "open", "--days", "20", "--json",
    ])))
    .unwrap();
    assert!(trained["auc"].as_f64().unwrap() > 0.5, "{trained}");
    assert_eq!(trained["calibration"].as_array().unwrap().len(), 10);
    assert_eq!(trained["algorithm"], "boosted_trees");
    let exported = run_ok(cible(&data).args(["export", "profiles", "--purpose", "analytics"]));
    let first: Value = serde_json::from_str(exported.lines().next().unwrap()).unwrap();
    assert!(first["computed"]["score"]["engagement"].is_u64(), "{first}");
    // Stored models are traits: in exports, in rules; versions, reports, rollback.
    let p = first["computed"]["predicted"]["open_20d"].as_f64().unwrap();
    assert!((0.0..=1.0).contains(&p), "{first}");
    assert!(first["computed"]["cluster"]["name"].is_string(), "{first}");
    run_ok(cible(&data).args([
        "model",
        "train",
        "--target",
        "open",
        "--days",
        "20",
        "--algorithm",
        "logistic",
    ]));
    // --no-save reports without storing.
    run_ok(cible(&data).args([
        "model",
        "train",
        "--target",
        "churn",
        "--days",
        "20",
        "--no-save",
    ]));
    let all = run_ok(cible(&data).args(["model", "list"]));
    assert!(
        all.contains("open_20d") && !all.contains("churn_20d"),
        "{all}"
    );
    let list = run_ok(cible(&data).args(["model", "list", "open_20d"]));
    assert!(list.contains("v1") && list.contains("v2  "), "{list}");
    assert!(
        list.contains("logistic") && list.contains("(active)"),
        "{list}"
    );
    let report: Value = serde_json::from_str(&run_ok(cible(&data).args([
        "model",
        "report",
        "open_20d",
        "--version",
        "1",
    ])))
    .unwrap();
    assert_eq!(report["model"]["algorithm"], "boosted_trees", "{report}");
    assert_eq!(report["model"]["active"], false);
    assert!(report["report"]["auc"].is_f64(), "{report}");
    run_ok(cible(&data).args(["model", "activate", "open_20d", "1"]));
    let created = run_ok(cible(&data).args([
        "segment",
        "create",
        "likely-openers",
        "--rule",
        "predicted.open_20d >= 0.5 and cluster.id >= 0",
    ]));
    assert!(created.contains("members"), "{created}");
    let typo = cible(&data)
        .args([
            "segment",
            "create",
            "typo",
            "--rule",
            "predicted.open_2d > 0.5",
        ])
        .output()
        .unwrap();
    assert!(!typo.status.success());
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert!(
        stderr.contains("E014") && stderr.contains("predicted.open_20d"),
        "{stderr}"
    );
    let retrained = run_ok(cible(&data).args(["model", "retrain", "open_20d"]));
    assert!(retrained.contains("open_20d: version 3"), "{retrained}");
}

#[test]
fn model_parameters_are_bounded_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let started = std::time::Instant::now();
    for (args, says) in [
        (
            &["cluster", "--max-k", "100000"][..],
            "--max-k must be between 2 and 50, found 100000",
        ),
        (
            &["cluster", "--min-k", "1"],
            "--min-k must be between 2 and 50",
        ),
        (
            &["cluster", "--min-k", "6", "--max-k", "3"],
            "--min-k must be at most --max-k, found 6 > 3",
        ),
        (
            &["cluster", "--restarts", "50"],
            "--restarts must be between 1 and 20, found 50",
        ),
        (
            &["cluster", "--sample", "1000000"],
            "--sample must be between 1 and 100000, found 1000000",
        ),
        (
            &["dbscan", "--sample", "50000"],
            "--sample must be between 1 and 10000, found 50000",
        ),
        (
            &["dbscan", "--min-points", "1"],
            "--min-points must be between 2 and 1000, found 1",
        ),
        (
            &["dbscan", "--eps", "0"],
            "--eps must be above 0 and at most 100",
        ),
        (
            &["train", "--target", "purchase", "--days", "1000"],
            "--days must be between 1 and 365, found 1000",
        ),
    ] {
        let output = cible(dir.path()).arg("model").args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// The README's first command, `cargo run --release -- serve --demo`, needs `cargo run` at the
/// workspace root to find one binary: the default members hold exactly one, `cible` (the
/// benchmarks' binary is a member apart).
#[test]
fn cargo_run_at_the_root_runs_cible() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    assert!(readme.contains("cargo run --release -- serve --demo"));
    let output = std::process::Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
        .output()
        .unwrap();
    assert!(output.status.success());
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    let defaults = metadata["workspace_default_members"].as_array().unwrap();
    let binaries: Vec<&str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| defaults.contains(&p["id"]))
        .flat_map(|p| p["targets"].as_array().unwrap())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(binaries, ["cible"]);
}

#[test]
fn serve_demo_on_a_directory_with_its_own_data_loads_nothing_and_mints_no_demo_key() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("own.jsonl");
    run_ok(
        cible(&data)
            .args(["generate", "--profiles", "50", "--days", "5", "--out"])
            .arg(&file),
    );
    run_ok(cible(&data).arg("import").arg(&file));
    let keys_before = run_ok(cible(&data).args(["key", "list"])).lines().count();
    let text =
        printed_until_listening(cible(&data).args(["serve", "--demo", "--listen", "127.0.0.1:0"]));
    assert!(text.contains("no demo data loaded"), "{text}");
    assert!(
        !text.contains("demo data: ") && !text.contains("try: curl"),
        "{text}"
    );
    // A store without keys gets its first pair, as without --demo, and no demo pair.
    assert!(text.contains("no key in this data directory yet"), "{text}");
    let keys = run_ok(cible(&data).args(["key", "list"]));
    assert_eq!(keys.lines().count(), keys_before + 2, "{keys}");
    assert!(!keys.contains("demo"), "{keys}");
}
