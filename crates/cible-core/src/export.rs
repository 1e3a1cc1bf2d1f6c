//! Exports of profiles (all live ones, or a segment's members) with identifiers, traits,
//! computed traits, model outputs and consents, as JSON Lines, CSV or Parquet, to any writer
//! (a file, standard output, an HTTP response being streamed). Only the profiles the export's
//! purpose permits are written (the consent check is the first thing asked), identifiers are
//! replaced by keyed pseudonyms on request, and every export is recorded in the audit log.
//!
//! JSON Lines keeps the nested form: `{"profile", "identifiers", "entered_at"?, "traits",
//! "computed", "consents"}`. CSV and Parquet flatten it: nested objects become dotted
//! columns (`traits.plan`, `computed.score.value`, `computed.predicted.purchase_30d`,
//! `consents.email`), arrays a JSON text; the columns are the union over the rows written
//! (found by a first pass), missing values empty (CSV) or null (Parquet). A Parquet column is
//! DOUBLE when every value is a number, BOOLEAN when every value is a boolean, else UTF8.

use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Arc;

use serde_json::{Map, Value, json};

use crate::Engine;
use crate::error::{EngineError, Result};

pub use crate::import::Format;

/// What to export.
#[derive(Debug, Clone)]
pub struct ExportSpec {
    /// A segment's members; every live profile when absent.
    pub segment: Option<String>,
    pub purpose: String,
    pub pseudonymize: bool,
    pub format: Format,
    pub now: i64,
}

/// Profiles per chunk (computed traits are computed a chunk at a time, in parallel).
const CHUNK: usize = 4096;

/// Writes the export; returns how many profiles. An error from `out` (a closed pipe, a client
/// gone) stops it and is returned as `EngineError::Io`.
pub fn write_profiles(engine: &Engine, spec: &ExportSpec, out: impl Write + Send) -> Result<u64> {
    // The consent check first: an unknown purpose writes nothing.
    let check = engine.consent_check(&spec.purpose)?;
    let pseudonyms = if spec.pseudonymize {
        Some(engine.pseudonymizer()?)
    } else {
        None
    };
    let mut profiles: Vec<u32> = match &spec.segment {
        Some(name) => engine.members(name)?.iter().collect(),
        None => engine.live_profiles(),
    };
    profiles.retain(|p| check.permits(*p));
    let rows = Rows {
        engine,
        reader: engine.traits_reader(spec.now)?,
        purposes: engine.purposes().names().map(str::to_string).collect(),
        pseudonyms,
        segment: spec.segment.clone(),
    };
    match spec.format {
        Format::Jsonl => write_jsonl(&rows, &profiles, out)?,
        Format::Csv => write_csv(&rows, &profiles, out)?,
        Format::Parquet => write_parquet(&rows, &profiles, out)?,
    }
    let what = if spec.segment.is_some() {
        "members"
    } else {
        "profiles"
    };
    engine.audit(engine.audit_entry(
        crate::audit::Action::Export,
        &[],
        json!({"what": what, "segment": spec.segment, "format": spec.format,
            "purpose": check.purpose(), "records": profiles.len(),
            "pseudonym_key": rows.pseudonyms.as_ref().map(|p| p.version())}),
    ))?;
    Ok(profiles.len() as u64)
}

struct Rows<'a> {
    engine: &'a Engine,
    reader: crate::scoring::TraitsReader<'a>,
    purposes: Vec<String>,
    pseudonyms: Option<crate::pseudonym::Pseudonymizer>,
    segment: Option<String>,
}

impl Rows<'_> {
    /// The rows of a chunk of profiles, in the nested (JSON Lines) form.
    fn of(&self, chunk: &[u32]) -> Result<Vec<Value>> {
        let computed = self.reader.of(chunk);
        let mut rows = Vec::with_capacity(chunk.len());
        for (profile, computed) in chunk.iter().zip(computed) {
            let record = self.engine.profile_record(*profile)?;
            let traits: Map<String, Value> = record
                .traits
                .into_iter()
                .map(|(name, t)| (name, t.value))
                .collect();
            // Every purpose, true only when granted and not withdrawn since (as rules read
            // `consent.<purpose>`).
            let consents: Map<String, Value> = self
                .purposes
                .iter()
                .map(|purpose| {
                    let granted = record
                        .consents
                        .current(purpose)
                        .is_some_and(|change| change.granted);
                    (purpose.clone(), granted.into())
                })
                .collect();
            let mut row = json!({"profile": profile, "identifiers": record.identifiers});
            if let Some(segment) = &self.segment {
                row["entered_at"] = match self.engine.entered_at(segment, *profile)? {
                    Some(at) => Value::String(crate::time::format_ms(at)),
                    None => Value::Null,
                };
            }
            row["traits"] = Value::Object(traits);
            row["computed"] = serde_json::to_value(&computed)
                .map_err(|e| EngineError::Invalid(format!("computed traits: {e}")))?;
            row["consents"] = Value::Object(consents);
            if let Some(pseudonyms) = &self.pseudonyms {
                pseudonyms.profile(&mut row);
            }
            rows.push(row);
        }
        Ok(rows)
    }
}

fn io(error: std::io::Error) -> EngineError {
    EngineError::Output(error)
}

fn write_jsonl(rows: &Rows, profiles: &[u32], out: impl Write) -> Result<()> {
    let mut out = std::io::BufWriter::with_capacity(1 << 16, out);
    for chunk in profiles.chunks(CHUNK) {
        for row in rows.of(chunk)? {
            serde_json::to_writer(&mut out, &row).map_err(|e| io(e.into()))?;
            out.write_all(b"\n").map_err(io)?;
        }
    }
    out.flush().map_err(io)
}

/// A row flattened: dotted column name → scalar (arrays as JSON text).
fn flatten(row: &Value) -> BTreeMap<String, Value> {
    fn walk(prefix: &str, value: &Value, out: &mut BTreeMap<String, Value>) {
        match value {
            Value::Object(map) => {
                for (key, value) in map {
                    let name = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&name, value, out);
                }
            }
            Value::Array(_) => {
                out.insert(prefix.to_string(), Value::String(value.to_string()));
            }
            Value::Null => {}
            scalar => {
                out.insert(prefix.to_string(), scalar.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", row, &mut out);
    out
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Double,
    Boolean,
    Text,
}

/// Columns in order (`profile`, `identifiers`, `entered_at` first, then by name) with the
/// kind their values allow: a first pass over the rows.
fn columns(rows: &Rows, profiles: &[u32]) -> Result<Vec<(String, Kind)>> {
    let mut kinds: BTreeMap<String, Kind> = BTreeMap::new();
    for chunk in profiles.chunks(CHUNK) {
        for row in rows.of(chunk)? {
            for (name, value) in flatten(&row) {
                let kind = match value {
                    Value::Number(_) => Kind::Double,
                    Value::Bool(_) => Kind::Boolean,
                    _ => Kind::Text,
                };
                kinds
                    .entry(name)
                    .and_modify(|k| {
                        if *k != kind {
                            *k = Kind::Text;
                        }
                    })
                    .or_insert(kind);
            }
        }
    }
    let first = ["profile", "identifiers", "entered_at"];
    let mut out: Vec<(String, Kind)> = first
        .iter()
        .filter_map(|name| kinds.remove(*name).map(|k| (name.to_string(), k)))
        .collect();
    out.extend(kinds);
    Ok(out)
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn write_csv(rows: &Rows, profiles: &[u32], out: impl Write) -> Result<()> {
    let columns = columns(rows, profiles)?;
    let mut writer = csv::Writer::from_writer(std::io::BufWriter::with_capacity(1 << 16, out));
    let csv_error = |e: csv::Error| match e.into_kind() {
        csv::ErrorKind::Io(error) => EngineError::Output(error),
        other => EngineError::Output(std::io::Error::other(format!("{other:?}"))),
    };
    writer
        .write_record(columns.iter().map(|(name, _)| name.as_str()))
        .map_err(csv_error)?;
    for chunk in profiles.chunks(CHUNK) {
        for row in rows.of(chunk)? {
            let flat = flatten(&row);
            writer
                .write_record(
                    columns
                        .iter()
                        .map(|(name, _)| flat.get(name).map(text_of).unwrap_or_default()),
                )
                .map_err(csv_error)?;
        }
    }
    writer.flush().map_err(io)
}

/// Rows per Parquet row group.
const ROW_GROUP: usize = 65_536;

fn write_parquet(rows: &Rows, profiles: &[u32], out: impl Write + Send) -> Result<()> {
    use parquet::basic::{LogicalType, Repetition, Type as Physical};
    use parquet::data_type::{BoolType, ByteArray, ByteArrayType, DoubleType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::types::Type;

    let error = |e: parquet::errors::ParquetError| match e {
        parquet::errors::ParquetError::External(inner) => {
            match inner.downcast::<std::io::Error>() {
                Ok(io) => EngineError::Output(*io),
                Err(other) => EngineError::Output(std::io::Error::other(other.to_string())),
            }
        }
        other => EngineError::Output(std::io::Error::other(format!("writing Parquet: {other}"))),
    };
    let columns = columns(rows, profiles)?;
    let mut fields = Vec::with_capacity(columns.len());
    for (name, kind) in &columns {
        let builder = match kind {
            Kind::Double => Type::primitive_type_builder(name, Physical::DOUBLE),
            Kind::Boolean => Type::primitive_type_builder(name, Physical::BOOLEAN),
            Kind::Text => Type::primitive_type_builder(name, Physical::BYTE_ARRAY)
                .with_logical_type(Some(LogicalType::String)),
        };
        fields.push(Arc::new(
            builder
                .with_repetition(Repetition::OPTIONAL)
                .build()
                .map_err(error)?,
        ));
    }
    let schema = Type::group_type_builder("profiles")
        .with_fields(fields)
        .build()
        .map_err(error)?;
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .build(),
    );
    let mut writer = SerializedFileWriter::new(out, Arc::new(schema), props).map_err(error)?;
    for group_profiles in profiles.chunks(ROW_GROUP) {
        let mut flat = Vec::with_capacity(group_profiles.len());
        for chunk in group_profiles.chunks(CHUNK) {
            flat.extend(rows.of(chunk)?.iter().map(flatten));
        }
        let mut group = writer.next_row_group().map_err(error)?;
        let mut index = 0;
        while let Some(mut column) = group.next_column().map_err(error)? {
            let (name, kind) = &columns[index];
            let present: Vec<Option<&Value>> = flat.iter().map(|row| row.get(name)).collect();
            let levels: Vec<i16> = present.iter().map(|v| i16::from(v.is_some())).collect();
            match kind {
                Kind::Double => {
                    let values: Vec<f64> = present
                        .iter()
                        .flatten()
                        .map(|v| v.as_f64().unwrap_or(f64::NAN))
                        .collect();
                    column
                        .typed::<DoubleType>()
                        .write_batch(&values, Some(&levels), None)
                        .map_err(error)?;
                }
                Kind::Boolean => {
                    let values: Vec<bool> = present
                        .iter()
                        .flatten()
                        .map(|v| v.as_bool().unwrap_or(false))
                        .collect();
                    column
                        .typed::<BoolType>()
                        .write_batch(&values, Some(&levels), None)
                        .map_err(error)?;
                }
                Kind::Text => {
                    let values: Vec<ByteArray> = present
                        .iter()
                        .flatten()
                        .map(|v| ByteArray::from(text_of(v).into_bytes()))
                        .collect();
                    column
                        .typed::<ByteArrayType>()
                        .write_batch(&values, Some(&levels), None)
                        .map_err(error)?;
                }
            }
            column.close().map_err(error)?;
            index += 1;
        }
        group.close().map_err(error)?;
    }
    writer.close().map_err(error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_flatten_to_dotted_columns() {
        let row = json!({"profile": 3, "identifiers": ["u:a", "e:a@x.io"],
            "traits": {"plan": "pro", "address": {"city": "Lyon"}},
            "computed": {"score": {"value": 4.5}, "predicted": {}}, "consents": {"email": true}});
        let flat = flatten(&row);
        assert_eq!(flat["profile"], json!(3));
        assert_eq!(flat["identifiers"], json!(r#"["u:a","e:a@x.io"]"#));
        assert_eq!(flat["traits.address.city"], json!("Lyon"));
        assert_eq!(flat["computed.score.value"], json!(4.5));
        assert_eq!(flat["consents.email"], json!(true));
        assert!(!flat.contains_key("computed.predicted"));
        assert!(
            Format::parse("xls")
                .unwrap_err()
                .to_string()
                .contains("format:")
        );
    }
}
