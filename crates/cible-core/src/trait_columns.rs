//! The profile traits that segment rules read (`trait.plan`), kept in memory by profile ordinal,
//! one column per trait name, so that evaluating a rule over a million profiles does not read and
//! decode a million profile records.
//!
//! Derived state, like the hot store: a column is built from the `profiles` keyspace the first
//! time a rule reads that trait (under the writer lock), then updated by the writer after every
//! commit that rewrites a profile record (ingest, unmerge, removal). Not persisted: rebuilt on
//! first use after a start.

use std::collections::BTreeMap;

use crate::records::TraitValue;

#[derive(Debug, Default)]
pub struct TraitColumns {
    columns: Vec<(String, Vec<Option<TraitValue>>)>,
}

impl TraitColumns {
    pub fn has(&self, name: &str) -> bool {
        self.columns.iter().any(|(n, _)| n == name)
    }

    pub fn is_empty(&self) -> bool {
        self.columns.is_empty()
    }

    pub fn add(&mut self, name: String, values: Vec<Option<TraitValue>>) {
        if !self.has(&name) {
            self.columns.push((name, values));
        }
    }

    /// A profile record was written with these traits.
    pub fn update(&mut self, profile: u32, traits: &BTreeMap<String, TraitValue>) {
        for (name, values) in &mut self.columns {
            let index = profile as usize;
            if values.len() <= index {
                values.resize(index + 1, None);
            }
            values[index] = traits.get(name).cloned();
        }
    }

    /// The profile's traits among the kept ones.
    pub fn traits_of(&self, profile: u32) -> BTreeMap<String, TraitValue> {
        self.columns
            .iter()
            .filter_map(|(name, values)| {
                let value = values.get(profile as usize)?.clone()?;
                Some((name.clone(), value))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_follow_updates() {
        let mut columns = TraitColumns::default();
        let plan = |v: &str| TraitValue {
            value: serde_json::Value::from(v),
            at: 1,
        };
        columns.add("plan".into(), vec![None, Some(plan("pro"))]);
        assert_eq!(columns.traits_of(1)["plan"], plan("pro"));
        assert!(columns.traits_of(0).is_empty() && columns.traits_of(9).is_empty());
        let mut traits = BTreeMap::new();
        traits.insert("plan".to_string(), plan("free"));
        traits.insert("country".to_string(), plan("FR"));
        columns.update(5, &traits);
        assert_eq!(columns.traits_of(5).len(), 1, "only kept traits");
        columns.update(1, &BTreeMap::new());
        assert!(columns.traits_of(1).is_empty());
    }
}
