//! `cible changes`: the change feed from a sequence number, once or following new changes
//! (through the running server's stream when one holds the data directory).

use std::io::{BufRead, BufReader, Write};

use clap::Args;

use crate::Global;

#[derive(Debug, Args)]
pub struct ChangesArgs {
    /// Show changes with a sequence number above this one (0: from the start).
    #[arg(long, default_value_t = 0)]
    after: u64,
    /// Most changes to show (without --follow).
    #[arg(long, default_value_t = 1000)]
    limit: usize,
    /// Keep waiting for new changes (needs a running `cible serve` on this data directory).
    #[arg(long)]
    follow: bool,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

fn print(out: &mut impl Write, change: &serde_json::Value, json: bool) -> std::io::Result<()> {
    if json {
        return writeln!(out, "{change}");
    }
    let at = change["at"]
        .as_i64()
        .map(cible_core::time::format_ms)
        .unwrap_or_default();
    writeln!(
        out,
        "{:>8}  {at}  {:<5} {:<24} profile {:<8} size {:<8} {}",
        change["seq"].to_string(),
        if change["entered"].as_bool() == Some(true) {
            "enter"
        } else {
            "exit"
        },
        change["segment"].as_str().unwrap_or_default(),
        change["profile"].to_string(),
        change["size"].to_string(),
        change["cause"].as_str().unwrap_or_default()
    )
}

pub fn run(global: &Global, args: ChangesArgs) -> anyhow::Result<()> {
    if !(1..=crate::changes_api::MAX_PAGE).contains(&args.limit) {
        anyhow::bail!(
            "--limit must be between 1 and {}",
            crate::changes_api::MAX_PAGE
        );
    }
    let mut out = std::io::stdout().lock();
    match global.open_or_remote(true)? {
        crate::Opened::Local(engine) => {
            if args.follow {
                anyhow::bail!(
                    "--follow needs a running `cible serve` on {} (no server holds it: nothing can add changes)",
                    global.data.display()
                );
            }
            for change in engine.changes_after(args.after, args.limit)? {
                print(&mut out, &serde_json::to_value(&change)?, args.json)?;
            }
        }
        crate::Opened::Remote(remote) if !args.follow => {
            let page = remote.call(
                "GET",
                &format!("/api/changes?after={}&limit={}", args.after, args.limit),
                None,
            )?;
            for change in page["changes"].as_array().into_iter().flatten() {
                print(&mut out, change, args.json)?;
            }
        }
        crate::Opened::Remote(remote) => {
            // Server-Sent Events: `id:` and `data:` lines, a blank line ends an event.
            let reader = remote.stream(&format!("/api/changes/stream?after={}", args.after))?;
            let mut last = args.after;
            for line in BufReader::new(reader).lines() {
                let line = line?;
                if let Some(data) = line.strip_prefix("data:") {
                    let change: serde_json::Value = serde_json::from_str(data.trim())?;
                    last = change["seq"].as_u64().unwrap_or(last);
                    print(&mut out, &change, args.json)?;
                    out.flush()?;
                }
            }
            // The server closed the stream (it stops, or restarts): say where to resume.
            anyhow::bail!(
                "the server ended the stream (stopping?); resume with `cible changes --after {last} --follow`"
            );
        }
    }
    Ok(())
}
