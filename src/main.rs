//! `storebox`: the in-store appliance daemon and its command-line tools.
//!
//! `serve` runs the daemon; `status` and `sync` talk to a running daemon over its LAN API on
//! this machine, the way a field technician would. `discover` lists the boxes on the LAN.

mod activity;
mod config;
mod discovery;
mod enroll;
mod identity;
mod journal;
mod lan;
mod metrics;
mod migrate;
mod ota;
mod ota_cli;
mod pairing;
mod status;
mod statuspage;
mod storage;
mod sync;
mod watchdog;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::config::BoxConfig;

#[derive(Parser)]
#[command(
    name = "storebox",
    version,
    about = "The in-store appliance: serves tills, syncs with storehub"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where the config is read from when `--config` is not given.
const DEFAULT_CONFIG: &str = "/etc/storebox/storebox.toml";

#[derive(Subcommand)]
enum Command {
    /// Run the daemon: the till API on the LAN and the three sync processes.
    Serve {
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the sync state of the running daemon as a table.
    Status {
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Print the raw JSON document instead.
        #[arg(long)]
        json: bool,
    },
    /// Run a sync now on the running daemon, wait for it and print the outcome.
    Sync {
        kind: SyncKind,
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Find the boxes on this machine's LANs (mDNS and the UDP broadcast probe), one line each.
    Discover {
        /// How long to listen for answers, in seconds.
        #[arg(long, value_name = "SECS", default_value_t = 3.0)]
        timeout: f64,
        /// The UDP port boxes answer the probe on (their `[discovery] udp_port`).
        #[arg(long, default_value_t = discovery::DEFAULT_UDP_PORT)]
        udp_port: u16,
    },
    /// Enroll this box with the hub: generate the device key (kept on the box) and get a
    /// first client certificate with a one-time token from `storehub enroll-token`.
    Enroll {
        #[arg(long)]
        token: String,
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Tills on the LAN: with no option, list paired tills and pending pairing codes;
    /// `--confirm CODE` pairs the till showing that code; `--name N --approve` pairs at once
    /// and prints the token (provisioning; `--technician` for a technician credential);
    /// `--unpair ID|NAME` removes a till.
    Pair {
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, value_name = "CODE", conflicts_with_all = ["name", "unpair"])]
        confirm: Option<String>,
        #[arg(long, requires = "approve")]
        name: Option<String>,
        #[arg(long, requires = "name")]
        approve: bool,
        #[arg(long, requires = "approve")]
        technician: bool,
        #[arg(long, value_name = "ID|NAME", conflicts_with = "name")]
        unpair: Option<String>,
    },
    /// Bring the local database to the schema this binary knows, before `serve` (run by
    /// storebox-migrate.service); refuses data written by a newer release.
    Migrate {
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Firmware updates: install a signed bundle (technician), follow an update, and the
    /// steps the image's units run as root.
    Ota {
        #[command(subcommand)]
        action: OtaAction,
    },
    /// Work with the configuration without starting the daemon.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
}

#[derive(Subcommand)]
enum ConfigAction {
    /// Read the config and its drop-ins, check every value and the files it names, and print
    /// the result; exits non-zero with the reason when something is wrong.
    Check {
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum OtaAction {
    /// Send a bundle (a file, or an http:// URL) to the daemon, have it installed into the
    /// other slot, and follow until the box reboots into it or refuses it.
    Install {
        bundle: String,
        /// Install even when the bundle is not newer than the running version.
        #[arg(long)]
        force_downgrade: bool,
        /// Return once the install is queued.
        #[arg(long)]
        no_wait: bool,
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Show the update state.
    Status {
        #[arg(long)]
        json: bool,
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check and install a queued bundle, then reboot (storebox-ota-apply.service, as root).
    Apply {
        /// Install only; do not reboot.
        #[arg(long)]
        no_reboot: bool,
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Wait for the daemon to be healthy, then mark the booted slot good
    /// (storebox-mark-good.service, as root).
    MarkGood {
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Check a bundle without installing it: signature, compatible, version.
    Check {
        bundle: PathBuf,
        #[arg(long)]
        force_downgrade: bool,
        #[arg(long, env = "STOREBOX_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum SyncKind {
    Full,
    Delta,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("storebox: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr, which systemd hands to journald: no colours, and no timestamps when
/// journald adds its own (`JOURNAL_STREAM` is set). No log file is written on flash. The
/// level comes from `RUST_LOG` (or `STOREBOX_LOG`), else from `[log] level` in the config.
fn init_logging(cli: &Cli) {
    let from_env = ["RUST_LOG", "STOREBOX_LOG"]
        .iter()
        .find_map(|name| std::env::var(name).ok());
    let from_config = || {
        let path = match &cli.command {
            Command::Serve { config } => config,
            _ => return None,
        };
        BoxConfig::load(path).ok().map(|c| c.log.level)
    };
    let level = from_env
        .or_else(from_config)
        .and_then(|l| l.trim().parse::<tracing::Level>().ok())
        .unwrap_or(tracing::Level::INFO);
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_ansi(false);
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        builder.without_time().init();
    } else {
        builder.init();
    }
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Serve { config } => {
            let config = BoxConfig::load(&config)?;
            runtime.block_on(serve(config))?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Status { config, json } => {
            let config = BoxConfig::load(&config)?;
            let doc = runtime.block_on(daemon_call(&config, http::Method::GET, "/v1/status"))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                print!("{}", render_status(&doc));
            }
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Config {
            action: ConfigAction::Check { config: path },
        } => {
            let config = BoxConfig::load(&path)?;
            // The hub link reads the CA and the credential: build it to check them.
            sync::link::HubTarget::new(
                &config.hub.url,
                &config.hub.ca_file,
                &config.credential()?,
                config.hub_timeout()?,
            )?;
            println!(
                "{}: OK\n  store {}, data in {}\n  hub {} (CA {})\n  tills on {}\n  full sync at {}, delta pull {}, push {}",
                path.display(),
                config.store_id,
                config.data_dir.display(),
                config.hub.url,
                config.hub.ca_file.display(),
                config.lan.listen,
                match config.full_sync_times()? {
                    sync::plan::FullSyncAt::Hub => "the hub's slot".to_owned(),
                    sync::plan::FullSyncAt::Local(_) => config
                        .sync
                        .full_sync_at
                        .clone()
                        .unwrap_or_default()
                        .join(", "),
                },
                config.sync.delta_interval,
                if config.sync.push { "on" } else { "off" },
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Enroll { token, config } => {
            let config = BoxConfig::load(&config)?;
            let identity = Arc::new(identity::Identity::open(&config.data_dir)?);
            identity::install(identity.clone());
            let pki =
                enroll::HubPki::new(&config.hub.url, &config.hub.ca_file, config.hub_timeout()?)?;
            let dates = runtime
                .block_on(pki.enroll(&identity, &config.store_id, token.trim()))
                .context("enrolling with the hub")?;
            println!(
                "enrolled store {}: client certificate valid until {} (renewed automatically by the daemon)",
                config.store_id,
                chrono::DateTime::from_timestamp_millis(dates.not_after_ms)
                    .map(|t| t.to_rfc3339())
                    .unwrap_or_default()
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Pair {
            config,
            confirm,
            name,
            approve: _,
            technician,
            unpair,
        } => {
            let config = BoxConfig::load(&config)?;
            pair_command(&config, confirm, name, technician, unpair)?;
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Migrate { config } => {
            let config = BoxConfig::load(&config)?;
            let outcome = migrate::run(&config.data_dir, config.storage.cache_mib)?;
            println!(
                "{}: schema {} ({outcome:?})",
                config.data_dir.join(storage::BoxStore::FILE_NAME).display(),
                migrate::SCHEMA_VERSION
            );
            Ok(std::process::ExitCode::SUCCESS)
        }
        Command::Ota { action } => ota_command(&runtime, action),
        Command::Discover { timeout, udp_port } => {
            runtime.block_on(discovery::discover_command(timeout, udp_port))
        }
        Command::Sync { kind, config } => {
            let config = BoxConfig::load(&config)?;
            let path = match kind {
                SyncKind::Full => "/v1/sync/full",
                SyncKind::Delta => "/v1/sync/delta",
            };
            let report = runtime.block_on(daemon_call(&config, http::Method::POST, path))?;
            print!("{}", render_report(&report));
            Ok(if report["ok"].as_bool() == Some(true) {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            })
        }
    }
}

fn ota_command(
    runtime: &tokio::runtime::Runtime,
    action: OtaAction,
) -> anyhow::Result<std::process::ExitCode> {
    match action {
        OtaAction::Install {
            bundle,
            force_downgrade,
            no_wait,
            config,
        } => {
            let config = BoxConfig::load(&config)?;
            runtime.block_on(ota_cli::install(&config, &bundle, force_downgrade, no_wait))?;
        }
        OtaAction::Status { json, config } => {
            let config = BoxConfig::load(&config)?;
            runtime.block_on(ota_cli::status(&config, json))?;
        }
        OtaAction::Apply { no_reboot, config } => {
            let config = BoxConfig::load(&config)?;
            ota::apply(&config, !no_reboot)?;
        }
        OtaAction::MarkGood { config } => ota::mark_good(&config)?,
        OtaAction::Check {
            bundle,
            force_downgrade,
            config,
        } => {
            let config = BoxConfig::load(&config)?;
            let settings = config.ota_settings()?;
            let image = ota::Image::read(&settings);
            let info = ota::check_bundle(&settings, &image, &bundle, None, force_downgrade)?;
            println!(
                "{}: signed, version {} for {}: installable on this box",
                bundle.display(),
                info.version,
                info.compatible
            );
        }
    }
    Ok(std::process::ExitCode::SUCCESS)
}

/// How long a stopping daemon lets in-flight till requests finish (systemd's
/// `TimeoutStopSec=` leaves room for this and the journal close after it).
const DRAIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

async fn serve(config: BoxConfig) -> anyhow::Result<()> {
    let store = Arc::new(storage::BoxStore::open(
        &config.data_dir,
        config.storage.cache_mib,
    )?);
    migrate::check(&store, &config.data_dir)?;
    // The box's identity first: every hub connection presents its current certificate.
    let identity = Arc::new(identity::Identity::open(&config.data_dir)?);
    identity::install(identity.clone());
    let enrolling = identity.certificate().is_none() && config.hub.enroll_token.is_some();
    let pki = enroll::HubPki::new(&config.hub.url, &config.hub.ca_file, config.hub_timeout()?)?;
    tokio::spawn(enroll::maintain(
        identity.clone(),
        pki,
        config.store_id.clone(),
        config.hub.enroll_token.clone(),
    ));
    let target = Arc::new(sync::link::HubTarget::new(
        &config.hub.url,
        &config.hub.ca_file,
        &config.credential()?,
        config.hub_timeout()?,
    )?);
    let settings = sync::SyncSettings {
        full_sync_at: config.full_sync_times()?,
        delta_interval: config.delta_interval()?,
        push: config.sync.push,
        push_batch: config.sync.push_batch,
        notify: config.sync.notify,
        link: config.link_settings()?,
    };
    let activity = Arc::new(activity::Activity::open(
        &config.data_dir,
        store.clone(),
        config.storage.activity_batch_max,
        config.activity_batch_window()?,
    )?);
    let live = Arc::new(status::LiveStatus::default());
    let engine = sync::SyncEngine::new(store.clone(), activity.clone(), live, target, settings);
    let listener = tokio::net::TcpListener::bind(config.lan.listen)
        .await
        .with_context(|| format!("listening for tills on {}", config.lan.listen))?;
    let pairing = Arc::new(pairing::Pairing::open(&config.data_dir)?);
    let (lan_tls, fingerprint) = if config.lan.tls {
        let (acceptor, fingerprint) = pairing::lan_tls(&config.data_dir, listener.local_addr()?)?;
        (Some(acceptor), Some(fingerprint))
    } else {
        tracing::warn!("[lan] tls = false: the till API is plain HTTP on the LAN");
        (None, None)
    };
    tracing::info!(
        "storebox {} for store {} serving tills on {}://{}{}",
        env!("CARGO_PKG_VERSION"),
        config.store_id,
        if lan_tls.is_some() { "https" } else { "http" },
        listener.local_addr()?,
        fingerprint
            .as_deref()
            .map(|f| format!(" (certificate SHA-256 {f})"))
            .unwrap_or_default()
    );
    // On tasks of its own, failures only logged: never in the way of serving tills. The
    // certificate fingerprint is published for tills to pin.
    discovery::start(&config, listener.local_addr()?, fingerprint.clone());
    let probe_tls = match &fingerprint {
        Some(f) => Some(
            storebox_http::pinned::pinned_client_config(f)
                .map_err(|e| anyhow::anyhow!("the LAN certificate fingerprint: {e}"))?,
        ),
        None => None,
    };
    let watched = watchdog::Watched {
        lan: local_addr(listener.local_addr()?),
        lan_tls: probe_tls,
        store: store.clone(),
        activity: activity.clone(),
        engine: engine.clone(),
        hub_timeout: config.hub_timeout()?,
        push: config.sync.push,
    };
    let ota = ota::OtaTask::new(config.ota_settings()?, &config.data_dir, engine.clone());
    tokio::spawn(ota.clone().run());
    let state = Arc::new(lan::LanState {
        store_id: config.store_id.clone(),
        store,
        activity: activity.clone(),
        sync: engine.clone(),
        max_activity_bytes: config.lan.max_activity_bytes,
        started: std::time::Instant::now(),
        pairing,
        fingerprint,
        ota,
        started_ms: chrono::Utc::now().timestamp_millis(),
        activity_in_flight: Default::default(),
        last_activity_ms: Default::default(),
        closing_until_ms: Default::default(),
    });
    if enrolling {
        // A first start enrolls before the first sync, so that sync does not fail for want
        // of a certificate; a hub out of reach delays it at most a few seconds.
        let engine = engine.clone();
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
            while identity.certificate().is_none() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            engine.start();
        });
    } else {
        engine.start();
    }
    let (drain, draining) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(storebox_http::serve_until(
        listener,
        lan_tls,
        state,
        lan::handle,
        async move {
            let _ = draining.await;
        },
    ));
    tokio::spawn(save_mark_loop(activity.clone()));
    // READY=1 once healthy, then the watchdog pings (under systemd only).
    let mut watchdog = watchdog::Watchdog::start(watched);
    shutdown_signal().await;
    tracing::info!("storebox stopping");
    watchdog.stopping();
    let _ = drain.send(());
    if tokio::time::timeout(DRAIN_TIMEOUT, server).await.is_err() {
        tracing::warn!(
            "till requests still running after {} s; stopping without them",
            DRAIN_TIMEOUT.as_secs()
        );
    }
    tokio::task::spawn_blocking(move || activity.close())
        .await
        .context("closing the activity journal")?;
    Ok(())
}

/// Saves the activity push mark once a minute, so a restart re-pushes at most a minute of
/// events (which the hub drops as duplicates).
async fn save_mark_loop(activity: Arc<activity::Activity>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(60));
    loop {
        tick.tick().await;
        let activity = activity.clone();
        match tokio::task::spawn_blocking(move || activity.save_mark()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("{e:#}"),
            Err(e) => tracing::warn!("saving the push mark: {e}"),
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Where a tool on this machine reaches the daemon: its LAN address, with a wildcard
/// listen address replaced by loopback.
fn local_addr(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(v6) if v6.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

async fn daemon_call(
    config: &BoxConfig,
    method: http::Method,
    path: &str,
) -> anyhow::Result<serde_json::Value> {
    let addr = local_addr(config.lan.listen);
    // On the box, the command line may do what a technician may: it makes itself a
    // technician token in the pairing state it can read.
    let token = pairing::Pairing::open(&config.data_dir)?
        .local_token()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let auth = format!("Bearer {token}");
    let tls = if config.lan.tls {
        let fingerprint = pairing::lan_fingerprint(&config.data_dir)?;
        Some(
            storebox_http::pinned::pinned_client_config(&fingerprint)
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    } else {
        None
    };
    let (status, body) = storebox_http::call_over(
        addr,
        tls.as_ref(),
        method,
        path,
        &[("authorization", auth.as_str())],
        bytes::Bytes::new(),
    )
    .await
    .with_context(|| {
        format!("asking the storebox daemon at {addr} (is `storebox serve` running?)")
    })?;
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("the daemon answered {status} with a body that is not JSON"))?;
    anyhow::ensure!(status.is_success(), "the daemon answered {status}: {doc}");
    Ok(doc)
}

/// `storebox pair`: works on the pairing state directly (the daemon sees changes at its next
/// request), so it also serves provisioning before the daemon first starts.
fn pair_command(
    config: &BoxConfig,
    confirm: Option<String>,
    name: Option<String>,
    technician: bool,
    unpair: Option<String>,
) -> anyhow::Result<()> {
    let pairing = pairing::Pairing::open(&config.data_dir)?;
    let fail = |e: pairing::PairingError| anyhow::anyhow!("{e}");
    if let Some(code) = confirm {
        let till = pairing.confirm(&code).map_err(fail)?;
        println!(
            "paired till {:?} (id {}); it receives its token at its next poll",
            till.name, till.id
        );
    } else if let Some(name) = name {
        pairing::check_cli_name(&name)?;
        let role = if technician {
            pairing::Role::Technician
        } else {
            pairing::Role::Till
        };
        let (till, token) = pairing.pair_now(&name, role).map_err(fail)?;
        eprintln!("paired {:?} as {role:?} (id {})", till.name, till.id);
        println!("{token}");
    } else if let Some(who) = unpair {
        let n = pairing.unpair(&who).map_err(fail)?;
        println!("unpaired {n} till(s) {who:?}");
    } else {
        let (tills, pending) = pairing.list()?;
        if let Ok(fp) = pairing::lan_fingerprint(&config.data_dir) {
            println!("LAN certificate SHA-256: {fp}");
        }
        println!("pending pairing requests (confirm with --confirm CODE):");
        for p in &pending {
            println!("  code {}  {}", p.code, p.name);
        }
        println!("paired:");
        for t in &tills {
            println!(
                "  {}  {:<11} {}",
                t.id,
                format!("{:?}", t.role).to_lowercase(),
                t.name
            );
        }
    }
    Ok(())
}

fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Null => "-".into(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The status document as a table for a technician's terminal.
fn render_status(doc: &serde_json::Value) -> String {
    let mut out = format!(
        "store {}  version {}  hub link {} (last ok {}){}\n\n",
        text(&doc["store_id"]),
        text(&doc["version"]),
        text(&doc["hub"]["state"]),
        text(&doc["hub"]["last_ok"]),
        match &doc["hub"]["last_error"] {
            serde_json::Value::Null => String::new(),
            e => format!("\n  last hub error: {}", text(e)),
        }
    );
    out += &format!(
        "{:<12} {:>8} {:>8} {:>6} {:<21} {:<21} {:>8}  {}\n",
        "MODULE", "RECORDS", "CURSOR", "QUAR", "LAST DELTA", "LAST FULL", "AGE (s)", "ERROR"
    );
    if let Some(modules) = doc["modules"].as_object() {
        for (name, m) in modules {
            out += &format!(
                "{:<12} {:>8} {:>8} {:>6} {:<21} {:<21} {:>8}  {}\n",
                name,
                text(&m["records"]),
                text(&m["cursor"]),
                text(&m["quarantined"]),
                text(&m["last_delta_ok"]),
                text(&m["last_full_ok"]),
                text(&m["data_age_s"]),
                text(&m["last_error"]),
            );
        }
    }
    out += &format!(
        "\nactivity: {} pending, {} pushed, oldest pending {} s\n",
        text(&doc["activity"]["pending"]),
        text(&doc["activity"]["pushed"]),
        text(&doc["activity"]["oldest_pending_age_s"]),
    );
    if let Some(bytes) = doc["bytes"].as_object() {
        out += "hub bytes:";
        for (process, b) in bytes {
            out += &format!(
                "  {process} {} sent / {} received;",
                text(&b["sent"]),
                text(&b["received"])
            );
        }
        out += "\n";
    }
    out
}

/// A sync report as lines for a terminal.
fn render_report(report: &serde_json::Value) -> String {
    let mut out = format!(
        "{} sync: {} in {} ms, {} bytes sent, {} received",
        text(&report["process"]),
        if report["ok"].as_bool() == Some(true) {
            "ok"
        } else {
            "FAILED"
        },
        text(&report["duration_ms"]),
        text(&report["bytes_sent"]),
        text(&report["bytes_received"]),
    );
    if report["activity_pushed"].as_u64().unwrap_or(0) > 0 {
        out += &format!(", {} events pushed", text(&report["activity_pushed"]));
    }
    out += "\n";
    if let Some(e) = report["error"].as_str() {
        out += &format!("  error: {e}\n");
    }
    if let Some(modules) = report["modules"].as_object() {
        for (name, m) in modules {
            out += &format!(
                "  {:<12} {} upserted {}, deleted {}, unchanged {}, quarantined {}{}{}\n",
                name,
                if m["ok"].as_bool() == Some(true) {
                    "ok    "
                } else {
                    "FAILED"
                },
                text(&m["upserted"]),
                text(&m["deleted"]),
                text(&m["unchanged"]),
                text(&m["quarantined"]),
                if m["reset_needed"].as_bool() == Some(true) {
                    ", full sync scheduled"
                } else {
                    ""
                },
                m["error"]
                    .as_str()
                    .map(|e| format!(", error: {e}"))
                    .unwrap_or_default(),
            );
        }
    }
    out
}
