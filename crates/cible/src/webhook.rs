//! `cible webhook ...` and the operations behind `/api/webhooks`: one [`Op`] per command, run
//! on the engine by the CLI (no server) and by the API handlers, or sent to the running
//! server by the CLI ([`Op::call`]), so that the three paths cannot drift apart.

use anyhow::Context;
use cible_core::Engine;
use cible_core::EngineError;
use cible_core::webhooks::{Mode, Target};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Global;

/// The body of `POST /api/webhooks` (and the flags of `cible webhook create`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub url: String,
    /// One segment, by name; or `all_segments`, or `lifecycle`.
    #[serde(default)]
    pub segment: Option<String>,
    #[serde(default)]
    pub all_segments: bool,
    #[serde(default)]
    pub lifecycle: bool,
    /// `enter`, `exit` (both when absent).
    #[serde(default)]
    pub on: Option<Vec<String>>,
    /// A list sync every this many seconds instead of a request per change.
    #[serde(default)]
    pub list_every_secs: Option<u32>,
    /// The consent purpose of the deliveries; `email` when absent.
    #[serde(default)]
    pub purpose: Option<String>,
    /// Start after this change sequence number (0: the whole feed); the feed's head when
    /// absent.
    #[serde(default)]
    pub from: Option<u64>,
}

/// The purpose deliveries are for when a subscription names none.
pub const DEFAULT_PURPOSE: &str = "email";

impl CreateRequest {
    fn into_spec(self) -> Result<cible_core::engine::NewWebhook, EngineError> {
        let target = match (self.segment, self.all_segments, self.lifecycle) {
            (Some(name), false, false) => Target::Segment { name },
            (None, true, false) => Target::AllSegments,
            (None, false, true) => Target::Lifecycle,
            _ => {
                return Err(EngineError::Invalid(
                    "segment: give exactly one of segment, all_segments, lifecycle".into(),
                ));
            }
        };
        let (mut on_enter, mut on_exit) = (self.on.is_none(), self.on.is_none());
        for kind in self.on.iter().flatten() {
            match kind.trim() {
                "enter" => on_enter = true,
                "exit" => on_exit = true,
                other => {
                    return Err(EngineError::Invalid(format!(
                        "on: {other:?} is not a change (enter, exit)"
                    )));
                }
            }
        }
        Ok(cible_core::engine::NewWebhook {
            url: self.url,
            target,
            on_enter,
            on_exit,
            mode: match self.list_every_secs {
                Some(every_secs) => Mode::List { every_secs },
                None => Mode::Events,
            },
            purpose: self.purpose.unwrap_or_else(|| DEFAULT_PURPOSE.into()),
            after: self.from,
        })
    }
}

/// The body of `POST /api/webhooks/{id}/replay`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayRequest {
    /// Only the dead letters of these change sequence numbers; all when absent.
    #[serde(default)]
    pub seqs: Option<Vec<u64>>,
}

/// The body of `POST /api/webhooks/{id}/rotate`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateRequest {
    /// How long the current secrets keep signing beside the new one (default 24 h).
    #[serde(default)]
    pub keep_old_secs: Option<i64>,
}

/// The old secrets sign for this long after a rotation, by default.
pub const DEFAULT_KEEP_OLD_SECS: i64 = 86_400;

/// One webhook operation.
#[derive(Debug, Clone)]
pub enum Op {
    Create(CreateRequest),
    List,
    Show(u32),
    Delete(u32),
    Rotate(u32, RotateRequest),
    Enable(u32),
    Disable(u32),
    Dead(u32, usize),
    Replay(u32, ReplayRequest),
}

impl Op {
    /// Runs the operation on the engine; the answer is what the API returns.
    pub fn run(self, engine: &Engine, now: i64) -> Result<Value, EngineError> {
        Ok(match self {
            Op::Create(request) => {
                let subscription = engine.create_webhook(request.into_spec()?, now)?;
                json!({"webhook": subscription})
            }
            Op::List => {
                let list: Vec<Value> = engine.webhooks()?.iter().map(|s| s.redacted()).collect();
                json!({"webhooks": list})
            }
            Op::Show(id) => {
                let subscription = engine.webhook(id)?;
                let (cursor, _) = engine.webhook_cursor(id)?;
                let (queued, dead) = engine.webhook_counts(id)?;
                json!({
                    "webhook": subscription.redacted(),
                    "cursor": cursor,
                    "feed_head": engine.feed_head(),
                    "queued": queued,
                    "dead": dead,
                })
            }
            Op::Delete(id) => {
                engine.delete_webhook(id)?;
                json!({"deleted": id})
            }
            Op::Rotate(id, request) => {
                let keep = request.keep_old_secs.unwrap_or(DEFAULT_KEEP_OLD_SECS);
                let keep_ms = keep.checked_mul(1000).ok_or_else(|| {
                    EngineError::Invalid(format!("keep_old_secs: {keep} is too large"))
                })?;
                json!({"webhook": engine.rotate_webhook_secret(id, keep_ms, now)?})
            }
            Op::Enable(id) => {
                json!({"webhook": engine.set_webhook_enabled(id, true, "", now)?.redacted()})
            }
            Op::Disable(id) => json!({"webhook": engine
                .set_webhook_enabled(id, false, "disabled by an operator", now)?
                .redacted()}),
            Op::Dead(id, limit) => json!({"dead_letters": engine.webhook_dead_letters(id, limit)?}),
            Op::Replay(id, request) => {
                json!({"replayed": engine.replay_webhook(id, request.seqs.as_deref())?})
            }
        })
    }

    /// Whether the operation changes what the sender must do (it is woken after).
    pub fn changes_deliveries(&self) -> bool {
        !matches!(self, Op::List | Op::Show(_) | Op::Dead(..))
    }

    /// Sends the operation to the running server.
    fn call(self, remote: &crate::local::Remote) -> anyhow::Result<Value> {
        let path = |id: u32, rest: &str| format!("/api/webhooks/{id}{rest}");
        match self {
            Op::Create(request) => remote.call(
                "POST",
                "/api/webhooks",
                Some(&json!({
                    "url": request.url, "segment": request.segment,
                    "all_segments": request.all_segments, "lifecycle": request.lifecycle,
                    "on": request.on, "list_every_secs": request.list_every_secs,
                    "purpose": request.purpose, "from": request.from,
                })),
            ),
            Op::List => remote.call("GET", "/api/webhooks", None),
            Op::Show(id) => remote.call("GET", &path(id, ""), None),
            Op::Delete(id) => remote.call("DELETE", &path(id, ""), None),
            Op::Rotate(id, request) => remote.call(
                "POST",
                &path(id, "/rotate"),
                Some(&json!({"keep_old_secs": request.keep_old_secs})),
            ),
            Op::Enable(id) => remote.call("POST", &path(id, "/enable"), None),
            Op::Disable(id) => remote.call("POST", &path(id, "/disable"), None),
            Op::Dead(id, limit) => {
                remote.call("GET", &path(id, &format!("/dead?limit={limit}")), None)
            }
            Op::Replay(id, request) => remote.call(
                "POST",
                &path(id, "/replay"),
                Some(&json!({"seqs": request.seqs})),
            ),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum WebhookCommand {
    /// Subscribe a URL to the changes of a segment (or of all segments, or of the lifecycle
    /// stages); prints the signing secret.
    Create {
        #[arg(long)]
        url: String,
        /// The segment whose enters and exits are sent.
        #[arg(long, conflicts_with_all = ["all_segments", "lifecycle"])]
        segment: Option<String>,
        /// Every segment's changes (lifecycle stages apart).
        #[arg(long)]
        all_segments: bool,
        /// The lifecycle-stage changes.
        #[arg(long)]
        lifecycle: bool,
        /// Which changes: enter, exit, or both (comma-separated).
        #[arg(long, value_delimiter = ',')]
        on: Option<Vec<String>>,
        /// Send a list sync (adds and removes) every this many seconds instead of one request
        /// per change.
        #[arg(long)]
        list_every: Option<u32>,
        /// The consent purpose of the deliveries: a profile it does not permit is not sent.
        #[arg(long, default_value = DEFAULT_PURPOSE)]
        purpose: String,
        /// Start after this change sequence number (0: the whole feed) instead of now.
        #[arg(long)]
        from: Option<u64>,
    },
    /// Every subscription.
    List,
    /// A subscription with its queue and dead-letter counts.
    Show { id: u32 },
    /// Removes a subscription, its queue and its dead letters.
    Delete { id: u32 },
    /// A new signing secret; the current ones keep signing for --keep-old-secs.
    Rotate {
        id: u32,
        #[arg(long, default_value_t = DEFAULT_KEEP_OLD_SECS)]
        keep_old_secs: i64,
    },
    /// Sends again (a subscription disabled by a 410 answer, or by hand).
    Enable { id: u32 },
    /// Stops sending; changes keep queueing.
    Disable { id: u32 },
    /// Dead letters: deliveries whose retries ran out.
    Dead {
        id: u32,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Puts dead letters back in the queue (all, or --seq ones).
    Replay {
        id: u32,
        #[arg(long = "seq")]
        seqs: Vec<u64>,
    },
}

impl WebhookCommand {
    fn into_op(self) -> Op {
        match self {
            WebhookCommand::Create {
                url,
                segment,
                all_segments,
                lifecycle,
                on,
                list_every,
                purpose,
                from,
            } => Op::Create(CreateRequest {
                url,
                segment,
                all_segments,
                lifecycle,
                on,
                list_every_secs: list_every,
                purpose: Some(purpose),
                from,
            }),
            WebhookCommand::List => Op::List,
            WebhookCommand::Show { id } => Op::Show(id),
            WebhookCommand::Delete { id } => Op::Delete(id),
            WebhookCommand::Rotate { id, keep_old_secs } => Op::Rotate(
                id,
                RotateRequest {
                    keep_old_secs: Some(keep_old_secs),
                },
            ),
            WebhookCommand::Enable { id } => Op::Enable(id),
            WebhookCommand::Disable { id } => Op::Disable(id),
            WebhookCommand::Dead { id, limit } => Op::Dead(id, limit),
            WebhookCommand::Replay { id, seqs } => Op::Replay(
                id,
                ReplayRequest {
                    seqs: (!seqs.is_empty()).then_some(seqs),
                },
            ),
        }
    }
}

pub fn run(global: &Global, command: WebhookCommand) -> anyhow::Result<()> {
    let op = command.into_op();
    let listing = matches!(op, Op::List);
    let answer = match global.open_or_remote(true)? {
        crate::Opened::Local(engine) => {
            let now = cible_core::time::wall_clock_ms();
            cible_core::audit::with_actor("cli", || op.run(&engine, now))?
        }
        crate::Opened::Remote(remote) => op.call(&remote)?,
    };
    if listing {
        let list = answer["webhooks"]
            .as_array()
            .context("the list of webhooks")?;
        if list.is_empty() {
            println!("no webhooks (cible webhook create --url URL --segment NAME)");
        }
        for w in list {
            let target = match w["target"]["kind"].as_str() {
                Some("segment") => {
                    format!("segment {}", w["target"]["name"].as_str().unwrap_or("?"))
                }
                Some(other) => other.replace('_', " "),
                None => "?".into(),
            };
            let state = if w["disabled"].is_object() {
                format!(
                    "disabled ({})",
                    w["disabled"]["reason"].as_str().unwrap_or("")
                )
            } else {
                "enabled".into()
            };
            println!(
                "{}\t{}\t{}\t{}\t{}",
                w["id"],
                w["url"].as_str().unwrap_or(""),
                target,
                w["purpose"].as_str().unwrap_or(""),
                state
            );
        }
    } else {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    }
    Ok(())
}
