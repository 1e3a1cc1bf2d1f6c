//! `cible-bench --suite ingest`: HTTP `/v1/batch` with durable acks on an imported store with
//! the 20 live segments of the battery, as a user runs it (`cible serve`, spawned, over
//! loopback):
//!
//! - throughput with 400 KB batches (4 clients) and with 20-message batches (8 clients), each
//!   client sending as fast as it is acknowledged;
//! - acknowledgement latency at half the 20-message target (50,000 messages/s, paced from 8
//!   clients), timed from each batch's scheduled send, so a late client counts its lateness.
//!
//! The baseline is the same load generator against a sink on the same cores that answers every
//! request at once without reading the JSON: what the clients and loopback HTTP reach on this
//! machine, an upper bound for any server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use cible_core::keys::KeyKind;
use parking_lot::Mutex;

use crate::Global;
use crate::bench::{BenchArgs, Row, imported_data, print_header, print_table, tail_lines};

/// How long each phase lasts.
const PHASE: Duration = Duration::from_secs(15);
/// The placeholder the clients overwrite with a request number, so every message is new.
const PLACEHOLDER: &str = "##########";

/// A serialized batch whose messageIds start with [`PLACEHOLDER`], and where.
struct Template {
    bytes: Vec<u8>,
    slots: Vec<usize>,
    messages: u64,
}

impl Template {
    fn new(lines: &[String]) -> Self {
        let mut body = String::from("{\"batch\":[");
        for (i, line) in lines.iter().enumerate() {
            let mut value: serde_json::Value = serde_json::from_str(line).expect("generated JSON");
            let id = value["messageId"].as_str().unwrap_or("").to_string();
            value["messageId"] = format!("{PLACEHOLDER}-{i}-{id}").into();
            if i > 0 {
                body.push(',');
            }
            body.push_str(&value.to_string());
        }
        body.push_str("]}");
        let slots = body.match_indices(PLACEHOLDER).map(|(at, _)| at).collect();
        Self {
            bytes: body.into_bytes(),
            slots,
            messages: lines.len() as u64,
        }
    }

    /// The batch with request number `n` in every messageId.
    fn render(&self, n: u64) -> String {
        let mut bytes = self.bytes.clone();
        let digits = format!("{n:010}");
        for &slot in &self.slots {
            bytes[slot..slot + PLACEHOLDER.len()].copy_from_slice(digits.as_bytes());
        }
        String::from_utf8(bytes).expect("ASCII digits over ASCII")
    }
}

/// Batches of the tail's lines, each about `bytes` long (or `count` messages).
fn templates(tail: &[String], count: Option<usize>, bytes: usize) -> Vec<Template> {
    let mut out = Vec::new();
    let mut start = 0;
    while start < tail.len() && out.len() < 64 {
        let mut end = start;
        let mut size = 0;
        while end < tail.len() && count.map_or(size < bytes, |c| end - start < c) {
            size += tail[end].len() + 1;
            end += 1;
        }
        out.push(Template::new(&tail[start..end]));
        start = end;
    }
    out
}

/// What a phase measured.
struct Phase {
    messages: u64,
    seconds: f64,
    latencies: Vec<f64>,
    refused: u64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.messages as f64 / self.seconds
    }

    fn percentile(&self, p: f64) -> f64 {
        crate::bench::percentile(&self.latencies, p)
    }
}

/// `clients` clients send the templates for [`PHASE`]; `period` paces each client (one batch
/// per period, latency from the scheduled send), `None` sends as fast as acks come.
fn load(
    url: &str,
    auth: &str,
    templates: &[Template],
    clients: usize,
    period: Option<Duration>,
) -> anyhow::Result<Phase> {
    let counter = AtomicU64::new(0);
    let accepted = AtomicU64::new(0);
    let refused = AtomicU64::new(0);
    let latencies = Mutex::new(Vec::new());
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..clients)
            .map(|client| {
                let (counter, accepted, refused, latencies) =
                    (&counter, &accepted, &refused, &latencies);
                scope.spawn(move || -> anyhow::Result<()> {
                    let agent = ureq::AgentBuilder::new().build();
                    let mut mine = Vec::new();
                    let offset =
                        period.map_or(Duration::ZERO, |p| p * client as u32 / clients as u32);
                    let mut scheduled = started + offset;
                    while started.elapsed() < PHASE {
                        if period.is_some() {
                            let now = Instant::now();
                            if scheduled > now {
                                std::thread::sleep(scheduled - now);
                            }
                        } else {
                            scheduled = Instant::now();
                        }
                        let n = counter.fetch_add(1, Ordering::Relaxed);
                        let template = &templates[n as usize % templates.len()];
                        let body = template.render(n);
                        match agent
                            .post(url)
                            .set("Authorization", auth)
                            .send_string(&body)
                        {
                            Ok(_) => {
                                accepted.fetch_add(template.messages, Ordering::Relaxed);
                                mine.push(scheduled.elapsed().as_secs_f64() * 1000.0);
                            }
                            Err(ureq::Error::Status(503, _)) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                                std::thread::sleep(Duration::from_millis(5));
                            }
                            Err(error) => return Err(error).context("posting a batch"),
                        }
                        if let Some(period) = period {
                            scheduled += period;
                        }
                    }
                    latencies.lock().extend(mine);
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("a client panicked"))??;
        }
        Ok(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = latencies.into_inner();
    latencies.sort_by(f64::total_cmp);
    Ok(Phase {
        messages: accepted.into_inner(),
        seconds,
        latencies,
        refused: refused.into_inner(),
    })
}

/// An HTTP/1.1 sink: reads each request whole and answers 200 at once. Stops with `stop`.
fn sink(stop: &'static AtomicBool) -> anyhow::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let address = listener.local_addr()?.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(stream) = stream else { continue };
            std::thread::spawn(move || serve_sink(stream));
        }
    });
    Ok(address)
}

fn serve_sink(stream: TcpStream) {
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(_) => return,
    };
    let mut reader = BufReader::with_capacity(1 << 20, stream);
    let mut body = Vec::new();
    loop {
        let mut length = 0usize;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        body.resize(length, 0);
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        let answer = "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 16\r\n\r\n{\"success\":true}";
        if writer.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, now, engine) = imported_data(global, args)?;
    let battery = cible_core::segment::BATTERY;
    for (i, rule) in battery.iter().enumerate() {
        let expr = cible_lang::parse(rule).map_err(|d| anyhow::anyhow!(d.message))?;
        engine.create_segment(&format!("b{i:02}"), expr, rule, now)?;
    }
    let write = engine.create_key(KeyKind::Write, "bench", now)?;
    let (events, profiles) = (engine.load_stats().events, engine.load_stats().profiles);
    engine.checkpoint()?;
    drop(engine);
    let data = work.path().join("store");

    let tail = tail_lines(&file, 200_000)?;
    let big = templates(&tail, None, 400 << 10);
    let small = templates(&tail, Some(20), 0);
    let auth = crate::bench::basic_auth(&write);
    let phases: [(&str, &[Template], usize, Option<Duration>); 3] = [
        ("400 KB batches, 4 clients", &big, 4, None),
        ("20-message batches, 8 clients", &small, 8, None),
        (
            "20-message batches, 8 clients paced at 50,000 messages/s",
            &small,
            8,
            Some(Duration::from_micros(3_200)),
        ),
    ];

    static STOP_SINK: AtomicBool = AtomicBool::new(false);
    let sink_url = format!("http://{}/v1/batch", sink(&STOP_SINK)?);
    let mut baseline = Vec::new();
    for (name, templates, clients, period) in &phases {
        eprintln!("sink: {name} ...");
        baseline.push(load(&sink_url, &auth, templates, *clients, *period)?);
    }
    STOP_SINK.store(true, Ordering::Relaxed);

    let (mut child, address) = crate::bench::spawn_server(&data, now)?;
    let url = format!("http://{address}/v1/batch");
    let mut measured = Vec::new();
    for (name, templates, clients, period) in &phases {
        eprintln!("cible serve: {name} ...");
        measured.push(load(&url, &auth, templates, *clients, *period)?);
    }
    // Half of what cible reached with 20-message batches, paced the same way, against both.
    let half = measured[1].rate() / 2.0;
    let period = Duration::from_secs_f64(8.0 * 20.0 / half.max(1.0));
    eprintln!("cible serve: 20-message batches, 8 clients paced at {half:.0} messages/s ...");
    let own_half = load(&url, &auth, &small, 8, Some(period))?;
    crate::bench::stop_server(&mut child)?;

    let big_size = big.iter().map(|t| t.messages).sum::<u64>() / big.len() as u64;
    let mut rows = Vec::new();
    for (i, (measure, target, floor)) in [
        (
            "messages/s, 400 KB batches, 4 clients",
            ">= 300,000",
            300_000.0,
        ),
        (
            "messages/s, 20-message batches, 8 clients",
            ">= 100,000",
            100_000.0,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let (ours, theirs) = (&measured[i], &baseline[i]);
        rows.push(Row {
            measure,
            value: format!(
                "{:.0} (ack p50 {:.1} ms, p99 {:.1} ms; {} refused with 503)",
                ours.rate(),
                ours.percentile(0.5),
                ours.percentile(0.99),
                ours.refused
            ),
            baseline: format!("{:.0} (the sink)", theirs.rate()),
            ratio: format!(
                "{:.2}x the sink, {:.2}x the target",
                ours.rate() / theirs.rate(),
                ours.rate() / floor
            ),
            target,
        });
    }
    let (ours, theirs) = (&measured[2], &baseline[2]);
    rows.push(Row {
        measure: "ack p99 at 50,000 messages/s, 8 clients x 20 (ms)",
        value: format!(
            "p50 {:.2}, p90 {:.2}, p99 {:.2} ({:.0} messages/s reached)",
            ours.percentile(0.5),
            ours.percentile(0.9),
            ours.percentile(0.99),
            ours.rate()
        ),
        baseline: format!("p99 {:.2} (the sink)", theirs.percentile(0.99)),
        ratio: format!("{:.2}x the target", ours.percentile(0.99) / 20.0),
        target: "p99 <= 20 ms",
    });
    rows.push(Row {
        measure: "ack p99 at half the 20-message rate reached, 8 clients x 20 (ms)",
        value: format!(
            "p50 {:.2}, p90 {:.2}, p99 {:.2} at {:.0} messages/s",
            own_half.percentile(0.5),
            own_half.percentile(0.9),
            own_half.percentile(0.99),
            own_half.rate()
        ),
        baseline: format!(
            "ack p99 {:.2} at 50,000 messages/s (row above)",
            ours.percentile(0.99)
        ),
        ratio: format!("{:.2}x the target", own_half.percentile(0.99) / 20.0),
        target: "p99 <= 20 ms",
    });
    print_header("ingest", &generated, events, profiles, "", args.days);
    println!(
        "{} live segments; 400 KB batches hold {big_size} messages\n",
        battery.len()
    );
    print_table("HTTP /v1/batch with durable acks", rows);
    Ok(())
}
