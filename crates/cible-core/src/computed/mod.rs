//! Computed traits: engagement score, RFM, intent, lifecycle stage, send-time preference and
//! category affinity. Each is a pure function of a profile's hot timeline, `now`, the
//! configuration ([`config::TraitConfig`]) and the population calibration
//! ([`calibrate::Calibration`]: percentile and quintile breakpoints, the population's best send
//! time). Being pure, they are evaluated by the same three segment drivers as events are, and,
//! like every condition, report the next instant they can change by themselves.
//!
//! Percentiles and quintiles are against the calibration, recomputed by `cible traits refresh`
//! (and daily by the server): between two calibrations a profile's score only moves with its own
//! events, so memberships stay exact.

pub mod calibrate;
pub mod config;
pub mod ops;
pub mod recommend;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use crate::hot::{ABSENT, HotEvent, NO_NAME, NOT_TEXT, Timeline};
use calibrate::Calibration;
use config::TraitConfig;

pub const DAY: u32 = 86_400;

/// Index of `product_id`, `path` and `category` in [`crate::message::KEY_PROPERTIES`], and of
/// `revenue` and `duration_s` in [`crate::message::VALUE_PROPERTIES`].
pub(crate) const PRODUCT_KEY: usize = 0;
pub(crate) const PATH_KEY: usize = 1;
pub const CATEGORY_KEY: usize = 4;
const REVENUE_VALUE: usize = 0;
const DURATION_VALUE: usize = 4;

/// The named RFM segments, by R score (rows 5 to 1) and FM score (columns 1 to 5); see the README.
const RFM_GRID: [[&str; 5]; 5] = [
    // R = 5
    [
        "new",
        "potential_loyalists",
        "potential_loyalists",
        "champions",
        "champions",
    ],
    // R = 4
    [
        "promising",
        "potential_loyalists",
        "potential_loyalists",
        "loyal",
        "loyal",
    ],
    // R = 3
    [
        "about_to_sleep",
        "about_to_sleep",
        "need_attention",
        "loyal",
        "loyal",
    ],
    // R = 2
    [
        "hibernating",
        "hibernating",
        "at_risk",
        "at_risk",
        "cannot_lose",
    ],
    // R = 1
    ["lost", "hibernating", "at_risk", "at_risk", "cannot_lose"],
];

/// The named RFM segment of an R score and an FM score (each 1 to 5).
pub fn rfm_segment(r: u8, fm: u8) -> &'static str {
    RFM_GRID[usize::from(5 - r.clamp(1, 5))][usize::from(fm.clamp(1, 5) - 1)]
}

/// The lifecycle stages.
pub const STAGES: [&str; 7] = [
    "new",
    "engaged",
    "loyal",
    "at_risk",
    "dormant",
    "churned",
    "reactivated",
];

/// The configuration resolved against the dictionaries: event names become ids and path
/// prefixes become sets of key ids, as rule plans do.
#[derive(Debug, Clone)]
pub struct TraitPlan {
    pub config: TraitConfig,
    engagement: FxHashMap<u16, f64>,
    half_life_s: f64,
    order: Option<u16>,
    product_viewed: Option<u16>,
    signals: Vec<SignalPlan>,
    send_events: FxHashSet<u16>,
    affinity: FxHashMap<u16, f64>,
    keys: Arc<Vec<String>>,
}

#[derive(Debug, Clone)]
struct SignalPlan {
    name: u16,
    weight: f64,
    /// Key ids of paths with the prefix, when the signal has one.
    paths: Option<FxHashSet<u32>>,
    min_duration_s: Option<f64>,
}

impl TraitPlan {
    pub fn new(
        config: &TraitConfig,
        names: &dyn Fn(&str) -> Option<u16>,
        keys: Arc<Vec<String>>,
    ) -> Self {
        let id = |name: &str| names(name).filter(|id| *id != NO_NAME);
        let weights = |map: &std::collections::BTreeMap<String, f64>| {
            map.iter()
                .filter_map(|(name, weight)| Some((id(name)?, *weight)))
                .collect()
        };
        let signals = config
            .intent
            .signals
            .iter()
            .filter_map(|signal| {
                Some(SignalPlan {
                    name: id(&signal.event)?,
                    weight: signal.weight,
                    paths: signal.path_prefix.as_ref().map(|prefix| {
                        keys.iter()
                            .enumerate()
                            .filter(|(_, text)| text.starts_with(prefix.as_str()))
                            .map(|(id, _)| id as u32)
                            .collect()
                    }),
                    min_duration_s: signal.min_duration_s,
                })
            })
            .collect();
        Self {
            engagement: weights(&config.engagement.weights),
            half_life_s: config.engagement.half_life_days * f64::from(DAY),
            order: id(&config.rfm.order_event),
            product_viewed: id("Product Viewed"),
            signals,
            send_events: config
                .send_time
                .events
                .iter()
                .filter_map(|n| id(n))
                .collect(),
            affinity: weights(&config.affinity.weights),
            keys,
            config: config.clone(),
        }
    }

    fn text(&self, key: u32) -> &str {
        self.keys.get(key as usize).map_or("", String::as_str)
    }

    fn counts_for_engagement(&self, event: &HotEvent) -> Option<f64> {
        if event.anomalies() != 0 && !self.config.engagement.include_anomalies {
            return None;
        }
        self.engagement.get(&event.name).copied()
    }
}

/// A key property of event `index` as a key id: the hot row's key, or its property column.
fn key_of(timeline: &Timeline<'_>, index: usize, property: usize) -> Option<u32> {
    let event = &timeline.events[index];
    let id = if event.key_property() == Some(property) {
        event.key
    } else {
        timeline.column(index, property)?
    };
    (id != ABSENT && id != NOT_TEXT && id != crate::hot::NO_KEY).then_some(id)
}

/// A value property of event `index`, when the hot row holds it and it is a number.
fn value_of(event: &HotEvent, property: usize) -> Option<f64> {
    (event.value_property() == Some(property) && !event.value.is_nan())
        .then_some(f64::from(event.value))
}

/// What a profile's events give before the population is consulted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawTraits {
    /// Weighted events, each weight times `2^((ts - at) / half_life)`: time-invariant for ranking.
    pub engagement: f64,
    pub rfm: Option<RawRfm>,
    pub send_events: u32,
    pub hour: u8,
    pub weekday: u8,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RawRfm {
    pub recency_days: f64,
    pub frequency: u32,
    pub monetary: f64,
    /// Last order, seconds.
    pub last: u32,
}

/// Every computed trait of a profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ComputedTraits {
    pub score: Score,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rfm: Option<RfmTraits>,
    pub intent: IntentTraits,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<&'static str>,
    pub send_time: SendTimeTraits,
    pub affinity: AffinityTraits,
    /// What the trained models say (`cluster`, `predicted`), when asked for.
    #[serde(flatten)]
    pub models: ModelTraits,
    /// When one of these may change with no new event.
    #[serde(skip)]
    pub next_change: Option<u32>,
}

/// What the active models say of one profile.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ModelTraits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterTrait>,
    /// Probability per propensity model name (`purchase_30d`).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub predicted: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterTrait {
    pub id: u32,
    pub name: String,
}

impl ModelTraits {
    /// The value of `cluster.id`, `cluster.name` or `predicted.<name>`.
    pub fn attribute(&self, name: &str) -> Option<serde_json::Value> {
        if let Some(model) = name.strip_prefix("predicted.") {
            return self
                .predicted
                .get(model)
                .map(|p| serde_json::Value::from(*p));
        }
        let cluster = self.cluster.as_ref()?;
        match name {
            "cluster.id" => Some(cluster.id.into()),
            "cluster.name" => Some(cluster.name.clone().into()),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Score {
    /// Percentile in the calibrated population, 0 to 100.
    pub engagement: u8,
    /// The decayed weighted sum at the time asked.
    pub engagement_raw: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct RfmTraits {
    pub recency_days: f64,
    pub frequency: u32,
    pub monetary: f64,
    pub r: u8,
    pub f: u8,
    pub m: u8,
    /// "545": R, F and M.
    pub score: String,
    pub segment: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct IntentTraits {
    /// The top category's score.
    pub score: f64,
    /// none, low, medium or high.
    pub level: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// Score per category ("general" for signals with no category before them).
    pub categories: std::collections::BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct SendTimeTraits {
    /// Best hour to send, UTC, 0 to 23.
    pub hour: u8,
    /// Best weekday, 1 (Monday) to 7 (Sunday).
    pub weekday: u8,
    /// "profile" (from its opens and clicks) or "population".
    pub source: &'static str,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct AffinityTraits {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    pub categories: std::collections::BTreeMap<String, f64>,
}

/// The names the segment language reads (see `cible_lang::parser::COMPUTED`).
pub fn attribute(traits: &ComputedTraits, name: &str) -> Option<Json> {
    let rfm = traits.rfm.as_ref();
    Some(match name {
        "score.engagement" => Json::from(traits.score.engagement),
        "rfm.segment" => Json::from(rfm?.segment),
        "rfm.score" => Json::from(rfm?.score.clone()),
        "rfm.r" => Json::from(rfm?.r),
        "rfm.f" => Json::from(rfm?.f),
        "rfm.m" => Json::from(rfm?.m),
        "rfm.frequency" => Json::from(rfm?.frequency),
        "rfm.monetary" => Json::from(rfm?.monetary),
        "intent.level" => Json::from(traits.intent.level),
        "intent.score" => Json::from(traits.intent.score),
        "intent.category" => Json::from(traits.intent.category.clone()?),
        "lifecycle" => Json::from(traits.lifecycle?),
        "send_time.hour" => Json::from(traits.send_time.hour),
        "send_time.weekday" => Json::from(traits.send_time.weekday),
        "affinity.category" => Json::from(traits.affinity.category.clone()?),
        _ => return traits.models.attribute(name),
    })
}

/// Notes the earliest instant after `now`.
struct Next {
    now: u32,
    at: Option<u32>,
}

impl Next {
    fn at(&mut self, at: u64) {
        if at > u64::from(self.now) && at <= u64::from(u32::MAX) {
            let at = at as u32;
            self.at = Some(self.at.map_or(at, |n| n.min(at)));
        }
    }
}

/// Hour (UTC) and ISO weekday (1 = Monday) of a time in seconds.
pub fn hour_and_weekday(ts: u32) -> (u8, u8) {
    let days = ts / DAY;
    (((ts % DAY) / 3600) as u8, ((days + 3) % 7 + 1) as u8)
}

/// The profile's own part of the traits, with `at` the calibration's reference instant.
pub fn raw(timeline: &Timeline<'_>, now: u32, at: u32, plan: &TraitPlan) -> RawTraits {
    raw_with_send_counts(timeline, now, at, plan).0
}

/// Opens and clicks by hour (UTC) and by ISO weekday (Monday first).
pub type SendCounts = ([u32; 24], [u32; 7]);

/// [`raw`], and the profile's send-time counts (the calibration adds them up).
pub fn raw_with_send_counts(
    timeline: &Timeline<'_>,
    now: u32,
    at: u32,
    plan: &TraitPlan,
) -> (RawTraits, SendCounts) {
    let events = timeline.events;
    let seen = events.partition_point(|e| e.ts <= now);
    let mut raw = RawTraits::default();
    let rfm_start = now.saturating_sub(plan.config.rfm.window_days.saturating_mul(DAY));
    let mut hours = [0u32; 24];
    let mut weekdays = [0u32; 7];
    let mut orders = 0;
    let mut monetary = 0.0;
    let mut last_order = None;
    for event in &events[..seen] {
        if let Some(weight) = plan.counts_for_engagement(event) {
            let age = f64::from(event.ts) - f64::from(at);
            raw.engagement += weight * (age / plan.half_life_s).exp2();
        }
        if Some(event.name) == plan.order && event.ts > rfm_start {
            orders += 1;
            monetary += value_of(event, REVENUE_VALUE).unwrap_or(0.0);
            last_order = Some(event.ts);
        }
        if plan.send_events.contains(&event.name) {
            let (hour, weekday) = hour_and_weekday(event.ts);
            hours[usize::from(hour)] += 1;
            weekdays[usize::from(weekday - 1)] += 1;
            raw.send_events += 1;
        }
    }
    if let Some(last) = last_order {
        raw.rfm = Some(RawRfm {
            recency_days: f64::from(now - last) / f64::from(DAY),
            frequency: orders,
            monetary,
            last,
        });
    }
    raw.hour = argmax(&hours) as u8;
    raw.weekday = argmax(&weekdays) as u8 + 1;
    (raw, (hours, weekdays))
}

/// The first index of the largest count.
fn argmax(counts: &[u32]) -> usize {
    let mut best = 0;
    for (i, count) in counts.iter().enumerate() {
        if *count > counts[best] {
            best = i;
        }
    }
    best
}

/// Every computed trait of a profile at `now`.
pub fn compute(
    timeline: &Timeline<'_>,
    now: u32,
    plan: &TraitPlan,
    calibration: &Calibration,
) -> ComputedTraits {
    let raw = raw(timeline, now, calibration.at, plan);
    compute_from_raw(timeline, now, plan, calibration, raw)
}

/// [`compute`] with the profile's raw traits already known (at the calibration's instant).
pub fn compute_from_raw(
    timeline: &Timeline<'_>,
    now: u32,
    plan: &TraitPlan,
    calibration: &Calibration,
    raw: RawTraits,
) -> ComputedTraits {
    let mut next = Next { now, at: None };
    let events = timeline.events;
    let seen = events.partition_point(|e| e.ts <= now);
    if let Some(future) = events.get(seen) {
        // A future-dated event counts from its time on.
        next.at(u64::from(future.ts));
    }
    let decay = ((f64::from(calibration.at) - f64::from(now)) / plan.half_life_s).exp2();
    let score = Score {
        engagement: calibration.engagement_percentile(raw.engagement),
        engagement_raw: raw.engagement * decay,
    };
    let rfm = raw.rfm.as_ref().map(|r| {
        rfm_traits(
            r,
            calibration,
            &mut next,
            plan.config.rfm.window_days,
            events,
            seen,
            plan,
        )
    });
    let send_time = if raw.send_events >= plan.config.send_time.min_events {
        SendTimeTraits {
            hour: raw.hour,
            weekday: raw.weekday,
            source: "profile",
        }
    } else {
        SendTimeTraits {
            hour: calibration.hour,
            weekday: calibration.weekday,
            source: "population",
        }
    };
    ComputedTraits {
        score,
        rfm,
        intent: intent(timeline, now, seen, plan, &mut next),
        lifecycle: lifecycle(events, seen, now, plan, &mut next),
        send_time,
        affinity: affinity(timeline, now, seen, plan, &mut next),
        models: Default::default(),
        next_change: next.at,
    }
}

fn rfm_traits(
    raw: &RawRfm,
    calibration: &Calibration,
    next: &mut Next,
    window_days: u32,
    events: &[HotEvent],
    seen: usize,
    plan: &TraitPlan,
) -> RfmTraits {
    let window = window_days.saturating_mul(DAY);
    // The oldest order in the window leaves it: frequency and monetary change.
    if let Some(oldest) = events[..seen]
        .iter()
        .find(|e| Some(e.name) == plan.order && e.ts > next.now.saturating_sub(window))
    {
        next.at(u64::from(oldest.ts) + u64::from(window));
    }
    // Recency crosses a breakpoint: `days > b` flips once `now - last > b` days.
    for b in calibration.recency {
        let crossing = f64::from(raw.last) + b * f64::from(DAY);
        if crossing >= 0.0 {
            next.at(crossing.floor() as u64);
            next.at(crossing.floor() as u64 + 1);
        }
    }
    let above = |value: f64, breaks: &[f64; 4]| breaks.iter().filter(|b| value > **b).count() as u8;
    let r = 5 - above(raw.recency_days, &calibration.recency);
    let f = 1 + above(f64::from(raw.frequency), &calibration.frequency);
    let m = 1 + above(raw.monetary, &calibration.monetary);
    let fm = (f + m).div_ceil(2);
    RfmTraits {
        recency_days: raw.recency_days,
        frequency: raw.frequency,
        monetary: raw.monetary,
        r,
        f,
        m,
        score: format!("{r}{f}{m}"),
        segment: rfm_segment(r, fm),
    }
}

/// The category with the highest score; ties go to the first name.
fn top(categories: &std::collections::BTreeMap<String, f64>) -> Option<(&String, f64)> {
    categories.iter().fold(
        None,
        |best: Option<(&String, f64)>, (name, score)| match best {
            Some((_, s)) if s >= *score => best,
            _ => Some((name, *score)),
        },
    )
}

fn intent(
    timeline: &Timeline<'_>,
    now: u32,
    seen: usize,
    plan: &TraitPlan,
    next: &mut Next,
) -> IntentTraits {
    let events = timeline.events;
    let config = &plan.config.intent;
    let window = config.window_days.saturating_mul(DAY);
    let start = now.saturating_sub(window);
    // Signals after the last order only: the order answered the intent before it.
    let after_order = events[..seen]
        .iter()
        .rposition(|e| Some(e.name) == plan.order)
        .map_or(0, |i| i + 1);
    let first = events[..seen]
        .partition_point(|e| e.ts <= start)
        .max(after_order);
    let mut scores: FxHashMap<Option<u32>, f64> = FxHashMap::default();
    let mut current: Option<u32> = None;
    let mut viewed: FxHashSet<u32> = FxHashSet::default();
    let mut oldest: Option<u32> = None;
    for (index, event) in events.iter().enumerate().take(seen).skip(first) {
        let mut weight = 0.0;
        for signal in plan.signals.iter().filter(|s| s.name == event.name) {
            if let Some(paths) = &signal.paths
                && !key_of(timeline, index, PATH_KEY).is_some_and(|p| paths.contains(&p))
            {
                continue;
            }
            if let Some(min) = signal.min_duration_s
                && !value_of(event, DURATION_VALUE).is_some_and(|d| d >= min)
            {
                continue;
            }
            weight += signal.weight;
        }
        if Some(event.name) == plan.product_viewed
            && let Some(product) = key_of(timeline, index, PRODUCT_KEY)
            && !viewed.insert(product)
        {
            weight += config.repeat_view_weight;
        }
        if weight == 0.0 {
            continue;
        }
        if let Some(category) = key_of(timeline, index, CATEGORY_KEY) {
            current = Some(category);
        }
        *scores.entry(current).or_default() += weight;
        oldest.get_or_insert(event.ts);
    }
    if let Some(oldest) = oldest {
        next.at(u64::from(oldest) + u64::from(window));
    }
    let categories: std::collections::BTreeMap<String, f64> = scores
        .into_iter()
        .map(|(category, score)| {
            let name = category.map_or("general", |c| plan.text(c)).to_string();
            (name, score)
        })
        .collect();
    let top = top(&categories);
    let score = top.map_or(0.0, |(_, s)| s);
    let level = if score <= 0.0 {
        "none"
    } else if score >= config.high {
        "high"
    } else if score >= config.medium {
        "medium"
    } else {
        "low"
    };
    IntentTraits {
        score,
        level,
        category: top.map(|(name, _)| name.clone()),
        categories,
    }
}

fn lifecycle(
    events: &[HotEvent],
    seen: usize,
    now: u32,
    plan: &TraitPlan,
    next: &mut Next,
) -> Option<&'static str> {
    let config = &plan.config.lifecycle;
    let days = |d: u32| u64::from(d) * u64::from(DAY);
    let first_seen = u64::from(events[..seen].first()?.ts);
    let now64 = u64::from(now);
    let active: Vec<u32> = events[..seen]
        .iter()
        .filter(|e| plan.counts_for_engagement(e).is_some_and(|w| w > 0.0))
        .map(|e| e.ts)
        .collect();
    let reference = active.last().map_or(first_seen, |ts| u64::from(*ts));
    for threshold in [config.active_days, config.dormant_days, config.churned_days] {
        next.at(reference + days(threshold));
    }
    let inactive = now64 - reference;
    if inactive >= days(config.churned_days) {
        return Some("churned");
    }
    if inactive >= days(config.dormant_days) {
        return Some("dormant");
    }
    if inactive >= days(config.active_days) {
        return Some("at_risk");
    }
    next.at(first_seen + days(config.new_days));
    if now64 < first_seen + days(config.new_days) {
        return Some("new");
    }
    // Back after a gap of `dormant_days` between two active moments.
    let back = active
        .windows(2)
        .rev()
        .find(|pair| u64::from(pair[1] - pair[0]) >= days(config.dormant_days))
        .map(|pair| u64::from(pair[1]));
    if let Some(back) = back {
        next.at(back + days(config.reactivated_days));
        if now64 < back + days(config.reactivated_days) {
            return Some("reactivated");
        }
    }
    let window = days(config.loyal_window_days);
    let orders: Vec<u64> = events[..seen]
        .iter()
        .filter(|e| Some(e.name) == plan.order && u64::from(e.ts) + window > now64)
        .map(|e| u64::from(e.ts))
        .collect();
    if let Some(oldest) = orders.first() {
        next.at(oldest + window);
    }
    if orders.len() >= config.loyal_orders as usize {
        Some("loyal")
    } else {
        Some("engaged")
    }
}

fn affinity(
    timeline: &Timeline<'_>,
    now: u32,
    seen: usize,
    plan: &TraitPlan,
    next: &mut Next,
) -> AffinityTraits {
    let events = timeline.events;
    let window = plan.config.affinity.window_days.saturating_mul(DAY);
    let first = events[..seen].partition_point(|e| e.ts <= now.saturating_sub(window));
    let mut weights: FxHashMap<u32, f64> = FxHashMap::default();
    let mut oldest = None;
    for (index, event) in events.iter().enumerate().take(seen).skip(first) {
        let Some(weight) = plan.affinity.get(&event.name) else {
            continue;
        };
        if let Some(category) = key_of(timeline, index, CATEGORY_KEY) {
            *weights.entry(category).or_default() += weight;
            oldest.get_or_insert(event.ts);
        }
    }
    if let Some(oldest) = oldest {
        next.at(u64::from(oldest) + u64::from(window));
    }
    let categories: std::collections::BTreeMap<String, f64> = weights
        .into_iter()
        .map(|(c, w)| (plan.text(c).to_string(), w))
        .collect();
    let category = top(&categories).map(|(name, _)| name.clone());
    AffinityTraits {
        category,
        categories,
    }
}

/// Whether a computed attribute is a model's output (`cluster.*`, `predicted.*`).
pub fn is_model_attribute(name: &str) -> bool {
    name.starts_with("cluster.") || name.starts_with("predicted.")
}
