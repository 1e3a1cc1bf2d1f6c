//! Compilation of a rule to SQL (SQLite dialect, with its JSON functions) over the documented
//! table layout, so results can be checked against, or run on, an external SQL engine:
//!
//! ```sql
//! CREATE TABLE events (profile INTEGER, ts INTEGER,   -- seconds since the epoch, UTC
//!                      event TEXT,                   -- NULL for identify, alias, group
//!                      properties TEXT);             -- JSON object
//! CREATE TABLE profiles (profile INTEGER PRIMARY KEY, traits TEXT,   -- JSON object
//!                        computed TEXT);                               -- computed traits, JSON
//! CREATE TABLE segment_members (segment TEXT, profile INTEGER);
//! ```
//!
//! The query selects `profile` from `profiles`. It has the meaning the engine gives the rule:
//! windows `now - W < ts <= now`, a missing property fails every condition, a comparison with
//! no value is false (never NULL, so `not` behaves), `sum` counts missing values as 0.

use std::fmt::Write;

use crate::ast::{Cmp, Condition, EventFilter, Expr, Literal, Measure, Test, Value, Window};

/// The SQL engines the compiler writes for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// SQLite with its JSON1 functions.
    Sqlite,
    /// DuckDB with its json extension.
    DuckDb,
}

/// The SQL (SQLite dialect) selecting a rule's members at `now` (seconds since the epoch).
pub fn to_sql(expr: &Expr, now: i64) -> String {
    to_sql_for(expr, now, Dialect::Sqlite)
}

/// The SQL selecting a rule's members at `now`, for one dialect.
pub fn to_sql_for(expr: &Expr, now: i64, dialect: Dialect) -> String {
    let compiler = Compiler { now, dialect };
    format!(
        "SELECT p.profile FROM profiles p WHERE {}",
        compiler.expr(expr)
    )
}

struct Compiler {
    now: i64,
    dialect: Dialect,
}

fn text(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

/// A JSON path for a dotted property, each part quoted.
fn path(property: &str) -> String {
    let parts: Vec<String> = property
        .split('.')
        .map(|p| format!("\"{}\"", p.replace('"', "\\\"")))
        .collect();
    text(&format!("$.{}", parts.join(".")))
}

fn number(n: f64) -> String {
    if n.fract() == 0.0 && n.abs() < 1e15 {
        format!("{}", n as i64)
    } else {
        format!("{n:?}")
    }
}

/// SQL for the JSON value at `path` in `column`: tests of its type, its text, and its value as
/// a number (JSON numbers, and text that reads as a number).
struct Json {
    present: String,
    is_text: String,
    text: String,
    number: String,
    is_true: String,
    is_false: String,
}

fn json(column: &str, property: &str, dialect: Dialect) -> Json {
    let path = path(property);
    match dialect {
        Dialect::Sqlite => {
            let kind = format!("json_type({column}, {path})");
            let value = format!("json_extract({column}, {path})");
            Json {
                present: format!("({kind} IS NOT NULL AND {kind} <> 'null')"),
                is_text: format!("{kind} = 'text'"),
                number: format!(
                    "(CASE {kind} WHEN 'integer' THEN {value} WHEN 'real' THEN {value} \
                     WHEN 'text' THEN (CASE WHEN trim({value}) <> '' AND trim({value}) NOT GLOB '*[^0-9.eE+-]*' \
                     THEN CAST(trim({value}) AS REAL) END) END)"
                ),
                is_true: format!("{kind} = 'true'"),
                is_false: format!("{kind} = 'false'"),
                text: value,
            }
        }
        Dialect::DuckDb => {
            let kind = format!("json_type({column}, {path})");
            let value = format!("json_extract_string({column}, {path})");
            Json {
                present: format!("({kind} IS NOT NULL AND {kind} <> 'NULL')"),
                is_text: format!("{kind} = 'VARCHAR'"),
                number: format!(
                    "(CASE WHEN {kind} IN ('BIGINT', 'UBIGINT', 'DOUBLE', 'HUGEINT') THEN CAST({value} AS DOUBLE) \
                     WHEN {kind} = 'VARCHAR' THEN TRY_CAST(trim({value}) AS DOUBLE) END)"
                ),
                is_true: format!("({kind} = 'BOOLEAN' AND {value} = 'true')"),
                is_false: format!("({kind} = 'BOOLEAN' AND {value} = 'false')"),
                text: value,
            }
        }
    }
}

fn equals(j: &Json, literal: &Literal) -> String {
    match literal {
        Literal::Str(s) => format!("({} AND {} = {})", j.is_text, j.text, text(s)),
        Literal::Number(n) => format!("COALESCE({} = {}, false)", j.number, number(*n)),
        Literal::Bool(true) => format!("({})", j.is_true),
        Literal::Bool(false) => format!("({})", j.is_false),
    }
}

/// A condition on a JSON value (an event property or a trait).
fn test_json(j: &Json, test: &Test) -> String {
    match test {
        Test::In { values } => format!(
            "({})",
            values
                .iter()
                .map(|v| equals(j, v))
                .collect::<Vec<_>>()
                .join(" OR ")
        ),
        Test::Compare { cmp, value } => match cmp {
            Cmp::Eq => equals(j, value),
            Cmp::Ne => format!("({} AND NOT {})", j.present, equals(j, value)),
            Cmp::Contains | Cmp::StartsWith => {
                let Literal::Str(needle) = value else {
                    return "false".into();
                };
                let needle = text(needle);
                let found = if *cmp == Cmp::Contains {
                    format!("instr({}, {needle}) > 0", j.text)
                } else {
                    format!("substr({}, 1, length({needle})) = {needle}", j.text)
                };
                format!("({} AND {found})", j.is_text)
            }
            Cmp::Lt | Cmp::Le | Cmp::Gt | Cmp::Ge => {
                let op = cmp.symbol();
                match value {
                    Literal::Number(n) => {
                        format!("COALESCE({} {op} {}, false)", j.number, number(*n))
                    }
                    Literal::Str(s) => format!("({} AND {} {op} {})", j.is_text, j.text, text(s)),
                    Literal::Bool(_) => "false".into(),
                }
            }
        },
    }
}

impl Compiler {
    fn window(&self, window: Option<Window>) -> String {
        match window {
            Some(w) => format!("e.ts > {} AND e.ts <= {}", self.now - w.ms / 1000, self.now),
            None => format!("e.ts <= {}", self.now),
        }
    }

    fn filter(&self, filter: &EventFilter) -> String {
        let mut sql = format!("e.profile = p.profile AND e.event = {}", text(&filter.name));
        for Condition { property, test } in &filter.conditions {
            let _ = write!(
                sql,
                " AND {}",
                test_json(&json("e.properties", property, self.dialect), test)
            );
        }
        sql
    }

    fn events(&self, select: &str, filter: &EventFilter, window: Option<Window>) -> String {
        format!(
            "(SELECT {select} FROM events e WHERE {} AND {})",
            self.filter(filter),
            self.window(window)
        )
    }

    fn measure(&self, function: &str, measure: &Measure, zero_for_missing: bool) -> String {
        let n = json("e.properties", &measure.property, self.dialect).number;
        let value = if zero_for_missing {
            format!("COALESCE(SUM(COALESCE({n}, 0)), 0)")
        } else {
            format!("{function}({n})")
        };
        self.events(&value, &measure.event, measure.window)
    }

    /// A value as a number expression (NULL when it has none), or the JSON of a trait.
    fn value(&self, value: &Value) -> Result<String, Box<Json>> {
        let now = self.now;
        Ok(match value {
            Value::Count { event, window } => self.events("COUNT(*)", event, *window),
            Value::Sum(m) => self.measure("SUM", m, true),
            Value::Avg(m) => self.measure("AVG", m, false),
            Value::Min(m) => self.measure("MIN", m, false),
            Value::Max(m) => self.measure("MAX", m, false),
            Value::DaysSince { event } => format!(
                "(({now} - {}) / 86400.0)",
                self.events("MAX(e.ts)", event, None)
            ),
            Value::DaysSinceFirst { event } => format!(
                "(({now} - {}) / 86400.0)",
                self.events("MIN(e.ts)", event, None)
            ),
            Value::DaysSinceFirstSeen | Value::DaysSinceLastSeen => {
                let function = if matches!(value, Value::DaysSinceFirstSeen) {
                    "MIN"
                } else {
                    "MAX"
                };
                format!(
                    "(({now} - (SELECT {function}(e.ts) FROM events e WHERE e.profile = p.profile AND e.ts <= {now})) / 86400.0)"
                )
            }
            Value::Attribute { name } => {
                // Profile traits in `traits`; computed traits, as `cible export profiles` writes
                // them, in `computed`.
                if let Some(purpose) = crate::parser::consent_purpose(name) {
                    // `cible export profiles` writes every purpose, true or false.
                    return Err(Box::new(json("p.consents", purpose, self.dialect)));
                }
                return Err(Box::new(match name.strip_prefix("trait.") {
                    Some(property) => json("p.traits", property, self.dialect),
                    None => json("p.computed", name, self.dialect),
                }));
            }
        })
    }

    fn expr(&self, expr: &Expr) -> String {
        match expr {
            Expr::And { args } | Expr::Or { args } => {
                let joiner = if matches!(expr, Expr::And { .. }) {
                    " AND "
                } else {
                    " OR "
                };
                format!(
                    "({})",
                    args.iter()
                        .map(|a| self.expr(a))
                        .collect::<Vec<_>>()
                        .join(joiner)
                )
            }
            Expr::Not { arg } => format!("(NOT {})", self.expr(arg)),
            Expr::Did { event, window } => format!("EXISTS {}", self.events("1", event, *window)),
            Expr::Compare { left, cmp, right } => match self.value(left) {
                Ok(sql) => {
                    let Literal::Number(n) = right else {
                        return "false".into();
                    };
                    let op = if *cmp == Cmp::Ne { "<>" } else { cmp.symbol() };
                    format!("COALESCE({sql} {op} {}, false)", number(*n))
                }
                Err(json) => test_json(
                    &json,
                    &Test::Compare {
                        cmp: *cmp,
                        value: right.clone(),
                    },
                ),
            },
            Expr::In { left, values } => match self.value(left) {
                Ok(sql) => {
                    let list: Vec<String> = values
                        .iter()
                        .filter_map(|v| {
                            if let Literal::Number(n) = v {
                                Some(number(*n))
                            } else {
                                None
                            }
                        })
                        .collect();
                    format!("COALESCE({sql} IN ({}), false)", list.join(", "))
                }
                Err(json) => test_json(
                    &json,
                    &Test::In {
                        values: values.clone(),
                    },
                ),
            },
            Expr::Sequence {
                first,
                then,
                negated,
                within,
            } => {
                let now = self.now;
                let last = self.events("MAX(e.ts)", first, None);
                let within = within.ms / 1000;
                let followed = format!(
                    "EXISTS (SELECT 1 FROM events e WHERE {} AND e.ts > {last} AND e.ts <= {last} + {within} AND e.ts <= {now})",
                    self.filter(then)
                );
                if *negated {
                    format!(
                        "({last} IS NOT NULL AND NOT {followed} AND {now} >= {last} + {within})"
                    )
                } else {
                    followed
                }
            }
            Expr::InSegment { segment, .. } => format!(
                "EXISTS (SELECT 1 FROM segment_members s WHERE s.segment = {} AND s.profile = p.profile)",
                text(segment)
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_and_escapes() {
        let sql = to_sql(&crate::parse(r#"did("O'Brien", 1d)"#).unwrap(), 1_000_000);
        assert!(sql.contains("e.event = 'O''Brien'"), "{sql}");
        assert!(sql.contains("e.ts > 913600 AND e.ts <= 1000000"), "{sql}");
    }
}
