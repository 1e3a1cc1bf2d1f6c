//! Timestamps: parsing the shapes Segment clients send and normalizing them to UTC milliseconds.
//!
//! Every instant inside cible is an `i64` count of milliseconds since the Unix epoch, in UTC.
//! Text is only produced at the edges (stored records, API answers) as RFC 3339 with a `Z`.

use chrono::{DateTime, NaiveDate, NaiveDateTime, SecondsFormat, TimeZone, Utc};

/// Milliseconds in one day.
pub const DAY_MS: i64 = 86_400_000;

/// Parses a timestamp given as RFC 3339 text (any offset), a naive `YYYY-MM-DD[ T]HH:MM:SS[.f]`
/// (read as UTC), a bare date, or a JSON number of epoch seconds (below 1e11) or milliseconds.
pub fn parse_timestamp(value: &serde_json::Value) -> Result<i64, String> {
    match value {
        serde_json::Value::String(text) => parse_timestamp_str(text),
        serde_json::Value::Number(number) => {
            let n = number.as_f64().ok_or("not a finite number")?;
            if !n.is_finite() || n < 0.0 {
                return Err(format!("{n} is not a valid epoch time"));
            }
            // Below 1e11 the number can only be seconds (1e11 seconds is year 5138).
            Ok(if n < 1e11 {
                (n * 1000.0) as i64
            } else {
                n as i64
            })
        }
        other => Err(format!(
            "expected a string or a number, found {}",
            json_kind(other)
        )),
    }
}

/// Parses timestamp text; see [`parse_timestamp`].
pub fn parse_timestamp_str(text: &str) -> Result<i64, String> {
    let text = text.trim();
    if let Ok(parsed) = DateTime::parse_from_rfc3339(text) {
        return Ok(parsed.with_timezone(&Utc).timestamp_millis());
    }
    // Parquet readers and SQL engines print "2026-05-01 12:00:00.000 +00:00".
    if let Ok(parsed) = DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f %:z") {
        return Ok(parsed.with_timezone(&Utc).timestamp_millis());
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(text, format) {
            return Ok(Utc.from_utc_datetime(&naive).timestamp_millis());
        }
    }
    if let Ok(date) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        let naive = date.and_hms_opt(0, 0, 0).expect("midnight exists");
        return Ok(Utc.from_utc_datetime(&naive).timestamp_millis());
    }
    Err(format!(
        "{text:?} is not an RFC 3339 timestamp (e.g. 2026-05-01T12:00:00Z)"
    ))
}

/// Formats epoch milliseconds as RFC 3339 UTC with millisecond precision.
pub fn format_ms(ms: i64) -> String {
    match Utc.timestamp_millis_opt(ms).single() {
        Some(instant) => instant.to_rfc3339_opts(SecondsFormat::Millis, true),
        None => ms.to_string(),
    }
}

/// The current wall-clock time in epoch milliseconds.
pub fn wall_clock_ms() -> i64 {
    Utc::now().timestamp_millis()
}

/// A short name for a JSON value's kind, for error messages.
pub fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(input: serde_json::Value, expected: &str) {
        let ms = parse_timestamp(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
        assert_eq!(format_ms(ms), expected, "input {input}");
    }

    #[test]
    fn accepts_the_shapes_clients_send() {
        check(json!("2026-05-01T12:00:00Z"), "2026-05-01T12:00:00.000Z");
        check(
            json!("2026-05-01T14:00:00+02:00"),
            "2026-05-01T12:00:00.000Z",
        );
        check(
            json!("2026-05-01T12:00:00.123456Z"),
            "2026-05-01T12:00:00.123Z",
        );
        check(json!("2026-05-01 12:00:00"), "2026-05-01T12:00:00.000Z");
        check(json!("2026-05-01"), "2026-05-01T00:00:00.000Z");
        check(
            json!("2026-05-01 14:00:00.000 +02:00"),
            "2026-05-01T12:00:00.000Z",
        );
        check(json!(1_777_636_800), "2026-05-01T12:00:00.000Z");
        check(json!(1_777_636_800_000_i64), "2026-05-01T12:00:00.000Z");
    }

    #[test]
    fn rejects_garbage_with_a_reason() {
        assert!(
            parse_timestamp(&json!("yesterday"))
                .unwrap_err()
                .contains("RFC 3339")
        );
        assert!(
            parse_timestamp(&json!(true))
                .unwrap_err()
                .contains("a boolean")
        );
        assert!(parse_timestamp(&json!(-5)).is_err());
    }
}
