//! `cible generate`: realistic synthetic Segment messages for demos, tests and benchmarks.
//!
//! The model, per profile: an activity level drawn from a Pareto law (a few very active people,
//! a long tail of occasional ones); a lifecycle (new, engaged, dormant, churned, reactivated)
//! that decides on which days the person is active; weekday and hour-of-day seasonality;
//! anonymous browsing first, identified later for most people; a favourite product category;
//! sessions that view pages and products, add to cart and sometimes order, more often after an
//! e-mail click or a cart add; three e-mails a week (newsletter, promotion, weekend deals) sent
//! to identified people, opened and clicked according to their activity. A small share of messages are exact duplicates (same messageId),
//! and a few are anomalies (time on page over 4 h, bot bursts, far-future timestamps, messages
//! missing their event name).
//!
//! Output is one JSON message per line, each profile's messages in time order, profiles one after
//! the other. The same seed, profile count, days and end time give the same bytes: each profile
//! draws from its own ChaCha8 stream seeded from (seed, profile), so profiles are generated in
//! parallel without changing the output.

use std::io::Write;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde_json::{Value, json};

use crate::time::{DAY_MS, format_ms};

/// What to generate.
#[derive(Debug, Clone, Copy)]
pub struct GenerateOptions {
    pub profiles: u64,
    pub days: u32,
    pub seed: u64,
    /// The last instant covered, epoch ms.
    pub end_ms: i64,
}

/// What was generated.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GenerateStats {
    pub profiles: u64,
    pub messages: u64,
    pub bytes: u64,
}

const CATEGORIES: [&str; 8] = [
    "shoes", "bags", "jackets", "shirts", "watches", "beauty", "home", "sport",
];
const PRODUCTS_PER_CATEGORY: usize = 25;
const BLOG_POSTS: usize = 40;
const COUNTRIES: [&str; 6] = ["FR", "BE", "DE", "ES", "US", "GB"];
const PLANS: [&str; 3] = ["free", "plus", "pro"];
const SOURCES: [&str; 4] = ["google", "newsletter", "instagram", "partner"];
const FIRST_NAMES: [&str; 10] = [
    "alice", "bruno", "chloe", "david", "emma", "farid", "giulia", "hugo", "ines", "jules",
];

fn product_price(category: usize, product: usize) -> f64 {
    let base = [90.0, 120.0, 160.0, 40.0, 250.0, 30.0, 60.0, 70.0][category];
    (base * (0.5 + (product as f64 * 0.37).fract())).round()
}

#[derive(Clone, Copy)]
enum Lifecycle {
    New,
    Engaged,
    Dormant,
    Churned,
    Reactivated,
}

/// Writes the messages; returns counts.
/// [`generate`] into a file, gzip-compressed when its name ends in `.gz`.
pub fn write_file(
    options: &GenerateOptions,
    out: &std::path::Path,
) -> std::io::Result<GenerateStats> {
    let file = std::fs::File::create(out).map_err(|error| {
        std::io::Error::new(error.kind(), format!("creating {}: {error}", out.display()))
    })?;
    let mut writer = std::io::BufWriter::with_capacity(1 << 20, file);
    if out.extension().is_some_and(|e| e == "gz") {
        let mut encoder = flate2::write::GzEncoder::new(writer, flate2::Compression::fast());
        let stats = generate(options, &mut encoder)?;
        encoder.finish()?.flush()?;
        Ok(stats)
    } else {
        let stats = generate(options, &mut writer)?;
        writer.flush()?;
        Ok(stats)
    }
}

pub fn generate(options: &GenerateOptions, out: &mut dyn Write) -> std::io::Result<GenerateStats> {
    const BLOCK: u64 = 2_000;
    let mut stats = GenerateStats::default();
    let mut start = 0;
    while start < options.profiles {
        let end = (start + BLOCK * 16).min(options.profiles);
        let blocks: Vec<(Vec<u8>, u64)> = (start..end)
            .step_by(BLOCK as usize)
            .collect::<Vec<_>>()
            .into_par_iter()
            .map(|block_start| {
                let mut buffer = Vec::new();
                let mut messages = 0;
                for profile in block_start..(block_start + BLOCK).min(end) {
                    messages += generate_profile(options, profile, &mut buffer);
                }
                (buffer, messages)
            })
            .collect();
        for (buffer, messages) in blocks {
            out.write_all(&buffer)?;
            stats.bytes += buffer.len() as u64;
            stats.messages += messages;
        }
        start = end;
    }
    stats.profiles = options.profiles;
    Ok(stats)
}

struct ProfileGen<'a> {
    rng: ChaCha8Rng,
    out: &'a mut Vec<u8>,
    messages: u64,
    anonymous_id: String,
    user_id: Option<String>,
    message_counter: u64,
    profile: u64,
    end_ms: i64,
}

impl ProfileGen<'_> {
    /// Emits a message dated at or before the end of the history (later ones are dropped).
    fn emit(&mut self, message: Value, ts: i64) {
        if ts <= self.end_ms {
            self.emit_any(message, ts);
        }
    }

    fn emit_any(&mut self, mut message: Value, ts: i64) {
        let message_id = format!(
            "g{:x}-{:x}-{:x}",
            self.profile,
            self.message_counter,
            self.rng.random::<u32>()
        );
        self.message_counter += 1;
        let object = message.as_object_mut().expect("messages are objects");
        object.insert("messageId".into(), Value::String(message_id));
        object.insert("timestamp".into(), Value::String(format_ms(ts)));
        object.insert(
            "anonymousId".into(),
            Value::String(self.anonymous_id.clone()),
        );
        if let Some(user) = &self.user_id {
            object.insert("userId".into(), Value::String(user.clone()));
        }
        let line = serde_json::to_string(&message).expect("json serializes");
        let copies = if self.rng.random_bool(0.005) { 2 } else { 1 };
        for _ in 0..copies {
            self.out.extend_from_slice(line.as_bytes());
            self.out.push(b'\n');
            self.messages += 1;
        }
    }
}

/// Hour-of-day weights: quiet nights, a lunch bump, an evening peak.
const HOUR_WEIGHTS: [f64; 24] = [
    0.2, 0.1, 0.1, 0.1, 0.1, 0.2, 0.5, 1.0, 1.5, 1.6, 1.5, 1.6, 2.2, 2.0, 1.5, 1.4, 1.4, 1.6, 2.0,
    2.6, 2.8, 2.4, 1.5, 0.7,
];

fn pick_hour(rng: &mut ChaCha8Rng) -> i64 {
    let total: f64 = HOUR_WEIGHTS.iter().sum();
    let mut draw = rng.random::<f64>() * total;
    for (hour, weight) in HOUR_WEIGHTS.iter().enumerate() {
        draw -= weight;
        if draw <= 0.0 {
            return hour as i64;
        }
    }
    23
}

fn generate_profile(options: &GenerateOptions, profile: u64, out: &mut Vec<u8>) -> u64 {
    let mut rng =
        ChaCha8Rng::seed_from_u64(options.seed ^ profile.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let days = i64::from(options.days.max(1));
    let first_day = options.end_ms.div_euclid(DAY_MS) - days + 1;
    // Activity: Pareto with alpha 1.3, capped; expected sessions a week, roughly.
    let activity = (1.0 / (1.0 - rng.random::<f64>() * 0.999))
        .powf(1.0 / 1.3)
        .min(40.0)
        * 0.6;
    let lifecycle = match rng.random_range(0..100) {
        0..15 => Lifecycle::New,
        15..55 => Lifecycle::Engaged,
        55..70 => Lifecycle::Dormant,
        70..85 => Lifecycle::Churned,
        _ => Lifecycle::Reactivated,
    };
    let start = match lifecycle {
        Lifecycle::New => days - (days / 6).max(1) + rng.random_range(0..(days / 6).max(1)),
        _ => rng.random_range(0..(days * 3 / 10).max(1)),
    };
    let active = |day: i64| -> bool {
        let at = day as f64 / days as f64;
        day >= start
            && match lifecycle {
                Lifecycle::New | Lifecycle::Engaged => true,
                Lifecycle::Dormant => at < 0.6,
                Lifecycle::Churned => at < 0.35,
                Lifecycle::Reactivated => !(0.35..0.8).contains(&at),
            }
    };
    let favourite = rng.random_range(0..CATEGORIES.len());
    let identify_after = if rng.random_bool(0.7) {
        Some(start + rng.random_range(0..14))
    } else {
        None
    };
    let second_device_day = match identify_after {
        Some(day) if rng.random_bool(0.25) => Some(day + rng.random_range(1..30)),
        _ => None,
    };
    let country = COUNTRIES[rng.random_range(0..COUNTRIES.len())];
    let first_name = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
    let mut generator = ProfileGen {
        anonymous_id: format!("anon-{profile:x}-{:08x}", rng.random::<u32>()),
        rng,
        out,
        messages: 0,
        user_id: None,
        message_counter: 0,
        profile,
        end_ms: options.end_ms,
    };
    let bot = generator.rng.random_bool(0.0005);
    let mut cart: Vec<(usize, usize)> = Vec::new();
    for day in 0..days {
        let day_start = (first_day + day) * DAY_MS;
        let weekday = (first_day + day + 3).rem_euclid(7); // 0 = Monday
        if identify_after == Some(day)
            || (identify_after.is_some_and(|d| d < day) && generator.user_id.is_none())
        {
            let user_id = format!("user-{profile}");
            generator.user_id = Some(user_id);
            let ts = day_start + pick_hour(&mut generator.rng) * 3_600_000;
            let plan = PLANS[generator.rng.random_range(0..PLANS.len())];
            let traits = json!({
                "email": format!("{first_name}.{profile}@example.com"),
                "first_name": first_name, "country": country, "plan": plan,
            });
            generator.emit(json!({"type": "identify", "traits": traits}), ts);
        }
        // A second device: browsing there anonymously, then logging in, which merges it.
        if second_device_day == Some(day) && generator.user_id.is_some() {
            let user_id = generator.user_id.take();
            let first_device = std::mem::replace(
                &mut generator.anonymous_id,
                format!("anon-{profile:x}-mobile"),
            );
            let ts = day_start + pick_hour(&mut generator.rng) * 3_600_000;
            session(&mut generator, ts, favourite, None, &mut Vec::new());
            generator.user_id = user_id;
            generator.emit(
                json!({"type": "identify", "traits": {"device": "mobile"}}),
                ts + 1_800_000,
            );
            generator.anonymous_id = first_device;
        }
        // E-mails to identified people, whatever their activity: the newsletter on Tuesdays,
        // promotions on Thursdays and weekend deals on Saturdays.
        let mut clicked_campaign = None;
        let campaign_kind = match weekday {
            1 => Some("newsletter"),
            3 => Some("promo"),
            5 => Some("weekend"),
            _ => None,
        };
        if let Some(kind) = campaign_kind
            && generator.user_id.is_some()
        {
            let campaign = format!("{kind}-{}", (first_day + day) / 7);
            let ts = day_start + 9 * 3_600_000 + generator.rng.random_range(0..3_600_000);
            let props =
                json!({"campaign_id": campaign, "email_id": format!("{campaign}-{profile}")});
            generator.emit(
                json!({"type": "track", "event": "Email Delivered", "properties": props}),
                ts,
            );
            let open_rate = if active(day) {
                (0.15 + activity * 0.05).min(0.85)
            } else {
                0.03
            };
            if generator.rng.random_bool(open_rate) {
                let opened = ts + generator.rng.random_range(60_000..6 * 3_600_000);
                generator.emit(
                    json!({"type": "track", "event": "Email Opened", "properties": props}),
                    opened,
                );
                if generator.rng.random_bool(0.3) {
                    let clicked = opened + generator.rng.random_range(5_000..120_000);
                    generator.emit(json!({"type": "track", "event": "Email Link Clicked", "properties": props}), clicked);
                    clicked_campaign = Some((campaign, clicked));
                }
            }
        }
        if !active(day) && clicked_campaign.is_none() {
            continue;
        }
        let weekday_factor = if weekday >= 5 { 0.7 } else { 1.1 };
        let mut sessions = usize::from(
            generator
                .rng
                .random_bool((activity / 7.0 * weekday_factor).min(1.0)),
        );
        if activity > 7.0 {
            sessions += generator.rng.random_range(0..(activity / 7.0) as usize + 1);
        }
        if let Some((campaign, clicked)) = clicked_campaign {
            session(
                &mut generator,
                clicked + 1_000,
                favourite,
                Some(&campaign),
                &mut cart,
            );
        }
        for _ in 0..sessions {
            let ts = day_start
                + pick_hour(&mut generator.rng) * 3_600_000
                + generator.rng.random_range(0..3_600_000);
            session(&mut generator, ts, favourite, None, &mut cart);
        }
        if bot && day == days - 2 {
            let ts = day_start + 3 * 3_600_000;
            for i in 0..120 {
                let props = json!({"url": format!("https://shop.example.com/p/{i}")});
                generator.emit(json!({"type": "page", "properties": props}), ts + i * 400);
            }
        }
        if generator.rng.random_bool(0.0005) {
            let far = day_start + 400 * DAY_MS;
            generator.emit_any(json!({"type": "track", "event": "Product Viewed"}), far);
        }
        if generator.rng.random_bool(0.0005) {
            generator.emit(
                json!({"type": "track", "properties": {"note": "event name lost"}}),
                day_start,
            );
        }
    }
    generator.messages
}

/// One browsing session.
fn session(
    g: &mut ProfileGen<'_>,
    mut ts: i64,
    favourite: usize,
    campaign: Option<&str>,
    cart: &mut Vec<(usize, usize)>,
) {
    let step = |g: &mut ProfileGen<'_>| g.rng.random_range(10_000..240_000);
    let source = match campaign {
        Some(campaign) => {
            format!("?utm_source=newsletter&utm_medium=email&utm_campaign={campaign}")
        }
        None if g.rng.random_bool(0.3) => {
            format!(
                "?utm_source={}&utm_medium=cpc",
                SOURCES[g.rng.random_range(0..SOURCES.len())]
            )
        }
        None => String::new(),
    };
    let landing = if g.rng.random_bool(0.35) {
        format!("/blog/post-{}", g.rng.random_range(0..BLOG_POSTS))
    } else {
        "/".to_string()
    };
    let mut duration = g.rng.random_range(5..400) as f64;
    if g.rng.random_bool(0.001) {
        duration = g.rng.random_range(15_000..60_000) as f64; // a tab left open: an anomaly
    }
    let props = json!({"url": format!("https://shop.example.com{landing}{source}"), "duration_s": duration});
    g.emit(json!({"type": "page", "properties": props}), ts);
    let views = g.rng.random_range(1..6);
    let mut added = false;
    for _ in 0..views {
        ts += step(g);
        let category = if g.rng.random_bool(0.7) {
            favourite
        } else {
            g.rng.random_range(0..CATEGORIES.len())
        };
        let product = g.rng.random_range(0..PRODUCTS_PER_CATEGORY);
        let product_id = format!("P{category}{product:02}");
        let price = product_price(category, product);
        let props =
            json!({"product_id": product_id, "category": CATEGORIES[category], "price": price});
        g.emit(
            json!({"type": "track", "event": "Product Viewed", "properties": props}),
            ts,
        );
        let path = format!("/products/{product_id}");
        let props = json!({"url": format!("https://shop.example.com{path}"), "duration_s": g.rng.random_range(5..300)});
        g.emit(json!({"type": "page", "properties": props}), ts + 500);
        let add_rate = if campaign.is_some() { 0.35 } else { 0.18 };
        if g.rng.random_bool(add_rate) {
            ts += step(g);
            let props = json!({"product_id": product_id, "category": CATEGORIES[category], "price": price, "quantity": 1});
            g.emit(
                json!({"type": "track", "event": "Product Added", "properties": props}),
                ts,
            );
            cart.push((category, product));
            added = true;
        }
    }
    if cart.is_empty() {
        return;
    }
    ts += step(g);
    g.emit(
        json!({"type": "track", "event": "Cart Viewed", "properties": {"items": cart.len()}}),
        ts,
    );
    let order_rate = match (added, campaign.is_some()) {
        (true, true) => 0.55,
        (true, false) => 0.4,
        (false, _) => 0.15,
    };
    if g.rng.random_bool(0.7) {
        ts += step(g);
        g.emit(json!({"type": "track", "event": "Checkout Started", "properties": {"items": cart.len()}}), ts);
        if g.rng.random_bool(order_rate / 0.7_f64.max(order_rate)) {
            ts += step(g);
            let products: Vec<Value> = cart
                .iter()
                .map(|(c, p)| json!({"product_id": format!("P{c}{p:02}"), "category": CATEGORIES[*c], "price": product_price(*c, *p)}))
                .collect();
            let revenue: f64 = cart.iter().map(|(c, p)| product_price(*c, *p)).sum();
            let order_id = format!("O{:x}{:x}", g.profile, g.message_counter);
            let props = json!({"order_id": order_id, "revenue": revenue, "currency": "EUR", "products": products});
            g.emit(
                json!({"type": "track", "event": "Order Completed", "properties": props}),
                ts,
            );
            cart.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seed: u64) -> (Vec<u8>, GenerateStats) {
        let options = GenerateOptions {
            profiles: 300,
            days: 60,
            seed,
            end_ms: 1_777_636_800_000,
        };
        let mut out = Vec::new();
        let stats = generate(&options, &mut out).unwrap();
        (out, stats)
    }

    #[test]
    fn same_seed_same_bytes_other_seed_other_bytes() {
        let (a, stats) = run(7);
        let (b, _) = run(7);
        let (c, _) = run(8);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(stats.bytes as usize, a.len());
        assert!(
            stats.messages > 3_000,
            "too few messages: {}",
            stats.messages
        );
    }

    #[test]
    fn output_has_the_shapes_the_model_promises() {
        let (out, _) = run(1);
        let messages: Vec<Value> = String::from_utf8(out)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let count = |event: &str| messages.iter().filter(|m| m["event"] == event).count();
        assert!(count("Order Completed") > 0 && count("Product Added") > count("Order Completed"));
        assert!(count("Email Opened") > count("Email Link Clicked"));
        assert!(messages.iter().any(|m| m["type"] == "identify"));
        assert!(messages.iter().any(|m| m["type"] == "page"));
        // Anonymous browsing before identify: some anonymous-only messages share an anonymousId
        // with a later identified message.
        let anonymous_only = messages
            .iter()
            .filter(|m| m.get("userId").is_none())
            .count();
        assert!(anonymous_only > 0);
        let mut ids: Vec<&str> = messages
            .iter()
            .map(|m| m["messageId"].as_str().unwrap())
            .collect();
        let total = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert!(ids.len() < total, "a small share of duplicates is expected");
    }
}
