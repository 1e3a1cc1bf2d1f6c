//! Tokens of the segment language, each with its byte span in the source.

use crate::diagnostics::{Code, Diagnostic, Span};

/// Comparison operators, in conditions and in comparisons of values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Cmp {
    #[serde(rename = "=")]
    Eq,
    #[serde(rename = "!=")]
    Ne,
    #[serde(rename = "<")]
    Lt,
    #[serde(rename = "<=")]
    Le,
    #[serde(rename = ">")]
    Gt,
    #[serde(rename = ">=")]
    Ge,
    #[serde(rename = "contains")]
    Contains,
    #[serde(rename = "starts_with")]
    StartsWith,
}

impl Cmp {
    pub fn symbol(self) -> &'static str {
        match self {
            Self::Eq => "=",
            Self::Ne => "!=",
            Self::Lt => "<",
            Self::Le => "<=",
            Self::Gt => ">",
            Self::Ge => ">=",
            Self::Contains => "contains",
            Self::StartsWith => "starts_with",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenKind {
    LParen,
    RParen,
    Comma,
    Dot,
    Cmp(Cmp),
    Str(String),
    Number(f64),
    /// A duration such as `7d`, in milliseconds.
    Duration(i64),
    Ident(String),
    Eof,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Token {
    pub kind: TokenKind,
    pub span: Span,
}

/// The longest window a rule may use, in days: ten years.
pub const MAX_WINDOW_DAYS: i64 = 3650;

/// [`MAX_WINDOW_DAYS`] in milliseconds.
pub const MAX_WINDOW_MS: i64 = MAX_WINDOW_DAYS * 86_400_000;

/// The words of every too-long-window message, by which the JSON form recognises one.
pub(crate) const TOO_LONG: &str = "is longer than";

/// Why a count and a unit are not a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WindowError {
    /// Not a whole number (`1.5d`, `-d`).
    NotWhole,
    /// Zero or negative.
    NotPositive,
    /// Over the limit ([`MAX_WINDOW_DAYS`] in rules), however large (even past 64 bits).
    TooLong,
}

impl WindowError {
    pub fn code(self) -> Code {
        match self {
            Self::NotWhole | Self::NotPositive => Code::InvalidWindow,
            Self::TooLong => Code::WindowTooLong,
        }
    }

    /// What is wrong with the window written `text`.
    pub fn message(self, text: &str) -> String {
        match self {
            Self::NotWhole => "a window is a whole number and a unit: 30m, 24h, 7d or 2w".into(),
            Self::NotPositive => "a window must be longer than zero".into(),
            Self::TooLong => {
                format!("`{text}` {TOO_LONG} the longest window, {MAX_WINDOW_DAYS}d (10 years)")
            }
        }
    }
}

/// The window of `count` (decimal digits) `unit`s, in milliseconds, checked: at least one unit,
/// at most `max_ms` ([`MAX_WINDOW_MS`] for rules); nothing overflows whatever the count.
pub fn window_ms(count: &str, unit: char, max_ms: i64) -> Result<i64, WindowError> {
    let unit_ms = unit_ms(unit).ok_or(WindowError::NotWhole)?;
    let count: i64 = count
        .parse()
        .map_err(|e: std::num::ParseIntError| match e.kind() {
            std::num::IntErrorKind::PosOverflow => WindowError::TooLong,
            std::num::IntErrorKind::NegOverflow => WindowError::NotPositive,
            _ => WindowError::NotWhole,
        })?;
    if count <= 0 {
        return Err(WindowError::NotPositive);
    }
    count
        .checked_mul(unit_ms)
        .filter(|ms| *ms <= max_ms)
        .ok_or(WindowError::TooLong)
}

/// Milliseconds per duration unit: minutes, hours, days, weeks.
pub fn unit_ms(unit: char) -> Option<i64> {
    Some(match unit {
        'm' => 60_000,
        'h' => 3_600_000,
        'd' => 86_400_000,
        'w' => 7 * 86_400_000,
        _ => return None,
    })
}

pub fn tokenize(source: &str) -> Result<Vec<Token>, Diagnostic> {
    let bytes = source.as_bytes();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        let start = i;
        match c {
            b' ' | b'\t' | b'\r' | b'\n' => {
                i += 1;
                continue;
            }
            b'-' if bytes.get(i + 1) == Some(&b'-') => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
                continue;
            }
            b'(' | b')' | b',' | b'.' => {
                i += 1;
                let kind = match c {
                    b'(' => TokenKind::LParen,
                    b')' => TokenKind::RParen,
                    b',' => TokenKind::Comma,
                    _ => TokenKind::Dot,
                };
                tokens.push(Token {
                    kind,
                    span: Span::new(start, i),
                });
                continue;
            }
            b'=' | b'!' | b'<' | b'>' => {
                let next = bytes.get(i + 1).copied();
                let (cmp, len) = match (c, next) {
                    (b'=', Some(b'=')) => (Cmp::Eq, 2),
                    (b'=', _) => (Cmp::Eq, 1),
                    (b'!', Some(b'=')) => (Cmp::Ne, 2),
                    (b'<', Some(b'=')) => (Cmp::Le, 2),
                    (b'<', Some(b'>')) => (Cmp::Ne, 2),
                    (b'<', _) => (Cmp::Lt, 1),
                    (b'>', Some(b'=')) => (Cmp::Ge, 2),
                    (b'>', _) => (Cmp::Gt, 1),
                    _ => {
                        return Err(Diagnostic::error(
                            Code::UnexpectedCharacter,
                            Span::new(start, start + 1),
                            "unexpected `!`; `!=` means not equal, `not` negates a condition",
                        ));
                    }
                };
                i += len;
                tokens.push(Token {
                    kind: TokenKind::Cmp(cmp),
                    span: Span::new(start, i),
                });
                continue;
            }
            b'"' | b'\'' => {
                let quote = c;
                i += 1;
                let mut text = String::new();
                loop {
                    match bytes.get(i) {
                        None => {
                            return Err(Diagnostic::error(
                                Code::UnterminatedString,
                                Span::new(start, source.len()),
                                "this string is never closed",
                            ));
                        }
                        Some(b'\\') if bytes.get(i + 1).is_some() => {
                            let escaped = source[i + 1..].chars().next().expect("checked");
                            text.push(match escaped {
                                'n' => '\n',
                                't' => '\t',
                                other => other,
                            });
                            i += 1 + escaped.len_utf8();
                        }
                        Some(&b) if b == quote => {
                            i += 1;
                            break;
                        }
                        Some(_) => {
                            let ch = source[i..].chars().next().expect("in bounds");
                            text.push(ch);
                            i += ch.len_utf8();
                        }
                    }
                }
                tokens.push(Token {
                    kind: TokenKind::Str(text),
                    span: Span::new(start, i),
                });
                continue;
            }
            b'0'..=b'9' | b'-' => {
                i += 1;
                while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
                    i += 1;
                }
                let text = &source[start..i];
                let unit = source[i..].chars().next();
                let after_unit = source[i..].chars().nth(1);
                if let Some(unit) = unit.filter(|u| unit_ms(*u).is_some())
                    && !after_unit.is_some_and(|c| c.is_alphanumeric() || c == '_')
                {
                    let span = Span::new(start, i + 1);
                    let ms = window_ms(text, unit, MAX_WINDOW_MS).map_err(|e| {
                        Diagnostic::error(e.code(), span, e.message(&source[start..i + 1]))
                    })?;
                    i += 1;
                    tokens.push(Token {
                        kind: TokenKind::Duration(ms),
                        span,
                    });
                    continue;
                }
                if unit.is_some_and(|c| c.is_alphabetic()) {
                    let end = i + source[i..]
                        .find(|c: char| !c.is_alphanumeric())
                        .unwrap_or(source.len() - i);
                    return Err(Diagnostic::error(
                        Code::InvalidWindow,
                        Span::new(start, end),
                        format!(
                            "`{}` is not a window; use a unit of m, h, d or w (e.g. 7d)",
                            &source[start..end]
                        ),
                    ));
                }
                let value: f64 = text.parse().map_err(|_| {
                    Diagnostic::error(
                        Code::UnexpectedCharacter,
                        Span::new(start, i),
                        format!("`{text}` is not a number"),
                    )
                })?;
                tokens.push(Token {
                    kind: TokenKind::Number(value),
                    span: Span::new(start, i),
                });
                continue;
            }
            _ => {}
        }
        let ch = source[i..].chars().next().expect("in bounds");
        if ch.is_alphabetic() || ch == '_' {
            let end = i + source[i..]
                .find(|c: char| !(c.is_alphanumeric() || c == '_'))
                .unwrap_or(source.len() - i);
            tokens.push(Token {
                kind: TokenKind::Ident(source[i..end].to_string()),
                span: Span::new(i, end),
            });
            i = end;
            continue;
        }
        return Err(Diagnostic::error(
            Code::UnexpectedCharacter,
            Span::new(i, i + ch.len_utf8()),
            format!("unexpected character `{ch}`"),
        ));
    }
    tokens.push(Token {
        kind: TokenKind::Eof,
        span: Span::new(source.len(), source.len()),
    });
    Ok(tokens)
}
