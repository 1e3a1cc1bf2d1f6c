//! Evaluation of a plan for one profile: the verdict, and the next instant at which the verdict
//! could change with no new event (a window letting an event go, a `days_since` crossing its
//! threshold, a sequence's delay elapsing, a future-dated event arriving in the window).
//!
//! Time has one-second resolution: an event at `ts` is in window `W` at `now` when
//! `now - W < ts <= now`. The same code evaluates hot rows and full messages; a hot row that
//! cannot tell whether it holds a property answers "unknown" and the caller re-evaluates the
//! profile on its full messages.

use std::collections::BTreeMap;

use serde_json::Value as Json;

use super::plan::{Aggregate, Filter, Node, Plan, PropCondition, PropRef, PropTest, ValueNode};
use crate::hot::{ABSENT, HotEvent, NO_KEY, NOT_TEXT, Timeline};
use crate::records::TraitValue;

/// The hot rows cannot answer: evaluate on full messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NeedMessages;

type Eval<T> = Result<T, NeedMessages>;

/// A profile's events, oldest first.
pub trait Events {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn ts(&self, index: usize) -> u32;
    fn name(&self, index: usize) -> u16;
    /// Whether event `index` passes a property condition (a missing property fails).
    fn condition(&self, index: usize, condition: &PropCondition) -> Eval<bool>;
    /// A numeric property of event `index`, `None` when missing or not a number.
    fn number(&self, index: usize, property: &PropRef) -> Eval<Option<f64>>;
    /// The indexes of the events named `name`, oldest first, when kept (a filter then visits
    /// only those).
    fn of_name(&self, _name: u16) -> Option<&[u32]> {
        None
    }
}

/// Event indexes grouped by name, each group oldest first: built once per profile when several
/// rules read the same timeline, so that each filter visits only the events of its name.
#[derive(Debug, Default)]
pub struct NameIndex {
    /// `name << 32 | index`, sorted.
    keys: Vec<u64>,
    order: Vec<u32>,
    /// (name, start, end) in `order`.
    groups: Vec<(u16, u32, u32)>,
}

impl NameIndex {
    /// Indexes `events`, reusing the buffers.
    pub fn rebuild(&mut self, events: &[HotEvent]) {
        self.keys.clear();
        self.keys.extend(
            events
                .iter()
                .enumerate()
                .map(|(i, e)| (u64::from(e.name) << 32) | i as u64),
        );
        self.keys.sort_unstable();
        self.order.clear();
        self.order.extend(self.keys.iter().map(|k| *k as u32));
        self.groups.clear();
        for (i, key) in self.keys.iter().enumerate() {
            let name = (key >> 32) as u16;
            let i = i as u32;
            match self.groups.last_mut() {
                Some(group) if group.0 == name => group.2 = i + 1,
                _ => self.groups.push((name, i, i + 1)),
            }
        }
    }

    fn of(&self, name: u16) -> &[u32] {
        self.groups
            .iter()
            .find(|(n, _, _)| *n == name)
            .map_or(&[], |(_, start, end)| {
                &self.order[*start as usize..*end as usize]
            })
    }
}

/// Hot rows: the key and value properties they hold and the property columns, "unknown" for
/// others; optionally with a [`NameIndex`] of the same timeline.
pub struct HotEvents<'a>(pub Timeline<'a>, pub Option<&'a NameIndex>);

impl Events for HotEvents<'_> {
    fn of_name(&self, name: u16) -> Option<&[u32]> {
        self.1.map(|index| index.of(name))
    }
    fn len(&self) -> usize {
        self.0.events.len()
    }
    fn ts(&self, index: usize) -> u32 {
        self.0.events[index].ts
    }
    fn name(&self, index: usize) -> u16 {
        self.0.events[index].name
    }

    fn condition(&self, index: usize, condition: &PropCondition) -> Eval<bool> {
        let event = &self.0.events[index];
        if let (Some(wanted), Some(passing)) =
            (condition.property.key_index, &condition.test.passing_keys)
        {
            // Key properties are kept in priority order: a lower index present hides ours.
            return match event.key_property() {
                // Held but not text: only the full message can tell.
                Some(held) if held == wanted && event.key == NO_KEY => Err(NeedMessages),
                Some(held) if held == wanted => Ok(passing.contains(&event.key)),
                // Hidden behind another key: the property column, when one is kept.
                Some(held) if held < wanted => match self.0.column(index, wanted) {
                    Some(ABSENT) => Ok(false),
                    Some(NOT_TEXT) | None => Err(NeedMessages),
                    Some(id) => Ok(passing.contains(&id)),
                },
                _ => Ok(false),
            };
        }
        match self.number(index, &condition.property)? {
            Some(number) => Ok(condition.test.passes_number(number)),
            // Held but not a number: `!=` and text comparisons need the full message.
            None if event.value_property() == condition.property.value_index => Err(NeedMessages),
            None => Ok(false),
        }
    }

    fn number(&self, index: usize, property: &PropRef) -> Eval<Option<f64>> {
        let event = &self.0.events[index];
        let Some(wanted) = property.value_index else {
            return Err(NeedMessages);
        };
        match event.value_property() {
            Some(held) if held == wanted => {
                Ok((!event.value.is_nan()).then_some(f64::from(event.value)))
            }
            Some(held) if held < wanted => Err(NeedMessages),
            _ => Ok(None),
        }
    }
}

/// One event with all its properties.
#[derive(Debug, Clone)]
pub struct FullEvent {
    pub ts: u32,
    pub name: u16,
    pub properties: serde_json::Map<String, Json>,
}

/// Full messages read from the durable store.
pub struct MessageEvents(pub Vec<FullEvent>);

fn lookup<'a>(properties: &'a serde_json::Map<String, Json>, path: &[String]) -> Option<&'a Json> {
    let (first, rest) = path.split_first()?;
    let mut value = properties.get(first)?;
    for part in rest {
        value = value.get(part)?;
    }
    (!value.is_null()).then_some(value)
}

impl Events for MessageEvents {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn ts(&self, index: usize) -> u32 {
        self.0[index].ts
    }
    fn name(&self, index: usize) -> u16 {
        self.0[index].name
    }
    fn condition(&self, index: usize, condition: &PropCondition) -> Eval<bool> {
        Ok(lookup(&self.0[index].properties, &condition.property.path)
            .is_some_and(|value| condition.test.passes(value) == Some(true)))
    }
    fn number(&self, index: usize, property: &PropRef) -> Eval<Option<f64>> {
        Ok(lookup(&self.0[index].properties, &property.path).and_then(crate::message::number_of))
    }
}

/// What evaluation reads besides events.
pub struct Context<'a> {
    /// Seconds since the epoch.
    pub now: u32,
    pub traits: &'a BTreeMap<String, TraitValue>,
    pub in_segment: &'a dyn Fn(&str) -> bool,
    /// Whether the profile granted a purpose and has not withdrawn it since.
    pub consented: &'a dyn Fn(&str) -> bool,
    /// The profile's computed traits, when a rule reads them.
    pub computed: Option<&'a crate::scoring::Lazy<'a>>,
}

/// The result for one profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub member: bool,
    /// The earliest instant after `now` at which the verdict may change by itself.
    pub next_change: Option<u32>,
}

/// One condition of a rule, with the value it saw, for "why is this profile in?".
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Explained {
    pub condition: String,
    /// The count, sum, days, trait value... the condition compared (null when there was none).
    pub value: Json,
    pub result: bool,
}

/// Every leaf condition of the rule, evaluated for one profile. `expr` is the rule the plan was
/// made from (for the text of each condition).
pub fn explain(
    plan: &Plan,
    expr: &cible_lang::Expr,
    events: &impl Events,
    ctx: &Context<'_>,
) -> Eval<Vec<Explained>> {
    let mut evaluator = Evaluator {
        events,
        ctx,
        next: None,
    };
    let mut out = Vec::new();
    evaluator.explain(&plan.root, expr, &mut out)?;
    Ok(out)
}

pub fn evaluate(plan: &Plan, events: &impl Events, ctx: &Context<'_>) -> Eval<Verdict> {
    let mut evaluator = Evaluator {
        events,
        ctx,
        next: None,
    };
    let member = evaluator.node(&plan.root)?;
    Ok(Verdict {
        member,
        next_change: evaluator.next,
    })
}

struct Evaluator<'a, E> {
    events: &'a E,
    ctx: &'a Context<'a>,
    next: Option<u32>,
}

const DAY: f64 = 86_400.0;

impl<E: Events> Evaluator<'_, E> {
    /// Notes an instant at which the verdict may change, if it is in the future.
    fn candidate(&mut self, at: u64) {
        if at > u64::from(self.ctx.now) && at <= u64::from(u32::MAX) {
            let at = at as u32;
            self.next = Some(self.next.map_or(at, |n| n.min(at)));
        }
    }

    fn matches(&self, index: usize, filter: &Filter) -> Eval<bool> {
        if Some(self.events.name(index)) != filter.name {
            return Ok(false);
        }
        for condition in &filter.conditions {
            if !self.events.condition(index, condition)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Visits the events matching `filter` in the window, oldest first, and notes when the
    /// window changes: the earliest match is the first to leave it, and the first future-dated
    /// match enters it at its time. Returns how many matched.
    fn scan(
        &mut self,
        filter: &Filter,
        window: Option<u32>,
        mut on_match: impl FnMut(&E, usize) -> Eval<()>,
    ) -> Eval<usize> {
        let Some(name) = filter.name else {
            return Ok(0);
        };
        let now = self.ctx.now;
        let events = self.events;
        let bound = window.map(|w| u64::from(now).saturating_sub(u64::from(w)));
        let mut count = 0;
        let mut visit = |this: &mut Self, index: usize| -> Eval<bool> {
            let ts = events.ts(index);
            if !this.matches(index, filter)? {
                return Ok(true);
            }
            if ts > now {
                // A future-dated event enters the window when its time comes.
                this.candidate(u64::from(ts));
                return Ok(false);
            }
            if count == 0
                && let Some(w) = window
            {
                this.candidate(u64::from(ts) + u64::from(w));
            }
            count += 1;
            on_match(events, index)?;
            Ok(true)
        };
        match events.of_name(name) {
            Some(indexes) => {
                let start = bound.map_or(0, |b| {
                    indexes.partition_point(|i| u64::from(events.ts(*i as usize)) <= b)
                });
                for index in &indexes[start..] {
                    if !visit(self, *index as usize)? {
                        break;
                    }
                }
            }
            None => {
                let start = bound.map_or(0, |b| self.first_after(b));
                for index in start..events.len() {
                    if !visit(self, index)? {
                        break;
                    }
                }
            }
        }
        Ok(count)
    }

    /// How many events match in the window.
    fn count_in_window(&mut self, filter: &Filter, window: Option<u32>) -> Eval<usize> {
        self.scan(filter, window, |_, _| Ok(()))
    }

    /// Indexes of the events matching in the window, oldest first.
    fn in_window(&mut self, filter: &Filter, window: Option<u32>) -> Eval<Vec<usize>> {
        let mut found = Vec::new();
        self.scan(filter, window, |_, index| {
            found.push(index);
            Ok(())
        })?;
        Ok(found)
    }

    /// The first event with `ts > bound` (binary search over the sorted timeline).
    fn first_after(&self, bound: u64) -> usize {
        let (mut low, mut high) = (0, self.events.len());
        while low < high {
            let mid = (low + high) / 2;
            if u64::from(self.events.ts(mid)) <= bound {
                low = mid + 1;
            } else {
                high = mid;
            }
        }
        low
    }

    fn explain(
        &mut self,
        node: &Node,
        expr: &cible_lang::Expr,
        out: &mut Vec<Explained>,
    ) -> Eval<()> {
        use cible_lang::Expr;
        match (node, expr) {
            (Node::And(nodes), Expr::And { args }) | (Node::Or(nodes), Expr::Or { args }) => {
                for (node, arg) in nodes.iter().zip(args) {
                    self.explain(node, arg, out)?;
                }
            }
            (Node::Not(inner), Expr::Not { arg }) => {
                let start = out.len();
                self.explain(inner, arg, out)?;
                for explained in &mut out[start..] {
                    explained.condition = format!("not {}", explained.condition);
                    explained.result = !explained.result;
                }
            }
            (leaf, expr) => {
                let result = self.node(leaf)?;
                let value = match leaf {
                    Node::Did { filter, window } => {
                        Json::from(self.count_in_window(filter, *window)?)
                    }
                    Node::Compare { value, test } => {
                        self.value_of(value, test)?.unwrap_or(Json::Null)
                    }
                    _ => Json::Bool(result),
                };
                out.push(Explained {
                    condition: expr.to_string(),
                    value,
                    result,
                });
            }
        }
        Ok(())
    }

    fn node(&mut self, node: &Node) -> Eval<bool> {
        Ok(match node {
            Node::And(args) => {
                let mut all = true;
                for arg in args {
                    // Every branch is evaluated so that every branch's next change is known.
                    all &= self.node(arg)?;
                }
                all
            }
            Node::Or(args) => {
                let mut any = false;
                for arg in args {
                    any |= self.node(arg)?;
                }
                any
            }
            Node::Not(arg) => !self.node(arg)?,
            Node::Did { filter, window } => self.count_in_window(filter, *window)? > 0,
            Node::Compare { value, test } => self.compare(value, test)?,
            Node::Sequence {
                first,
                then,
                negated,
                within,
            } => self.sequence(first, then, *negated, *within)?,
            Node::InSegment(name) => (self.ctx.in_segment)(name),
        })
    }

    fn compare(&mut self, value: &ValueNode, test: &PropTest) -> Eval<bool> {
        Ok(match self.value_of(value, test)? {
            Some(Json::Number(n)) => n.as_f64().is_some_and(|n| test.passes_number(n)),
            Some(json) => test.passes(&json) == Some(true),
            None => false,
        })
    }

    /// The value a comparison reads: a number computed from events, or a trait's JSON.
    fn value_of(&mut self, value: &ValueNode, test: &PropTest) -> Eval<Option<Json>> {
        let now = self.ctx.now;
        let number = match value {
            ValueNode::Count { filter, window } => {
                Some(self.count_in_window(filter, *window)? as f64)
            }
            ValueNode::Aggregate {
                kind,
                filter,
                property,
                window,
            } => {
                // (sum, how many numbers, min, max); a missing number counts as 0 in a sum.
                let mut sum = 0.0;
                let mut n = 0usize;
                let (mut min, mut max) = (f64::INFINITY, f64::NEG_INFINITY);
                self.scan(filter, *window, |events, index| {
                    if let Some(v) = events.number(index, property)? {
                        sum += v;
                        n += 1;
                        min = min.min(v);
                        max = max.max(v);
                    }
                    Ok(())
                })?;
                match kind {
                    Aggregate::Sum => Some(sum),
                    Aggregate::Avg => (n > 0).then(|| sum / n as f64),
                    Aggregate::Min => (n > 0).then_some(min),
                    Aggregate::Max => (n > 0).then_some(max),
                }
            }
            ValueNode::DaysSince { filter, first } => {
                let matching = self.in_window(filter, None)?;
                let chosen = if *first {
                    matching.first()
                } else {
                    matching.last()
                };
                chosen.map(|index| self.days_since(self.events.ts(*index), test))
            }
            ValueNode::DaysSinceSeen { first } => {
                // Sorted by time: events up to now come first, future-dated ones after.
                let seen = self.first_after(u64::from(now));
                if seen < self.events.len() {
                    self.candidate(u64::from(self.events.ts(seen)));
                }
                let chosen = match (seen, *first) {
                    (0, _) => None,
                    (_, true) => Some(self.events.ts(0)),
                    (_, false) => Some(self.events.ts(seen - 1)),
                };
                chosen.map(|ts| self.days_since(ts, test))
            }
            ValueNode::Computed(name) => {
                let Some(lazy) = self.ctx.computed else {
                    return Ok(None);
                };
                if crate::computed::is_model_attribute(name) {
                    let (models, next) = lazy.models();
                    if let Some(at) = next {
                        self.candidate(u64::from(*at));
                    }
                    return Ok(models.attribute(name));
                }
                let traits = lazy.get();
                if let Some(at) = traits.next_change {
                    self.candidate(u64::from(at));
                }
                return Ok(crate::computed::attribute(traits, name));
            }
            ValueNode::Consent(purpose) => {
                return Ok(Some(Json::Bool((self.ctx.consented)(purpose))));
            }
            ValueNode::Trait(path) => {
                let Some((first, rest)) = path.split_first() else {
                    return Ok(None);
                };
                let mut value = match self.ctx.traits.get(first) {
                    Some(t) => &t.value,
                    None => return Ok(None),
                };
                for part in rest {
                    match value.get(part) {
                        Some(v) => value = v,
                        None => return Ok(None),
                    }
                }
                return Ok((!value.is_null()).then(|| value.clone()));
            }
        };
        Ok(number
            .and_then(serde_json::Number::from_f64)
            .map(Json::Number))
    }

    /// Days since `ts`, noting when it crosses the threshold the test compares it with.
    fn days_since(&mut self, ts: u32, test: &PropTest) -> f64 {
        use super::plan::TestKind;
        let thresholds: Vec<f64> = match &test.kind {
            TestKind::Compare(_, cible_lang::ast::Literal::Number(n)) => vec![*n],
            TestKind::In(values) => values
                .iter()
                .filter_map(|v| {
                    if let cible_lang::ast::Literal::Number(n) = v {
                        Some(*n)
                    } else {
                        None
                    }
                })
                .collect(),
            TestKind::Compare(..) => Vec::new(),
        };
        for threshold in thresholds {
            let crossing = f64::from(ts) + threshold * DAY;
            if crossing >= 0.0 {
                self.candidate(crossing.floor() as u64);
                self.candidate(crossing.floor() as u64 + 1);
            }
        }
        f64::from(self.ctx.now - ts) / DAY
    }

    /// The last `first` event (at or before now), and whether a `then` event followed it
    /// within the delay.
    fn sequence(
        &mut self,
        first: &Filter,
        then: &Filter,
        negated: bool,
        within: u32,
    ) -> Eval<bool> {
        let now = self.ctx.now;
        let firsts = self.in_window(first, None)?;
        let Some(&last_first) = firsts.last() else {
            return Ok(false);
        };
        let start = self.events.ts(last_first);
        let deadline = u64::from(start) + u64::from(within);
        let thens = self.in_window(then, None)?;
        let followed = thens.iter().any(|&i| {
            let ts = u64::from(self.events.ts(i));
            ts > u64::from(start) && ts <= deadline
        });
        if negated {
            if followed {
                return Ok(false);
            }
            self.candidate(deadline);
            Ok(u64::from(now) >= deadline)
        } else {
            Ok(followed)
        }
    }
}
