//! The offline subcommands: import, generate, key, profile, quality, export. Each opens the
//! store directly, so it refuses to run while `cible serve` holds the same data directory.

use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use cible_core::generate::GenerateOptions;
use cible_core::import::{ImportSummary, Progress, import_files};
use cible_core::keys::KeyKind;
use cible_core::message::MessageType;
use cible_core::quality::Reason;
use cible_core::time::{DAY_MS, format_ms};
use cible_core::view::{TimelineQuery, profile_view};
use clap::{Args, Subcommand};

use crate::Global;

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// Files to import: .jsonl/.ndjson/.json or .csv (each optionally .gz), or .parquet.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

pub fn import(global: &Global, args: ImportArgs) -> anyhow::Result<()> {
    for file in &args.files {
        if !file.is_file() {
            bail!("{}: no such file", file.display());
        }
    }
    let engine = global.open()?;
    let now = global.now_ms()?;
    let total_bytes: u64 = args
        .files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    let progress = Arc::new(Progress::default());
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(total_bytes);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg}",
            )
            .expect("valid template"),
        );
        bar
    });
    let done = std::sync::atomic::AtomicBool::new(false);
    let summary = std::thread::scope(|scope| {
        if let Some(bar) = &bar {
            let progress = Arc::clone(&progress);
            let done = &done;
            scope.spawn(move || {
                let mut finished_files_bytes = 0;
                let mut last = 0;
                while !done.load(Ordering::Relaxed) {
                    let read = progress.bytes_read.load(Ordering::Relaxed);
                    if read < last {
                        finished_files_bytes += last;
                    }
                    last = read;
                    bar.set_position(finished_files_bytes + read);
                    bar.set_message(format!(
                        "{} messages",
                        progress.messages.load(Ordering::Relaxed)
                    ));
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
        }
        let result = import_files(&engine, &args.files, now, &progress);
        done.store(true, Ordering::Relaxed);
        result
    })?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    // One record for the import (its merges are not recorded one by one).
    engine.audit(engine.audit_entry(
        cible_core::audit::Action::Import,
        &[],
        serde_json::json!({"files": args.files.len(), "accepted": summary.accepted,
            "quarantined": summary.quarantined, "profiles_created": summary.profiles_created,
            "profiles_merged": summary.profiles_merged}),
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_import_summary(&summary);
    }
    Ok(())
}

fn print_import_summary(summary: &ImportSummary) {
    println!(
        "imported {} messages from {} file(s) in {:.1}s ({:.0} messages/s)",
        summary.messages,
        summary.files.len(),
        summary.seconds,
        summary.messages_per_second
    );
    println!("  accepted          {}", summary.accepted);
    println!("  duplicates        {}", summary.duplicates);
    println!("  quarantined       {}", summary.quarantined);
    for (reason, count) in &summary.quarantined_by_reason {
        println!("    {:<22}{count}", reason.code());
    }
    println!("  profiles created  {}", summary.profiles_created);
    println!("  profiles merged   {}", summary.profiles_merged);
    if summary.identity_conflicts > 0 {
        println!(
            "  identity links refused (different userIds) {}",
            summary.identity_conflicts
        );
    }
    if summary.quarantined > 0 {
        println!("see `cible quality list` for the quarantined messages");
    }
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Number of people.
    #[arg(long, default_value_t = 10_000)]
    profiles: u64,
    /// Days of history, ending at --now (or today's midnight UTC).
    #[arg(long, default_value_t = 90)]
    days: u32,
    /// Random seed: the same seed, sizes and end give the same file.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Output file (.jsonl, or .jsonl.gz to compress).
    #[arg(long)]
    out: PathBuf,
}

pub fn generate(global: &Global, args: GenerateArgs) -> anyhow::Result<()> {
    let end_ms = match global.pinned_now()? {
        Some(now) => now,
        None => cible_core::time::wall_clock_ms().div_euclid(DAY_MS) * DAY_MS,
    };
    let options = GenerateOptions {
        profiles: args.profiles,
        days: args.days,
        seed: args.seed,
        end_ms,
    };
    let stats = cible_core::generate::write_file(&options, &args.out)?;
    eprintln!(
        "wrote {} messages for {} profiles over {} days ending {} to {} ({:.1} MB)",
        stats.messages,
        stats.profiles,
        args.days,
        format_ms(end_ms),
        args.out.display(),
        stats.bytes as f64 / 1e6
    );
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Create a key and print it (only now: it is stored hashed).
    Create {
        /// A write key, for the tracking API (/v1/*).
        #[arg(long, conflicts_with = "admin", required_unless_present_any = ["admin", "read"])]
        write: bool,
        /// An admin key, for the admin API (/api/*).
        #[arg(long, conflicts_with = "read")]
        admin: bool,
        /// A read key: the admin API's reads only (GET /api/*), for dashboards and monitoring.
        #[arg(long, conflicts_with = "write")]
        read: bool,
        /// A name to recognise the key by.
        #[arg(long, default_value = "")]
        name: String,
        /// A web origin (https://shop.example) whose pages may send events with this write key
        /// (analytics.js); repeat for several, `*` for any. Without one, browsers are refused.
        #[arg(long = "origin", requires = "write")]
        origins: Vec<String>,
        /// Requests a second this key may make (429 with Retry-After beyond); no limit if absent.
        #[arg(long)]
        rate_limit: Option<u32>,
    },
    /// List keys (names, kinds, prefixes; never the keys).
    List,
    /// Revoke a key: its next request is refused.
    Revoke {
        /// The key, or the prefix `cible key list` shows.
        key: String,
    },
}

pub fn key(global: &Global, command: KeyCommand) -> anyhow::Result<()> {
    // A key can be the first thing made in a new data directory.
    let engine = if !global.data.join("store").is_dir() {
        Box::new(global.open()?)
    } else {
        match global.open_or_remote(true)? {
            crate::Opened::Local(engine) => engine,
            crate::Opened::Remote(remote) => return key_remote(&remote, command),
        }
    };
    match command {
        KeyCommand::Create {
            admin,
            read,
            name,
            origins,
            rate_limit,
            ..
        } => {
            let kind = match (admin, read) {
                (true, _) => KeyKind::Admin,
                (_, true) => KeyKind::Read,
                _ => KeyKind::Write,
            };
            let spec = cible_core::keys::KeySpec {
                kind,
                name,
                origins,
                rate_limit,
            };
            println!("{}", engine.create_key_with(spec, global.now_ms()?)?);
        }
        KeyCommand::List => print_keys(&engine.list_keys()),
        KeyCommand::Revoke { key } => {
            let record = engine.revoke_key(&key, global.now_ms()?)?;
            println!(
                "revoked {} key {} ({})",
                kind_name(record.kind),
                record.prefix,
                record.name
            );
        }
    }
    Ok(())
}

/// `cible key` through the running server.
fn key_remote(remote: &crate::local::Remote, command: KeyCommand) -> anyhow::Result<()> {
    match command {
        KeyCommand::Revoke { key } => {
            let path = format!("/api/keys/{}", crate::local::escape(&key));
            let record: cible_core::keys::KeyRecord =
                serde_json::from_value(remote.call("DELETE", &path, None)?)?;
            println!(
                "revoked {} key {} ({})",
                kind_name(record.kind),
                record.prefix,
                record.name
            );
        }
        KeyCommand::Create {
            admin,
            read,
            name,
            origins,
            rate_limit,
            ..
        } => {
            let kind = match (admin, read) {
                (true, _) => "admin",
                (_, true) => "read",
                _ => "write",
            };
            let request = serde_json::json!({
                "kind": kind, "name": name, "origins": origins, "rate_limit": rate_limit,
            });
            let answer = remote.call("POST", "/api/keys", Some(&request))?;
            println!("{}", answer["key"].as_str().unwrap_or_default());
        }
        KeyCommand::List => {
            let keys: Vec<cible_core::keys::KeyRecord> =
                serde_json::from_value(remote.call("GET", "/api/keys", None)?)?;
            print_keys(&keys);
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum RetentionCommand {
    /// The policy read from retention.toml.
    Show,
    /// Purge now what the policy says is expired (the server also does it at start and hourly).
    Run {
        /// The receipt as JSON.
        #[arg(long)]
        json: bool,
    },
}

pub fn retention(global: &Global, command: RetentionCommand) -> anyhow::Result<()> {
    let days =
        |days: Option<u64>| days.map_or("kept for ever".to_string(), |d| format!("{d} days"));
    match command {
        RetentionCommand::Show => {
            let policy = match global.open_or_remote(true)? {
                crate::Opened::Local(engine) => serde_json::to_value(engine.retention())?,
                crate::Opened::Remote(remote) => remote.call("GET", "/api/retention", None)?,
            };
            println!("events       {}", days(policy["events_days"].as_u64()));
            println!("quarantine   {}", days(policy["quarantine_days"].as_u64()));
        }
        RetentionCommand::Run { json } => {
            let receipt = match global.open_or_remote(false)? {
                crate::Opened::Local(engine) => {
                    serde_json::to_value(engine.purge_expired(global.now_ms()?)?)?
                }
                crate::Opened::Remote(remote) => remote.call("POST", "/api/retention/run", None)?,
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&receipt)?);
            } else {
                match receipt["events_before"].as_str() {
                    Some(before) => println!(
                        "purged {} events dated before {before} from {} profiles",
                        receipt["events_removed"], receipt["profiles_touched"]
                    ),
                    None => println!("events are kept for ever (no events_days in retention.toml)"),
                }
                if let Some(before) = receipt["quarantine_before"].as_str() {
                    println!(
                        "purged {} quarantined messages received before {before}",
                        receipt["quarantined_removed"]
                    );
                }
            }
        }
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum PseudonymCommand {
    /// Replace the pseudonym key by a new version and destroy the old one: exports made after
    /// no longer join with those made before (audited).
    Rotate,
}

pub fn pseudonym(global: &Global, command: PseudonymCommand) -> anyhow::Result<()> {
    let PseudonymCommand::Rotate = command;
    let version = match global.open_or_remote(true)? {
        crate::Opened::Local(engine) => u64::from(engine.rotate_pseudonym_key(global.now_ms()?)?),
        crate::Opened::Remote(remote) => {
            remote.call("POST", "/api/pseudonym/rotate", None)?["version"]
                .as_u64()
                .unwrap_or_default()
        }
    };
    println!("pseudonym key is now version {version} (pseudonyms start with p{version}_)");
    Ok(())
}

fn kind_name(kind: KeyKind) -> &'static str {
    match kind {
        KeyKind::Write => "write",
        KeyKind::Admin => "admin",
        KeyKind::Read => "read",
    }
}

fn print_keys(keys: &[cible_core::keys::KeyRecord]) {
    for key in keys {
        let mut limits = String::new();
        if !key.origins.is_empty() {
            limits.push_str(&format!("  origins {}", key.origins.join(",")));
        }
        if let Some(rate) = key.rate_limit {
            limits.push_str(&format!("  {rate} req/s"));
        }
        println!(
            "{:<6} {}…  {}  {}{limits}",
            format!("{:?}", key.kind).to_lowercase(),
            key.prefix,
            format_ms(key.created_at),
            key.name
        );
    }
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// Identifiers, traits, merges, flags and a page of the timeline.
    Show {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
        /// Timeline page: events to skip (newest first).
        #[arg(long, default_value_t = 0)]
        offset: usize,
        /// Timeline page size.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Only messages of this type (track, identify, page, screen, alias, group).
        #[arg(long = "type")]
        kind: Option<String>,
        /// Print JSON (the same document as GET /api/profiles/{id}).
        #[arg(long)]
        json: bool,
    },
    /// List merges (all, or those into one profile).
    Merges {
        /// Profile number, userId, anonymousId or e-mail.
        id: Option<String>,
    },
    /// Remove everything held on a profile: events, identifiers, traits, merges.
    Delete {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
        /// Confirm: the removal cannot be undone.
        #[arg(long)]
        yes: bool,
    },
    /// Erase a person (right to be forgotten): everything `delete` removes and the quarantined
    /// messages naming them; no byte of their identifiers is left in any file of the data
    /// directory, and their later messages are quarantined as `erased`. Prints the receipt.
    Erase {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
        /// Confirm: an erasure cannot be undone.
        #[arg(long)]
        yes: bool,
        /// Print the receipt as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Products to put in an e-mail for this profile: abandoned cart, recently viewed, viewed
    /// X bought Y, best sellers of its favourite categories.
    Recommend {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
        /// How many products.
        #[arg(long, default_value_t = 4)]
        n: usize,
        /// Print JSON (the same document as GET /api/profiles/{id}/recommendations).
        #[arg(long)]
        json: bool,
    },
    /// Undo a merge: the absorbed profile comes back with its identifiers and events.
    Unmerge {
        /// The merge id (see `cible profile merges` or `profile show`).
        merge: u64,
    },
    /// Everything held on the person, as JSON (right of access): identifiers, traits and their
    /// history, events, computed traits, memberships and their history, consents, merges,
    /// quarantined messages naming them, audit records about them.
    Export {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Consent per purpose with its history; with --grant or --withdraw, record a change
    /// (source `api`, durable when the command returns).
    Consent {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
        /// Purposes granted (repeat, or comma-separated): email, analytics, personalization,
        /// profiling, advertising, or one of consent.toml.
        #[arg(long, value_delimiter = ',')]
        grant: Vec<String>,
        /// Purposes withdrawn.
        #[arg(long, value_delimiter = ',')]
        withdraw: Vec<String>,
        /// Lawful basis: consent, contract, legal_obligation, vital_interests, public_task,
        /// legitimate_interests.
        #[arg(long)]
        basis: Option<String>,
        /// Print JSON (the same document as GET /api/profiles/{id}/consents).
        #[arg(long)]
        json: bool,
    },
}

/// The profile `id` names, once `--yes` confirmed what cannot be undone.
fn confirmed(engine: &cible_core::Engine, id: &str, yes: bool, doing: &str) -> anyhow::Result<u32> {
    let profile = engine
        .find_profile(id)
        .with_context(|| format!("no profile {id:?}"))?;
    if !yes {
        bail!("{doing} profile {profile} cannot be undone; run again with --yes");
    }
    Ok(profile)
}

/// Records an access export in the audit log (about the person, by their identifiers).
pub(crate) fn audit_access(
    engine: &cible_core::Engine,
    document: &serde_json::Value,
) -> Result<(), cible_core::EngineError> {
    let identifiers: Vec<String> = [
        ("user_ids", "u:"),
        ("anonymous_ids", "a:"),
        ("emails", "e:"),
    ]
    .iter()
    .flat_map(|(field, prefix)| {
        document["identifiers"][field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .map(move |v| format!("{prefix}{v}"))
    })
    .collect();
    engine.audit(engine.audit_entry(
        cible_core::audit::Action::Export,
        &identifiers,
        serde_json::json!({"what": "access", "profile": document["profile"],
            "events": document["events"].as_array().map_or(0, Vec::len)}),
    ))
}

/// Writes a JSON document to a file, or pretty to standard output.
fn write_document(
    document: &serde_json::Value,
    out: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    match out {
        Some(path) => std::fs::write(path, serde_json::to_vec_pretty(document)?)
            .with_context(|| format!("writing {}", path.display())),
        None => crate::print_json(document),
    }
}

/// The purposes of `--grant` and `--withdraw`, as the API takes them.
fn consent_purposes(
    grant: &[String],
    withdraw: &[String],
) -> anyhow::Result<std::collections::BTreeMap<String, bool>> {
    let mut purposes = std::collections::BTreeMap::new();
    for (list, granted) in [(grant, true), (withdraw, false)] {
        for purpose in list {
            if purposes.insert(purpose.clone(), granted) == Some(!granted) {
                bail!("--grant and --withdraw both name {purpose:?}");
            }
        }
    }
    Ok(purposes)
}

/// `profile consent` as text.
fn print_consents(view: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        return crate::print_json(view);
    }
    println!("profile {}", view["profile"]);
    for (purpose, state) in view["current"].as_object().into_iter().flatten() {
        let since = &state["since"];
        let how = if since.is_null() {
            "never asked".to_string()
        } else {
            format!(
                "{} since {} ({}, {})",
                if state["granted"] == true {
                    "granted"
                } else {
                    "withdrawn"
                },
                cible_core::time::format_ms(since["at"].as_i64().unwrap_or_default()),
                since["source"].as_str().unwrap_or("-"),
                since["basis"].as_str().unwrap_or("-"),
            )
        };
        let permitted = if state["permitted"] == true {
            "permitted"
        } else {
            "not permitted"
        };
        println!(
            "  {purpose:<16} {permitted:<14} {how}  [{}]",
            state["rule"].as_str().unwrap_or_default()
        );
    }
    let history = view["history"].as_array().map_or(0, Vec::len);
    println!("  {history} changes in the history (--json shows them)");
    Ok(())
}

pub fn profile(global: &Global, command: ProfileCommand) -> anyhow::Result<()> {
    // `show` reads one profile: a light open loads only that profile's rows, when the computed
    // traits' calibration is stored (otherwise it must be computed over everyone).
    let light = matches!(command, ProfileCommand::Show { .. });
    let engine = match global.open_or_remote(light)? {
        crate::Opened::Local(engine) if engine.is_light() && !engine.has_calibration()? => {
            drop(engine);
            Box::new(global.open_existing()?)
        }
        crate::Opened::Local(engine) => engine,
        crate::Opened::Remote(remote) => return profile_remote(&remote, command),
    };
    match command {
        ProfileCommand::Show {
            id,
            offset,
            limit,
            kind,
            json,
        } => {
            let kind = kind.as_deref().map(parse_kind).transpose()?;
            let view = profile_view(
                &engine,
                &id,
                TimelineQuery {
                    kind,
                    offset,
                    limit,
                },
                global.now_ms()?,
            )?;
            let view = serde_json::to_value(&view)?;
            if json {
                crate::print_json(&view)?;
                return Ok(());
            }
            print_profile(&view, offset);
        }
        ProfileCommand::Merges { id } => {
            let merges = match id {
                Some(id) => {
                    let profile = engine
                        .find_profile(&id)
                        .with_context(|| format!("no profile {id:?}"))?;
                    engine.merges_into(profile)?
                }
                None => engine.all_merges()?,
            };
            for merge in merges {
                print_merge(&serde_json::to_value(cible_core::view::merge_view(merge))?);
            }
        }
        ProfileCommand::Delete { id, yes } => {
            let profile = confirmed(&engine, &id, yes, "removing")?;
            let outcome = engine.remove_profile(profile)?;
            print_removal(&serde_json::to_value(&outcome)?);
        }
        ProfileCommand::Erase { id, yes, json } => {
            let profile = confirmed(&engine, &id, yes, "erasing")?;
            let receipt = engine.erase_profile(profile)?;
            print_receipt(&serde_json::to_value(&receipt)?, json)?;
        }
        ProfileCommand::Recommend { id, n, json } => {
            let profile = engine
                .lookup_profile(&id)
                .ok_or_else(|| anyhow::anyhow!("no profile {id:?}"))?
                .profile;
            let items = engine.recommend(profile, n, global.now_ms()?)?;
            print_recommendations(&serde_json::to_value(&items)?, json)?;
        }
        ProfileCommand::Unmerge { merge } => {
            let outcome = engine.unmerge(merge, global.now_ms()?)?;
            print_unmerge(&serde_json::to_value(&outcome)?);
        }
        ProfileCommand::Export { id, out } => {
            let document = cible_core::view::access_export(&engine, &id, global.now_ms()?)?;
            audit_access(&engine, &document)?;
            write_document(&document, out.as_deref())?;
        }
        ProfileCommand::Consent {
            id,
            grant,
            withdraw,
            basis,
            json,
        } => {
            let profile = engine
                .find_profile(&id)
                .with_context(|| format!("no profile {id:?}"))?;
            let purposes = consent_purposes(&grant, &withdraw)?;
            let consents = if purposes.is_empty() {
                engine.consents_of(profile)?
            } else {
                let request = cible_core::engine::ConsentRequest {
                    purposes,
                    basis,
                    ..Default::default()
                };
                engine.set_consents(profile, &request, global.now_ms()?)?
            };
            let view = cible_core::view::consents_view(engine.purposes(), profile, consents);
            print_consents(&serde_json::to_value(view)?, json)?;
        }
    }
    Ok(())
}

fn parse_kind(text: &str) -> anyhow::Result<MessageType> {
    MessageType::parse(text).with_context(|| {
        format!("--type {text:?}: expected track, identify, page, screen, alias or group")
    })
}

#[derive(Debug, Args)]
pub struct QualityArgs {
    #[command(subcommand)]
    command: Option<QualityCommand>,
    /// Print the report as JSON (the same document as GET /api/quality).
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Subcommand)]
enum QualityCommand {
    /// List quarantined messages with their reason, kept whole.
    List {
        #[arg(long, value_parser = parse_reason)]
        reason: Option<Reason>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Re-process quarantined messages under today's rules (and --now).
    Replay {
        #[arg(long, value_parser = parse_reason)]
        reason: Option<Reason>,
    },
}

fn parse_reason(text: &str) -> Result<Reason, String> {
    serde_json::from_value(serde_json::Value::String(text.to_string()))
        .map_err(|_| format!("unknown reason {text:?}; see `cible quality` for the reasons in use"))
}

pub fn quality(global: &Global, args: QualityArgs) -> anyhow::Result<()> {
    if let Some(remote) = global.running_server() {
        return quality_remote(&remote, args);
    }
    let engine = global.open_existing()?;
    match args.command {
        None => print_quality(&engine.quality()?, args.json)?,
        Some(QualityCommand::List { reason, limit }) => {
            print_quarantined(&engine.quarantined(reason, limit)?, args.json)?;
        }
        Some(QualityCommand::Replay { reason }) => {
            let outcome = engine.replay_quarantine(reason, global.now_ms()?)?;
            print_replay(&serde_json::to_value(&outcome)?, args.json)?;
        }
    }
    Ok(())
}

/// `cible quality ...` through the running server.
fn quality_remote(remote: &crate::local::Remote, args: QualityArgs) -> anyhow::Result<()> {
    let reason_query =
        |reason: Option<Reason>| reason.map_or(String::new(), |r| format!("reason={}", r.code()));
    match args.command {
        None => {
            let report: cible_core::records::QualityReport =
                serde_json::from_value(remote.call("GET", "/api/quality", None)?)?;
            print_quality(&report, args.json)?;
        }
        Some(QualityCommand::List { reason, limit }) => {
            let path = format!(
                "/api/quality/quarantine?limit={limit}&{}",
                reason_query(reason)
            );
            let records: Vec<cible_core::records::QuarantineRecord> =
                serde_json::from_value(remote.call("GET", &path, None)?)?;
            print_quarantined(&records, args.json)?;
        }
        Some(QualityCommand::Replay { reason }) => {
            let path = format!("/api/quality/replay?{}", reason_query(reason));
            print_replay(&remote.call("POST", &path, None)?, args.json)?;
        }
    }
    Ok(())
}

fn print_replay(outcome: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        crate::print_json(outcome)?;
    } else {
        println!(
            "replayed: {} accepted, {} duplicates, {} still quarantined",
            outcome["accepted"],
            outcome["duplicates"],
            outcome["quarantined"].as_array().map_or(0, Vec::len)
        );
    }
    Ok(())
}

fn print_quarantined(
    records: &[cible_core::records::QuarantineRecord],
    json: bool,
) -> anyhow::Result<()> {
    for record in records {
        if json {
            println!("{}", serde_json::to_string(&record)?);
        } else {
            let field = record
                .field
                .as_deref()
                .map(|f| format!(" [{f}]"))
                .unwrap_or_default();
            println!(
                "#{} {} {}{field}: {}",
                record.id,
                format_ms(record.received_at),
                record.reason.code(),
                record.detail
            );
            println!("    {}", record.raw);
        }
    }
    Ok(())
}

fn print_quality(report: &cible_core::records::QualityReport, json: bool) -> anyhow::Result<()> {
    if json {
        crate::print_json(&report)?;
        return Ok(());
    }
    let c = &report.counters;
    println!("events stored       {}", report.events);
    println!(
        "profiles            {} ({} merged away)",
        report.profiles, report.merged_profiles
    );
    println!("messages received   {}", c.received);
    println!("  accepted          {}", c.accepted);
    println!("  duplicates        {}", c.duplicates);
    println!(
        "  quarantined       {}",
        c.quarantined_by_reason.values().sum::<u64>()
    );
    for (reason, n) in &c.quarantined_by_reason {
        let waiting = report.in_quarantine.get(reason).copied().unwrap_or(0);
        println!(
            "    {:<22}{n} ({waiting} still in quarantine)",
            reason.code()
        );
    }
    println!("anomalies flagged");
    for (flag, n) in &c.anomalies_by_flag {
        println!("  {flag:<24}{n}");
    }
    println!("identity links refused  {}", c.identity_conflicts);
    println!("by source");
    for (source, s) in &c.by_source {
        println!(
            "  {source:<10} received {} accepted {} duplicates {} quarantined {}",
            s.received, s.accepted, s.duplicates, s.quarantined
        );
    }
    Ok(())
}

#[derive(Debug, Subcommand)]
pub enum ExportCommand {
    /// Every stored event as JSON Lines, with its profile number, in (profile, time) order,
    /// of the profiles whose consents let `--purpose` process them.
    Events {
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// What the export is for (a consent purpose: analytics, email, advertising...): only
        /// the profiles that purpose may process are written.
        #[arg(long)]
        purpose: String,
        /// Replace identifiers by keyed pseudonyms (HMAC-SHA256 under the store's key; see
        /// `cible pseudonym rotate`).
        #[arg(long)]
        pseudonymize: bool,
    },
    /// Every live profile's feature vector for models, as Parquet (see the README for the
    /// columns); profiles that objected to profiling are left out.
    Features {
        /// Output file (.parquet).
        #[arg(long)]
        out: PathBuf,
        /// Rescale every column over the population: none, zscore or minmax.
        #[arg(long, value_enum, default_value = "none")]
        scale: ScaleArg,
    },
    /// Every live profile: number, identifiers, current traits, computed traits and model
    /// outputs, consents; only the profiles whose consents let `--purpose` process them.
    Profiles {
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// What the export is for (a consent purpose: analytics, email, advertising...).
        #[arg(long)]
        purpose: String,
        /// Replace identifiers by keyed pseudonyms, as `export events --pseudonymize` does (the
        /// two join on them).
        #[arg(long)]
        pseudonymize: bool,
        /// jsonl (nested), csv or parquet (flattened: `traits.plan`, `computed.score.value`...).
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
    /// A segment's members, as `export profiles` writes profiles, with `entered_at`.
    Members {
        /// The segment.
        name: String,
        /// Output file; standard output when absent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// What the export is for (a consent purpose): only the members it permits.
        #[arg(long, default_value = "email")]
        purpose: String,
        #[arg(long)]
        pseudonymize: bool,
        /// jsonl, csv or parquet.
        #[arg(long, default_value = "csv")]
        format: String,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ScaleArg {
    None,
    Zscore,
    Minmax,
}

pub fn export(global: &Global, command: ExportCommand) -> anyhow::Result<()> {
    let engine = global.open_existing()?;
    if let ExportCommand::Features { out, scale } = &command {
        let mut table = engine.features(global.now_ms()?)?;
        table.scale(match scale {
            ScaleArg::None => cible_core::features::Scaling::None,
            ScaleArg::Zscore => cible_core::features::Scaling::ZScore,
            ScaleArg::Minmax => cible_core::features::Scaling::MinMax,
        });
        table.write_parquet(out)?;
        engine.audit(engine.audit_entry(
            cible_core::audit::Action::Export,
            &[],
            serde_json::json!({"what": "features", "purpose": "profiling", "profiles": table.rows.len()}),
        ))?;
        eprintln!(
            "wrote {} profiles x {} features to {}",
            table.rows.len(),
            table.names.len(),
            out.display()
        );
        return Ok(());
    }
    if let ExportCommand::Profiles {
        out,
        purpose,
        pseudonymize,
        format,
    }
    | ExportCommand::Members {
        out,
        purpose,
        pseudonymize,
        format,
        ..
    } = &command
    {
        let spec = cible_core::export::ExportSpec {
            segment: match &command {
                ExportCommand::Members { name, .. } => Some(name.clone()),
                _ => None,
            },
            purpose: purpose.clone(),
            pseudonymize: *pseudonymize,
            format: cible_core::export::Format::parse(format)?,
            now: global.now_ms()?,
        };
        let sink: Box<dyn Write + Send> = match out {
            Some(path) => Box::new(
                std::fs::File::create(path)
                    .with_context(|| format!("creating {}", path.display()))?,
            ),
            None => Box::new(std::io::stdout()),
        };
        return match cible_core::audit::with_actor("cli", || {
            cible_core::export::write_profiles(&engine, &spec, sink)
        }) {
            Ok(written) => {
                if out.is_some() {
                    eprintln!("wrote {written} profiles");
                }
                Ok(())
            }
            Err(cible_core::EngineError::Output(error))
                if error.kind() == std::io::ErrorKind::BrokenPipe =>
            {
                Ok(())
            }
            Err(error) => Err(error.into()),
        };
    }
    let ExportCommand::Events {
        out,
        purpose,
        pseudonymize,
    } = &command
    else {
        unreachable!("the others are written above")
    };
    // The consent check first: an unknown purpose writes nothing.
    let check = engine.consent_check(purpose)?;
    let pseudonyms = if *pseudonymize {
        Some(engine.pseudonymizer()?)
    } else {
        None
    };
    let sink: Box<dyn Write> = match out {
        Some(path) => Box::new(
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
        ),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut writer = BufWriter::with_capacity(1 << 20, sink);
    let (what, result) = match command {
        ExportCommand::Events { .. } => (
            "events",
            export_events(&engine, &check, pseudonyms.as_ref(), &mut writer),
        ),
        _ => unreachable!("the others are written above"),
    };
    let written = match result.and_then(|written| writer.flush().map(|()| written)) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
        other => other?,
    };
    engine.audit(engine.audit_entry(
        cible_core::audit::Action::Export,
        &[],
        serde_json::json!({"what": what, "purpose": check.purpose(), "records": written,
            "pseudonym_key": pseudonyms.as_ref().map(|p| p.version())}),
    ))?;
    Ok(())
}

fn export_events(
    engine: &cible_core::Engine,
    check: &cible_core::consent::ConsentCheck,
    pseudonyms: Option<&cible_core::pseudonym::Pseudonymizer>,
    writer: &mut impl Write,
) -> std::io::Result<u64> {
    let mut io_error = None;
    let mut written = 0u64;
    let outcome = engine.for_each_event(|event| {
        if !check.permits(event.profile) {
            return Ok(());
        }
        written += 1;
        let mut line = cible_core::view::event_json(event);
        if let Some(pseudonyms) = pseudonyms {
            pseudonyms.event(&mut line);
        }
        if let Err(error) = serde_json::to_writer(&mut *writer, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| writer.write_all(b"\n"))
        {
            io_error = Some(error);
            return Err(cible_core::EngineError::Invalid("output closed".into()));
        }
        Ok(())
    });
    match (io_error, outcome) {
        (Some(error), _) => Err(error),
        (None, Err(error)) => Err(std::io::Error::other(error.to_string())),
        (None, Ok(())) => Ok(written),
    }
}

/// `profile show` as text, from the profile's JSON (the same for a local store and a server).
fn print_profile(view: &serde_json::Value, offset: usize) {
    let text = |value: &serde_json::Value| value.as_str().unwrap_or("-").to_string();
    let list = |value: &serde_json::Value| {
        value
            .as_array()
            .map(|items| {
                items
                    .iter()
                    .map(|i| i.as_str().unwrap_or_default().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .unwrap_or_default()
    };
    println!("profile {}", view["id"]);
    if let Some(asked) = view["requested_merged_profile"].as_u64() {
        println!("  (profile {asked} was merged into this one)");
    }
    let identifiers = &view["identifiers"];
    println!("  user ids       {}", list(&identifiers["user_ids"]));
    println!("  anonymous ids  {}", list(&identifiers["anonymous_ids"]));
    println!("  emails         {}", list(&identifiers["emails"]));
    println!("  created        {}", text(&view["created_at"]));
    println!(
        "  events         {} (first {}, last {})",
        view["event_count"],
        text(&view["first_seen"]),
        text(&view["last_seen"])
    );
    let flagged: Vec<String> = view["flags"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(f, n)| format!("{f}: {n}"))
        .collect();
    if !flagged.is_empty() {
        println!("  flags          {}", flagged.join(", "));
    }
    println!("traits");
    for (name, value) in view["traits"].as_object().into_iter().flatten() {
        println!(
            "  {name:<20} {}  (since {})",
            value["value"],
            text(&value["updated_at"])
        );
    }
    let c = &view["computed"];
    println!("computed traits (see `cible traits show`)");
    println!("  score.engagement     {}", c["score"]["engagement"]);
    if c["rfm"].is_object() {
        println!(
            "  rfm                  {} ({})",
            text(&c["rfm"]["segment"]),
            text(&c["rfm"]["score"])
        );
    }
    println!(
        "  intent               {}{}",
        text(&c["intent"]["level"]),
        c["intent"]["category"]
            .as_str()
            .map(|cat| format!(" ({cat})"))
            .unwrap_or_default()
    );
    println!("  lifecycle            {}", text(&c["lifecycle"]));
    println!(
        "  send_time            {:02}:00 UTC, weekday {} ({})",
        c["send_time"]["hour"].as_u64().unwrap_or(0),
        c["send_time"]["weekday"],
        text(&c["send_time"]["source"])
    );
    let merges = view["merges"].as_array().cloned().unwrap_or_default();
    if !merges.is_empty() {
        println!("merges");
        for merge in &merges {
            let undone = merge["unmerged_at"]
                .as_str()
                .map(|at| format!(" [undone {at}]"))
                .unwrap_or_default();
            println!(
                "  #{} from profile {} at {}: {}{undone}",
                merge["id"],
                merge["from"],
                text(&merge["at"]),
                text(&merge["cause"])
            );
        }
    }
    let events = view["timeline"]["events"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    println!(
        "timeline ({}-{} of {}, newest first)",
        offset + 1,
        offset + events.len(),
        view["timeline"]["total"]
    );
    for event in &events {
        let name = event["event"]
            .as_str()
            .unwrap_or_else(|| event["type"].as_str().unwrap_or("?"));
        let detail = event
            .get("properties")
            .map(|p| p.to_string())
            .unwrap_or_default();
        let flags = event
            .get("flags")
            .map(|f| format!(" flags={f}"))
            .unwrap_or_default();
        println!(
            "  {}  {name:<20} {detail}{flags}",
            event["timestamp"].as_str().unwrap_or("?")
        );
    }
}

/// `cible profile ...` through the running server.
fn profile_remote(remote: &crate::local::Remote, command: ProfileCommand) -> anyhow::Result<()> {
    match command {
        ProfileCommand::Show {
            id,
            offset,
            limit,
            kind,
            json,
        } => {
            let mut path = format!(
                "/api/profiles/{}?offset={offset}&limit={limit}",
                crate::local::escape(&id)
            );
            if let Some(kind) = kind {
                path.push_str(&format!("&type={}", crate::local::escape(&kind)));
            }
            let view = remote.call("GET", &path, None)?;
            if json {
                crate::print_json(&view)?;
            } else {
                print_profile(&view, offset);
            }
        }
        ProfileCommand::Merges { id } => {
            let merges = match id {
                Some(id) => {
                    let path = format!("/api/profiles/{}?limit=0", crate::local::escape(&id));
                    remote.call("GET", &path, None)?["merges"].clone()
                }
                None => remote.call("GET", "/api/merges", None)?,
            };
            for merge in merges.as_array().into_iter().flatten() {
                print_merge(merge);
            }
        }
        ProfileCommand::Delete { id, yes } => {
            if !yes {
                bail!("removing profile {id} cannot be undone; run again with --yes");
            }
            let path = format!("/api/profiles/{}", crate::local::escape(&id));
            print_removal(&remote.call("DELETE", &path, None)?);
        }
        ProfileCommand::Erase { id, yes, json } => {
            if !yes {
                bail!("erasing profile {id} cannot be undone; run again with --yes");
            }
            let path = format!("/api/profiles/{}?erase=true", crate::local::escape(&id));
            print_receipt(&remote.call("DELETE", &path, None)?, json)?;
        }
        ProfileCommand::Recommend { id, n, json } => {
            let path = format!(
                "/api/profiles/{}/recommendations?n={n}",
                crate::local::escape(&id)
            );
            print_recommendations(&remote.call("GET", &path, None)?["items"], json)?;
        }
        ProfileCommand::Unmerge { merge } => {
            let path = format!("/api/merges/{merge}/unmerge");
            print_unmerge(&remote.call("POST", &path, None)?);
        }
        ProfileCommand::Export { id, out } => {
            let path = format!("/api/profiles/{}/export", crate::local::escape(&id));
            write_document(&remote.call("GET", &path, None)?, out.as_deref())?;
        }
        ProfileCommand::Consent {
            id,
            grant,
            withdraw,
            basis,
            json,
        } => {
            let path = format!("/api/profiles/{}/consents", crate::local::escape(&id));
            let purposes = consent_purposes(&grant, &withdraw)?;
            let view = if purposes.is_empty() {
                remote.call("GET", &path, None)?
            } else {
                let body = serde_json::json!({"purposes": purposes, "basis": basis});
                remote.call("PUT", &path, Some(&body))?
            };
            print_consents(&view, json)?;
        }
    }
    Ok(())
}

fn list_of(value: &serde_json::Value) -> String {
    value
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|i| i.as_str().map_or_else(|| i.to_string(), str::to_string))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

fn print_merge(merge: &serde_json::Value) {
    let undone = merge["unmerged_at"]
        .as_str()
        .map(|at| format!(" [undone {at}]"))
        .unwrap_or_default();
    println!(
        "#{} {} -> {} at {}: {} ({}){undone}",
        merge["id"],
        merge["from"],
        merge["into"],
        merge["at"].as_str().unwrap_or_default(),
        merge["cause"].as_str().unwrap_or_default(),
        list_of(&merge["identifiers"])
    );
}

fn print_removal(outcome: &serde_json::Value) {
    println!(
        "profile {} removed: {} event(s), identifiers {}",
        outcome["profile"],
        outcome["events_removed"],
        list_of(&outcome["identifiers_removed"])
    );
}

fn print_receipt(receipt: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        return crate::print_json(receipt);
    }
    println!(
        "profile {} erased in {:.2} s: {} event(s), {} merged profile(s), {} quarantined message(s), {} feed entries; {} identifier(s) kept only as keyed hashes to refuse later messages",
        receipt["profile"],
        receipt["seconds"].as_f64().unwrap_or_default(),
        receipt["events_removed"],
        receipt["merged_profiles_removed"]
            .as_array()
            .map_or(0, Vec::len),
        receipt["quarantined_removed"],
        receipt["feed_entries_removed"],
        receipt["subjects"].as_array().map_or(0, Vec::len),
    );
    let timings = &receipt["timings"];
    let ms = |name: &str| timings[name].as_f64().unwrap_or_default();
    println!(
        "  removal {:.0} ms, feed history {:.0} ms, journal {:.0} ms, rewrite {:.0} ms",
        ms("removal_ms"),
        ms("history_ms"),
        ms("journal_ms"),
        ms("rewrite_ms")
    );
    Ok(())
}

fn print_unmerge(outcome: &serde_json::Value) {
    println!(
        "merge #{} undone: profile {} is back with {} event(s) and {}; profile {} keeps the rest",
        outcome["merge"],
        outcome["restored_profile"],
        outcome["events_moved"],
        list_of(&outcome["identifiers"]),
        outcome["survivor"]
    );
}

fn print_recommendations(items: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        crate::print_json(items)?;
        return Ok(());
    }
    let items = items.as_array().cloned().unwrap_or_default();
    for item in &items {
        let because = item["because"]
            .as_str()
            .map(|b| format!(" ({b})"))
            .unwrap_or_default();
        println!(
            "{:<12} {}{because}",
            item["product_id"].as_str().unwrap_or_default(),
            item["reason"].as_str().unwrap_or_default()
        );
    }
    if items.is_empty() {
        println!("no recommendation: no product activity and no best sellers yet");
    }
    Ok(())
}
