//! `bench storage`: what the box costs the flash of a shop's appliance, and whether it holds up
//! under the tills, each figure next to a baseline measured in the same run on the same disk.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p storebox-bench -- storage [--quick]
//! ```
//!
//! A real `storehub` and a real release `storebox serve` run on 127.0.0.1 with the seed-scale
//! store (`storebox_sim::generate_store(1)`, cold full sync at box start), the box's periodic
//! delta pull and scheduled full sync off (a drop-in), its activity push on as in a shop. The
//! data directories live in a temporary directory on the real disk: the run refuses tmpfs,
//! where `O_DIRECT` and flash costs mean nothing. "Flash bytes" are the box process's
//! `write_bytes` of `/proc/<pid>/io` (what it sent to the block layer, page cache included
//! once dirtied; the hub's own writes are not counted), next to the journal's own count from
//! `/v1/status`.
//!
//! 1. **Durable activity ingest**: 8 tills (threads, one keep-alive HTTP/1.1 connection each)
//!    post 500-byte events at 1, 10, 100 and 1,000 events/s in total, open loop (latency from
//!    the scheduled send time, see [`load`]), then unpaced (closed loop). Per run: events
//!    acknowledged per second, p50/p99 ack latency, flash bytes per event.
//!    Baseline: SQLite ([`sqlite`]), the usual embedded answer to "store this durably", with
//!    the same payloads, tills and pacing, in this process (nothing else in it writes during
//!    its runs), its flash bytes from `/proc/self/io`. The two take turns going first from
//!    one rate to the next; SQLite's 1 event/s run overlaps the box's idle period below,
//!    which leaves the box untouched.
//! 2. **Full-sync write cost**: the box's `write_bytes` for `POST /v1/sync/full` when nothing
//!    changed, then after 1 % of the catalog (50 products) got a new price at the hub, next to
//!    the changed records' encoded size (their canonical JSON, as the box serves them). No
//!    activity is pending (the sync would push it first): the syncs run before any is posted.
//!    Three runs of each, the median shown.
//! 3. **Read path**: lookups by id and by EAN at 500 requests/s from 10 keep-alive clients,
//!    open loop, p50/p99. Baseline: nginx ([`nginx`]) serving the very same bytes as static
//!    files, with the same clients and schedule; series alternate between the two so drift
//!    of a noisy machine falls on both. Skipped, and said so, without nginx.
//! 4. **Idle memory**: the box's VmRSS 10 s after its cold full sync, no request meanwhile.
//!
//! The results are checked against the storage issue's targets (met/missed in the Markdown;
//! the product is measured, not tuned to them). Results go to `bench/results/storage.json` and
//! `bench/results/storage.md`, the table to stdout.

mod load;
mod nginx;
mod report;
mod sqlite;

use std::collections::btree_map::Entry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use serde_json::{json, Value};

use crate::common::{bytes_h, machine_info, ratio, rss_kib, sibling, Bins, BoxProc, Hub, Lat};
use load::{drive, HttpConn, Outcome, Pace};
use sqlite::Sqlite;

/// Tills posting activity.
const TILLS: usize = 8;
/// Size of every activity body, id included.
const EVENT_BYTES: usize = 500;
/// Offered activity rates, events/s in total, before the unpaced run.
const RATES: [u64; 4] = [1, 10, 100, 1_000];
/// Lookup load: requests/s in total, and clients sharing it.
const LOOKUP_RATE: u64 = 500;
const LOOKUP_CLIENTS: usize = 10;
/// Unmeasured load on each lookup series before the measured rounds.
const LOOKUP_WARMUP: Duration = Duration::from_millis(500);
/// Products changed at the hub for the 1 % full sync.
const CHANGED_PRODUCTS: usize = 50;
/// Idle time before the box's memory is read.
const IDLE: Duration = Duration::from_secs(10);
/// Measured full syncs of each kind.
const FULL_SYNC_REPEATS: usize = 3;
/// Time left to the box after a full sync answered, for any write that trails it.
const SETTLE: Duration = Duration::from_millis(300);

/// Run sizes: the full run stays under ~3 minutes, `--quick` under ~1.
pub struct Plan {
    quick: bool,
    /// The 1 event/s runs.
    slow_run: Duration,
    /// Every other activity run.
    run: Duration,
    /// One lookup series segment; each (server, lookup) series gets `rounds` of them.
    lookup_segment: Duration,
    rounds: usize,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                slow_run: Duration::from_secs(10),
                run: Duration::from_secs(2),
                lookup_segment: Duration::from_millis(500),
                rounds: 2,
            }
        } else {
            Plan {
                quick,
                slow_run: Duration::from_secs(20),
                run: Duration::from_secs(8),
                lookup_segment: Duration::from_secs(1),
                rounds: 4,
            }
        }
    }

    fn run_for(&self, rate: u64) -> Duration {
        if rate <= 1 {
            self.slow_run
        } else {
            self.run
        }
    }
}

pub async fn run(plan: &Plan) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let bins = Bins {
        hub: sibling(&exe, "storehub")?,
        storebox: sibling(&exe, "storebox")?,
    };
    let started_at = chrono::Utc::now();
    // Other work on the machine shows in every latency: said next to the results.
    let load_start = loadavg();
    let run_id = format!("{:x}", started_at.timestamp_millis());
    let store = storebox_sim::generate_store(1);
    let records: usize = store.modules.values().map(Vec::len).sum();
    let events = Arc::new(Events::new(&store)?);

    let hub = Hub::start(&bins).await?;
    let dir = hub.dir.path();
    let disk = Disk::of(dir)?;
    ensure!(
        !matches!(disk.fstype.as_str(), "tmpfs" | "ramfs"),
        "the temporary directory is on {}, not on a disk: flash figures would mean nothing \
         (point TMPDIR at a directory on the real disk)",
        disk.fstype
    );
    for (module, records) in &store.modules {
        hub.import(module, records).await?;
    }
    println!(
        "hub ready, {records} records imported; data on {}; starting the box (cold full sync)",
        disk.fstype
    );

    // Cold full sync.
    let boxp = BoxProc::spawn_with(&bins, &hub, "full_sync_at = []\n")?;
    let pid = boxp.proc.pid;
    boxp.wait_full_sync(Duration::from_secs(60)).await?;
    let full_doc = boxp.wait_full_report(Duration::from_secs(10)).await?;
    let synced_at = Instant::now();
    let synced: u64 = storebox_sim::MODULES
        .iter()
        .map(|m| full_doc["modules"][m]["records"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        synced == records as u64,
        "the box holds {synced} records after its full sync, the store has {records}"
    );
    let cold_write = write_bytes(pid)?;
    let journal_direct = full_doc["storage"]["journal"]["direct_io"].clone();
    println!(
        "box synced ({synced} records, {} written since start); idle {} s while SQLite runs \
         its 1 event/s series",
        bytes_h(cold_write),
        IDLE.as_secs()
    );

    // Idle memory, and meanwhile SQLite's slow run (in this process: the box sees nothing).
    let sqlite_dir = hub.dir.path().join("sqlite");
    std::fs::create_dir_all(&sqlite_dir)?;
    let db = Arc::new(Sqlite::open(&sqlite_dir.join("activity.db"))?);
    let idle = tokio::spawn(async move {
        tokio::time::sleep_until((synced_at + IDLE).into()).await;
        (rss_kib(pid), write_bytes(pid), synced_at.elapsed())
    });
    let mut sqlite_runs = BTreeMap::new();
    let slow = RATES[0];
    sqlite_runs.insert(
        slow,
        sqlite_series(&db, &events, &run_id, slow, open(slow, plan.run_for(slow))).await?,
    );
    let (idle_rss, idle_write, idle_for) = idle.await.context("the idle timer")?;
    let idle_rss = idle_rss?;
    let memory = json!({
        "idle_rss_kib": idle_rss,
        "idle_seconds": idle_for.as_secs_f64(),
        "write_bytes_while_idle": idle_write?.saturating_sub(cold_write),
        "write_bytes_box_start_to_synced": cold_write,
    });
    println!(
        "box idle RSS {:.1} MiB after {:.1} s idle",
        idle_rss as f64 / 1024.0,
        idle_for.as_secs_f64()
    );

    // Read path.
    let lookup = read_path(plan, &boxp, &hub, &store).await?;

    // Full-sync write cost, before any activity so none is pending.
    let full_sync = full_sync_cost(&boxp, &hub, &store).await?;

    // Durable activity: each rate on the box and on SQLite, which goes first every other
    // rate, so that the machine's drift does not always fall on the same side.
    let mut activity_runs = Vec::new();
    let series: Vec<Option<u64>> = RATES.iter().copied().map(Some).chain([None]).collect();
    for (n, rate) in series.into_iter().enumerate() {
        let pace = match rate {
            Some(r) => open(r, plan.run_for(r)),
            None => Pace::Closed { run: plan.run },
        };
        let key = rate.unwrap_or(0);
        if n % 2 == 0 {
            if let Entry::Vacant(slot) = sqlite_runs.entry(key) {
                slot.insert(sqlite_series(&db, &events, &run_id, key, pace).await?);
            }
        }
        let boxed = box_series(&boxp, &events, &run_id, rate, pace).await?;
        if let Entry::Vacant(slot) = sqlite_runs.entry(key) {
            slot.insert(sqlite_series(&db, &events, &run_id, key, pace).await?);
        }
        let sql = &sqlite_runs[&key];
        let f = |v: &Value| v.as_f64().unwrap_or(0.0);
        println!(
            "{:>5}: box {:.0} ev/s p99 {:.2} ms {:.0} B/ev | SQLite {:.0} ev/s p99 {:.2} ms {:.0} B/ev",
            rate.map_or("max".to_owned(), |r| format!("{r}/s")),
            f(&boxed["events_per_s"]),
            f(&boxed["p99_ms"]),
            f(&boxed["flash_bytes_per_event"]),
            f(&sql["events_per_s"]),
            f(&sql["p99_ms"]),
            f(&sql["flash_bytes_per_event"]),
        );
        activity_runs.push(json!({
            "offered_per_s": rate,
            "pacing": if rate.is_some() { "open loop" } else { "closed loop (unpaced)" },
            "storebox": boxed,
            "sqlite": sql,
            "ratio_bytes_per_event": ratio(
                f(&boxed["flash_bytes_per_event"]),
                f(&sql["flash_bytes_per_event"]),
            ),
            "ratio_events_per_s": ratio(f(&boxed["events_per_s"]), f(&sql["events_per_s"])),
        }));
    }
    let end_status = boxp.status().await?;

    let mut machine = machine_info(started_at);
    if let Some(m) = machine.as_object_mut() {
        m.insert("loadavg_at_start".into(), json!(load_start));
        m.insert("loadavg_at_end".into(), json!(loadavg()));
        // The path is this machine's business; what matters is what is under it.
        m.remove("temp_dir");
        m.insert("data_dir_fs".into(), disk.json(&journal_direct));
    }
    let mut results = json!({
        "mode": if plan.quick { "quick" } else { "full" },
        "machine": machine,
        "store": {
            "records": records,
            "catalog_products": store.modules["catalog"].len(),
        },
        "activity": {
            "tills": TILLS,
            "event_bytes": EVENT_BYTES,
            "sqlite": {
                "version": Sqlite::version(),
                "settings": "journal_mode=WAL, synchronous=FULL, one transaction (INSERT OR IGNORE) per event",
                "connections": "one connection shared by the 8 till threads behind a mutex",
            },
            "runs": activity_runs,
        },
        "full_sync": full_sync,
        "lookup": lookup,
        "memory": memory,
        "box_at_end": {
            "journal": end_status["storage"]["journal"],
            "table_bytes": end_status["storage"]["table_bytes"],
            "process_write_bytes": end_status["storage"]["process_write_bytes"],
            "activity": end_status["activity"],
        },
    });
    let targets = targets(&results);
    results["targets"] = targets;
    let table = report::markdown(&results);
    crate::common::write_results("storage", &results, &table)
}

/// Flushes the filesystem that holds `dir` (`sync -f`), so that the writeback of what earlier
/// steps wrote (nginx's ten thousand files) does not land inside the next measurement. Best
/// effort: without `sync` the run goes on.
///
/// Not used before flash measurements: a flush cleans the inode blocks, and the next write to
/// a file then dirties its inode's block again, which `write_bytes` charges as a 4 KiB page
/// to the writer. In a shop that happens once per writeback period (~30 s) at most; after a
/// forced flush it would happen in every measured window.
fn settle_disk(dir: &Path) {
    let _ = std::process::Command::new("sync")
        .arg("-f")
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

fn open(rate: u64, run: Duration) -> Pace {
    Pace::Open {
        rate: rate as f64,
        count: (rate as f64 * run.as_secs_f64()).round().max(1.0) as u64,
    }
}

// ---------------------------------------------------------------------------------------------
// Activity

/// Sale events of exactly [`EVENT_BYTES`], one template per till, split around the id and a
/// padding field so that a post only formats its id.
struct Events {
    templates: Vec<[String; 3]>,
}

impl Events {
    fn new(store: &storebox_sim::Store) -> anyhow::Result<Events> {
        let catalog = &store.modules["catalog"];
        let customers = &store.modules["customers"];
        let mut templates = Vec::new();
        for till in 0..TILLS {
            // As many ticket lines as fit with room for a long id and some padding.
            let mut chosen = None;
            for n in (1..=4).rev() {
                let lines: Vec<Value> = (0..n)
                    .map(|k| &catalog[(till * 131 + k * 17) % catalog.len()])
                    .map(|p| json!({"product": p["id"], "qty": 1, "price_cents": p["price_cents"]}))
                    .collect();
                let total: u64 = lines.iter().filter_map(|l| l["price_cents"].as_u64()).sum();
                let sale = json!({
                    "id": "@ID@",
                    "type": "sale",
                    "till": format!("till-{till:02}"),
                    "at": "2026-01-01T12:00:00.000Z",
                    "lines": lines,
                    "total_cents": total,
                    "customer": customers[till % customers.len()]["id"],
                    "payment": "card",
                    "note": "@PAD@",
                });
                let text = sale.to_string();
                if text.len() - 8 + 48 <= EVENT_BYTES {
                    chosen = Some(text);
                    break;
                }
            }
            let text = chosen.context("a 500-byte sale template")?;
            let (a, rest) = text.split_once("@ID@").context("no id in the template")?;
            let (b, c) = rest.split_once("@PAD@").context("no pad in the template")?;
            templates.push([a.to_owned(), b.to_owned(), c.to_owned()]);
        }
        Ok(Events { templates })
    }

    fn body(&self, till: usize, id: &str) -> String {
        let [a, b, c] = &self.templates[till % self.templates.len()];
        let fixed = a.len() + id.len() + b.len() + c.len();
        let pad = EVENT_BYTES.saturating_sub(fixed);
        let mut s = String::with_capacity(fixed + pad);
        s.push_str(a);
        s.push_str(id);
        s.push_str(b);
        s.extend(std::iter::repeat_n('x', pad));
        s.push_str(c);
        s
    }
}

fn event_id(run_id: &str, who: &str, rate: u64, k: u64) -> String {
    // Fixed width within a run, so every body of a run has the same size.
    format!("{run_id}-{who}-r{rate:04}-{k:09}")
}

/// One activity run against the box: posts, then the flash and journal deltas, then (outside
/// the window) the wait for the push to drain so the next run starts clean.
async fn box_series(
    boxp: &BoxProc,
    events: &Arc<Events>,
    run_id: &str,
    rate: Option<u64>,
    pace: Pace,
) -> anyhow::Result<Value> {
    wait_drained(boxp, Duration::from_secs(60)).await?;
    let before = boxp.status().await?;
    let pid = boxp.proc.pid;
    let disk_before = Disk::device_write_bytes_now();
    let w0 = write_bytes(pid)?;
    let lan = boxp.lan;
    let (events, run_id) = (events.clone(), run_id.to_owned());
    let key = rate.unwrap_or(0);
    let outcome = tokio::task::spawn_blocking(move || {
        drive(
            TILLS,
            pace,
            |_| HttpConn::open(lan),
            |conn, k| {
                let id = event_id(&run_id, "box", key, k);
                let body = events.body((k % TILLS as u64) as usize, &id);
                let (status, _) = conn.request("POST", "/v1/activity", body.as_bytes())?;
                Ok(status == 201 || status == 200)
            },
        )
    })
    .await
    .context("the box's load thread")??;
    let w1 = write_bytes(pid)?;
    let disk_after = Disk::device_write_bytes_now();
    let after = boxp.status().await?;
    let drain = Instant::now();
    wait_drained(boxp, Duration::from_secs(60)).await?;
    let j = |doc: &Value, k: &str| doc["storage"]["journal"][k].as_u64().unwrap_or(0);
    let journal_bytes = j(&after, "bytes_written").saturating_sub(j(&before, "bytes_written"));
    let commits = j(&after, "commits").saturating_sub(j(&before, "commits"));
    let flash = w1.saturating_sub(w0);
    let mut v = outcome_json(&outcome);
    let per = |bytes: u64| {
        if outcome.ok > 0 {
            bytes as f64 / outcome.ok as f64
        } else {
            0.0
        }
    };
    let extra = json!({
        "flash_write_bytes": flash,
        "flash_bytes_per_event": per(flash),
        "journal_bytes_written": journal_bytes,
        "journal_bytes_per_event": per(journal_bytes),
        "other_write_bytes": flash.saturating_sub(journal_bytes),
        "journal_commits": commits,
        "events_per_commit": if commits > 0 { outcome.ok as f64 / commits as f64 } else { 0.0 },
        "journal_segments_before": j(&before, "segments"),
        "journal_segments_after": j(&after, "segments"),
        "push_drain_s_after_run": drain.elapsed().as_secs_f64(),
        "device_write_bytes_all_processes": match (disk_before, disk_after) {
            (Some(a), Some(b)) => json!(b.saturating_sub(a)),
            _ => Value::Null,
        },
    });
    merge(&mut v, extra);
    Ok(v)
}

/// The same run on SQLite in this process; flash from `/proc/self/io`, measured around the
/// run only, during which the bench does nothing else (no output either: stdout may be a
/// file).
async fn sqlite_series(
    db: &Arc<Sqlite>,
    events: &Arc<Events>,
    run_id: &str,
    rate: u64,
    pace: Pace,
) -> anyhow::Result<Value> {
    let (db, events, run_id) = (db.clone(), events.clone(), run_id.to_owned());
    tokio::task::spawn_blocking(move || {
        let disk_before = Disk::device_write_bytes_now();
        let w0 = write_bytes_self()?;
        let outcome = drive(
            TILLS,
            pace,
            |_| Ok(()),
            |(), k| {
                let id = event_id(&run_id, "sql", rate, k);
                let body = events.body((k % TILLS as u64) as usize, &id);
                let now = chrono::Utc::now().timestamp_millis();
                db.insert(&id, now, &body)
            },
        )?;
        let w1 = write_bytes_self()?;
        let disk_after = Disk::device_write_bytes_now();
        let flash = w1.saturating_sub(w0);
        let mut v = outcome_json(&outcome);
        merge(
            &mut v,
            json!({
                "flash_write_bytes": flash,
                "flash_bytes_per_event": if outcome.ok > 0 { flash as f64 / outcome.ok as f64 } else { 0.0 },
                "device_write_bytes_all_processes": match (disk_before, disk_after) {
                    (Some(a), Some(b)) => json!(b.saturating_sub(a)),
                    _ => Value::Null,
                },
            }),
        );
        anyhow::Ok(v)
    })
    .await
    .context("the SQLite load thread")?
}

fn outcome_json(o: &Outcome) -> Value {
    json!({
        "events": o.ok,
        "errors": o.errors,
        "first_error": o.first_error,
        "seconds": o.secs,
        "events_per_s": o.rate(),
        "p50_ms": o.lat.p50_ms(),
        "p99_ms": o.lat.p99_ms(),
        "max_ms": o.lat.pct(100.0).as_secs_f64() * 1e3,
    })
}

fn merge(into: &mut Value, from: Value) {
    if let (Some(a), Value::Object(b)) = (into.as_object_mut(), from) {
        a.extend(b);
    }
}

/// Waits until the box has pushed every event to the hub.
async fn wait_drained(boxp: &BoxProc, timeout: Duration) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let doc = boxp.status().await?;
        if doc["activity"]["pending"].as_u64() == Some(0) {
            return Ok(());
        }
        boxp.proc.check_alive()?;
        if start.elapsed() > timeout {
            bail!(
                "the box still has {} events to push after {timeout:?}",
                doc["activity"]["pending"]
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Full sync

/// Each case runs [`FULL_SYNC_REPEATS`] times (the 1 % case on a different 1 % each time) and
/// the run with the median write figure is the headline: a once-a-minute push-mark save or a
/// writeback period falling in one window does not decide the result.
async fn full_sync_cost(
    boxp: &BoxProc,
    hub: &Hub,
    store: &storebox_sim::Store,
) -> anyhow::Result<Value> {
    let mut unchanged = Vec::new();
    for _ in 0..FULL_SYNC_REPEATS {
        let run = measured_full_sync(boxp).await?;
        ensure!(
            run.report["modules"]["catalog"]["upserted"].as_u64() == Some(0),
            "a full sync with nothing changed upserted records: {}",
            run.report
        );
        unchanged.push(run.json());
    }
    let unchanged = median_run(unchanged);
    println!(
        "full sync, nothing changed: box wrote {} (median of {FULL_SYNC_REPEATS})",
        bytes_h(unchanged["write_bytes"].as_u64().unwrap_or(0))
    );

    let catalog = &store.modules["catalog"];
    let step = (catalog.len() / CHANGED_PRODUCTS).max(1);
    let mut one_pct = Vec::new();
    for rep in 0..FULL_SYNC_REPEATS {
        // 1 % of the catalog, spread over it, another 1 % each time: a price rise of ~1 %.
        let mut changed = Vec::new();
        for p in catalog
            .iter()
            .skip(rep)
            .step_by(step)
            .take(CHANGED_PRODUCTS)
        {
            let mut p = p.clone();
            let price = p["price_cents"]
                .as_u64()
                .context("a product without price_cents")?;
            p["price_cents"] = json!(price + 1 + price / 100);
            changed.push(p);
        }
        hub.import("catalog", &changed).await?;
        let run = measured_full_sync(boxp).await?;
        let upserted = run.report["modules"]["catalog"]["upserted"]
            .as_u64()
            .unwrap_or(0);
        ensure!(
            upserted == changed.len() as u64,
            "the full sync upserted {upserted} products, {} were changed: {}",
            changed.len(),
            run.report
        );
        let encoded = encoded_size(boxp, &changed).await?;
        let mut v = run.json();
        merge(
            &mut v,
            json!({
                "changed_records": changed.len(),
                "changed_encoded_bytes": encoded,
                "ratio_write_to_encoded": ratio(run.write_bytes as f64, encoded as f64),
            }),
        );
        one_pct.push(v);
    }
    let one_pct = median_run(one_pct);
    println!(
        "full sync, {} products changed ({} encoded): box wrote {} (median of {FULL_SYNC_REPEATS})",
        one_pct["changed_records"],
        bytes_h(one_pct["changed_encoded_bytes"].as_u64().unwrap_or(0)),
        bytes_h(one_pct["write_bytes"].as_u64().unwrap_or(0)),
    );
    Ok(json!({ "repeats": FULL_SYNC_REPEATS, "unchanged": unchanged, "catalog_1pct": one_pct }))
}

/// The run with the median `write_bytes`, with every run's figure under `write_bytes_runs`.
fn median_run(mut runs: Vec<Value>) -> Value {
    runs.sort_by_key(|r| r["write_bytes"].as_u64().unwrap_or(0));
    let all: Vec<Value> = runs.iter().map(|r| r["write_bytes"].clone()).collect();
    let mut mid = runs.swap_remove(runs.len() / 2);
    mid["write_bytes_runs"] = Value::Array(all);
    mid
}

/// The changed records' encoded size: the canonical JSON the box now stores and serves, each
/// checked to carry the new price.
async fn encoded_size(boxp: &BoxProc, changed: &[Value]) -> anyhow::Result<u64> {
    let lan = boxp.lan;
    let expected: Vec<(String, u64)> = changed
        .iter()
        .filter_map(|p| Some((p["id"].as_str()?.to_owned(), p["price_cents"].as_u64()?)))
        .collect();
    tokio::task::spawn_blocking(move || {
        let mut conn = HttpConn::open(lan)?;
        let mut total = 0u64;
        for (id, price) in &expected {
            let (status, body) = conn.request("GET", &format!("/v1/catalog/{id}"), &[])?;
            ensure!(status == 200, "GET /v1/catalog/{id}: {status}");
            let doc: Value = serde_json::from_slice(&body)?;
            ensure!(
                doc["price_cents"].as_u64() == Some(*price),
                "the box serves {id} at {} after the full sync, the hub has {price}",
                doc["price_cents"]
            );
            total += body.len() as u64;
        }
        anyhow::Ok(total)
    })
    .await
    .context("reading the changed records")?
}

struct FullSync {
    write_bytes: u64,
    journal_bytes: u64,
    wall: Duration,
    report: Value,
}

impl FullSync {
    fn json(&self) -> Value {
        json!({
            "write_bytes": self.write_bytes,
            "journal_bytes_written": self.journal_bytes,
            "wall_ms": crate::common::ms(self.wall),
            "box_reported_ms": self.report["duration_ms"],
            "activity_pushed": self.report["activity_pushed"],
            "wire_bytes": self.report["bytes_sent"].as_u64().unwrap_or(0)
                + self.report["bytes_received"].as_u64().unwrap_or(0),
            "modules": self.report["modules"],
        })
    }
}

/// `POST /v1/sync/full`, with the box's `write_bytes` around it (plus a short settle for any
/// trailing write).
async fn measured_full_sync(boxp: &BoxProc) -> anyhow::Result<FullSync> {
    let before = boxp.status().await?;
    ensure!(
        before["activity"]["pending"].as_u64() == Some(0),
        "activity is pending before the measured full sync: {}",
        before["activity"]
    );
    let pid = boxp.proc.pid;
    let w0 = write_bytes(pid)?;
    let t = Instant::now();
    let report = boxp.post_json("/v1/sync/full").await?;
    let wall = t.elapsed();
    ensure!(report["ok"] == true, "the full sync failed: {report}");
    tokio::time::sleep(SETTLE).await;
    let w1 = write_bytes(pid)?;
    let after = boxp.status().await?;
    let j = |doc: &Value| doc["storage"]["journal"]["bytes_written"].as_u64();
    ensure!(
        report["activity_pushed"].as_u64().unwrap_or(0) == 0,
        "the measured full sync pushed activity: {report}"
    );
    Ok(FullSync {
        write_bytes: w1.saturating_sub(w0),
        journal_bytes: j(&after)
            .unwrap_or(0)
            .saturating_sub(j(&before).unwrap_or(0)),
        wall,
        report,
    })
}

// ---------------------------------------------------------------------------------------------
// Read path

/// What a lookup asks and what its answer must be.
struct Lookups {
    ids: Vec<String>,
    eans: Vec<String>,
    /// Answer sizes by product, by id and by EAN: a request counts only if its body has it.
    len_id: Vec<usize>,
    len_ean: Vec<usize>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    ById,
    ByEan,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Box,
    Nginx,
}

impl Lookups {
    fn path(&self, server: Server, kind: Kind, i: usize) -> String {
        match (server, kind) {
            (Server::Box, Kind::ById) => format!("/v1/catalog/{}", self.ids[i]),
            (Server::Box, Kind::ByEan) => format!("/v1/catalog/by-ean/{}", self.eans[i]),
            (Server::Nginx, Kind::ById) => format!("/catalog/{}.json", self.ids[i]),
            (Server::Nginx, Kind::ByEan) => format!("/catalog/by-ean/{}.json", self.eans[i]),
        }
    }

    fn len(&self, kind: Kind, i: usize) -> usize {
        match kind {
            Kind::ById => self.len_id[i],
            Kind::ByEan => self.len_ean[i],
        }
    }
}

async fn read_path(
    plan: &Plan,
    boxp: &BoxProc,
    hub: &Hub,
    store: &storebox_sim::Store,
) -> anyhow::Result<Value> {
    let (ids, eans): (Vec<String>, Vec<String>) = store.modules["catalog"]
        .iter()
        .filter_map(|p| {
            Some((
                p["id"].as_str()?.to_owned(),
                p["ean13"].as_str()?.to_owned(),
            ))
        })
        .unzip();
    ensure!(!ids.is_empty(), "no product to look up");
    let nginx_bin = nginx::find();
    let nginx_version = nginx_bin.as_deref().and_then(nginx::version);
    let root = hub.dir.path().join("nginx-root");
    let nginx_dir = hub.dir.path().join("nginx");
    // Every product through the box once, by id and by EAN (its warm-up), written as the
    // static files nginx will serve: the same bytes.
    let lan = boxp.lan;
    let write_files = nginx_bin.is_some();
    let (root_w, ids_w, eans_w) = (root.clone(), ids.clone(), eans.clone());
    let (len_id, len_ean) = tokio::task::spawn_blocking(move || {
        let mut conn = HttpConn::open(lan)?;
        if write_files {
            std::fs::create_dir_all(root_w.join("catalog/by-ean"))?;
        }
        let (mut len_id, mut len_ean) = (Vec::new(), Vec::new());
        for (id, ean) in ids_w.iter().zip(&eans_w) {
            for (path, file, lens) in [
                (
                    format!("/v1/catalog/{id}"),
                    root_w.join(format!("catalog/{id}.json")),
                    &mut len_id,
                ),
                (
                    format!("/v1/catalog/by-ean/{ean}"),
                    root_w.join(format!("catalog/by-ean/{ean}.json")),
                    &mut len_ean,
                ),
            ] {
                let (status, body) = conn.request("GET", &path, &[])?;
                ensure!(status == 200, "GET {path}: {status}");
                if write_files {
                    std::fs::write(&file, &body)
                        .with_context(|| format!("writing {}", file.display()))?;
                }
                lens.push(body.len());
            }
        }
        anyhow::Ok((len_id, len_ean))
    })
    .await
    .context("the lookup preparation")??;
    let lookups = Arc::new(Lookups {
        ids,
        eans,
        len_id,
        len_ean,
    });

    let nginx = match &nginx_bin {
        Some(bin) => {
            let n = nginx::Nginx::start(bin, &nginx_dir, &root)?;
            // Its warm-up, and the proof it serves the same bytes: every file once.
            let (addr, l) = (n.addr, lookups.clone());
            tokio::task::spawn_blocking(move || {
                let mut conn = HttpConn::open(addr)?;
                for i in 0..l.ids.len() {
                    for kind in [Kind::ById, Kind::ByEan] {
                        let path = l.path(Server::Nginx, kind, i);
                        let (status, body) = conn.request("GET", &path, &[])?;
                        ensure!(
                            status == 200 && body.len() == l.len(kind, i),
                            "nginx GET {path}: {status}, {} bytes",
                            body.len()
                        );
                    }
                }
                anyhow::Ok(())
            })
            .await
            .context("the nginx warm-up")??;
            Some(n)
        }
        None => {
            println!(
                "NOTE: nginx is not installed (or {} names none): the lookup baseline is \
                 skipped; apt-get install nginx-light to measure it",
                nginx::ENV
            );
            None
        }
    };

    // The files' writeback is not to land inside the series.
    settle_disk(&root);
    // Series alternate, and their order flips each round, so the machine's drift falls on
    // both servers alike. Round 0 is a short warm-up at the same load, not counted.
    let mut series: Vec<((Server, Kind), Outcome)> = Vec::new();
    for round in 0..=plan.rounds {
        let segment = if round == 0 {
            LOOKUP_WARMUP
        } else {
            plan.lookup_segment
        };
        let pace = Pace::Open {
            rate: LOOKUP_RATE as f64,
            count: (LOOKUP_RATE as f64 * segment.as_secs_f64()).round() as u64,
        };
        for kind in [Kind::ById, Kind::ByEan] {
            let mut servers = vec![(Server::Box, boxp.lan)];
            if let Some(n) = &nginx {
                servers.push((Server::Nginx, n.addr));
            }
            if round % 2 == 1 {
                servers.reverse();
            }
            for (server, addr) in servers {
                let l = lookups.clone();
                let offset = round as u64 * 1_000_003 + kind as u64 * 7;
                let outcome = tokio::task::spawn_blocking(move || {
                    drive(
                        LOOKUP_CLIENTS,
                        pace,
                        |_| HttpConn::open(addr),
                        |conn, k| {
                            // A stride coprime with the catalogue walks it in scattered order.
                            let i = ((k + offset) * 7_919 % l.ids.len() as u64) as usize;
                            let (status, body) =
                                conn.request("GET", &l.path(server, kind, i), &[])?;
                            Ok(status == 200 && body.len() == l.len(kind, i))
                        },
                    )
                })
                .await
                .context("a lookup load thread")??;
                if round > 0 {
                    series.push(((server, kind), outcome));
                }
            }
        }
    }
    let combined = |server: Server, kind: Kind| {
        let mut lat = Lat(Vec::new());
        let (mut errors, mut ok, mut first_error) = (0, 0, None);
        for ((s, k), o) in &series {
            if *s == server && *k == kind {
                lat.0.extend(o.lat.0.iter().copied());
                errors += o.errors;
                ok += o.ok;
                first_error = first_error.or(o.first_error.clone());
            }
        }
        (lat, ok, errors, first_error)
    };
    let mut out = json!({
        "rate_per_s": LOOKUP_RATE,
        "clients": LOOKUP_CLIENTS,
        "seconds_per_series": plan.lookup_segment.as_secs_f64() * plan.rounds as f64,
        "nginx": {
            "available": nginx.is_some(),
            "version": nginx_version,
            "note": if nginx.is_some() {
                "single process (master_process off), sendfile, no access log; files on the same disk"
            } else {
                "nginx not installed: baseline skipped (apt-get install nginx-light)"
            },
        },
    });
    for (name, kind) in [("by_id", Kind::ById), ("by_ean", Kind::ByEan)] {
        let (bl, bok, berr, bfirst) = combined(Server::Box, kind);
        let mut entry = json!({
            "storebox": lat_json(&bl, bok, berr, bfirst),
        });
        if nginx.is_some() {
            let (nl, nok, nerr, nfirst) = combined(Server::Nginx, kind);
            entry["nginx"] = lat_json(&nl, nok, nerr, nfirst);
            entry["ratio_p99"] = json!(ratio(
                bl.pct(99.0).as_secs_f64(),
                nl.pct(99.0).as_secs_f64()
            ));
            entry["ratio_p50"] = json!(ratio(
                bl.pct(50.0).as_secs_f64(),
                nl.pct(50.0).as_secs_f64()
            ));
        }
        println!(
            "lookups {name}: box p50 {:.0} µs p99 {:.0} µs{}",
            bl.pct(50.0).as_secs_f64() * 1e6,
            bl.pct(99.0).as_secs_f64() * 1e6,
            entry["ratio_p99"]
                .as_f64()
                .map(|r| format!(", p99 box/nginx {r:.2}"))
                .unwrap_or_default()
        );
        out[name] = entry;
    }
    drop(nginx);
    Ok(out)
}

fn lat_json(lat: &Lat, ok: u64, errors: u64, first_error: Option<String>) -> Value {
    json!({
        "requests": ok,
        "errors": errors,
        "first_error": first_error,
        "p50_us": lat.pct(50.0).as_secs_f64() * 1e6,
        "p99_us": lat.pct(99.0).as_secs_f64() * 1e6,
        "max_us": lat.pct(100.0).as_secs_f64() * 1e6,
    })
}

// ---------------------------------------------------------------------------------------------
// Flash accounting and the disk

/// The 1, 5 and 15-minute load averages.
fn loadavg() -> Option<String> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(
        text.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    )
}

/// `write_bytes` of `/proc/<pid>/io`: bytes the process (all its threads) caused to be sent
/// to the block layer, a buffered page counted once when it is dirtied.
fn write_bytes(pid: u32) -> anyhow::Result<u64> {
    io_write_bytes(&format!("/proc/{pid}/io"))
}

fn write_bytes_self() -> anyhow::Result<u64> {
    io_write_bytes("/proc/self/io")
}

fn io_write_bytes(path: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    text.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no write_bytes in {path}"))
}

/// The filesystem a directory is on, from `/proc/self/mountinfo`.
struct Disk {
    fstype: String,
    source: String,
    /// `major:minor` of the device.
    device: String,
    logical_block: Option<u64>,
}

/// The device's `stat` file, for its sectors written (whole device, every process).
static DEVICE_STAT: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

impl Disk {
    fn of(dir: &Path) -> anyhow::Result<Disk> {
        let dir = dir
            .canonicalize()
            .with_context(|| format!("resolving {}", dir.display()))?;
        let info = std::fs::read_to_string("/proc/self/mountinfo")
            .context("reading /proc/self/mountinfo")?;
        let mut best: Option<(usize, Disk)> = None;
        for line in info.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            let (Some(device), Some(mount), Some(fstype)) =
                (left.get(2), left.get(4), right.first())
            else {
                continue;
            };
            let mount = unescape(mount);
            let depth = Path::new(&mount).components().count();
            if dir.starts_with(&mount) && best.as_ref().is_none_or(|(d, _)| depth >= *d) {
                best = Some((
                    depth,
                    Disk {
                        fstype: (*fstype).to_owned(),
                        source: right.get(1).copied().unwrap_or("?").to_owned(),
                        device: (*device).to_owned(),
                        logical_block: None,
                    },
                ));
            }
        }
        let (_, mut disk) = best.context("no mount holds the temporary directory")?;
        let sys = PathBuf::from(format!("/sys/dev/block/{}", disk.device));
        disk.logical_block = ["queue/logical_block_size", "../queue/logical_block_size"]
            .iter()
            .find_map(|p| std::fs::read_to_string(sys.join(p)).ok())
            .and_then(|t| t.trim().parse().ok());
        let stat = sys.join("stat");
        let _ = DEVICE_STAT.set(stat.is_file().then_some(stat));
        Ok(disk)
    }

    /// Bytes written to the whole device so far, by every process and the filesystem's own
    /// journal: context for `write_bytes`, noisy on a shared machine.
    fn device_write_bytes_now() -> Option<u64> {
        let path = DEVICE_STAT.get()?.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let sectors: u64 = text.split_whitespace().nth(6)?.parse().ok()?;
        Some(sectors * 512)
    }

    fn json(&self, direct_io: &Value) -> Value {
        // The device name says which virtual disk driver this is: kept out of the results.
        json!({
            "fstype": self.fstype,
            "on_block_device": self.source.starts_with("/dev/"),
            "logical_block_bytes": self.logical_block,
            "journal_direct_io": direct_io,
        })
    }
}

/// Mount points escape space, tab, newline and backslash as octal.
fn unescape(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\\' {
            let code: String = chars.by_ref().take(3).collect();
            if let Ok(n) = u8::from_str_radix(&code, 8) {
                out.push(n as char);
                continue;
            }
            out.push('\\');
            out.push_str(&code);
        } else {
            out.push(c);
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Targets

/// The storage issue's targets, each with the figure it is judged on.
fn targets(r: &Value) -> Value {
    let f = |v: &Value| v.as_f64();
    let runs = r["activity"]["runs"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let run = |rate: Option<u64>| {
        runs.iter()
            .find(|x| x["offered_per_s"].as_u64() == rate)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let (r1, r10, r100, max) = (run(Some(1)), run(Some(10)), run(Some(100)), run(None));
    let mut out = Vec::new();
    let mut add = |what: &str,
                   target: &str,
                   measured: Option<f64>,
                   shown: String,
                   ok: &dyn Fn(f64) -> bool| {
        out.push(json!({
            "target": what,
            "threshold": target,
            "measured": shown,
            "value": measured,
            "met": measured.map(ok),
        }));
    };
    let v = f(&r1["storebox"]["flash_bytes_per_event"]);
    add(
        "flash bytes/event at 1 event/s",
        "≤ 8 KiB",
        v,
        v.map(|x| format!("{x:.0} B")).unwrap_or_default(),
        &|x| x <= 8192.0,
    );
    let v = f(&r100["storebox"]["flash_bytes_per_event"]);
    add(
        "flash bytes/event at 100 events/s",
        "≤ 1 KiB",
        v,
        v.map(|x| format!("{x:.0} B")).unwrap_or_default(),
        &|x| x <= 1024.0,
    );
    let v = f(&r10["ratio_bytes_per_event"]);
    add(
        "flash bytes/event at 10 events/s, box/SQLite",
        "≤ 1/3",
        v,
        v.map(|x| format!("{x:.3}")).unwrap_or_default(),
        &|x| x <= 1.0 / 3.0,
    );
    let v = f(&max["storebox"]["events_per_s"]);
    add(
        "acknowledged events/s, 8 tills unpaced",
        "≥ 5,000",
        v,
        v.map(|x| format!("{x:.0}")).unwrap_or_default(),
        &|x| x >= 5000.0,
    );
    let v = f(&max["ratio_events_per_s"]);
    add(
        "acknowledged events/s, 8 tills unpaced, box/SQLite",
        "≥ 3×",
        v,
        v.map(|x| format!("{x:.2}×")).unwrap_or_default(),
        &|x| x >= 3.0,
    );
    let v = f(&r100["storebox"]["p99_ms"]);
    add(
        "p99 ack latency at 100 events/s",
        "≤ 20 ms",
        v,
        v.map(|x| format!("{x:.2} ms")).unwrap_or_default(),
        &|x| x <= 20.0,
    );
    for (name, key) in [("by id", "by_id"), ("by EAN", "by_ean")] {
        let v = f(&r["lookup"][key]["ratio_p99"]);
        add(
            &format!("lookup {name} p99, box/nginx"),
            "≤ 1.5×",
            v,
            v.map(|x| format!("{x:.2}×"))
                .unwrap_or_else(|| "no nginx: not measured".into()),
            &|x| x <= 1.5,
        );
    }
    // "MB" read as MiB, as memory is counted; the decimal reading is given beside it.
    let v = f(&r["memory"]["idle_rss_kib"]);
    add(
        "idle RSS after cold full sync + 10 s",
        "≤ 20 MB, read as 20 MiB (20,971,520 B)",
        v,
        v.map(|x| {
            let decimal = if x * 1024.0 <= 20e6 { "within" } else { "over" };
            format!(
                "{:.1} MiB ({:.2} × 10⁶ B: {decimal} a decimal 20 MB)",
                x / 1024.0,
                x * 1024.0 / 1e6
            )
        })
        .unwrap_or_default(),
        &|x| x <= 20.0 * 1024.0,
    );
    let v = f(&r["full_sync"]["unchanged"]["write_bytes"]);
    add(
        "full sync writes, nothing changed",
        "≤ 64 KiB",
        v,
        v.map(|x| bytes_h(x as u64)).unwrap_or_default(),
        &|x| x <= 65536.0,
    );
    let one = &r["full_sync"]["catalog_1pct"];
    let v = f(&one["write_bytes"]);
    let encoded = f(&one["changed_encoded_bytes"]).unwrap_or(0.0);
    let limit = 4.0 * encoded + 65536.0;
    add(
        "full sync writes, 1 % of the catalog changed",
        &format!(
            "≤ 4 × changed encoded size + 64 KiB = {}",
            bytes_h(limit as u64)
        ),
        v,
        v.map(|x| bytes_h(x as u64)).unwrap_or_default(),
        &|x| x <= limit,
    );
    Value::Array(out)
}
