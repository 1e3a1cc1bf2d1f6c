//! Product recommendations for dynamic e-mail content: abandoned cart items, recently viewed
//! but not bought, "viewed X, bought Y" and the top sellers of the profile's favourite
//! categories. The population part (top sellers per category, what viewers of a product bought)
//! is a [`ProductModel`] built from every profile's full messages by `cible traits refresh`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

/// Days an add to cart or a view stays recent.
pub const RECENT_DAYS: i64 = 30;
/// Items kept per category and per viewed product.
const KEPT: usize = 20;

/// What one profile did with products, from its full messages.
#[derive(Debug, Clone, Default)]
pub struct Activity {
    /// (time ms, product, category) of product views and adds, oldest first.
    pub viewed: Vec<(i64, String, Option<String>)>,
    pub added: Vec<(i64, String, Option<String>)>,
    /// (time ms, product, category) of every product of every order.
    pub bought: Vec<(i64, String, Option<String>)>,
}

fn text(properties: &serde_json::Map<String, Json>, field: &str) -> Option<String> {
    properties.get(field)?.as_str().map(str::to_string)
}

const VIEWED: &str = "Product Viewed";
const ADDED: &str = "Product Added";
const ORDERED: &str = "Order Completed";
/// The only events [`Activity::add`] reads: nothing else needs its body read.
pub const ACTIVITY_EVENTS: [&str; 3] = [VIEWED, ADDED, ORDERED];

impl Activity {
    /// Adds one event (by name, as the segment language calls it).
    pub fn add(&mut self, name: &str, ts: i64, properties: &serde_json::Map<String, Json>) {
        let item = |p: &serde_json::Map<String, Json>| {
            Some((ts, text(p, "product_id")?, text(p, "category")))
        };
        match name {
            VIEWED => self.viewed.extend(item(properties)),
            ADDED => self.added.extend(item(properties)),
            ORDERED => {
                if let Some(Json::Array(products)) = properties.get("products") {
                    for product in products.iter().filter_map(Json::as_object) {
                        self.bought.extend(item(product));
                    }
                }
                self.bought.extend(item(properties));
            }
            _ => {}
        }
    }

    fn bought_set(&self) -> BTreeSet<&str> {
        self.bought.iter().map(|(_, p, _)| p.as_str()).collect()
    }
}

/// The population's product statistics.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProductModel {
    /// When it was built, ms.
    pub at: i64,
    /// Best sellers (by number of buyers) per category, best first.
    pub top: BTreeMap<String, Vec<String>>,
    /// Per viewed product, what its viewers bought (other products), most buyers first.
    pub also_bought: BTreeMap<String, Vec<String>>,
    pub profiles: u64,
}

/// Counts gathered over profiles, merged in any order.
#[derive(Debug, Default)]
pub struct ModelCounts {
    /// (category, product) -> buyers.
    buyers: BTreeMap<(String, String), u64>,
    /// (viewed, bought) -> profiles.
    pairs: BTreeMap<(String, String), u64>,
    profiles: u64,
}

impl ModelCounts {
    pub fn add(&mut self, activity: &Activity) {
        self.profiles += 1;
        let bought: BTreeMap<&str, Option<&String>> = activity
            .bought
            .iter()
            .map(|(_, p, c)| (p.as_str(), c.as_ref()))
            .collect();
        for (product, category) in &bought {
            if let Some(category) = category {
                *self
                    .buyers
                    .entry(((*category).clone(), (*product).to_string()))
                    .or_default() += 1;
            }
        }
        let viewed: BTreeSet<&str> = activity.viewed.iter().map(|(_, p, _)| p.as_str()).collect();
        for x in &viewed {
            for y in bought.keys() {
                if x != y {
                    *self
                        .pairs
                        .entry((x.to_string(), y.to_string()))
                        .or_default() += 1;
                }
            }
        }
    }

    pub fn merge(mut self, other: Self) -> Self {
        for (key, n) in other.buyers {
            *self.buyers.entry(key).or_default() += n;
        }
        for (key, n) in other.pairs {
            *self.pairs.entry(key).or_default() += n;
        }
        self.profiles += other.profiles;
        self
    }

    pub fn finish(self, at: i64) -> ProductModel {
        // Most counted first, then by name for equal counts.
        let ranked = |counts: BTreeMap<(String, String), u64>| {
            let mut grouped: BTreeMap<String, Vec<(u64, String)>> = BTreeMap::new();
            for ((group, item), n) in counts {
                grouped.entry(group).or_default().push((n, item));
            }
            grouped
                .into_iter()
                .map(|(group, mut items)| {
                    items.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                    (
                        group,
                        items.into_iter().take(KEPT).map(|(_, i)| i).collect(),
                    )
                })
                .collect()
        };
        ProductModel {
            at,
            top: ranked(self.buyers),
            also_bought: ranked(self.pairs),
            profiles: self.profiles,
        }
    }
}

/// One recommended product and why.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recommendation {
    pub product_id: String,
    /// abandoned_cart, recently_viewed, viewed_also_bought or top_in_category.
    pub reason: &'static str,
    /// The viewed product (viewed_also_bought) or the category (top_in_category).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub because: Option<String>,
}

/// Up to `n` products for a profile at `now` (ms): abandoned cart items (most recent first),
/// then recently viewed and not bought, then what viewers of those bought, then the best sellers
/// of its favourite categories (by views and adds, adds counting three). Never a product it
/// bought.
pub fn recommend(
    activity: &Activity,
    model: &ProductModel,
    now: i64,
    n: usize,
) -> Vec<Recommendation> {
    let bought = activity.bought_set();
    let recent = now - RECENT_DAYS * 86_400_000;
    let mut out: Vec<Recommendation> = Vec::new();
    let push = |out: &mut Vec<Recommendation>, product: &str, reason, because: Option<&str>| {
        if out.len() < n
            && !bought.contains(product)
            && !out.iter().any(|r| r.product_id == product)
        {
            out.push(Recommendation {
                product_id: product.to_string(),
                reason,
                because: because.map(str::to_string),
            });
        }
    };
    let recent_first = |items: &[(i64, String, Option<String>)]| -> Vec<String> {
        let mut seen = BTreeSet::new();
        items
            .iter()
            .rev()
            .filter(|(ts, _, _)| *ts > recent && *ts <= now)
            .filter(|(_, p, _)| seen.insert(p.clone()))
            .map(|(_, p, _)| p.clone())
            .collect()
    };
    for product in recent_first(&activity.added) {
        push(&mut out, &product, "abandoned_cart", None);
    }
    let viewed = recent_first(&activity.viewed);
    for product in &viewed {
        push(&mut out, product, "recently_viewed", None);
    }
    for product in &viewed {
        for other in model.also_bought.get(product).into_iter().flatten() {
            push(&mut out, other, "viewed_also_bought", Some(product));
        }
    }
    let mut affinity: BTreeMap<&str, u64> = BTreeMap::new();
    for (items, weight) in [(&activity.viewed, 1), (&activity.added, 3)] {
        for (_, _, category) in items.iter().filter(|(ts, _, _)| *ts <= now) {
            if let Some(category) = category {
                *affinity.entry(category.as_str()).or_default() += weight;
            }
        }
    }
    let mut favourites: Vec<(&str, u64)> = affinity.into_iter().collect();
    favourites.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    for (category, _) in favourites {
        for product in model.top.get(category).into_iter().flatten() {
            push(&mut out, product, "top_in_category", Some(category));
        }
    }
    out
}
