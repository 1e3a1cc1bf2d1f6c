//! Exports of a segment's members and of profiles as CSV, JSON Lines and Parquet, from the CLI
//! and streamed from the API: only what the purpose permits, pseudonymized on request, read
//! back by DuckDB (Parquet, CSV), and recorded in the audit log.

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

use super::common::*;

fn import(data: &Path, messages: &[Value]) {
    let file = data.parent().unwrap().join("messages.jsonl");
    let text: Vec<String> = messages.iter().map(Value::to_string).collect();
    std::fs::write(&file, text.join("\n")).unwrap();
    run_ok(cible(data).arg("import").arg(&file));
}

/// Runs SQL over a file in DuckDB (installed by `tests/clients/install.sh`); rows as JSON.
fn duckdb(sql: &str) -> Vec<Value> {
    let clients = clients_dir();
    let script = format!(
        "import duckdb, json\nrows = duckdb.sql({sql:?}).fetchall()\nprint(json.dumps([list(r) for r in rows], default=str))"
    );
    let output = Command::new("python3")
        .env("PYTHONPATH", clients.join("py"))
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

fn people() -> Vec<Value> {
    let mut messages = Vec::new();
    for (i, consent) in [true, true, true, false, true].iter().enumerate() {
        let user = format!("xp-user-{i}");
        messages.push(json!({"type": "identify", "userId": user, "messageId": format!("i{i}"),
            "timestamp": "2026-04-20T10:00:00Z",
            "traits": {"email": format!("{user}@example.org"), "plan": if i % 2 == 0 {"pro"} else {"free"},
                "seats": i, "consent_email": consent}}));
        messages.push(
            json!({"type": "track", "userId": user, "event": "Order Completed",
            "messageId": format!("o{i}"), "timestamp": "2026-04-21T10:00:00Z",
            "properties": {"revenue": 10 * (i + 1)}}),
        );
    }
    // Not a buyer.
    messages.push(
        json!({"type": "identify", "userId": "xp-browser", "messageId": "b1",
        "timestamp": "2026-04-20T10:00:00Z", "traits": {"consent_email": true}}),
    );
    messages
}

#[test]
fn members_and_profiles_export_as_csv_jsonl_and_parquet_with_consent_and_audit() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    import(&data, &people());
    create_segment(&data, "buyers", r#"did("Order Completed", 30d)"#);
    // CSV of the members e-mail may reach: 4 (one did not consent; the browser is no buyer).
    let csv = dir.path().join("members.csv");
    run_ok(
        cible(&data)
            .args(["export", "members", "buyers", "--out"])
            .arg(&csv),
    );
    let text = std::fs::read_to_string(&csv).unwrap();
    let header: Vec<&str> = text.lines().next().unwrap().split(',').collect();
    assert_eq!(&header[..3], ["profile", "identifiers", "entered_at"]);
    for column in [
        "traits.plan",
        "traits.seats",
        "computed.score.engagement",
        "consents.email",
    ] {
        assert!(header.contains(&column), "{column} in {header:?}");
    }
    assert_eq!(text.lines().count(), 1 + 4, "{text}");
    assert!(!text.contains("xp-user-3") && !text.contains("xp-browser"));
    let read = duckdb(&format!(
        "select count(*), sum(\"traits.seats\"), count(*) filter (where \"traits.plan\" = 'pro') from read_csv_auto('{}')",
        csv.display()
    ));
    assert_eq!(
        read,
        vec![json!([4, 7.0, 3])]
            .into_iter()
            .map(|v| {
                // DuckDB sums integers as a HUGEINT printed as a number.
                let mut v = v;
                v[1] = json!(7);
                v
            })
            .collect::<Vec<_>>()
    );

    // Parquet, typed columns; analytics (opt-out) reaches all five buyers.
    let parquet = dir.path().join("members.parquet");
    run_ok(
        cible(&data)
            .args([
                "export",
                "members",
                "buyers",
                "--format",
                "parquet",
                "--purpose",
                "analytics",
                "--out",
            ])
            .arg(&parquet),
    );
    let read = duckdb(&format!(
        "select count(*), sum(\"traits.seats\"), min(\"computed.score.engagement\") > 0, count(*) filter (where not \"consents.email\") from '{}'",
        parquet.display()
    ));
    assert_eq!(read, vec![json!([5, 10.0, true, 1])]);
    let types = duckdb(&format!(
        "select column_name, column_type from (describe select * from '{}') where column_name in ('profile', 'traits.plan', 'traits.seats', 'consents.email')  order by column_name",
        parquet.display()
    ));
    assert_eq!(
        types,
        vec![
            json!(["consents.email", "BOOLEAN"]),
            json!(["profile", "DOUBLE"]),
            json!(["traits.plan", "VARCHAR"]),
            json!(["traits.seats", "DOUBLE"]),
        ]
    );

    // Profiles as JSON Lines, pseudonymized: the same people, no identifier in clear.
    let lines = run_ok(cible(&data).args([
        "export",
        "profiles",
        "--purpose",
        "analytics",
        "--pseudonymize",
    ]));
    assert_eq!(lines.lines().count(), 6);
    assert!(
        !lines.contains("xp-user") && !lines.contains("example.org"),
        "{lines}"
    );
    let first: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first["computed"]["score"].is_object(), "{first}");
    // An unknown purpose or format writes nothing and names the field.
    let bad = cible(&data)
        .args(["export", "members", "buyers", "--format", "xls"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("format:"),
        "{bad:?}"
    );
    let bad = cible(&data)
        .args(["export", "members", "buyers", "--purpose", "mail"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("mail"),
        "{bad:?}"
    );

    // Every export is in the audit log.
    let audit = run_ok(cible(&data).args(["audit", "list", "--json"]));
    let records: Vec<Value> = serde_json::from_str(&audit).unwrap();
    let exports: Vec<&Value> = records.iter().filter(|r| r["action"] == "export").collect();
    assert_eq!(exports.len(), 3, "{audit}");
    assert_eq!(exports[0]["detail"]["what"], "members");
    assert_eq!(exports[0]["detail"]["records"], 4);
    assert_eq!(exports[1]["detail"]["format"], "parquet");

    // The API streams the same; errors before the answer starts name the field.
    let admin = create_key(&data, "--admin");
    let server = Server::start(&data, &[]);
    let fetch = |path: &str| -> (u16, Vec<u8>) {
        match ureq::get(&server.url(path))
            .set("Authorization", &format!("Bearer {admin}"))
            .call()
        {
            Ok(response) => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut response.into_reader(), &mut bytes).unwrap();
                (200, bytes)
            }
            Err(ureq::Error::Status(status, response)) => {
                (status, response.into_string().unwrap().into_bytes())
            }
            Err(other) => panic!("{other}"),
        }
    };
    let (status, streamed) = fetch("/api/exports/members/buyers?format=parquet&purpose=analytics");
    assert_eq!(status, 200);
    assert!(streamed.starts_with(b"PAR1") && streamed.ends_with(b"PAR1"));
    let streamed_file = dir.path().join("streamed.parquet");
    std::fs::write(&streamed_file, &streamed).unwrap();
    let read = duckdb(&format!(
        "select count(*), sum(\"traits.seats\") from '{}'",
        streamed_file.display()
    ));
    assert_eq!(read, vec![json!([5, 10.0])]);
    let (status, csv) = fetch("/api/exports/members/buyers");
    assert_eq!(status, 200);
    assert_eq!(String::from_utf8(csv).unwrap().lines().count(), 5);
    let (status, lines) = fetch("/api/exports/profiles?purpose=email&format=jsonl");
    assert_eq!(status, 200);
    assert_eq!(
        String::from_utf8(lines).unwrap().lines().count(),
        5,
        "consenting: 4 buyers and the browser"
    );
    for (path, code, field) in [
        ("/api/exports/members/nope", 404, Value::Null),
        (
            "/api/exports/members/buyers?format=xls",
            400,
            json!("format"),
        ),
        (
            "/api/exports/members/buyers?purpose=mail",
            400,
            json!("purpose"),
        ),
        ("/api/exports/profiles", 400, json!("purpose")),
    ] {
        let (status, body) = fetch(path);
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, code, "{path}: {body}");
        assert_eq!(body["error"]["field"], field, "{path}: {body}");
    }
    server.stop();
}
