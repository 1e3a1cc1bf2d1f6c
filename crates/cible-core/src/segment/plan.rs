//! Planning: a rule's syntax tree compiled against the store's dictionaries. Event names become
//! dictionary ids, windows become seconds, and conditions on the hot row's key property become
//! sets of dictionary ids, so evaluation compares integers.

use cible_lang::ast::{Cmp, Condition, EventFilter, Expr, Literal, Test, Value};
use rustc_hash::FxHashSet;
use serde_json::Value as Json;

use crate::hot::NO_NAME;
use crate::message::{KEY_PROPERTIES, VALUE_PROPERTIES, number_of};

/// What planning needs from the store.
pub trait Dictionaries {
    /// The id of an event name, if any event of that name was received.
    fn name_id(&self, name: &str) -> Option<u16>;
    /// Every key-property text with its id.
    fn keys(&self) -> &[String];
}

#[derive(Debug, Clone)]
pub enum Node {
    And(Vec<Node>),
    Or(Vec<Node>),
    Not(Box<Node>),
    Did {
        filter: Filter,
        window: Option<u32>,
    },
    Compare {
        value: ValueNode,
        test: PropTest,
    },
    Sequence {
        first: Filter,
        then: Filter,
        negated: bool,
        within: u32,
    },
    InSegment(String),
}

#[derive(Debug, Clone)]
pub enum ValueNode {
    Count {
        filter: Filter,
        window: Option<u32>,
    },
    Aggregate {
        kind: Aggregate,
        filter: Filter,
        property: PropRef,
        window: Option<u32>,
    },
    DaysSince {
        filter: Filter,
        first: bool,
    },
    DaysSinceSeen {
        first: bool,
    },
    Trait(Vec<String>),
    /// A computed trait (`score.engagement`, `lifecycle`...), see [`crate::computed`].
    Computed(String),
    /// Whether the profile granted this purpose (`consent.email`), see [`crate::consent`].
    Consent(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    Sum,
    Avg,
    Min,
    Max,
}

/// Which event name matches, and conditions on its properties.
#[derive(Debug, Clone)]
pub struct Filter {
    /// `None` when no event of that name exists yet: it matches nothing.
    pub name: Option<u16>,
    pub conditions: Vec<PropCondition>,
}

#[derive(Debug, Clone)]
pub struct PropCondition {
    pub property: PropRef,
    pub test: PropTest,
}

/// A property and where the hot row may hold it.
#[derive(Debug, Clone)]
pub struct PropRef {
    /// Dotted path into the event's properties.
    pub path: Vec<String>,
    /// Index in `KEY_PROPERTIES`, if the hot row's key can hold it.
    pub key_index: Option<usize>,
    /// Index in `VALUE_PROPERTIES`, if the hot row's number can hold it.
    pub value_index: Option<usize>,
}

/// A test on a property or value, with the key-dictionary ids that pass it when the test is
/// on a key property.
#[derive(Debug, Clone)]
pub struct PropTest {
    pub kind: TestKind,
    pub passing_keys: Option<FxHashSet<u32>>,
}

#[derive(Debug, Clone)]
pub enum TestKind {
    Compare(Cmp, Literal),
    In(Vec<Literal>),
}

/// The compiled rule.
#[derive(Debug, Clone)]
pub struct Plan {
    pub root: Node,
    /// Event-name ids the verdict depends on (for the incremental driver).
    pub names: FxHashSet<u16>,
    /// Segments referenced.
    pub segments: Vec<String>,
    /// Some condition reads a property the hot row never holds: evaluate on full messages.
    pub needs_messages: bool,
}

pub fn plan(expr: &Expr, dictionaries: &impl Dictionaries) -> Plan {
    let mut planner = Planner {
        dictionaries,
        names: FxHashSet::default(),
        segments: Vec::new(),
        needs_messages: false,
    };
    let root = planner.node(expr);
    Plan {
        root,
        names: planner.names,
        segments: planner.segments,
        needs_messages: planner.needs_messages,
    }
}

struct Planner<'a, D> {
    dictionaries: &'a D,
    names: FxHashSet<u16>,
    segments: Vec<String>,
    needs_messages: bool,
}

fn seconds(window: Option<cible_lang::ast::Window>) -> Option<u32> {
    window.map(|w| (w.ms / 1000).clamp(1, i64::from(u32::MAX)) as u32)
}

impl<D: Dictionaries> Planner<'_, D> {
    fn node(&mut self, expr: &Expr) -> Node {
        match expr {
            Expr::And { args } => Node::And(args.iter().map(|a| self.node(a)).collect()),
            Expr::Or { args } => Node::Or(args.iter().map(|a| self.node(a)).collect()),
            Expr::Not { arg } => Node::Not(Box::new(self.node(arg))),
            Expr::Did { event, window } => Node::Did {
                filter: self.filter(event),
                window: seconds(*window),
            },
            Expr::Compare { left, cmp, right } => {
                let value = self.value(left);
                Node::Compare {
                    value,
                    test: PropTest {
                        kind: TestKind::Compare(*cmp, right.clone()),
                        passing_keys: None,
                    },
                }
            }
            Expr::In { left, values } => {
                let value = self.value(left);
                Node::Compare {
                    value,
                    test: PropTest {
                        kind: TestKind::In(values.clone()),
                        passing_keys: None,
                    },
                }
            }
            Expr::Sequence {
                first,
                then,
                negated,
                within,
            } => Node::Sequence {
                first: self.filter(first),
                then: self.filter(then),
                negated: *negated,
                within: seconds(Some(*within)).unwrap_or(1),
            },
            Expr::InSegment { segment, .. } => {
                self.segments.push(segment.clone());
                Node::InSegment(segment.clone())
            }
        }
    }

    fn value(&mut self, value: &Value) -> ValueNode {
        match value {
            Value::Count { event, window } => ValueNode::Count {
                filter: self.filter(event),
                window: seconds(*window),
            },
            Value::Sum(m) | Value::Avg(m) | Value::Min(m) | Value::Max(m) => {
                let kind = match value {
                    Value::Sum(_) => Aggregate::Sum,
                    Value::Avg(_) => Aggregate::Avg,
                    Value::Min(_) => Aggregate::Min,
                    _ => Aggregate::Max,
                };
                let property = self.property(&m.property);
                if property.value_index.is_none() {
                    self.needs_messages = true;
                }
                ValueNode::Aggregate {
                    kind,
                    filter: self.filter(&m.event),
                    property,
                    window: seconds(m.window),
                }
            }
            Value::DaysSince { event } => ValueNode::DaysSince {
                filter: self.filter(event),
                first: false,
            },
            Value::DaysSinceFirst { event } => ValueNode::DaysSince {
                filter: self.filter(event),
                first: true,
            },
            Value::DaysSinceFirstSeen => ValueNode::DaysSinceSeen { first: true },
            Value::DaysSinceLastSeen => ValueNode::DaysSinceSeen { first: false },
            Value::Attribute { name } if cible_lang::parser::consent_purpose(name).is_some() => {
                let purpose = cible_lang::parser::consent_purpose(name).unwrap_or_default();
                ValueNode::Consent(purpose.to_string())
            }
            Value::Attribute { name } if cible_lang::parser::is_computed(name) => {
                ValueNode::Computed(name.clone())
            }
            Value::Attribute { name } => {
                let path = name.split('.').skip(1).map(str::to_string).collect();
                ValueNode::Trait(path)
            }
        }
    }

    fn property(&self, path: &str) -> PropRef {
        PropRef {
            path: path.split('.').map(str::to_string).collect(),
            key_index: KEY_PROPERTIES.iter().position(|p| *p == path),
            value_index: VALUE_PROPERTIES.iter().position(|p| *p == path),
        }
    }

    fn filter(&mut self, filter: &EventFilter) -> Filter {
        let name = self
            .dictionaries
            .name_id(&filter.name)
            .filter(|id| *id != NO_NAME);
        if let Some(id) = name {
            self.names.insert(id);
        }
        let conditions = filter
            .conditions
            .iter()
            .map(|c| self.condition(c))
            .collect();
        Filter { name, conditions }
    }

    fn condition(&mut self, condition: &Condition) -> PropCondition {
        let property = self.property(&condition.property);
        let kind = match &condition.test {
            Test::Compare { cmp, value } => TestKind::Compare(*cmp, value.clone()),
            Test::In { values } => TestKind::In(values.clone()),
        };
        let mut test = PropTest {
            kind,
            passing_keys: None,
        };
        if property.key_index.is_some() {
            // Which key texts pass, computed once against the dictionary.
            let keys = self.dictionaries.keys();
            let passing = keys
                .iter()
                .enumerate()
                .filter(|(_, text)| test.passes(&Json::String((*text).clone())) == Some(true))
                .map(|(id, _)| id as u32)
                .collect();
            test.passing_keys = Some(passing);
        } else if property.value_index.is_none() {
            self.needs_messages = true;
        }
        PropCondition { property, test }
    }
}

/// Equality between a property (JSON) and a literal: text with text, numbers (or numeric text)
/// with numbers, booleans with booleans.
fn equals(value: &Json, literal: &Literal) -> bool {
    match literal {
        Literal::Str(text) => value.as_str() == Some(text.as_str()),
        Literal::Number(n) => number_of(value) == Some(*n),
        Literal::Bool(b) => value.as_bool() == Some(*b),
    }
}

impl PropTest {
    /// Whether a present value passes. `None` when the value cannot be compared (e.g. text
    /// against a number with `<`): the condition is then false.
    pub fn passes(&self, value: &Json) -> Option<bool> {
        match &self.kind {
            TestKind::In(values) => Some(values.iter().any(|literal| equals(value, literal))),
            TestKind::Compare(cmp, literal) => match cmp {
                Cmp::Eq => Some(equals(value, literal)),
                Cmp::Ne => Some(!equals(value, literal)),
                Cmp::Contains | Cmp::StartsWith => {
                    let (Some(text), Literal::Str(needle)) = (value.as_str(), literal) else {
                        return Some(false);
                    };
                    Some(if *cmp == Cmp::Contains {
                        text.contains(needle.as_str())
                    } else {
                        text.starts_with(needle.as_str())
                    })
                }
                Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge => {
                    let ordering = match literal {
                        Literal::Number(n) => number_of(value)?.partial_cmp(n)?,
                        Literal::Str(s) => value.as_str()?.cmp(s.as_str()),
                        Literal::Bool(_) => return Some(false),
                    };
                    Some(match cmp {
                        Cmp::Lt => ordering.is_lt(),
                        Cmp::Le => ordering.is_le(),
                        Cmp::Gt => ordering.is_gt(),
                        _ => ordering.is_ge(),
                    })
                }
            },
        }
    }

    /// The test on a number (a value computed from events, or a hot-row number).
    pub fn passes_number(&self, number: f64) -> bool {
        self.passes(&serde_json::Number::from_f64(number).map_or(Json::Null, Json::Number))
            == Some(true)
    }
}
