//! Read models shared by the CLI and the HTTP API: what `cible profile show` and
//! `GET /api/profiles/{id}` return.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use crate::engine::Engine;
use crate::error::EngineError;
use crate::message::MessageType;
use crate::quality::flags;
use crate::records::{MergeRecord, StoredEvent};
use crate::time::format_ms;

/// A profile with a page of its timeline.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileView {
    pub id: u32,
    /// The id asked for, when it named a profile that was merged into this one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub requested_merged_profile: Option<u32>,
    pub identifiers: Identifiers,
    pub traits: BTreeMap<String, TraitView>,
    /// Scores, RFM, intent, lifecycle, send time, affinity at the time asked.
    pub computed: crate::computed::ComputedTraits,
    pub created_at: String,
    pub first_seen: Option<String>,
    pub last_seen: Option<String>,
    pub event_count: usize,
    /// Events carrying each anomaly flag.
    pub flags: BTreeMap<&'static str, usize>,
    /// Merges into this profile, undone ones included.
    pub merges: Vec<MergeView>,
    pub consents: ConsentsView,
    pub timeline: Timeline,
}

/// A profile's consents: the state of every purpose, and the history that led there.
#[derive(Debug, Clone, Serialize)]
pub struct ConsentsView {
    pub profile: u32,
    pub current: BTreeMap<String, CurrentConsent>,
    /// Every change, oldest first.
    pub history: Vec<crate::consent::ConsentChange>,
}

/// Where a purpose stands.
#[derive(Debug, Clone, Serialize)]
pub struct CurrentConsent {
    /// Granted and not withdrawn since (what `consent.<purpose>` reads).
    pub granted: bool,
    /// Whether the purpose may process the profile's data, under its rule.
    pub permitted: bool,
    pub rule: crate::consent::Rule,
    /// The change in force, if any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<crate::consent::ConsentChange>,
}

/// The consents view of a profile's history.
pub fn consents_view(
    purposes: &crate::consent::Purposes,
    profile: u32,
    consents: crate::consent::Consents,
) -> ConsentsView {
    let current = purposes
        .names()
        .map(|purpose| {
            let since = consents.current(purpose).cloned();
            let granted = since.as_ref().is_some_and(|c| c.granted);
            let rule = purposes.rule(purpose).expect("a known purpose");
            let permitted = match rule {
                crate::consent::Rule::OptIn => granted,
                crate::consent::Rule::OptOut => since.as_ref().is_none_or(|c| c.granted),
            };
            (
                purpose.to_string(),
                CurrentConsent {
                    granted,
                    permitted,
                    rule,
                    since,
                },
            )
        })
        .collect();
    ConsentsView {
        profile,
        current,
        history: consents.0,
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Identifiers {
    pub user_ids: Vec<String>,
    pub anonymous_ids: Vec<String>,
    pub emails: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TraitView {
    pub value: Value,
    /// Time of the identify call that set it.
    pub updated_at: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MergeView {
    pub id: u64,
    pub from: u32,
    /// The profile it was merged into.
    pub into: u32,
    pub cause: String,
    pub at: String,
    pub identifiers: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unmerged_at: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    pub offset: usize,
    pub limit: usize,
    /// Events matching the filter in all.
    pub total: usize,
    pub events: Vec<Value>,
}

/// Which page of the timeline to show.
#[derive(Debug, Clone, Copy)]
pub struct TimelineQuery {
    pub kind: Option<MessageType>,
    pub offset: usize,
    pub limit: usize,
}

impl Default for TimelineQuery {
    fn default() -> Self {
        Self {
            kind: None,
            offset: 0,
            limit: 50,
        }
    }
}

/// Builds the view of the profile named by `id` (ordinal, userId, anonymousId or e-mail).
pub fn profile_view(
    engine: &Engine,
    id: &str,
    query: TimelineQuery,
    now: i64,
) -> Result<ProfileView, EngineError> {
    let found = engine
        .lookup_profile(id)
        .ok_or_else(|| EngineError::NotFound(format!("profile {id:?}")))?;
    let profile = found.profile;
    let record = engine.profile_record(profile)?;
    let mut identifiers = Identifiers::default();
    for ident in &record.identifiers {
        let (kind, value) = ident.split_at(2);
        match kind {
            "u:" => identifiers.user_ids.push(value.to_string()),
            "a:" => identifiers.anonymous_ids.push(value.to_string()),
            _ => identifiers.emails.push(value.to_string()),
        }
    }
    let (first_seen, last_seen, event_count, flag_counts, total) = {
        let hot = engine.hot();
        let events = hot.events(profile);
        let mut flag_counts = BTreeMap::new();
        for (bit, name) in flags::ALL {
            flag_counts.insert(
                name,
                events.iter().filter(|e| e.anomalies() & bit != 0).count(),
            );
        }
        let total = match query.kind {
            Some(kind) => events
                .iter()
                .filter(|e| e.message_type() == kind.code())
                .count(),
            None => events.len(),
        };
        let seconds = |ts: u32| format_ms(i64::from(ts) * 1000);
        (
            events.first().map(|e| seconds(e.ts)),
            events.last().map(|e| seconds(e.ts)),
            events.len(),
            flag_counts,
            total,
        )
    };
    let events = engine.timeline(profile, query.kind, query.offset, query.limit)?;
    let computed = engine.computed_traits(profile, now)?;
    let consents = consents_view(engine.purposes(), profile, record.consents);
    Ok(ProfileView {
        computed,
        id: profile,
        requested_merged_profile: found.merged_from,
        identifiers,
        traits: record
            .traits
            .into_iter()
            .map(|(name, t)| {
                (
                    name,
                    TraitView {
                        value: t.value,
                        updated_at: format_ms(t.at),
                    },
                )
            })
            .collect(),
        created_at: format_ms(record.created_at),
        first_seen,
        last_seen,
        event_count,
        flags: flag_counts,
        merges: engine
            .merges_into(profile)?
            .into_iter()
            .map(merge_view)
            .collect(),
        consents,
        timeline: Timeline {
            offset: query.offset,
            limit: query.limit,
            total,
            events: events.into_iter().map(event_json).collect(),
        },
    })
}

pub fn merge_view(merge: MergeRecord) -> MergeView {
    MergeView {
        id: merge.id,
        from: merge.from,
        into: merge.into,
        cause: merge.cause,
        at: format_ms(merge.at),
        identifiers: merge.identifiers,
        unmerged_at: merge.unmerged_at.map(format_ms),
    }
}

/// A stored event as the API shows it: Segment's field names, times as RFC 3339, flag names.
pub fn event_json(event: StoredEvent) -> Value {
    let flags = flags::names(event.message.flags);
    let mut value = serde_json::to_value(&event.message).expect("messages serialize");
    let object = value.as_object_mut().expect("messages are objects");
    object.insert(
        "timestamp".into(),
        Value::String(format_ms(event.message.timestamp)),
    );
    object.insert(
        "receivedAt".into(),
        Value::String(format_ms(event.message.received_at)),
    );
    object.insert("profile".into(), Value::from(event.profile));
    object.insert("seq".into(), Value::from(event.seq));
    if !flags.is_empty() {
        object.insert("flags".into(), Value::from(flags));
    }
    value
}

/// A profile's primary id (first userId, else first anonymousId) and first e-mail, for member
/// lists.
pub fn contact(engine: &Engine, profile: u32) -> (String, String) {
    let Ok(record) = engine.profile_record(profile) else {
        return (String::new(), String::new());
    };
    let find = |prefix: &str| {
        record
            .identifiers
            .iter()
            .find_map(|i| i.strip_prefix(prefix))
            .map(str::to_string)
    };
    (
        find("u:").or_else(|| find("a:")).unwrap_or_default(),
        find("e:").unwrap_or_default(),
    )
}

/// A segment member as listed by the CLI and the API.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub profile: u32,
    pub primary_id: String,
    pub email: String,
    /// When the profile last entered the segment.
    pub entered_at: Option<String>,
}

/// One member's row.
pub fn member(engine: &Engine, name: &str, profile: u32) -> Result<Member, EngineError> {
    let (primary_id, email) = contact(engine, profile);
    let entered_at = engine.entered_at(name, profile)?.map(format_ms);
    Ok(Member {
        profile,
        primary_id,
        email,
        entered_at,
    })
}

/// A page of a segment's members, in profile order, with when each entered.
pub fn members_page(
    engine: &Engine,
    name: &str,
    offset: usize,
    limit: usize,
) -> Result<(u64, Vec<Member>), EngineError> {
    engine.segment(name)?;
    let members = engine.members(name)?;
    let page = members
        .iter()
        .skip(offset)
        .take(limit)
        .map(|profile| member(engine, name, profile))
        .collect::<Result<_, _>>()?;
    Ok((members.len(), page))
}

/// The size of a segment after each computation: (time, size, entered, exited).
#[derive(Debug, Clone, Serialize)]
pub struct SizePoint {
    pub at: String,
    pub size: u64,
    pub entered: u64,
    pub exited: u64,
}

pub fn size_history(engine: &Engine, name: &str) -> Result<Vec<SizePoint>, EngineError> {
    engine.segment(name)?;
    let mut points: Vec<(i64, SizePoint)> = Vec::new();
    for change in engine.segment_changes(name)? {
        match points.last_mut() {
            Some((at, point)) if *at == change.at => {
                point.size = change.size;
                if change.entered {
                    point.entered += 1
                } else {
                    point.exited += 1
                }
            }
            _ => points.push((
                change.at,
                SizePoint {
                    at: format_ms(change.at),
                    size: change.size,
                    entered: u64::from(change.entered),
                    exited: u64::from(!change.entered),
                },
            )),
        }
    }
    Ok(points.into_iter().map(|(_, p)| p).collect())
}

/// Whether a raw message (a quarantined one, kept whole) names one of these identifier values
/// (user ids, anonymous ids, e-mails without their `u:`/`a:`/`e:` prefix): as a JSON string
/// anywhere in it, or, for text that is not JSON, anywhere at all.
pub fn names_any(raw: &str, values: &[&str]) -> bool {
    fn walk(value: &Value, values: &[&str]) -> bool {
        match value {
            Value::String(text) => values
                .iter()
                .any(|v| text == v || text.eq_ignore_ascii_case(v) && v.contains('@')),
            Value::Array(items) => items.iter().any(|i| walk(i, values)),
            Value::Object(map) => map.values().any(|v| walk(v, values)),
            _ => false,
        }
    }
    match serde_json::from_str::<Value>(raw) {
        Ok(value) => walk(&value, values),
        Err(_) => values.iter().any(|v| raw.contains(v)),
    }
}

/// Everything held on a person, for a right-of-access request: identifiers, traits and the
/// identify calls that set them, every event, computed traits and model outputs, segment
/// memberships and their history, consents, merges, quarantined messages that name them, and
/// the audit records about them.
pub fn access_export(engine: &Engine, id: &str, now: i64) -> Result<Value, EngineError> {
    let found = engine
        .lookup_profile(id)
        .ok_or_else(|| EngineError::NotFound(format!("profile {id:?}")))?;
    let profile = found.profile;
    let view = profile_view(
        engine,
        id,
        TimelineQuery {
            kind: None,
            offset: 0,
            limit: 0,
        },
        now,
    )?;
    let record = engine.profile_record(profile)?;
    let mut events: Vec<StoredEvent> = engine.timeline(profile, None, 0, usize::MAX)?;
    events.reverse();
    let trait_history: Vec<Value> = events
        .iter()
        .filter(|e| e.message.kind == MessageType::Identify && !e.message.traits.is_empty())
        .map(|e| {
            serde_json::json!({"at": format_ms(e.message.timestamp), "message_id": e.message.message_id,
                "traits": e.message.traits})
        })
        .collect();
    let mut current = Vec::new();
    for segment in engine.segments()? {
        if engine.members(&segment.name)?.contains(profile) {
            current.push(segment.name);
        }
    }
    // Every feed entry naming the profile (or a profile merged into it).
    let merged: Vec<u32> = view.merges.iter().map(|m| m.from).collect();
    let mut history = Vec::new();
    let mut after = 0;
    loop {
        let page = engine.changes_after(after, 10_000)?;
        let Some(last) = page.last() else { break };
        after = last.seq;
        history.extend(
            page.into_iter()
                .filter(|c| c.profile == profile || merged.contains(&c.profile)),
        );
    }
    let values: Vec<&str> = record
        .identifiers
        .iter()
        .map(|i| i.get(2..).unwrap_or_default())
        .collect();
    let quarantined: Vec<_> = engine
        .quarantined(None, usize::MAX)?
        .into_iter()
        .filter(|q| names_any(&q.raw, &values))
        .collect();
    let audit = engine.audit_records_of(&record.identifiers)?;
    Ok(serde_json::json!({
        "profile": profile,
        "exported_at": format_ms(now),
        "identifiers": view.identifiers,
        "created_at": view.created_at,
        "traits": view.traits,
        "trait_history": trait_history,
        "events": events.into_iter().map(event_json).collect::<Vec<_>>(),
        "computed": view.computed,
        "memberships": {"current": current, "history": history},
        "consents": view.consents,
        "merges": view.merges,
        "quarantined": quarantined,
        "audit": audit,
    }))
}
