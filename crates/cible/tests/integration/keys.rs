//! Keys as a browser and an abusive client meet them: CORS per write key (origins allowed,
//! refused before anything is stored), analytics.js settings, and rate limits answered 429
//! with `Retry-After`, from several threads at once.

use std::time::Duration;

use serde_json::json;

use super::common::*;

fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (u16, Vec<(String, String)>, String) {
    let mut request = ureq::request(method, url).timeout(Duration::from_secs(30));
    for (name, value) in headers {
        request = request.set(name, value);
    }
    let result = match body {
        Some(body) => request.send_string(body),
        None => request.call(),
    };
    let response = match result {
        Ok(response) => response,
        Err(ureq::Error::Status(_, response)) => response,
        Err(other) => panic!("{method} {url}: {other}"),
    };
    let headers = response
        .headers_names()
        .into_iter()
        .map(|name| {
            let value = response.header(&name).unwrap_or_default().to_string();
            (name, value)
        })
        .collect();
    (response.status(), headers, response.into_string().unwrap())
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

#[test]
fn write_keys_serve_only_the_origins_they_list() {
    let dir = tempfile::tempdir().unwrap();
    let shop = run_ok(cible(dir.path()).args([
        "key",
        "create",
        "--write",
        "--origin",
        "https://Shop.Example:443",
        "--origin",
        "http://localhost:8080",
    ]))
    .trim()
    .to_string();
    let server_side = create_key(dir.path(), "--write");
    // Origins are refused on anything but a write key, and must be origins.
    let refused = cible(dir.path())
        .args([
            "key",
            "create",
            "--write",
            "--origin",
            "https://shop.example/cart",
        ])
        .output()
        .unwrap();
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr)
            .contains("origins: \"https://shop.example/cart\" is not an origin"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let listed = run_ok(cible(dir.path()).args(["key", "list"]));
    assert!(
        listed.contains("origins http://localhost:8080,https://shop.example"),
        "{listed}"
    );

    let server = Server::start(dir.path(), &[]);
    let track = |key: &str, origin: Option<&str>| {
        let auth = basic(key);
        let mut headers = vec![
            ("Authorization", auth.as_str()),
            ("Content-Type", "text/plain"),
        ];
        if let Some(origin) = origin {
            headers.push(("Origin", origin));
        }
        let body = json!({"anonymousId": "a1", "event": "Viewed", "messageId": format!("m-{key}-{origin:?}")});
        request(
            "POST",
            &server.url("/v1/t"),
            &headers,
            Some(&body.to_string()),
        )
    };

    // The page of an allowed origin (written as browsers send it): accepted, readable.
    let (status, headers, body) = track(&shop, Some("https://shop.example"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    assert_eq!(header(&headers, "vary"), Some("Origin"));
    // A page may read how long to wait after a 429.
    assert_eq!(
        header(&headers, "access-control-expose-headers"),
        Some("Retry-After")
    );
    // Another origin: refused before anything is stored, and unreadable to the page.
    let (status, headers, body) = track(&shop, Some("https://evil.example"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("origin_not_allowed") && body.contains("https://evil.example"),
        "{body}"
    );
    assert_eq!(header(&headers, "access-control-allow-origin"), None);
    // A key for servers refuses every browser, and says how to allow one.
    let (status, headers, body) = track(&server_side, Some("https://shop.example"));
    assert_eq!(status, 403, "{body}");
    assert!(
        body.contains("cible key create --write --origin https://shop.example"),
        "{body}"
    );
    // The origin is allowed by another key, so the page may read why it was refused.
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    // Without an Origin (a server), both keys work.
    assert_eq!(track(&server_side, None).0, 200);

    // Preflights: answered for an origin some key allows, refused otherwise.
    let preflight = |origin: &str| {
        request(
            "OPTIONS",
            &server.url("/v1/t"),
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                (
                    "Access-Control-Request-Headers",
                    "authorization,content-type",
                ),
            ],
            None,
        )
    };
    let (status, headers, _) = preflight("http://localhost:8080");
    assert_eq!(status, 204);
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("http://localhost:8080")
    );
    assert!(
        header(&headers, "access-control-allow-headers")
            .unwrap()
            .contains("authorization")
    );
    assert!(
        header(&headers, "access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    let (status, headers, body) = preflight("http://localhost:9999");
    assert_eq!(status, 403, "{body}");
    assert_eq!(header(&headers, "access-control-allow-origin"), None);

    // analytics.js's settings send everything here, and nowhere else.
    let (status, headers, body) = request(
        "GET",
        &server.url(&format!("/v1/projects/{shop}/settings")),
        &[("Origin", "https://shop.example")],
        None,
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        header(&headers, "access-control-allow-origin"),
        Some("https://shop.example")
    );
    let settings: serde_json::Value = serde_json::from_str(&body).unwrap();
    let host = server.base.trim_start_matches("http://");
    assert_eq!(
        settings["integrations"]["Segment.io"]["apiHost"],
        format!("{host}/v1")
    );
    assert_eq!(settings["integrations"]["Segment.io"]["protocol"], "http");
    assert_eq!(settings["integrations"].as_object().unwrap().len(), 1);
    assert_eq!(settings["metrics"]["sampleRate"], 0);
    // Behind a TLS proxy, pages post over HTTPS.
    let (_, _, body) = request(
        "GET",
        &server.url(&format!("/v1/projects/{shop}/settings")),
        &[("X-Forwarded-Proto", "https")],
        None,
    );
    let behind: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(behind["integrations"]["Segment.io"]["protocol"], "https");
    let (status, _, body) = request(
        "GET",
        &server.url("/v1/projects/cible_w_nope/settings"),
        &[],
        None,
    );
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("writeKey"), "{body}");
    // The write key in a text/plain body, as analytics.js may send it, with a short endpoint.
    let body = json!({"writeKey": shop, "userId": "u1", "traits": {"plan": "pro"}, "messageId": "in-body"});
    let (status, _, answer) = request(
        "POST",
        &server.url("/v1/i"),
        &[
            ("Content-Type", "text/plain"),
            ("Origin", "http://localhost:8080"),
        ],
        Some(&body.to_string()),
    );
    assert_eq!(status, 200, "{answer}");
    server.stop();

    let ids: Vec<String> = export_events(dir.path())
        .iter()
        .map(|e| e["messageId"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        ids.len(),
        3,
        "only the allowed requests were stored: {ids:?}"
    );
    assert!(ids.contains(&"in-body".to_string()));
}

#[test]
fn rate_limited_keys_get_429_with_retry_after_from_many_threads_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let limited = run_ok(cible(dir.path()).args(["key", "create", "--write", "--rate-limit", "5"]))
        .trim()
        .to_string();
    let free = create_key(dir.path(), "--write");
    let admin = run_ok(cible(dir.path()).args(["key", "create", "--admin", "--rate-limit", "2"]))
        .trim()
        .to_string();
    let zero = cible(dir.path())
        .args(["key", "create", "--write", "--rate-limit", "0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&zero.stderr).contains("rate_limit"));
    let server = Server::start(dir.path(), &[]);

    // 4 threads send 10 requests each at once: the bucket holds 5, refilled at 5 a second,
    // so within the ~0.5 s this takes at most 5 + a few pass; every refusal says when to retry.
    let (done, finished) = std::sync::mpsc::channel();
    for thread in 0..4 {
        let url = server.url("/v1/track");
        let (limited, free, done) = (limited.clone(), free.clone(), done.clone());
        std::thread::spawn(move || {
            let mut answers = Vec::new();
            for i in 0..10 {
                let body =
                    json!({"userId": "u", "event": "E", "messageId": format!("{thread}-{i}")});
                let limited = post(&url, &limited, &body);
                let unlimited = post(
                    &url,
                    &free,
                    &json!({"userId": "u", "event": "E", "messageId": format!("free-{thread}-{i}")}),
                );
                answers.push((limited.status, limited.retry_after, unlimited.status));
            }
            done.send(answers).unwrap();
        });
    }
    let mut accepted = 0;
    let mut refused = 0;
    let started = std::time::Instant::now();
    for _ in 0..4 {
        let answers = finished
            .recv_timeout(Duration::from_secs(60))
            .expect("no request hangs");
        for (status, retry_after, unlimited) in answers {
            assert_eq!(unlimited, 200, "a key without a limit is never refused");
            match status {
                200 => accepted += 1,
                429 => {
                    refused += 1;
                    let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
                    assert_eq!(seconds, 1, "a token is back within a second");
                }
                other => panic!("unexpected {other}"),
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    let allowed = 5.0 + 5.0 * (elapsed + 1.0);
    assert!(accepted >= 5, "{accepted}");
    assert!(f64::from(accepted) <= allowed, "{accepted} in {elapsed} s");
    assert!(refused > 0);

    // The admin API is limited the same way, with the code and the key named.
    let mut statuses = Vec::new();
    for _ in 0..4 {
        statuses.push(get(&server.url("/api/keys"), &admin));
    }
    let refusal = statuses.iter().find(|a| a.status == 429).expect("a 429");
    assert_eq!(refusal.body["error"]["code"], "rate_limited");
    assert!(refusal.retry_after.is_some());
    // Once the wait is over, the key works again.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(get(&server.url("/api/keys"), &admin).status, 200);
    // analytics.js's settings count against the key too.
    let settings: Vec<u16> = (0..8)
        .map(|_| {
            request(
                "GET",
                &server.url(&format!("/v1/projects/{limited}/settings")),
                &[],
                None,
            )
            .0
        })
        .collect();
    assert!(settings.contains(&429), "{settings:?}");
    server.stop();
    // A key is revoked by the prefix as `key list` prints it, ellipsis and all.
    let listed = run_ok(cible(dir.path()).args(["key", "list"]));
    let shown = listed
        .lines()
        .find(|line| line.contains("2 req/s"))
        .and_then(|line| line.split_whitespace().nth(1))
        .unwrap()
        .to_string();
    assert!(shown.ends_with('…'), "{shown}");
    let revoked = run_ok(cible(dir.path()).args(["key", "revoke", &shown]));
    assert!(revoked.starts_with("revoked admin key"), "{revoked}");

    // Exactly the accepted messages of the limited key were stored.
    let events = export_events(dir.path());
    let limited_stored = events
        .iter()
        .filter(|e| !e["messageId"].as_str().unwrap().starts_with("free-"))
        .count();
    assert_eq!(limited_stored, accepted as usize);
}
