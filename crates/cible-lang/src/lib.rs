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
//! window     = integer ( "m" | "h" | "d" | "w" ) ;      (* 30m, 24h, 7d, 2w; at most 3650d *)
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

/// Reads a rule's JSON form; the error names what is wrong. A window over
/// [`lexer::MAX_WINDOW_DAYS`] is refused with [`Code::WindowTooLong`], naming its field.
pub fn from_json(json: &serde_json::Value) -> Result<Expr, Diagnostic> {
    let json_error = |code, message: String| {
        Diagnostic::error(
            code,
            diagnostics::Span::default(),
            format!("invalid rule JSON: {message}"),
        )
    };
    let expr: Expr = serde_json::from_value(json.clone()).map_err(|e| {
        // A window too long even for 64 bits keeps the too-long code.
        let message = e.to_string();
        let too_long = (message.starts_with("`window`: `") || message.starts_with("`within`: `"))
            && message.contains(lexer::TOO_LONG);
        let code = if too_long {
            Code::WindowTooLong
        } else {
            Code::InvalidJson
        };
        json_error(code, message)
    })?;
    if let Some((field, window)) = expr
        .windows()
        .into_iter()
        .find(|(_, w)| w.ms > lexer::MAX_WINDOW_MS)
    {
        let message = lexer::WindowError::TooLong.message(&window.to_string());
        return Err(json_error(
            Code::WindowTooLong,
            format!("`{field}`: {message}"),
        ));
    }
    Ok(expr)
}

#[cfg(test)]
mod tests;
