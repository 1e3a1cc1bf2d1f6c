//! Fuzzing of the two parsers that read what users and the network send: the segment language
//! (`cible_lang::parse`, `from_json`) and the message decoder (`parse_message_text`, and the
//! binary event codec that reads bodies back from disk).
//!
//! A mutation fuzzer on proptest (cargo-fuzz needs a nightly toolchain this project does not
//! use): inputs are the committed seed corpus (`fuzz/corpus/{rule,message}/`) mutated by
//! random edits (bytes, tokens of the language or of JSON, splices of other seeds), plus
//! generated text. Each target runs for `CIBLE_FUZZ_SECS` seconds (default 10, so CI stays
//! bounded; `scripts/fuzz` runs longer), with a seed from `CIBLE_FUZZ_SEED` or the clock,
//! printed so a run can be repeated. A failure is shrunk by proptest and written to
//! `target/fuzz-failures/`; commit it under `fuzz/regressions/` and it is replayed by
//! `regressions_stay_fixed` on every run.
//!
//! Properties: nothing panics or hangs; a refused rule's diagnostic points inside the text; an
//! accepted rule prints to text that parses back to the same rule, and its JSON form reads back
//! to it too; an accepted message encodes and decodes to itself; any bytes given to the
//! decoder give a message or an error.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cible_core::codec;
use cible_core::message::{ParseContext, parse_message_text};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn files(dir: &Path) -> Vec<Vec<u8>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|entries| entries.map(|e| e.unwrap().path()).collect())
        .unwrap_or_default();
    paths.sort();
    paths
        .into_iter()
        .filter(|p| p.is_file() && !p.ends_with(".gitkeep"))
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let seeds = files(&root().join("fuzz/corpus").join(target));
    assert!(seeds.len() >= 10, "the {target} corpus is missing");
    seeds
}

/// Pieces that make mutations reach deep into a parser rather than stop at the first byte.
const RULE_TOKENS: &[&str] = &[
    "did(",
    "count(",
    "sum(",
    "avg(",
    "min(",
    "max(",
    "days_since(",
    "days_since_first(",
    "days_since_first_seen()",
    "days_since_last_seen()",
    "in_segment(",
    "trait.",
    "consent.",
    "predicted.",
    "cluster.",
    "score.",
    " where ",
    " and ",
    " or ",
    "not ",
    " then ",
    " within ",
    " in (",
    " contains ",
    " starts_with ",
    "=",
    "!=",
    "<",
    "<=",
    ">",
    ">=",
    "(",
    ")",
    ",",
    ".",
    "\"",
    "\"Order Completed\"",
    "\\\"",
    "7d",
    "24h",
    "30m",
    "2w",
    "3650d",
    "3651d",
    "9223372036854775807m",
    "106751991168d",
    "-1",
    "0.5",
    "1e308",
    "-1e-308",
    "true",
    "false",
    "--",
    "\n",
    "\u{0}",
    "\u{feff}",
    "é",
    "\u{10ffff}",
    "((((((((((",
    "))))))))))",
];
const JSON_TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "\"",
    "null",
    "true",
    "false",
    "0",
    "-0",
    "1e400",
    "-1",
    "18446744073709551616",
    "0.1",
    "\"type\":\"track\"",
    "\"type\":\"identify\"",
    "\"type\":\"alias\"",
    "\"userId\":",
    "\"anonymousId\":",
    "\"previousId\":",
    "\"event\":",
    "\"timestamp\":",
    "\"2026-04-30T10:00:00Z\"",
    "\"2026-02-30\"",
    "\"9999-12-31T23:59:59Z\"",
    "1777543200",
    "-62135596800000",
    "\"traits\":",
    "\"properties\":",
    "\"context\":",
    "\"consent\":{\"categoryPreferences\":{\"email\":true}}",
    "\"email\":",
    "\"messageId\":",
    "\"url\":\"http://[::1]:0/?utm_source=\"",
    "\\u0000",
    "\\ud800",
    "\\\"",
    "é",
];

#[derive(Debug, Clone)]
enum Edit {
    /// Replace the byte at a position.
    Byte(usize, u8),
    /// Insert a token of the target's dictionary.
    Token(usize, usize),
    /// Delete a range.
    Delete(usize, usize),
    /// Insert a slice of another seed.
    Splice(usize, usize, usize, usize),
    /// Repeat a range (deep nesting, long strings).
    Repeat(usize, usize, u8),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, b)| Edit::Byte(at, b)),
        (any::<usize>(), any::<usize>()).prop_map(|(at, t)| Edit::Token(at, t)),
        (any::<usize>(), 0usize..16).prop_map(|(at, n)| Edit::Delete(at, n)),
        (any::<usize>(), any::<usize>(), any::<usize>(), 0usize..64)
            .prop_map(|(at, seed, from, n)| Edit::Splice(at, seed, from, n)),
        (any::<usize>(), 1usize..16, 2u8..64).prop_map(|(at, n, times)| Edit::Repeat(at, n, times)),
    ]
}

fn mutate(seeds: &[Vec<u8>], tokens: &[&str], seed: usize, edits: &[Edit]) -> Vec<u8> {
    let mut bytes = seeds[seed % seeds.len()].clone();
    for edit in edits {
        let at = |i: usize, len: usize| if len == 0 { 0 } else { i % (len + 1) };
        match *edit {
            Edit::Byte(i, b) if !bytes.is_empty() => {
                let i = i % bytes.len();
                bytes[i] = b;
            }
            Edit::Byte(..) => {}
            Edit::Token(i, t) => {
                let i = at(i, bytes.len());
                let token = tokens[t % tokens.len()].as_bytes();
                bytes.splice(i..i, token.iter().copied());
            }
            Edit::Delete(i, n) => {
                let i = at(i, bytes.len());
                let end = (i + n).min(bytes.len());
                bytes.drain(i..end);
            }
            Edit::Splice(i, other, from, n) => {
                let other = &seeds[other % seeds.len()];
                let from = at(from, other.len());
                let end = (from + n).min(other.len());
                let i = at(i, bytes.len());
                bytes.splice(i..i, other[from..end].iter().copied());
            }
            Edit::Repeat(i, n, times) => {
                let i = at(i, bytes.len());
                let end = (i + n).min(bytes.len());
                let piece = bytes[i..end].repeat(usize::from(times));
                bytes.splice(i..i, piece);
            }
        }
    }
    bytes
}

/// Mutated seeds, and now and then text made from scratch.
fn inputs(target: &'static str, tokens: &'static [&'static str]) -> BoxedStrategy<Vec<u8>> {
    let seeds = corpus(target);
    let mutated = (any::<usize>(), prop::collection::vec(edit(), 0..8))
        .prop_map(move |(seed, edits)| mutate(&seeds, tokens, seed, &edits));
    let generated = prop::collection::vec(prop::sample::select(tokens.to_vec()), 0..40)
        .prop_map(|pieces| pieces.concat().into_bytes());
    let noise = prop::collection::vec(any::<u8>(), 0..256);
    prop_oneof![8 => mutated, 1 => generated, 1 => noise].boxed()
}

fn check_rule(bytes: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(bytes);
    match cible_lang::parse(&text) {
        Err(diagnostic) => {
            prop_assert!(
                diagnostic.span.start <= diagnostic.span.end && diagnostic.span.end <= text.len(),
                "span {:?} outside a text of {} bytes",
                diagnostic.span,
                text.len()
            );
            prop_assert!(diagnostic.line >= 1 && diagnostic.column >= 1);
            prop_assert!(!diagnostic.message.is_empty());
        }
        Ok(rule) => {
            // Spans differ between a text and its reprint: trees compare by their JSON form.
            let json = serde_json::to_value(&rule).unwrap();
            let printed = rule.to_string();
            let again = cible_lang::parse(&printed).map(|r| serde_json::to_value(r).unwrap());
            prop_assert!(
                again.as_ref() == Ok(&json),
                "{text:?} printed as {printed:?} parses as {again:?}"
            );
            let read = cible_lang::from_json(&json).map(|r| serde_json::to_value(r).unwrap());
            prop_assert!(read.as_ref() == Ok(&json), "{json} reads as {read:?}");
        }
    }
    Ok(())
}

fn check_message(bytes: &[u8]) -> Result<(), TestCaseError> {
    let text = String::from_utf8_lossy(bytes);
    let ctx = ParseContext::at(1_777_550_400_000);
    if let Ok(message) = parse_message_text(&text, &ctx) {
        let encoded = codec::encode(&message);
        let decoded = codec::decode(&encoded);
        prop_assert!(
            decoded.as_ref() == Ok(&message),
            "{text:?}: {message:?} decodes as {decoded:?}"
        );
        // A damaged body is an error or a message, never a panic.
        for cut in [1, encoded.len() / 2, encoded.len().saturating_sub(1)] {
            let _ = codec::decode(&encoded[..cut.min(encoded.len())]);
        }
    }
    // Whatever is on disk: the decoder reads it or says why not.
    let _ = codec::decode(bytes);
    Ok(())
}

fn seed() -> u64 {
    std::env::var("CIBLE_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        })
}

/// Runs a target until its time is up; on a failure, writes the shrunk input and panics.
fn fuzz(
    target: &'static str,
    tokens: &'static [&'static str],
    check: fn(&[u8]) -> Result<(), TestCaseError>,
) {
    let seconds: u64 = std::env::var("CIBLE_FUZZ_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let seed = seed();
    println!("fuzz {target}: CIBLE_FUZZ_SEED={seed} CIBLE_FUZZ_SECS={seconds}");
    let strategy = inputs(target, tokens);
    let mut cases = 0u64;
    let mut round = 0u64;
    while Instant::now() < deadline || round == 0 {
        let mut bytes = [0u8; 32];
        bytes[..8].copy_from_slice(&seed.to_le_bytes());
        bytes[8..16].copy_from_slice(&round.to_le_bytes());
        let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &bytes);
        let config = Config {
            cases: 500,
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new_with_rng(config, rng);
        if let Err(failure) = runner.run(&strategy, |input| check(&input)) {
            let dir = root().join("target/fuzz-failures").join(target);
            std::fs::create_dir_all(&dir).unwrap();
            let message = failure.to_string();
            let path = dir.join(format!("{seed}-{round}"));
            if let proptest::test_runner::TestError::Fail(_, input) = &failure {
                std::fs::write(&path, input).unwrap();
            }
            panic!(
                "fuzz {target} failed (round {round}; input in {}; commit it under fuzz/regressions/{target}/):\n{message}",
                path.display()
            );
        }
        cases += 500;
        round += 1;
    }
    println!("fuzz {target}: {cases} inputs, no failure");
}

#[test]
fn fuzz_the_segment_language() {
    fuzz("rule", RULE_TOKENS, check_rule);
}

#[test]
fn fuzz_the_message_decoder() {
    fuzz("message", JSON_TOKENS, check_message);
}

#[test]
fn regressions_stay_fixed() {
    for seed in corpus("rule")
        .iter()
        .chain(&files(&root().join("fuzz/regressions/rule")))
    {
        check_rule(seed).unwrap();
    }
    for seed in corpus("message")
        .iter()
        .chain(&files(&root().join("fuzz/regressions/message")))
    {
        check_message(seed).unwrap();
    }
    // Every seed of the rule corpus is a rule the language accepts: the fuzzer starts deep.
    for seed in corpus("rule") {
        let text = String::from_utf8(seed).unwrap();
        cible_lang::parse(&text).unwrap_or_else(|d| panic!("{text:?}: {}", d.message));
    }
}
