//! Delivers webhooks while the server runs: one task per enabled subscription fills the
//! durable queue from the change feed (`Engine::enqueue_webhook_changes`), sends each delivery
//! signed (Standard Webhooks), in order per profile and concurrently across profiles, retries
//! with backoff and jitter on the schedule (honouring `Retry-After`), disables the
//! subscription on `410 Gone`, and records each outcome (`Engine::settle_webhook`). Nothing
//! here runs on the path that acknowledges events: a slow or dead endpoint only fills its own
//! subscription's queue.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cible_core::Engine;
use cible_core::webhooks::{Delivery, Mode, Settle, Subscription};
use http_body_util::{BodyExt, Full};
use parking_lot::Mutex;
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};

/// How deliveries are made.
#[derive(Debug, Clone)]
pub struct SenderOptions {
    /// Delay before each retry (ms); after the last, a dead letter.
    pub schedule: Vec<i64>,
    /// How long one attempt may take (connect, send, answer).
    pub timeout: Duration,
    /// Attempts in flight per subscription at most.
    pub concurrency: usize,
}

impl Default for SenderOptions {
    fn default() -> Self {
        Self {
            schedule: cible_core::webhooks::DEFAULT_SCHEDULE_MS.to_vec(),
            timeout: Duration::from_secs(15),
            concurrency: 64,
        }
    }
}

/// What the sender did for a subscription since the server started.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub delivered: u64,
    pub failed_attempts: u64,
    pub dead: u64,
    /// Deliveries with nothing left to send (the change erased, consent withdrawn).
    pub dropped: u64,
    pub in_flight: usize,
    pub queued: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// The sender's handle, kept by the API: wake it after a change of subscriptions, read stats.
#[derive(Clone, Default)]
pub struct Sender {
    wake: Arc<Notify>,
    stats: Arc<Mutex<HashMap<u32, Stats>>>,
}

impl Sender {
    /// Subscriptions or their dead letters changed: look again.
    pub fn wake(&self) {
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    pub fn stats(&self, id: u32) -> Option<Stats> {
        self.stats.lock().get(&id).cloned()
    }
}

type Client = hyper_util::client::legacy::Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
>;

fn client(concurrency: usize) -> anyhow::Result<Client> {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .build();
    Ok(
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_max_idle_per_host(concurrency)
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector),
    )
}

/// Starts the sender on the current runtime; it stops when `stopping` turns true.
pub fn start(
    engine: Arc<Engine>,
    options: SenderOptions,
    feed_head: watch::Receiver<u64>,
    stopping: watch::Receiver<bool>,
) -> anyhow::Result<Sender> {
    let sender = Sender::default();
    let client = client(options.concurrency)?;
    let handle = sender.clone();
    tokio::spawn(supervise(
        engine, options, client, handle, feed_head, stopping,
    ));
    Ok(sender)
}

/// Starts a task per enabled subscription, stops those deleted or disabled, and tells the
/// running ones to look again when woken.
async fn supervise(
    engine: Arc<Engine>,
    options: SenderOptions,
    client: Client,
    sender: Sender,
    feed_head: watch::Receiver<u64>,
    mut stopping: watch::Receiver<bool>,
) {
    let mut running: HashMap<u32, (watch::Sender<u64>, tokio::task::JoinHandle<()>)> =
        HashMap::new();
    let mut generation = 0u64;
    // Running tasks look again (subscription, queue) only when the API woke us, not on the
    // periodic look for new or removed subscriptions.
    let mut woken = false;
    loop {
        let listed = {
            let engine = Arc::clone(&engine);
            tokio::task::spawn_blocking(move || engine.webhooks()).await
        };
        match listed {
            Ok(Ok(subscriptions)) => {
                generation += 1;
                let enabled: HashMap<u32, Subscription> = subscriptions
                    .into_iter()
                    .filter(|s| s.disabled.is_none())
                    .map(|s| (s.id, s))
                    .collect();
                running.retain(|id, (_, task)| {
                    let keep = enabled.contains_key(id) && !task.is_finished();
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for (id, subscription) in enabled {
                    match running.get(&id) {
                        Some((poke, _)) => {
                            if woken {
                                poke.send_replace(generation);
                            }
                        }
                        None => {
                            let (poke, poked) = watch::channel(generation);
                            let task = SubscriptionTask {
                                engine: Arc::clone(&engine),
                                options: options.clone(),
                                client: client.clone(),
                                stats: Arc::clone(&sender.stats),
                                subscription,
                                lanes: HashMap::new(),
                                ready: BTreeSet::new(),
                                busy: HashSet::new(),
                                known: HashSet::new(),
                                settles: Vec::new(),
                            };
                            let handle = tokio::spawn(task.run(
                                feed_head.clone(),
                                poked,
                                stopping.clone(),
                                Arc::clone(&sender.wake),
                            ));
                            running.insert(id, (poke, handle));
                        }
                    }
                }
            }
            Ok(Err(error)) => tracing::error!(error = %error, "reading webhook subscriptions"),
            Err(error) => tracing::error!(error = %error, "reading webhook subscriptions"),
        }
        woken = tokio::select! {
            () = sender.wake.notified() => true,
            () = tokio::time::sleep(Duration::from_secs(5)) => false,
            _ = stopping.changed() => false,
        };
        if *stopping.borrow() {
            for (_, (_, task)) in running.drain() {
                let _ = task.await;
            }
            return;
        }
    }
}

/// What one attempt came to.
enum Attempt {
    /// 2xx.
    Delivered(u16),
    /// Nothing left to send.
    Nothing,
    /// Another status, with the `Retry-After` delay if one came.
    Status(u16, Option<i64>),
    /// No answer (connection refused, timeout, ...).
    Failed(String),
}

struct Finished {
    lane: u32,
    attempt: Attempt,
}

/// A subscription's sender: its queue in memory, in lanes (a profile, or one lane for list
/// syncs) each sent in order, one attempt at a time.
struct SubscriptionTask {
    engine: Arc<Engine>,
    options: SenderOptions,
    client: Client,
    stats: Arc<Mutex<HashMap<u32, Stats>>>,
    subscription: Subscription,
    lanes: HashMap<u32, VecDeque<Delivery>>,
    /// Lanes whose first delivery waits for its time: (not before, seq, lane).
    ready: BTreeSet<(i64, u64, u32)>,
    /// Lanes with an attempt in flight.
    busy: HashSet<u32>,
    /// Sequence numbers in memory.
    known: HashSet<u64>,
    settles: Vec<Settle>,
}

const LIST_LANE: u32 = u32::MAX;
/// Changes read from the feed per filling of the queue.
const ENQUEUE_LIMIT: usize = 10_000;
/// Most deliveries kept in memory per subscription; the rest wait in the store.
const MEMORY_LIMIT: usize = 200_000;

impl SubscriptionTask {
    fn id(&self) -> u32 {
        self.subscription.id
    }

    fn with_stats(&self, edit: impl FnOnce(&mut Stats)) {
        let mut stats = self.stats.lock();
        edit(stats.entry(self.subscription.id).or_default());
    }

    fn add(&mut self, delivery: Delivery) {
        if !self.known.insert(delivery.seq) {
            return;
        }
        let lane = delivery.pending.profile.unwrap_or(LIST_LANE);
        let queue = self.lanes.entry(lane).or_default();
        if queue.is_empty() && !self.busy.contains(&lane) {
            self.ready
                .insert((delivery.pending.next_at, delivery.seq, lane));
        }
        queue.push_back(delivery);
    }

    /// The lane's first delivery is done with: the next one (if any) waits for its time.
    fn advance(&mut self, lane: u32) {
        if let Some(queue) = self.lanes.get_mut(&lane) {
            if let Some(done) = queue.pop_front() {
                self.known.remove(&done.seq);
            }
            match queue.front() {
                Some(next) => {
                    self.ready.insert((next.pending.next_at, next.seq, lane));
                }
                None => {
                    self.lanes.remove(&lane);
                }
            }
        }
    }

    /// Reads the queue from the store (at start, and after a replay). What was settled
    /// is recorded first: a delivery done but not yet recorded would come back.
    async fn reload(&mut self) {
        self.flush_settles().await;
        let engine = Arc::clone(&self.engine);
        let id = self.id();
        match tokio::task::spawn_blocking(move || engine.webhook_queue(id)).await {
            Ok(Ok(queue)) => {
                for delivery in queue.into_iter().take(MEMORY_LIMIT) {
                    self.add(delivery);
                }
            }
            Ok(Err(error)) => {
                tracing::error!(webhook = id, error = %error, "reading the webhook queue")
            }
            Err(error) => {
                tracing::error!(webhook = id, error = %error, "reading the webhook queue")
            }
        }
    }

    async fn refresh_subscription(&mut self) -> bool {
        let engine = Arc::clone(&self.engine);
        let id = self.id();
        match tokio::task::spawn_blocking(move || engine.webhook(id)).await {
            Ok(Ok(subscription)) if subscription.disabled.is_none() => {
                self.subscription = subscription;
                true
            }
            _ => false,
        }
    }

    /// Queues what the feed owes since the cursor.
    async fn fill(&mut self) -> bool {
        if self.known.len() >= MEMORY_LIMIT {
            return false;
        }
        let engine = Arc::clone(&self.engine);
        let id = self.id();
        let now = cible_core::time::wall_clock_ms();
        let list = matches!(self.subscription.mode, Mode::List { .. });
        match tokio::task::spawn_blocking(move || {
            let queued = engine.enqueue_webhook_changes(id, now, ENQUEUE_LIMIT)?;
            // More to read at once: the feed is ahead of the cursor (list syncs come due with
            // time instead).
            let behind = !list && engine.webhook_cursor(id)?.0 < engine.feed_head();
            Ok::<_, cible_core::EngineError>((queued, behind))
        })
        .await
        {
            Ok(Ok((queued, behind))) => {
                for delivery in queued {
                    self.add(delivery);
                }
                behind
            }
            Ok(Err(error)) => {
                tracing::error!(webhook = id, error = %error, "queueing webhook deliveries");
                false
            }
            Err(_) => false,
        }
    }

    async fn flush_settles(&mut self) {
        if self.settles.is_empty() {
            return;
        }
        let settles = std::mem::take(&mut self.settles);
        let engine = Arc::clone(&self.engine);
        let id = self.id();
        match tokio::task::spawn_blocking(move || engine.settle_webhook(id, &settles)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                tracing::error!(webhook = id, error = %error, "recording webhook deliveries")
            }
            Err(error) => {
                tracing::error!(webhook = id, error = %error, "recording webhook deliveries")
            }
        }
    }

    /// Starts every attempt that is due, up to the concurrency.
    fn launch(&mut self, done: &mpsc::UnboundedSender<Finished>) {
        let now = cible_core::time::wall_clock_ms();
        // One consent check for the attempts started now (it copies the purpose's set).
        let mut check: Option<Arc<cible_core::consent::ConsentCheck>> = None;
        while self.busy.len() < self.options.concurrency {
            let Some(&(at, seq, lane)) = self.ready.first() else {
                break;
            };
            if at > now {
                break;
            }
            self.ready.pop_first();
            let Some(delivery) = self.lanes.get(&lane).and_then(|q| q.front()).cloned() else {
                continue;
            };
            if delivery.seq != seq || self.busy.contains(&lane) {
                continue;
            }
            let check = match &check {
                Some(check) => Arc::clone(check),
                None => match self.engine.consent_check(&self.subscription.purpose) {
                    Ok(made) => Arc::clone(check.insert(Arc::new(made))),
                    Err(error) => {
                        tracing::error!(webhook = self.id(), error = %error, "the consent check");
                        self.ready.insert((now + 1000, seq, lane));
                        break;
                    }
                },
            };
            self.busy.insert(lane);
            let (engine, client, subscription, timeout, done) = (
                Arc::clone(&self.engine),
                self.client.clone(),
                self.subscription.clone(),
                self.options.timeout,
                done.clone(),
            );
            tokio::spawn(async move {
                let attempt =
                    attempt(&engine, &client, &subscription, &delivery, &check, timeout).await;
                let _ = done.send(Finished { lane, attempt });
            });
        }
        let (busy, queued) = (self.busy.len(), self.known.len());
        self.with_stats(|stats| {
            stats.in_flight = busy;
            stats.queued = queued;
        });
    }

    /// Records an attempt's outcome; false when the subscription must stop (410).
    async fn finish(&mut self, finished: Finished) -> bool {
        let Finished { lane, attempt } = finished;
        self.busy.remove(&lane);
        let Some(mut delivery) = self.lanes.get(&lane).and_then(|q| q.front()).cloned() else {
            return true;
        };
        let now = cible_core::time::wall_clock_ms();
        let (status, error, retry_after) = match attempt {
            Attempt::Delivered(status) => {
                self.settles.push(Settle::Done { seq: delivery.seq });
                self.with_stats(|s| {
                    s.delivered += 1;
                    s.last_status = Some(status);
                });
                self.advance(lane);
                return true;
            }
            Attempt::Nothing => {
                self.settles.push(Settle::Done { seq: delivery.seq });
                self.with_stats(|s| s.dropped += 1);
                self.advance(lane);
                return true;
            }
            Attempt::Status(410, _) => {
                // The receiver says the endpoint is gone for good: stop, keep the queue.
                self.flush_settles().await;
                let engine = Arc::clone(&self.engine);
                let id = self.id();
                let _ = tokio::task::spawn_blocking(move || {
                    cible_core::audit::with_actor("webhooks", || {
                        engine.set_webhook_enabled(id, false, "the endpoint answered 410 Gone", now)
                    })
                })
                .await;
                tracing::warn!(
                    webhook = id,
                    "the endpoint answered 410 Gone: subscription disabled"
                );
                self.with_stats(|s| s.last_status = Some(410));
                return false;
            }
            Attempt::Status(status, retry_after) => {
                (Some(status), format!("HTTP {status}"), retry_after)
            }
            Attempt::Failed(error) => (None, error, None),
        };
        delivery.pending.attempts += 1;
        delivery.pending.last_status = status;
        delivery.pending.last_error = Some(error.clone());
        self.with_stats(|s| {
            s.failed_attempts += 1;
            s.last_status = status;
            s.last_error = Some(error);
        });
        let retry = usize::try_from(delivery.pending.attempts - 1).unwrap_or(usize::MAX);
        match self.options.schedule.get(retry) {
            Some(&delay) => {
                let delay = retry_after.map_or_else(|| jittered(delay), |after| after.max(delay));
                delivery.pending.next_at = now.saturating_add(delay);
                self.settles.push(Settle::Retry {
                    seq: delivery.seq,
                    pending: delivery.pending.clone(),
                });
                self.ready
                    .insert((delivery.pending.next_at, delivery.seq, lane));
                if let Some(front) = self.lanes.get_mut(&lane).and_then(|q| q.front_mut()) {
                    *front = delivery;
                }
            }
            None => {
                delivery.pending.dead_at = Some(now);
                self.settles.push(Settle::Dead {
                    seq: delivery.seq,
                    pending: delivery.pending,
                });
                self.with_stats(|s| s.dead += 1);
                self.advance(lane);
            }
        }
        true
    }

    async fn run(
        mut self,
        mut feed_head: watch::Receiver<u64>,
        mut poked: watch::Receiver<u64>,
        mut stopping: watch::Receiver<bool>,
        wake: Arc<Notify>,
    ) {
        let (done, mut finished) = mpsc::unbounded_channel();
        self.reload().await;
        let list_every = match self.subscription.mode {
            Mode::List { every_secs } => Some(Duration::from_secs(u64::from(every_secs))),
            Mode::Events => None,
        };
        let mut last_flush = tokio::time::Instant::now();
        let mut fill_due = true;
        loop {
            if fill_due {
                fill_due = self.fill().await;
            }
            self.launch(&done);
            let next_ready = self.ready.first().map(|&(at, _, _)| at);
            let wait = next_ready
                .map(|at| {
                    let ms = (at - cible_core::time::wall_clock_ms()).clamp(1, 1000);
                    Duration::from_millis(ms as u64)
                })
                .unwrap_or(
                    list_every
                        .unwrap_or(Duration::from_secs(1))
                        .min(Duration::from_secs(1)),
                );
            let wait = if self.settles.is_empty() {
                wait
            } else {
                wait.min(Duration::from_millis(20))
            };
            tokio::select! {
                Some(first) = finished.recv() => {
                    if !self.finish(first).await {
                        wake.notify_one();
                        return;
                    }
                    while let Ok(more) = finished.try_recv() {
                        if !self.finish(more).await {
                            wake.notify_one();
                            return;
                        }
                    }
                }
                changed = feed_head.changed() => {
                    if changed.is_ok() {
                        fill_due = true;
                    }
                }
                changed = poked.changed() => {
                    if changed.is_ok() {
                        if !self.refresh_subscription().await {
                            self.flush_settles().await;
                            return;
                        }
                        self.reload().await;
                        fill_due = true;
                    }
                }
                _ = stopping.changed() => {
                    self.flush_settles().await;
                    return;
                }
                () = tokio::time::sleep(wait) => {
                    // List syncs come due with time, not with the feed.
                    fill_due |= list_every.is_some();
                }
            }
            if self.settles.len() >= 512 || last_flush.elapsed() >= Duration::from_millis(20) {
                self.flush_settles().await;
                last_flush = tokio::time::Instant::now();
            }
        }
    }
}

/// A delay with ±20 % jitter, so that retries of many deliveries spread out.
fn jittered(delay: i64) -> i64 {
    use rand::Rng;
    if delay <= 0 {
        return 0;
    }
    let spread = delay / 5;
    delay + rand::rng().random_range(-spread..=spread)
}

/// One attempt: the payload built now (consent and erasure apply to retries), signed now.
async fn attempt(
    engine: &Engine,
    client: &Client,
    subscription: &Subscription,
    delivery: &Delivery,
    check: &cible_core::consent::ConsentCheck,
    timeout: Duration,
) -> Attempt {
    // A few reads of the store (the feed entry, the profile): short enough for this thread.
    let body = match engine.webhook_payload(subscription, delivery, check) {
        Ok(Some(body)) => body,
        Ok(None) => return Attempt::Nothing,
        Err(error) => return Attempt::Failed(format!("building the payload: {error}")),
    };
    let id = delivery.id();
    let timestamp = cible_core::time::wall_clock_ms() / 1000;
    let now_ms = cible_core::time::wall_clock_ms();
    let signature =
        cible_core::webhooks::signature(&subscription.live_secrets(now_ms), &id, timestamp, &body);
    let request = match hyper::Request::post(subscription.url.as_str())
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(
            hyper::header::USER_AGENT,
            concat!("cible-webhooks/", env!("CARGO_PKG_VERSION")),
        )
        .header("webhook-id", &id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(Full::new(Bytes::from(body)))
    {
        Ok(request) => request,
        Err(error) => return Attempt::Failed(format!("building the request: {error}")),
    };
    let exchange = async {
        let response = client.request(request).await.map_err(|e| {
            let mut message = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(inner) = source {
                message = format!("{message}: {inner}");
                source = inner.source();
            }
            message
        })?;
        let status = response.status().as_u16();
        let retry_after = response
            .headers()
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(parse_retry_after);
        // Read (a bounded part of) the answer so the connection can be reused.
        let _ = http_body_util::Limited::new(response.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<_, String>((status, retry_after))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Err(_) => Attempt::Failed(format!("no answer within {} s", timeout.as_secs_f64())),
        Ok(Err(error)) => Attempt::Failed(error),
        Ok(Ok((status, _))) if (200..300).contains(&status) => Attempt::Delivered(status),
        Ok(Ok((status, retry_after))) => Attempt::Status(status, retry_after),
    }
}

/// `Retry-After` in seconds or as an HTTP date, in ms from now (at most a day).
fn parse_retry_after(text: &str) -> Option<i64> {
    let text = text.trim();
    let ms = match text.parse::<i64>() {
        Ok(seconds) => seconds.checked_mul(1000)?,
        Err(_) => {
            let at = chrono::DateTime::parse_from_rfc2822(text).ok()?;
            at.timestamp_millis() - cible_core::time::wall_clock_ms()
        }
    };
    Some(ms.clamp(0, 86_400_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds_and_dates() {
        assert_eq!(parse_retry_after("3"), Some(3000));
        assert_eq!(parse_retry_after("999999999"), Some(86_400_000));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(0));
        assert_eq!(parse_retry_after("soon"), None);
        for _ in 0..100 {
            let d = jittered(10_000);
            assert!((8_000..=12_000).contains(&d), "{d}");
        }
        assert_eq!(jittered(0), 0);
    }
}
