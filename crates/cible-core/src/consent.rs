//! Consent per purpose: what a person agreed to, from which source, when, with what proof.
//!
//! Every consent change arrives in a message, whatever its source, so that it goes through the
//! one writer, is durable when acknowledged, and follows the person through merges, unmerges
//! and erasure like their events:
//! - `context.consent.categoryPreferences` (Segment's consent convention, what its consent
//!   tools send on every event), categories mapped to purposes by `consent.toml`;
//! - `context.consent.purposes`, cible's own form (what `PUT /api/profiles/{id}/consents`
//!   writes, with `context.consent.basis`);
//! - identify traits mapped to purposes (`consent_email: true`);
//! - a track event `Unsubscribed` withdraws `email`.
//!
//! A profile record keeps the whole history ([`Consents`]); the `consents` keyspace keeps the
//! current state of each purpose by profile (`store::consent_key`), and [`ConsentIndex`] the
//! same in memory, for rules (`consent.email`) and for the checks every processing asks for
//! ([`ConsentIndex::permits`]).

use std::collections::BTreeMap;

use roaring::RoaringBitmap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::message::{Message, MessageType};

/// The file name, in the data directory.
pub const FILE_NAME: &str = "consent.toml";

/// The purposes every store knows, with the rule each follows by default.
pub const BUILTIN: [(&str, Rule); 5] = [
    ("email", Rule::OptIn),
    ("analytics", Rule::OptOut),
    ("personalization", Rule::OptOut),
    ("profiling", Rule::OptOut),
    ("advertising", Rule::OptIn),
];

/// The event that withdraws `email`.
pub const UNSUBSCRIBED: &str = "Unsubscribed";

/// When a purpose may process a person's data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Only after a consent was granted and not withdrawn since (marketing e-mail, advertising).
    OptIn,
    /// Unless the person objected (a withdrawal not granted again since): legitimate interest.
    OptOut,
}

/// The legal ground of a processing (GDPR article 6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    Consent,
    Contract,
    LegalObligation,
    VitalInterests,
    PublicTask,
    LegitimateInterests,
}

impl Basis {
    pub const ALL: [&str; 6] = [
        "consent",
        "contract",
        "legal_obligation",
        "vital_interests",
        "public_task",
        "legitimate_interests",
    ];

    pub fn parse(text: &str) -> Option<Self> {
        serde_json::from_value(Value::String(text.to_string())).ok()
    }
}

/// Where a consent change came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// `PUT /api/profiles/{id}/consents` or `cible profile consent`.
    Api,
    /// An identify trait mapped to the purpose.
    IdentifyTrait,
    /// A message of a `cible import`.
    Import,
    /// `context.consent` of a message sent to `/v1/*` (a browser consent tool).
    ConsentTool,
    /// An `Unsubscribed` event (the unsubscribe link).
    Unsubscribe,
}

/// One change of one purpose, with its proof.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConsentChange {
    pub purpose: String,
    pub granted: bool,
    pub basis: Basis,
    pub source: Source,
    /// When the person gave or withdrew it (the message's timestamp), ms.
    pub at: i64,
    /// The message that carried it: the proof, and what follows the person through merges.
    pub message_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// The history of a person's consents, oldest first; the current state of a purpose is its
/// latest change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Consents(pub Vec<ConsentChange>);

impl Consents {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The latest change of `purpose`.
    pub fn current(&self, purpose: &str) -> Option<&ConsentChange> {
        self.0.iter().rev().find(|c| c.purpose == purpose)
    }

    /// Every purpose with its latest change.
    pub fn states(&self) -> BTreeMap<&str, &ConsentChange> {
        let mut states = BTreeMap::new();
        for change in &self.0 {
            states.insert(change.purpose.as_str(), change);
        }
        states
    }

    /// Adds a change in time order; returns whether it changed the current state of its
    /// purpose. A change that repeats the state in force at its time is not kept (consent tools
    /// send the same preferences with every event), nor one already kept (a message redone).
    pub fn apply(&mut self, change: ConsentChange) -> bool {
        let before = self.current(&change.purpose).map(|c| c.granted);
        let position = self.0.partition_point(|c| c.at <= change.at);
        let in_force = self.0[..position]
            .iter()
            .rev()
            .find(|c| c.purpose == change.purpose);
        if in_force
            .is_some_and(|c| c.granted == change.granted || c.message_id == change.message_id)
        {
            return false;
        }
        self.0.insert(position, change);
        let after = self.current(&self.0[position].purpose).map(|c| c.granted);
        before != after
    }

    /// Adds another profile's history (a merge). Returns whether any current state changed.
    pub fn absorb(&mut self, other: Consents) -> bool {
        let mut changed = false;
        for change in other.0 {
            changed |= self.apply(change);
        }
        changed
    }

    /// Splits the history by message: the changes whose message `goes` says leaves (an unmerge
    /// moving those events back) are returned, the others stay.
    pub fn split_off(&mut self, goes: impl Fn(&str) -> bool) -> Consents {
        let (gone, kept) = std::mem::take(&mut self.0)
            .into_iter()
            .partition(|c| goes(&c.message_id));
        self.0 = kept;
        Consents(gone)
    }
}

/// `consent.toml`: purposes beyond the built-in ones, the rule of each, and how consent
/// categories and identify traits map to purposes. Every field is optional.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsentConfig {
    /// Purpose -> rule, for new purposes or to change a built-in one's.
    pub purposes: BTreeMap<String, Rule>,
    /// Consent category (as `categoryPreferences` names it) -> purpose. Without an entry a
    /// category whose name is a purpose's, case aside, is that purpose; others are ignored.
    pub categories: BTreeMap<String, String>,
    /// Identify trait -> purpose. Without an entry, `consent_<purpose>` is that purpose.
    pub traits: BTreeMap<String, String>,
}

/// The configuration, checked: every purpose with its rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Purposes {
    rules: BTreeMap<String, Rule>,
    categories: BTreeMap<String, String>,
    traits: BTreeMap<String, String>,
}

impl Default for Purposes {
    fn default() -> Self {
        Self::new(ConsentConfig::default()).expect("the defaults are valid")
    }
}

/// A purpose name as rules write it: `consent.<name>`.
fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && name.len() <= 64
}

impl Purposes {
    /// Checks a configuration: purpose names, and mappings to known purposes.
    pub fn new(config: ConsentConfig) -> Result<Self, String> {
        let mut rules: BTreeMap<String, Rule> = BUILTIN
            .iter()
            .map(|(name, rule)| (name.to_string(), *rule))
            .collect();
        for (name, rule) in config.purposes {
            if !valid_name(&name) {
                return Err(format!(
                    "purposes.{name}: a purpose is lower-case letters, digits and _, starting with a letter (64 at most)"
                ));
            }
            rules.insert(name, rule);
        }
        if rules.len() > 64 {
            return Err(format!("purposes: {} purposes, 64 at most", rules.len()));
        }
        for (table, map) in [
            ("categories", &config.categories),
            ("traits", &config.traits),
        ] {
            for (from, purpose) in map {
                if !rules.contains_key(purpose) {
                    return Err(format!(
                        "{table}.{from}: {purpose:?} is not a purpose (known: {})",
                        rules.keys().cloned().collect::<Vec<_>>().join(", ")
                    ));
                }
            }
        }
        Ok(Self {
            rules,
            categories: config.categories,
            traits: config.traits,
        })
    }

    /// Reads `consent.toml` text.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: ConsentConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        Self::new(config)
    }

    /// Every purpose, by name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.keys().map(String::as_str)
    }

    /// The purpose's bit in [`Bits`] (its rank by name).
    pub fn index(&self, purpose: &str) -> Option<u32> {
        self.rules
            .keys()
            .position(|name| name == purpose)
            .map(|i| i as u32)
    }

    /// The compact current state of a history.
    pub fn bits(&self, consents: &Consents) -> Bits {
        let mut bits = Bits::default();
        for (purpose, change) in consents.states() {
            bits.at = bits.at.max(change.at);
            if let Some(index) = self.index(purpose) {
                bits.set(index, change.granted);
            }
        }
        bits
    }

    pub fn rule(&self, purpose: &str) -> Option<Rule> {
        self.rules.get(purpose).copied()
    }

    /// The purpose, or an error naming the known ones.
    pub fn check(&self, purpose: &str) -> Result<Rule, String> {
        self.rule(purpose).ok_or_else(|| {
            format!(
                "{purpose:?} is not a purpose (known: {})",
                self.names().collect::<Vec<_>>().join(", ")
            )
        })
    }

    fn category(&self, category: &str) -> Option<&str> {
        if let Some(purpose) = self.categories.get(category) {
            return Some(purpose);
        }
        let lower = category.to_ascii_lowercase();
        self.rules
            .get_key_value(&lower)
            .map(|(name, _)| name.as_str())
    }

    fn trait_purpose(&self, name: &str) -> Option<&str> {
        if let Some(purpose) = self.traits.get(name) {
            return Some(purpose);
        }
        let purpose = name.strip_prefix("consent_")?;
        self.rules
            .get_key_value(purpose)
            .map(|(name, _)| name.as_str())
    }

    /// The consent changes a message carries, `channel` being how it arrived (`http`,
    /// `import`, `api`...).
    pub fn changes_of(&self, message: &Message, channel: &str) -> Vec<ConsentChange> {
        let text = |field: &str| message.context.get(field).and_then(Value::as_str);
        self.changes(
            &ConsentInput {
                kind: message.kind,
                event: message.event.as_deref(),
                traits: &message.traits,
                consent: message.context.get("consent").and_then(Value::as_object),
                ip: text("ip"),
                user_agent: text("userAgent"),
                at: message.timestamp,
                message_id: &message.message_id,
            },
            channel,
        )
    }

    /// [`Purposes::changes_of`] on the parts of a message that consent reads.
    pub fn changes(&self, input: &ConsentInput<'_>, channel: &str) -> Vec<ConsentChange> {
        let basis = input
            .consent
            .and_then(|c| c.get("basis"))
            .and_then(Value::as_str)
            .and_then(Basis::parse)
            .unwrap_or(Basis::Consent);
        let make = |purpose: &str, granted: bool, source: Source| {
            let source = match channel {
                "api" => Source::Api,
                "import" => Source::Import,
                _ => source,
            };
            ConsentChange {
                purpose: purpose.to_string(),
                granted,
                basis,
                source,
                at: input.at,
                message_id: input.message_id.to_string(),
                ip: input.ip.map(str::to_string),
                user_agent: input.user_agent.map(str::to_string),
            }
        };
        let mut changes: BTreeMap<String, ConsentChange> = BTreeMap::new();
        if let Some(consent) = input.consent {
            if let Some(Value::Object(preferences)) = consent.get("categoryPreferences") {
                for (category, granted) in preferences {
                    if let (Some(purpose), Some(granted)) = (self.category(category), flag(granted))
                    {
                        changes.insert(
                            purpose.to_string(),
                            make(purpose, granted, Source::ConsentTool),
                        );
                    }
                }
            }
            if let Some(Value::Object(purposes)) = consent.get("purposes") {
                for (purpose, granted) in purposes {
                    if let (Some(_), Some(granted)) = (self.rule(purpose), flag(granted)) {
                        changes.insert(purpose.clone(), make(purpose, granted, Source::Api));
                    }
                }
            }
        }
        if input.kind == MessageType::Identify {
            for (name, value) in input.traits {
                if let (Some(purpose), Some(granted)) = (self.trait_purpose(name), flag(value)) {
                    changes.insert(
                        purpose.to_string(),
                        make(purpose, granted, Source::IdentifyTrait),
                    );
                }
            }
        }
        if input.kind == MessageType::Track && input.event == Some(UNSUBSCRIBED) {
            changes.insert("email".into(), make("email", false, Source::Unsubscribe));
        }
        changes.into_values().collect()
    }
}

/// A profile's current consents in 24 bytes, kept by the writer for every profile: which
/// purposes (by [`Purposes::index`]) have a state, which are granted, and the time of the
/// latest change. A change that repeats the current state and is not older than `at` changes
/// nothing, which the writer decides without reading the profile record (consent tools send
/// the same preferences with every event).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Bits {
    pub known: u64,
    pub granted: u64,
    pub at: i64,
}

impl Bits {
    pub fn set(&mut self, index: u32, granted: bool) {
        self.known |= 1 << index;
        if granted {
            self.granted |= 1 << index;
        } else {
            self.granted &= !(1 << index);
        }
    }

    /// Whether `change` would change nothing: the same state as now, and not older.
    pub fn repeats(&self, index: u32, change: &ConsentChange) -> bool {
        change.at >= self.at
            && self.known & (1 << index) != 0
            && (self.granted & (1 << index) != 0) == change.granted
    }
}

/// What consent reads of a message.
pub struct ConsentInput<'a> {
    pub kind: MessageType,
    pub event: Option<&'a str>,
    pub traits: &'a serde_json::Map<String, Value>,
    pub consent: Option<&'a serde_json::Map<String, Value>>,
    pub ip: Option<&'a str>,
    pub user_agent: Option<&'a str>,
    pub at: i64,
    pub message_id: &'a str,
}

/// Whether a message may carry consent (read on the parsing thread, so that the writer sees
/// only those messages' consent context).
pub fn may_carry(message: &Message) -> bool {
    message.context.contains_key("consent")
        || message.kind == MessageType::Identify
        || (message.kind == MessageType::Track && message.event.as_deref() == Some(UNSUBSCRIBED))
}

/// A consent value: a boolean, or the text `true` / `false` (forms and CSV imports).
fn flag(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(b) => Some(*b),
        Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "yes" | "1" => Some(true),
            "false" | "no" | "0" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// A profile's current consents as the store holds them: (purpose, granted, when), and the
/// profile they belong to.
pub type States = Vec<(String, bool, i64)>;
pub type Written = (u32, States);

/// The current state of every purpose, by profile ordinal: who granted, who withdrew.
#[derive(Debug, Clone, Default)]
pub struct ConsentIndex {
    /// Shared with the checks taken from it (`ConsentCheck`), copied only when changed.
    granted: BTreeMap<String, std::sync::Arc<RoaringBitmap>>,
    withdrawn: BTreeMap<String, std::sync::Arc<RoaringBitmap>>,
}

impl ConsentIndex {
    /// Sets what `profile` said of `purpose` (`None`: nothing, or the profile is gone).
    pub fn set(&mut self, profile: u32, purpose: &str, granted: Option<bool>) {
        for (map, on) in [
            (&mut self.granted, granted == Some(true)),
            (&mut self.withdrawn, granted == Some(false)),
        ] {
            if on {
                std::sync::Arc::make_mut(map.entry(purpose.to_string()).or_default())
                    .insert(profile);
            } else if let Some(bitmap) = map.get_mut(purpose)
                && bitmap.contains(profile)
            {
                std::sync::Arc::make_mut(bitmap).remove(profile);
            }
        }
    }

    /// Forgets every purpose of `profile`.
    pub fn clear(&mut self, profile: u32) {
        for bitmap in self.granted.values_mut().chain(self.withdrawn.values_mut()) {
            if bitmap.contains(profile) {
                std::sync::Arc::make_mut(bitmap).remove(profile);
            }
        }
    }

    /// Whether `profile` granted `purpose` and has not withdrawn it since.
    pub fn granted(&self, purpose: &str, profile: u32) -> bool {
        self.granted
            .get(purpose)
            .is_some_and(|b| b.contains(profile))
    }

    /// Whether `profile` withdrew `purpose` (an objection) and has not granted it since.
    pub fn withdrawn(&self, purpose: &str, profile: u32) -> bool {
        self.withdrawn
            .get(purpose)
            .is_some_and(|b| b.contains(profile))
    }

    /// Whether `purpose`, following `rule`, may process `profile`'s data.
    pub fn permits(&self, purpose: &str, rule: Rule, profile: u32) -> bool {
        match rule {
            Rule::OptIn => self.granted(purpose, profile),
            Rule::OptOut => !self.withdrawn(purpose, profile),
        }
    }

    /// One profile's consents as a pass reads them, for every rule of the pass: the purposes it
    /// granted are looked up once, on the first `consent.*` a rule reads, then each read is a
    /// bit test (a lookup per read cost a rebuild of 20 rules 17% more).
    pub fn of(&self, profile: u32) -> ProfileConsents<'_> {
        ProfileConsents {
            index: self,
            profile,
            mask: std::cell::Cell::new(None),
        }
    }

    /// The profiles that withdrew `purpose`.
    pub fn withdrawals(&self, purpose: &str) -> RoaringBitmap {
        self.withdrawn
            .get(purpose)
            .map(|bitmap| (**bitmap).clone())
            .unwrap_or_default()
    }
}

/// See [`ConsentIndex::of`].
pub struct ProfileConsents<'a> {
    index: &'a ConsentIndex,
    profile: u32,
    mask: std::cell::Cell<Option<u64>>,
}

impl ProfileConsents<'_> {
    /// Whether the profile granted `purpose` and has not withdrawn it since.
    pub fn granted(&self, purpose: &str) -> bool {
        let mask = match self.mask.get() {
            Some(mask) => mask,
            None => {
                let mut mask = 0u64;
                for (i, bitmap) in self.index.granted.values().enumerate().take(64) {
                    if bitmap.contains(self.profile) {
                        mask |= 1 << i;
                    }
                }
                self.mask.set(Some(mask));
                mask
            }
        };
        self.index
            .granted
            .keys()
            .take(64)
            .position(|name| name == purpose)
            .is_some_and(|bit| mask & (1 << bit) != 0)
    }
}

/// What a processing for one purpose may touch, decided once for a pass: the seam every way
/// out of the engine (exports today; webhooks, list sync, campaigns next) asks before it
/// carries a profile out. Made by `Engine::consent_check`, which takes the purpose.
#[derive(Debug, Clone)]
pub struct ConsentCheck {
    purpose: String,
    rule: Rule,
    /// The profiles `rule` lets through (opt-in) or stops (opt-out): the index's own bitmap,
    /// shared, so a check costs nothing to take.
    listed: std::sync::Arc<RoaringBitmap>,
}

impl ConsentCheck {
    pub(crate) fn new(purpose: &str, rule: Rule, index: &ConsentIndex) -> Self {
        let map = match rule {
            Rule::OptIn => &index.granted,
            Rule::OptOut => &index.withdrawn,
        };
        Self {
            purpose: purpose.to_string(),
            rule,
            listed: map.get(purpose).cloned().unwrap_or_default(),
        }
    }

    pub fn purpose(&self) -> &str {
        &self.purpose
    }

    pub fn rule(&self) -> Rule {
        self.rule
    }

    pub fn permits(&self, profile: u32) -> bool {
        match self.rule {
            Rule::OptIn => self.listed.contains(profile),
            Rule::OptOut => !self.listed.contains(profile),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(json: serde_json::Value) -> Message {
        let context = crate::message::ParseContext::at(1_700_000_000_000);
        crate::message::parse_message(json, None, &context).expect("a valid message")
    }

    fn summary(changes: &[ConsentChange]) -> Vec<(String, bool, Source)> {
        changes
            .iter()
            .map(|c| (c.purpose.clone(), c.granted, c.source))
            .collect()
    }

    /// Each source of consent, as a message carries it, and the changes it makes.
    #[test]
    fn every_source_of_a_message_gives_its_changes() {
        let purposes = Purposes::from_toml(
            "[purposes]\nsms = \"opt-in\"\n[categories]\nMarketing = \"email\"\n[traits]\nnewsletter = \"email\"\n",
        )
        .unwrap();
        type Case<'a> = (serde_json::Value, &'a str, Vec<(&'a str, bool, Source)>);
        let cases: Vec<Case> = vec![
            (
                serde_json::json!({"type": "track", "userId": "u", "event": "Page Viewed",
                    "context": {"consent": {"categoryPreferences":
                        {"Marketing": true, "Analytics": false, "Functional": true}}}}),
                "http",
                vec![
                    ("analytics", false, Source::ConsentTool),
                    ("email", true, Source::ConsentTool),
                ],
            ),
            (
                serde_json::json!({"type": "identify", "userId": "u",
                    "traits": {"newsletter": "yes", "consent_sms": true, "consent_x": true,
                        "consent_profiling": "maybe"}}),
                "http",
                vec![
                    ("email", true, Source::IdentifyTrait),
                    ("sms", true, Source::IdentifyTrait),
                ],
            ),
            (
                serde_json::json!({"type": "identify", "userId": "u",
                    "traits": {"consent_email": false}}),
                "import",
                vec![("email", false, Source::Import)],
            ),
            (
                serde_json::json!({"type": "track", "userId": "u", "event": "Unsubscribed"}),
                "http",
                vec![("email", false, Source::Unsubscribe)],
            ),
            (
                serde_json::json!({"type": "track", "userId": "u", "event": "Consent Updated",
                    "context": {"consent": {"purposes": {"profiling": false, "nope": true},
                        "basis": "legitimate_interests"}}}),
                "api",
                vec![("profiling", false, Source::Api)],
            ),
            (
                serde_json::json!({"type": "track", "userId": "u", "event": "Page Viewed"}),
                "http",
                vec![],
            ),
        ];
        for (json, channel, expected) in cases {
            let changes = purposes.changes_of(&message(json.clone()), channel);
            let expected: Vec<_> = expected
                .into_iter()
                .map(|(p, g, s)| (p.to_string(), g, s))
                .collect();
            assert_eq!(summary(&changes), expected, "{json}");
        }
        let api = purposes.changes_of(
            &message(
                serde_json::json!({"type": "track", "userId": "u", "event": "E",
                "context": {"ip": "192.0.2.1", "userAgent": "ua",
                    "consent": {"purposes": {"email": true}, "basis": "contract"}}}),
            ),
            "api",
        );
        assert_eq!(api[0].basis, Basis::Contract);
        assert_eq!(api[0].ip.as_deref(), Some("192.0.2.1"));
        assert_eq!(api[0].user_agent.as_deref(), Some("ua"));
    }

    fn change(purpose: &str, granted: bool, at: i64, id: &str) -> ConsentChange {
        ConsentChange {
            purpose: purpose.into(),
            granted,
            basis: Basis::Consent,
            source: Source::Api,
            at,
            message_id: id.into(),
            ip: None,
            user_agent: None,
        }
    }

    #[test]
    fn history_keeps_changes_in_time_order_and_the_latest_decides() {
        let mut consents = Consents::default();
        assert!(consents.apply(change("email", true, 10, "a")));
        // The same state again (a consent tool resending it) is no change.
        assert!(!consents.apply(change("email", true, 20, "b")));
        assert!(consents.apply(change("email", false, 30, "c")));
        // An older message arriving late goes in its place and decides nothing now; one that
        // repeats the state in force at its time is not kept.
        assert!(!consents.apply(change("email", true, 25, "d")));
        assert!(!consents.apply(change("email", false, 15, "g")));
        assert!(!consents.current("email").unwrap().granted);
        // The same message redone is not kept twice.
        assert!(!consents.apply(change("email", false, 30, "c")));
        let ids: Vec<&str> = consents.0.iter().map(|c| c.message_id.as_str()).collect();
        assert_eq!(ids, ["a", "g", "c"]);

        let mut other = Consents::default();
        other.apply(change("email", true, 40, "e"));
        other.apply(change("profiling", false, 5, "f"));
        assert!(consents.absorb(other));
        assert!(consents.current("email").unwrap().granted);
        let back = consents.split_off(|id| id == "e" || id == "f");
        assert_eq!(back.0.len(), 2);
        assert!(!consents.current("email").unwrap().granted);
        assert!(consents.current("profiling").is_none());
    }

    #[test]
    fn rules_decide_what_a_purpose_may_process() {
        let mut index = ConsentIndex::default();
        index.set(1, "email", Some(true));
        index.set(2, "email", Some(false));
        index.set(2, "profiling", Some(false));
        index.set(3, "profiling", Some(true));
        let purposes = Purposes::default();
        let email = ConsentCheck::new("email", purposes.rule("email").unwrap(), &index);
        let profiling = ConsentCheck::new("profiling", purposes.rule("profiling").unwrap(), &index);
        assert_eq!(
            (0..4).map(|p| email.permits(p)).collect::<Vec<_>>(),
            [false, true, false, false]
        );
        assert_eq!(
            (0..4).map(|p| profiling.permits(p)).collect::<Vec<_>>(),
            [true, true, false, true]
        );
        // A pass's view of one profile says the same as the index.
        for profile in 0..4 {
            let of = index.of(profile);
            for purpose in ["email", "profiling", "sms"] {
                assert_eq!(of.granted(purpose), index.granted(purpose, profile));
            }
        }
        index.set(2, "profiling", Some(true));
        assert!(index.permits("profiling", Rule::OptOut, 2));
        index.clear(1);
        assert!(!index.granted("email", 1));
    }

    #[test]
    fn a_bad_configuration_names_the_field() {
        assert!(
            Purposes::from_toml("[purposes]\n\"Bad Name\" = \"opt-in\"\n")
                .unwrap_err()
                .contains("purposes.Bad Name")
        );
        assert!(
            Purposes::from_toml("[traits]\nnewsletter = \"mail\"\n")
                .unwrap_err()
                .contains("traits.newsletter: \"mail\" is not a purpose")
        );
        assert!(
            Purposes::from_toml("[purposes]\nsms = \"sometimes\"\n")
                .unwrap_err()
                .contains("sometimes")
        );
    }
}
