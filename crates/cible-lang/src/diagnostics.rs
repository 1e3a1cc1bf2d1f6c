//! Diagnostics: numbered codes (never reused), spans, rendering with the source line and a
//! caret, and "did you mean" suggestions.

use serde::Serialize;

/// A byte range in the rule text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }

    pub fn to(self, other: Span) -> Span {
        Span::new(self.start.min(other.start), self.end.max(other.end))
    }
}

/// Every diagnostic the language can produce. The numbers are part of the API: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Code {
    UnexpectedCharacter = 1,
    UnterminatedString = 2,
    UnexpectedToken = 3,
    UnknownFunction = 4,
    MissingComparison = 5,
    InvalidWindow = 6,
    TooDeep = 7,
    TypeMismatch = 8,
    UnknownSegment = 9,
    SegmentCycle = 10,
    UnknownNamespace = 11,
    EmptyList = 12,
    InvalidJson = 13,
    UnknownModel = 14,
    WindowTooLong = 15,
    UnknownPurpose = 16,
    UnknownEvent = 101,
}

impl Code {
    /// `E004`, or `W101` for warnings.
    pub fn label(self) -> String {
        let n = self as u16;
        if n >= 100 {
            format!("W{n:03}")
        } else {
            format!("E{n:03}")
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in a rule, located.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    pub severity: Severity,
    #[serde(serialize_with = "serialize_code")]
    pub code: Code,
    pub message: String,
    pub span: Span,
    /// 1-based line and column of the span start, filled by [`Diagnostic::locate`].
    pub line: usize,
    pub column: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub suggestion: Option<String>,
}

fn serialize_code<S: serde::Serializer>(code: &Code, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&code.label())
}

impl Diagnostic {
    pub fn error(code: Code, span: Span, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            code,
            message: message.into(),
            span,
            line: 0,
            column: 0,
            suggestion: None,
        }
    }

    pub fn warning(code: Code, span: Span, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(code, span, message)
        }
    }

    pub fn suggest(mut self, suggestion: Option<String>) -> Self {
        self.suggestion = suggestion;
        self
    }

    /// Fills line and column from the source.
    pub fn locate(mut self, source: &str) -> Self {
        let start = self.span.start.min(source.len());
        let before = &source[..start];
        self.line = before.matches('\n').count() + 1;
        self.column = before.rfind('\n').map_or(before.chars().count(), |nl| {
            before[nl + 1..].chars().count()
        }) + 1;
        self
    }

    /// The diagnostic as a compiler would print it: message, position, the source line, a caret
    /// under the offending text, and the suggestion.
    pub fn render(&self, source: &str) -> String {
        let line_text = source
            .lines()
            .nth(self.line.saturating_sub(1))
            .unwrap_or("");
        let gutter = self.line.to_string();
        let pad = " ".repeat(gutter.len());
        let width = source
            .get(self.span.start..self.span.end.min(self.span.start + line_text.len()))
            .map_or(1, |text| {
                text.lines().next().unwrap_or("").chars().count().max(1)
            });
        let kind = match self.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        let mut out = format!(
            "{kind}[{}]: {}\n{pad}--> line {}, column {}\n{pad} |\n{gutter} | {line_text}\n{pad} | {}{}",
            self.code.label(),
            self.message,
            self.line,
            self.column,
            " ".repeat(self.column.saturating_sub(1)),
            "^".repeat(width)
        );
        if let Some(suggestion) = &self.suggestion {
            out.push_str(&format!("\n{pad} = help: did you mean {suggestion}?"));
        }
        out
    }
}

/// The closest candidate by edit distance, if close enough to be a plausible typo.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word_lower = word.to_lowercase();
    let limit = (word.chars().count() / 3).max(2);
    candidates
        .into_iter()
        .map(|candidate| {
            (
                edit_distance(&word_lower, &candidate.to_lowercase()),
                candidate,
            )
        })
        .filter(|(distance, _)| *distance <= limit)
        .min_by_key(|(distance, candidate)| (*distance, candidate.len()))
        .map(|(_, candidate)| candidate)
}

/// Levenshtein distance over chars.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut current = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let substitution = previous[j] + usize::from(ca != *cb);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_tolerate_typos_not_strangers() {
        assert_eq!(closest("cout", ["count", "did", "sum"]), Some("count"));
        assert_eq!(
            closest("Email Opend", ["Email Opened", "Order Completed"]),
            Some("Email Opened")
        );
        assert_eq!(closest("banana", ["count", "did"]), None);
    }
}
