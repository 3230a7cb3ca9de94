//! `storesim`: writes a generated store or a day's changes as JSON Lines
//! files, or runs simulated tills against a storebox.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{ensure, Context};
use clap::{Parser, Subcommand};
use storebox_sim::{day_changes, generate_store, tills, to_ndjson, MODULES};

#[derive(Parser)]
#[command(
    name = "storesim",
    version,
    about = "Generates a realistic store and its daily changes, and simulates tills."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Writes OUT/{config,catalog,customers,promotions}.ndjson.
    Generate {
        /// Directory to write to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// The store to generate.
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Writes a day's changes: OUT/{module}.ndjson with the upserted records
    /// of each module that has some, and OUT/{module}.deletes with one
    /// deleted id per line.
    Day {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Day number; day 0 is the store's reference date.
        #[arg(long, default_value_t = 1)]
        day: u32,
    },
    /// Runs simulated tills against a box's till API.
    Tills {
        /// Base URL of the box, e.g. https://127.0.0.1:8080.
        #[arg(long = "box", value_name = "URL")]
        box_url: String,
        /// SHA-256 fingerprint of the box's LAN certificate (https boxes).
        #[arg(long, value_name = "HEX")]
        fingerprint: Option<String>,
        /// The paired till token (from `storebox pair`), sent as a bearer token.
        #[arg(long, env = "STORESIM_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Number of tills, each with its own keep-alive connection.
        #[arg(long)]
        tills: u32,
        /// Seconds to run; 0 runs until Ctrl-C.
        #[arg(long, value_name = "SECS", default_value_t = 0)]
        duration: u64,
        /// Sales per second per till; 0 means as fast as the box answers.
        #[arg(long, value_name = "SALES_PER_SEC_PER_TILL", default_value_t = 1.0)]
        rate: f64,
        /// The store whose EANs and loyalty cards the tills use (the box
        /// should hold the same store).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Seconds between progress reports.
        #[arg(long, value_name = "SECS", default_value_t = 5)]
        report_every: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storesim: error: {e}");
            for cause in e.chain().skip(1) {
                eprintln!("  caused by: {cause}");
            }
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Generate { out, seed } => generate(&out, seed),
        Command::Day { out, seed, day } => day_files(&out, seed, day),
        Command::Tills {
            box_url,
            fingerprint,
            token,
            tills,
            duration,
            rate,
            seed,
            report_every,
        } => {
            ensure!(report_every > 0, "--report-every must be at least 1 second");
            let opts = tills::TillsOptions {
                base_url: box_url,
                tills,
                duration: (duration > 0).then(|| Duration::from_secs(duration)),
                rate,
                seed,
                report_every: Some(Duration::from_secs(report_every)),
                fingerprint,
                token,
            };
            run_tills(opts)
        }
    }
}

fn write(dir: &Path, name: &str, contents: &str) -> anyhow::Result<()> {
    let path = dir.join(name);
    std::fs::write(&path, contents).with_context(|| format!("writing {}", path.display()))?;
    println!("{:>10} bytes  {}", contents.len(), path.display());
    Ok(())
}

fn generate(out: &Path, seed: u64) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let store = generate_store(seed);
    for module in MODULES {
        let records = store.modules.get(module).map(Vec::as_slice).unwrap_or(&[]);
        write(out, &format!("{module}.ndjson"), &to_ndjson(records))?;
    }
    Ok(())
}

fn day_files(out: &Path, seed: u64, day: u32) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let changes = day_changes(&generate_store(seed), seed, day);
    for (module, records) in changes.upserts.iter().filter(|(_, r)| !r.is_empty()) {
        write(out, &format!("{module}.ndjson"), &to_ndjson(records))?;
    }
    for (module, ids) in changes.deletes.iter().filter(|(_, ids)| !ids.is_empty()) {
        let text: String = ids.iter().map(|id| format!("{id}\n")).collect();
        write(out, &format!("{module}.deletes"), &text)?;
    }
    Ok(())
}

fn run_tills(opts: tills::TillsOptions) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        println!(
            "storesim: {} till(s) against {} at {} sale(s)/s each{}",
            opts.tills,
            opts.base_url,
            opts.rate,
            opts.duration.map_or_else(
                || ", until Ctrl-C".to_owned(),
                |d| format!(" for {}s", d.as_secs())
            ),
        );
        let ctrl_c = async {
            if let Err(e) = tokio::signal::ctrl_c().await {
                // Without a signal handler, only --duration ends the run.
                eprintln!("storesim: cannot listen for Ctrl-C: {e}");
                std::future::pending::<()>().await;
            }
        };
        let reports = tills::run(opts, ctrl_c).await?;
        tills::print_reports("at the end", &reports);
        Ok(())
    })
}
