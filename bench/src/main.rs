//! `bench`: storebox measured on real `storehub` and `storebox` processes talking over
//! 127.0.0.1, each figure next to a baseline measured in the same run on the same machine, so
//! that the ratio, not the absolute figure, is what carries across machines.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p storebox-bench -- [core] [--quick]    # the default
//! cargo run --release -p storebox-bench -- storage [--quick]
//! cargo run --release -p storebox-bench -- link [--quick]       # as root
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
//!
//! Every child process is killed when the run ends, fails, panics or is interrupted.

mod bandwidth;
mod common;
mod core_bench;
mod link;
#[path = "../../tests/support/linkemu.rs"]
mod linkemu;
mod storage;

use anyhow::bail;

use crate::common::{kill_all_children, RUN_DIR};

const USAGE: &str = "usage: bench [core|storage|bandwidth|link] [--quick]

  core      the core figures (default): sync on the wire, activity, lookups, footprint
  bandwidth bytes on the shop's link per scenario, through a counting relay (~2 min)
  storage   flash writes, durable ingest against SQLite, lookups against nginx, idle memory
  link      payment terminals while the box syncs on emulated shop lines, controller on/off/
            capped (as root; ~20 min, --quick ~6 min); `4/1` or `20/2` for one line only
  --quick   shorter runs (core ~40 s, storage ~1 min)

Build first: cargo build --release --workspace --bins
Then: cargo run --release -p storebox-bench -- [core|storage|bandwidth|link] [--quick]";

enum Which {
    Core,
    Storage,
    Bandwidth,
    Link,
}

fn main() -> anyhow::Result<()> {
    let mut quick = false;
    let mut which = Which::Core;
    let mut lines = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--quick" => quick = true,
            "core" => which = Which::Core,
            "storage" => which = Which::Storage,
            "bandwidth" => which = Which::Bandwidth,
            "link" => which = Which::Link,
            "4/1" | "20/2" => lines.push(arg.clone()),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            other => bail!("unknown argument {other:?} (try --help)"),
        }
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
