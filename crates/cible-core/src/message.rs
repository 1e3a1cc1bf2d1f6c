//! Segment messages: validation of raw JSON into a normalized [`Message`], or a [`Rejection`]
//! that names the field and the reason, and keeps the raw text so nothing is lost.
//!
//! This is the single gate between the outside world and the store: the HTTP API, bulk import
//! and quarantine replay all call [`parse_message`], so they accept and reject exactly alike.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::normalize::{canonicalize_url, normalize_email};
use crate::quality::Reason;
use crate::time::{json_kind, parse_timestamp};

/// Segment's limit on one message, in bytes of JSON.
pub const MAX_MESSAGE_BYTES: usize = 32 * 1024;
/// Segment's limit on one batch request, in bytes of JSON.
pub const MAX_BATCH_BYTES: usize = 500 * 1024;
/// Longest accepted event name or identifier, in bytes.
const MAX_NAME_BYTES: usize = 512;

/// The six Segment message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    Track,
    Identify,
    Page,
    Screen,
    Alias,
    Group,
}

impl MessageType {
    /// Parses Segment's type names (case-insensitive).
    pub fn parse(text: &str) -> Option<Self> {
        Some(match text.to_ascii_lowercase().as_str() {
            "track" => Self::Track,
            "identify" => Self::Identify,
            "page" => Self::Page,
            "screen" => Self::Screen,
            "alias" => Self::Alias,
            "group" => Self::Group,
            _ => return None,
        })
    }

    /// The stable one-byte code used in the durable store.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Inverse of [`MessageType::code`].
    pub fn from_code(code: u8) -> Option<Self> {
        [
            Self::Track,
            Self::Identify,
            Self::Page,
            Self::Screen,
            Self::Alias,
            Self::Group,
        ]
        .get(usize::from(code))
        .copied()
    }

    /// Track, page and screen messages are behavioural events; the others carry identity.
    pub fn is_behavioral(self) -> bool {
        matches!(self, Self::Track | Self::Page | Self::Screen)
    }
}

/// A validated, normalized Segment message, as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Message {
    #[serde(rename = "type")]
    pub kind: MessageType,
    pub message_id: String,
    /// When it happened, epoch milliseconds UTC.
    pub timestamp: i64,
    /// When cible received it, epoch milliseconds UTC.
    pub received_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anonymous_id: Option<String>,
    /// The event name: the track name, or "Page Viewed" / "Screen Viewed".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_id: Option<String>,
    /// The normalized e-mail address found in the traits, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub properties: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub traits: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub context: Map<String, Value>,
    /// Anomaly flags, see [`crate::quality::flags`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub flags: u8,
}

fn is_zero(flags: &u8) -> bool {
    *flags == 0
}

/// Why a message was not accepted, with its raw text kept whole for replay.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rejection {
    pub reason: Reason,
    /// The offending field, in Segment's spelling (`userId`, `timestamp`, ...), if one is to blame.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// A sentence for humans.
    pub detail: String,
    /// The message exactly as received.
    pub raw: String,
}

/// What validation needs to know besides the message.
#[derive(Debug, Clone, Copy)]
pub struct ParseContext {
    /// Receive time, epoch milliseconds; also the default timestamp.
    pub received_at: i64,
    /// Messages dated more than this far after `received_at` are quarantined.
    pub max_future_ms: i64,
}

impl ParseContext {
    /// The default tolerance for clocks running ahead: one day.
    pub fn at(received_at: i64) -> Self {
        Self {
            received_at,
            max_future_ms: crate::time::DAY_MS,
        }
    }
}

fn reject(reason: Reason, field: Option<&str>, detail: String, raw: String) -> Rejection {
    Rejection {
        reason,
        field: field.map(str::to_string),
        detail,
        raw,
    }
}

/// Parses one line or body of JSON text into a message.
pub fn parse_message_text(text: &str, ctx: &ParseContext) -> Result<Message, Rejection> {
    match serde_json::from_str::<Value>(text) {
        Ok(value) => parse_message(value, Some(text), ctx),
        Err(error) => Err(reject(
            Reason::InvalidJson,
            None,
            format!(
                "invalid JSON at line {} column {}: {error}",
                error.line(),
                error.column()
            ),
            text.to_string(),
        )),
    }
}

/// Validates and normalizes one message. `raw_text`, when given, is what is kept on rejection
/// and what the 32 KB limit applies to; otherwise the value is re-serialized on rejection only,
/// and the caller is responsible for having bounded its size.
pub fn parse_message(
    mut value: Value,
    raw_text: Option<&str>,
    ctx: &ParseContext,
) -> Result<Message, Rejection> {
    if let Some(text) = raw_text
        && text.len() > MAX_MESSAGE_BYTES
    {
        let detail = format!(
            "message is {} bytes, the limit is {MAX_MESSAGE_BYTES}",
            text.len()
        );
        return Err(reject(
            Reason::MessageTooLarge,
            None,
            detail,
            text.to_string(),
        ));
    }
    let raw = |value: &Value| raw_text.map_or_else(|| value.to_string(), str::to_string);
    let Value::Object(object) = &mut value else {
        let detail = format!(
            "a message must be a JSON object, found {}",
            json_kind(&value)
        );
        return Err(reject(Reason::NotAnObject, None, detail, raw(&value)));
    };
    match build(object, ctx) {
        Ok(message) => Ok(message),
        Err((reason, field, detail)) => Err(reject(reason, Some(field), detail, raw(&value))),
    }
}

type Problem = (Reason, &'static str, String);

/// Checks everything first, reading the object; only once nothing can fail does it move the
/// maps out, so a rejected message is kept exactly as received.
fn build(object: &mut Map<String, Value>, ctx: &ParseContext) -> Result<Message, Problem> {
    let kind = match object.get("type") {
        Some(Value::String(text)) => MessageType::parse(text).ok_or_else(|| {
            let detail = format!(
                "unknown message type {text:?}; expected track, identify, page, screen, alias or group"
            );
            (Reason::UnknownType, "type", detail)
        })?,
        Some(other) => {
            let detail = format!("type must be a string, found {}", json_kind(other));
            return Err((Reason::UnknownType, "type", detail));
        }
        None => return Err((Reason::UnknownType, "type", "the type field is missing".into())),
    };
    let user_id = identifier(object, "userId")?;
    let anonymous_id = identifier(object, "anonymousId")?;
    if user_id.is_none() && anonymous_id.is_none() {
        let detail = "a message needs a userId or an anonymousId".to_string();
        return Err((Reason::MissingIdentity, "userId", detail));
    }
    for field in ["properties", "traits", "context"] {
        check_object_field(object, field)?;
    }
    let timestamp = timestamp(object, ctx)?;

    let mut event = None;
    let mut previous_id = None;
    let mut group_id = None;
    let mut page_fields = Vec::new();
    match kind {
        MessageType::Track => {
            let name = name_field(object, "event")?.ok_or((
                Reason::MissingEvent,
                "event",
                "a track call needs an event name".into(),
            ))?;
            event = Some(name);
        }
        MessageType::Page | MessageType::Screen => {
            let name = if kind == MessageType::Page {
                "Page Viewed"
            } else {
                "Screen Viewed"
            };
            event = Some(name.into());
            for field in ["name", "category"] {
                if let Some(text) = name_field(object, field)? {
                    page_fields.push((field, text));
                }
            }
        }
        MessageType::Alias => {
            previous_id = identifier(object, "previousId")?;
            if previous_id.is_none() {
                let detail = "an alias call needs a previousId".to_string();
                return Err((Reason::MissingPreviousId, "previousId", detail));
            }
            if user_id.is_none() {
                let detail = "an alias call needs the new userId".to_string();
                return Err((Reason::MissingIdentity, "userId", detail));
            }
        }
        MessageType::Group => {
            group_id = identifier(object, "groupId")?;
            if group_id.is_none() {
                let detail = "a group call needs a groupId".to_string();
                return Err((Reason::MissingGroupId, "groupId", detail));
            }
        }
        MessageType::Identify => {}
    }
    let message_id = match identifier(object, "messageId")? {
        Some(id) => id,
        None => content_id(object, timestamp),
    };

    // Nothing can fail from here on: take the maps and normalize them.
    let mut properties = take_object(object, "properties");
    let mut traits = take_object(object, "traits");
    let mut context = take_object(object, "context");
    for (field, text) in page_fields {
        properties.entry(field).or_insert(Value::String(text));
    }
    if kind == MessageType::Page {
        normalize_page(&mut properties, &mut context);
    }
    if let Some(Value::String(url)) = properties.get("url")
        && kind == MessageType::Track
        && let Some(canonical) = canonicalize_url(url)
    {
        properties.insert("url".into(), Value::String(canonical.url));
    }

    // The person's e-mail: identify traits first, then the context traits any call may carry.
    let mut email = None;
    if kind == MessageType::Identify {
        email = take_email(&mut traits);
    }
    if let Some(Value::Object(context_traits)) = context.get_mut("traits")
        && email.is_none()
    {
        email = take_email(context_traits);
    }

    Ok(Message {
        kind,
        message_id,
        timestamp,
        received_at: ctx.received_at,
        user_id,
        anonymous_id,
        event,
        previous_id,
        group_id,
        email,
        properties,
        traits,
        context,
        flags: 0,
    })
}

/// Normalizes an e-mail trait in place and returns it.
fn take_email(traits: &mut Map<String, Value>) -> Option<String> {
    let Some(Value::String(raw)) = traits.get("email") else {
        return None;
    };
    let email = normalize_email(raw)?;
    traits.insert("email".into(), Value::String(email.clone()));
    Some(email)
}

/// Page calls: url from the context when the properties lack it, canonical url and path, UTM
/// parameters moved to `context.campaign` (Segment's place for them).
fn normalize_page(properties: &mut Map<String, Value>, context: &mut Map<String, Value>) {
    if !properties.contains_key("url") {
        let from_context = context
            .get("page")
            .and_then(|page| page.get("url"))
            .cloned();
        if let Some(url) = from_context {
            properties.insert("url".into(), url);
        }
    }
    let Some(Value::String(url)) = properties.get("url") else {
        return;
    };
    let Some(canonical) = canonicalize_url(url) else {
        return;
    };
    properties.insert("url".into(), Value::String(canonical.url));
    properties.insert("path".into(), Value::String(canonical.path));
    properties.insert("host".into(), Value::String(canonical.host));
    if !canonical.campaign.is_empty() {
        let campaign = context
            .entry("campaign")
            .or_insert_with(|| Value::Object(Map::new()));
        if let Value::Object(campaign) = campaign {
            for (key, value) in canonical.campaign {
                campaign.entry(key).or_insert(value);
            }
        }
    }
}

fn timestamp(object: &Map<String, Value>, ctx: &ParseContext) -> Result<i64, Problem> {
    let (field, value) = match (object.get("timestamp"), object.get("originalTimestamp")) {
        (Some(value), _) if !value.is_null() => ("timestamp", value),
        (_, Some(value)) if !value.is_null() => ("originalTimestamp", value),
        _ => return Ok(ctx.received_at),
    };
    let ms = parse_timestamp(value).map_err(|e| (Reason::InvalidTimestamp, field, e))?;
    if ms > ctx.received_at + ctx.max_future_ms {
        let detail = format!(
            "{field} {} is more than {} hours after the time it was received ({})",
            crate::time::format_ms(ms),
            ctx.max_future_ms / 3_600_000,
            crate::time::format_ms(ctx.received_at),
        );
        return Err((Reason::FutureTimestamp, field, detail));
    }
    if ms < 0 {
        return Err((
            Reason::InvalidTimestamp,
            field,
            format!("{field} is before 1970"),
        ));
    }
    Ok(ms)
}

/// An identifier field: a non-empty string, or a number written as a string; null means absent.
fn identifier(object: &Map<String, Value>, field: &'static str) -> Result<Option<String>, Problem> {
    let text = match object.get(field) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(text)) => text.trim().to_string(),
        Some(Value::Number(number)) => number.to_string(),
        Some(other) => {
            let detail = format!("{field} must be a string, found {}", json_kind(other));
            return Err((Reason::InvalidField, field, detail));
        }
    };
    if text.len() > MAX_NAME_BYTES {
        let detail = format!(
            "{field} is {} bytes long, the limit is {MAX_NAME_BYTES}",
            text.len()
        );
        return Err((Reason::InvalidField, field, detail));
    }
    Ok((!text.is_empty()).then_some(text))
}

fn name_field(object: &Map<String, Value>, field: &'static str) -> Result<Option<String>, Problem> {
    match object.get(field) {
        Some(Value::Number(_)) => {
            let detail = format!("{field} must be a string, found a number");
            Err((Reason::InvalidField, field, detail))
        }
        _ => identifier(object, field),
    }
}

fn check_object_field(object: &Map<String, Value>, field: &'static str) -> Result<(), Problem> {
    match object.get(field) {
        None | Some(Value::Null | Value::Object(_)) => Ok(()),
        Some(other) => {
            let detail = format!("{field} must be an object, found {}", json_kind(other));
            Err((Reason::InvalidField, field, detail))
        }
    }
}

/// Moves an object field out (after [`check_object_field`] passed).
fn take_object(object: &mut Map<String, Value>, field: &str) -> Map<String, Value> {
    match object.remove(field) {
        Some(Value::Object(map)) => map,
        _ => Map::new(),
    }
}

/// A message id derived from the content, for sources that send none: the same message imported
/// twice gets the same id. `sentAt` is left out because resends change it. A message without a
/// time is dated by its arrival (`at`), and so is the id: the same undated call sent twice (an
/// e-mail opened twice) is two events, not a duplicate.
fn content_id(object: &Map<String, Value>, at: i64) -> String {
    let mut canonical = object.clone();
    canonical.remove("sentAt");
    let dated = ["timestamp", "originalTimestamp"]
        .iter()
        .any(|field| object.get(*field).is_some_and(|v| !v.is_null()));
    if !dated {
        canonical.insert("timestamp".into(), Value::from(at));
    }
    let digest = Sha256::digest(Value::Object(canonical).to_string().as_bytes());
    format!("content-{}", hex::encode(&digest[..16]))
}

impl Message {
    /// The event name as the segment language sees it; `None` for identify, alias and group.
    pub fn behavioral_name(&self) -> Option<&str> {
        if self.kind.is_behavioral() {
            self.event.as_deref()
        } else {
            None
        }
    }

    /// The property the hot store keeps a dictionary id of (the thing the event is about): the
    /// first of [`KEY_PROPERTIES`] present (not null), as its index and its text (`None` when
    /// the value is not text: evaluation then reads the full message).
    pub fn key_property(&self) -> Option<(u8, Option<&str>)> {
        self.key_properties().next()
    }

    /// Every one of [`KEY_PROPERTIES`] present (not null), in that order: the first is
    /// [`Message::key_property`], the others feed property columns.
    pub fn key_properties(&self) -> impl Iterator<Item = (u8, Option<&str>)> {
        KEY_PROPERTIES
            .iter()
            .enumerate()
            .filter_map(|(index, name)| match self.properties.get(*name) {
                None | Some(Value::Null) => None,
                Some(value) => Some((index as u8, value.as_str())),
            })
    }

    /// The number the hot store keeps: the first of [`VALUE_PROPERTIES`] present (not null), as
    /// its index and its number (`None` when it does not read as one).
    pub fn numeric_value(&self) -> Option<(u8, Option<f64>)> {
        VALUE_PROPERTIES
            .iter()
            .enumerate()
            .find_map(|(index, name)| match self.properties.get(*name) {
                None | Some(Value::Null) => None,
                Some(value) => Some((index as u8, number_of(value))),
            })
    }

    /// Time on page in seconds, when the event carries it.
    pub fn duration_s(&self) -> Option<f64> {
        self.properties.get("duration_s").and_then(number_of)
    }
}

/// In order of preference, the properties whose value the hot store keeps as a dictionary id.
pub const KEY_PROPERTIES: [&str; 6] = [
    "product_id",
    "path",
    "campaign_id",
    "email_id",
    "category",
    "name",
];
/// The key properties of bounded cardinality (pages, campaigns, categories, names) that a hot
/// row also records when another key hides them, so that property columns can be built
/// (`category` behind `product_id`). `email_id`, unique per send, is left out: filters on it,
/// when it is hidden, read full messages.
pub const COLUMN_PROPERTIES: [&str; 4] = ["path", "campaign_id", "category", "name"];

/// Whether key property `index` (in [`KEY_PROPERTIES`]) is one of [`COLUMN_PROPERTIES`].
pub fn is_column_property(index: usize) -> bool {
    KEY_PROPERTIES
        .get(index)
        .is_some_and(|name| COLUMN_PROPERTIES.contains(name))
}

/// In order of preference, the properties whose number the hot store keeps.
pub const VALUE_PROPERTIES: [&str; 5] = ["revenue", "total", "value", "price", "duration_s"];

/// A property as a number: JSON numbers, and text that reads as one.
pub fn number_of(value: &Value) -> Option<f64> {
    match value {
        Value::Number(number) => number.as_f64(),
        Value::String(text) => text.trim().parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_ids_repeat_for_the_same_dated_message_and_not_for_an_undated_one_sent_again() {
        let id = |message: Value, at: i64| {
            parse_message(message, None, &ParseContext::at(at))
                .unwrap()
                .message_id
        };
        let undated = json!({"type": "track", "userId": "u1", "event": "Email Opened"});
        assert_ne!(
            id(undated.clone(), 1_790_000_000_000),
            id(undated.clone(), 1_790_000_005_000),
            "opened twice, seconds apart: two events"
        );
        assert_eq!(
            id(undated.clone(), 1_790_000_000_000),
            id(undated, 1_790_000_000_000)
        );
        let dated = json!({"type": "track", "userId": "u1", "event": "Email Opened",
            "timestamp": "2026-09-21T10:00:00Z", "sentAt": "2026-09-21T10:00:01Z"});
        let mut resent = dated.clone();
        resent["sentAt"] = json!("2026-09-21T10:05:00Z");
        assert_eq!(
            id(dated, 1_790_000_000_000),
            id(resent, 1_790_000_900_000),
            "the same dated message, resent or imported again, is one event"
        );
    }
    use serde_json::json;

    const NOW: i64 = 1_777_636_800_000; // 2026-05-01T12:00:00Z

    fn parse(value: Value) -> Result<Message, Rejection> {
        parse_message(value, None, &ParseContext::at(NOW))
    }

    fn rejected(value: Value) -> (Reason, Option<String>) {
        let rejection = parse(value).expect_err("should be rejected");
        (rejection.reason, rejection.field)
    }

    #[test]
    fn track_is_accepted_and_keeps_everything() {
        let message = parse(json!({
            "type": "track", "event": "Order Completed", "userId": 42, "messageId": "m1",
            "timestamp": "2026-05-01T10:00:00+02:00", "properties": {"revenue": "19.5"}
        }))
        .unwrap();
        assert_eq!(message.user_id.as_deref(), Some("42"));
        assert_eq!(message.timestamp, NOW - 4 * 3_600_000);
        assert_eq!(message.numeric_value(), Some((0, Some(19.5))));
    }

    #[test]
    fn page_becomes_page_viewed_with_canonical_url_and_campaign() {
        let message = parse(json!({
            "type": "page", "anonymousId": "a1", "name": "Pricing",
            "properties": {"url": "https://Shop.io/pricing?utm_source=nl&x=1"}
        }))
        .unwrap();
        assert_eq!(message.event.as_deref(), Some("Page Viewed"));
        assert_eq!(message.properties["url"], "https://shop.io/pricing?x=1");
        assert_eq!(message.properties["path"], "/pricing");
        assert_eq!(message.properties["name"], "Pricing");
        assert_eq!(message.context["campaign"]["source"], "nl");
        assert_eq!(message.timestamp, NOW, "no timestamp means received time");
    }

    #[test]
    fn identify_normalizes_the_email() {
        let message = parse(json!({
            "type": "identify", "userId": "u1", "traits": {"email": " Bob@Example.com"}
        }))
        .unwrap();
        assert_eq!(message.email.as_deref(), Some("bob@example.com"));
        assert_eq!(message.traits["email"], "bob@example.com");
    }

    #[test]
    fn bad_messages_name_the_field_and_reason() {
        let cases = [
            (
                json!({"event": "x", "userId": "u"}),
                Reason::UnknownType,
                "type",
            ),
            (
                json!({"type": "hover", "userId": "u"}),
                Reason::UnknownType,
                "type",
            ),
            (
                json!({"type": "track", "event": "x"}),
                Reason::MissingIdentity,
                "userId",
            ),
            (
                json!({"type": "track", "userId": "u"}),
                Reason::MissingEvent,
                "event",
            ),
            (
                json!({"type": "track", "userId": "u", "event": "x", "timestamp": "soon"}),
                Reason::InvalidTimestamp,
                "timestamp",
            ),
            (
                json!({"type": "track", "userId": "u", "event": "x", "timestamp": "2027-01-01T00:00:00Z"}),
                Reason::FutureTimestamp,
                "timestamp",
            ),
            (
                json!({"type": "track", "userId": "u", "event": "x", "properties": [1]}),
                Reason::InvalidField,
                "properties",
            ),
            (
                json!({"type": "track", "userId": {"a": 1}, "event": "x"}),
                Reason::InvalidField,
                "userId",
            ),
            (
                json!({"type": "alias", "userId": "u"}),
                Reason::MissingPreviousId,
                "previousId",
            ),
            (
                json!({"type": "group", "userId": "u"}),
                Reason::MissingGroupId,
                "groupId",
            ),
        ];
        for (input, reason, field) in cases {
            assert_eq!(
                rejected(input.clone()),
                (reason, Some(field.to_string())),
                "{input}"
            );
        }
    }

    #[test]
    fn oversized_and_non_object_messages_are_rejected_whole() {
        let big = "x".repeat(MAX_MESSAGE_BYTES);
        let text = json!({"type": "track", "userId": "u", "event": big}).to_string();
        let rejection = parse_message_text(&text, &ParseContext::at(NOW)).unwrap_err();
        assert_eq!(rejection.reason, Reason::MessageTooLarge);
        assert!(
            rejection.raw.len() > MAX_MESSAGE_BYTES,
            "the raw message is kept whole"
        );
        assert_eq!(rejected(json!([1, 2])).0, Reason::NotAnObject);
        let invalid = parse_message_text("{\"type\": ", &ParseContext::at(NOW)).unwrap_err();
        assert_eq!(invalid.reason, Reason::InvalidJson);
        assert!(invalid.detail.contains("line 1"), "{}", invalid.detail);
    }

    #[test]
    fn missing_message_id_is_derived_from_content_ignoring_sent_at() {
        let a =
            parse(json!({"type": "track", "userId": "u", "event": "x", "sentAt": "2026-01-01"}))
                .unwrap();
        let b =
            parse(json!({"type": "track", "userId": "u", "event": "x", "sentAt": "2026-02-01"}))
                .unwrap();
        assert_eq!(a.message_id, b.message_id);
        assert!(a.message_id.starts_with("content-"));
    }
}
