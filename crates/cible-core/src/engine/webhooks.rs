//! The engine's side of webhooks: subscriptions, the delivery queue filled from the change
//! feed, settling attempts, dead letters and replay, and the payloads (built at each attempt
//! from the feed and the profile, so that consent and erasure apply to retries too). Every
//! write to the `webhooks` keyspace is under the `Webhooks` lock.

use serde_json::{Value, json};

use super::Engine;
use crate::error::{EngineError, Result, corrupt};
use crate::segment::feed::{Cause, FeedChange};
use crate::webhooks::{
    Delivery, Disabled, LIFECYCLE_PREFIX, Mode, Pending, Secret, Settle, Subscription, Target, keys,
};

/// What `create_webhook` is given.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub url: String,
    pub target: Target,
    pub on_enter: bool,
    pub on_exit: bool,
    pub mode: Mode,
    pub purpose: String,
    /// Start after this feed sequence number (0: the whole feed); when absent, the feed's head
    /// for events, 0 for a list sync (its first request carries the whole membership).
    pub after: Option<u64>,
}

/// Most changes one list sync request carries; a longer stretch of the feed is sent as several.
pub const LIST_MAX_CHANGES: usize = 50_000;
/// Longest list sync period.
pub const LIST_MAX_EVERY_SECS: u32 = 86_400;

impl Engine {
    fn read_subscription(&self, id: u32) -> Result<Subscription> {
        let bytes = self
            .store
            .webhooks
            .get(keys::of(keys::SUBSCRIPTION, id))?
            .ok_or_else(|| EngineError::NotFound(format!("webhook {id}")))?;
        serde_json::from_slice(&bytes).map_err(|e| corrupt("webhooks", e))
    }

    /// Creates a subscription with a fresh secret.
    pub fn create_webhook(&self, spec: NewWebhook, now: i64) -> Result<Subscription> {
        self.check_poisoned()?;
        crate::webhooks::check_url(&spec.url)
            .map_err(|e| EngineError::Invalid(format!("url: {e}")))?;
        if !spec.on_enter && !spec.on_exit {
            return Err(EngineError::Invalid(
                "on: name at least one of enter, exit".into(),
            ));
        }
        if let Target::Segment { name } = &spec.target {
            self.segment(name)?;
        }
        if let Mode::List { every_secs } = spec.mode {
            if !(1..=LIST_MAX_EVERY_SECS).contains(&every_secs) {
                return Err(EngineError::Invalid(format!(
                    "every: a list sync period is 1 to {LIST_MAX_EVERY_SECS} seconds, found {every_secs}"
                )));
            }
            if !matches!(spec.target, Target::Segment { .. }) {
                return Err(EngineError::Invalid(
                    "segment: a list sync is for one segment".into(),
                ));
            }
        }
        self.consent_check(&spec.purpose)
            .map_err(|e| EngineError::Invalid(format!("purpose: {e}")))?;
        let head = self.feed_head();
        let after = match spec.after {
            Some(after) if after > head => {
                return Err(EngineError::Invalid(format!(
                    "from: the feed ends at {head}, found {after}"
                )));
            }
            Some(after) => after,
            // A list destination starts with the whole current membership.
            None if matches!(spec.mode, Mode::List { .. }) => 0,
            None => head,
        };
        let _guard = self.webhook_lock.lock();
        let id = match self.store.webhooks.get(keys::NEXT_ID)? {
            Some(bytes) => u32::from_be_bytes(
                bytes
                    .as_ref()
                    .try_into()
                    .map_err(|e| corrupt("webhooks", e))?,
            ),
            None => 1,
        };
        let subscription = Subscription {
            id,
            url: spec.url,
            target: spec.target,
            on_enter: spec.on_enter,
            on_exit: spec.on_exit,
            mode: spec.mode,
            purpose: spec.purpose,
            secrets: vec![Secret {
                secret: crate::webhooks::new_secret(),
                created_at: now,
                expires_at: None,
            }],
            created_at: now,
            disabled: None,
        };
        let mut batch = self.store.synced_batch();
        batch.insert(&self.store.webhooks, keys::NEXT_ID, (id + 1).to_be_bytes());
        batch.insert(
            &self.store.webhooks,
            keys::of(keys::SUBSCRIPTION, id),
            crate::records::to_json(&subscription),
        );
        batch.insert(
            &self.store.webhooks,
            keys::of(keys::CURSOR, id),
            cursor_bytes(after, 0),
        );
        let entry = self.audit_entry(
            crate::audit::Action::WebhookChange,
            &[],
            json!({"op": "create", "webhook": id, "url": subscription.url,
                "target": subscription.target, "purpose": subscription.purpose}),
        );
        self.commit_audited(batch, entry, now)?;
        Ok(subscription)
    }

    /// Every subscription, by id.
    pub fn webhooks(&self) -> Result<Vec<Subscription>> {
        let mut out = Vec::new();
        for entry in self.store.webhooks.prefix([keys::SUBSCRIPTION]) {
            let (_, value) = entry.into_inner()?;
            out.push(serde_json::from_slice(&value).map_err(|e| corrupt("webhooks", e))?);
        }
        Ok(out)
    }

    /// One subscription.
    pub fn webhook(&self, id: u32) -> Result<Subscription> {
        self.read_subscription(id)
    }

    /// Removes a subscription, its queue and its dead letters.
    pub fn delete_webhook(&self, id: u32) -> Result<()> {
        self.check_poisoned()?;
        let _guard = self.webhook_lock.lock();
        self.read_subscription(id)?;
        let mut batch = self.store.synced_batch();
        batch.remove(&self.store.webhooks, keys::of(keys::SUBSCRIPTION, id));
        batch.remove(&self.store.webhooks, keys::of(keys::CURSOR, id));
        for tag in [keys::QUEUED, keys::DEAD] {
            for entry in self.store.webhooks.prefix(keys::of(tag, id)) {
                batch.remove(&self.store.webhooks, entry.key()?);
            }
        }
        let entry = self.audit_entry(
            crate::audit::Action::WebhookChange,
            &[],
            json!({"op": "delete", "webhook": id}),
        );
        self.commit_audited(batch, entry, crate::time::wall_clock_ms())
    }

    /// Changes a subscription under the lock: `edit` returns what the audit log says of it.
    fn edit_webhook(
        &self,
        id: u32,
        edit: impl FnOnce(&mut Subscription) -> Result<Value>,
    ) -> Result<Subscription> {
        self.check_poisoned()?;
        let _guard = self.webhook_lock.lock();
        let mut subscription = self.read_subscription(id)?;
        let detail = edit(&mut subscription)?;
        let mut batch = self.store.synced_batch();
        batch.insert(
            &self.store.webhooks,
            keys::of(keys::SUBSCRIPTION, id),
            crate::records::to_json(&subscription),
        );
        let entry = self.audit_entry(crate::audit::Action::WebhookChange, &[], detail);
        self.commit_audited(batch, entry, crate::time::wall_clock_ms())?;
        Ok(subscription)
    }

    /// Enables a subscription, or disables it with the reason (a 410 answer, an operator).
    pub fn set_webhook_enabled(
        &self,
        id: u32,
        enabled: bool,
        reason: &str,
        now: i64,
    ) -> Result<Subscription> {
        self.edit_webhook(id, |subscription| {
            subscription.disabled = (!enabled).then(|| Disabled {
                at: now,
                reason: reason.to_string(),
            });
            Ok(
                json!({"op": if enabled { "enable" } else { "disable" }, "webhook": id,
                "reason": reason}),
            )
        })
    }

    /// A new signing secret; the current ones sign too for `keep_old_ms` more (0: no more).
    pub fn rotate_webhook_secret(
        &self,
        id: u32,
        keep_old_ms: i64,
        now: i64,
    ) -> Result<Subscription> {
        if !(0..=30 * crate::time::DAY_MS).contains(&keep_old_ms) {
            return Err(EngineError::Invalid(format!(
                "keep_old: 0 to 30 days, found {keep_old_ms} ms"
            )));
        }
        self.edit_webhook(id, |subscription| {
            subscription
                .secrets
                .retain(|s| s.expires_at.is_none_or(|at| at > now));
            for secret in &mut subscription.secrets {
                let until = now + keep_old_ms;
                secret.expires_at = Some(secret.expires_at.map_or(until, |at| at.min(until)));
            }
            subscription
                .secrets
                .retain(|s| s.expires_at.is_none_or(|at| at > now));
            subscription.secrets.push(Secret {
                secret: crate::webhooks::new_secret(),
                created_at: now,
                expires_at: None,
            });
            Ok(json!({"op": "rotate", "webhook": id, "keep_old_ms": keep_old_ms}))
        })
    }

    /// The feed sequence number a subscription examined last, and when its last list sync was
    /// queued (ms; 0 for event subscriptions).
    pub fn webhook_cursor(&self, id: u32) -> Result<(u64, i64)> {
        let bytes = self
            .store
            .webhooks
            .get(keys::of(keys::CURSOR, id))?
            .ok_or_else(|| EngineError::NotFound(format!("webhook {id}")))?;
        parse_cursor(&bytes)
    }

    /// Queues the deliveries the feed owes a subscription since its cursor (at most `limit`
    /// changes read), and advances the cursor in the same batch. An event subscription gets
    /// one delivery per change it wants; a list subscription, when its period has passed, one
    /// delivery for the stretch of the feed since the last (if that holds a change of its
    /// segment). Returns what was queued.
    pub fn enqueue_webhook_changes(
        &self,
        id: u32,
        now: i64,
        limit: usize,
    ) -> Result<Vec<Delivery>> {
        self.check_poisoned()?;
        // The consent check before the lock (`Consents` comes before `Webhooks`).
        let check = self.consent_check(&self.read_subscription(id)?.purpose)?;
        let _guard = self.webhook_lock.lock();
        let subscription = self.read_subscription(id)?;
        let (cursor, listed_at) = self.webhook_cursor(id)?;
        let head = self.feed_head();
        if head <= cursor {
            return Ok(Vec::new());
        }
        let mut queued = Vec::new();
        let mut batch = self.store.db.batch();
        let mut put = |batch: &mut fjall::OwnedWriteBatch, seq: u64, pending: Pending| {
            batch.insert(
                &self.store.webhooks,
                keys::delivery(keys::QUEUED, id, seq),
                crate::records::to_json(&pending),
            );
            queued.push(Delivery {
                subscription: id,
                seq,
                pending,
            });
        };
        let (new_cursor, new_listed_at) = match subscription.mode {
            Mode::Events => {
                let changes = self.changes_after(cursor, limit)?;
                for change in &changes {
                    let allowed = change.cause == Cause::Erasure || check.permits(change.profile);
                    if subscription.wants(&change.segment, change.entered) && allowed {
                        put(
                            &mut batch,
                            change.seq,
                            Pending {
                                profile: Some(change.profile),
                                from: 0,
                                attempts: 0,
                                next_at: 0,
                                last_status: None,
                                last_error: None,
                                dead_at: None,
                            },
                        );
                    }
                }
                (changes.last().map_or(cursor, |c| c.seq), 0)
            }
            Mode::List { every_secs } => {
                if now < listed_at.saturating_add(i64::from(every_secs) * 1000) {
                    return Ok(Vec::new());
                }
                let (mut at, mut matching) = (cursor, 0usize);
                'read: while at < head {
                    let changes = self.changes_after(at, 10_000)?;
                    let Some(last) = changes.last() else { break };
                    for change in &changes {
                        if subscription.wants(&change.segment, change.entered) {
                            matching += 1;
                            if matching > LIST_MAX_CHANGES {
                                break 'read;
                            }
                        }
                        at = change.seq;
                    }
                    at = at.max(last.seq);
                }
                if matching > 0 {
                    put(
                        &mut batch,
                        at,
                        Pending {
                            profile: None,
                            from: cursor,
                            attempts: 0,
                            next_at: 0,
                            last_status: None,
                            last_error: None,
                            dead_at: None,
                        },
                    );
                }
                (at, now)
            }
        };
        batch.insert(
            &self.store.webhooks,
            keys::of(keys::CURSOR, id),
            cursor_bytes(new_cursor, new_listed_at),
        );
        batch.commit()?;
        Ok(queued)
    }

    fn read_deliveries(&self, tag: u8, id: u32, limit: usize) -> Result<Vec<Delivery>> {
        let mut out = Vec::new();
        for entry in self.store.webhooks.prefix(keys::of(tag, id)) {
            let (key, value) = entry.into_inner()?;
            let seq = keys::seq_of(&key).ok_or_else(|| corrupt("webhooks", "short key"))?;
            out.push(Delivery {
                subscription: id,
                seq,
                pending: serde_json::from_slice(&value).map_err(|e| corrupt("webhooks", e))?,
            });
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    /// How many deliveries a subscription is owed and how many are dead (keys counted, not
    /// decoded).
    pub fn webhook_counts(&self, id: u32) -> Result<(u64, u64)> {
        self.read_subscription(id)?;
        let count = |tag: u8| -> Result<u64> {
            let mut n = 0u64;
            for entry in self.store.webhooks.prefix(keys::of(tag, id)) {
                entry.key()?;
                n += 1;
            }
            Ok(n)
        };
        Ok((count(keys::QUEUED)?, count(keys::DEAD)?))
    }

    /// Every delivery still owed to a subscription, oldest change first.
    pub fn webhook_queue(&self, id: u32) -> Result<Vec<Delivery>> {
        self.read_deliveries(keys::QUEUED, id, usize::MAX)
    }

    /// A subscription's dead letters, oldest change first.
    pub fn webhook_dead_letters(&self, id: u32, limit: usize) -> Result<Vec<Delivery>> {
        self.read_subscription(id)?;
        self.read_deliveries(keys::DEAD, id, limit)
    }

    /// Puts dead letters back in the queue with their attempts reset: all of them, or those
    /// of these sequence numbers. Returns how many.
    pub fn replay_webhook(&self, id: u32, seqs: Option<&[u64]>) -> Result<u64> {
        self.check_poisoned()?;
        let _guard = self.webhook_lock.lock();
        self.read_subscription(id)?;
        let mut batch = self.store.synced_batch();
        let mut replayed = 0u64;
        for dead in self.read_deliveries(keys::DEAD, id, usize::MAX)? {
            if seqs.is_some_and(|seqs| !seqs.contains(&dead.seq)) {
                continue;
            }
            batch.remove(
                &self.store.webhooks,
                keys::delivery(keys::DEAD, id, dead.seq),
            );
            let pending = Pending {
                attempts: 0,
                next_at: 0,
                dead_at: None,
                ..dead.pending
            };
            batch.insert(
                &self.store.webhooks,
                keys::delivery(keys::QUEUED, id, dead.seq),
                crate::records::to_json(&pending),
            );
            replayed += 1;
        }
        if replayed > 0 {
            batch.commit()?;
        }
        Ok(replayed)
    }

    /// Records what attempts came to, in one batch (not synced: a settlement lost in a crash
    /// only sends that delivery again, under the same id).
    pub fn settle_webhook(&self, id: u32, settles: &[Settle]) -> Result<()> {
        if settles.is_empty() {
            return Ok(());
        }
        self.check_poisoned()?;
        let _guard = self.webhook_lock.lock();
        if !self
            .store
            .webhooks
            .contains_key(keys::of(keys::SUBSCRIPTION, id))?
        {
            return Ok(()); // deleted meanwhile: nothing to record
        }
        let mut batch = self.store.db.batch();
        for settle in settles {
            match settle {
                Settle::Done { seq } => {
                    batch.remove(&self.store.webhooks, keys::delivery(keys::QUEUED, id, *seq));
                }
                Settle::Retry { seq, pending } => {
                    // Erased or replayed meanwhile: the queue's row decides.
                    let key = keys::delivery(keys::QUEUED, id, *seq);
                    if self.store.webhooks.contains_key(key)? {
                        batch.insert(&self.store.webhooks, key, crate::records::to_json(pending));
                    }
                }
                Settle::Dead { seq, pending } => {
                    let key = keys::delivery(keys::QUEUED, id, *seq);
                    if self.store.webhooks.contains_key(key)? {
                        batch.remove(&self.store.webhooks, key);
                        batch.insert(
                            &self.store.webhooks,
                            keys::delivery(keys::DEAD, id, *seq),
                            crate::records::to_json(pending),
                        );
                    }
                }
            }
        }
        Ok(batch.commit()?)
    }

    /// The body of a delivery as it would be sent now, or `None` when nothing is left to send
    /// (the change was erased, or the profile's consent no longer permits the purpose).
    /// `check` is the subscription purpose's consent check (`Engine::consent_check`), taken
    /// once for many attempts: it copies the purpose's set of profiles.
    pub fn webhook_payload(
        &self,
        subscription: &Subscription,
        delivery: &Delivery,
        check: &crate::consent::ConsentCheck,
    ) -> Result<Option<Vec<u8>>> {
        if check.purpose() != subscription.purpose {
            return Err(EngineError::Invalid(format!(
                "purpose: the check is for {:?}, the subscription's purpose is {:?}",
                check.purpose(),
                subscription.purpose
            )));
        }
        let Some(profile) = delivery.pending.profile else {
            return self.list_payload(subscription, delivery, check);
        };
        let Some(change) = self.change_at(delivery.seq)? else {
            return Ok(None);
        };
        if change.profile != profile {
            return Ok(None);
        }
        let erased = change.cause == Cause::Erasure;
        if !erased && !check.permits(profile) {
            return Ok(None);
        }
        let stage = change.segment.strip_prefix(LIFECYCLE_PREFIX);
        let kind = match (stage.is_some(), change.entered) {
            (false, true) => "segment.entered",
            (false, false) => "segment.exited",
            (true, true) => "lifecycle.entered",
            (true, false) => "lifecycle.exited",
        };
        let mut data = json!({
            "sequence": change.seq,
            "segment": change.segment,
            "change": if change.entered { "enter" } else { "exit" },
            "cause": change.cause,
            "at": crate::time::format_ms(change.at),
            "segment_size": change.size,
            "profile": self.profile_identifiers(profile)?,
        });
        if let Some(stage) = stage {
            data["stage"] = Value::String(stage.replace('-', "_"));
        }
        let body = json!({
            "type": kind,
            "timestamp": crate::time::format_ms(change.at),
            "data": data,
        });
        Ok(Some(
            serde_json::to_vec(&body).map_err(|e| corrupt("webhooks", e))?,
        ))
    }

    /// A list sync's body: the net adds and removes of the segment over the stretch of the
    /// feed the delivery covers (a profile that entered and left meanwhile is in neither).
    fn list_payload(
        &self,
        subscription: &Subscription,
        delivery: &Delivery,
        check: &crate::consent::ConsentCheck,
    ) -> Result<Option<Vec<u8>>> {
        // Per profile: (in before the stretch, in after it).
        let mut net: std::collections::BTreeMap<u32, (bool, bool)> = Default::default();
        let mut at = delivery.pending.from;
        while at < delivery.seq {
            let changes = self.changes_after(at, 10_000)?;
            let Some(last) = changes.last().map(|c| c.seq) else {
                break;
            };
            for change in changes.iter().filter(|c| c.seq <= delivery.seq) {
                if subscription.target.matches(&change.segment) {
                    let entry = net
                        .entry(change.profile)
                        .or_insert((!change.entered, change.entered));
                    entry.1 = change.entered;
                }
            }
            at = last;
        }
        let (mut adds, mut removes) = (Vec::new(), Vec::new());
        for (profile, (before, after)) in net {
            match (before, after) {
                (false, true) if check.permits(profile) => {
                    adds.push(self.profile_identifiers(profile)?)
                }
                (true, false) => removes.push(self.profile_identifiers(profile)?),
                _ => {}
            }
        }
        let segment = match &subscription.target {
            Target::Segment { name } => name.clone(),
            other => format!("{other:?}"),
        };
        let body = json!({
            "type": "list.sync",
            "timestamp": crate::time::format_ms(crate::time::wall_clock_ms()),
            "data": {
                "segment": segment,
                "from_sequence": delivery.pending.from,
                "to_sequence": delivery.seq,
                "adds": adds,
                "removes": removes,
            },
        });
        Ok(Some(
            serde_json::to_vec(&body).map_err(|e| corrupt("webhooks", e))?,
        ))
    }

    /// The feed's change of this sequence number, if it is still there.
    fn change_at(&self, seq: u64) -> Result<Option<FeedChange>> {
        let found = self.changes_after(seq.saturating_sub(1), 1)?;
        Ok(found.into_iter().next().filter(|c| c.seq == seq))
    }

    /// What a payload says of a profile: its number and primary identifiers (none left after
    /// an erasure or a removal).
    fn profile_identifiers(&self, profile: u32) -> Result<Value> {
        let mut out = json!({"id": profile});
        if let Some(record) = crate::ingest::read_profile(&self.store, profile)? {
            for identifier in &record.identifiers {
                if let Some(user) = identifier.strip_prefix("u:") {
                    out["user_id"] = Value::String(user.to_string());
                } else if let Some(email) = identifier.strip_prefix("e:") {
                    out["email"] = Value::String(email.to_string());
                }
            }
            if let Some(survivor) = record.merged_into {
                out["merged_into"] = json!(survivor);
            }
        }
        Ok(out)
    }

    /// Erasure: drops the queued deliveries and dead letters of these profiles whose change
    /// has left the feed (their erasure's own exits stay, to tell receivers they left).
    pub(crate) fn forget_in_webhooks(&self, profiles: &rustc_hash::FxHashSet<u32>) -> Result<u64> {
        let _guard = self.webhook_lock.lock();
        let mut batch = self.store.synced_batch();
        let mut removed = 0u64;
        for tag in [keys::QUEUED, keys::DEAD] {
            for entry in self.store.webhooks.prefix([tag]) {
                let (key, value) = entry.into_inner()?;
                let pending: Pending =
                    serde_json::from_slice(&value).map_err(|e| corrupt("webhooks", e))?;
                let Some(profile) = pending.profile else {
                    continue;
                };
                let seq = keys::seq_of(&key).ok_or_else(|| corrupt("webhooks", "short key"))?;
                if profiles.contains(&profile) && self.change_at(seq)?.is_none() {
                    batch.remove(&self.store.webhooks, key);
                    removed += 1;
                }
            }
        }
        if removed > 0 {
            batch.commit()?;
        }
        Ok(removed)
    }
}

fn cursor_bytes(seq: u64, listed_at: i64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&seq.to_be_bytes());
    out[8..].copy_from_slice(&listed_at.to_be_bytes());
    out
}

fn parse_cursor(bytes: &[u8]) -> Result<(u64, i64)> {
    let seq = bytes
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_be_bytes);
    let at = bytes
        .get(8..16)
        .and_then(|b| b.try_into().ok())
        .map(i64::from_be_bytes);
    match (seq, at) {
        (Some(seq), Some(at)) => Ok((seq, at)),
        _ => Err(corrupt("webhooks", "a cursor is 16 bytes")),
    }
}
