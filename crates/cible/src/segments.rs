//! `cible segment ...`: create, edit, list, show, delete, preview, members, history, overlap
//! (printed by `analysis.rs`).

use std::io::{BufWriter, Write};
use std::path::PathBuf;

use anyhow::{Context, bail};
use cible_core::Engine;
use cible_core::time::format_ms;
use clap::{Args, Subcommand, ValueEnum};

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum SegmentCommand {
    /// Create a segment from a rule and compute its members.
    Create {
        name: String,
        #[command(flatten)]
        rule: RuleArgs,
    },
    /// Replace a segment's rule and recompute its members.
    Edit {
        name: String,
        #[command(flatten)]
        rule: RuleArgs,
    },
    /// Every segment with its size and last computation.
    List,
    /// One segment: rule, size, last computation (JSON with --json).
    Show {
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Delete a segment (refused while another segment uses it).
    Delete { name: String },
    /// Count and a sample of a rule's members now; nothing is saved.
    Preview {
        #[command(flatten)]
        rule: RuleArgs,
        /// How many members to show.
        #[arg(long, default_value_t = 10)]
        sample: usize,
    },
    /// One row per member: profile, primary id, e-mail, entered_at.
    Members {
        name: String,
        #[arg(long, value_enum, default_value = "csv")]
        format: MembersFormat,
    },
    /// Enters and exits over time, with the size after each computation; with --every, one
    /// point per hour or day from the first change to now, the size at the bucket's end.
    History {
        name: String,
        /// One point per bucket (the size at its end, carried over buckets without changes).
        #[arg(long, value_enum)]
        every: Option<crate::analysis::EveryArg>,
        /// Print the JSON the API answers (with --every).
        #[arg(long, requires = "every")]
        json: bool,
    },
    /// Sizes of these segments and, for every pair, the members they share and the Jaccard
    /// index (shared / either).
    Overlap {
        #[arg(required = true, num_args = 2..)]
        names: Vec<String>,
        #[arg(long)]
        json: bool,
    },
    /// Why a profile is in or out: each condition with the value it saw.
    Explain {
        name: String,
        /// Profile number, userId, anonymousId or e-mail.
        profile: String,
        #[arg(long)]
        json: bool,
    },
    /// Recompute a segment's members now (after an import, or with a later --now).
    Refresh { name: String },
    /// Print the SQL selecting the rule's members at --now over the documented table layout
    /// (see docs/segment-language.md, "SQL").
    Sql {
        #[command(flatten)]
        rule: RuleArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum MembersFormat {
    Csv,
    Jsonl,
}

/// Where the rule comes from: text, a file, or its JSON form.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct RuleArgs {
    /// The rule, e.g. 'did("Order Completed", 30d)'.
    #[arg(long)]
    rule: Option<String>,
    /// A file holding the rule text.
    #[arg(long)]
    rule_file: Option<PathBuf>,
    /// The rule's JSON form (the syntax tree), as accepted by the API.
    #[arg(long)]
    rule_json: Option<String>,
}

impl RuleArgs {
    /// Parses the rule; prints warnings (unknown events) on stderr.
    fn parse(
        &self,
        engine: &Engine,
        name: Option<&str>,
    ) -> anyhow::Result<(cible_lang::Expr, String)> {
        let (expr, source) = if let Some(json) = &self.rule_json {
            let value: serde_json::Value =
                serde_json::from_str(json).context("--rule-json is not JSON")?;
            (
                cible_lang::from_json(&value).map_err(|d| anyhow::anyhow!(d.message))?,
                String::new(),
            )
        } else {
            let source = match (&self.rule, &self.rule_file) {
                (Some(rule), _) => rule.clone(),
                (None, Some(path)) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading {}", path.display()))?,
                (None, None) => bail!("give the rule with --rule, --rule-file or --rule-json"),
            };
            let expr =
                cible_lang::parse(&source).map_err(|d| anyhow::anyhow!("{}", d.render(&source)))?;
            (expr, source)
        };
        for diagnostic in engine.check_rule(&expr, &source, name)? {
            if diagnostic.severity == cible_lang::Severity::Warning {
                let shown = if source.is_empty() {
                    diagnostic.message.clone()
                } else {
                    diagnostic.render(&source)
                };
                eprintln!("{shown}");
            }
        }
        Ok((expr, source))
    }
}

fn print_list(records: &[cible_core::segment::SegmentRecord]) {
    for record in records {
        let computed = record
            .last_backfill
            .as_ref()
            .map_or("never".to_string(), |r| match &r.error {
                Some(_) => format!("FAILED {}", format_ms(r.at)),
                None => format_ms(r.at),
            });
        println!(
            "{:<24} {:>9}  {}  {}",
            record.name, record.size, computed, record.rule
        );
    }
}

/// The rule as the API takes it: `rule` (text) or `rule_json`.
fn rule_field(rule: &RuleArgs) -> anyhow::Result<(&'static str, serde_json::Value)> {
    if let Some(json) = &rule.rule_json {
        let value: serde_json::Value =
            serde_json::from_str(json).context("--rule-json is not JSON")?;
        return Ok(("rule_json", value));
    }
    let source = match (&rule.rule, &rule.rule_file) {
        (Some(rule), _) => rule.clone(),
        (None, Some(path)) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
        (None, None) => bail!("give the rule with --rule, --rule-file or --rule-json"),
    };
    Ok(("rule", serde_json::Value::String(source)))
}

fn print_warnings(answer: &serde_json::Value) {
    for warning in answer["warnings"].as_array().into_iter().flatten() {
        if let Some(message) = warning["message"].as_str() {
            eprintln!("warning: {message}");
        }
    }
}

fn record_of(answer: serde_json::Value) -> anyhow::Result<cible_core::segment::SegmentRecord> {
    serde_json::from_value(answer).context("the server's segment record")
}

/// The same commands through the HTTP API of the server holding the data directory.
fn run_remote(
    remote: &crate::local::Remote,
    global: &Global,
    command: SegmentCommand,
) -> anyhow::Result<()> {
    let path = |name: &str| format!("/api/segments/{}", crate::local::escape(name));
    match command {
        SegmentCommand::Create { name, rule } => {
            let (field, value) = rule_field(&rule)?;
            let answer = remote.call(
                "POST",
                "/api/segments",
                Some(&serde_json::json!({"name": name, field: value})),
            )?;
            print_warnings(&answer);
            print_record(&record_of(answer)?);
        }
        SegmentCommand::Edit { name, rule } => {
            let (field, value) = rule_field(&rule)?;
            let answer = remote.call(
                "PUT",
                &path(&name),
                Some(&serde_json::json!({field: value})),
            )?;
            print_warnings(&answer);
            print_record(&record_of(answer)?);
        }
        SegmentCommand::Refresh { name } => {
            let record = record_of(remote.call("GET", &path(&name), None)?)?;
            let answer = remote.call(
                "PUT",
                &path(&name),
                Some(&serde_json::json!({"rule_json": record.ast})),
            )?;
            print_record(&record_of(answer)?);
        }
        SegmentCommand::List => {
            let records: Vec<cible_core::segment::SegmentRecord> =
                serde_json::from_value(remote.call("GET", "/api/segments", None)?)?;
            print_list(&records);
        }
        SegmentCommand::Show { name, json } => {
            let answer = remote.call("GET", &path(&name), None)?;
            if json {
                crate::print_json(&answer)?;
            } else {
                print_record(&record_of(answer)?);
            }
        }
        SegmentCommand::Delete { name } => {
            remote.call("DELETE", &path(&name), None)?;
            println!("segment {name} deleted");
        }
        SegmentCommand::Preview { rule, sample } => {
            let (field, value) = rule_field(&rule)?;
            let answer = remote.call(
                "POST",
                "/api/segments/preview",
                Some(&serde_json::json!({field: value, "sample": sample})),
            )?;
            print_warnings(&answer);
            println!(
                "{} of {} profiles match ({} ms); nothing saved",
                answer["count"], answer["profiles"], answer["duration_ms"]
            );
            for member in answer["sample"].as_array().into_iter().flatten() {
                println!(
                    "  {}  {}  {}",
                    member["profile"],
                    member["primary_id"].as_str().unwrap_or_default(),
                    member["email"].as_str().unwrap_or_default()
                );
            }
        }
        SegmentCommand::Members { name, format } => {
            let mut out = BufWriter::new(std::io::stdout().lock());
            match format {
                MembersFormat::Csv => write!(
                    out,
                    "{}",
                    remote.text(&format!("{}/members?format=csv", path(&name)))?
                )?,
                MembersFormat::Jsonl => {
                    let mut offset = 0;
                    loop {
                        let page = remote.call(
                            "GET",
                            &format!("{}/members?offset={offset}&limit=1000", path(&name)),
                            None,
                        )?;
                        let members = page["members"].as_array().cloned().unwrap_or_default();
                        for member in &members {
                            writeln!(out, "{member}")?;
                        }
                        offset += members.len();
                        if members.is_empty() {
                            break;
                        }
                    }
                }
            }
            out.flush()?;
        }
        SegmentCommand::History {
            name,
            every: Some(every),
            json,
        } => {
            let series = crate::analysis::remote_series(remote, &name, every.into())?;
            crate::analysis::print_series(&series, json)?;
        }
        SegmentCommand::Overlap { .. } => unreachable!("overlap runs before the store is opened"),
        SegmentCommand::History { name, .. } => {
            let points = remote.call("GET", &format!("{}/history", path(&name)), None)?;
            for point in points.as_array().into_iter().flatten() {
                println!(
                    "{}  size {:>8}  +{} -{}",
                    point["at"].as_str().unwrap_or_default(),
                    point["size"].to_string(),
                    point["entered"],
                    point["exited"]
                );
            }
        }
        SegmentCommand::Explain {
            name,
            profile,
            json,
        } => {
            let why = remote.call(
                "GET",
                &format!("{}/explain/{}", path(&name), crate::local::escape(&profile)),
                None,
            )?;
            if json {
                crate::print_json(&why)?;
                return Ok(());
            }
            let why: cible_core::segment::Explanation = serde_json::from_value(why)?;
            print_explanation(&why);
        }
        SegmentCommand::Sql { rule } => {
            let (field, value) = rule_field(&rule)?;
            let expr = if field == "rule" {
                let source = value.as_str().unwrap_or_default();
                cible_lang::parse(source).map_err(|d| anyhow::anyhow!("{}", d.render(source)))?
            } else {
                cible_lang::from_json(&value).map_err(|d| anyhow::anyhow!(d.message))?
            };
            println!(
                "{}",
                cible_lang::sql::to_sql(&expr, global.now_ms()?.div_euclid(1000))
            );
        }
    }
    Ok(())
}

fn print_explanation(why: &cible_core::segment::Explanation) {
    println!(
        "profile {} is {} segment {} (the rule {} now)",
        why.profile,
        if why.member { "in" } else { "not in" },
        why.segment,
        if why.matches_now {
            "matches"
        } else {
            "does not match"
        }
    );
    for condition in &why.conditions {
        let mark = if condition.result { "yes" } else { "no " };
        println!(
            "  {mark}  {}   saw {}",
            condition.condition, condition.value
        );
    }
    if let Some(next) = &why.next_change {
        println!("  may change by itself at {next}");
    }
}

fn print_record(record: &cible_core::segment::SegmentRecord) {
    println!("segment {}: {} members", record.name, record.size);
    println!("  rule     {}", record.rule);
    if let Some(report) = &record.last_backfill {
        match &report.error {
            Some(error) => println!(
                "  last computation FAILED at {}: {error}",
                format_ms(report.at)
            ),
            None => println!(
                "  computed {} over {} profiles in {} ms: {} entered, {} exited{}",
                format_ms(report.at),
                report.profiles,
                report.duration_ms,
                report.entered,
                report.exited,
                if report.via_messages > 0 {
                    format!(
                        " ({} profiles read from full messages)",
                        report.via_messages
                    )
                } else {
                    String::new()
                }
            ),
        }
    }
}

/// Whether a command reads only stored records (segments, memberships, history): those run on
/// a light open, which loads neither the hot store nor the identity graph.
fn reads_records_only(command: &SegmentCommand) -> bool {
    matches!(
        command,
        SegmentCommand::List
            | SegmentCommand::Show { .. }
            | SegmentCommand::Delete { .. }
            | SegmentCommand::Members { .. }
            | SegmentCommand::History { .. }
    )
}

pub fn run(global: &Global, command: SegmentCommand) -> anyhow::Result<()> {
    if let SegmentCommand::Overlap { names, json } = command {
        return crate::analysis::overlap(global, names, json);
    }
    let engine = match global.open_or_remote(reads_records_only(&command))? {
        crate::Opened::Local(engine) => engine,
        crate::Opened::Remote(remote) => return run_remote(&remote, global, command),
    };
    let now = global.now_ms()?;
    match command {
        SegmentCommand::Create { name, rule } => {
            let (expr, source) = rule.parse(&engine, Some(&name))?;
            print_record(&with_progress(&engine, || {
                engine.create_segment(&name, expr, &source, now)
            })?);
        }
        SegmentCommand::Edit { name, rule } => {
            let (expr, source) = rule.parse(&engine, Some(&name))?;
            print_record(&with_progress(&engine, || {
                engine.edit_segment(&name, expr, &source, now)
            })?);
        }
        SegmentCommand::Sql { rule } => {
            let (expr, _) = rule.parse(&engine, None)?;
            println!("{}", cible_lang::sql::to_sql(&expr, now.div_euclid(1000)));
        }
        SegmentCommand::Refresh { name } => {
            print_record(&engine.backfill(&name, now)?);
        }
        SegmentCommand::List => print_list(&engine.segments()?),
        SegmentCommand::Show { name, json } => {
            let record = engine.segment(&name)?;
            if json {
                crate::print_json(&record)?;
            } else {
                print_record(&record);
            }
        }
        SegmentCommand::Delete { name } => {
            engine.delete_segment(&name, now)?;
            println!("segment {name} deleted");
        }
        SegmentCommand::Preview { rule, sample } => {
            let (expr, _) = rule.parse(&engine, None)?;
            let preview = engine.preview(&expr, now, sample)?;
            println!(
                "{} of {} profiles match ({} ms); nothing saved",
                preview.count, preview.profiles, preview.duration_ms
            );
            for profile in preview.sample {
                let (primary, email) = cible_core::view::contact(&engine, profile);
                println!("  {profile}  {primary}  {email}");
            }
        }
        SegmentCommand::Members { name, format } => {
            let (_, members) = cible_core::view::members_page(&engine, &name, 0, usize::MAX)?;
            let mut out = BufWriter::new(std::io::stdout().lock());
            if matches!(format, MembersFormat::Csv) {
                writeln!(out, "profile,primary_id,email,entered_at")?;
            }
            for member in members {
                match format {
                    MembersFormat::Csv => writeln!(
                        out,
                        "{},{},{},{}",
                        member.profile,
                        csv_field(&member.primary_id),
                        csv_field(&member.email),
                        member.entered_at.unwrap_or_default()
                    )?,
                    MembersFormat::Jsonl => writeln!(out, "{}", serde_json::to_string(&member)?)?,
                }
            }
            out.flush()?;
        }
        SegmentCommand::Explain {
            name,
            profile,
            json,
        } => {
            let ordinal = engine
                .find_profile(&profile)
                .with_context(|| format!("no profile {profile:?}"))?;
            let why = engine.explain(&name, ordinal, now)?;
            if json {
                crate::print_json(&why)?;
                return Ok(());
            }
            print_explanation(&why);
        }
        SegmentCommand::History {
            name,
            every: Some(every),
            json,
        } => {
            let series = engine.size_series(&name, every.into(), now)?;
            crate::analysis::print_series(&series, json)?;
        }
        SegmentCommand::Overlap { .. } => unreachable!("overlap runs before the store is opened"),
        SegmentCommand::History { name, .. } => {
            for point in cible_core::view::size_history(&engine, &name)? {
                println!(
                    "{}  size {:>8}  +{} -{}",
                    point.at, point.size, point.entered, point.exited
                );
            }
        }
    }
    Ok(())
}

/// Runs a segment computation, drawing a progress bar over the profiles on a terminal.
fn with_progress<T: Send>(engine: &Engine, work: impl FnOnce() -> T + Send) -> T {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return work();
    }
    let total = engine.live_profiles().len() as u64;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} computing [{elapsed_precise}] {wide_bar} {pos}/{len} profiles",
        )
        .expect("valid template"),
    );
    let done = std::sync::atomic::AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                bar.set_position(engine.backfill_progress().min(total));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        });
        let result = work();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        result
    });
    bar.finish_and_clear();
    result
}

fn csv_field(text: &str) -> String {
    if text.contains([',', '"', '\n']) {
        format!("\"{}\"", text.replace('"', "\"\""))
    } else {
        text.to_string()
    }
}
