//! Recursive-descent parser from tokens to [`Expr`], with type checks that need no catalog
//! (counts compare with numbers, a function is followed by a comparison).

use crate::ast::{Cmp, Condition, EventFilter, Expr, Literal, Measure, Test, Value, Window};
use crate::diagnostics::{Code, Diagnostic, Span, closest};
use crate::lexer::{Token, TokenKind, tokenize};

/// Deepest nesting of parentheses and `not` accepted.
pub const MAX_DEPTH: usize = 64;

/// Every function name, for suggestions.
pub const FUNCTIONS: [&str; 11] = [
    "did",
    "count",
    "sum",
    "avg",
    "min",
    "max",
    "days_since",
    "days_since_first",
    "days_since_first_seen",
    "days_since_last_seen",
    "in_segment",
];

/// Attribute namespaces: `trait.x` reads a profile trait, `consent.x` whether the profile
/// granted purpose x (and has not withdrawn it since); the others are computed traits.
pub const NAMESPACES: [&str; 9] = [
    "trait",
    "consent",
    "score",
    "rfm",
    "intent",
    "send_time",
    "affinity",
    "cluster",
    "predicted",
];

/// The computed traits a rule can read (computed by cible from each profile's events).
pub const COMPUTED: [&str; 17] = [
    "score.engagement",
    "rfm.segment",
    "rfm.score",
    "rfm.r",
    "rfm.f",
    "rfm.m",
    "rfm.frequency",
    "rfm.monetary",
    "intent.level",
    "intent.score",
    "intent.category",
    "lifecycle",
    "send_time.hour",
    "send_time.weekday",
    "affinity.category",
    "cluster.id",
    "cluster.name",
];

/// Whether an attribute is a computed trait rather than a `trait.` profile trait or a
/// `consent.` purpose.
pub fn is_computed(name: &str) -> bool {
    !name.starts_with("trait.") && consent_purpose(name).is_none()
}

/// The purpose a `consent.<purpose>` attribute reads.
pub fn consent_purpose(name: &str) -> Option<&str> {
    name.strip_prefix("consent.")
}

pub fn parse(source: &str) -> Result<Expr, Diagnostic> {
    let tokens = tokenize(source).map_err(|d| d.locate(source))?;
    let mut parser = Parser {
        tokens,
        at: 0,
        depth: 0,
    };
    let expr = parser.or_expr().map_err(|d| d.locate(source))?;
    let next = parser.peek();
    if next.kind != TokenKind::Eof {
        let message = format!(
            "unexpected {} after a complete condition; join conditions with `and` or `or`",
            describe(&next.kind)
        );
        return Err(Diagnostic::error(Code::UnexpectedToken, next.span, message).locate(source));
    }
    Ok(expr)
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
}

type Parsed<T> = Result<T, Diagnostic>;

fn describe(kind: &TokenKind) -> String {
    match kind {
        TokenKind::LParen => "`(`".into(),
        TokenKind::RParen => "`)`".into(),
        TokenKind::Comma => "`,`".into(),
        TokenKind::Dot => "`.`".into(),
        TokenKind::Cmp(cmp) => format!("`{}`", cmp.symbol()),
        TokenKind::Str(s) => format!("the string {s:?}"),
        TokenKind::Number(n) => format!("the number {n}"),
        TokenKind::Duration(_) => "a window".into(),
        TokenKind::Ident(name) => format!("`{name}`"),
        TokenKind::Eof => "the end of the rule".into(),
    }
}

impl Parser {
    fn peek(&self) -> Token {
        self.tokens[self.at.min(self.tokens.len() - 1)].clone()
    }

    fn peek_kind(&self) -> &TokenKind {
        &self.tokens[self.at.min(self.tokens.len() - 1)].kind
    }

    fn bump(&mut self) -> Token {
        let token = self.peek();
        if self.at < self.tokens.len() - 1 {
            self.at += 1;
        }
        token
    }

    fn is_keyword(&self, word: &str) -> bool {
        matches!(self.peek_kind(), TokenKind::Ident(name) if name == word)
    }

    fn eat_keyword(&mut self, word: &str) -> bool {
        let found = self.is_keyword(word);
        if found {
            self.bump();
        }
        found
    }

    fn expect(&mut self, kind: TokenKind, what: &str) -> Parsed<Span> {
        let token = self.peek();
        if token.kind == kind {
            self.bump();
            Ok(token.span)
        } else {
            Err(Diagnostic::error(
                Code::UnexpectedToken,
                token.span,
                format!("expected {what}, found {}", describe(&token.kind)),
            ))
        }
    }

    fn enter(&mut self, span: Span) -> Parsed<()> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(Diagnostic::error(
                Code::TooDeep,
                span,
                format!("the rule nests deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    fn or_expr(&mut self) -> Parsed<Expr> {
        let mut args = vec![self.and_expr()?];
        while self.eat_keyword("or") {
            args.push(self.and_expr()?);
        }
        Ok(if args.len() == 1 {
            args.pop().expect("one")
        } else {
            Expr::Or { args }
        })
    }

    fn and_expr(&mut self) -> Parsed<Expr> {
        let mut args = vec![self.unary()?];
        while self.eat_keyword("and") {
            args.push(self.unary()?);
        }
        Ok(if args.len() == 1 {
            args.pop().expect("one")
        } else {
            Expr::And { args }
        })
    }

    fn unary(&mut self) -> Parsed<Expr> {
        let token = self.peek();
        if self.eat_keyword("not") {
            self.enter(token.span)?;
            let arg = self.unary()?;
            self.depth -= 1;
            return Ok(Expr::Not { arg: Box::new(arg) });
        }
        self.primary()
    }

    fn primary(&mut self) -> Parsed<Expr> {
        let token = self.peek();
        match token.kind.clone() {
            TokenKind::LParen => {
                self.bump();
                self.enter(token.span)?;
                let expr = self.or_expr()?;
                self.depth -= 1;
                self.expect(TokenKind::RParen, "`)` closing the parenthesis")?;
                Ok(expr)
            }
            TokenKind::Str(_) => self.sequence(),
            TokenKind::Ident(name) => match name.as_str() {
                "did" => {
                    self.bump();
                    self.expect(TokenKind::LParen, "`(` after did")?;
                    let event = self.event_filter()?;
                    let window = self.optional_window()?;
                    self.expect(TokenKind::RParen, "`)` closing did(...)")?;
                    Ok(Expr::Did { event, window })
                }
                "in_segment" => {
                    self.bump();
                    self.expect(TokenKind::LParen, "`(` after in_segment")?;
                    let name = self.peek();
                    let TokenKind::Str(segment) = name.kind else {
                        return Err(Diagnostic::error(
                            Code::UnexpectedToken,
                            name.span,
                            "in_segment takes a segment name in quotes, e.g. in_segment(\"vip\")",
                        ));
                    };
                    self.bump();
                    self.expect(TokenKind::RParen, "`)` closing in_segment(...)")?;
                    Ok(Expr::InSegment {
                        segment,
                        span: name.span,
                    })
                }
                "true" | "false" => Err(Diagnostic::error(
                    Code::UnexpectedToken,
                    token.span,
                    "a condition cannot be a bare boolean; compare a value, e.g. trait.vip = true",
                )),
                _ => {
                    let (value, span) = self.value()?;
                    self.comparison(value, span)
                }
            },
            other => Err(Diagnostic::error(
                Code::UnexpectedToken,
                token.span,
                format!(
                    "expected a condition (did(...), count(...) >= n, trait.x = ..., \"A\" then \"B\" within 1d), found {}",
                    describe(&other)
                ),
            )),
        }
    }

    /// `"A" [where ...] then [not] "B" [where ...] within W`.
    fn sequence(&mut self) -> Parsed<Expr> {
        let first = self.event_filter()?;
        if !self.eat_keyword("then") {
            let next = self.peek();
            let message = format!(
                "an event name alone is not a condition; write did({}) or a sequence \"A\" then \"B\" within 1d",
                crate::ast::Literal::Str(first.name.clone())
            );
            return Err(Diagnostic::error(
                Code::UnexpectedToken,
                first.span.to(next.span),
                message,
            ));
        }
        let negated = self.eat_keyword("not");
        let then = self.event_filter()?;
        if !self.eat_keyword("within") {
            let next = self.peek();
            return Err(Diagnostic::error(
                Code::UnexpectedToken,
                next.span,
                "a sequence needs `within` and a window, e.g. within 24h",
            ));
        }
        let token = self.peek();
        let TokenKind::Duration(ms) = token.kind else {
            return Err(Diagnostic::error(
                Code::InvalidWindow,
                token.span,
                "expected a window after `within`, e.g. 24h or 7d",
            ));
        };
        self.bump();
        Ok(Expr::Sequence {
            first,
            then,
            negated,
            within: Window { ms },
        })
    }

    fn event_filter(&mut self) -> Parsed<EventFilter> {
        let token = self.peek();
        let TokenKind::Str(name) = token.kind else {
            return Err(Diagnostic::error(
                Code::UnexpectedToken,
                token.span,
                format!(
                    "expected an event name in quotes, e.g. \"Order Completed\", found {}",
                    describe(&token.kind)
                ),
            ));
        };
        self.bump();
        let mut filter = EventFilter {
            name,
            conditions: Vec::new(),
            span: token.span,
        };
        filter.conditions = self.where_clause()?;
        Ok(filter)
    }

    fn where_clause(&mut self) -> Parsed<Vec<Condition>> {
        let mut conditions = Vec::new();
        if self.eat_keyword("where") {
            conditions.push(self.condition()?);
            while self.eat_keyword("and") {
                conditions.push(self.condition()?);
            }
        }
        Ok(conditions)
    }

    fn property_path(&mut self) -> Parsed<(String, Span)> {
        let token = self.peek();
        let TokenKind::Ident(mut path) = token.kind else {
            return Err(Diagnostic::error(
                Code::UnexpectedToken,
                token.span,
                format!("expected a property name, found {}", describe(&token.kind)),
            ));
        };
        self.bump();
        let mut span = token.span;
        while *self.peek_kind() == TokenKind::Dot {
            self.bump();
            let part = self.peek();
            let TokenKind::Ident(name) = part.kind else {
                return Err(Diagnostic::error(
                    Code::UnexpectedToken,
                    part.span,
                    "expected a property name after `.`",
                ));
            };
            self.bump();
            path.push('.');
            path.push_str(&name);
            span = span.to(part.span);
        }
        Ok((path, span))
    }

    fn condition(&mut self) -> Parsed<Condition> {
        let (property, _) = self.property_path()?;
        let test = self.test()?;
        Ok(Condition { property, test })
    }

    /// `= literal`, `in (...)`, `contains "x"`, `starts_with "x"`.
    fn test(&mut self) -> Parsed<Test> {
        let token = self.peek();
        match token.kind {
            TokenKind::Cmp(cmp) => {
                self.bump();
                Ok(Test::Compare {
                    cmp,
                    value: self.literal()?,
                })
            }
            TokenKind::Ident(ref word) if word == "contains" || word == "starts_with" => {
                self.bump();
                let cmp = if word == "contains" {
                    Cmp::Contains
                } else {
                    Cmp::StartsWith
                };
                let value = self.literal()?;
                if !matches!(value, Literal::Str(_)) {
                    return Err(Diagnostic::error(
                        Code::TypeMismatch,
                        token.span,
                        format!("`{word}` needs a text in quotes"),
                    ));
                }
                Ok(Test::Compare { cmp, value })
            }
            TokenKind::Ident(ref word) if word == "in" => {
                self.bump();
                let open = self.expect(TokenKind::LParen, "`(` opening the list after `in`")?;
                let mut values = Vec::new();
                if *self.peek_kind() != TokenKind::RParen {
                    values.push(self.literal()?);
                    while *self.peek_kind() == TokenKind::Comma {
                        self.bump();
                        values.push(self.literal()?);
                    }
                }
                let close = self.expect(TokenKind::RParen, "`)` closing the list")?;
                if values.is_empty() {
                    return Err(Diagnostic::error(
                        Code::EmptyList,
                        open.to(close),
                        "an `in` list needs at least one value",
                    ));
                }
                Ok(Test::In { values })
            }
            other => Err(Diagnostic::error(
                Code::MissingComparison,
                token.span,
                format!(
                    "expected a comparison (=, !=, <, <=, >, >=, in, contains, starts_with), found {}",
                    describe(&other)
                ),
            )),
        }
    }

    fn literal(&mut self) -> Parsed<Literal> {
        let token = self.bump();
        match token.kind {
            TokenKind::Str(text) => Ok(Literal::Str(text)),
            TokenKind::Number(n) => Ok(Literal::Number(n)),
            TokenKind::Ident(word) if word == "true" => Ok(Literal::Bool(true)),
            TokenKind::Ident(word) if word == "false" => Ok(Literal::Bool(false)),
            other => Err(Diagnostic::error(
                Code::UnexpectedToken,
                token.span,
                format!(
                    "expected a value (\"text\", a number, true or false), found {}",
                    describe(&other)
                ),
            )),
        }
    }

    fn optional_window(&mut self) -> Parsed<Option<Window>> {
        if *self.peek_kind() != TokenKind::Comma {
            return Ok(None);
        }
        self.bump();
        let token = self.bump();
        match token.kind {
            TokenKind::Duration(ms) => Ok(Some(Window { ms })),
            other => Err(Diagnostic::error(
                Code::InvalidWindow,
                token.span,
                format!(
                    "expected a window such as 7d, 24h, 30m or 2w, found {}",
                    describe(&other)
                ),
            )),
        }
    }

    /// A value: a function call or an attribute. Returns its span for type errors.
    fn value(&mut self) -> Parsed<(Value, Span)> {
        let token = self.bump();
        let TokenKind::Ident(name) = token.kind else {
            unreachable!("called on identifiers")
        };
        let start = token.span;
        if *self.peek_kind() == TokenKind::Dot {
            // An attribute: namespace.path
            if !NAMESPACES.contains(&name.as_str()) {
                let suggestion = closest(&name, NAMESPACES).map(|n| format!("`{n}`"));
                return Err(Diagnostic::error(
                    Code::UnknownNamespace,
                    start,
                    format!("unknown attribute namespace `{name}`; profile traits are written trait.name"),
                )
                .suggest(suggestion));
            }
            self.bump();
            let (path, span) = self.property_path()?;
            let full = format!("{name}.{path}");
            // `predicted.<model>` names any propensity model (`predicted.purchase_30d`).
            if !matches!(name.as_str(), "trait" | "predicted" | "consent")
                && !COMPUTED.contains(&full.as_str())
            {
                let known = COMPUTED
                    .iter()
                    .filter(|c| c.starts_with(&format!("{name}.")));
                let suggestion = closest(&full, known.copied()).map(|n| format!("`{n}`"));
                return Err(Diagnostic::error(
                    Code::UnknownNamespace,
                    start.to(span),
                    format!("unknown computed trait `{full}`"),
                )
                .suggest(suggestion));
            }
            return Ok((Value::Attribute { name: full }, start.to(span)));
        }
        if name == "lifecycle" && *self.peek_kind() != TokenKind::LParen {
            return Ok((Value::Attribute { name }, start));
        }
        if !FUNCTIONS.contains(&name.as_str()) {
            let suggestion = closest(&name, FUNCTIONS.iter().copied().chain(NAMESPACES))
                .map(|n| format!("`{n}`"));
            return Err(Diagnostic::error(
                Code::UnknownFunction,
                start,
                format!("unknown function `{name}`"),
            )
            .suggest(suggestion));
        }
        self.expect(TokenKind::LParen, &format!("`(` after {name}"))?;
        let value = match name.as_str() {
            "count" => {
                let event = self.event_filter()?;
                Value::Count {
                    event,
                    window: self.optional_window()?,
                }
            }
            "sum" | "avg" | "min" | "max" => {
                let measure = self.measure(&name)?;
                match name.as_str() {
                    "sum" => Value::Sum(measure),
                    "avg" => Value::Avg(measure),
                    "min" => Value::Min(measure),
                    _ => Value::Max(measure),
                }
            }
            "days_since" => Value::DaysSince {
                event: self.event_filter()?,
            },
            "days_since_first" => Value::DaysSinceFirst {
                event: self.event_filter()?,
            },
            "days_since_first_seen" => Value::DaysSinceFirstSeen,
            "days_since_last_seen" => Value::DaysSinceLastSeen,
            other => {
                return Err(Diagnostic::error(
                    Code::UnexpectedToken,
                    start,
                    format!("{other}(...) is a condition on its own and cannot be compared"),
                ));
            }
        };
        let close = self.expect(TokenKind::RParen, &format!("`)` closing {name}(...)"))?;
        Ok((value, start.to(close)))
    }

    /// `"Event".property [where ...] [, window]`
    fn measure(&mut self, name: &str) -> Parsed<Measure> {
        let token = self.peek();
        let TokenKind::Str(event_name) = token.kind else {
            return Err(Diagnostic::error(
                Code::UnexpectedToken,
                token.span,
                format!(
                    "{name} takes an event and a property, e.g. {name}(\"Order Completed\".revenue, 365d)"
                ),
            ));
        };
        self.bump();
        if *self.peek_kind() != TokenKind::Dot {
            let next = self.peek();
            return Err(Diagnostic::error(
                Code::UnexpectedToken,
                next.span,
                format!(
                    "{name} needs the property to add up: {name}({}.revenue, ...)",
                    Literal::Str(event_name)
                ),
            ));
        }
        self.bump();
        let (property, _) = self.property_path()?;
        let conditions = self.where_clause()?;
        let window = self.optional_window()?;
        Ok(Measure {
            event: EventFilter {
                name: event_name,
                conditions,
                span: token.span,
            },
            property,
            window,
        })
    }

    /// `consent.email` alone holds when the purpose is granted; it may also be compared with
    /// `true` or `false` (`=`, `!=`), nothing else.
    fn consent_test(&mut self, left: Value, span: Span) -> Parsed<Expr> {
        let token = self.peek();
        let starts_test = match &token.kind {
            TokenKind::Cmp(_) => true,
            TokenKind::Ident(word) => ["in", "contains", "starts_with"].contains(&word.as_str()),
            _ => false,
        };
        if !starts_test {
            return Ok(Expr::Compare {
                left,
                cmp: Cmp::Eq,
                right: Literal::Bool(true),
            });
        }
        match self.test()? {
            Test::Compare {
                cmp: cmp @ (Cmp::Eq | Cmp::Ne),
                value: value @ Literal::Bool(_),
            } => Ok(Expr::Compare {
                left,
                cmp,
                right: value,
            }),
            _ => Err(Diagnostic::error(
                Code::TypeMismatch,
                span.to(token.span),
                format!(
                    "{left} is true or false: write `{left}`, `not {left}` or `{left} = false`"
                ),
            )),
        }
    }

    /// The comparison that must follow a value.
    fn comparison(&mut self, left: Value, span: Span) -> Parsed<Expr> {
        if let Value::Attribute { name } = &left
            && consent_purpose(name).is_some()
        {
            return self.consent_test(left, span);
        }
        let numeric = !matches!(left, Value::Attribute { .. });
        let token = self.peek();
        let test = match &token.kind {
            TokenKind::Cmp(_) => self.test()?,
            TokenKind::Ident(word)
                if ["in", "contains", "starts_with"].contains(&word.as_str()) =>
            {
                self.test()?
            }
            _ => {
                return Err(Diagnostic::error(
                    Code::MissingComparison,
                    span,
                    format!("{left} is a value: compare it, e.g. {left} >= 1"),
                ));
            }
        };
        let mismatch = |what: &str| {
            Diagnostic::error(
                Code::TypeMismatch,
                span.to(token.span),
                format!("{left} is a number and cannot be compared with {what}"),
            )
        };
        match test {
            Test::Compare { cmp, value } => {
                if numeric
                    && (matches!(cmp, Cmp::Contains | Cmp::StartsWith)
                        || !matches!(value, Literal::Number(_)))
                {
                    return Err(mismatch(&value.to_string()));
                }
                Ok(Expr::Compare {
                    left,
                    cmp,
                    right: value,
                })
            }
            Test::In { values } => {
                if numeric && values.iter().any(|v| !matches!(v, Literal::Number(_))) {
                    return Err(mismatch("text"));
                }
                Ok(Expr::In { left, values })
            }
        }
    }
}
