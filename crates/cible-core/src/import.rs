//! Bulk import of Segment messages from JSON Lines (optionally gzip) and CSV files.
//!
//! A reader thread reads and parses chunks in parallel (rayon) while the calling thread feeds
//! them to [`Engine::ingest`], so parsing and the single writer overlap. Every message passes the
//! same gate as the HTTP API ([`crate::message::parse_message`]); dedup by messageId makes a
//! second import of the same file add nothing.
//!
//! Parquet (`.parquet`): one message per row, read with the `parquet` crate's record reader.
//! Columns are named as in CSV; `properties`, `traits` and `context` may also be struct (group)
//! columns or strings holding a JSON object. Timestamps may be Parquet TIMESTAMP columns.
//!
//! CSV layout: one message per row; the header names the columns. Top-level columns are Segment's
//! fields (`type`, `messageId`, `timestamp`, `userId`, `anonymousId`, `event`, `name`,
//! `previousId`, `groupId`); `properties.X`, `traits.X` and `context.X` columns fill those
//! objects (`context.campaign.source` nests further). An empty cell is absent; a cell reading as
//! a number or `true`/`false` in `properties`, `traits` or `context` becomes that JSON value.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::engine::Engine;
use crate::error::EngineError;
use crate::ingest::{Durability, Incoming};
use crate::message::{ParseContext, parse_message, parse_message_text};
use crate::quality::Reason;
use crate::records::BatchOutcome;

/// Messages per chunk handed to the engine (one atomic batch each).
const CHUNK_MESSAGES: usize = 20_000;

/// File formats, read by imports and written by exports ([`crate::export`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
    Parquet,
}

impl Format {
    /// The format a file name implies (`.jsonl`, `.json`, `.ndjson`, `.csv`, each optionally
    /// `.gz`, or `.parquet`).
    pub fn detect(path: &Path) -> Option<Self> {
        let name = path.file_name()?.to_str()?.to_ascii_lowercase();
        let name = name.strip_suffix(".gz").unwrap_or(&name);
        if name.ends_with(".parquet") {
            Some(Self::Parquet)
        } else if name.ends_with(".csv") {
            Some(Self::Csv)
        } else if [".jsonl", ".ndjson", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext))
        {
            Some(Self::Jsonl)
        } else {
            None
        }
    }

    /// A format by name, as `--format` and `?format=` give it.
    pub fn parse(text: &str) -> Result<Self, crate::EngineError> {
        match text {
            "jsonl" | "json" | "ndjson" => Ok(Self::Jsonl),
            "csv" => Ok(Self::Csv),
            "parquet" => Ok(Self::Parquet),
            other => Err(crate::EngineError::Invalid(format!(
                "format: {other:?} is not a format (jsonl, csv, parquet)"
            ))),
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::Jsonl => "application/x-ndjson",
            Self::Csv => "text/csv; charset=utf-8",
            Self::Parquet => "application/vnd.apache.parquet",
        }
    }
}

/// Errors of an import. Malformed messages are not errors (they are quarantined); these are.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path}: cannot tell the format from the name; use .jsonl, .ndjson, .json or .csv (optionally .gz), or .parquet"
    )]
    UnknownFormat { path: PathBuf },
    #[error("{path}: Parquet error: {source}")]
    Parquet {
        path: PathBuf,
        source: parquet::errors::ParquetError,
    },
    #[error("{path}: CSV error: {source}")]
    Csv { path: PathBuf, source: csv::Error },
    #[error(transparent)]
    Engine(#[from] EngineError),
}

/// Per-file result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FileSummary {
    pub path: String,
    pub messages: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub quarantined: u64,
}

/// What `cible import` prints at the end.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ImportSummary {
    pub files: Vec<FileSummary>,
    pub messages: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub quarantined: u64,
    pub quarantined_by_reason: BTreeMap<Reason, u64>,
    pub profiles_created: u64,
    pub profiles_merged: u64,
    pub identity_conflicts: u64,
    pub seconds: f64,
    pub messages_per_second: f64,
}

/// Progress shared with whoever draws a progress bar: bytes read of the current file.
#[derive(Debug, Default)]
pub struct Progress {
    pub bytes_read: AtomicU64,
    pub messages: AtomicU64,
}

/// Imports `paths` in order. `now` is the receive time given to every message.
pub fn import_files(
    engine: &Engine,
    paths: &[PathBuf],
    now: i64,
    progress: &Arc<Progress>,
) -> Result<ImportSummary, ImportError> {
    let started = Instant::now();
    let mut summary = ImportSummary::default();
    // The property column computed traits read, kept from the first batch on: built later, on
    // the first traits read of a server, it is a scan of the whole store under the writer lock
    // (62 s at 99M events, acknowledgements waiting). Free on an empty store, done once on one
    // that has none yet.
    engine.ensure_column_indexes(&[crate::computed::CATEGORY_KEY as u8], true)?;
    {
        // Segments are evaluated once, after the last batch, for every profile touched.
        let _deferred = engine.defer_segments();
        for path in paths {
            let format = Format::detect(path)
                .ok_or_else(|| ImportError::UnknownFormat { path: path.clone() })?;
            progress.bytes_read.store(0, Ordering::Relaxed);
            let file = import_file(engine, path, format, now, progress, &mut summary)?;
            summary.files.push(file);
        }
    }
    engine.finish_bulk()?;
    engine.drain_segments()?;
    // The computed traits' population calibration, stored now: the first `profile show` after
    // an import would otherwise compute it over everyone (6 s at 10M events).
    if !engine.has_calibration()? {
        engine.calibrate(now)?;
    }
    engine.checkpoint()?;
    summary.seconds = started.elapsed().as_secs_f64();
    summary.messages_per_second = summary.messages as f64 / summary.seconds.max(1e-9);
    Ok(summary)
}

/// Counts the bytes that pass through, for the progress bar.
struct CountingReader<R> {
    inner: R,
    progress: Arc<Progress>,
}

impl<R: Read> Read for CountingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.progress
            .bytes_read
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

fn open_reader(path: &Path, progress: &Arc<Progress>) -> Result<Box<dyn Read + Send>, ImportError> {
    let file = File::open(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let counting = CountingReader {
        inner: file,
        progress: Arc::clone(progress),
    };
    let is_gzip = path
        .extension()
        .is_some_and(|ext| ext.eq_ignore_ascii_case("gz"));
    Ok(if is_gzip {
        Box::new(flate2::read::MultiGzDecoder::new(BufReader::with_capacity(
            1 << 20,
            counting,
        )))
    } else {
        Box::new(counting)
    })
}

/// A chunk of raw records with the line (or row) number of the first one.
enum RawChunk {
    Lines(Vec<String>, u64),
    /// Messages built from rows, or the rejection of a row that could not be read.
    Objects(Vec<Result<Value, crate::Rejection>>, u64),
}

fn import_file(
    engine: &Engine,
    path: &Path,
    format: Format,
    now: i64,
    progress: &Arc<Progress>,
    summary: &mut ImportSummary,
) -> Result<FileSummary, ImportError> {
    let reader = open_reader(path, progress)?;
    let name = path.file_name().map_or_else(
        || path.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    );
    let (sender, receiver) = std::sync::mpsc::sync_channel::<Result<Vec<Incoming>, ImportError>>(2);
    let owned_path = path.to_path_buf();
    let reader_name = name.clone();
    let progress_for_reader = Arc::clone(progress);
    let packer = Arc::clone(engine.packer());
    let producer = std::thread::Builder::new()
        .name("cible-reader".into())
        .spawn(move || {
            let ctx = ParseContext::at(now);
            let send = |chunk: RawChunk| {
                sender
                    .send(Ok(parse_chunk(chunk, &reader_name, &ctx, &packer)))
                    .is_ok()
            };
            let result = match format {
                Format::Jsonl => read_jsonl(reader, &owned_path, send),
                Format::Csv => read_csv(reader, &owned_path, send),
                Format::Parquet => read_parquet(&owned_path, &progress_for_reader, send),
            };
            if let Err(error) = result {
                let _ = sender.send(Err(error));
            }
        })
        .map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    let mut file = FileSummary {
        path: path.display().to_string(),
        ..Default::default()
    };
    let mut outcome_error = None;
    for chunk in receiver {
        let items = match chunk {
            Ok(items) => items,
            Err(error) => {
                outcome_error = Some(error);
                break;
            }
        };
        let n = items.len() as u64;
        let outcome = engine.ingest(items, "import", Durability::Bulk, now)?;
        record(summary, &mut file, n, &outcome);
        progress.messages.fetch_add(n, Ordering::Relaxed);
    }
    producer
        .join()
        .expect("the import reader thread does not panic");
    match outcome_error {
        Some(error) => Err(error),
        None => Ok(file),
    }
}

fn record(summary: &mut ImportSummary, file: &mut FileSummary, n: u64, outcome: &BatchOutcome) {
    let quarantined = outcome.quarantined.len() as u64;
    file.messages += n;
    file.accepted += outcome.accepted;
    file.duplicates += outcome.duplicates;
    file.quarantined += quarantined;
    summary.messages += n;
    summary.accepted += outcome.accepted;
    summary.duplicates += outcome.duplicates;
    summary.quarantined += quarantined;
    summary.profiles_created += outcome.profiles_created;
    summary.profiles_merged += outcome.profiles_merged;
    summary.identity_conflicts += outcome.identity_conflicts;
    for note in &outcome.quarantined {
        *summary
            .quarantined_by_reason
            .entry(note.reason)
            .or_default() += 1;
    }
}

/// Parses and packs a chunk on the parsing threads.
fn parse_chunk(
    chunk: RawChunk,
    file: &str,
    ctx: &ParseContext,
    packer: &crate::packing::Packer,
) -> Vec<Incoming> {
    let locate = |line: u64, parsed: Result<crate::Message, crate::Rejection>| -> Incoming {
        let mut incoming: Incoming = parsed
            .map_err(|mut rejection| {
                rejection.detail = format!("{file}:{line}: {}", rejection.detail);
                rejection
            })
            .into();
        incoming.pack(packer);
        incoming
    };
    match chunk {
        RawChunk::Lines(lines, first) => lines
            .par_iter()
            .enumerate()
            .map(|(i, line)| locate(first + i as u64, parse_message_text(line, ctx)))
            .collect(),
        RawChunk::Objects(objects, first) => objects
            .into_par_iter()
            .enumerate()
            .map(|(i, object)| {
                let parsed = object.and_then(|object| parse_message(object, None, ctx));
                locate(first + i as u64, parsed)
            })
            .collect(),
    }
}

fn read_jsonl(
    reader: Box<dyn Read + Send>,
    path: &Path,
    mut send: impl FnMut(RawChunk) -> bool,
) -> Result<(), ImportError> {
    let reader = BufReader::with_capacity(1 << 20, reader);
    let mut chunk = Vec::with_capacity(CHUNK_MESSAGES);
    let mut first_line = 1;
    let mut line_number = 0;
    for line in reader.lines() {
        line_number += 1;
        let line = line.map_err(|source| ImportError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        if chunk.is_empty() {
            first_line = line_number;
        }
        chunk.push(line);
        if chunk.len() >= CHUNK_MESSAGES {
            // Line numbers inside a chunk are exact only without blank lines; good enough to
            // point at the neighbourhood, and blank lines are rare.
            if !send(RawChunk::Lines(std::mem::take(&mut chunk), first_line)) {
                return Ok(());
            }
        }
    }
    if !chunk.is_empty() {
        send(RawChunk::Lines(chunk, first_line));
    }
    Ok(())
}

fn read_csv(
    reader: Box<dyn Read + Send>,
    path: &Path,
    mut send: impl FnMut(RawChunk) -> bool,
) -> Result<(), ImportError> {
    let csv_error = |source| ImportError::Csv {
        path: path.to_path_buf(),
        source,
    };
    // Flexible: a row with another number of fields than the header is quarantined whole
    // (below), not the end of the import.
    let mut csv = csv::ReaderBuilder::new().flexible(true).from_reader(reader);
    let headers: Vec<String> = csv
        .headers()
        .map_err(csv_error)?
        .iter()
        .map(str::to_string)
        .collect();
    let mut chunk = Vec::with_capacity(CHUNK_MESSAGES);
    let mut first_row = 2;
    for (index, row) in csv.records().enumerate() {
        let row = row.map_err(csv_error)?;
        if chunk.is_empty() {
            first_row = index as u64 + 2;
        }
        if row.len() == headers.len() {
            chunk.push(Ok(csv_row_to_message(&headers, &row)));
        } else {
            chunk.push(Err(crate::Rejection {
                reason: crate::quality::Reason::MalformedRow,
                field: None,
                detail: format!(
                    "the row has {} fields, the header {}",
                    row.len(),
                    headers.len()
                ),
                raw: row.iter().collect::<Vec<_>>().join(","),
            }));
        }
        if chunk.len() >= CHUNK_MESSAGES
            && !send(RawChunk::Objects(std::mem::take(&mut chunk), first_row))
        {
            return Ok(());
        }
    }
    if !chunk.is_empty() {
        send(RawChunk::Objects(chunk, first_row));
    }
    Ok(())
}

fn read_parquet(
    path: &Path,
    progress: &Progress,
    mut send: impl FnMut(RawChunk) -> bool,
) -> Result<(), ImportError> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let parquet_error = |source| ImportError::Parquet {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(|source| ImportError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let reader = SerializedFileReader::new(file).map_err(parquet_error)?;
    let n_rows = reader.metadata().file_metadata().num_rows().max(1) as u64;
    let mut chunk = Vec::with_capacity(CHUNK_MESSAGES);
    let mut first_row = 1;
    for (index, row) in reader.into_iter().enumerate() {
        let row = row.map_err(parquet_error)?;
        if chunk.is_empty() {
            first_row = index as u64 + 1;
        }
        chunk.push(Ok(flat_to_message(row.to_json_value())));
        if chunk.len() >= CHUNK_MESSAGES {
            progress
                .bytes_read
                .store(size * (index as u64 + 1) / n_rows, Ordering::Relaxed);
            if !send(RawChunk::Objects(std::mem::take(&mut chunk), first_row)) {
                return Ok(());
            }
        }
    }
    progress.bytes_read.store(size, Ordering::Relaxed);
    if !chunk.is_empty() {
        send(RawChunk::Objects(chunk, first_row));
    }
    Ok(())
}

/// A row from a columnar file as a Segment message: nulls dropped, `properties`, `traits` and
/// `context` given as JSON text parsed, dotted column names nested.
fn flat_to_message(row: Value) -> Value {
    let Value::Object(columns) = row else {
        return row;
    };
    let mut object = Map::new();
    for (name, value) in columns {
        let value = match value {
            Value::Null => continue,
            Value::String(text) if matches!(name.as_str(), "properties" | "traits" | "context") => {
                match serde_json::from_str::<Value>(&text) {
                    Ok(parsed @ Value::Object(_)) => parsed,
                    _ => Value::String(text),
                }
            }
            other => other,
        };
        insert_dotted(&mut object, &name, value);
    }
    Value::Object(object)
}

/// Inserts `value` at a dotted path (`properties.revenue`), creating objects on the way.
fn insert_dotted(object: &mut Map<String, Value>, path: &str, value: Value) {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop().unwrap_or_default();
    let mut slot = object;
    for part in parts {
        let entry = slot
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        let Value::Object(map) = entry else { return };
        slot = map;
    }
    match (slot.get_mut(last), value) {
        // A struct column and dotted columns for the same object merge.
        (Some(Value::Object(existing)), Value::Object(more)) => existing.extend(more),
        (_, value) => {
            slot.insert(last.to_string(), value);
        }
    }
}

/// Builds a Segment message object from one CSV row (see the module docs for the layout).
pub fn csv_row_to_message(headers: &[String], row: &csv::StringRecord) -> Value {
    let mut object = Map::new();
    for (header, cell) in headers.iter().zip(row.iter()) {
        if cell.is_empty() {
            continue;
        }
        let value = if header.contains('.') {
            typed_cell(cell)
        } else {
            Value::String(cell.to_string())
        };
        insert_dotted(&mut object, header, value);
    }
    Value::Object(object)
}

fn typed_cell(cell: &str) -> Value {
    match cell {
        "true" => return Value::Bool(true),
        "false" => return Value::Bool(false),
        _ => {}
    }
    // Identifiers such as "007" or "+33..." stay text; so does anything not a finite number.
    let looks_like_code = cell.starts_with('+')
        || (cell.len() > 1 && cell.starts_with('0') && !cell.starts_with("0."));
    if !looks_like_code {
        if let Ok(integer) = cell.parse::<i64>() {
            return Value::Number(integer.into());
        }
        if let Some(number) = cell
            .parse::<f64>()
            .ok()
            .and_then(serde_json::Number::from_f64)
        {
            return Value::Number(number);
        }
    }
    Value::String(cell.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Engine;
    use crate::computed::CATEGORY_KEY;

    #[test]
    fn formats_come_from_the_file_name() {
        assert_eq!(
            Format::detect(Path::new("a/events.jsonl.gz")),
            Some(Format::Jsonl)
        );
        assert_eq!(Format::detect(Path::new("x.CSV")), Some(Format::Csv));
        assert_eq!(Format::detect(Path::new("x.txt")), None);
    }

    /// Writes a Parquet file with the layouts users have: a TIMESTAMP column, a struct column,
    /// a JSON-text column and a dotted column, nulls included.
    fn write_parquet(path: &Path) {
        use parquet::data_type::{ByteArray, ByteArrayType, DoubleType, Int64Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::parser::parse_message_type;

        let schema = parse_message_type(
            "message events {
                REQUIRED BYTE_ARRAY type (UTF8);
                REQUIRED BYTE_ARRAY messageId (UTF8);
                REQUIRED INT64 timestamp (TIMESTAMP(MILLIS,true));
                OPTIONAL BYTE_ARRAY userId (UTF8);
                OPTIONAL BYTE_ARRAY event (UTF8);
                OPTIONAL BYTE_ARRAY properties (UTF8);
                OPTIONAL DOUBLE revenue_column;
                OPTIONAL group traits { OPTIONAL BYTE_ARRAY email (UTF8); }
            }",
        )
        .unwrap();
        let file = File::create(path).unwrap();
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).unwrap();
        let mut group = writer.next_row_group().unwrap();
        let text = |values: &[&str]| {
            values
                .iter()
                .map(|v| ByteArray::from(*v))
                .collect::<Vec<_>>()
        };
        let mut column = 0;
        while let Some(mut writer) = group.next_column().unwrap() {
            match column {
                0 => writer.typed::<ByteArrayType>().write_batch(
                    &text(&["identify", "track", "track"]),
                    None,
                    None,
                ),
                1 => writer.typed::<ByteArrayType>().write_batch(
                    &text(&["p1", "p2", "p3"]),
                    None,
                    None,
                ),
                2 => writer.typed::<Int64Type>().write_batch(
                    &[1_777_000_000_000, 1_777_000_060_000, 1_777_000_120_000],
                    None,
                    None,
                ),
                3 => writer.typed::<ByteArrayType>().write_batch(
                    &text(&["u1", "u1"]),
                    Some(&[1, 1, 0]),
                    None,
                ),
                4 => writer.typed::<ByteArrayType>().write_batch(
                    &text(&["Order Completed", "Order Completed"]),
                    Some(&[0, 1, 1]),
                    None,
                ),
                5 => writer.typed::<ByteArrayType>().write_batch(
                    &text(&[r#"{"revenue": 30, "currency": "EUR"}"#]),
                    Some(&[0, 1, 0]),
                    None,
                ),
                6 => writer
                    .typed::<DoubleType>()
                    .write_batch(&[12.5], Some(&[0, 1, 0]), None),
                _ => writer.typed::<ByteArrayType>().write_batch(
                    &text(&["Ann@Example.com"]),
                    Some(&[2, 0, 0]),
                    None,
                ),
            }
            .unwrap();
            writer.close().unwrap();
            column += 1;
        }
        group.close().unwrap();
        writer.close().unwrap();
    }

    /// An import leaves what the first read of computed traits needs: the category column (a
    /// scan of the whole store under the writer lock otherwise) and the calibration.
    #[test]
    fn an_import_leaves_the_category_column_and_the_calibration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(
            &path,
            "{\"type\":\"track\",\"messageId\":\"m1\",\"userId\":\"u1\",\"event\":\"Product Viewed\",\"timestamp\":\"2026-04-01T10:00:00Z\",\"properties\":{\"product_id\":\"P1\",\"category\":\"home\"}}\n",
        )
        .unwrap();
        let engine = Engine::open(&dir.path().join("data")).unwrap();
        assert!(!engine.hot().columns().contains(&(CATEGORY_KEY as u8)));
        import_files(&engine, &[path], 1_777_100_000_000, &Arc::default()).unwrap();
        assert!(engine.hot().columns().contains(&(CATEGORY_KEY as u8)));
        assert!(engine.has_calibration().unwrap());
        drop(engine);
        // Kept across a restart.
        let engine = Engine::open(&dir.path().join("data")).unwrap();
        assert!(engine.hot().columns().contains(&(CATEGORY_KEY as u8)));
    }

    #[test]
    fn parquet_files_import_like_any_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.parquet");
        write_parquet(&path);
        let engine = Engine::open(&dir.path().join("data")).unwrap();
        let summary = import_files(
            &engine,
            std::slice::from_ref(&path),
            1_777_100_000_000,
            &Arc::default(),
        )
        .unwrap();
        assert_eq!(
            (summary.accepted, summary.quarantined),
            (2, 1),
            "{summary:?}"
        );
        assert_eq!(summary.quarantined_by_reason[&Reason::MissingIdentity], 1);
        let profile = engine
            .find_profile("ann@example.com")
            .expect("email from the struct column");
        let events = engine.timeline(profile, None, 0, 10).unwrap();
        let order = &events[0].message;
        assert_eq!(order.timestamp, 1_777_000_060_000);
        assert_eq!(order.properties["revenue"], 30);
        assert_eq!(order.properties["currency"], "EUR");
        let again = import_files(&engine, &[path], 1_777_100_000_000, &Arc::default()).unwrap();
        assert_eq!(again.accepted, 0);
    }

    /// A row with too few or too many fields is quarantined with its line; the other rows of
    /// the file are imported.
    #[test]
    fn a_malformed_csv_row_is_quarantined_not_the_end_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("events.csv");
        std::fs::write(
            &path,
            "type,messageId,timestamp,userId,event\n\
             track,c1,2026-04-01T10:00:00Z,u9,Order Completed\n\
             track,c2,2026-04-02T10:00:00Z,u9\n\
             track,c3,2026-04-03T10:00:00Z,u9,Order Completed,extra\n\
             track,c4,2026-04-04T10:00:00Z,u9,Page Scrolled\n",
        )
        .unwrap();
        let engine = Engine::open(&dir.path().join("data")).unwrap();
        let summary = import_files(&engine, &[path], 1_777_100_000_000, &Arc::default()).unwrap();
        assert_eq!(
            (summary.accepted, summary.quarantined),
            (2, 2),
            "{summary:?}"
        );
        assert_eq!(summary.quarantined_by_reason[&Reason::MalformedRow], 2);
        let details: Vec<String> = engine
            .quarantined(None, 10)
            .unwrap()
            .into_iter()
            .map(|q| q.detail)
            .collect();
        assert!(
            details
                .iter()
                .any(|d| d.contains("events.csv:3") && d.contains("4 fields, the header 5")),
            "{details:?}"
        );
    }

    #[test]
    fn csv_rows_become_segment_messages() {
        let headers: Vec<String> = [
            "type",
            "userId",
            "event",
            "properties.revenue",
            "properties.sku",
            "context.campaign.source",
        ]
        .map(String::from)
        .to_vec();
        let row =
            csv::StringRecord::from(vec!["track", "u1", "Order Completed", "19.5", "007", "nl"]);
        let message = csv_row_to_message(&headers, &row);
        assert_eq!(
            message,
            serde_json::json!({
                "type": "track", "userId": "u1", "event": "Order Completed",
                "properties": {"revenue": 19.5, "sku": "007"},
                "context": {"campaign": {"source": "nl"}}
            })
        );
    }
}
