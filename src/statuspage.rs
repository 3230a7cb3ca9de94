//! `GET /`: the status page for field technicians and store managers, one self-contained
//! HTML document (inline CSS, no script, no web font, no external asset) so it works from a
//! phone on the shop's LAN with the Internet link down. It refreshes itself every 10 s.
//!
//! It shows the status document of [`crate::lan::status`] (the same data as `GET /v1/status`),
//! plus what only makes sense for people: the hub traffic of the current local day, and the
//! free space of the data directory's file system. Every value that comes from data (module
//! names, errors, record ids, the store id) is HTML-escaped.
//!
//! **Bytes today.** The box counts each sync process's bytes since start. "Today" subtracts a
//! baseline kept in memory: zero when the box started today (the counters began at zero), else
//! the counters at the first reading of the day. A task started with the first page or scrape
//! takes a reading every minute, so after a midnight the day starts within a minute of 00:00;
//! the page says since when it counts. A restart starts the count again (the counters restart).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use chrono::{DateTime, Local, NaiveDate};
use http::{header, Response, StatusCode};
use serde_json::Value;
use storebox_http::Body;

use crate::lan::LanState;

/// Seconds between the page's own reloads.
const REFRESH_S: u32 = 10;

/// The data directory's file system, from `statvfs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DiskSpace {
    /// Bytes an unprivileged writer can still use (`f_bavail`), what the daemon can count on.
    pub available: u64,
    pub total: u64,
}

/// Per sync process: (sent, received).
type ByteCounts = BTreeMap<String, (u64, u64)>;

/// The baseline that turns "since start" byte counters into "today".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailyBaseline {
    pub day: NaiveDate,
    /// From when "today" counts: midnight-ish, the box's start, or the first reading.
    pub since: DateTime<Local>,
    base: ByteCounts,
}

impl DailyBaseline {
    /// The baseline after a reading of `counters` at `now`, given the previous one (if any)
    /// and when the box started.
    pub fn advance(
        previous: Option<DailyBaseline>,
        now: DateTime<Local>,
        started: DateTime<Local>,
        counters: &ByteCounts,
    ) -> DailyBaseline {
        let today = now.date_naive();
        match previous {
            Some(b) if b.day == today => b,
            // The counters started at zero today: all of them belong to today.
            None if started.date_naive() == today => DailyBaseline {
                day: today,
                since: started,
                base: ByteCounts::new(),
            },
            // A new day, or a first reading on a later day than the start: what was counted
            // until now belongs to earlier days.
            _ => DailyBaseline {
                day: today,
                since: now,
                base: counters.clone(),
            },
        }
    }

    /// `counters` minus the baseline.
    pub fn today(&self, counters: &ByteCounts) -> ByteCounts {
        counters
            .iter()
            .map(|(process, (sent, received))| {
                let (base_sent, base_received) =
                    self.base.get(process).copied().unwrap_or_default();
                (
                    process.clone(),
                    (
                        sent.saturating_sub(base_sent),
                        received.saturating_sub(base_received),
                    ),
                )
            })
            .collect()
    }
}

static BASELINE: Mutex<Option<DailyBaseline>> = Mutex::new(None);
static SAMPLER: OnceLock<()> = OnceLock::new();

fn counters(state: &LanState) -> ByteCounts {
    state
        .sync
        .bytes()
        .into_iter()
        .map(|(process, counts)| (process.to_owned(), counts))
        .collect()
}

/// Takes a reading of the byte counters; answers the baseline in force.
fn read_baseline(state: &LanState, counters: &ByteCounts) -> DailyBaseline {
    let now = Local::now();
    let started = now
        - chrono::Duration::from_std(state.started.elapsed()).unwrap_or(chrono::Duration::zero());
    let mut guard = BASELINE.lock().unwrap_or_else(|p| p.into_inner());
    let next = DailyBaseline::advance(guard.take(), now, started, counters);
    *guard = Some(next.clone());
    next
}

/// Starts, once, the task that reads the counters every minute, so the day rolls over near
/// midnight even when nobody looks at the page then.
pub fn ensure_sampler(state: &Arc<LanState>) {
    if SAMPLER.get().is_some() {
        return;
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if SAMPLER.set(()).is_ok() {
        let state = state.clone();
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(60)).await;
                read_baseline(&state, &counters(&state));
            }
        });
    }
}

/// The wire bytes of each process since the day's baseline, and since when.
pub fn bytes_today(state: &Arc<LanState>) -> (ByteCounts, DateTime<Local>) {
    ensure_sampler(state);
    let counters = counters(state);
    let baseline = read_baseline(state, &counters);
    (baseline.today(&counters), baseline.since)
}

/// The data directory, found from the open database file: the LAN state carries no path,
/// and the open file is the truth about where the box writes. Found once, then kept.
fn data_dir() -> Option<PathBuf> {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    if let Some(dir) = DIR.get() {
        return Some(dir.clone());
    }
    let found = std::fs::read_dir("/proc/self/fd")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .find(|target| target.file_name().is_some_and(|n| n == "storebox.redb"))?
        .parent()?
        .to_path_buf();
    Some(DIR.get_or_init(|| found).clone())
}

/// Free and total space of the data directory's file system.
pub fn disk_space() -> Option<DiskSpace> {
    let dir = data_dir()?;
    let stat = rustix::fs::statvfs(&dir).ok()?;
    Some(DiskSpace {
        available: stat.f_bavail.saturating_mul(stat.f_frsize),
        total: stat.f_blocks.saturating_mul(stat.f_frsize),
    })
}

/// Everything the page shows besides the status document.
#[derive(Debug, Clone)]
pub struct PageExtras {
    pub now: DateTime<Local>,
    pub disk: Option<DiskSpace>,
    pub bytes_today: ByteCounts,
    pub today_since: DateTime<Local>,
}

/// Answers `GET /`.
pub fn page(state: &Arc<LanState>) -> Response<Body> {
    let doc = crate::lan::status(state);
    let (bytes_today, today_since) = bytes_today(state);
    let extras = PageExtras {
        now: Local::now(),
        disk: disk_space(),
        bytes_today,
        today_since,
    };
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::new(Bytes::from(render(&doc, &extras))))
        .unwrap_or_else(|_| Response::new(Body::new(Bytes::new())))
}

/// Escapes text for HTML content and quoted attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A JSON value as escaped text; `null` as a dash.
fn val(v: &Value) -> String {
    match v {
        Value::Null => "–".into(),
        Value::String(s) => escape(s),
        other => escape(&other.to_string()),
    }
}

/// Bytes for people, in decimal units like the README's figures.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KB", "MB", "GB", "TB", "PB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1000.0;
    let mut unit = 0;
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        value /= 1000.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// An age or duration for people: the two largest units.
pub fn human_age(seconds: u64) -> String {
    let (d, h, m, s) = (
        seconds / 86_400,
        seconds / 3600 % 24,
        seconds / 60 % 60,
        seconds % 60,
    );
    match (d, h, m) {
        (0, 0, 0) => format!("{s} s"),
        (0, 0, _) => format!("{m} min {s} s"),
        (0, _, _) => format!("{h} h {m} min"),
        _ => format!("{d} d {h} h"),
    }
}

/// An RFC 3339 time from the status document in the box's local time; the date only when it
/// is not `today`, so the tables stay narrow on a phone.
fn local_time(v: &Value, today: NaiveDate) -> String {
    v.as_str()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| {
            let t = t.with_timezone(&Local);
            let format = if t.date_naive() == today {
                "%H:%M:%S"
            } else {
                "%Y-%m-%d %H:%M"
            };
            format!("<time>{}</time>", t.format(format))
        })
        .unwrap_or_else(|| val(v))
}

/// A data age in seconds, for people, with the exact figure on hover.
fn age_cell(v: &Value) -> String {
    match v.as_u64() {
        Some(s) => format!("<span title=\"{s} s\">{}</span>", human_age(s)),
        None => "never".into(),
    }
}

const STYLE: &str = "
:root{color-scheme:light;--ok:#1a7f37;--bad:#c62828;--warn:#9a6700;--line:#d0d7de;--muted:#57606a}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,'DejaVu Sans',sans-serif;color:#1f2328;background:#f6f8fa}
main{max-width:64rem;margin:0 auto;padding:1rem}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:.25rem 1rem;margin-bottom:.5rem}
h1{font-size:1.4rem;margin:0}
h2{font-size:1.05rem;margin:0 0 .5rem}
.muted{color:var(--muted)}
section{background:#fff;border:1px solid var(--line);border-radius:8px;padding:.75rem 1rem;margin:.75rem 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:.35rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
th{font-weight:600;background:#f6f8fa;white-space:nowrap}
time{white-space:nowrap}
td.num,th.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
tbody th{background:none}
tr:last-child td,tr:last-child th{border-bottom:0}
tr.bad td,tr.bad th{background:#fff5f5}
.badge{display:inline-block;padding:.05rem .55rem;border-radius:999px;font-weight:600;color:#fff}
.badge.up{background:var(--ok)}.badge.down{background:var(--bad)}.badge.unknown{background:var(--warn)}
.err{color:var(--bad);overflow-wrap:anywhere}
dl{display:grid;grid-template-columns:max-content 1fr;gap:.25rem 1rem;margin:0}
dt{color:var(--muted)}dd{margin:0;overflow-wrap:anywhere}
footer{font-size:.85rem;margin:1rem 0}
@media (max-width:600px){body{font-size:14px}main{padding:.5rem}th,td{padding:.3rem .4rem}dl{grid-template-columns:1fr}dt{margin-top:.3rem}}
";

/// The page for a status document.
pub fn render(doc: &Value, extras: &PageExtras) -> String {
    let mut h = String::with_capacity(16 * 1024);
    let store = val(&doc["store_id"]);
    let _ = writeln!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_S}\">\
         <title>storebox {store}</title><style>{STYLE}</style></head><body><main>"
    );
    let _ = writeln!(
        h,
        "<header><h1>storebox · store <span id=\"store-id\">{store}</span></h1>\
         <span class=\"muted\">version <span id=\"version\">{}</span> · up {} · \
         as of {} (box time)</span></header>",
        val(&doc["version"]),
        doc["uptime_s"].as_u64().map(human_age).unwrap_or_default(),
        extras.now.format("%Y-%m-%d %H:%M:%S"),
    );
    let today = extras.now.date_naive();
    hub_section(&mut h, doc, today);
    modules_section(&mut h, doc, today);
    activity_section(&mut h, doc);
    traffic_section(&mut h, doc, extras);
    storage_section(&mut h, doc, extras);
    security_section(&mut h, doc, today);
    ota_section(&mut h, doc);
    let _ = writeln!(
        h,
        "<footer class=\"muted\">This page reloads every {REFRESH_S} s. Machine-readable: \
         <a href=\"/v1/status\">/v1/status</a> (JSON), <a href=\"/metrics\">/metrics</a> \
         (Prometheus).</footer>\n</main></body></html>"
    );
    h
}

fn hub_section(h: &mut String, doc: &Value, today: NaiveDate) {
    let hub = &doc["hub"];
    // Only known words reach the class attribute and the badge.
    let state = hub["state"]
        .as_str()
        .filter(|s| matches!(*s, "up" | "down"))
        .unwrap_or("unknown");
    let _ = write!(
        h,
        "<section><h2>Hub link</h2><dl>\
         <dt>state</dt><dd><span id=\"hub-state\" class=\"badge {state}\">{state}</span></dd>\
         <dt>last successful call</dt><dd>{}</dd>",
        local_time(&hub["last_ok"], today),
    );
    if !hub["last_error"].is_null() {
        let _ = write!(
            h,
            "<dt>last error</dt><dd class=\"err\" id=\"hub-error\">{}</dd>",
            val(&hub["last_error"])
        );
    }
    let full = &doc["last_full_sync"];
    if full.is_object() {
        let _ = write!(
            h,
            "<dt>last full sync</dt><dd>{} in {}, {} received{}</dd>",
            if full["ok"] == true {
                "ok"
            } else {
                "<span class=\"err\">FAILED</span>"
            },
            match full["duration_ms"].as_u64().unwrap_or(0) {
                ms @ 0..1000 => format!("{ms} ms"),
                ms => human_age(ms / 1000),
            },
            human_bytes(full["bytes_received"].as_u64().unwrap_or(0)),
            match full["error"].as_str() {
                Some(e) => format!(": <span class=\"err\">{}</span>", escape(e)),
                None => String::new(),
            },
        );
    }
    h.push_str("</dl></section>\n");
}

/// The LAN certificate fingerprint tills pin, the codes of tills waiting to pair (a manager
/// compares each with the code on the till before confirming), and the hub identity.
fn security_section(h: &mut String, doc: &Value, today: NaiveDate) {
    let fingerprint = match doc["lan_tls"]["fingerprint"].as_str() {
        Some(fp) => format!("<code id=\"lan-fingerprint\">{}</code>", escape(fp)),
        None => "<span class=\"err\">plain HTTP: no TLS on the LAN</span>".into(),
    };
    let identity = &doc["identity"];
    let certificate = if identity["enrolled"] == true {
        format!(
            "valid until {}, renewed from {}",
            local_time(&identity["not_after"], today),
            local_time(&identity["renew_at"], today)
        )
    } else {
        "<span class=\"err\">not enrolled</span>".into()
    };
    let _ = write!(
        h,
        "<section><h2>Security</h2><dl>\
         <dt>till API certificate (SHA-256)</dt><dd>{fingerprint}</dd>\
         <dt>paired tills</dt><dd>{}</dd>\
         <dt>hub client certificate</dt><dd>{certificate}</dd>",
        val(&doc["pairing"]["paired_tills"]),
    );
    if let Some(pending) = doc["pairing"]["pending"]
        .as_array()
        .filter(|p| !p.is_empty())
    {
        h.push_str("<dt>waiting to pair</dt><dd><ul id=\"pairing\">");
        for p in pending {
            let _ = write!(
                h,
                "<li><strong>{}</strong> {}</li>",
                val(&p["code"]),
                val(&p["name"])
            );
        }
        h.push_str("</ul></dd>");
    }
    h.push_str("</dl></section>\n");
}

fn modules_section(h: &mut String, doc: &Value, today: NaiveDate) {
    h.push_str(
        "<section><h2>Data modules</h2><div class=\"scroll\"><table id=\"modules\">\
         <thead><tr><th>module</th><th class=\"num\">records</th><th>last delta</th>\
         <th>last full sync</th><th class=\"num\">data age</th>\
         <th class=\"num\">quarantined</th><th>error</th></tr></thead><tbody>\n",
    );
    let empty = serde_json::Map::new();
    let modules = doc["modules"].as_object().unwrap_or(&empty);
    if modules.is_empty() {
        h.push_str("<tr><td colspan=\"7\" class=\"muted\">no module received yet</td></tr>\n");
    }
    let mut quarantine = String::new();
    for (name, m) in modules {
        let name = escape(name);
        let failing = !m["last_error"].is_null();
        let _ = writeln!(
            h,
            "<tr id=\"module-{name}\"{}><th scope=\"row\">{name}</th>\
             <td class=\"num records\">{}</td><td>{}</td><td>{}</td>\
             <td class=\"num age\">{}</td><td class=\"num quarantined\">{}</td>\
             <td class=\"err\">{}</td></tr>",
            if failing { " class=\"bad\"" } else { "" },
            val(&m["records"]),
            local_time(&m["last_delta_ok"], today),
            local_time(&m["last_full_ok"], today),
            age_cell(&m["data_age_s"]),
            val(&m["quarantined"]),
            if failing {
                val(&m["last_error"])
            } else {
                String::new()
            },
        );
        for q in m["quarantine"].as_array().into_iter().flatten() {
            let _ = write!(
                quarantine,
                "<tr><td>{name}</td><td>{}</td><td class=\"err\">{}</td></tr>",
                val(&q["id"]),
                val(&q["reason"]),
            );
        }
    }
    h.push_str("</tbody></table></div>\n");
    if !quarantine.is_empty() {
        let _ = writeln!(
            h,
            "<details><summary>Quarantined records (first 20 per module; fix them at the hub)\
             </summary><div class=\"scroll\"><table><thead><tr><th>module</th><th>id</th>\
             <th>reason</th></tr></thead><tbody>{quarantine}</tbody></table></div></details>"
        );
    }
    h.push_str("</section>\n");
}

fn ota_section(h: &mut String, doc: &Value) {
    let o = &doc["ota"];
    let last = &o["last"];
    let last_text = if last.is_null() {
        "none".to_owned()
    } else {
        format!(
            "{} {} at {}{}",
            val(&last["event"]).replace('_', " "),
            val(&last["version"]),
            val(&last["at"]),
            last["reason"]
                .as_str()
                .map(|r| format!(": <span class=\"err\">{}</span>", escape(r)))
                .unwrap_or_default()
        )
    };
    let bad = matches!(last["event"].as_str(), Some("failed" | "rolled_back"));
    let health = if o["health"]["healthy"] == true {
        "healthy".to_owned()
    } else {
        format!(
            "not healthy: {}",
            escape(
                &o["health"]["problems"]
                    .as_array()
                    .map(|p| p.iter().map(val).collect::<Vec<_>>().join("; "))
                    .unwrap_or_default()
            )
        )
    };
    let _ = writeln!(
        h,
        "<section><h2>Software</h2><dl>\
         <dt>image</dt><dd><span id=\"image-version\">{}</span> on slot {} ({})</dd>\
         <dt>update</dt><dd id=\"ota-phase\">{}{}</dd>\
         <dt>last update event</dt><dd id=\"ota-last\"{}>{last_text}</dd>\
         <dt>health</dt><dd>{health}</dd>\
         <dt>install</dt><dd><a href=\"/update\">Install an update bundle…</a> \
         (technician credential)</dd></dl></section>",
        val(&o["running"]),
        val(&o["slot"]),
        val(&o["compatible"]),
        val(&o["phase"]),
        o["target"]["version"]
            .as_str()
            .map(|v| format!(", hub target {}", escape(v)))
            .unwrap_or_default(),
        if bad { " class=\"err\"" } else { "" },
    );
}

/// `GET /update`: a form for a technician to upload a bundle from a laptop's browser, in
/// chunks (so a cut resumes), then queue its install and follow it. Not on the status page
/// itself, which reloads itself.
pub fn update_page() -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::new(Bytes::from(format!(
            "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
             <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
             <title>storebox update</title><style>{STYLE}</style></head><body><main>\
             <header><h1>storebox · install an update</h1>\
             <a href=\"/\">back to the status page</a></header>{UPDATE_FORM}</main></body></html>"
        ))))
        .unwrap_or_else(|_| Response::new(Body::new(Bytes::new())))
}

const UPDATE_FORM: &str = r#"<section><form id="f"><dl>
<dt><label for="token">technician token</label></dt><dd><input id="token" type="password" required size="40"></dd>
<dt><label for="file">bundle (.raucb)</label></dt><dd><input id="file" type="file" accept=".raucb" required></dd>
<dt><label for="force">older version</label></dt><dd><input id="force" type="checkbox"> install even if not newer</dd>
</dl><p><button>Upload and install</button></p></form>
<p><progress id="bar" max="100" value="0"></progress> <span id="msg" class="muted"></span></p></section>
<script>
const CHUNK = 8 * 1024 * 1024;
const $ = (id) => document.getElementById(id);
const say = (t, bad) => { $("msg").textContent = t; $("msg").className = bad ? "err" : "muted"; };
async function call(method, path, token, body, headers) {
  const r = await fetch(path, { method, body, headers: Object.assign({ authorization: "Bearer " + token }, headers || {}) });
  let doc = {}; try { doc = await r.json(); } catch (e) {}
  return [r.status, doc];
}
$("f").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const token = $("token").value.trim(), file = $("file").files[0];
  let [st, doc] = await call("GET", "/v1/ota", token);
  if (st !== 200) return say(doc.message || ("the box answered " + st), true);
  let offset = 0;
  const inc = doc.incoming;
  if (inc && inc.source === "lan" && inc.name === file.name && inc.total === file.size) offset = Math.min(inc.received, file.size);
  while (offset < file.size) {
    const end = Math.min(offset + CHUNK, file.size);
    [st, doc] = await call("PUT", "/v1/ota/bundle", token, file.slice(offset, end),
      { "content-range": "bytes " + offset + "-" + (end - 1) + "/" + file.size, "x-bundle-name": file.name });
    if (st === 409 && typeof doc.received === "number") { offset = doc.received; continue; }
    if (st !== 200) return say(doc.message || ("upload refused: " + st), true);
    offset = end;
    $("bar").value = Math.floor(offset * 100 / file.size);
    say("uploaded " + (offset >> 20) + " of " + (file.size >> 20) + " MiB");
  }
  [st, doc] = await call("POST", "/v1/ota/install", token, JSON.stringify({ force_downgrade: $("force").checked }), { "content-type": "application/json" });
  if (st !== 202) return say(doc.message || ("install refused: " + st), true);
  const attempt = doc.attempt;
  say("checking and installing…");
  for (;;) {
    await new Promise((r) => setTimeout(r, 1000));
    try { [st, doc] = await call("GET", "/v1/ota", token); } catch (e) { return say("the box is rebooting into the new version"); }
    if (doc.attempt !== attempt) continue;
    if (doc.phase === "installed" || doc.phase === "trial") return say("installed " + doc.version + "; the box reboots into it now");
    if (doc.phase === "idle" && doc.last && doc.last.event === "failed") return say("refused: " + doc.last.reason, true);
    say("phase: " + doc.phase);
  }
});
</script>"#;

fn activity_section(h: &mut String, doc: &Value) {
    let a = &doc["activity"];
    let oldest = match a["oldest_pending_age_s"].as_u64() {
        Some(s) => format!("<span title=\"{s} s\">{}</span>", human_age(s)),
        None => "none pending".into(),
    };
    let _ = writeln!(
        h,
        "<section><h2>Activity (sales, payments…)</h2><dl>\
         <dt>waiting for the hub</dt><dd><span id=\"pending\">{}</span> {}</dd>\
         <dt>oldest waiting</dt><dd id=\"oldest-pending\">{oldest}</dd>\
         <dt>pushed through</dt><dd>event #{}</dd></dl></section>",
        val(&a["pending"]),
        if a["pending"] == 1 { "event" } else { "events" },
        val(&a["pushed"]),
    );
}

fn traffic_section(h: &mut String, doc: &Value, extras: &PageExtras) {
    let since = if extras.today_since.date_naive() == extras.now.date_naive() {
        extras.today_since.format("%H:%M").to_string()
    } else {
        extras.today_since.format("%Y-%m-%d %H:%M").to_string()
    };
    let _ = writeln!(
        h,
        "<section><h2>Hub traffic today</h2><p class=\"muted\">Bytes on the wire (TLS \
         included) since {since}, box time; since start in brackets.</p>\
         <div class=\"scroll\"><table id=\"traffic\"><thead><tr><th>process</th>\
         <th class=\"num\">sent</th><th class=\"num\">received</th></tr></thead><tbody>"
    );
    for (process, b) in doc["bytes"].as_object().into_iter().flatten() {
        let (sent, received) = extras.bytes_today.get(process).copied().unwrap_or_default();
        let cell = |today: u64, total: &Value| {
            format!(
                "<span title=\"{today} bytes\">{}</span> <span class=\"muted\">({})</span>",
                human_bytes(today),
                human_bytes(total.as_u64().unwrap_or(0))
            )
        };
        let _ = writeln!(
            h,
            "<tr id=\"traffic-{p}\"><th scope=\"row\">{p}</th><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td></tr>",
            cell(sent, &b["sent"]),
            cell(received, &b["received"]),
            p = escape(process),
        );
    }
    h.push_str("</tbody></table></div></section>\n");
}

fn storage_section(h: &mut String, doc: &Value, extras: &PageExtras) {
    let storage = &doc["storage"];
    let journal = &storage["journal"];
    let process = match storage["process_write_bytes"].as_u64() {
        Some(n) => human_bytes(n),
        None => "not reported by the kernel".into(),
    };
    let database: u64 = storage["table_bytes"]
        .as_object()
        .into_iter()
        .flatten()
        .filter_map(|(_, v)| v.as_u64())
        .sum();
    let disk = match extras.disk {
        Some(d) => format!(
            "{} free of {} ({:.0} %)",
            human_bytes(d.available),
            human_bytes(d.total),
            if d.total > 0 {
                d.available as f64 * 100.0 / d.total as f64
            } else {
                0.0
            }
        ),
        None => "unknown".into(),
    };
    let _ = writeln!(
        h,
        "<section><h2>Storage and flash wear</h2><dl>\
         <dt>written by the daemon since start</dt><dd id=\"process-write\">{process}</dd>\
         <dt>activity journal since start</dt><dd id=\"journal-write\">{} in {} commits</dd>\
         <dt>database tables</dt><dd>{}</dd>\
         <dt>data directory disk</dt><dd id=\"disk-free\">{disk}</dd>\
         {}</dl></section>",
        human_bytes(journal["bytes_written"].as_u64().unwrap_or(0)),
        val(&journal["commits"]),
        human_bytes(database),
        certificate_row(),
    );
}

/// The certificate expiry row. Hook: the LAN listener serves plain HTTP today, so there is
/// no certificate of the box's own to watch; when it gets TLS, show the expiry of its
/// certificate here (and warn a few weeks ahead), from the listener's loaded certificate.
fn certificate_row() -> &'static str {
    "<!-- cert-expiry: filled in when the LAN listener serves TLS -->\
     <dt>certificate expiry</dt><dd id=\"cert-expiry\" class=\"muted\">no TLS yet \
     (the till API is plain HTTP on the shop LAN)</dd>"
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use serde_json::json;

    fn at(day: u32, hour: u32) -> DateTime<Local> {
        Local
            .with_ymd_and_hms(2026, 3, day, hour, 0, 0)
            .earliest()
            .unwrap()
    }

    fn counts(full: u64) -> ByteCounts {
        [("full".to_owned(), (full, full * 10))]
            .into_iter()
            .collect()
    }

    #[test]
    fn bytes_today_start_at_zero_on_the_start_day_and_roll_at_a_new_day() {
        // Started today: everything counted so far is today's.
        let b = DailyBaseline::advance(None, at(2, 9), at(2, 7), &counts(100));
        assert_eq!(b.since, at(2, 7));
        assert_eq!(b.today(&counts(100))["full"], (100, 1000));
        // Same day: the baseline holds.
        let b = DailyBaseline::advance(Some(b), at(2, 23), at(2, 7), &counts(150));
        assert_eq!(b.today(&counts(150))["full"], (150, 1500));
        // Next day: what came before belongs to yesterday.
        let b = DailyBaseline::advance(Some(b), at(3, 0), at(2, 7), &counts(160));
        assert_eq!((b.day, b.since), (at(3, 0).date_naive(), at(3, 0)));
        assert_eq!(b.today(&counts(175))["full"], (15, 150));
        // First reading on a later day than the start: count from that reading.
        let b = DailyBaseline::advance(None, at(5, 10), at(2, 7), &counts(500));
        assert_eq!(b.since, at(5, 10));
        assert_eq!(b.today(&counts(510))["full"], (10, 100));
    }

    #[test]
    fn people_read_sizes_and_ages() {
        assert_eq!(human_bytes(819), "819 B");
        assert_eq!(human_bytes(389_098), "389.1 KB");
        assert_eq!(human_bytes(2_500_000), "2.5 MB");
        assert_eq!(human_age(42), "42 s");
        assert_eq!(human_age(3 * 60 + 5), "3 min 5 s");
        assert_eq!(human_age(2 * 3600 + 7 * 60), "2 h 7 min");
        assert_eq!(human_age(3 * 86_400 + 3600), "3 d 1 h");
    }

    #[test]
    fn every_value_from_data_is_escaped() {
        let evil = "<script>alert('x')</script> & \"q\"";
        let doc = json!({
            "store_id": evil, "version": "0.1.0", "uptime_s": 5,
            "modules": {"cat<b>": {
                "records": 3, "quarantined": 1,
                "quarantine": [{"id": evil, "reason": evil}],
                "last_delta_ok": null, "last_full_ok": "2026-03-02T10:00:00Z",
                "last_error": evil, "data_age_s": 7}},
            "activity": {"pending": 2, "pushed": 1, "oldest_pending_age_s": 9},
            "hub": {"state": "<down>", "last_ok": null, "last_error": evil},
            "bytes": {"fu<ll": {"sent": 1, "received": 2}},
            "storage": {"process_write_bytes": null,
                        "journal": {"bytes_written": 4096, "commits": 1},
                        "table_bytes": {"records": 10}},
            "last_full_sync": {"ok": false, "error": evil, "duration_ms": 10,
                               "bytes_received": 5},
            "ota": {"running": evil, "slot": "A", "compatible": "board", "phase": "idle",
                    "target": {"version": evil},
                    "last": {"event": "rolled_back", "version": evil, "reason": evil,
                             "at": "2026-03-02T03:10:00Z"},
                    "health": {"healthy": false, "problems": [evil]}},
        });
        let extras = PageExtras {
            now: at(2, 12),
            disk: Some(DiskSpace {
                available: 1_000_000,
                total: 4_000_000,
            }),
            bytes_today: ByteCounts::new(),
            today_since: at(2, 0),
        };
        let html = render(&doc, &extras);
        assert!(!html.contains("<script"), "{html}");
        assert!(
            !html.contains("cat<b>") && !html.contains("fu<ll"),
            "{html}"
        );
        assert!(
            html.contains("&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;")
        );
        assert!(html.contains("id=\"module-cat&lt;b&gt;\""));
        assert!(html.contains("class=\"badge unknown\""));
        assert!(html.contains("<span id=\"pending\">2</span>"));
        // A rollback shows with its reason, marked as an error.
        assert!(
            html.contains("<dd id=\"ota-last\" class=\"err\">rolled back"),
            "{html}"
        );
        assert!(html.contains("href=\"/update\""));
        assert!(html.contains("1.0 MB free of 4.0 MB (25 %)"));
        assert!(html.contains("no TLS yet"));
        assert!(!html.contains("http://") && !html.contains("https://") && !html.contains("<link"));
    }
}
