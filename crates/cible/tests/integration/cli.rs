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
