//! `bench`: the core figures of storebox, measured on real `storehub` and `storebox`
//! processes talking over 127.0.0.1, each next to a baseline measured in the same run on the
//! same machine, so that the ratio, not the absolute figure, is what carries across machines.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p storebox-bench -- [--quick]
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
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The one store of the run.
const STORE: &str = "bench-001";
/// How often the cold sync is polled: its wall time is exact to within one period.
const POLL: Duration = Duration::from_millis(20);
/// Lookups measured (and as many baseline requests, interleaved).
const LOOKUPS: usize = 2_000;
/// Requests of each kind sent before measuring, to warm caches and the connection.
const WARMUP: usize = 200;
/// Target size of a sale event, the size of a typical till ticket in JSON.
const EVENT_BYTES: usize = 600;

/// Run sizes: `--quick` keeps the whole run under ~40 s, the full one under ~2 min.
struct Plan {
    quick: bool,
    tills: &'static [usize],
    run: Duration,
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "-h" | "--help" => {
                println!(
                    "usage: bench [--quick]\n\nBuild first: cargo build --release --workspace \
                     --bins\nThen: cargo run --release -p storebox-bench -- [--quick]"
                );
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let plan = if quick {
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
    };
    // The release profile aborts on panic, so destructors would not run: the hook kills the
    // children itself before the process goes.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        kill_all_children();
        if let Some(dir) = RUN_DIR.get() {
            let _ = std::fs::remove_dir_all(dir);
        }
        default_hook(info);
    }));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        // Returning from here drops the run's future, and with it every process guard.
        tokio::select! {
            result = run(&plan) => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    });
    // By now every process guard has dropped: exiting cannot leave a daemon behind.
    if let Err(e) = result {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}

async fn run(plan: &Plan) -> anyhow::Result<()> {
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
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join("core.json"),
        serde_json::to_string_pretty(&results)? + "\n",
    )?;
    std::fs::write(dir.join("core.md"), &table)?;
    println!("\n{table}");
    println!("written: {}/core.{{json,md}}", dir.display());
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// Every child still running. Guards own an entry each; the panic hook empties it, since with
/// `panic = "abort"` no guard's destructor would run.
static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The run's temporary directory, for the panic hook to remove (its `TempDir` will not drop).
static RUN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

fn children() -> MutexGuard<'static, Vec<Child>> {
    CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

fn kill_all_children() {
    // try_lock: a panic while the list is held must not deadlock the hook.
    let mut list = match CHILDREN.try_lock() {
        Ok(list) => list,
        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for mut child in list.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// A running child process, killed when this guard drops.
struct Proc {
    pid: u32,
    log: PathBuf,
}

impl Proc {
    fn spawn(mut command: Command, log: PathBuf) -> anyhow::Result<Proc> {
        let out = std::fs::File::create(&log)?;
        let child = command
            .stdout(out.try_clone()?)
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {command:?}"))?;
        let pid = child.id();
        children().push(child);
        Ok(Proc { pid, log })
    }

    /// Fails, with the end of the process's log, if it has exited.
    fn check_alive(&self) -> anyhow::Result<()> {
        let exited = children()
            .iter_mut()
            .find(|c| c.id() == self.pid)
            .and_then(|c| c.try_wait().ok().flatten());
        match exited {
            Some(status) => bail!("process {} exited ({status}):\n{}", self.pid, self.tail()),
            None => Ok(()),
        }
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let child = {
            let mut list = children();
            let i = list.iter().position(|c| c.id() == self.pid);
            i.map(|i| list.swap_remove(i))
        };
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Bins {
    hub: PathBuf,
    storebox: PathBuf,
}

/// A binary of the workspace next to the bench's own executable.
fn sibling(exe: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = exe.with_file_name(name);
    ensure!(
        path.is_file(),
        "{} is missing: build the daemons first with `cargo build --release --workspace --bins`",
        path.display()
    );
    Ok(path)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `check` every `every` until it gives a value, for at most `timeout`.
async fn wait_for<T, F, Fut>(
    what: &str,
    proc: &Proc,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        proc.check_alive()
            .with_context(|| format!("while waiting for {what}"))?;
        if start.elapsed() > timeout {
            bail!(
                "timed out after {timeout:?} waiting for {what}; log:\n{}",
                proc.tail()
            );
        }
        tokio::time::sleep(every).await;
    }
}

/// One request on a fresh connection, the body parsed as JSON when it is JSON.
async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> anyhow::Result<(StatusCode, Value)> {
    let (status, body) = storebox_http::call(addr, method.clone(), path, headers, body)
        .await
        .with_context(|| format!("{method} http://{addr}{path}"))?;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, value))
}

/// A hub set up by `storehub init` for [`STORE`] in a temporary directory, serving.
struct Hub {
    // Declared before `dir`: the process goes before its directory.
    proc: Proc,
    dir: tempfile::TempDir,
    admin: SocketAddr,
    auth: String,
}

impl Hub {
    async fn start(bins: &Bins) -> anyhow::Result<Hub> {
        let dir = tempfile::tempdir()?;
        let _ = RUN_DIR.set(dir.path().to_owned());
        let admin_port = free_port()?;
        let out = Command::new(&bins.hub)
            .arg("init")
            .arg("--dir")
            .arg(dir.path())
            .args(["--hub-port", &free_port()?.to_string()])
            .args(["--admin-port", &admin_port.to_string()])
            .args(["--lan-port", &free_port()?.to_string()])
            .args(["--store", STORE])
            .output()
            .context("running storehub init")?;
        ensure!(
            out.status.success(),
            "storehub init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
        let mut command = Command::new(&bins.hub);
        command
            .arg("serve")
            .arg("--config")
            .arg(dir.path().join("hub.toml"));
        let proc = Proc::spawn(command, dir.path().join("hub.log"))?;
        let hub = Hub {
            proc,
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            auth: format!("Bearer {}", token.trim()),
        };
        let (admin, auth) = (hub.admin, hub.auth.as_str());
        wait_for(
            "the hub's admin API",
            &hub.proc,
            Duration::from_secs(20),
            Duration::from_millis(50),
            || async move {
                let headers = [("authorization", auth)];
                let answer = call(
                    admin,
                    Method::GET,
                    "/admin/v1/stores",
                    &headers,
                    Bytes::new(),
                );
                answer.await.ok().filter(|(s, _)| s.is_success())
            },
        )
        .await?;
        Ok(hub)
    }

    async fn admin(&self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Value> {
        let headers = [("authorization", self.auth.as_str())];
        let (status, answer) = call(self.admin, method.clone(), path, &headers, body).await?;
        ensure!(status.is_success(), "{method} {path}: {status} {answer}");
        Ok(answer)
    }

    async fn import(&self, module: &str, records: &[Value]) -> anyhow::Result<()> {
        let path = format!("/admin/v1/stores/{STORE}/modules/{module}/import");
        let body = Bytes::from(storebox_sim::to_ndjson(records));
        self.admin(Method::POST, &path, body).await.map(drop)
    }

    async fn delete(&self, module: &str, id: &str) -> anyhow::Result<()> {
        // Generated ids are plain ASCII letters and digits: nothing to percent-encode.
        let path = format!("/admin/v1/stores/{STORE}/modules/{module}/records/{id}");
        self.admin(Method::DELETE, &path, Bytes::new())
            .await
            .map(drop)
    }
}

/// The store's box, with the config `storehub init` wrote for it.
struct BoxProc {
    proc: Proc,
    spawned: Instant,
    lan: SocketAddr,
    data_dir: PathBuf,
}

impl BoxProc {
    fn spawn(bins: &Bins, hub: &Hub) -> anyhow::Result<BoxProc> {
        let boxes = hub.dir.path().join("boxes");
        let config = boxes.join(format!("{STORE}.toml"));
        // No periodic delta pull: the only deltas are the ones measured.
        std::fs::create_dir_all(boxes.join("storebox.d"))?;
        std::fs::write(
            boxes.join("storebox.d/50-bench.toml"),
            "[sync]\ndelta_interval = \"off\"\n",
        )?;
        let text = std::fs::read_to_string(&config)?;
        let setting = |key: &str| {
            text.lines()
                .find_map(|l| {
                    l.strip_prefix(key)?
                        .trim()
                        .strip_prefix('=')?
                        .trim()
                        .strip_prefix('"')?
                        .strip_suffix('"')
                })
                .map(str::to_owned)
                .with_context(|| format!("no {key} in {}", config.display()))
        };
        let lan = setting("listen")?.parse()?;
        let data_dir = boxes.join(setting("data_dir")?);
        let mut command = Command::new(&bins.storebox);
        command.arg("serve").arg("--config").arg(&config);
        let spawned = Instant::now();
        let proc = Proc::spawn(command, hub.dir.path().join("box.log"))?;
        Ok(BoxProc {
            proc,
            spawned,
            lan,
            data_dir,
        })
    }

    async fn status(&self) -> anyhow::Result<Value> {
        let (status, doc) = call(self.lan, Method::GET, "/v1/status", &[], Bytes::new()).await?;
        ensure!(status == StatusCode::OK, "GET /v1/status: {status} {doc}");
        Ok(doc)
    }

    /// Waits (polling every [`POLL`]) until every module has completed a full sync.
    async fn wait_full_sync(&self, timeout: Duration) -> anyhow::Result<Value> {
        let this = self;
        wait_for(
            "the cold full sync",
            &self.proc,
            timeout,
            POLL,
            || async move {
                // Refused connections are expected until the box listens.
                let doc = this.status().await.ok()?;
                storebox_sim::MODULES
                    .iter()
                    .all(|m| doc["modules"][m]["last_full_ok"].is_string())
                    .then_some(doc)
            },
        )
        .await
    }

    /// Waits until the full sync process has published its report.
    async fn wait_full_report(&self, timeout: Duration) -> anyhow::Result<Value> {
        wait_for(
            "the full sync's report",
            &self.proc,
            timeout,
            POLL,
            || async {
                let doc = self.status().await.ok()?;
                (doc["last_full_sync"]["process"] == "full").then_some(doc)
            },
        )
        .await
    }

    async fn post_json(&self, path: &str) -> anyhow::Result<Value> {
        let (status, doc) = call(self.lan, Method::POST, path, &[], Bytes::new()).await?;
        ensure!(status == StatusCode::OK, "POST {path}: {status} {doc}");
        Ok(doc)
    }
}

// ---------------------------------------------------------------------------------------------
// Keep-alive client and latencies

/// One keep-alive HTTP/1.1 connection, as a till holds one.
struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        // Small requests, latency measured: no Nagle delay.
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(Conn {
            sender,
            host: addr.to_string(),
        })
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Bytes,
    ) -> anyhow::Result<StatusCode> {
        self.sender.ready().await?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        // Read the whole answer: a till needs it, and the connection is reused.
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// Latencies of one series.
struct Lat(Vec<Duration>);

impl Lat {
    /// Nearest-rank percentile.
    fn pct(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v.get(rank.saturating_sub(1)).copied().unwrap_or_default()
    }
    fn p50_ms(&self) -> f64 {
        self.pct(50.0).as_secs_f64() * 1e3
    }
    fn p99_ms(&self) -> f64 {
        self.pct(99.0).as_secs_f64() * 1e3
    }
    fn json_us(&self) -> Value {
        json!({
            "requests": self.0.len(),
            "p50_us": self.pct(50.0).as_secs_f64() * 1e6,
            "p99_us": self.pct(99.0).as_secs_f64() * 1e6,
        })
    }
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
fn sale_template(store: &storebox_sim::Store, till: usize) -> anyhow::Result<(String, String)> {
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

// ---------------------------------------------------------------------------------------------
// Footprint, machine, report

fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Apparent and allocated sizes of every file under `dir`: a database file may be grown
/// ahead of its contents, and sparse.
fn dir_size(dir: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let (mut len, mut allocated) = (0, 0);
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry?;
        let meta = entry.metadata()?;
        let (l, a) = if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            (meta.len(), meta.blocks() * 512)
        };
        len += l;
        allocated += a;
    }
    Ok((len, allocated))
}

fn machine_info(started: chrono::DateTime<chrono::Utc>) -> Value {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpu = cpuinfo
        .lines()
        .find(|l| {
            l.starts_with("model name") || l.starts_with("Model") || l.starts_with("CPU part")
        })
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_owned());
    let mem_kib = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok());
    json!({
        "date": started.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "nproc": std::thread::available_parallelism().map(usize::from).unwrap_or(1),
        "kernel": read("/proc/sys/kernel/osrelease").trim(),
        "arch": std::env::consts::ARCH,
        "cpu": cpu,
        "mem_total_kib": mem_kib,
        "temp_dir": std::env::temp_dir(),
        "source": source_info(),
    })
}

/// The commit measured, and whether the working tree differed from it (then the figures
/// are those of uncommitted code).
fn source_info() -> Value {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    json!({
        "commit": git(&["rev-parse", "--short", "HEAD"]),
        "dirty": git(&["status", "--porcelain", "--untracked-files=no"]).map(|s| !s.is_empty()),
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1e3).round() / 1e3
    } else {
        0.0
    }
}

fn bytes_h(n: u64) -> String {
    match n {
        0..1_024 => format!("{n} B"),
        1_024..1_048_576 => format!("{:.1} KiB", n as f64 / 1_024.0),
        _ => format!("{:.2} MiB", n as f64 / 1_048_576.0),
    }
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
    let _ = writeln!(
        s,
        "{} · {} × {} · {} · Linux {} · {:.1} GiB RAM · source {}{}\n",
        m["date"].as_str().unwrap_or("?"),
        u(&m["nproc"]),
        m["cpu"].as_str().unwrap_or("?"),
        m["arch"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        f(&m["mem_total_kib"]) / 1_048_576.0,
        m["source"]["commit"].as_str().unwrap_or("?"),
        if m["source"]["dirty"] == true {
            " + uncommitted changes"
        } else {
            ""
        },
    );
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
         `bench/src/main.rs`). Hub, box and bench share this machine's CPUs. Details: \
         `core.json`. Reproduce: `cargo build --release --workspace --bins && \
         cargo run --release -p storebox-bench{}`.",
        f(&a["seconds_per_run"]),
        u(&a["pending_push_after_runs"]),
        f(&a["fsync_baseline"]["p50_ms"]),
        if r["mode"] == "quick" { " -- --quick" } else { "" },
    );
    s
}
