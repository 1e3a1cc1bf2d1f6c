//! Normalization of the values that identify people and pages, so that the same thing written two
//! ways is stored one way: e-mail addresses, and URLs with their UTM parameters split out.

use serde_json::{Map, Value};

/// Lower-cases and trims an e-mail address; `None` if it does not look like one (`local@domain`).
pub fn normalize_email(raw: &str) -> Option<String> {
    let email = raw.trim().to_lowercase();
    let (local, domain) = email.split_once('@')?;
    let plausible = !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(char::is_whitespace)
        && !domain.contains('@');
    plausible.then_some(email)
}

/// A URL in canonical form with the campaign parameters it carried.
#[derive(Debug, Clone, PartialEq)]
pub struct CanonicalUrl {
    /// Scheme and host lower-cased, default port and fragment dropped, `utm_*` parameters removed,
    /// remaining query parameters kept in their order.
    pub url: String,
    /// The path, `/` at least.
    pub path: String,
    /// The host, lower-cased.
    pub host: String,
    /// `utm_source` and friends, keyed by Segment's campaign names (`source`, `medium`, `name`,
    /// `term`, `content`).
    pub campaign: Map<String, Value>,
}

/// Canonicalizes an absolute URL; `None` when the text is not one.
pub fn canonicalize_url(raw: &str) -> Option<CanonicalUrl> {
    let mut parsed = url::Url::parse(raw.trim()).ok()?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return None;
    }
    parsed.set_fragment(None);
    let mut campaign = Map::new();
    let mut kept: Vec<(String, String)> = Vec::new();
    for (key, value) in parsed.query_pairs() {
        match key.to_ascii_lowercase().strip_prefix("utm_") {
            Some(utm) => {
                let name = if utm == "campaign" { "name" } else { utm };
                campaign.insert(name.to_string(), Value::String(value.into_owned()));
            }
            None => kept.push((key.into_owned(), value.into_owned())),
        }
    }
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    let host = parsed.host_str().unwrap_or_default().to_string();
    let path = match parsed.path() {
        "" => "/".to_string(),
        path => path.to_string(),
    };
    Some(CanonicalUrl {
        url: parsed.to_string(),
        path,
        host,
        campaign,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_are_trimmed_and_lower_cased() {
        assert_eq!(
            normalize_email("  Alice.Doe@Example.COM "),
            Some("alice.doe@example.com".into())
        );
        assert_eq!(normalize_email("not-an-email"), None);
        assert_eq!(normalize_email("a@b"), None);
        assert_eq!(normalize_email("a b@c.com"), None);
    }

    #[test]
    fn urls_lose_utm_fragment_and_default_port() {
        let canonical = canonicalize_url(
            "HTTPS://Shop.Example.com:443/blog/post?utm_source=news&id=7&utm_campaign=spring#top",
        )
        .unwrap();
        assert_eq!(canonical.url, "https://shop.example.com/blog/post?id=7");
        assert_eq!(canonical.path, "/blog/post");
        assert_eq!(canonical.host, "shop.example.com");
        assert_eq!(canonical.campaign["source"], "news");
        assert_eq!(canonical.campaign["name"], "spring");
    }

    #[test]
    fn relative_or_odd_urls_are_left_alone() {
        assert_eq!(canonicalize_url("/just/a/path"), None);
        assert_eq!(canonicalize_url("mailto:a@b.com"), None);
        assert_eq!(canonicalize_url("https://x.com").unwrap().path, "/");
    }
}
