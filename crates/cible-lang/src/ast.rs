//! The syntax tree of a segment rule. It is also the rule's JSON form (`serde`), accepted by the
//! API as an alternative to the text; [`std::fmt::Display`] prints it back as canonical text.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::diagnostics::Span;
pub use crate::lexer::Cmp;
use crate::lexer::WindowError;

/// A boolean condition on a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Expr {
    And {
        args: Vec<Expr>,
    },
    Or {
        args: Vec<Expr>,
    },
    Not {
        arg: Box<Expr>,
    },
    /// At least one matching event in the window (all history without a window).
    Did {
        event: EventFilter,
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "optional_window"
        )]
        window: Option<Window>,
    },
    /// A value compared with a literal.
    Compare {
        left: Value,
        cmp: Cmp,
        right: Literal,
    },
    /// A value equal to one of the literals.
    In {
        left: Value,
        values: Vec<Literal>,
    },
    /// `first then second within W`: a `first` event followed, within W, by a `second` event
    /// (`negated`: followed by none, the W having fully elapsed).
    Sequence {
        first: EventFilter,
        then: EventFilter,
        #[serde(default)]
        negated: bool,
        #[serde(deserialize_with = "within")]
        within: Window,
    },
    /// Membership of another segment.
    InSegment {
        segment: String,
        #[serde(skip)]
        span: Span,
    },
}

/// A number or text computed from a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "fn", rename_all = "snake_case")]
pub enum Value {
    /// Matching events in the window.
    Count {
        event: EventFilter,
        #[serde(
            default,
            skip_serializing_if = "Option::is_none",
            deserialize_with = "optional_window"
        )]
        window: Option<Window>,
    },
    /// Sum of a property over matching events; a missing property counts as 0.
    Sum(Measure),
    /// Average of a property over matching events that have it.
    Avg(Measure),
    Min(Measure),
    Max(Measure),
    /// Days (fractional) since the last matching event; no value if there is none.
    DaysSince {
        event: EventFilter,
    },
    /// Days since the first matching event.
    DaysSinceFirst {
        event: EventFilter,
    },
    /// Days since the profile's first event of any kind.
    DaysSinceFirstSeen,
    /// Days since the profile's last event of any kind.
    DaysSinceLastSeen,
    /// A profile attribute: `trait.plan` today; computed traits (`score.engagement`, ...) later.
    Attribute {
        name: String,
    },
}

/// The event and property an aggregate reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Measure {
    pub event: EventFilter,
    pub property: String,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "optional_window"
    )]
    pub window: Option<Window>,
}

/// An event name and conditions on its properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    pub name: String,
    #[serde(default, rename = "where", skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    #[serde(skip)]
    pub span: Span,
}

/// A condition on one event property.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub property: String,
    #[serde(flatten)]
    pub test: Test,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Test {
    Compare {
        cmp: Cmp,
        value: Literal,
    },
    In {
        #[serde(rename = "in")]
        values: Vec<Literal>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Literal {
    Bool(bool),
    Number(f64),
    Str(String),
}

/// A relative time window, in milliseconds; written `30m`, `24h`, `7d`, `2w`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub ms: i64,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Days rather than weeks: rules speak of 7d, 30d, 365d.
        for (unit, ms) in [('d', 86_400_000), ('h', 3_600_000), ('m', 60_000)] {
            if self.ms % ms == 0 {
                return write!(f, "{}{unit}", self.ms / ms);
            }
        }
        write!(f, "{}m", self.ms / 60_000)
    }
}

impl Serialize for Window {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Window {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse_window(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses `7d`-style text; the error says what is wrong. This is the stored form's reading too,
/// so it accepts any window whose milliseconds fit in 64 bits (a rule saved before the ten-year
/// limit still loads); [`crate::from_json`] applies [`crate::lexer::MAX_WINDOW_DAYS`].
pub fn parse_window(text: &str) -> Result<Window, String> {
    let unit = text
        .chars()
        .last()
        .filter(|u| crate::lexer::unit_ms(*u).is_some());
    let Some(unit) = unit else {
        return Err(format!("{text:?} is not a window: use 30m, 24h, 7d or 2w"));
    };
    match crate::lexer::window_ms(&text[..text.len() - unit.len_utf8()], unit, i64::MAX) {
        Ok(ms) => Ok(Window { ms }),
        Err(WindowError::NotWhole) => {
            Err(format!("{text:?} is not a window: use 30m, 24h, 7d or 2w"))
        }
        Err(e) => Err(e.message(text)),
    }
}

/// A window field of the JSON form; an error names the field (`window` or `within`).
fn window_field<'de, D: serde::Deserializer<'de>>(
    field: &str,
    deserializer: D,
) -> Result<Window, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_window(&text).map_err(|e| serde::de::Error::custom(format!("`{field}`: {e}")))
}

fn optional_window<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Window>, D::Error> {
    let text: Option<String> = Option::deserialize(deserializer)?;
    text.map(|text| {
        window_field(
            "window",
            serde::de::value::StrDeserializer::<D::Error>::new(&text),
        )
    })
    .transpose()
}

fn within<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Window, D::Error> {
    window_field("within", deserializer)
}

impl Expr {
    /// Every window of the rule with the name of its JSON field (`window` or `within`).
    pub fn windows(&self) -> Vec<(&'static str, Window)> {
        fn value_window(value: &Value) -> Option<Window> {
            match value {
                Value::Count { window, .. } => *window,
                Value::Sum(m) | Value::Avg(m) | Value::Min(m) | Value::Max(m) => m.window,
                _ => None,
            }
        }
        let mut found = Vec::new();
        let mut stack = vec![self];
        while let Some(expr) = stack.pop() {
            match expr {
                Self::And { args } | Self::Or { args } => stack.extend(args.iter().rev()),
                Self::Not { arg } => stack.push(arg),
                Self::Did { window, .. } => found.extend(window.map(|w| ("window", w))),
                Self::Compare { left, .. } | Self::In { left, .. } => {
                    found.extend(value_window(left).map(|w| ("window", w)));
                }
                Self::Sequence { within, .. } => found.push(("within", *within)),
                Self::InSegment { .. } => {}
            }
        }
        found
    }
}

/// A string as the lexer reads it back: `"` and `\\` escaped, newline and tab as `\n` and
/// `\t`, everything else as itself (the language has no `\u` escape; a JSON-style one
/// would read back as other text, as the fuzzer found).
fn quote(text: &str) -> String {
    let mut quoted = String::with_capacity(text.len() + 2);
    quoted.push('"');
    for c in text.chars() {
        match c {
            '"' => quoted.push_str("\\\""),
            '\\' => quoted.push_str("\\\\"),
            '\n' => quoted.push_str("\\n"),
            '\t' => quoted.push_str("\\t"),
            other => quoted.push(other),
        }
    }
    quoted.push('"');
    quoted
}

impl fmt::Display for Literal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Bool(b) => write!(f, "{b}"),
            Self::Number(n) => write!(f, "{n}"),
            Self::Str(s) => write!(f, "{}", quote(s)),
        }
    }
}

fn list(values: &[Literal]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl fmt::Display for EventFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", quote(&self.name))?;
        for (i, condition) in self.conditions.iter().enumerate() {
            write!(f, "{}{condition}", if i == 0 { " where " } else { " and " })?;
        }
        Ok(())
    }
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.test {
            Test::Compare { cmp, value } => write!(f, "{} {} {value}", self.property, cmp.symbol()),
            Test::In { values } => write!(f, "{} in ({})", self.property, list(values)),
        }
    }
}

fn window_arg(window: &Option<Window>) -> String {
    window.map(|w| format!(", {w}")).unwrap_or_default()
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let measure = |f: &mut fmt::Formatter<'_>, name: &str, m: &Measure| {
            let conditions = &m.event.conditions;
            write!(f, "{name}({}.{}", quote(&m.event.name), m.property)?;
            for (i, condition) in conditions.iter().enumerate() {
                write!(f, "{}{condition}", if i == 0 { " where " } else { " and " })?;
            }
            write!(f, "{})", window_arg(&m.window))
        };
        match self {
            Self::Count { event, window } => write!(f, "count({event}{})", window_arg(window)),
            Self::Sum(m) => measure(f, "sum", m),
            Self::Avg(m) => measure(f, "avg", m),
            Self::Min(m) => measure(f, "min", m),
            Self::Max(m) => measure(f, "max", m),
            Self::DaysSince { event } => write!(f, "days_since({event})"),
            Self::DaysSinceFirst { event } => write!(f, "days_since_first({event})"),
            Self::DaysSinceFirstSeen => write!(f, "days_since_first_seen()"),
            Self::DaysSinceLastSeen => write!(f, "days_since_last_seen()"),
            Self::Attribute { name } => write!(f, "{name}"),
        }
    }
}

impl Expr {
    fn precedence(&self) -> u8 {
        match self {
            Self::Or { .. } => 1,
            Self::And { .. } => 2,
            _ => 3,
        }
    }

    fn write_child(&self, f: &mut fmt::Formatter<'_>, child: &Expr) -> fmt::Result {
        if child.precedence() < self.precedence()
            || (matches!(self, Self::Not { .. }) && child.precedence() < 3)
        {
            write!(f, "({child})")
        } else {
            write!(f, "{child}")
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::And { args } | Self::Or { args } => {
                let joiner = if matches!(self, Self::And { .. }) {
                    " and "
                } else {
                    " or "
                };
                for (i, arg) in args.iter().enumerate() {
                    if i > 0 {
                        f.write_str(joiner)?;
                    }
                    self.write_child(f, arg)?;
                }
                Ok(())
            }
            Self::Not { arg } => {
                f.write_str("not ")?;
                self.write_child(f, arg)
            }
            Self::Did { event, window } => write!(f, "did({event}{})", window_arg(window)),
            Self::Compare { left, cmp, right } => write!(f, "{left} {} {right}", cmp.symbol()),
            Self::In { left, values } => write!(f, "{left} in ({})", list(values)),
            Self::Sequence {
                first,
                then,
                negated,
                within,
            } => {
                let not = if *negated { "not " } else { "" };
                write!(f, "{first} then {not}{then} within {within}")
            }
            Self::InSegment { segment, .. } => write!(f, "in_segment({})", quote(segment)),
        }
    }
}
