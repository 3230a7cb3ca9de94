//! `bench fleet`: the hub under a fleet of boxes. Real `storehub serve` processes on
//! 127.0.0.1, N stores of one chain with their credentials and the chain's catalog, and N
//! light boxes ([`client`]) in this process, each on its own HTTP/2 + TLS connection with its
//! own client certificate, doing what a box does: the change watch, delta pulls, activity
//! push at the shop's rate, one full sync spread over the run.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p storebox-bench -- fleet [--boxes N] [--quick] [--products N]
//!     [--measure SECS] [--backend embedded|postgres [--database-url postgres://...]]
//!     [--replicas N] [--per-store]
//! ```
//!
//! The run, in order:
//!
//! 1. **Hubs.** `storehub init` for every store, then its `hub.toml` edited as a chain's
//!    would be: the catalog module `scope = "group"` and every store in group `chain`
//!    (unless `--per-store`), `[sync] max_connections` set to the boxes each process takes.
//!    `--backend embedded`: the redb store is one process's, so one `storehub serve` takes
//!    the whole fleet. `--backend postgres`: `--replicas` replicas (2 by default) on one
//!    database, from configs that differ only in their ports, after `storehub migrate`, all
//!    started before any box enrolls (the PKI state is in the database). Without
//!    `--database-url`, the bench runs its own throwaway PostgreSQL ([`pg`]).
//! 2. **Stores.** The first `--products` products of the generated catalog
//!    (`storebox_sim::generate_store(1)`) imported once into the chain's group (or, with
//!    `--per-store`, into every store), the other modules into every store, then every box
//!    enrolled through `/pki/v1/` with the token `storehub init` wrote for it and a key made
//!    here, the enrollments spread over the replicas.
//! 3. **Baseline.** One box alone on the idle hub: a cold full sync (which gives every box
//!    the cursors and digests it holds), its handshake, idle delta pulls and single-sale
//!    pushes one at a time. The fleet's latencies are also given as ratios to these, since
//!    this machine is shared and noisy.
//! 4. **Ramp.** The boxes connect over the ramp, a bounded number of TLS handshakes at once,
//!    box `i` to replica `i mod replicas`.
//! 5. **Measured window.** Hub CPU (utime + stime from `/proc/PID/stat`) over the window,
//!    RSS at its end; every call sent inside it is timed. Part way in, the chain-wide price
//!    change: one write to the group's catalog record through the admin API (`--per-store`:
//!    one write per store); a box is reached when its client has pulled the changed record.
//! 6. **Results** in `bench/results/fleet.{json,md}` for PostgreSQL, `fleet-embedded.*` for
//!    the embedded backend; `-quick` and `-per-store` runs keep files of their own.
//!
//! Every child process is killed when the run ends, fails, panics or is interrupted; the
//! bench's own PostgreSQL is shut down then too.

mod client;
mod pg;

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context};
use bytes::Bytes;
use http::Method;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use storebox_protocol as proto;
use tokio::time::Instant;

use crate::common::{
    bytes_h, dir_size, free_port, machine_info, ratio, rss_kib, sibling, wait_for, Proc, RUN_DIR,
};
use client::{BoxReport, BoxSpec, Fleet, Product};

/// Connections a hub's sync listener is given above its share of the boxes: the baseline
/// box and the enrollment connections come before the fleet, but a box that reconnects must
/// not find the door shut.
const CAP_MARGIN: usize = 64;
/// The catalog record the chain-wide change rewrites.
const TARGET_ID: &str = "P000001";
/// The group every store of the run belongs to, unless `--per-store`.
const CHAIN: &str = "chain";
/// The module the chain shares.
const SHARED_MODULE: &str = "catalog";
/// Round trips of the idle baseline.
const BASELINE_CALLS: usize = 200;
/// Concurrent admin calls during the per-store imports and a per-store change: the hub's
/// writes are serialised by its database, more would only queue.
const ADMIN_WORKERS: usize = 2;
/// Concurrent enrollments, spread over the replicas.
const ENROLL_WORKERS: usize = 4;
/// Retries of one enrollment that lost a race for the PKI state (another writer of it: a
/// hub's replica, or the bench's admin calls).
const ENROLL_ATTEMPTS: usize = 50;
/// `[database] pool_size` of each replica: a little over the default 16, since each
/// replica takes 2,500 boxes, and far under what 2 replicas may open on the bench's server.
const POOL_SIZE: usize = 24;

/// Where the hubs keep their data.
#[derive(Debug, Clone)]
pub enum Backend {
    /// redb, one process.
    Embedded,
    /// One PostgreSQL database shared by the replicas (`[database] url` in `hub.toml`): the
    /// one at `url`, or a throwaway server the bench starts.
    Postgres {
        url: Option<String>,
        replicas: usize,
    },
}

/// The run's parameters.
pub struct Plan {
    quick: bool,
    boxes: usize,
    backend: Backend,
    /// The catalog kept per store and changed by one write per store, instead of shared.
    per_store: bool,
    products: usize,
    /// How long the connections take to open, spread evenly.
    ramp: Duration,
    /// Time left between the end of the ramp and the measured window.
    settle: Duration,
    measure: Duration,
    /// When the chain-wide change starts, as a fraction of the window.
    change_at: f64,
    /// How long after its writes the change may take to reach every box.
    change_timeout: Duration,
    poll_every: Duration,
    sale_every: Duration,
    /// TLS handshakes in progress at once.
    handshakes: usize,
}

impl Plan {
    pub fn new(
        quick: bool,
        boxes: Option<usize>,
        backend: Backend,
        products: Option<usize>,
        measure: Option<u64>,
        per_store: bool,
    ) -> Plan {
        let boxes = boxes.unwrap_or(if quick { 200 } else { 5_000 }).max(1);
        let measure = Duration::from_secs(measure.unwrap_or(if quick { 20 } else { 180 }));
        Plan {
            quick,
            boxes,
            backend,
            per_store,
            products: products
                .unwrap_or(if quick { 500 } else { 2_000 })
                .clamp(1, storebox_sim::PRODUCT_COUNT),
            // About 150 handshakes a second at most: a fraction of what two cores can do,
            // so the ramp does not starve the boxes already connected.
            ramp: Duration::from_secs_f64((boxes as f64 / 150.0).max(2.0)),
            settle: Duration::from_secs(if quick { 2 } else { 10 }),
            measure,
            change_at: 0.4,
            change_timeout: Duration::from_secs(if quick { 20 } else { 240 }),
            // Every box pulls once a minute (the periodic pull; with the watch working a box
            // pulls hourly, without it every 5 minutes: this is the load of a fleet whose
            // watches all failed, five times over), ten times as often in the quick run so
            // that its 20 s still hold samples.
            poll_every: Duration::from_secs(if quick { 6 } else { 60 }),
            // 10 sales per shop per minute.
            sale_every: Duration::from_secs(6),
            handshakes: 16,
        }
    }

    fn replicas(&self) -> usize {
        match self.backend {
            Backend::Embedded => 1,
            Backend::Postgres { replicas, .. } => replicas.max(1),
        }
    }

    /// The results' file name: the target setup (PostgreSQL, shared catalog) is `fleet`.
    fn results_name(&self) -> String {
        let mut name = String::from("fleet");
        if self.quick {
            name.push_str("-quick");
        }
        if matches!(self.backend, Backend::Embedded) {
            name.push_str("-embedded");
        }
        if self.per_store {
            name.push_str("-per-store");
        }
        name
    }
}

/// One `storehub serve`.
struct Node {
    name: String,
    proc: Proc,
    data_dir: PathBuf,
    sync: SocketAddr,
    admin: SocketAddr,
    auth: String,
}

/// The hub processes of the run: one embedded hub, or the replicas of one database.
struct Cluster {
    dir: PathBuf,
    nodes: Vec<Node>,
    roots: Arc<rustls::RootCertStore>,
    /// `[sync] max_connections` of each process.
    max_connections: usize,
    /// `[database] url` and `pool_size` of each replica, for PostgreSQL.
    database: Option<(String, usize)>,
}

impl Cluster {
    /// The end of every node's log, for an error's context.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- {}:\n{}", n.name, n.proc.tail()))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The node box `i` talks to: the replicas in turn.
    fn serving(&self, i: usize) -> &Node {
        &self.nodes[i % self.nodes.len()]
    }
}

pub async fn run(plan: &Plan) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("locating the bench executable")?;
    let hub_bin = sibling(&exe, "storehub")?;
    let started_at = chrono::Utc::now();
    let nofile = raise_nofile()?;
    let run_dir = tempfile::tempdir().context("creating the run directory")?;
    let _ = RUN_DIR.set(run_dir.path().to_owned());
    let stores: Vec<String> = (1..=plan.boxes).map(|i| format!("shop-{i:05}")).collect();
    let replicas = plan.replicas();
    let max_connections = plan.boxes.div_ceil(replicas) + CAP_MARGIN;
    println!(
        "fleet: {} boxes, {} products, catalog {}, backend {} ({} process(es), \
         max_connections {max_connections} each), NOFILE {nofile}",
        plan.boxes,
        plan.products,
        if plan.per_store {
            "per store"
        } else {
            "shared by the chain"
        },
        backend_name(&plan.backend),
        replicas,
    );

    // 1. Hubs, and for PostgreSQL without a URL the bench's own server. It is declared
    // before the cluster, so it drops after the hubs that use it.
    let setup = Instant::now();
    let mut server = None;
    let dir = run_dir.path().join("hub");
    let cluster = match &plan.backend {
        Backend::Embedded => {
            start_cluster(&hub_bin, &dir, &stores, plan, max_connections, None).await?
        }
        Backend::Postgres { url, .. } => {
            let url = match url {
                Some(url) => url.clone(),
                None => {
                    // Each replica's pool, its change listener and PKI listener, and room
                    // for migrate and the size queries.
                    let connections = replicas * (POOL_SIZE + 4) + 20;
                    let started = pg::Server::start(run_dir.path(), connections)
                        .await
                        .context("starting the bench's PostgreSQL")?;
                    let url = started.url.clone();
                    server = Some(started);
                    url
                }
            };
            start_cluster(&hub_bin, &dir, &stores, plan, max_connections, Some(url)).await?
        }
    };
    let nodes_started = setup.elapsed();
    println!(
        "{} hub process(es) started in {:.1} s",
        cluster.nodes.len(),
        nodes_started.as_secs_f64()
    );

    // 2. Stores: the catalog and the store's other modules, then the boxes' credentials.
    let mut generated = storebox_sim::generate_store(1);
    let catalog: Vec<Value> = generated
        .modules
        .remove(SHARED_MODULE)
        .context("the generated store has no catalog")?
        .into_iter()
        .take(plan.products)
        .collect();
    // A real store has every module: the others are imported too (small: the configuration,
    // the promotions, a few loyalty customers), so that a box's full sync finds every module
    // held, as in a fleet, and none empty.
    let mut per_store_imports = Vec::new();
    if plan.per_store {
        per_store_imports.push((SHARED_MODULE.to_owned(), catalog.clone()));
    }
    for (module, keep) in [
        ("config", usize::MAX),
        ("promotions", usize::MAX),
        ("customers", 100),
    ] {
        let records = generated.modules.remove(module).unwrap_or_default();
        per_store_imports.push((module.to_owned(), records.into_iter().take(keep).collect()));
    }
    let bodies: Vec<(String, Bytes)> = per_store_imports
        .iter()
        .map(|(m, r)| (m.clone(), Bytes::from(storebox_sim::to_ndjson(r))))
        .collect();
    let per_store_bytes: usize = bodies.iter().map(|(_, b)| b.len()).sum();
    let catalog_body = Bytes::from(storebox_sim::to_ndjson(&catalog));
    let t = Instant::now();
    let mut group_import = None;
    if !plan.per_store {
        // The chain's catalog, once.
        let node = &cluster.nodes[0];
        let mut admin = AdminConn::open(node.admin, &node.auth).await?;
        let path = format!("/admin/v1/groups/{CHAIN}/modules/{SHARED_MODULE}/import");
        admin
            .send(Method::POST, &path, catalog_body.clone())
            .await
            .context("importing the chain's catalog")?;
        group_import = Some(t.elapsed());
    }
    for (module, body) in &bodies {
        let (name, body) = (module.clone(), body.clone());
        for_each_store(&cluster, &stores, ADMIN_WORKERS, move |store| {
            let path = format!("/admin/v1/stores/{store}/modules/{name}/import");
            (Method::POST, path, body.clone())
        })
        .await
        .with_context(|| format!("importing {module}"))?;
    }
    let import_time = t.elapsed();
    println!(
        "stores filled in {:.1} s ({} products {}, {} per store{})",
        import_time.as_secs_f64(),
        catalog.len(),
        if plan.per_store {
            "in every store"
        } else {
            "in the chain's group"
        },
        bytes_h(per_store_bytes as u64),
        group_import.map_or(String::new(), |d| format!(
            "; the group's catalog, {}, in {:.2} s",
            bytes_h(catalog_body.len() as u64),
            d.as_secs_f64()
        )),
    );
    let t = Instant::now();
    let (tls, enroll_retries) = enroll_all(&cluster, &stores)
        .await
        .with_context(|| format!("enrolling the boxes; the hubs' logs:\n{}", cluster.logs()))?;
    let enroll_time = t.elapsed();
    println!(
        "{} boxes enrolled in {:.1} s, {enroll_retries} retried",
        tls.len(),
        enroll_time.as_secs_f64(),
    );
    let db_after_import = database_size(&cluster)?;

    // 3. Baseline: one box alone on the idle hub. Its first call is a cold full sync: the
    // hub's answer is what every box of the run holds (every store got the same import, and
    // the shared catalog's cursor carries the group's sequence number, which only the hub
    // knows), checked against the admin status of the first and last store.
    let products: Vec<Product> = catalog
        .iter()
        .filter_map(|p| {
            Some(Product {
                id: p["id"].as_str()?.to_owned(),
                ean13: p["ean13"].as_str()?.to_owned(),
                price_cents: p["price_cents"].as_u64()?,
            })
        })
        .collect();
    ensure!(!products.is_empty(), "no product to sell in the catalog");
    let conn = client::connect(cluster.serving(0).sync, tls[0].clone()).await?;
    let modules = client::cold_full_sync(&conn)
        .await
        .context("the baseline box's cold full sync")?;
    check_module_state(&cluster, &stores, &modules).await?;
    drop(conn);
    let run_id = format!("{:x}", started_at.timestamp_millis());
    let make_fleet = |epoch: Instant, products: Vec<Product>| {
        let window_start = epoch + plan.ramp + plan.settle;
        Fleet {
            modules: modules.clone(),
            products,
            target_id: TARGET_ID.into(),
            epoch,
            window: (window_start, window_start + plan.measure),
            poll_every: plan.poll_every,
            sale_every: plan.sale_every,
            handshakes: tokio::sync::Semaphore::new(plan.handshakes),
            run_id: run_id.clone(),
            connected: AtomicUsize::new(0),
            reached: AtomicUsize::new(0),
        }
    };
    let idle = make_fleet(Instant::now(), products);
    let t = Instant::now();
    let conn = client::connect(cluster.serving(0).sync, tls[0].clone()).await?;
    let baseline_connect = t.elapsed();
    let (base_polls, base_pushes) = client::idle_round_trips(&conn, &idle, BASELINE_CALLS)
        .await
        .context("the idle baseline")?;
    drop(conn);
    let base_poll = Series::new(base_polls);
    let base_push = Series::new(base_pushes);
    println!(
        "baseline (one box, idle hub): handshake {:.1} ms, poll p50 {:.2} ms, push p50 {:.2} ms",
        baseline_connect.as_secs_f64() * 1e3,
        base_poll.p50_ms(),
        base_push.p50_ms()
    );
    let fleet = Arc::new(make_fleet(
        Instant::now() + Duration::from_millis(200),
        idle.products,
    ));
    let (epoch, window_start) = (fleet.epoch, fleet.window.0);

    // 4. Ramp, under the guard that keeps the hubs from taking the machine down.
    let idle_rss = node_stats(&cluster, rss_kib)?;
    let db_root = server.as_ref().and_then(pg::Server::postmaster);
    let guard = Guard::start(&cluster, db_root, rss_budget_kib());
    let mut aborted = guard.aborted.clone();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut handles = Vec::with_capacity(plan.boxes);
    for (i, tls) in tls.into_iter().enumerate() {
        let mut rng = storebox_sim::prng::SplitMix64::derive(i as u64, "fleet-full", 0);
        let spec = BoxSpec {
            index: i,
            store: stores[i].clone(),
            addr: cluster.serving(i).sync,
            tls,
            connect_at: plan.ramp.mul_f64(i as f64 / plan.boxes as f64),
            full_at: (window_start - epoch)
                + plan.measure.mul_f64(rng.below(1_000_000) as f64 / 1e6),
        };
        handles.push(tokio::spawn(client::run_box(
            spec,
            fleet.clone(),
            stop_rx.clone(),
        )));
    }
    while Instant::now() + Duration::from_secs(5) < window_start {
        if !until(Instant::now() + Duration::from_secs(5), &mut aborted).await {
            break;
        }
        check_nodes(&cluster)?;
        println!(
            "ramp: {} of {} boxes connected",
            fleet.connected.load(Ordering::Relaxed),
            plan.boxes
        );
    }

    // 5. The measured window, the chain-wide change inside it.
    let mut connected_at_start = 0;
    let mut change = Change {
        start: None,
        writes_done: None,
        connected: 0,
    };
    let mut writes = None;
    let mut waits = None;
    let window_end = window_start + plan.measure;
    if until(window_start, &mut aborted).await {
        connected_at_start = fleet.connected.load(Ordering::Relaxed);
        println!(
            "measuring for {} s, {connected_at_start} boxes connected",
            plan.measure.as_secs()
        );
        guard.mark_window_start();
        if let Some((url, _)) = &cluster.database {
            waits = Some(pg::WaitSampler::start(url.clone(), Duration::from_secs(1)));
        }
    }
    if until(
        window_start + plan.measure.mul_f64(plan.change_at),
        &mut aborted,
    )
    .await
    {
        let target = catalog
            .iter()
            .find(|p| p["id"] == TARGET_ID)
            .context("the catalog has no target product")?;
        let mut changed = target.clone();
        // A new price every run, so a reused database sees a change too.
        let price = target["price_cents"].as_u64().unwrap_or(100);
        changed["price_cents"] = json!(price + 1 + started_at.timestamp().unsigned_abs() % 97);
        let changed = Bytes::from(changed.to_string());
        change.connected = fleet.connected.load(Ordering::Relaxed);
        let start = Instant::now();
        change.start = Some(start);
        // The writes run beside the window's clock: the window ends on time however long
        // the hub takes to take them.
        let node = &cluster.nodes[0];
        let (admin, auth) = (node.admin, node.auth.clone());
        let stores = stores.clone();
        let per_store = plan.per_store;
        writes = Some(tokio::spawn(async move {
            if per_store {
                for_each_target(admin, &auth, &stores, ADMIN_WORKERS, move |store| {
                    let path = format!(
                        "/admin/v1/stores/{store}/modules/{SHARED_MODULE}/records/{TARGET_ID}"
                    );
                    (Method::PUT, path, changed.clone())
                })
                .await
            } else {
                let path =
                    format!("/admin/v1/groups/{CHAIN}/modules/{SHARED_MODULE}/records/{TARGET_ID}");
                let mut conn = AdminConn::open(admin, &auth).await?;
                conn.send(Method::PUT, &path, changed).await.map(drop)
            }
            .context("the chain-wide price change")?;
            anyhow::Ok(start.elapsed())
        }));
    }
    until(window_end, &mut aborted).await;
    let window = guard.mark_window_end();
    let waits = match waits {
        Some(sampler) => Some(sampler.stop().await),
        None => None,
    };
    let mut change_error = None;
    if let Some(writes) = writes {
        let deadline = Instant::now() + plan.change_timeout;
        tokio::select! {
            done = writes => match done.context("the change writer failed")? {
                Ok(took) => {
                    change.writes_done = Some(took);
                    println!(
                        "chain-wide change written ({}) in {:.3} s",
                        if plan.per_store { "one write per store" } else { "one write to the group" },
                        took.as_secs_f64()
                    );
                }
                Err(e) => change_error = Some(format!("{e:#}")),
            },
            _ = tokio::time::sleep_until(deadline) => {
                change_error = Some(format!("the writes were not done {} s after the window", plan.change_timeout.as_secs()));
            }
            _ = aborted.changed() => {}
        }
        // The change may still be spreading: wait for every connected box, within bounds.
        while fleet.reached.load(Ordering::Relaxed) < fleet.connected.load(Ordering::Relaxed)
            && Instant::now() < deadline
            && until(Instant::now() + Duration::from_millis(200), &mut aborted).await
        {}
    }
    let _ = stop_tx.send(true);
    let mut reports = Vec::with_capacity(handles.len());
    for handle in handles {
        reports.push(handle.await.context("a box task failed")?);
    }
    let abort_reason = guard.abort_reason();
    if abort_reason.is_none() {
        check_nodes(&cluster)?;
    }
    let db_end = database_size(&cluster)?;

    // 6. Results.
    let measured = Measured {
        plan,
        started_at,
        cluster: &cluster,
        reports: &reports,
        fleet: &fleet,
        setup: json!({
            "hub_start_s": round3(nodes_started.as_secs_f64()),
            "import_s": round3(import_time.as_secs_f64()),
            "group_catalog_import_s": group_import.map(|d| round3(d.as_secs_f64())),
            "enroll_s": round3(enroll_time.as_secs_f64()),
            "enroll_retries": enroll_retries,
            "import_ndjson_bytes_per_store": per_store_bytes,
            "catalog_ndjson_bytes": catalog_body.len(),
            "max_connections_per_process": max_connections,
            "pool_size_per_replica": cluster.database.as_ref().map(|(_, pool)| *pool),
            "bench_postgres": server.as_ref().map(|s| s.describe()),
            "nofile_limit": nofile,
        }),
        baseline_connect,
        base_poll,
        base_push,
        idle_rss,
        window,
        change,
        change_error,
        abort_reason,
        db: (db_after_import, db_end),
        waits,
        connected_at_start,
    };
    let (results, table) = measured.report()?;
    crate::common::write_results(&plan.results_name(), &results, &table)?;
    // The hubs go first, then the database they were using.
    drop(cluster);
    drop(server);
    Ok(())
}

fn backend_name(b: &Backend) -> &'static str {
    match b {
        Backend::Embedded => "embedded",
        Backend::Postgres { .. } => "postgres",
    }
}

/// Raises this process's open-file limit to its hard limit; the hubs inherit it.
fn raise_nofile() -> anyhow::Result<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    setrlimit(Resource::Nofile, raised).context("raising RLIMIT_NOFILE")?;
    Ok(limit.maximum.unwrap_or(u64::MAX))
}

/// `storehub init` for every store, its `hub.toml` made the chain's, and the hub started:
/// one embedded hub, or (with `database_url`) `storehub migrate` and every replica, each
/// from a copy of the config with its own ports, in the same directory so that the relative
/// paths (certificates, data directory, admin token) are shared.
async fn start_cluster(
    hub_bin: &Path,
    dir: &Path,
    stores: &[String],
    plan: &Plan,
    max_connections: usize,
    database_url: Option<String>,
) -> anyhow::Result<Cluster> {
    let (sync_port, admin_port) = init(hub_bin, dir, stores)?;
    let config = dir.join("hub.toml");
    let database = database_url.map(|url| (url, POOL_SIZE));
    edit_config(&config, |doc| {
        chain_config(doc, plan.per_store, max_connections, database.as_ref())
    })?;
    let Some((url, _)) = &database else {
        let node = start_node(hub_bin, "hub", dir, config, sync_port, admin_port).await?;
        return Ok(Cluster {
            dir: dir.to_owned(),
            roots: roots(dir)?,
            nodes: vec![node],
            max_connections,
            database,
        });
    };
    let out = Command::new(hub_bin)
        .arg("migrate")
        .arg("--config")
        .arg(&config)
        .output()
        .context("running storehub migrate")?;
    ensure!(
        out.status.success(),
        "storehub migrate failed (is the database at {url} empty and reachable?): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The first replica copies `storehub init`'s PKI state into the database; the others
    // start once it is ready, and read it from there.
    let mut nodes = vec![
        start_node(
            hub_bin,
            "replica-1",
            dir,
            config.clone(),
            sync_port,
            admin_port,
        )
        .await?,
    ];
    for r in 2..=plan.replicas() {
        let (sync_port, admin_port) = (free_port()?, free_port()?);
        let replica_config = dir.join(format!("hub-{r}.toml"));
        std::fs::copy(&config, &replica_config)
            .with_context(|| format!("copying {} for replica {r}", config.display()))?;
        edit_config(&replica_config, |doc| {
            set(doc, &["sync", "listen"], format!("127.0.0.1:{sync_port}"))?;
            set(doc, &["admin", "listen"], format!("127.0.0.1:{admin_port}"))
        })?;
        let name = format!("replica-{r}");
        nodes.push(start_node(hub_bin, &name, dir, replica_config, sync_port, admin_port).await?);
    }
    Ok(Cluster {
        dir: dir.to_owned(),
        roots: roots(dir)?,
        nodes,
        max_connections,
        database,
    })
}

/// Reads a TOML file, lets `edit` change it, writes it back.
fn edit_config(
    path: &Path,
    edit: impl FnOnce(&mut toml::Table) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    edit(&mut doc).with_context(|| format!("editing {}", path.display()))?;
    let text =
        toml::to_string_pretty(&doc).with_context(|| format!("serialising {}", path.display()))?;
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Sets `doc[path...]`, creating the tables on the way.
fn set(doc: &mut toml::Table, path: &[&str], value: impl Into<toml::Value>) -> anyhow::Result<()> {
    let (last, tables) = path.split_last().context("an empty TOML path")?;
    let mut table = doc;
    for key in tables {
        table = table
            .entry(*key)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("{key} is not a table"))?;
    }
    table.insert((*last).to_owned(), value.into());
    Ok(())
}

/// What makes `storehub init`'s config the chain's: the catalog shared by group `chain` and
/// every store in it (unless `per_store`), the sync listener sized for its boxes, and the
/// database.
fn chain_config(
    doc: &mut toml::Table,
    per_store: bool,
    max_connections: usize,
    database: Option<&(String, usize)>,
) -> anyhow::Result<()> {
    set(doc, &["sync", "max_connections"], max_connections as i64)?;
    if let Some((url, pool_size)) = database {
        set(doc, &["database", "url"], url.as_str())?;
        set(doc, &["database", "pool_size"], *pool_size as i64)?;
    }
    if per_store {
        return Ok(());
    }
    let modules = doc
        .get_mut("modules")
        .and_then(toml::Value::as_array_mut)
        .context("no [[modules]] in the config storehub init wrote")?;
    let catalog = modules
        .iter_mut()
        .filter_map(toml::Value::as_table_mut)
        .find(|m| m.get("name").and_then(toml::Value::as_str) == Some(SHARED_MODULE))
        .context("no catalog module in the config storehub init wrote")?;
    catalog.insert("scope".into(), "group".into());
    let stores = doc
        .get_mut("stores")
        .and_then(toml::Value::as_array_mut)
        .context("no [[stores]] in the config storehub init wrote")?;
    for store in stores.iter_mut().filter_map(toml::Value::as_table_mut) {
        store.insert("group".into(), CHAIN.into());
    }
    Ok(())
}

/// `storehub init` for `stores`; answers the sync and admin ports it was given.
fn init(hub_bin: &Path, dir: &Path, stores: &[String]) -> anyhow::Result<(u16, u16)> {
    let (sync_port, admin_port) = (free_port()?, free_port()?);
    let mut command = Command::new(hub_bin);
    command
        .arg("init")
        .arg("--dir")
        .arg(dir)
        .args(["--hub-port", &sync_port.to_string()])
        .args(["--admin-port", &admin_port.to_string()])
        // Box LAN ports are never used here; init only needs them to fit below 65536.
        .args(["--lan-port", "10000"]);
    for store in stores {
        command.args(["--store", store]);
    }
    let out = command.output().context("running storehub init")?;
    ensure!(
        out.status.success(),
        "storehub init failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((sync_port, admin_port))
}

fn roots(dir: &Path) -> anyhow::Result<Arc<rustls::RootCertStore>> {
    use rustls_pki_types::pem::PemObject;
    let path = dir.join("ca.crt");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_file_iter(&path)
        .with_context(|| format!("reading {}", path.display()))?
    {
        roots
            .add(cert.with_context(|| format!("parsing {}", path.display()))?)
            .with_context(|| format!("loading {}", path.display()))?;
    }
    Ok(Arc::new(roots))
}

async fn start_node(
    hub_bin: &Path,
    name: &str,
    dir: &Path,
    config: PathBuf,
    sync_port: u16,
    admin_port: u16,
) -> anyhow::Result<Node> {
    let token = std::fs::read_to_string(dir.join("admin.token")).context("reading admin.token")?;
    let mut command = Command::new(hub_bin);
    command.arg("serve").arg("--config").arg(&config);
    // Warnings and errors only: a fleet's info lines would cost the hub more than the bench
    // wants to measure, and fill the disk.
    command.env("STOREHUB_LOG", "warn");
    let log = dir.join(format!("{name}.log"));
    let proc = Proc::spawn(command, log)?;
    let node = Node {
        name: format!(
            "{}/{name}",
            dir.file_name().and_then(|n| n.to_str()).unwrap_or("?")
        ),
        proc,
        data_dir: dir.join("hub-data"),
        sync: SocketAddr::from(([127, 0, 0, 1], sync_port)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        auth: format!("Bearer {}", token.trim()),
    };
    let (admin, auth) = (node.admin, node.auth.as_str());
    wait_for(
        "the hub's admin API",
        &node.proc,
        Duration::from_secs(30),
        Duration::from_millis(50),
        || async move {
            let mut conn = AdminConn::open(admin, auth).await.ok()?;
            let answer = conn.send(Method::GET, "/admin/v1/stores", Bytes::new());
            answer.await.ok()
        },
    )
    .await?;
    Ok(node)
}

/// The node box `i` of the run talks to: the group holding its store, and in it the replicas
/// taken in turn.
fn check_nodes(cluster: &Cluster) -> anyhow::Result<()> {
    for node in &cluster.nodes {
        node.proc
            .check_alive()
            .with_context(|| format!("hub {}", node.name))?;
    }
    Ok(())
}

/// One value per node.
fn node_stats(
    cluster: &Cluster,
    f: impl Fn(u32) -> anyhow::Result<u64>,
) -> anyhow::Result<Vec<u64>> {
    cluster
        .nodes
        .iter()
        .map(|n| f(n.proc.pid).with_context(|| format!("reading the figures of hub {}", n.name)))
        .collect()
}

/// utime + stime of a process and its children (alive: read here; gone: counted in the
/// root's cutime + cstime once reaped), in clock ticks: PostgreSQL's postmaster and its
/// backends. Nothing when the root is gone.
fn tree_ticks(root: u32) -> u64 {
    let mut total = 0;
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = text
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        // Field n of proc(5) is fields[n - 3].
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
        let ppid = field(4).unwrap_or(0);
        if pid == root {
            total += [14, 15, 16, 17]
                .iter()
                .filter_map(|&n| field(n))
                .sum::<u64>();
        } else if ppid == u64::from(root) {
            total += [14, 15].iter().filter_map(|&n| field(n)).sum::<u64>();
        }
    }
    total
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    cpu_ticks_of(&format!("/proc/{pid}/stat"))
}

fn cpu_ticks_of(path: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // The command name may hold spaces and parentheses: the fields start after the last ')'.
    let fields: Vec<&str> = text
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    // Fields 14 and 15 of proc(5); the first after ')' is field 3.
    let field = |n: usize| -> anyhow::Result<u64> {
        fields
            .get(n - 3)
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no field {n} in {path}"))
    };
    Ok(field(14)? + field(15)?)
}

/// A `Vm*:` line of `/proc/PID/status`, in KiB.
fn vm_kib(pid: u32, key: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {key} in /proc/{pid}/status"))
}

/// The database's size in bytes: the embedded hub's data directory (apparent size, what the
/// files hold), or `pg_database_size`.
fn database_size(cluster: &Cluster) -> anyhow::Result<u64> {
    match &cluster.database {
        None => dir_size(&cluster.nodes[0].data_dir).map(|(len, _)| len),
        Some((url, _)) => pg::query(url, "select pg_database_size(current_database())")?
            .trim()
            .parse()
            .context("psql's answer is not a size"),
    }
}

/// Checks the modules a box holds after its cold full sync against what the hub's admin
/// status says of the first and the last store: every store got the same import, so every
/// box of the run starts from the same cursors and digests.
async fn check_module_state(
    cluster: &Cluster,
    stores: &[String],
    modules: &[(String, u64, proto::Digest)],
) -> anyhow::Result<()> {
    // The last replica: in a cluster, it is not the one the imports went through.
    let node = &cluster.nodes[cluster.nodes.len() - 1];
    let mut admin = AdminConn::open(node.admin, &node.auth).await?;
    for store in [&stores[0], &stores[stores.len() - 1]] {
        let path = format!("/admin/v1/stores/{store}/status");
        let doc: Value =
            serde_json::from_slice(&admin.send(Method::GET, &path, Bytes::new()).await?)
                .context("the store status is not JSON")?;
        let heads = doc["modules"]
            .as_object()
            .with_context(|| format!("the status of {store} has no modules: {doc}"))?;
        for (name, head) in heads {
            let head = head["head"].as_u64().unwrap_or(0);
            let held = modules.iter().find(|(m, _, _)| m == name);
            ensure!(
                held.map_or(0, |(_, cursor, _)| *cursor) == head,
                "store {store}: the hub's head of {name} is {head}, the cold full sync gave {held:?}"
            );
        }
    }
    Ok(())
}

/// Enrolls every store's box, as its technician would, `ENROLL_WORKERS` at once, through the
/// first replica: the boxes then connect to every replica, which must know them from the
/// shared PKI state. Spread over two replicas, the enrollments race for that state (each
/// one rewrites all of it under a version check): with 5,000 boxes, one enrollment lost 20
/// races in a row and the run failed.
/// Answers the boxes' TLS configurations and the enrollments that had to be retried.
async fn enroll_all(
    cluster: &Cluster,
    stores: &[String],
) -> anyhow::Result<(Vec<Arc<rustls::ClientConfig>>, usize)> {
    let mut conns = Vec::new();
    for node in &cluster.nodes[..1] {
        let conn = client::connect(node.sync, client::anonymous_tls(cluster.roots.clone())?)
            .await
            .with_context(|| format!("opening the enrollment connection to {}", node.name))?;
        conns.push(conn);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let retries = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..ENROLL_WORKERS {
        let conn = conns[w % conns.len()].clone();
        let (next, roots, retries) = (next.clone(), cluster.roots.clone(), retries.clone());
        let (dir, stores) = (cluster.dir.clone(), stores.to_vec());
        workers.push(tokio::spawn(async move {
            let mut done = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= stores.len() {
                    return anyhow::Ok(done);
                }
                let token = box_token(&dir, &stores[i])?;
                // Each enrollment rewrites the hub's whole PKI state with a version check:
                // two replicas enrolling at the same moment make one of them fail with a
                // 500 "PKI failure" (its log: "changed on another replica ... try again").
                // A technician would try again, and so does the bench, counting them.
                let mut attempt = 0;
                let tls = loop {
                    match client::enroll(&conn, &stores[i], &token, roots.clone()).await {
                        Ok(tls) => break tls,
                        Err(e)
                            if attempt < ENROLL_ATTEMPTS
                                && format!("{e:#}").contains("HTTP 500") =>
                        {
                            attempt += 1;
                            retries.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(20 * attempt as u64)).await;
                        }
                        Err(e) => return Err(e),
                    }
                };
                done.push((i, tls));
                if (i + 1) % 500 == 0 {
                    println!("enrolled {} boxes", i + 1);
                }
            }
        }));
    }
    let mut configs: Vec<Option<Arc<rustls::ClientConfig>>> = vec![None; stores.len()];
    for worker in workers {
        for (i, tls) in worker.await.context("an enrollment worker failed")?? {
            configs[i] = Some(tls);
        }
    }
    let configs = configs
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.with_context(|| format!("store {} was not enrolled", stores[i])))
        .collect::<anyhow::Result<_>>()?;
    Ok((configs, retries.load(Ordering::Relaxed)))
}

/// The one-time enrollment token `storehub init` wrote into a store's box config.
fn box_token(dir: &Path, store: &str) -> anyhow::Result<String> {
    let path = dir.join("boxes").join(format!("{store}.toml"));
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("enroll_token")?
                .trim()
                .strip_prefix('=')?
                .trim()
                .strip_prefix('"')?
                .strip_suffix('"')
        })
        .map(str::to_owned)
        .with_context(|| format!("no enroll_token in {}", path.display()))
}

/// Sends the admin call `call` makes for every store to the first node's admin API,
/// `workers` at once, each worker on a keep-alive connection.
async fn for_each_store<F>(
    cluster: &Cluster,
    stores: &[String],
    workers: usize,
    call: F,
) -> anyhow::Result<()>
where
    F: Fn(&str) -> (Method, String, Bytes) + Clone + Send + 'static,
{
    let node = &cluster.nodes[0];
    for_each_target(node.admin, &node.auth, stores, workers, call).await
}

/// [`for_each_store`] on an admin address and its authorization.
async fn for_each_target<F>(
    addr: SocketAddr,
    auth: &str,
    stores: &[String],
    workers: usize,
    call: F,
) -> anyhow::Result<()>
where
    F: Fn(&str) -> (Method, String, Bytes) + Clone + Send + 'static,
{
    let stores: Arc<[String]> = stores.into();
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..workers {
        let (next, call, stores, auth) =
            (next.clone(), call.clone(), stores.clone(), auth.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut admin = AdminConn::open(addr, &auth).await?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= stores.len() {
                    return anyhow::Ok(());
                }
                let (method, path, body) = call(&stores[i]);
                admin
                    .send(method, &path, body)
                    .await
                    .with_context(|| format!("store {}", stores[i]))?;
            }
        }));
    }
    for task in tasks {
        task.await.context("an admin worker failed")??;
    }
    Ok(())
}

/// A keep-alive HTTP/1.1 connection to an admin API.
struct AdminConn {
    sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: String,
    auth: String,
}

impl AdminConn {
    async fn open(addr: SocketAddr, auth: &str) -> anyhow::Result<AdminConn> {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to the admin API at {addr}"))?;
        tcp.set_nodelay(true)?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        Ok(AdminConn {
            sender,
            host: addr.to_string(),
            auth: auth.to_owned(),
        })
    }

    /// One call; any status but 2xx is an error carrying the answer.
    async fn send(&mut self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Bytes> {
        self.sender.ready().await?;
        let request = http::Request::builder()
            .method(method.clone())
            .uri(path)
            .header(http::header::HOST, &self.host)
            .header(http::header::AUTHORIZATION, &self.auth)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))?;
        let response = self
            .sender
            .send_request(request)
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        ensure!(
            status.is_success(),
            "{method} {path}: {status} {}",
            String::from_utf8_lossy(&body[..body.len().min(300)])
        );
        Ok(body)
    }
}

/// Waits until `at`; false when the guard aborted the run.
async fn until(at: Instant, aborted: &mut tokio::sync::watch::Receiver<bool>) -> bool {
    if *aborted.borrow() {
        return false;
    }
    tokio::select! {
        _ = tokio::time::sleep_until(at) => !*aborted.borrow(),
        _ = aborted.changed() => false,
    }
}

/// The hubs' memory the run may use: a third of the machine's. A hub that needs more is
/// killed, and the run reports it, rather than the machine's other work being.
fn rss_budget_kib() -> u64 {
    let total = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .unwrap_or(8 * 1024 * 1024);
    total / 3
}

/// One reading of every hub process.
#[derive(Clone)]
struct Sample {
    at: Instant,
    ticks: Vec<u64>,
    rss: Vec<u64>,
    own_ticks: u64,
    /// The bench's PostgreSQL server, all its processes.
    db_ticks: Option<u64>,
}

/// The figures of the measured window, per hub process.
struct Window {
    secs: f64,
    cpu_ticks: Vec<u64>,
    own_ticks: u64,
    db_ticks: Option<u64>,
    end_rss: Vec<u64>,
    peak_rss: Vec<u64>,
}

#[derive(Default)]
struct GuardState {
    window_start: Option<Sample>,
    last: Option<Sample>,
    peak: Vec<u64>,
    reason: Option<String>,
}

/// Reads every hub's CPU and RSS twice a second, and kills them all when together they pass
/// the memory budget: the hubs share this machine with other work.
struct Guard {
    pids: Vec<u32>,
    db_root: Option<u32>,
    state: Arc<std::sync::Mutex<GuardState>>,
    aborted: tokio::sync::watch::Receiver<bool>,
}

fn sample(pids: &[u32], db_root: Option<u32>) -> anyhow::Result<Sample> {
    Ok(Sample {
        db_ticks: db_root.map(tree_ticks),
        at: Instant::now(),
        ticks: pids
            .iter()
            .map(|&p| cpu_ticks(p))
            .collect::<anyhow::Result<_>>()?,
        rss: pids
            .iter()
            .map(|&p| rss_kib(p))
            .collect::<anyhow::Result<_>>()?,
        own_ticks: cpu_ticks_of("/proc/self/stat")?,
    })
}

impl Guard {
    fn start(cluster: &Cluster, db_root: Option<u32>, budget_kib: u64) -> Guard {
        let pids: Vec<u32> = cluster.nodes.iter().map(|n| n.proc.pid).collect();
        let state = Arc::new(std::sync::Mutex::new(GuardState {
            peak: vec![0; pids.len()],
            ..GuardState::default()
        }));
        let (tx, rx) = tokio::sync::watch::channel(false);
        let (watched, shared) = (pids.clone(), state.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tick.tick().await;
                // A hub that exited is reported by the run's own checks.
                let Ok(now) = sample(&watched, db_root) else {
                    return;
                };
                let total: u64 = now.rss.iter().sum();
                let mut state = lock(&shared);
                for (peak, rss) in state.peak.iter_mut().zip(&now.rss) {
                    *peak = (*peak).max(*rss);
                }
                state.last = Some(now);
                if total > budget_kib {
                    for &pid in &watched {
                        if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
                            let _ =
                                rustix::process::kill_process(pid, rustix::process::Signal::KILL);
                        }
                    }
                    state.reason = Some(format!(
                        "the hubs' RSS reached {} (budget {}): hubs killed",
                        bytes_h(total * 1024),
                        bytes_h(budget_kib * 1024)
                    ));
                    eprintln!("fleet: {}", state.reason.as_deref().unwrap_or(""));
                    let _ = tx.send(true);
                    return;
                }
            }
        });
        Guard {
            pids,
            db_root,
            state,
            aborted: rx,
        }
    }

    fn aborted(&self) -> bool {
        *self.aborted.borrow()
    }

    fn mark_window_start(&self) {
        let now = if self.aborted() {
            None
        } else {
            sample(&self.pids, self.db_root).ok()
        };
        lock(&self.state).window_start = now;
    }

    /// The window's figures: read now, or from the last reading before the hubs were killed.
    fn mark_window_end(&self) -> Window {
        let now = if self.aborted() {
            None
        } else {
            sample(&self.pids, self.db_root).ok()
        };
        let mut state = lock(&self.state);
        if let Some(now) = now {
            state.last = Some(now);
        }
        let n = self.pids.len();
        let (Some(start), Some(end)) = (state.window_start.clone(), state.last.clone()) else {
            return Window {
                secs: 0.0,
                cpu_ticks: vec![0; n],
                own_ticks: 0,
                db_ticks: None,
                end_rss: vec![0; n],
                peak_rss: state.peak.clone(),
            };
        };
        let peak_rss = self
            .pids
            .iter()
            .zip(&state.peak)
            .map(|(&pid, &sampled)| vm_kib(pid, "VmHWM:").unwrap_or(0).max(sampled))
            .collect();
        Window {
            secs: end.at.saturating_duration_since(start.at).as_secs_f64(),
            cpu_ticks: end
                .ticks
                .iter()
                .zip(&start.ticks)
                .map(|(e, s)| e.saturating_sub(*s))
                .collect(),
            own_ticks: end.own_ticks.saturating_sub(start.own_ticks),
            db_ticks: end
                .db_ticks
                .zip(start.db_ticks)
                .map(|(e, s)| e.saturating_sub(s)),
            end_rss: end.rss,
            peak_rss,
        }
    }

    fn abort_reason(&self) -> Option<String> {
        lock(&self.state).reason.clone()
    }
}

fn lock(state: &std::sync::Mutex<GuardState>) -> std::sync::MutexGuard<'_, GuardState> {
    state
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---------------------------------------------------------------------------------------------
// Figures

/// Latencies in microseconds, sorted.
struct Series(Vec<u32>);

impl Series {
    fn new(mut v: Vec<u32>) -> Series {
        v.sort_unstable();
        Series(v)
    }

    /// Nearest-rank percentile, in milliseconds.
    fn pct_ms(&self, p: f64) -> f64 {
        let rank = ((p / 100.0) * self.0.len() as f64).ceil() as usize;
        self.0
            .get(rank.saturating_sub(1))
            .map_or(0.0, |&us| f64::from(us) / 1e3)
    }
    fn p50_ms(&self) -> f64 {
        self.pct_ms(50.0)
    }
    fn p99_ms(&self) -> f64 {
        self.pct_ms(99.0)
    }
    fn max_ms(&self) -> f64 {
        self.0.last().map_or(0.0, |&us| f64::from(us) / 1e3)
    }
    fn json(&self) -> Value {
        json!({
            "count": self.0.len(),
            "p50_ms": round3(self.p50_ms()),
            "p99_ms": round3(self.p99_ms()),
            "max_ms": round3(self.max_ms()),
        })
    }
    fn text(&self) -> String {
        if self.0.is_empty() {
            return "no sample".into();
        }
        format!(
            "p50 {:.1} ms, p99 {:.1} ms, max {:.0} ms ({} calls)",
            self.p50_ms(),
            self.p99_ms(),
            self.max_ms(),
            self.0.len()
        )
    }
}

fn round3(x: f64) -> f64 {
    (x * 1e3).round() / 1e3
}

/// The chain-wide change: when its writes started, how long they took, how many boxes were
/// connected then (the boxes it had to reach).
struct Change {
    start: Option<Instant>,
    writes_done: Option<Duration>,
    connected: usize,
}

struct Measured<'a> {
    plan: &'a Plan,
    started_at: chrono::DateTime<chrono::Utc>,
    cluster: &'a Cluster,
    reports: &'a [BoxReport],
    fleet: &'a Fleet,
    setup: Value,
    baseline_connect: Duration,
    base_poll: Series,
    base_push: Series,
    idle_rss: Vec<u64>,
    window: Window,
    change: Change,
    change_error: Option<String>,
    abort_reason: Option<String>,
    db: (u64, u64),
    /// What the database's sessions were doing over the window, sampled.
    waits: Option<pg::Waits>,
    connected_at_start: usize,
}

/// One line of the results table: what, the figure, the target, whether it is met.
struct Row {
    what: String,
    figure: String,
    target: String,
    met: Option<bool>,
}

impl Measured<'_> {
    fn report(&self) -> anyhow::Result<(Value, String)> {
        let plan = self.plan;
        let reports = self.reports;
        let n = plan.boxes;
        let connected = reports.iter().filter(|r| r.connected).count();
        let sustained = reports
            .iter()
            .filter(|r| r.connected && r.errors == 0 && r.alive_at_end)
            .count();
        let with_errors = reports.iter().filter(|r| r.errors > 0).count();
        let total_errors: u64 = reports.iter().map(|r| u64::from(r.errors)).sum();
        let mut first_errors: Vec<String> = Vec::new();
        for e in reports.iter().filter_map(|r| r.first_error.as_deref()) {
            // Messages differ by store name: compare their shape.
            let shape: String = e.chars().filter(|c| !c.is_ascii_digit()).collect();
            if first_errors.len() < 5
                && !first_errors.iter().any(|f| {
                    f.chars()
                        .filter(|c| !c.is_ascii_digit())
                        .collect::<String>()
                        == shape
                })
            {
                first_errors.push(e.to_owned());
            }
        }
        let series = |f: fn(&BoxReport) -> &Vec<u32>| {
            Series::new(reports.iter().flat_map(|r| f(r).iter().copied()).collect())
        };
        let polls = series(|r| &r.polls);
        let change_pulls = series(|r| &r.change_pulls);
        let pushes = series(|r| &r.pushes);
        let fulls = series(|r| &r.fulls);
        let connects = Series::new(
            reports
                .iter()
                .filter(|r| r.connected)
                .map(|r| r.connect_us)
                .collect(),
        );
        let events: u64 = reports.iter().map(|r| r.events).sum();
        let fulls_done = reports.iter().filter(|r| r.full_done).count();
        let full_unexpected: u32 = reports.iter().map(|r| r.full_unexpected).sum();
        let window = self.window.secs.max(1e-3);

        // CPU and memory, per hub process and in total, over the window as measured.
        let clk = rustix::param::clock_ticks_per_second() as f64;
        let names: Vec<&str> = self.cluster.nodes.iter().map(|n| n.name.as_str()).collect();
        let mut nodes = Vec::new();
        let mut cpu_total = 0.0;
        // The memory target holds per replica too: a replica's RSS over the boxes it serves
        // (box i is served by node i mod nodes).
        let mut worst_node_kib_per_box: f64 = 0.0;
        for (i, name) in names.iter().enumerate() {
            let cores = self.window.cpu_ticks[i] as f64 / clk / window;
            cpu_total += cores;
            let served = reports
                .iter()
                .enumerate()
                .filter(|(b, r)| b % names.len() == i && r.connected)
                .count();
            let per_box = if served > 0 {
                self.window.end_rss[i] as f64 / served as f64
            } else {
                0.0
            };
            worst_node_kib_per_box = worst_node_kib_per_box.max(per_box);
            nodes.push(json!({
                "name": name,
                "boxes_connected": served,
                "cpu_cores": round3(cores),
                "rss_idle_kib": self.idle_rss[i],
                "rss_end_kib": self.window.end_rss[i],
                "rss_peak_kib": self.window.peak_rss[i],
                "rss_per_connected_box_kib": round3(per_box),
            }));
        }
        let rss_idle: u64 = self.idle_rss.iter().sum();
        let rss_end: u64 = self.window.end_rss.iter().sum();
        let rss_peak: u64 = self.window.peak_rss.iter().sum();
        let per_k = |x: f64| {
            if connected > 0 {
                x * 1000.0 / connected as f64
            } else {
                0.0
            }
        };
        let rss_per_box_kib = if connected > 0 {
            rss_end as f64 / connected as f64
        } else {
            0.0
        };
        let rss_added_per_box_kib = if connected > 0 {
            rss_end.saturating_sub(rss_idle) as f64 / connected as f64
        } else {
            0.0
        };
        let bench_cores = self.window.own_ticks as f64 / clk / window;
        let db_cores = self.window.db_ticks.map(|t| t as f64 / clk / window);

        // The chain-wide change.
        let change_start_us = self
            .change
            .start
            .map_or(u64::MAX, |s| (s - self.fleet.epoch).as_micros() as u64);
        let mut reached: Vec<f64> = reports
            .iter()
            .filter_map(|r| r.reached_us)
            .map(|us| us.saturating_sub(change_start_us) as f64 / 1e6)
            .collect();
        reached.sort_by(f64::total_cmp);
        // The boxes the change had to reach: those connected when it was written.
        let audience = self.change.connected.max(1);
        let at_share = |share: f64| -> Option<f64> {
            let k = (share * audience as f64).ceil() as usize;
            reached.get(k.saturating_sub(1)).copied()
        };
        let t95 = at_share(0.95);
        let t100 = if self.change.connected > 0 && reached.len() >= self.change.connected {
            reached.last().copied()
        } else {
            None
        };

        // The database.
        let (db_import, db_end) = self.db;
        let per_shop = |b: u64| b / n as u64;

        let base_poll_p50 = self.base_poll.p50_ms();
        let base_push_p50 = self.base_push.p50_ms();
        let rows = vec![
            Row {
                what: format!("Boxes sustained (connected, every call answered, connection open at the end), of {n}"),
                figure: format!(
                    "{sustained} ({connected} connected; {with_errors} with errors, {total_errors} errors in all)"
                ),
                target: "5,000 connected at once".into(),
                met: Some(sustained >= 5_000),
            },
            Row {
                what: "Poll latency: idle delta pull round trip (request sent to answer decoded), periodic pulls in the window".into(),
                figure: format!(
                    "{}; p99 = {:.1}× the idle-hub p50",
                    polls.text(),
                    ratio(polls.p99_ms(), base_poll_p50)
                ),
                target: "p99 ≤ 100 ms".into(),
                met: (!polls.0.is_empty()).then(|| polls.p99_ms() <= 100.0),
            },
            Row {
                what: "Delta pull after the change watch fired (the whole fleet pulls at once)".into(),
                figure: format!(
                    "{}; p99 = {:.1}× the idle-hub poll p50",
                    change_pulls.text(),
                    ratio(change_pulls.p99_ms(), base_poll_p50)
                ),
                target: "(poll target: p99 ≤ 100 ms)".into(),
                met: (!change_pulls.0.is_empty()).then(|| change_pulls.p99_ms() <= 100.0),
            },
            Row {
                what: format!(
                    "Activity acknowledgement: push sent to `ActivityAck`, at {:.0} sales/shop/min",
                    60.0 / plan.sale_every.as_secs_f64()
                ),
                figure: format!(
                    "{}; p99 = {:.1}× the idle-hub p50; {events} events ({:.0}/s)",
                    pushes.text(),
                    ratio(pushes.p99_ms(), base_push_p50),
                    events as f64 / window.max(1.0)
                ),
                target: "p99 ≤ 200 ms".into(),
                met: (!pushes.0.is_empty()).then(|| pushes.p99_ms() <= 200.0),
            },
            Row {
                what: format!(
                    "Chain-wide price change: from {} to the changed record pulled",
                    if plan.per_store {
                        "the first of the per-store admin writes"
                    } else {
                        "the one admin write to the group's record"
                    }
                ),
                figure: format!(
                    "95%: {}; 100%: {}; {} took {}; {} of {} connected boxes reached",
                    t95.map_or("not reached".into(), |t| format!("{t:.1} s")),
                    t100.map_or("not reached".into(), |t| format!("{t:.1} s")),
                    if plan.per_store {
                        format!("the writes to the {n} stores")
                    } else {
                        format!("the write to group `{CHAIN}`")
                    },
                    self.change
                        .writes_done
                        .map_or("(not finished)".into(), |d| format!("{:.3} s", d.as_secs_f64())),
                    reached.len(),
                    self.change.connected
                ),
                target: "95% ≤ 10 s".into(),
                met: Some(t95.is_some_and(|t| t <= 10.0)),
            },
            Row {
                what: "Hub memory per connected box (RSS at the end of the window / boxes connected), all processes".into(),
                figure: format!(
                    "{rss_per_box_kib:.1} KiB ({} in all; {rss_added_per_box_kib:.1} KiB per box above the hubs' RSS before the ramp; peak {} in all)",
                    bytes_h(rss_end * 1024),
                    bytes_h(rss_peak * 1024)
                ),
                target: "≤ 50 KB".into(),
                met: Some(rss_per_box_kib * 1.024 <= 50.0),
            },
            Row {
                what: "Hub memory per connected box, per process (its RSS / the boxes it serves), the worst".into(),
                figure: format!("{worst_node_kib_per_box:.1} KiB (each process below)"),
                target: "≤ 50 KB".into(),
                met: Some(worst_node_kib_per_box * 1.024 <= 50.0),
            },
            Row {
                what: "Hub CPU over the window (utime + stime)".into(),
                figure: format!(
                    "{:.2} cores in all, {:.2} cores per 1,000 boxes (the bench's boxes: {bench_cores:.2} cores{})",
                    cpu_total,
                    per_k(cpu_total),
                    db_cores.map_or(String::new(), |c| format!("; PostgreSQL: {c:.2} cores"))
                ),
                target: "–".into(),
                met: None,
            },
            Row {
                what: "Full sync by reconciliation (each box once, spread over the window)".into(),
                figure: format!(
                    "{}; {fulls_done} done, {full_unexpected} module(s) not answered `Unchanged`",
                    fulls.text()
                ),
                target: "–".into(),
                met: None,
            },
            Row {
                what: "Connection setup (TCP + TLS 1.3 with client certificate + HTTP/2) during the ramp".into(),
                figure: format!(
                    "{}; idle hub: {:.1} ms",
                    connects.text(),
                    self.baseline_connect.as_secs_f64() * 1e3
                ),
                target: "–".into(),
                met: None,
            },
            Row {
                what: format!(
                    "Database size per shop ({})",
                    if self.cluster.database.is_some() {
                        "`pg_database_size` / stores"
                    } else {
                        "the redb data directory / stores"
                    }
                ),
                figure: format!(
                    "{} after the import, {} at the end ({} in all; the catalog {})",
                    bytes_h(per_shop(db_import)),
                    bytes_h(per_shop(db_end)),
                    bytes_h(db_end),
                    if plan.per_store {
                        "kept in every store"
                    } else {
                        "kept once, for the chain"
                    }
                ),
                target: "–".into(),
                met: None,
            },
        ];

        let targets: Vec<Value> = rows
            .iter()
            .map(|r| json!({"what": r.what, "figure": r.figure, "target": r.target, "met": r.met}))
            .collect();
        let machine = machine_info(self.started_at);
        let results = json!({
            "bench": "fleet",
            "quick": plan.quick,
            "aborted": self.abort_reason,
            "machine": machine,
            "parameters": {
                "boxes": n,
                "backend": backend_name(&plan.backend),
                "hub_processes": names.len(),
                "catalog": if plan.per_store { "per store" } else { "shared by group" },
                "max_connections_per_process": self.cluster.max_connections,
                "pool_size_per_replica": self.cluster.database.as_ref().map(|(_, pool)| *pool),
                "products_per_store": plan.products,
                "ramp_s": round3(plan.ramp.as_secs_f64()),
                "settle_s": round3(plan.settle.as_secs_f64()),
                "window_s": plan.measure.as_secs_f64(),
                "window_measured_s": round3(window),
                "change_at_s": round3(plan.measure.as_secs_f64() * plan.change_at),
                "poll_every_s": plan.poll_every.as_secs_f64(),
                "sales_per_shop_per_min": 60.0 / plan.sale_every.as_secs_f64(),
                "concurrent_handshakes": plan.handshakes,
            },
            "setup": self.setup,
            "baseline": {
                "connect_ms": round3(self.baseline_connect.as_secs_f64() * 1e3),
                "poll": self.base_poll.json(),
                "push": self.base_push.json(),
            },
            "boxes": {
                "connected": connected,
                "connected_at_window_start": self.connected_at_start,
                "sustained": sustained,
                "with_errors": with_errors,
                "errors": total_errors,
                "first_errors": first_errors,
            },
            "latency": {
                "poll": polls.json(),
                "poll_p99_over_idle_p50": ratio(polls.p99_ms(), base_poll_p50),
                "change_pull": change_pulls.json(),
                "push": pushes.json(),
                "push_p99_over_idle_p50": ratio(pushes.p99_ms(), base_push_p50),
                "full_sync": fulls.json(),
                "connect": connects.json(),
            },
            "activity": {"events": events, "events_per_s": round3(events as f64 / window.max(1.0))},
            "full_sync": {"done": fulls_done, "not_unchanged_modules": full_unexpected},
            "hub": {
                "processes": nodes,
                "cpu_cores": round3(cpu_total),
                "cpu_cores_per_1000_boxes": round3(per_k(cpu_total)),
                "rss_idle_kib": rss_idle,
                "rss_end_kib": rss_end,
                "rss_peak_kib": rss_peak,
                "rss_per_connected_box_kib": round3(rss_per_box_kib),
                "rss_per_connected_box_worst_process_kib": round3(worst_node_kib_per_box),
                "rss_added_per_connected_box_kib": round3(rss_added_per_box_kib),
                "rss_end_per_1000_boxes_kib": round3(per_k(rss_end as f64)),
            },
            "bench_cpu_cores": round3(bench_cores),
            "postgres_cpu_cores": db_cores.map(round3),
            "postgres_sessions": self.waits.as_ref().map(pg::Waits::json),
            "change": {
                "audience": self.change.connected,
                "reached": reached.len(),
                "writes": if plan.per_store { plan.boxes } else { 1 },
                "writes_s": self.change.writes_done.map(|d| round3(d.as_secs_f64())),
                "error": self.change_error,
                "t95_s": t95.map(round3),
                "t100_s": t100.map(round3),
            },
            "database": {
                "after_import_bytes": db_import,
                "end_bytes": db_end,
                "per_shop_after_import_bytes": per_shop(db_import),
                "per_shop_end_bytes": per_shop(db_end),
            },
            "targets": targets,
        });

        let mut md = String::new();
        let _ = writeln!(
            md,
            "# storebox fleet benchmark{}\n",
            if plan.quick { " (quick run)" } else { "" }
        );
        md.push_str(&crate::common::machine_line(&machine));
        let _ = writeln!(
            md,
            "\n{n} light boxes against {} `storehub serve` process(es) ({} backend{}; \
             `[sync] max_connections = {}` each), the boxes spread over them in turn; {} \
             products in the catalog, {}; a {:.0} s window after a {:.0} s ramp; each box on \
             its own TLS 1.3 + HTTP/2 connection with its own client certificate: change \
             watch, a delta pull every {:.0} s, {:.0} sales/min pushed, one full sync in the \
             window; the chain-wide price change {:.0} s into the window.\n",
            names.len(),
            backend_name(&plan.backend),
            self.cluster
                .database
                .as_ref()
                .map_or(String::new(), |(_, pool)| format!(
                    ", `[database] pool_size = {pool}` per replica"
                )),
            self.cluster.max_connections,
            plan.products,
            if plan.per_store {
                "imported into every store (`--per-store`: the model before shared modules), \
                 the price change written once per store"
                    .to_owned()
            } else {
                format!(
                    "`scope = \"group\"`, imported once into group `{CHAIN}` which every store \
                     joins, the price change one write to the group's record"
                )
            },
            window,
            plan.ramp.as_secs_f64(),
            plan.poll_every.as_secs_f64(),
            60.0 / plan.sale_every.as_secs_f64(),
            plan.measure.as_secs_f64() * plan.change_at,
        );
        if let Some(reason) = &self.abort_reason {
            let _ = writeln!(md, "**Run aborted by the bench's memory guard: {reason}.** The figures are those up to that moment.\n");
        }
        if let Some(e) = &self.change_error {
            let _ = writeln!(md, "The chain-wide change did not complete: {e}.\n");
        }
        md.push_str("| Measure | Figure | Target | Met |\n|---|---|---|---|\n");
        for r in &rows {
            let met = match r.met {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(md, "| {} | {} | {} | {met} |", r.what, r.figure, r.target);
        }
        let _ = writeln!(
            md,
            "\nBaseline (same run, one box alone on the idle hub, one call at a time): \
             handshake {:.1} ms; idle poll {}; single-sale push {}.\n",
            self.baseline_connect.as_secs_f64() * 1e3,
            self.base_poll.text(),
            self.base_push.text()
        );
        md.push_str(
            "Per hub process (CPU over the window; RSS before the ramp, at the end, peak):\n\n",
        );
        md.push_str(
            "| Process | CPU (cores) | RSS idle | RSS end | RSS peak |\n|---|---|---|---|---|\n",
        );
        for node in &nodes {
            let kib = |k: &str| bytes_h(node[k].as_u64().unwrap_or(0) * 1024);
            let _ = writeln!(
                md,
                "| {} | {:.2} | {} | {} | {} |",
                node["name"].as_str().unwrap_or("?"),
                node["cpu_cores"].as_f64().unwrap_or(0.0),
                kib("rss_idle_kib"),
                kib("rss_end_kib"),
                kib("rss_peak_kib"),
            );
        }
        if let Some(waits) = &self.waits {
            md.push_str(&waits.markdown());
        }
        if !first_errors.is_empty() {
            md.push_str("\nFirst errors seen (one of each kind):\n\n");
            for e in &first_errors {
                let _ = writeln!(md, "- `{}`", e.replace('`', "'"));
            }
        }
        let mut args = String::new();
        if plan.quick {
            args.push_str(" --quick");
        }
        if let Backend::Postgres { replicas, .. } = &plan.backend {
            args.push_str(" --backend postgres");
            if *replicas != 2 {
                let _ = write!(args, " --replicas {replicas}");
            }
        }
        if plan.per_store {
            args.push_str(" --per-store");
        }
        let _ = writeln!(
            md,
            "\nSetup: hubs started in {:.1} s, stores filled in {:.1} s{}, boxes enrolled in \
             {:.1} s{}.{} The hubs, {}the bench's boxes and this report share the machine's \
             CPUs. Details: `{}.json`. Reproduce: `cargo build --release --workspace --bins \
             && cargo run --release -p storebox-bench -- fleet{args}`.",
            self.setup["hub_start_s"].as_f64().unwrap_or(0.0),
            self.setup["import_s"].as_f64().unwrap_or(0.0),
            self.setup["group_catalog_import_s"]
                .as_f64()
                .map_or(String::new(), |t| format!(
                    " (the chain's catalog, one import, in {t:.2} s; the other modules per store)"
                )),
            self.setup["enroll_s"].as_f64().unwrap_or(0.0),
            if names.len() > 1 {
                format!(
                    ", {ENROLL_WORKERS} at once through `replica-1` (every replica started \
                     before the first, the boxes then spread over them); {} enrollment(s) lost \
                     a race for the PKI state (HTTP 500, \"changed on another replica at the \
                     same moment; try again\" in the hub's log) and were retried",
                    self.setup["enroll_retries"]
                )
            } else {
                String::new()
            },
            match self.setup["bench_postgres"].as_object() {
                Some(pg) => format!(
                    " PostgreSQL: the bench's own throwaway server ({}, on 127.0.0.1), started \
                     with {}: **durability is off**, so its write costs are below a production \
                     server's.",
                    pg.get("version").and_then(Value::as_str).unwrap_or("?"),
                    pg.get("settings").and_then(Value::as_str).unwrap_or("?"),
                ),
                None if self.cluster.database.is_some() => {
                    " PostgreSQL: the server given by `--database-url`.".to_owned()
                }
                None => String::new(),
            },
            if self.cluster.database.is_some() {
                "PostgreSQL, "
            } else {
                ""
            },
            plan.results_name(),
        );
        Ok((results, md))
    }
}
