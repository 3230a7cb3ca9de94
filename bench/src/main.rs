//! `bench`: storebox measured on real `storehub` and `storebox` processes talking over
//! 127.0.0.1, each figure next to a baseline measured in the same run on the same machine, so
//! that the ratio, not the absolute figure, is what carries across machines.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p storebox-bench -- [core] [--quick]    # the default
//! cargo run --release -p storebox-bench -- storage [--quick]
//! cargo run --release -p storebox-bench -- link [--quick]       # as root
//! cargo run --release -p storebox-bench -- fleet [--boxes N] [--quick] [--backend postgres]
//! ```
//!
//! - `core` ([`core_bench`]): cold full sync and delta on the wire, durable activity against a naive
//!   `fdatasync` loop, lookup latency against the router's 404, footprint. Results in
//!   `bench/results/core.{json,md}`.
//! - `bandwidth` ([`bandwidth`]): bytes on the shop's link per scenario, counted by a relay,
//!   against the seed's volumes and zstd -19. Results in `bench/results/bandwidth.{json,md}`.
//! - `storage` ([`storage`]): what the box costs the flash and how it holds up under tills,
//!   against SQLite (durable ingest) and nginx (static lookups). Results in
//!   `bench/results/storage.{json,md}`.
//! - `link` ([`link`]): payment terminals' round trips while the box syncs over emulated
//!   shop lines (network namespaces, tbf, a delay relay), with the link-sharing controller
//!   on, off, and fixed caps instead. Needs root. Results in `bench/results/link.{json,md}`.
//! - `fleet` ([`fleet`]): the hub under thousands of light boxes in this process (watch,
//!   delta pulls, activity push, full sync, a chain-wide price change), against the targets
//!   and an idle-hub baseline. Results in `bench/results/fleet.{json,md}`.
//!
//! Every child process is killed when the run ends, fails, panics or is interrupted.

mod bandwidth;
mod common;
mod core_bench;
mod fleet;
mod link;
#[path = "../../tests/support/linkemu.rs"]
mod linkemu;
mod storage;

use anyhow::{bail, Context};

use crate::common::{kill_all_children, RUN_DIR};

const USAGE: &str = "usage: bench [core|storage|bandwidth|link|fleet] [--quick] [fleet options]

  core      the core figures (default): sync on the wire, activity, lookups, footprint
  bandwidth bytes on the shop's link per scenario, through a counting relay (~2 min)
  storage   flash writes, durable ingest against SQLite, lookups against nginx, idle memory
  link      payment terminals while the box syncs on emulated shop lines, controller on/off/
            capped (as root; ~20 min, --quick ~6 min); `4/1` or `20/2` for one line only
  fleet     the hub under N light boxes: latencies, CPU, memory, a chain-wide change
            (5,000 boxes: 10 to 20 min, of which ~9 min enrolling them on PostgreSQL;
            --quick: 200 boxes, about a minute)
  --quick   shorter runs (core ~40 s, storage ~1 min, fleet <1 min)

fleet options:
  --boxes N               boxes (and stores); default 5000, 200 with --quick
  --products N            catalog products per store; default 2000, 500 with --quick
  --measure SECS          the measured window; default 180, 20 with --quick
  --backend embedded      redb, one hub process (default)
  --backend postgres [--database-url URL]
                          replicas on one PostgreSQL database: a fresh, empty one at URL,
                          or without it a throwaway server the bench starts on 127.0.0.1
                          (initdb; as the postgres user when root; fsync off)
  --replicas N            replicas with --backend postgres; default 2
  --per-store             the catalog kept per store and the price change written once per
                          store (the model before shared modules), instead of one catalog
                          shared by the chain's group and one write

Build first: cargo build --release --workspace --bins
Then: cargo run --release -p storebox-bench -- [core|storage|bandwidth|link|fleet] [--quick]";

enum Which {
    Core,
    Storage,
    Bandwidth,
    Link,
    Fleet,
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut which = Which::Core;
    let mut lines = Vec::new();
    let (mut boxes, mut products, mut measure) = (None, None, None);
    let (mut backend, mut database_url) = (None::<String>, None::<String>);
    let (mut replicas, mut per_store) = (None::<usize>, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .with_context(|| format!("{name} needs a value (try --help)"))
        };
        let number = |name: &str, text: String| -> anyhow::Result<u64> {
            text.parse()
                .with_context(|| format!("{name} {text:?} is not a whole number"))
        };
        match arg.as_str() {
            "--quick" => quick = true,
            "core" => which = Which::Core,
            "storage" => which = Which::Storage,
            "bandwidth" => which = Which::Bandwidth,
            "link" => which = Which::Link,
            "fleet" => which = Which::Fleet,
            "4/1" | "20/2" => lines.push(arg.clone()),
            "--boxes" => boxes = Some(number("--boxes", value("--boxes")?)? as usize),
            "--products" => products = Some(number("--products", value("--products")?)? as usize),
            "--measure" => measure = Some(number("--measure", value("--measure")?)?),
            "--backend" => backend = Some(value("--backend")?),
            "--database-url" => database_url = Some(value("--database-url")?),
            "--replicas" => replicas = Some(number("--replicas", value("--replicas")?)? as usize),
            "--per-store" => per_store = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
    }
    let backend = match (backend.as_deref(), database_url) {
        (None | Some("embedded"), None) => fleet::Backend::Embedded,
        (Some("postgres"), url) => fleet::Backend::Postgres {
            url,
            replicas: replicas.unwrap_or(2).max(1),
        },
        (None | Some("embedded"), Some(_)) => {
            bail!("--database-url goes with --backend postgres")
        }
        (Some(other), _) => bail!("unknown backend {other:?}: embedded or postgres"),
    };
    if replicas.is_some() && matches!(backend, fleet::Backend::Embedded) {
        bail!("--replicas goes with --backend postgres: the embedded database is one process's");
    }
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
        let run = async {
            match which {
                Which::Core => core_bench::run(&core_bench::Plan::new(quick)).await,
                Which::Storage => storage::run(&storage::Plan::new(quick)).await,
                Which::Bandwidth => bandwidth::run().await,
                Which::Link => link::run(&link::Plan::new(quick), &lines).await,
                Which::Fleet => {
                    let plan =
                        fleet::Plan::new(quick, boxes, backend, products, measure, per_store);
                    fleet::run(&plan).await
                }
            }
        };
        // Returning from here drops the run's future, and with it every process guard.
        tokio::select! {
            result = run => result,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    });
    // By now every process guard has dropped: exiting cannot leave a daemon behind. Exiting
    // here also abandons any load thread still blocked on a connection to a killed child.
    if let Err(e) = result {
        eprintln!("bench failed: {e:#}");
        std::process::exit(1);
    }
    Ok(())
}
