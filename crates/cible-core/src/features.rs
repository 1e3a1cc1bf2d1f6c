//! Per-profile feature vectors for models: a documented list of numbers per live profile, from the
//! hot timeline and the computed traits, optional standardization (z-score or min-max over the
//! population), and a Parquet writer (`cible export features`).

use std::path::Path;
use std::sync::Arc;

use serde::Serialize;

use crate::computed::{ComputedTraits, DAY};
use crate::error::EngineError;
use crate::hot::Timeline;

/// The features every profile gets, in column order (then one `category_<name>` column per
/// category seen, the profile's affinity weight for it).
pub const FEATURES: [&str; 19] = [
    "recency_days",
    "frequency",
    "monetary",
    "opens_7d",
    "opens_30d",
    "opens_90d",
    "clicks_7d",
    "clicks_30d",
    "clicks_90d",
    "page_views_7d",
    "page_views_30d",
    "page_views_90d",
    "cart_adds_7d",
    "cart_adds_30d",
    "cart_adds_90d",
    "avg_time_on_page_s",
    "engagement",
    "days_since_first_seen",
    "days_since_last_seen",
];

/// How columns are rescaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scaling {
    None,
    /// (x - mean) / standard deviation (population); 0 for a constant column.
    ZScore,
    /// (x - min) / (max - min); 0 for a constant column.
    MinMax,
}

/// Features of every live profile, row-major.
#[derive(Debug, Clone, Serialize)]
pub struct FeatureTable {
    pub names: Vec<String>,
    pub profiles: Vec<u32>,
    pub rows: Vec<Vec<f64>>,
}

/// What a column was rescaled with, to apply the same to new data.
#[derive(Debug, Clone, Serialize)]
pub struct ColumnScale {
    pub name: String,
    /// Mean and standard deviation, or min and max.
    pub center: f64,
    pub spread: f64,
}

impl FeatureTable {
    /// The column named `name`.
    pub fn column(&self, name: &str) -> Option<Vec<f64>> {
        let index = self.names.iter().position(|n| n == name)?;
        Some(self.rows.iter().map(|row| row[index]).collect())
    }

    /// Rescales every column in place; returns what each was scaled with.
    pub fn scale(&mut self, scaling: Scaling) -> Vec<ColumnScale> {
        let n = self.rows.len().max(1) as f64;
        let mut scales = Vec::new();
        for (index, name) in self.names.iter().enumerate() {
            let values = self.rows.iter().map(|row| row[index]);
            let (center, spread) = match scaling {
                Scaling::None => continue,
                Scaling::ZScore => {
                    let mean = values.clone().sum::<f64>() / n;
                    let variance = values.map(|v| (v - mean).powi(2)).sum::<f64>() / n;
                    (mean, variance.sqrt())
                }
                Scaling::MinMax => {
                    let min = values.clone().fold(f64::INFINITY, f64::min);
                    let max = values.fold(f64::NEG_INFINITY, f64::max);
                    (min, max - min)
                }
            };
            for row in &mut self.rows {
                row[index] = if spread > 0.0 {
                    (row[index] - center) / spread
                } else {
                    0.0
                };
            }
            scales.push(ColumnScale {
                name: name.clone(),
                center,
                spread,
            });
        }
        scales
    }

    /// Writes the table as Parquet: `profile` (INT32) then one DOUBLE column per feature.
    pub fn write_parquet(&self, path: &Path) -> Result<(), EngineError> {
        use parquet::data_type::{DoubleType, Int32Type};
        use parquet::file::properties::WriterProperties;
        use parquet::file::writer::SerializedFileWriter;
        use parquet::schema::types::Type;

        let error = |e: parquet::errors::ParquetError| {
            EngineError::Invalid(format!("writing {}: {e}", path.display()))
        };
        let mut fields = vec![Arc::new(
            Type::primitive_type_builder("profile", parquet::basic::Type::INT32)
                .with_repetition(parquet::basic::Repetition::REQUIRED)
                .build()
                .map_err(error)?,
        )];
        for name in &self.names {
            fields.push(Arc::new(
                Type::primitive_type_builder(name, parquet::basic::Type::DOUBLE)
                    .with_repetition(parquet::basic::Repetition::REQUIRED)
                    .build()
                    .map_err(error)?,
            ));
        }
        let schema = Type::group_type_builder("features")
            .with_fields(fields)
            .build()
            .map_err(error)?;
        let file = std::fs::File::create(path)
            .map_err(|e| EngineError::Invalid(format!("creating {}: {e}", path.display())))?;
        let props = Arc::new(WriterProperties::builder().build());
        let mut writer = SerializedFileWriter::new(file, Arc::new(schema), props).map_err(error)?;
        for (rows, profiles) in self.rows.chunks(100_000).zip(self.profiles.chunks(100_000)) {
            let mut group = writer.next_row_group().map_err(error)?;
            let mut column = 0;
            while let Some(mut out) = group.next_column().map_err(error)? {
                if column == 0 {
                    let ids: Vec<i32> = profiles.iter().map(|p| *p as i32).collect();
                    out.typed::<Int32Type>()
                        .write_batch(&ids, None, None)
                        .map_err(error)?;
                } else {
                    let values: Vec<f64> = rows.iter().map(|row| row[column - 1]).collect();
                    out.typed::<DoubleType>()
                        .write_batch(&values, None, None)
                        .map_err(error)?;
                }
                out.close().map_err(error)?;
                column += 1;
            }
            group.close().map_err(error)?;
        }
        writer.close().map_err(error)?;
        Ok(())
    }
}

/// What a feature row is computed with: the event ids the counts read.
#[derive(Debug, Clone, Default)]
pub struct FeaturePlan {
    /// Email Opened, Email Link Clicked, Page Viewed, Product Added.
    counted: [Option<u16>; 4],
    order: Option<u16>,
    rfm_window_days: u32,
}

impl FeaturePlan {
    pub fn new(id: &dyn Fn(&str) -> Option<u16>, rfm_window_days: u32) -> Self {
        Self {
            counted: [
                id("Email Opened"),
                id("Email Link Clicked"),
                id("Page Viewed"),
                id("Product Added"),
            ],
            order: id("Order Completed"),
            rfm_window_days,
        }
    }
}

/// The [`FEATURES`] of one profile at `now` (seconds), and the next instant one of them changes
/// with no new event (window exits, whole days passing), the traits' own next change included.
/// Every feature is constant between such instants, so a model's output is too.
pub fn row(
    timeline: &Timeline<'_>,
    now: u32,
    traits: &ComputedTraits,
    plan: &FeaturePlan,
) -> ([f64; FEATURES.len()], Option<u32>) {
    let mut next = traits.next_change;
    let mut at = |t: u32| {
        if t > now {
            next = Some(next.map_or(t, |n| n.min(t)));
        }
    };
    let seen = timeline.events.partition_point(|e| e.ts <= now);
    let events = &timeline.events[..seen];
    // One pass over the last 90 days: counts per (name, window), time on page.
    let windows = [7, 30, 90].map(|d| d * DAY);
    let starts = windows.map(|w| now.saturating_sub(w));
    let mut counts = [[0.0f64; 3]; 4];
    let (mut time_on_page, mut pages_timed) = (0.0, 0usize);
    let recent = events.partition_point(|e| e.ts <= starts[2]);
    for e in &events[recent..] {
        let Some(n) = plan.counted.iter().position(|n| *n == Some(e.name)) else {
            continue;
        };
        for ((count, start), window) in counts[n].iter_mut().zip(starts).zip(windows) {
            if e.ts > start {
                *count += 1.0;
                at(e.ts.saturating_add(window));
            }
        }
        // duration_s, the fifth of the value properties, when the row holds it.
        if n == 2 && e.value_property() == Some(4) && !e.value.is_nan() {
            time_on_page += f64::from(e.value);
            pages_timed += 1;
        }
    }
    // Whole days since `ts`; the next whole day is a change.
    let mut days = |ts: u32| {
        let days = (now - ts) / DAY;
        at(ts.saturating_add((days + 1).saturating_mul(DAY)));
        f64::from(days)
    };
    let rfm = traits.rfm.as_ref();
    let recency = match rfm.and_then(|_| events.iter().rev().find(|e| Some(e.name) == plan.order)) {
        Some(last) => days(last.ts),
        None => f64::from(plan.rfm_window_days),
    };
    let first_seen = events.first().map_or(0.0, |e| days(e.ts));
    let last_seen = events.last().map_or(0.0, |e| days(e.ts));
    let mut row = [0.0; FEATURES.len()];
    row[0] = recency;
    row[1] = rfm.map_or(0.0, |r| f64::from(r.frequency));
    row[2] = rfm.map_or(0.0, |r| r.monetary);
    for (slot, count) in row[3..15].iter_mut().zip(counts.iter().flatten()) {
        *slot = *count;
    }
    row[15] = if pages_timed == 0 {
        0.0
    } else {
        time_on_page / pages_timed as f64
    };
    row[16] = f64::from(traits.score.engagement);
    row[17] = first_seen;
    row[18] = last_seen;
    (row, next)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW_MS: i64 = 1_777_593_600_000; // 2026-05-01T00:00:00Z

    #[test]
    fn features_match_the_messages_scale_and_round_trip_through_parquet() {
        let (dir, engine) = crate::test_support::generated_store(400, 100, 3, NOW_MS);
        let table = engine.features(NOW_MS).unwrap();
        assert_eq!(table.rows.len(), engine.live_profiles().len());
        assert!(table.names.iter().any(|n| n.starts_with("category_")));

        // Reference: counts and mean time on page from the stored messages.
        let now = NOW_MS / 1000;
        let mut expected: std::collections::BTreeMap<u32, (f64, f64, Vec<f64>)> =
            Default::default();
        engine
            .for_each_event(|event| {
                let ts = event.message.timestamp.div_euclid(1000);
                let entry = expected.entry(event.profile).or_default();
                let name = event.message.behavioral_name().unwrap_or("");
                if name == "Email Opened" && ts > now - 30 * 86_400 && ts <= now {
                    entry.0 += 1.0;
                }
                if name == "Page Viewed" && ts > now - 7 * 86_400 && ts <= now {
                    entry.1 += 1.0;
                }
                if name == "Page Viewed"
                    && ts > now - 90 * 86_400
                    && ts <= now
                    && let Some(d) = event.message.duration_s()
                {
                    entry.2.push(d);
                }
                Ok(())
            })
            .unwrap();
        let opens = table.column("opens_30d").unwrap();
        let views = table.column("page_views_7d").unwrap();
        let time_on_page = table.column("avg_time_on_page_s").unwrap();
        for (i, profile) in table.profiles.iter().enumerate() {
            let (o, v, durations) = expected.get(profile).cloned().unwrap_or_default();
            assert_eq!((opens[i], views[i]), (o, v), "profile {profile}");
            let mean = if durations.is_empty() {
                0.0
            } else {
                durations.iter().sum::<f64>() / durations.len() as f64
            };
            // Hot rows keep durations as f32.
            assert!(
                (time_on_page[i] - mean).abs() < 1e-3 * mean.max(1.0),
                "{profile}"
            );
        }

        let mut scaled = table.clone();
        scaled.scale(Scaling::ZScore);
        for name in &scaled.names {
            let column = scaled.column(name).unwrap();
            let n = column.len() as f64;
            let mean = column.iter().sum::<f64>() / n;
            let std = (column.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
            assert!(mean.abs() < 1e-9, "{name} mean {mean}");
            assert!(std == 0.0 || (std - 1.0).abs() < 1e-9, "{name} std {std}");
        }
        let mut unit = table.clone();
        unit.scale(Scaling::MinMax);
        assert!(unit.rows.iter().flatten().all(|v| (0.0..=1.0).contains(v)));

        let file = dir.path().join("features.parquet");
        table.write_parquet(&file).unwrap();
        use parquet::file::reader::{FileReader, SerializedFileReader};
        use parquet::record::RowAccessor;
        let reader = SerializedFileReader::new(std::fs::File::open(&file).unwrap()).unwrap();
        let metadata = reader.metadata().file_metadata();
        assert_eq!(metadata.num_rows() as usize, table.rows.len());
        assert_eq!(metadata.schema_descr().num_columns(), table.names.len() + 1);
        let first = reader.get_row_iter(None).unwrap().next().unwrap().unwrap();
        assert_eq!(first.get_int(0).unwrap() as u32, table.profiles[0]);
        assert_eq!(first.get_double(1).unwrap(), table.rows[0][0]);
    }
}
