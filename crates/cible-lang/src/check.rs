//! Checks that need to know the store: unknown event names (a warning, with the closest known
//! name), unknown segments and models (errors), and cycles between segments.

use std::collections::{BTreeMap, BTreeSet};

use crate::ast::{EventFilter, Expr, Value};
use crate::diagnostics::{Code, Diagnostic, Span, closest};

/// What the store knows.
pub struct Catalog<'a> {
    pub event_names: &'a [String],
    pub segments: &'a [String],
    /// Trained models (`cluster`, `purchase_30d`...), for `cluster.*` and `predicted.*`.
    pub models: &'a [String],
    /// Consent purposes (`email`, `profiling`...), for `consent.*`.
    pub purposes: &'a [String],
}

/// Every attribute (`trait.plan`, `predicted.purchase_30d`) a rule reads.
pub fn attributes(expr: &Expr) -> Vec<&str> {
    let mut found = Vec::new();
    visit(expr, &mut |e| {
        if let Expr::Compare { left, .. } | Expr::In { left, .. } = e
            && let Value::Attribute { name } = left
        {
            found.push(name.as_str());
        }
    });
    found
}

/// Every event filter in a rule.
pub fn event_filters(expr: &Expr) -> Vec<&EventFilter> {
    let mut found = Vec::new();
    visit(expr, &mut |e| match e {
        Expr::Did { event, .. } => found.push(event),
        Expr::Sequence { first, then, .. } => found.extend([first, then]),
        Expr::Compare { left, .. } | Expr::In { left, .. } => match left {
            Value::Count { event, .. }
            | Value::DaysSince { event }
            | Value::DaysSinceFirst { event } => found.push(event),
            Value::Sum(m) | Value::Avg(m) | Value::Min(m) | Value::Max(m) => found.push(&m.event),
            Value::DaysSinceFirstSeen | Value::DaysSinceLastSeen | Value::Attribute { .. } => {}
        },
        _ => {}
    });
    found
}

/// Segments a rule refers to, with where.
pub fn segment_references(expr: &Expr) -> Vec<(String, Span)> {
    let mut found = Vec::new();
    visit(expr, &mut |e| {
        if let Expr::InSegment { segment, span } = e {
            found.push((segment.clone(), *span));
        }
    });
    found
}

fn visit<'a>(expr: &'a Expr, f: &mut impl FnMut(&'a Expr)) {
    f(expr);
    match expr {
        Expr::And { args } | Expr::Or { args } => args.iter().for_each(|a| visit(a, f)),
        Expr::Not { arg } => visit(arg, f),
        _ => {}
    }
}

/// Warnings for unknown event names, errors for unknown segments; located in `source`.
pub fn check(expr: &Expr, catalog: &Catalog<'_>, source: &str) -> Vec<Diagnostic> {
    let mut diagnostics = Vec::new();
    let known: BTreeSet<&str> = catalog.event_names.iter().map(String::as_str).collect();
    for filter in event_filters(expr) {
        if !known.contains(filter.name.as_str()) {
            let suggestion = closest(&filter.name, known.iter().copied()).map(|n| format!("{n:?}"));
            let message = format!("no event named {:?} has been received yet", filter.name);
            diagnostics.push(
                Diagnostic::warning(Code::UnknownEvent, filter.span, message).suggest(suggestion),
            );
        }
    }
    for (segment, span) in segment_references(expr) {
        if !catalog.segments.contains(&segment) {
            let suggestion = closest(&segment, catalog.segments.iter().map(String::as_str))
                .map(|n| format!("{n:?}"));
            diagnostics.push(
                Diagnostic::error(
                    Code::UnknownSegment,
                    span,
                    format!("there is no segment named {segment:?}"),
                )
                .suggest(suggestion),
            );
        }
    }
    for attribute in attributes(expr) {
        if let Some(purpose) = crate::parser::consent_purpose(attribute) {
            if !catalog.purposes.iter().any(|p| p == purpose) {
                let span = source
                    .find(attribute)
                    .map_or_else(Span::default, |at| Span::new(at, at + attribute.len()));
                let suggestion = closest(purpose, catalog.purposes.iter().map(String::as_str))
                    .map(|p| format!("`consent.{p}`"));
                diagnostics.push(
                    Diagnostic::error(
                        Code::UnknownPurpose,
                        span,
                        format!(
                            "{purpose:?} is not a consent purpose (add it to consent.toml's [purposes])"
                        ),
                    )
                    .suggest(suggestion),
                );
            }
            continue;
        }
        let model = match attribute.split_once('.') {
            Some(("cluster", _)) => "cluster",
            Some(("predicted", model)) => model,
            _ => continue,
        };
        if catalog.models.iter().any(|m| m == model) {
            continue;
        }
        // Attributes carry no span: point at the first place the name is written.
        let span = source
            .find(attribute)
            .map_or_else(Span::default, |at| Span::new(at, at + attribute.len()));
        let (message, suggestion) = if model == "cluster" {
            (
                "no cluster model is trained yet: run `cible model cluster`".to_string(),
                None,
            )
        } else {
            (
                format!(
                    "no model named {model:?} is trained: `cible model train --target <purchase|open|churn> --days N` trains <target>_<N>d"
                ),
                closest(model, catalog.models.iter().map(String::as_str))
                    .map(|m| format!("`predicted.{m}`")),
            )
        };
        diagnostics.push(Diagnostic::error(Code::UnknownModel, span, message).suggest(suggestion));
    }
    diagnostics.into_iter().map(|d| d.locate(source)).collect()
}

/// Segments in dependency order (those used by others first), or the first cycle found, named
/// in order (`a -> b -> a`).
pub fn dependency_order(
    dependencies: &BTreeMap<String, Vec<String>>,
) -> Result<Vec<String>, Vec<String>> {
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Visiting,
        Done,
    }
    fn walk(
        name: &str,
        dependencies: &BTreeMap<String, Vec<String>>,
        marks: &mut BTreeMap<String, Mark>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), Vec<String>> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::Visiting) => {
                let from = stack.iter().position(|s| s == name).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(name.to_string());
                return Err(cycle);
            }
            None => {}
        }
        marks.insert(name.to_string(), Mark::Visiting);
        stack.push(name.to_string());
        for dependency in dependencies.get(name).into_iter().flatten() {
            walk(dependency, dependencies, marks, stack, order)?;
        }
        stack.pop();
        marks.insert(name.to_string(), Mark::Done);
        order.push(name.to_string());
        Ok(())
    }
    let mut marks = BTreeMap::new();
    let mut order = Vec::new();
    for name in dependencies.keys() {
        walk(name, dependencies, &mut marks, &mut Vec::new(), &mut order)?;
    }
    Ok(order)
}
