//! `bench core` (the default): the core figures of storebox, measured on real `storehub` and
//! `storebox` processes talking over 127.0.0.1, each next to a baseline measured in the same
//! run on the same machine, so that the ratio, not the absolute figure, is what carries across
//! machines.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p storebox-bench -- [core] [--quick]
//! ```
//!
//! What it measures, and against what:
//!
//! 1. **Cold full sync** of the seed-scale store (`storebox_sim::generate_store(1)`): wall time
//!    from spawning a new box until `/v1/status` shows every module fully synced, and the
//!    bytes the box's full-sync link sent and received (counted at the socket, so TLS
//!    included). Baseline: the raw NDJSON of the store, i.e. what a naive "download the
//!    export files" sync would move before any protocol or TLS overhead.
//! 2. **A day's changes by delta** (`storebox_sim::day_changes(&store, 1, 1)`): wire bytes and
//!    duration of one `POST /v1/sync/delta`. Baseline: the raw NDJSON of the changes (plus one
//!    line per deleted id), i.e. the smallest plain-text "here is what changed" file. An idle
//!    delta (nothing changed) shows the fixed cost of asking.
//! 3. **Durable activity throughput**: N tills in a closed loop, each posting ~600-byte sales
//!    on its own keep-alive HTTP/1.1 connection. The box answers 201 only once the event is
//!    on disk. Baseline: a naive loop appending one 600-byte record to a file and
//!    `fdatasync`ing it per event, in the same temporary directory (same filesystem, same
//!    disk): the best a one-fsync-per-event design can do here. Group commit should make the
//!    box gain on it as tills are added. The loop runs twice, once with the other CPUs idle
//!    and once with them busy (an idle vCPU can add a timer tick to every fsync), and the box
//!    is compared with the faster of the two.
//! 4. **Lookup latency** of `GET /v1/catalog/by-ean/{ean}` on one keep-alive connection.
//!    Baseline: `GET /nosuch/route`, which the router answers 404 before any storage access,
//!    interleaved on the same connection: the cost of HTTP, loopback and the client itself.
//! 5. **Footprint**: the box's resident memory after the cold sync and after the activity
//!    runs, and the size of its data directory at the end.
//!
//! Results go to `bench/results/core.json` and `bench/results/core.md`, and the table to
//! stdout. Every child process is killed when the run ends, fails, panics or is interrupted.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};

use crate::common::{
    bytes_h, dir_size, machine_info, ms, ratio, rss_kib, sibling, Bins, BoxProc, Conn, Hub, Lat,
};

/// Lookups measured (and as many baseline requests, interleaved).
const LOOKUPS: usize = 2_000;
/// Requests of each kind sent before measuring, to warm caches and the connection.
const WARMUP: usize = 200;
/// Target size of a sale event, the size of a typical till ticket in JSON.
const EVENT_BYTES: usize = 600;

/// Run sizes: `--quick` keeps the whole run under ~40 s, the full one under ~2 min.
pub struct Plan {
    quick: bool,
    tills: &'static [usize],
    run: Duration,
}

impl Plan {
    pub fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                quick,
                tills: &[1, 16],
                run: Duration::from_secs(2),
            }
        } else {
            Plan {
                quick,
                tills: &[1, 4, 16, 64],
                run: Duration::from_secs(5),
            }
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

    let store = storebox_sim::generate_store(1);
    let records: usize = store.modules.values().map(Vec::len).sum();
    let raw_store: usize = store
        .modules
        .values()
        .map(|r| storebox_sim::to_ndjson(r).len())
        .sum();
    let changes = storebox_sim::day_changes(&store, 1, 1);

    let hub = Hub::start(&bins).await?;
    for (module, records) in &store.modules {
        hub.import(module, records).await?;
    }
    println!("hub ready, {records} records imported; starting the box (cold full sync)");

    // 1. Cold full sync.
    let boxp = BoxProc::spawn(&bins, &hub)?;
    boxp.wait_full_sync(Duration::from_secs(60)).await?;
    // Tills can use the data from here on: this is the figure that matters to a shop.
    let cold_wall = boxp.spawned.elapsed();
    // The process itself ends a little later (its ack to the hub): its byte counters are read
    // once its report is out, so they hold the whole exchange.
    let full_doc = boxp.wait_full_report(Duration::from_secs(10)).await?;
    let full_done = boxp.spawned.elapsed();
    let full_sent = full_doc["bytes"]["full"]["sent"].as_u64().unwrap_or(0);
    let full_received = full_doc["bytes"]["full"]["received"].as_u64().unwrap_or(0);
    let synced: u64 = storebox_sim::MODULES
        .iter()
        .map(|m| full_doc["modules"][m]["records"].as_u64().unwrap_or(0))
        .sum();
    ensure!(
        synced == records as u64,
        "the box holds {synced} records after its full sync, the store has {records}"
    );
    let rss_after_full = rss_kib(boxp.proc.pid)?;
    let full_wire = full_sent + full_received;
    let cold = json!({
        "wall_ms": ms(cold_wall),
        "process_done_wall_ms": ms(full_done),
        "box_reported_ms": full_doc["last_full_sync"]["duration_ms"],
        "records": records,
        "wire_sent": full_sent,
        "wire_received": full_received,
        "wire_total": full_wire,
        "raw_ndjson_bytes": raw_store,
        "ratio_wire_raw": ratio(full_wire as f64, raw_store as f64),
    });
    println!(
        "cold full sync: {:.2} s, {}",
        cold_wall.as_secs_f64(),
        bytes_h(full_wire)
    );

    // 2. The day's changes by delta, then an idle delta.
    let mut upserts = 0;
    let mut raw_changes = 0;
    for (module, records) in &changes.upserts {
        hub.import(module, records).await?;
        upserts += records.len();
        raw_changes += storebox_sim::to_ndjson(records).len();
    }
    let mut deletes = 0;
    for (module, ids) in &changes.deletes {
        for id in ids {
            hub.delete(module, id).await?;
            deletes += 1;
            // As the `.deletes` files of `storesim day` carry them: one id per line.
            raw_changes += id.len() + 1;
        }
    }
    let t = Instant::now();
    let report = boxp.post_json("/v1/sync/delta").await?;
    let delta_wall = t.elapsed();
    ensure!(report["ok"] == true, "the delta pull failed: {report}");
    let applied: u64 = report["modules"]
        .as_object()
        .map(|m| {
            m.values()
                .map(|r| {
                    r["upserted"].as_u64().unwrap_or(0)
                        + r["deleted"].as_u64().unwrap_or(0)
                        + r["unchanged"].as_u64().unwrap_or(0)
                })
                .sum()
        })
        .unwrap_or(0);
    ensure!(
        applied >= (upserts + deletes) as u64,
        "the delta applied {applied} changes, {} were published: {report}",
        upserts + deletes
    );
    let idle = boxp.post_json("/v1/sync/delta").await?;
    ensure!(idle["ok"] == true, "the idle delta pull failed: {idle}");
    let wire = |r: &Value| {
        r["bytes_sent"].as_u64().unwrap_or(0) + r["bytes_received"].as_u64().unwrap_or(0)
    };
    let delta = json!({
        "upserts": upserts,
        "deletes": deletes,
        "raw_bytes": raw_changes,
        "bytes_sent": report["bytes_sent"],
        "bytes_received": report["bytes_received"],
        "wire_total": wire(&report),
        "duration_ms": report["duration_ms"],
        "wall_ms": ms(delta_wall),
        "ratio_wire_raw": ratio(wire(&report) as f64, raw_changes as f64),
        "idle": {
            "bytes_sent": idle["bytes_sent"],
            "bytes_received": idle["bytes_received"],
            "wire_total": wire(&idle),
            "duration_ms": idle["duration_ms"],
        },
    });
    println!(
        "delta: {} for {upserts} upserts and {deletes} deletes",
        bytes_h(wire(&report))
    );

    // 4. Lookups, measured before the activity runs so that the data is the store as
    // synced, not the store plus the tens of thousands of sales the runs add.
    let deleted: std::collections::BTreeSet<&str> = changes
        .deletes
        .values()
        .flatten()
        .map(String::as_str)
        .collect();
    let eans: Vec<String> = store.modules["catalog"]
        .iter()
        .filter(|p| p["id"].as_str().is_some_and(|id| !deleted.contains(id)))
        .filter_map(|p| p["ean13"].as_str().map(str::to_owned))
        .collect();
    let lookup = lookups(boxp.lan, &eans).await?;
    println!(
        "lookups: p50 {:.0} µs (404 route {:.0} µs)",
        lookup["by_ean"]["p50_us"].as_f64().unwrap_or(0.0),
        lookup["route_404"]["p50_us"].as_f64().unwrap_or(0.0)
    );

    // 3. Durable activity: the fsync baseline first, then the tills.
    let mut baselines = Vec::new();
    for busy in [false, true] {
        let path = hub.dir.path().join("fsync-baseline.log");
        let run_for = plan.run;
        let b = tokio::task::spawn_blocking(move || fsync_baseline(&path, run_for, busy))
            .await
            .context("the fsync baseline thread")??;
        println!(
            "fsync baseline ({} CPUs): {:.0} events/s, p50 {:.3} ms",
            if busy { "busy" } else { "idle" },
            b.rate(),
            b.lat.p50_ms()
        );
        baselines.push(b);
    }
    let [idle_cpus, busy_cpus]: [Baseline; 2] = baselines
        .try_into()
        .map_err(|_| anyhow::anyhow!("two baselines expected"))?;
    // Compared with the faster of the two: the conservative choice for the box.
    let baseline = if busy_cpus.rate() >= idle_cpus.rate() {
        &busy_cpus
    } else {
        &idle_cpus
    };
    let run_id = format!("{:x}", started_at.timestamp_millis());
    let mut runs = Vec::new();
    for &tills in plan.tills {
        let r = activity_run(boxp.lan, &store, tills, plan.run, &run_id).await?;
        println!(
            "{tills:>3} tills: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms",
            r.events as f64 / r.secs,
            r.lat.p50_ms(),
            r.lat.p99_ms()
        );
        runs.push(r);
    }
    let after = boxp.status().await?;
    let rss_after_activity = rss_kib(boxp.proc.pid)?;
    let baseline_rate = baseline.rate();
    let activity = json!({
        "event_bytes": runs.first().map(|r| r.event_bytes),
        "seconds_per_run": plan.run.as_secs_f64(),
        "fsync_baseline": baseline.json(),
        "fsync_baseline_idle_cpus": idle_cpus.json(),
        "fsync_baseline_busy_cpus": busy_cpus.json(),
        "runs": runs.iter().map(|r| json!({
            "tills": r.tills,
            "events": r.events,
            "errors": r.errors,
            "seconds": r.secs,
            "events_per_s": r.events as f64 / r.secs,
            "p50_ms": r.lat.p50_ms(),
            "p99_ms": r.lat.p99_ms(),
            "ratio_vs_fsync_baseline": ratio(r.events as f64 / r.secs, baseline_rate),
            "ratio_vs_fsync_idle_cpus": ratio(r.events as f64 / r.secs, idle_cpus.rate()),
            "ratio_vs_fsync_busy_cpus": ratio(r.events as f64 / r.secs, busy_cpus.rate()),
        })).collect::<Vec<_>>(),
        "pending_push_after_runs": after["activity"]["pending"],
    });
    let (data_dir_bytes, data_dir_allocated) = dir_size(&boxp.data_dir)?;
    let footprint = json!({
        "rss_after_full_sync_kib": rss_after_full,
        "rss_after_activity_kib": rss_after_activity,
        "data_dir_bytes": data_dir_bytes,
        "data_dir_allocated_bytes": data_dir_allocated,
        "activity_events_stored": runs.iter().map(|r| r.events).sum::<u64>(),
    });

    let results = json!({
        "mode": if plan.quick { "quick" } else { "full" },
        "machine": machine_info(started_at),
        "cold_full_sync": cold,
        "delta": delta,
        "activity": activity,
        "lookup": lookup,
        "footprint": footprint,
    });
    let table = markdown(&results);
    crate::common::write_results("core", &results, &table)
}

// ---------------------------------------------------------------------------------------------
// Measurements

/// Lookups by EAN interleaved with router 404s on one connection, so both series see the
/// same machine load at the same moments.
async fn lookups(lan: SocketAddr, eans: &[String]) -> anyhow::Result<Value> {
    ensure!(!eans.is_empty(), "no EAN to look up");
    let mut conn = Conn::open(lan).await?;
    let mut by_ean = Lat(Vec::with_capacity(LOOKUPS));
    let mut route = Lat(Vec::with_capacity(LOOKUPS));
    for i in 0..WARMUP + LOOKUPS {
        // A stride coprime with the catalogue size walks the products in a scattered order.
        let path = format!("/v1/catalog/by-ean/{}", eans[(i * 7_919) % eans.len()]);
        let t = Instant::now();
        let status = conn.send(Method::GET, &path, Bytes::new()).await?;
        let took = t.elapsed();
        ensure!(status == StatusCode::OK, "GET {path}: {status}");
        // `/v1/nosuch/route` would match the `/v1/{module}/{id}` route and read storage.
        let t = Instant::now();
        let status = conn
            .send(Method::GET, "/nosuch/route", Bytes::new())
            .await?;
        let took_404 = t.elapsed();
        ensure!(
            status == StatusCode::NOT_FOUND,
            "GET /nosuch/route: {status}"
        );
        if i >= WARMUP {
            by_ean.0.push(took);
            route.0.push(took_404);
        }
    }
    Ok(json!({
        "by_ean": by_ean.json_us(),
        "route_404": route.json_us(),
        "ratio_p50": ratio(by_ean.pct(50.0).as_secs_f64(), route.pct(50.0).as_secs_f64()),
    }))
}

struct Baseline {
    events: u64,
    secs: f64,
    lat: Lat,
}

impl Baseline {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }

    fn json(&self) -> Value {
        json!({
            "events": self.events,
            "events_per_s": self.rate(),
            "p50_ms": self.lat.p50_ms(),
            "p99_ms": self.lat.p99_ms(),
        })
    }
}

/// The naive durable log: append one record, `fdatasync`, next. One fsync per event is what
/// a server without group commit pays.
///
/// With `busy`, every other CPU spins meanwhile. On a virtual machine an idle vCPU can take a
/// whole timer tick to wake up when the disk answers (measured: `fdatasync` p50 4 ms alone,
/// under 0.1 ms with one busy core on a 2-vCPU virtual machine), and the box never runs
/// with idle CPUs while tills post, so the loop is measured both ways and the faster figure
/// is the one the box is compared with.
fn fsync_baseline(path: &Path, run: Duration, busy: bool) -> anyhow::Result<Baseline> {
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut record = vec![b'x'; EVENT_BYTES - 1];
    record.push(b'\n');
    let spinners = if busy {
        std::thread::available_parallelism().map_or(1, usize::from) - 1
    } else {
        0
    };
    let stop = AtomicBool::new(false);
    let result = std::thread::scope(|scope| {
        for _ in 0..spinners {
            // Plain work, not `spin_loop()`: its PAUSE instruction lets a hypervisor
            // deschedule the vCPU, which is the idleness this is meant to prevent.
            scope.spawn(|| {
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            });
        }
        let mut lat = Lat(Vec::new());
        let start = Instant::now();
        let outcome = (|| {
            while start.elapsed() < run {
                let t = Instant::now();
                file.write_all(&record)?;
                file.sync_data()?;
                lat.0.push(t.elapsed());
            }
            anyhow::Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        outcome.map(|()| (lat, start.elapsed().as_secs_f64()))
    });
    let _ = std::fs::remove_file(path);
    let (lat, secs) = result?;
    Ok(Baseline {
        events: lat.0.len() as u64,
        secs,
        lat,
    })
}

struct Activity {
    tills: usize,
    events: u64,
    errors: u64,
    secs: f64,
    lat: Lat,
    event_bytes: usize,
}

/// A sale of `till` as JSON text split around its id, so each post only formats the id.
pub(crate) fn sale_template(
    store: &storebox_sim::Store,
    till: usize,
) -> anyhow::Result<(String, String)> {
    let catalog = &store.modules["catalog"];
    let customers = &store.modules["customers"];
    // Six lines make a ~600-byte ticket, the size the seed document gives for a sale.
    let lines: Vec<Value> = (0..6)
        .map(|k| &catalog[(till * 131 + k * 17) % catalog.len()])
        .map(|p| json!({"product": p["id"], "ean13": p["ean13"], "qty": 1, "price_cents": p["price_cents"]}))
        .collect();
    let total: u64 = lines.iter().filter_map(|l| l["price_cents"].as_u64()).sum();
    let sale = json!({
        "id": "@ID@",
        "type": "sale",
        "till": format!("till-{till:02}"),
        "at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "lines": lines,
        "total_cents": total,
        "customer": customers[till % customers.len()]["id"],
        "payment": "card",
    });
    let text = sale.to_string();
    let (a, b) = text
        .split_once("@ID@")
        .context("the sale template has no id")?;
    Ok((a.to_owned(), b.to_owned()))
}

/// `tills` tills posting sales back to back for `run`; each sale id is unique across runs.
async fn activity_run(
    lan: SocketAddr,
    store: &storebox_sim::Store,
    tills: usize,
    run: Duration,
    run_id: &str,
) -> anyhow::Result<Activity> {
    // Connect every till first, so connecting is not part of the measured window.
    let mut conns = Vec::with_capacity(tills);
    for till in 0..tills {
        conns.push((Conn::open(lan).await?, sale_template(store, till)?));
    }
    let start_gate = Arc::new(tokio::sync::Barrier::new(tills + 1));
    let mut tasks = Vec::new();
    for (till, (mut conn, (head, tail))) in conns.into_iter().enumerate() {
        let gate = start_gate.clone();
        let prefix = format!("{run_id}-n{tills:02}-t{till:02}");
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let deadline = Instant::now() + run;
            let (mut lat, mut errors, mut size) = (Vec::new(), 0u64, 0);
            let mut seq = 0u64;
            while Instant::now() < deadline {
                seq += 1;
                let body = format!("{head}{prefix}-{seq:08}{tail}");
                size = body.len();
                let t = Instant::now();
                match conn
                    .send(Method::POST, "/v1/activity", Bytes::from(body))
                    .await
                {
                    Ok(StatusCode::CREATED) => lat.push(t.elapsed()),
                    Ok(_) => errors += 1,
                    Err(e) => return Err(e),
                }
            }
            anyhow::Ok((lat, errors, size, Instant::now()))
        }));
    }
    start_gate.wait().await;
    let start = Instant::now();
    let mut out = Activity {
        tills,
        events: 0,
        errors: 0,
        secs: 0.0,
        lat: Lat(Vec::new()),
        event_bytes: 0,
    };
    let mut end = start;
    for task in tasks {
        let (lat, errors, size, done) = task.await.context("a till task")??;
        out.events += lat.len() as u64;
        out.errors += errors;
        out.event_bytes = size;
        out.lat.0.extend(lat);
        end = end.max(done);
    }
    // Until the last till's last answer: posts in flight at the deadline count, so does the
    // time they took.
    out.secs = (end - start).as_secs_f64();
    ensure!(
        out.errors == 0,
        "{} posts were not answered 201",
        out.errors
    );
    Ok(out)
}

/// The results as a Markdown page: one table, each figure next to its baseline.
fn markdown(r: &Value) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
    let u = |v: &Value| v.as_u64().unwrap_or(0);
    let m = &r["machine"];
    let c = &r["cold_full_sync"];
    let d = &r["delta"];
    let a = &r["activity"];
    let l = &r["lookup"];
    let fp = &r["footprint"];
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# storebox core benchmark ({} run)\n",
        r["mode"].as_str().unwrap_or("?")
    );
    let _ = writeln!(s, "{}", crate::common::machine_line(m));
    s.push_str("| Measure | storebox | Baseline (same run) | Ratio |\n|---|---|---|---|\n");
    let _ = writeln!(
        s,
        "| Cold full sync, {} records | data ready {:.2} s after box start (process done {:.2} s, box-reported {} ms); wire {} (sent {}, received {}) | raw NDJSON {} | wire/raw {:.3} |",
        u(&c["records"]),
        f(&c["wall_ms"]) / 1e3,
        f(&c["process_done_wall_ms"]) / 1e3,
        u(&c["box_reported_ms"]),
        bytes_h(u(&c["wire_total"])),
        bytes_h(u(&c["wire_sent"])),
        bytes_h(u(&c["wire_received"])),
        bytes_h(u(&c["raw_ndjson_bytes"])),
        f(&c["ratio_wire_raw"]),
    );
    let _ = writeln!(
        s,
        "| Day's changes by delta, {} upserts + {} deletes | wire {} (sent {}, received {}); {} ms | raw NDJSON {} | wire/raw {:.3} |",
        u(&d["upserts"]),
        u(&d["deletes"]),
        bytes_h(u(&d["wire_total"])),
        bytes_h(u(&d["bytes_sent"])),
        bytes_h(u(&d["bytes_received"])),
        u(&d["duration_ms"]),
        bytes_h(u(&d["raw_bytes"])),
        f(&d["ratio_wire_raw"]),
    );
    let _ = writeln!(
        s,
        "| Idle delta (nothing changed) | wire {} (sent {}, received {}); {} ms | – | – |",
        bytes_h(u(&d["idle"]["wire_total"])),
        bytes_h(u(&d["idle"]["bytes_sent"])),
        bytes_h(u(&d["idle"]["bytes_received"])),
        u(&d["idle"]["duration_ms"]),
    );
    let (busy, idle) = (
        &a["fsync_baseline_busy_cpus"],
        &a["fsync_baseline_idle_cpus"],
    );
    let _ = writeln!(
        s,
        "| Baseline of the activity rows: one thread appending {} B + `fdatasync` per event | – | other CPUs busy: {:.0} events/s, p50 {:.3} ms, p99 {:.3} ms; CPUs idle: {:.0} events/s, p50 {:.2} ms, p99 {:.2} ms | – |",
        EVENT_BYTES,
        f(&busy["events_per_s"]),
        f(&busy["p50_ms"]),
        f(&busy["p99_ms"]),
        f(&idle["events_per_s"]),
        f(&idle["p50_ms"]),
        f(&idle["p99_ms"]),
    );
    for run in a["runs"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "| Durable activity, {} till(s), {} B events | {:.0} events/s; p50 {:.2} ms, p99 {:.2} ms | fdatasync loop: {:.0} events/s | {:.2}× |",
            u(&run["tills"]),
            u(&a["event_bytes"]),
            f(&run["events_per_s"]),
            f(&run["p50_ms"]),
            f(&run["p99_ms"]),
            f(&a["fsync_baseline"]["events_per_s"]),
            f(&run["ratio_vs_fsync_baseline"]),
        );
    }
    let _ = writeln!(
        s,
        "| Lookup by EAN, {} on one connection | p50 {:.0} µs, p99 {:.0} µs | router 404: p50 {:.0} µs, p99 {:.0} µs | p50 {:.2}× |",
        u(&l["by_ean"]["requests"]),
        f(&l["by_ean"]["p50_us"]),
        f(&l["by_ean"]["p99_us"]),
        f(&l["route_404"]["p50_us"]),
        f(&l["route_404"]["p99_us"]),
        f(&l["ratio_p50"]),
    );
    let _ = writeln!(
        s,
        "| Box RSS after full sync / after activity | {:.1} MiB / {:.1} MiB | – | – |",
        f(&fp["rss_after_full_sync_kib"]) / 1_024.0,
        f(&fp["rss_after_activity_kib"]) / 1_024.0,
    );
    let _ = writeln!(
        s,
        "| Box data dir at the end ({} records + {} activity events) | {} ({} allocated) | raw store NDJSON {} | – |",
        u(&c["records"]),
        u(&fp["activity_events_stored"]),
        bytes_h(u(&fp["data_dir_bytes"])),
        bytes_h(u(&fp["data_dir_allocated_bytes"])),
        bytes_h(u(&c["raw_ndjson_bytes"])),
    );
    let _ =
        writeln!(
        s,
        "\nEach activity run lasts {} s, tills posting back to back; events still waiting to be \
         pushed to the hub after the runs: {}. The naive loop pays one `fdatasync` per event \
         (p50 {:.3} ms on this disk); the box shares one commit among the tills waiting, so its \
         ratio grows with tills. The activity baseline is the faster of the two loops (see \
         `bench/src/core_bench.rs`). Hub, box and bench share this machine's CPUs. Details: \
         `core.json`. Reproduce: `cargo build --release --workspace --bins && \
         cargo run --release -p storebox-bench{}`.",
        f(&a["seconds_per_run"]),
        u(&a["pending_push_after_runs"]),
        f(&a["fsync_baseline"]["p50_ms"]),
        if r["mode"] == "quick" { " -- --quick" } else { "" },
    );
    s
}
