//! `cible audit`: the audit log's records, and its verification (the head hash to keep
//! outside, and every kind of tampering found).

use clap::Subcommand;

use crate::{Global, Opened};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Checks every record's hash and link, their numbering and the stored head; prints the
    /// head (SEQ:HASH) to keep outside cible. Exits 1 when the log was tampered with.
    Verify {
        /// A head printed earlier (SEQ:HASH): the log must still contain exactly that record.
        #[arg(long)]
        head: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The records after a number, oldest first.
    List {
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 100)]
        limit: usize,
        #[arg(long)]
        json: bool,
    },
}

pub fn run(global: &Global, command: AuditCommand) -> anyhow::Result<()> {
    let engine = match global.open_or_remote(true)? {
        Opened::Local(engine) => engine,
        Opened::Remote(remote) => return run_remote(&remote, command),
    };
    match command {
        AuditCommand::Verify { head, json } => {
            let anchor = head.as_deref().map(parse_head).transpose()?;
            let answer = match engine.verify_audit(anchor.as_ref())? {
                Ok(verified) => {
                    serde_json::json!({"ok": true, "records": verified.records, "head": verified.head})
                }
                Err(tamper) => serde_json::json!({"ok": false, "error": tamper.to_string()}),
            };
            print_verification(&answer, json)
        }
        AuditCommand::List { after, limit, json } => {
            let records = engine.audit_records(after, limit.clamp(1, 10_000))?;
            print_records(&serde_json::to_value(records)?, json)
        }
    }
}

fn parse_head(text: &str) -> anyhow::Result<cible_core::audit::Head> {
    cible_core::audit::Head::parse(text).ok_or_else(|| {
        anyhow::anyhow!("--head {text:?}: expected SEQ:HASH, as `cible audit verify` prints it")
    })
}

fn run_remote(remote: &crate::local::Remote, command: AuditCommand) -> anyhow::Result<()> {
    match command {
        AuditCommand::Verify { head, json } => {
            if let Some(head) = &head {
                parse_head(head)?;
            }
            let path = match head {
                Some(head) => format!("/api/audit/verify?head={}", crate::local::escape(&head)),
                None => "/api/audit/verify".to_string(),
            };
            print_verification(&remote.call("GET", &path, None)?, json)
        }
        AuditCommand::List { after, limit, json } => {
            let path = format!("/api/audit?after={after}&limit={}", limit.clamp(1, 10_000));
            print_records(&remote.call("GET", &path, None)?, json)
        }
    }
}

fn print_verification(answer: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        crate::print_json(answer)?;
    } else if answer["ok"] == true {
        println!(
            "the audit log is intact: {} records, head {}",
            answer["records"],
            answer["head"].as_str().unwrap_or_default()
        );
    }
    if answer["ok"] != true {
        anyhow::bail!(
            "the audit log was tampered with: {}",
            answer["error"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}

fn print_records(records: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        return crate::print_json(records);
    }
    for record in records.as_array().into_iter().flatten() {
        println!(
            "{:>6}  {}  {:<16} {:<22} {}",
            record["seq"],
            cible_core::time::format_ms(record["at"].as_i64().unwrap_or_default()),
            record["action"].as_str().unwrap_or_default(),
            record["actor"].as_str().unwrap_or_default(),
            record["detail"]
        );
    }
    Ok(())
}
