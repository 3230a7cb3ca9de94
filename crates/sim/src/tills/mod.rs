//! Simulated tills driving a storebox's till API over plain HTTP/1.1.
//!
//! Each till loops over sales: it scans 1 to 6 products
//! (`GET /v1/catalog/by-ean/{ean13}`), sometimes identifies a loyalty customer
//! (`GET /v1/customers/by-card/{card}`), fetches the running promotions
//! (`GET /v1/promotions?active_at=<now>`), then posts the sale
//! (`POST /v1/activity`, expecting 201, or 200 when the box already has that
//! sale `id`). Codes come from [`crate::generate_store`] for the same seed.
//!
//! Connection failures, timeouts and 5xx answers are counted as errors and
//! the same request is retried after a short pause, so tills keep selling
//! through a box restart; a sale is re-posted with the same `id`, which the
//! box uses as its idempotency key. A 404 on a product or card lookup is not
//! an error (the product may have been delisted, the card is unknown).

mod client;
mod stats;

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context};
use bytes::Bytes;
use chrono::{SecondsFormat, Utc};
use http::{Method, StatusCode};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::time::{sleep, Instant};

use crate::prng::SplitMix64;
pub use stats::TillReport;
use stats::TillStats;

use client::{Client, Endpoint};

/// Pause before retrying a request that failed at the connection level.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Share of sales where the customer shows a loyalty card, in percent.
const CARD_PERCENT: u64 = 35;

/// How to run the tills.
#[derive(Debug, Clone)]
pub struct TillsOptions {
    /// Base URL of the box, e.g. `http://127.0.0.1:8080`.
    pub base_url: String,
    /// Number of tills (`till-01`…), each with its own connection.
    pub tills: u32,
    /// How long to run; `None` runs until the `stop` future passed to [`run`]
    /// completes.
    pub duration: Option<Duration>,
    /// Sales per second per till; 0 means as fast as the box answers.
    pub rate: f64,
    /// Seed of the store whose EANs and cards the tills use.
    pub seed: u64,
    /// Print one line per till to stdout this often (and never when `None`).
    pub report_every: Option<Duration>,
    /// SHA-256 fingerprint of the box's LAN certificate, for an `https://` box.
    pub fingerprint: Option<String>,
    /// The paired till token every request carries.
    pub token: Option<String>,
}

/// A product as a till knows it before asking the box.
struct Product {
    id: String,
    ean13: String,
    price_cents: u64,
}

/// What all tills share: the box address, the codes to scan, the run id.
struct Shared {
    endpoint: Endpoint,
    products: Vec<Product>,
    cards: Vec<(String, String)>,
    run_id: String,
    interval: Option<Duration>,
}

fn lock(stats: &Mutex<TillStats>) -> std::sync::MutexGuard<'_, TillStats> {
    // A panic in another holder cannot leave counters inconsistent enough to
    // matter for a report.
    stats.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs `opts.tills` tills until `opts.duration` has elapsed or `stop`
/// completes, whichever comes first, and returns each till's final report.
/// Each till finishes the request it is on before stopping.
pub async fn run(
    opts: TillsOptions,
    stop: impl Future<Output = ()>,
) -> anyhow::Result<Vec<TillReport>> {
    ensure!(opts.tills >= 1, "at least one till is needed");
    ensure!(
        opts.rate.is_finite() && opts.rate >= 0.0,
        "the rate must be a non-negative number of sales per second"
    );
    let endpoint = Endpoint::parse_secure(
        &opts.base_url,
        opts.fingerprint.as_deref(),
        opts.token.as_deref(),
    )?;
    // Generating the store takes a moment of CPU: keep it off the runtime's
    // worker threads.
    let for_shared = opts.clone();
    let shared = tokio::task::spawn_blocking(move || shared(&for_shared, endpoint))
        .await
        .context("generating the store's codes")??;
    let shared = Arc::new(shared);

    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let mut all_stats = Vec::new();
    for n in 1..=opts.tills {
        let stats = Arc::new(Mutex::new(TillStats::default()));
        let till = Till {
            name: format!("till-{n:02}"),
            rng: SplitMix64::derive(opts.seed, "till", u64::from(n)),
            client: Client::new(shared.endpoint.clone()),
            shared: Arc::clone(&shared),
            stats: Arc::clone(&stats),
            stop: stop_rx.clone(),
        };
        all_stats.push((till.name.clone(), stats));
        tasks.push(tokio::spawn(till.run()));
    }

    let started = Instant::now();
    let deadline = async {
        match opts.duration {
            Some(d) => sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(stop, deadline);
    let period = opts.report_every.unwrap_or(Duration::from_secs(3_600));
    let mut ticker = tokio::time::interval_at(Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            _ = &mut deadline => break,
            _ = ticker.tick() => {
                if opts.report_every.is_some() {
                    let reports = snapshot(&all_stats);
                    let title = format!("after {:.0}s", started.elapsed().as_secs_f64());
                    print_reports(&title, &reports);
                }
            }
        }
    }
    // Receivers are only dropped when tills have ended, so a send error is
    // harmless.
    let _ = stop_tx.send(true);
    for task in tasks {
        task.await.context("a till task failed")?;
    }
    Ok(snapshot(&all_stats))
}

fn shared(opts: &TillsOptions, endpoint: Endpoint) -> anyhow::Result<Shared> {
    let store = crate::generate_store(opts.seed);
    let products: Vec<Product> = store
        .modules
        .get("catalog")
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter(|p| p["active"] == json!(true))
        .filter_map(|p| {
            Some(Product {
                id: p["id"].as_str()?.to_owned(),
                ean13: p["ean13"].as_str()?.to_owned(),
                price_cents: p["price_cents"].as_u64()?,
            })
        })
        .collect();
    let cards: Vec<(String, String)> = store
        .modules
        .get("customers")
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .filter_map(|c| {
            Some((
                c["loyalty_card"].as_str()?.to_owned(),
                c["id"].as_str()?.to_owned(),
            ))
        })
        .collect();
    ensure!(
        !products.is_empty() && !cards.is_empty(),
        "the generated store has no products or customers"
    );
    // Sale ids must not collide with an earlier run against the same box:
    // prefix them with this run's start time (ms since the epoch, base 36).
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    let interval = (opts.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / opts.rate));
    Ok(Shared {
        endpoint,
        products,
        cards,
        run_id: base36(millis),
        interval,
    })
}

fn base36(mut n: u128) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8_lossy(&out).into_owned()
}

fn snapshot(all: &[(String, Arc<Mutex<TillStats>>)]) -> Vec<TillReport> {
    all.iter()
        .map(|(name, stats)| lock(stats).report(name))
        .collect()
}

/// Prints one line per till, a total line, and a warning when there were
/// errors.
pub fn print_reports(title: &str, reports: &[TillReport]) {
    println!("--- tills {title} ---");
    for r in reports {
        println!("{r}");
    }
    let sum = |f: fn(&TillReport) -> u64| reports.iter().map(f).sum::<u64>();
    let errors = sum(|r| r.errors);
    println!(
        "total    sales {:>7} (replays {})  lookups {:>8} (not found {})  errors {:>5}",
        sum(|r| r.sales),
        sum(|r| r.replays),
        sum(|r| r.lookups),
        sum(|r| r.not_found),
        errors,
    );
    if errors > 0 {
        println!(
            "!!! {errors} ERRORS (connection failures, timeouts or unexpected answers; \
             see the last error of each till)"
        );
    }
}

/// The part of a box answer that is the record: either the body itself or,
/// if the box wraps it, the object under `record`, `product`, `customer` or
/// `data`.
fn record_of(v: &Value) -> &Value {
    if v.get("id").is_some() {
        return v;
    }
    ["record", "product", "customer", "data"]
        .iter()
        .find_map(|k| v.get(*k).filter(|r| r.is_object()))
        .unwrap_or(v)
}

#[derive(Clone, Copy)]
enum Call {
    Lookup,
    Post,
}

/// Outcome of a product or customer lookup.
enum Found {
    Yes(Value),
    No,
    Failed,
}

struct Till {
    name: String,
    rng: SplitMix64,
    client: Client,
    shared: Arc<Shared>,
    stats: Arc<Mutex<TillStats>>,
    stop: watch::Receiver<bool>,
}

impl Till {
    fn stopping(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps for `d` unless the run stops first; returns false if it did.
    async fn pause(&mut self, d: Duration) -> bool {
        if self.stopping() {
            return false;
        }
        tokio::select! {
            _ = sleep(d) => true,
            _ = self.stop.changed() => false,
        }
    }

    fn error(&self, message: String) {
        let mut s = lock(&self.stats);
        s.errors += 1;
        s.last_error = Some(message);
    }

    async fn run(mut self) {
        // Stagger the tills so they do not all scan at the same instant.
        if let Some(interval) = self.shared.interval {
            let offset = self
                .rng
                .below(u64::try_from(interval.as_millis()).unwrap_or(1_000).max(1));
            if !self.pause(Duration::from_millis(offset)).await {
                return;
            }
        }
        let mut sequence = 0u64;
        let mut next = Instant::now();
        while !self.stopping() {
            sequence += 1;
            self.sale(sequence).await;
            if let Some(interval) = self.shared.interval {
                // Keep the rate without bursting to catch up after a slow
                // period (such as a box restart).
                next = (next + interval).max(Instant::now());
                let wait = next.saturating_duration_since(Instant::now());
                if !wait.is_zero() && !self.pause(wait).await {
                    return;
                }
            }
        }
    }

    /// Sends a request until the box answers with something other than a 5xx
    /// or the run stops (None). Answers are timed into the lookup or post
    /// histogram.
    async fn call(
        &mut self,
        kind: Call,
        method: Method,
        path: &str,
        body: Option<Bytes>,
    ) -> Option<(StatusCode, Bytes)> {
        let target = self.client.endpoint().target(path);
        loop {
            if self.stopping() {
                return None;
            }
            let started = Instant::now();
            let result = self.client.send(&method, &target, body.as_ref()).await;
            let elapsed = started.elapsed();
            match result {
                Ok((status, bytes)) if !status.is_server_error() => {
                    let mut s = lock(&self.stats);
                    match kind {
                        Call::Lookup => {
                            s.lookups += 1;
                            s.lookup_latency.record(elapsed);
                        }
                        Call::Post => s.post_latency.record(elapsed),
                    }
                    return Some((status, bytes));
                }
                Ok((status, bytes)) => self.error(format!(
                    "{method} {target}: HTTP {status} {}",
                    excerpt(&bytes)
                )),
                Err(e) => self.error(format!("{method} {target}: {e}")),
            }
            if !self.pause(RETRY_DELAY).await {
                return None;
            }
        }
    }

    /// Looks up a product or customer; 404 is a normal "no".
    async fn lookup(&mut self, path: &str) -> Option<Found> {
        let (status, bytes) = self.call(Call::Lookup, Method::GET, path, None).await?;
        if status == StatusCode::NOT_FOUND {
            lock(&self.stats).not_found += 1;
            return Some(Found::No);
        }
        if status != StatusCode::OK {
            self.error(format!("GET {path}: HTTP {status} {}", excerpt(&bytes)));
            return Some(Found::Failed);
        }
        match serde_json::from_slice::<Value>(&bytes) {
            Ok(v) => Some(Found::Yes(record_of(&v).clone())),
            Err(e) => {
                self.error(format!(
                    "GET {path}: invalid JSON ({e}) {}",
                    excerpt(&bytes)
                ));
                Some(Found::Failed)
            }
        }
    }

    async fn sale(&mut self, sequence: u64) {
        let shared = Arc::clone(&self.shared);
        let mut lines = Vec::new();
        let mut total = 0u64;
        for _ in 0..self.rng.range(1, 6) {
            let product = &shared.products[self.rng.index(shared.products.len())];
            let Some(found) = self
                .lookup(&format!("/v1/catalog/by-ean/{}", product.ean13))
                .await
            else {
                return;
            };
            let Found::Yes(record) = found else { continue };
            if record["active"] == json!(false) {
                // Inactive products cannot be sold; the till would refuse them.
                lock(&self.stats).not_found += 1;
                continue;
            }
            // The box's price wins: it has the day's price changes.
            let price = record["price_cents"]
                .as_u64()
                .unwrap_or(product.price_cents);
            let id = record["id"].as_str().unwrap_or(&product.id).to_owned();
            let qty = match self.rng.below(100) {
                0..=79 => 1,
                80..=94 => 2,
                _ => 3,
            };
            total += price * qty;
            lines.push(
                json!({ "product": id, "ean13": product.ean13, "qty": qty, "price_cents": price }),
            );
        }

        let mut customer = Value::Null;
        if self.rng.percent(CARD_PERCENT) {
            let (card, local_id) = &shared.cards[self.rng.index(shared.cards.len())];
            match self.lookup(&format!("/v1/customers/by-card/{card}")).await {
                None => return,
                Some(Found::Yes(record)) => {
                    customer = json!(record["id"].as_str().unwrap_or(local_id))
                }
                Some(Found::No | Found::Failed) => {}
            }
        }

        let now = Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true);
        let path = format!("/v1/promotions?active_at={now}");
        let Some((status, bytes)) = self.call(Call::Lookup, Method::GET, &path, None).await else {
            return;
        };
        if !status.is_success() {
            self.error(format!("GET {path}: HTTP {status} {}", excerpt(&bytes)));
        }

        if lines.is_empty() {
            // Every scanned product was delisted: nothing to sell.
            return;
        }
        let payment = match self.rng.below(100) {
            0..=44 => "card",
            45..=69 => "contactless",
            70..=89 => "cash",
            90..=94 => "meal-voucher",
            95..=98 => "mobile",
            _ => "cheque",
        };
        let sale = json!({
            "id": format!("{}-{}-{sequence:06}", self.name, shared.run_id),
            "type": "sale",
            "till": self.name,
            "at": Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true),
            "lines": lines,
            "total_cents": total,
            "customer": customer,
            "payment": payment,
        });
        let body = Bytes::from(sale.to_string());
        let Some((status, bytes)) = self
            .call(Call::Post, Method::POST, "/v1/activity", Some(body))
            .await
        else {
            return;
        };
        match status {
            StatusCode::CREATED => lock(&self.stats).sales += 1,
            StatusCode::OK => {
                let mut s = lock(&self.stats);
                s.sales += 1;
                s.replays += 1;
            }
            other => self.error(format!(
                "POST /v1/activity: HTTP {other} {}",
                excerpt(&bytes)
            )),
        }
    }
}

/// The start of a response body, for error messages.
fn excerpt(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut s: String = text.chars().take(120).collect();
    if text.chars().count() > 120 {
        s.push('…');
    }
    s.replace('\n', " ")
}

#[cfg(test)]
mod tests;
