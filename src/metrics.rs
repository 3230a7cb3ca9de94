//! `GET /metrics`: the box's counters in the Prometheus text exposition format (version
//! 0.0.4), written by hand; the format is a few lines of text and a client crate would bring
//! a registry, macros and dependencies for what fits in this file.
//!
//! Two kinds of figures:
//!
//! - **events counted here**, as they happen: sync runs (from [`Metrics::record_sync`], called
//!   once at the end of every full sync and delta pull), till API requests and their latency,
//!   and the activity acknowledgements derived from them (201 = new, 200 = duplicate, as
//!   `docs/TILL_API.md` defines them). They live in one process-wide [`Metrics`] because the
//!   sync engine and the LAN handler are built in `main.rs` without a place to hand one in;
//! - **state read at scrape time** from the status document of [`crate::lan::status`] (the
//!   same data as `GET /v1/status` and the status page): wire bytes per process, pending
//!   activity, module records and data age, flash bytes written, and the data dir's disk.
//!
//! Every family has HELP and TYPE lines; label sets that matter for rates (runs by process
//! and outcome, requests by route) exist from the start at zero, so `rate()` sees the first
//! increment.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use serde_json::Value;
use storebox_http::Body;

use crate::lan::LanState;
use crate::sync::SyncReport;

/// The content type of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Upper bounds (seconds) of the till request latency buckets: lookups answer in well under
/// a millisecond, an activity post waits for an fsync, a status page reads every module.
pub const REQUEST_BUCKETS: [f64; 11] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// Upper bounds (seconds) of the sync run duration buckets: a delta pull takes tens of
/// milliseconds on a good line, a cold full sync seconds, a slow line minutes.
pub const SYNC_BUCKETS: [f64; 12] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The sync processes that report runs, and the outcomes, pre-registered at zero.
const RUN_PROCESSES: [&str; 2] = ["full", "delta"];
const OUTCOMES: [&str; 2] = ["ok", "failed"];

/// Answers `GET /metrics`.
pub fn page(state: &Arc<LanState>) -> Response<Body> {
    // A scraper alone keeps the status page's daily byte baseline current too.
    crate::statuspage::ensure_sampler(state);
    let text = global().render(&crate::lan::status(state), crate::statuspage::disk_space());
    Response::builder()
        .header(header::CONTENT_TYPE, CONTENT_TYPE)
        .body(Body::new(Bytes::from(text)))
        .unwrap_or_else(|_| Response::new(Body::new(Bytes::new())))
}

/// What a till request is, for the latency histogram: few classes, so the label stays small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Lookup,
    Activity,
    Status,
    Other,
}

impl Route {
    pub const ALL: [Route; 4] = [Route::Lookup, Route::Activity, Route::Status, Route::Other];

    pub fn label(self) -> &'static str {
        match self {
            Route::Lookup => "lookup",
            Route::Activity => "activity",
            Route::Status => "status",
            Route::Other => "other",
        }
    }

    /// The class of a request, from its method and path (before percent-decoding: only the
    /// fixed segments matter).
    pub fn classify(method: &Method, path: &str) -> Route {
        let mut segments = path.trim_matches('/').split('/');
        match (segments.next(), segments.next()) {
            (Some("" | "metrics"), None) => Route::Status,
            (Some("v1"), Some("status")) => Route::Status,
            (Some("v1"), Some("activity")) if method == Method::POST => Route::Activity,
            (Some("v1"), Some("sync" | "activity")) => Route::Other,
            (Some("v1"), Some(_)) if method == Method::GET => Route::Lookup,
            _ => Route::Other,
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A latency histogram updated from many till connections at once: one atomic per bucket
/// (not cumulative; the exposition adds them up), so recording takes no lock.
struct AtomicHistogram {
    /// One per bound in [`REQUEST_BUCKETS`], then one for everything above the last.
    buckets: [AtomicU64; REQUEST_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl AtomicHistogram {
    const fn new() -> AtomicHistogram {
        AtomicHistogram {
            buckets: [const { AtomicU64::new(0) }; REQUEST_BUCKETS.len() + 1],
            sum_ns: AtomicU64::new(0),
        }
    }

    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let slot = REQUEST_BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(REQUEST_BUCKETS.len());
        self.buckets[slot].fetch_add(1, Ordering::Relaxed);
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Histogram {
        Histogram {
            counts: self
                .buckets
                .iter()
                .map(|b| b.load(Ordering::Relaxed))
                .collect(),
            sum: self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9,
        }
    }
}

/// A plain histogram: per-bucket counts (the last one above every bound) and the sum.
#[derive(Debug, Clone, Default)]
struct Histogram {
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, bounds: &[f64], seconds: f64) {
        if self.counts.len() != bounds.len() + 1 {
            self.counts = vec![0; bounds.len() + 1];
        }
        let slot = bounds
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(bounds.len());
        self.counts[slot] += 1;
        self.sum += seconds;
    }
}

/// Sync runs, kept under a lock: a few runs an hour, never on a till's path.
#[derive(Debug, Default)]
struct SyncStats {
    /// (process, outcome) -> runs.
    runs: BTreeMap<(String, &'static str), u64>,
    durations: BTreeMap<String, Histogram>,
    /// (process, module, outcome) -> runs that carried the module.
    module_runs: BTreeMap<(String, String, &'static str), u64>,
    module_durations: BTreeMap<(String, String), Histogram>,
}

/// The counters of this process.
pub struct Metrics {
    requests: [AtomicHistogram; Route::ALL.len()],
    events_new: AtomicU64,
    events_duplicate: AtomicU64,
    sync: Mutex<Option<SyncStats>>,
}

static METRICS: Metrics = Metrics::new();

/// The process-wide counters.
pub fn global() -> &'static Metrics {
    &METRICS
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub const fn new() -> Metrics {
        Metrics {
            requests: [const { AtomicHistogram::new() }; Route::ALL.len()],
            events_new: AtomicU64::new(0),
            events_duplicate: AtomicU64::new(0),
            sync: Mutex::new(None),
        }
    }

    fn with_sync<T>(&self, f: impl FnOnce(&mut SyncStats) -> T) -> T {
        // Poisoning would only mean a panic mid-update of plain counters: keep counting.
        let mut guard = self.sync.lock().unwrap_or_else(|p| p.into_inner());
        f(guard.get_or_insert_with(SyncStats::default))
    }

    /// Counts one till request answered with `status` after `elapsed`, and for activity
    /// posts the acknowledgement the answer carries (201 new, 200 duplicate).
    pub fn observe_request(&self, route: Route, status: StatusCode, elapsed: Duration) {
        self.requests[route.index()].observe(elapsed);
        if route == Route::Activity {
            match status {
                StatusCode::CREATED => self.events_new.fetch_add(1, Ordering::Relaxed),
                StatusCode::OK => self.events_duplicate.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
        }
    }

    /// Counts one finished sync run: its outcome and duration, and those of each module it
    /// carried. Modules of one run share its duration: they come in one hub answer and are
    /// applied in one transaction, so a module has no duration of its own.
    pub fn record_sync(&self, report: &SyncReport) {
        let seconds = report.duration_ms as f64 / 1000.0;
        let process = report.process.to_owned();
        self.with_sync(|s| {
            let outcome = if report.ok { "ok" } else { "failed" };
            *s.runs.entry((process.clone(), outcome)).or_default() += 1;
            s.durations
                .entry(process.clone())
                .or_default()
                .observe(&SYNC_BUCKETS, seconds);
            for (module, m) in &report.modules {
                let outcome = if m.error.is_none() { "ok" } else { "failed" };
                *s.module_runs
                    .entry((process.clone(), module.clone(), outcome))
                    .or_default() += 1;
                s.module_durations
                    .entry((process.clone(), module.clone()))
                    .or_default()
                    .observe(&SYNC_BUCKETS, seconds);
            }
        });
    }

    /// The whole exposition: this process's counters plus the state in `doc` (the status
    /// document of [`crate::lan::status`]) and the data dir's disk.
    pub fn render(&self, doc: &Value, disk: Option<crate::statuspage::DiskSpace>) -> String {
        let mut e = Exposition::default();

        e.family(
            "storebox_info",
            "gauge",
            "Always 1; the labels name the store and the software version.",
        );
        e.sample(
            "storebox_info",
            &[
                ("store_id", &text(&doc["store_id"])),
                ("version", &text(&doc["version"])),
            ],
            1,
        );
        e.family(
            "storebox_uptime_seconds",
            "gauge",
            "Seconds since the daemon started.",
        );
        e.sample("storebox_uptime_seconds", &[], num(&doc["uptime_s"]));
        e.family(
            "storebox_hub_link_up",
            "gauge",
            "1 when the last call to the hub succeeded, 0 when it failed or none was made yet.",
        );
        e.sample(
            "storebox_hub_link_up",
            &[],
            u64::from(doc["hub"]["state"] == "up"),
        );

        self.render_sync(&mut e);

        e.family(
            "storebox_hub_wire_bytes_total",
            "counter",
            "Bytes that crossed the hub connection's socket since start, TLS included.",
        );
        for direction in ["sent", "received"] {
            e.sample(
                "storebox_hub_wire_bytes_total",
                &[("direction", direction)],
                num(&doc["wire"][direction]),
            );
        }
        e.family(
            "storebox_hub_body_bytes_total",
            "counter",
            "Request and answer body bytes of each sync process since start.",
        );
        if let Some(bytes) = doc["bytes"].as_object() {
            for (process, b) in bytes {
                for direction in ["sent", "received"] {
                    e.sample(
                        "storebox_hub_body_bytes_total",
                        &[("process", process), ("direction", direction)],
                        num(&b[direction]),
                    );
                }
            }
        }
        e.family(
            "storebox_hub_module_bytes_total",
            "counter",
            "Payload bytes received for each module since start.",
        );
        if let Some(modules) = doc["wire"]["modules"].as_object() {
            for (module, b) in modules {
                e.sample(
                    "storebox_hub_module_bytes_total",
                    &[("module", module)],
                    num(b),
                );
            }
        }
        e.family(
            "storebox_hub_connections_total",
            "counter",
            "Connections opened to the hub since start, and of those, TLS sessions resumed.",
        );
        e.sample(
            "storebox_hub_connections_total",
            &[("handshake", "full")],
            num(&doc["wire"]["connections"])
                .saturating_sub(num(&doc["wire"]["resumed_connections"])),
        );
        e.sample(
            "storebox_hub_connections_total",
            &[("handshake", "resumed")],
            num(&doc["wire"]["resumed_connections"]),
        );

        let modules = doc["modules"].as_object();
        let module_gauges: [(&str, &str, &str); 3] = [
            (
                "storebox_module_records",
                "records",
                "Records of the module in the local database.",
            ),
            (
                "storebox_module_quarantined_records",
                "quarantined",
                "Records kept out of the module because they failed validation.",
            ),
            (
                "storebox_module_data_age_seconds",
                "data_age_s",
                "Seconds since the module last synced successfully (absent: never).",
            ),
        ];
        for (name, key, help) in module_gauges {
            e.family(name, "gauge", help);
            for (module, m) in modules.into_iter().flatten() {
                if let Some(v) = m[key].as_u64() {
                    e.sample(name, &[("module", module)], v);
                }
            }
        }

        e.family(
            "storebox_activity_pending_events",
            "gauge",
            "Activity events stored on the box and not yet acknowledged by the hub.",
        );
        e.sample(
            "storebox_activity_pending_events",
            &[],
            num(&doc["activity"]["pending"]),
        );
        e.family(
            "storebox_activity_oldest_pending_age_seconds",
            "gauge",
            "Age of the oldest pending activity event (0 when none is pending).",
        );
        e.sample(
            "storebox_activity_oldest_pending_age_seconds",
            &[],
            num(&doc["activity"]["oldest_pending_age_s"]),
        );
        e.family(
            "storebox_activity_events_acknowledged_total",
            "counter",
            "Activity posts answered as stored: new (201) or duplicate of a stored id (200).",
        );
        for (stored, counter) in [
            ("new", &self.events_new),
            ("duplicate", &self.events_duplicate),
        ] {
            e.sample(
                "storebox_activity_events_acknowledged_total",
                &[("stored", stored)],
                counter.load(Ordering::Relaxed),
            );
        }

        e.family(
            "storebox_process_write_bytes_total",
            "counter",
            "Bytes this process caused to be written to storage (write_bytes of /proc/self/io).",
        );
        if let Some(v) = doc["storage"]["process_write_bytes"].as_u64() {
            e.sample("storebox_process_write_bytes_total", &[], v);
        }
        e.family(
            "storebox_journal_write_bytes_total",
            "counter",
            "Bytes the activity journal handed to its files since start (padded sectors).",
        );
        e.sample(
            "storebox_journal_write_bytes_total",
            &[],
            num(&doc["storage"]["journal"]["bytes_written"]),
        );
        e.family(
            "storebox_journal_commits_total",
            "counter",
            "Durable (synced) commits of the activity journal since start.",
        );
        e.sample(
            "storebox_journal_commits_total",
            &[],
            num(&doc["storage"]["journal"]["commits"]),
        );
        // A family's samples follow its TYPE line, before the next family.
        e.family(
            "storebox_data_dir_free_bytes",
            "gauge",
            "Bytes available to the daemon on the file system of its data directory.",
        );
        if let Some(d) = disk {
            e.sample("storebox_data_dir_free_bytes", &[], d.available);
        }
        e.family(
            "storebox_data_dir_size_bytes",
            "gauge",
            "Size of the file system of the data directory.",
        );
        if let Some(d) = disk {
            e.sample("storebox_data_dir_size_bytes", &[], d.total);
        }

        e.family(
            "storebox_till_request_duration_seconds",
            "histogram",
            "Time to answer a till API request, by route class (lookup, activity, status, other).",
        );
        for route in Route::ALL {
            e.histogram(
                "storebox_till_request_duration_seconds",
                &[("route", route.label())],
                &REQUEST_BUCKETS,
                &self.requests[route.index()].snapshot(),
            );
        }
        e.out
    }

    fn render_sync(&self, e: &mut Exposition) {
        self.with_sync(|s| {
            e.family(
                "storebox_sync_runs_total",
                "counter",
                "Finished sync runs by process (full, delta) and outcome (ok, failed).",
            );
            let mut runs = s.runs.clone();
            for process in RUN_PROCESSES {
                for outcome in OUTCOMES {
                    runs.entry((process.to_owned(), outcome)).or_default();
                }
            }
            for ((process, outcome), n) in &runs {
                e.sample(
                    "storebox_sync_runs_total",
                    &[("process", process), ("outcome", outcome)],
                    *n,
                );
            }
            e.family(
                "storebox_sync_run_duration_seconds",
                "histogram",
                "Duration of sync runs by process.",
            );
            for process in RUN_PROCESSES {
                s.durations.entry(process.to_owned()).or_default();
            }
            for (process, h) in &s.durations {
                e.histogram(
                    "storebox_sync_run_duration_seconds",
                    &[("process", process)],
                    &SYNC_BUCKETS,
                    h,
                );
            }
            e.family(
                "storebox_sync_module_runs_total",
                "counter",
                "Sync runs that carried a module, by process and the module's outcome.",
            );
            for ((process, module, outcome), n) in &s.module_runs {
                e.sample(
                    "storebox_sync_module_runs_total",
                    &[("process", process), ("module", module), ("outcome", outcome)],
                    *n,
                );
            }
            e.family(
                "storebox_sync_module_run_duration_seconds",
                "histogram",
                "Duration of the sync runs that carried a module (one hub answer, one transaction for all its modules).",
            );
            for ((process, module), h) in &s.module_durations {
                e.histogram(
                    "storebox_sync_module_run_duration_seconds",
                    &[("process", process), ("module", module)],
                    &SYNC_BUCKETS,
                    h,
                );
            }
        });
    }
}

/// A JSON value as a label value: strings bare, the rest as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// A JSON number as a sample value; absent or null counts as 0.
fn num(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

/// The text being written, one family after the other.
#[derive(Default)]
struct Exposition {
    out: String,
}

impl Exposition {
    fn family(&mut self, name: &str, kind: &str, help: &str) {
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
    }

    fn labels(&mut self, labels: &[(&str, &str)]) {
        if labels.is_empty() {
            return;
        }
        self.out.push('{');
        for (i, (name, value)) in labels.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{name}=\"{}\"", escape_label(value));
        }
        self.out.push('}');
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: impl std::fmt::Display) {
        self.out.push_str(name);
        self.labels(labels);
        let _ = writeln!(self.out, " {value}");
    }

    /// `name_bucket` lines (cumulative, ending with `le="+Inf"`), then `_sum` and `_count`.
    fn histogram(&mut self, name: &str, labels: &[(&str, &str)], bounds: &[f64], h: &Histogram) {
        let bucket = format!("{name}_bucket");
        let mut cumulative = 0u64;
        for (i, bound) in bounds.iter().enumerate() {
            cumulative += h.counts.get(i).copied().unwrap_or(0);
            let le = bound.to_string();
            let mut with_le = labels.to_vec();
            with_le.push(("le", &le));
            self.sample(&bucket, &with_le, cumulative);
        }
        cumulative += h.counts.get(bounds.len()).copied().unwrap_or(0);
        let mut with_le = labels.to_vec();
        with_le.push(("le", "+Inf"));
        self.sample(&bucket, &with_le, cumulative);
        self.sample(&format!("{name}_sum"), labels, h.sum);
        self.sample(&format!("{name}_count"), labels, cumulative);
    }
}

/// Escapes a label value as the text format requires: backslash, double quote, newline.
fn escape_label(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::sync::ModuleReport;

    #[test]
    fn routes_are_classified_by_their_fixed_segments() {
        let get = Method::GET;
        let post = Method::POST;
        assert_eq!(Route::classify(&get, "/"), Route::Status);
        assert_eq!(Route::classify(&get, "/metrics"), Route::Status);
        assert_eq!(Route::classify(&get, "/v1/status"), Route::Status);
        assert_eq!(Route::classify(&post, "/v1/activity"), Route::Activity);
        assert_eq!(Route::classify(&get, "/v1/activity"), Route::Other);
        assert_eq!(Route::classify(&post, "/v1/sync/full"), Route::Other);
        assert_eq!(Route::classify(&get, "/v1/catalog/p1"), Route::Lookup);
        assert_eq!(Route::classify(&get, "/v1/config"), Route::Lookup);
        assert_eq!(Route::classify(&get, "/favicon.ico"), Route::Other);
    }

    #[test]
    fn histograms_are_cumulative_and_end_with_the_count() {
        let m = Metrics::new();
        for us in [100, 700, 700, 3_000, 2_000_000] {
            m.observe_request(Route::Lookup, StatusCode::OK, Duration::from_micros(us));
        }
        m.observe_request(Route::Activity, StatusCode::CREATED, Duration::ZERO);
        m.observe_request(Route::Activity, StatusCode::OK, Duration::ZERO);
        m.observe_request(Route::Activity, StatusCode::BAD_REQUEST, Duration::ZERO);
        let out = m.render(&Value::Null, None);
        let bucket = |le: &str| {
            format!(
                "storebox_till_request_duration_seconds_bucket{{route=\"lookup\",le=\"{le}\"}} "
            )
        };
        for (le, n) in [
            ("0.0005", 1),
            ("0.001", 3),
            ("0.005", 4),
            ("1", 4),
            ("+Inf", 5),
        ] {
            assert!(out.contains(&format!("{}{n}\n", bucket(le))), "{le}: {out}");
        }
        assert!(out.contains("storebox_till_request_duration_seconds_count{route=\"lookup\"} 5\n"));
        assert!(out.contains("storebox_activity_events_acknowledged_total{stored=\"new\"} 1\n"));
        assert!(
            out.contains("storebox_activity_events_acknowledged_total{stored=\"duplicate\"} 1\n")
        );
    }

    #[test]
    fn sync_runs_count_outcomes_per_process_and_module() {
        let m = Metrics::new();
        let mut report = SyncReport {
            process: "full",
            ok: false,
            duration_ms: 1500,
            ..Default::default()
        };
        report
            .modules
            .insert("catalog".into(), ModuleReport::default());
        report.modules.insert(
            "promotions".into(),
            ModuleReport {
                error: Some("bad".into()),
                ..Default::default()
            },
        );
        m.record_sync(&report);
        let out = m.render(&Value::Null, None);
        for line in [
            "storebox_sync_runs_total{process=\"full\",outcome=\"failed\"} 1",
            "storebox_sync_runs_total{process=\"full\",outcome=\"ok\"} 0",
            "storebox_sync_runs_total{process=\"delta\",outcome=\"ok\"} 0",
            "storebox_sync_run_duration_seconds_bucket{process=\"full\",le=\"1\"} 0",
            "storebox_sync_run_duration_seconds_bucket{process=\"full\",le=\"2.5\"} 1",
            "storebox_sync_run_duration_seconds_sum{process=\"full\"} 1.5",
            "storebox_sync_module_runs_total{process=\"full\",module=\"catalog\",outcome=\"ok\"} 1",
            "storebox_sync_module_runs_total{process=\"full\",module=\"promotions\",outcome=\"failed\"} 1",
            "storebox_sync_module_run_duration_seconds_count{process=\"full\",module=\"catalog\"} 1",
        ] {
            assert!(out.contains(&format!("{line}\n")), "{line}: {out}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape_label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
        let doc = serde_json::json!({"store_id": "shop \"1\"", "version": "0.1.0"});
        let out = Metrics::new().render(&doc, None);
        assert!(out.contains("storebox_info{store_id=\"shop \\\"1\\\"\",version=\"0.1.0\"} 1\n"));
    }
}
