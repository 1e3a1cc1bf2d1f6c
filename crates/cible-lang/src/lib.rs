//! The cible segment language: text → tokens → syntax tree ([`ast::Expr`], which is also the
//! rule's JSON form) → checks. It knows nothing of storage, HTTP or evaluation; the engine
//! compiles the tree against its dictionaries and evaluates it.
//!
//! Grammar (EBNF; keywords are lower case, `--` starts a comment):
//!
//! ```text
//! rule       = or ;
//! or         = and { "or" and } ;
//! and        = unary { "and" unary } ;
//! unary      = "not" unary | primary ;
//! primary    = "(" or ")"
//!            | "did" "(" filter [ "," window ] ")"
//!            | "in_segment" "(" string ")"
//!            | filter "then" [ "not" ] filter "within" window
//!            | value test ;
//! value      = "count" "(" filter [ "," window ] ")"
//!            | ( "sum" | "avg" | "min" | "max" ) "(" string "." path [ where ] [ "," window ] ")"
//!            | ( "days_since" | "days_since_first" ) "(" filter ")"
//!            | "days_since_first_seen" "(" ")" | "days_since_last_seen" "(" ")"
//!            | "trait" "." path ;
//! filter     = string [ where ] ;
//! where      = "where" condition { "and" condition } ;
//! condition  = path test ;
//! test       = ( "=" | "!=" | "<" | "<=" | ">" | ">=" ) literal
//!            | ( "contains" | "starts_with" ) string
//!            | "in" "(" literal { "," literal } ")" ;
//! path       = ident { "." ident } ;
//! window     = integer ( "m" | "h" | "d" | "w" ) ;      (* 30m, 24h, 7d, 2w *)
//! literal    = string | number | "true" | "false" ;
//! ```
//!
//! Nesting is limited to [`parser::MAX_DEPTH`] levels. `docs/segment-language.md` gives the
//! meaning of every construct with an example.

pub mod ast;
pub mod check;
pub mod diagnostics;
pub mod lexer;
pub mod parser;
pub mod sql;

pub use ast::Expr;
pub use diagnostics::{Code, Diagnostic, Severity};

/// Parses rule text.
pub fn parse(source: &str) -> Result<Expr, Diagnostic> {
    parser::parse(source)
}

/// Reads a rule's JSON form; the error names what is wrong.
pub fn from_json(json: &serde_json::Value) -> Result<Expr, Diagnostic> {
    serde_json::from_value(json.clone()).map_err(|e| {
        Diagnostic::error(
            Code::InvalidJson,
            diagnostics::Span::default(),
            format!("invalid rule JSON: {e}"),
        )
    })
}

#[cfg(test)]
mod tests;
