//! The engine's face for ingestion: the writer lock taken, the batch prepared by
//! [`crate::ingest`]'s transaction, synced and committed, then the hot store, the trait columns
//! and the liveness mirror updated and the touched profiles handed to the segment worker.

use std::sync::atomic::Ordering;

use super::Engine;
use crate::error::{Result, corrupt};
use crate::hot::NO_NAME;
use crate::ingest::*;
use crate::message::{ParseContext, parse_message_text};
use crate::quality::Reason;
use crate::records::{BatchOutcome, to_json};
use crate::store::{event_key, key_of, merged_into_key, profile_key};

impl Engine {
    /// Accepts, deduplicates or quarantines each message, resolves identities, and commits the
    /// whole batch atomically.
    pub fn ingest(
        &self,
        items: Vec<Incoming>,
        source: &str,
        durability: Durability,
        now: i64,
    ) -> Result<BatchOutcome> {
        let mut outcomes = self.ingest_groups(vec![items], source, durability, now)?;
        Ok(outcomes.pop().unwrap_or_default())
    }

    /// Group commit: several requests' messages in one atomic, durable batch (one fsync), with
    /// an outcome per group. Quarantine indexes are relative to each group.
    pub fn ingest_groups(
        &self,
        groups: Vec<Vec<Incoming>>,
        source: &str,
        durability: Durability,
        now: i64,
    ) -> Result<Vec<BatchOutcome>> {
        self.check_poisoned()?;
        let mut groups = groups;
        let packer = self.packer();
        for item in groups.iter_mut().flatten() {
            item.pack(packer);
        }
        let mut state = self.state.lock();
        if durability != Durability::Bulk {
            self.flush_bulk(&mut state)?;
        }
        let hot = self.hot.read();
        // Any failure from here on leaves memory ahead of disk: refuse writes until a restart.
        let prepared = (|| -> Result<_> {
            let mut tx = Tx::new(&self.store, &mut state, &hot, source, &self.purposes, now);
            tx.expired_before = self.retention.events_cutoff(now);
            tx.bulk = durability == Durability::Bulk;
            if tx.bulk && tx.state.bulk.quality.is_none() {
                tx.state.bulk.quality = Some(tx.state.counters.quality.clone());
            }
            let mut outcomes = Vec::with_capacity(groups.len());
            for items in groups {
                for (index, item) in items.into_iter().enumerate() {
                    tx.offer(index, item)?;
                }
                outcomes.push(std::mem::take(&mut tx.outcome));
            }
            let Tx {
                batch,
                pending,
                mut batch_ids,
                hot_merges,
                created,
                dirty,
                consents,
                audit,
                ..
            } = tx.finish()?;
            batch_ids.clear();
            state.scratch.batch_ids = batch_ids;
            // Any batch but a bulk one goes into the log whole, as a redo record after its
            // bodies: the log's sync then makes the batch durable, and fjall's journal is
            // synced later, off this path (`Store::retire_redo`).
            let mut batch = batch.durability(Some(fjall::PersistMode::Buffer));
            // Audit records go in the batch they describe; the chain's head stays locked until
            // it commits, so records are numbered in commit order.
            let chain = (!audit.is_empty()).then(|| {
                let mut chain = self.audit_chain();
                let actor = match source {
                    "api" => crate::audit::actor(),
                    channel => channel.to_string(),
                };
                let entries = audit
                    .into_iter()
                    .map(|(action, identifiers, detail)| crate::audit::Entry {
                        action,
                        actor: actor.clone(),
                        subjects: chain.subjects(&identifiers),
                        detail,
                    })
                    .collect();
                chain.record(&self.store, &mut batch, entries, now);
                chain
            });
            let end = match durability {
                Durability::Bulk => None,
                Durability::Sync | Durability::Buffered => {
                    let end = self
                        .store
                        .log
                        .append_redo(&crate::store::Store::redo_payload(&batch))?;
                    self.store.commit_log_end(&mut batch, end);
                    Some(end)
                }
            };
            // The bodies the batch points at (and its redo record) are durable before it
            // commits.
            self.store.log.sync()?;
            batch.commit()?;
            drop(chain);
            if let Some(end) = end {
                self.store.log.mark_committed(end);
            }
            self.mirror_consents(&consents);
            if state.bulk.events.len() >= BULK_EVENTS {
                self.flush_bulk(&mut state)?;
            }
            Ok((outcomes, pending, hot_merges, created, dirty, consents))
        })();
        let (outcomes, pending, hot_merges, created, dirty, consents) =
            prepared.inspect_err(|_| {
                self.poisoned.store(true, Ordering::Release);
            })?;
        drop(hot);
        {
            let mut columns = self.trait_columns.write();
            if !columns.is_empty() {
                for (profile, record) in &dirty {
                    columns.update(*profile, &record.traits);
                }
            }
        }
        let mut touched = crate::segment::live::Touched::default();
        touched.all.extend(created.iter().map(|p| state.find(*p)));
        // A consent changed: every segment looks again (rules read `consent.*`, and what a
        // profile may be scored with).
        touched.all.extend(consents.iter().map(|(p, _)| *p));
        // Profiles born or merged away in this batch, whose liveness changes once the hot store
        // shows the batch.
        let born_or_merged: Vec<u32> = created
            .iter()
            .chain(hot_merges.iter().map(|(from, _)| from))
            .copied()
            .collect();
        let mut hot = self.hot.write();
        for (from, into) in hot_merges {
            hot.merge(from, into);
            touched.all.insert(from);
            touched.all.insert(state.find(into));
        }
        let mut pending = pending;
        for event in pending.drain(..) {
            let profile = state.find(event.profile);
            hot.insert(profile, event.record.to_hot(event.ts), &event.record.others);
            if event.record.name != NO_NAME {
                touched
                    .events
                    .entry(profile)
                    .or_default()
                    .insert(event.record.name);
            } else {
                // Identify (traits), alias and group calls: no event name, but they are seen.
                touched.traits.insert(profile);
            }
        }
        drop(hot);
        {
            let mut liveness = self.liveness.write();
            for profile in born_or_merged {
                liveness.set(profile, state.profiles[profile as usize].alive);
            }
        }
        self.dictionary_sizes[0].store(state.names.texts.len(), Ordering::Release);
        self.dictionary_sizes[1].store(state.keys.texts.len(), Ordering::Release);
        state.scratch.pending = pending;
        drop(state);
        for outcome in &outcomes {
            self.metrics
                .events_accepted
                .fetch_add(outcome.accepted, Ordering::Relaxed);
            self.metrics
                .events_duplicate
                .fetch_add(outcome.duplicates, Ordering::Relaxed);
            self.metrics
                .events_quarantined
                .fetch_add(outcome.quarantined.len() as u64, Ordering::Relaxed);
        }
        self.metrics
            .batches_committed
            .fetch_add(1, Ordering::Relaxed);
        let cause = if source == "import" {
            crate::segment::feed::Cause::Import
        } else {
            crate::segment::feed::Cause::Events
        };
        self.hand_off(touched, cause, now)?;
        Ok(outcomes)
    }

    /// Writes the bulk entries waiting (see [`Bulk`]) as sorted tables; the caller holds the
    /// writer lock. Called when they grow large, before any other batch, at the end of an
    /// import and on close.
    /// Nothing to do (and nothing written) when no bulk batch ran since the last flush.
    pub(crate) fn flush_bulk(&self, state: &mut State) -> Result<()> {
        let Some(from) = state.bulk.from.take() else {
            // Bulk batches without events (duplicates only) stored the old quality counts.
            if state.bulk.quality.take().is_some() {
                self.store
                    .meta
                    .insert(COUNTERS_KEY, to_json(&state.counters))?;
            }
            return Ok(());
        };
        self.or_poison(|| {
            // Under the profile each event lives in now (merges since it was written), in key
            // order: (profile, time, seq) sorts as `event_key`'s bytes do. Drained, not taken:
            // the buffers keep their capacity for the next round.
            let mut events = std::mem::take(&mut state.bulk.events);
            for event in &mut events {
                event.0 = state.find(event.0);
            }
            events.sort_unstable_by_key(|(profile, ts, seq, _, _)| (*profile, *ts, *seq));
            let probe = events
                .first()
                .map(|(profile, ts, seq, _, _)| event_key(*profile, *ts, *seq));

            // 1. One batch: profile records, identifier links, merge records, stored entries of
            // merged-away profiles moved to their survivor, the counters (quality as of the last
            // flush; the current ones wait under BULK_COUNTERS_KEY) and the marker.
            let mut batch = self.store.synced_batch();
            let mut consents = Vec::new();
            for profile in std::mem::take(&mut state.bulk.consent_touched) {
                let record = state.bulk.profiles.get(&profile).ok_or_else(|| {
                    corrupt("profiles", format!("profile {profile} waits for no flush"))
                })?;
                consents.push((
                    profile,
                    self.store
                        .write_consents(&mut batch, profile, &record.consents)?,
                ));
            }
            for (profile, record) in state.bulk.profiles.drain() {
                batch.insert(&self.store.profiles, profile_key(profile), to_json(&record));
            }
            for (ident, profile) in state.bulk.idents.drain() {
                batch.insert(&self.store.idents, ident.as_bytes(), profile.to_be_bytes());
            }
            for (id, into, record) in state.bulk.merges.drain(..) {
                batch.insert(&self.store.merges, id.to_be_bytes(), record);
                batch.insert(&self.store.merged_into, merged_into_key(into, id), []);
            }
            let mut moves = std::mem::take(&mut state.bulk.moves);
            moves.sort_unstable();
            moves.dedup();
            for moved in moves {
                let survivor = state.find(moved);
                for entry in self.store.events.prefix(profile_key(moved)) {
                    let (key, value) = entry.into_inner()?;
                    let (_, ts, seq) = key_of("events", &key)?;
                    batch.remove(&self.store.events, key);
                    batch.insert(&self.store.events, event_key(survivor, ts, seq), value);
                }
            }
            let old_quality = state.bulk.quality.take().unwrap_or_default();
            batch.insert(
                &self.store.meta,
                COUNTERS_KEY,
                to_json(&Counters {
                    quality: old_quality,
                    ..state.counters.clone()
                }),
            );
            batch.insert(
                &self.store.meta,
                BULK_COUNTERS_KEY,
                to_json(&state.counters),
            );
            batch.insert(
                &self.store.meta,
                BULK_KEY,
                bulk_marker(from, true, probe.as_ref().map(|k| k.as_slice())),
            );
            batch.commit()?;
            self.mirror_consents(&consents);

            // 2. The index entries and messageIds as sorted tables.
            let mut ingestion = self.store.events.start_ingestion()?;
            let entries = &state.bulk.entries;
            for (profile, ts, seq, at, len) in events.drain(..) {
                let value = &entries[at as usize..at as usize + usize::from(len)];
                ingestion.write(event_key(profile, ts, seq).to_vec(), value.to_vec())?;
            }
            ingestion.finish()?;
            state.bulk.events = events;
            state.bulk.entries.clear();
            let mut msgids: Vec<String> = state.bulk.msgids.drain().collect();
            msgids.sort_unstable();
            let mut ingestion = self.store.msgids.start_ingestion()?;
            for id in msgids {
                ingestion.write(id.into_bytes(), Vec::new())?;
            }
            ingestion.finish()?;

            // 3. Done: the current counters, and no marker.
            let mut batch = self.store.synced_batch();
            batch.remove(&self.store.meta, BULK_KEY);
            batch.remove(&self.store.meta, BULK_COUNTERS_KEY);
            batch.insert(&self.store.meta, COUNTERS_KEY, to_json(&state.counters));
            batch.commit()?;
            Ok(())
        })
    }

    /// Writes out a bulk import's waiting entries (the end of an import).
    pub fn finish_bulk(&self) -> Result<()> {
        let mut state = self.state.lock();
        self.flush_bulk(&mut state)
    }

    /// Re-offers quarantined messages (all, or those of one reason) under today's rules: a
    /// message accepted now leaves the quarantine, in the same batch.
    pub fn replay_quarantine(&self, reason: Option<Reason>, now: i64) -> Result<BatchOutcome> {
        let records = self.quarantined(reason, usize::MAX)?;
        let mut total = BatchOutcome::default();
        for chunk in records.chunks(10_000) {
            let items = chunk
                .iter()
                .map(|record| {
                    let parsed = parse_message_text(&record.raw, &ParseContext::at(now));
                    let replay = Replay {
                        id: record.id,
                        key: quarantine_key(&record.raw),
                    };
                    Incoming::new(parsed, Some(replay))
                })
                .collect();
            let outcome = self.ingest(items, "replay", Durability::Sync, now)?;
            total.absorb(&outcome);
            total.quarantined.extend(outcome.quarantined);
        }
        Ok(total)
    }
}
