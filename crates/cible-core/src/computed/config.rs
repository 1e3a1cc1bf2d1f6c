//! The computed-traits configuration: `traits.toml` in the data directory, every field optional
//! (the defaults below are what `cible traits config` prints and what the README documents).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The file name, in the data directory.
pub const FILE_NAME: &str = "traits.toml";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TraitConfig {
    pub engagement: Engagement,
    pub rfm: Rfm,
    pub intent: Intent,
    pub lifecycle: Lifecycle,
    pub send_time: SendTime,
    pub affinity: Affinity,
}

/// Engagement score: each event weighs `weights[name]`, halved every `half_life_days`; the score
/// is the profile's percentile (0-100) in the population.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Engagement {
    pub half_life_days: f64,
    /// Include events flagged as anomalies (bursts, time on page over 4 h).
    pub include_anomalies: bool,
    pub weights: BTreeMap<String, f64>,
}

impl Default for Engagement {
    fn default() -> Self {
        let weights = [
            ("Email Opened", 1.0),
            ("Email Link Clicked", 3.0),
            ("Page Viewed", 0.5),
            ("Product Viewed", 1.0),
            ("Product Added", 3.0),
            ("Cart Viewed", 2.0),
            ("Checkout Started", 4.0),
            ("Order Completed", 8.0),
        ];
        Self {
            half_life_days: 14.0,
            include_anomalies: false,
            weights: weights
                .into_iter()
                .map(|(n, w)| (n.to_string(), w))
                .collect(),
        }
    }
}

/// RFM over orders in the last `window_days`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rfm {
    pub window_days: u32,
    pub order_event: String,
}

impl Default for Rfm {
    fn default() -> Self {
        Self {
            window_days: 365,
            order_event: "Order Completed".into(),
        }
    }
}

/// Purchase intent from signals in the last `window_days` after the last order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Intent {
    pub window_days: u32,
    /// Score from which the level is "medium", then "high".
    pub medium: f64,
    pub high: f64,
    /// Extra weight of each view of a product already viewed in the window.
    pub repeat_view_weight: f64,
    pub signals: Vec<Signal>,
}

/// One kind of intent signal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signal {
    pub event: String,
    pub weight: f64,
    /// "weak" or "strong" (documentation; the weight decides).
    #[serde(default = "weak")]
    pub strength: String,
    /// Only events whose `path` starts with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Only events whose `duration_s` is at least this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_duration_s: Option<f64>,
}

fn weak() -> String {
    "weak".into()
}

impl Default for Intent {
    fn default() -> Self {
        let signal = |event: &str, weight: f64, strength: &str| Signal {
            event: event.into(),
            weight,
            strength: strength.into(),
            path_prefix: None,
            min_duration_s: None,
        };
        Self {
            window_days: 14,
            medium: 5.0,
            high: 12.0,
            repeat_view_weight: 1.0,
            signals: vec![
                signal("Product Viewed", 1.0, "weak"),
                Signal {
                    path_prefix: Some("/products/".into()),
                    min_duration_s: Some(60.0),
                    ..signal("Page Viewed", 1.0, "weak")
                },
                Signal {
                    path_prefix: Some("/blog/".into()),
                    ..signal("Page Viewed", 0.5, "weak")
                },
                signal("Product Added", 3.0, "strong"),
                signal("Cart Viewed", 3.0, "strong"),
                signal("Checkout Started", 5.0, "strong"),
                signal("Contact Requested", 6.0, "strong"),
                signal("Quote Requested", 6.0, "strong"),
            ],
        }
    }
}

/// Lifecycle thresholds, in days.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Lifecycle {
    /// A profile first seen this recently is "new".
    pub new_days: u32,
    /// Active means an engagement event this recently; inactive longer is "at_risk".
    pub active_days: u32,
    pub dormant_days: u32,
    pub churned_days: u32,
    /// "reactivated" lasts this long after a return from a gap of `dormant_days`.
    pub reactivated_days: u32,
    /// Orders within `loyal_window_days` that make an active profile "loyal".
    pub loyal_orders: u32,
    pub loyal_window_days: u32,
}

impl Default for Lifecycle {
    fn default() -> Self {
        Self {
            new_days: 14,
            active_days: 30,
            dormant_days: 60,
            churned_days: 120,
            reactivated_days: 30,
            loyal_orders: 3,
            loyal_window_days: 365,
        }
    }
}

/// Send-time preference from opens and clicks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SendTime {
    pub events: Vec<String>,
    /// Fewer opens and clicks than this: the population's best hour and weekday.
    pub min_events: u32,
}

impl Default for SendTime {
    fn default() -> Self {
        Self {
            events: vec!["Email Opened".into(), "Email Link Clicked".into()],
            min_events: 3,
        }
    }
}

/// Favourite category from product views and adds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Affinity {
    pub window_days: u32,
    pub weights: BTreeMap<String, f64>,
}

impl Default for Affinity {
    fn default() -> Self {
        Self {
            window_days: 90,
            weights: [("Product Viewed", 1.0), ("Product Added", 3.0)]
                .into_iter()
                .map(|(n, w)| (n.to_string(), w))
                .collect(),
        }
    }
}

impl TraitConfig {
    /// Parses and checks a configuration; errors name the field and the reason.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let config: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        let positive = |field: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(format!("{field}: must be a positive number, found {value}"))
            }
        };
        positive("engagement.half_life_days", self.engagement.half_life_days)?;
        for (name, weight) in &self.engagement.weights {
            if !weight.is_finite() {
                return Err(format!("engagement.weights.\"{name}\": not a number"));
            }
        }
        let days = [
            ("rfm.window_days", self.rfm.window_days),
            ("intent.window_days", self.intent.window_days),
            ("lifecycle.new_days", self.lifecycle.new_days),
            ("lifecycle.active_days", self.lifecycle.active_days),
            ("lifecycle.dormant_days", self.lifecycle.dormant_days),
            ("lifecycle.churned_days", self.lifecycle.churned_days),
            (
                "lifecycle.reactivated_days",
                self.lifecycle.reactivated_days,
            ),
            (
                "lifecycle.loyal_window_days",
                self.lifecycle.loyal_window_days,
            ),
            ("affinity.window_days", self.affinity.window_days),
        ];
        for (field, value) in days {
            if value == 0 {
                return Err(format!("{field}: must be at least 1 day"));
            }
        }
        let l = &self.lifecycle;
        if !(l.active_days < l.dormant_days && l.dormant_days < l.churned_days) {
            return Err(format!(
                "lifecycle: active_days ({}) < dormant_days ({}) < churned_days ({}) must hold",
                l.active_days, l.dormant_days, l.churned_days
            ));
        }
        if self.intent.medium > self.intent.high {
            return Err(format!(
                "intent.medium ({}) must not exceed intent.high ({})",
                self.intent.medium, self.intent.high
            ));
        }
        for (i, signal) in self.intent.signals.iter().enumerate() {
            if !matches!(signal.strength.as_str(), "weak" | "strong") {
                return Err(format!(
                    "intent.signals[{i}].strength: \"weak\" or \"strong\", found {:?}",
                    signal.strength
                ));
            }
        }
        Ok(())
    }

    /// The configuration as TOML (the defaults when nothing was configured).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("the configuration serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_round_trip_and_partial_files_keep_defaults() {
        let defaults = TraitConfig::default();
        assert_eq!(TraitConfig::from_toml(&defaults.to_toml()), Ok(defaults));
        let config = TraitConfig::from_toml("[engagement]\nhalf_life_days = 7\n").unwrap();
        assert_eq!(config.engagement.half_life_days, 7.0);
        assert_eq!(config.rfm, Rfm::default());
        assert_eq!(TraitConfig::from_toml("").unwrap(), TraitConfig::default());
    }

    #[test]
    fn the_readme_example_is_a_valid_configuration() {
        let readme = include_str!("../../../../README.md");
        let start = readme.find("```toml\n").expect("a toml block") + 8;
        let end = start + readme[start..].find("```").unwrap();
        let config = TraitConfig::from_toml(&readme[start..end]).unwrap();
        assert_eq!(config.engagement.half_life_days, 7.0);
        assert_eq!(config.lifecycle.active_days, 21);
        assert_eq!(config.intent.signals.len(), 1);
        assert_eq!(config.rfm, Rfm::default());
    }

    #[test]
    fn errors_name_the_field() {
        let error = TraitConfig::from_toml("[engagement]\nhalf_life_days = 0\n").unwrap_err();
        assert!(error.contains("engagement.half_life_days"), "{error}");
        let error = TraitConfig::from_toml("[rfm]\nwindow = 3\n").unwrap_err();
        assert!(error.contains("window"), "{error}");
        let error = TraitConfig::from_toml("[lifecycle]\ndormant_days = 10\n").unwrap_err();
        assert!(error.contains("dormant_days"), "{error}");
        let error = TraitConfig::from_toml("[lifecycle]\ndormant_days = 20\n").unwrap_err();
        assert_eq!(
            error,
            "lifecycle: active_days (30) < dormant_days (20) < churned_days (120) must hold"
        );
    }
}
