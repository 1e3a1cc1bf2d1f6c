//! `cible-bench --suite privacy`: what the privacy features cost, as a user meets them.
//!
//! - Erasure of one person (`cible profile erase`, and `DELETE /api/profiles/{id}?erase=true`
//!   on a running server), beside the removal that does not rewrite the store
//!   (`cible profile delete`) in the same run, each on other people of the same store.
//! - Consent checks on a segment rebuild: the 20 battery rules evaluated over every profile,
//!   with no consent stored and then with a quarter of the profiles having objected to
//!   profiling and half having granted e-mail (the checks then find profiles in their sets).

use std::sync::atomic::AtomicU64;
use std::time::Instant;

use anyhow::Context;

use crate::Global;
use crate::bench::{BenchArgs, Row, cli_ms, imported_data, print_header, print_table};

/// Median of a few runs of `f` (ms).
fn median_ms(runs: usize, mut f: impl FnMut(usize) -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut times = Vec::new();
    for i in 0..runs {
        let started = Instant::now();
        f(i)?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, _file, generated, now, engine) = imported_data(global, args)?;
    let stats = engine.load_stats();
    let (events, profiles) = (stats.events, stats.profiles);
    let rules: Vec<cible_lang::Expr> = cible_core::segment::BATTERY
        .iter()
        .map(|r| cible_lang::parse(r).map_err(|d| anyhow::anyhow!(d.message)))
        .collect::<anyhow::Result<_>>()?;
    // The same rules, each also asking for e-mail consent.
    let consented: Vec<cible_lang::Expr> = cible_core::segment::BATTERY
        .iter()
        .map(|r| {
            cible_lang::parse(&format!("({r}) and consent.email"))
                .map_err(|d| anyhow::anyhow!(d.message))
        })
        .collect::<anyhow::Result<_>>()?;
    let rebuild =
        |engine: &cible_core::Engine, rules: &[cible_lang::Expr]| -> anyhow::Result<f64> {
            median_ms(3, |_| {
                engine.evaluate_rules(rules, now, &AtomicU64::new(0))?;
                Ok(())
            })
        };
    eprintln!("segment rebuild, no consent stored ...");
    let mut without_runs = (0..5)
        .map(|_| rebuild(&engine, &rules))
        .collect::<anyhow::Result<Vec<f64>>>()?;
    without_runs.sort_by(f64::total_cmp);
    let without = without_runs[2];
    eprintln!("storing consents ...");
    let everyone = engine.live_profiles();
    for (i, profile) in everyone.iter().enumerate() {
        let mut purposes = std::collections::BTreeMap::new();
        if i % 4 == 0 {
            purposes.insert("profiling".to_string(), false);
        }
        if i % 2 == 0 {
            purposes.insert("email".to_string(), true);
        }
        if purposes.is_empty() {
            continue;
        }
        let request = cible_core::engine::ConsentRequest {
            purposes,
            request_id: Some(format!("bench-consent-{i}")),
            ..Default::default()
        };
        engine.set_consents(*profile, &request, now)?;
    }
    eprintln!("segment rebuild with consents, with and without a consent condition ...");
    // Interleaved, so that drift on the shared cores hits both alike.
    let (mut with_runs, mut reading_runs) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        with_runs.push(rebuild(&engine, &rules)?);
        reading_runs.push(rebuild(&engine, &consented)?);
    }
    with_runs.sort_by(f64::total_cmp);
    reading_runs.sort_by(f64::total_cmp);
    let (with, reading) = (with_runs[2], reading_runs[2]);
    let ids: Vec<String> = everyone.iter().take(20).map(|p| format!("{p}")).collect();
    engine.checkpoint()?;
    let data = work.path().join("store");
    drop(engine);

    eprintln!("erasures and removals through the CLI ...");
    let exe = crate::bench::cible_exe()?;
    let command = |verb: &str, id: &str| -> anyhow::Result<()> {
        let output = std::process::Command::new(&exe)
            .arg("--data")
            .arg(&data)
            .arg("--now")
            .arg((now / 1000).to_string())
            .args(["profile", verb, id, "--yes"])
            .env("CIBLE_LOG", "warn")
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "cible profile {verb}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(())
    };
    let open_ms = cli_ms(&data, now, &["segment", "list"])?;
    let erase_cli = median_ms(5, |i| command("erase", &ids[i]))?;
    let delete_cli = median_ms(5, |i| command("delete", &ids[5 + i]))?;

    eprintln!("erasures through a running server ...");
    let (mut child, address) = crate::bench::spawn_server(&data, now)?;
    let admin = {
        let output = std::process::Command::new(&exe)
            .arg("--data")
            .arg(&data)
            .args(["key", "create", "--admin"])
            .output()?;
        String::from_utf8(output.stdout)?.trim().to_string()
    };
    let mut phases = Vec::new();
    let erase_api = median_ms(5, |i| {
        let receipt: serde_json::Value = ureq::delete(&format!(
            "http://{address}/api/profiles/{}?erase=true",
            ids[10 + i]
        ))
        .set("Authorization", &format!("Bearer {admin}"))
        .call()
        .with_context(|| format!("erasing {}", ids[10 + i]))?
        .into_json()?;
        phases.push(receipt["timings"].clone());
        Ok(())
    })?;
    // Where an erasure's time goes: the median of each phase.
    let phase = |name: &str| -> f64 {
        let mut values: Vec<f64> = phases.iter().filter_map(|t| t[name].as_f64()).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let breakdown = format!(
        "removal {:.0} ms, feed history {:.0} ms, journal {:.0} ms, rewrite {:.0} ms",
        phase("removal_ms"),
        phase("history_ms"),
        phase("journal_ms"),
        phase("rewrite_ms")
    );
    let _ = child.kill();
    let _ = child.wait();

    print_header("privacy", &generated, events, profiles, "", args.days);
    let rows = vec![
        Row {
            measure: "erase one person, `cible profile erase` (process start and open included)",
            value: format!("{erase_cli:.0} ms"),
            baseline: format!(
                "`cible profile delete` {delete_cli:.0} ms; `segment list` (open alone) {open_ms:.0} ms"
            ),
            ratio: format!("{:.2}x delete", erase_cli / delete_cli),
            target: "<= 2 s at 1M profiles / 100M events",
        },
        Row {
            measure: "erase one person, `DELETE /api/profiles/{id}?erase=true` on a running server",
            value: format!("{erase_api:.0} ms"),
            baseline: breakdown,
            ratio: format!("{:.2}x the target", erase_api / 2000.0),
            target: "<= 2 s",
        },
        Row {
            measure: "20 battery rules over every profile, with consents stored (25% objected to profiling, 50% granted e-mail)",
            value: format!("{with:.0} ms"),
            baseline: format!("{without:.0} ms with none stored"),
            ratio: format!("{:+.1}%", (with / without - 1.0) * 100.0),
            target: "<= +5%",
        },
        Row {
            measure: "the same 20 rules, each `and consent.email`",
            value: format!("{reading:.0} ms"),
            baseline: format!("{with:.0} ms without the consent condition"),
            ratio: format!("{:+.1}%", (reading / with - 1.0) * 100.0),
            target: "<= +5%",
        },
    ];
    print_table("Erasure and consent checks", rows);
    Ok(())
}
