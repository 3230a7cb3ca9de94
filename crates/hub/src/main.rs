//! The `storehub` command: `init` a setup, `serve` it; `enroll-token` and `fleet` ask the
//! running hub's admin API like any other admin client.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use storehub::admin_api::AdminState;
use storehub::config::HubConfig;
use storehub::store::HubStore;
use storehub::sync_api::SyncState;

#[derive(Parser)]
#[command(
    name = "storehub",
    version,
    about = "The storebox platform sync service"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write a ready-to-run hub setup with a private CA and one box config per store.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// A store id; repeat for several stores.
        #[arg(long = "store", required = true)]
        stores: Vec<String>,
        #[arg(long, default_value_t = 7443)]
        hub_port: u16,
        #[arg(long, default_value_t = 7080)]
        admin_port: u16,
        /// LAN port of the first store's box (the next stores take the following ports).
        #[arg(long, default_value_t = 8080)]
        lan_port: u16,
        /// Overwrite an existing setup.
        #[arg(long)]
        force: bool,
    },
    /// Serve the sync API (HTTPS) and the admin API.
    Serve {
        #[arg(long)]
        config: PathBuf,
    },
    /// Apply the database schema migrations this storehub needs (PostgreSQL backend; run it
    /// before starting a new version's replicas).
    Migrate {
        #[arg(long)]
        config: PathBuf,
    },
    /// Make a one-time enrollment token for a store's box (asks the running hub's admin API)
    /// and print it; the technician runs `storebox enroll --token TOKEN` on the box.
    EnrollToken {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        store: String,
    },
    /// List the stores' boxes (asks the running hub's admin API): last contact, versions,
    /// certificate expiry, pending activity, how far behind each module is, errors, and why
    /// a box needs a technician. A table for people, or the API's JSON with --json.
    Fleet {
        #[arg(long)]
        config: PathBuf,
        /// Only boxes that need a technician.
        #[arg(long)]
        needs_attention: bool,
        /// Only boxes with this reason (no_contact, cert_expiring, module_error, ...).
        #[arg(long)]
        reason: Option<String>,
        /// Only this store.
        #[arg(long)]
        store: Option<String>,
        /// No contact for longer than this needs attention ("6h" by default).
        #[arg(long)]
        no_contact: Option<String>,
        /// A certificate expiring within this needs attention (a quarter of the lifetime).
        #[arg(long)]
        cert_within: Option<String>,
        /// No full sync for longer than this needs attention ("26h" by default).
        #[arg(long)]
        full_sync_within: Option<String>,
        /// Print the admin API's JSON answer instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// How long the sync listener keeps a box's connection with no request in flight: longer
/// than the default delta interval (5 minutes), with room for a slow poll. A firmware
/// download moving bytes at any rate is not idle; one stalled this long is cut and resumed
/// by the box (`ota::serve_bundle`).
const SYNC_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15 * 60);

fn main() -> std::process::ExitCode {
    limit_malloc_arenas();
    let filter = std::env::var("STOREHUB_LOG")
        .ok()
        .and_then(|l| l.parse().ok())
        .unwrap_or(tracing::Level::INFO);
    tracing_subscriber::fmt()
        .with_max_level(filter)
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("storehub: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Init {
            dir,
            stores,
            hub_port,
            admin_port,
            lan_port,
            force,
        } => {
            let boxes = storehub::init::init(&storehub::init::InitOptions {
                dir: dir.clone(),
                stores,
                hub_port,
                admin_port,
                lan_port,
                force,
            })?;
            println!("hub config:  {}", dir.join("hub.toml").display());
            println!("admin token: {}", dir.join("admin.token").display());
            for b in boxes {
                println!("box config:  {}", b.display());
            }
            Ok(())
        }
        Command::Serve { config } => serve(&config),
        Command::Migrate { config } => migrate(&config),
        Command::EnrollToken { config, store } => enroll_token(&config, &store),
        Command::Fleet {
            config,
            needs_attention,
            reason,
            store,
            no_contact,
            cert_within,
            full_sync_within,
            json,
        } => {
            let mut query = Vec::new();
            if needs_attention {
                query.push("needs_attention=true".to_owned());
            }
            for (name, value) in [
                ("reason", reason),
                ("store", store),
                ("no_contact", no_contact),
                ("cert_within", cert_within),
                ("full_sync_within", full_sync_within),
            ] {
                if let Some(value) = value {
                    query.push(format!("{name}={}", percent_encode(&value)));
                }
            }
            let path = if query.is_empty() {
                "/admin/v1/fleet".to_owned()
            } else {
                format!("/admin/v1/fleet?{}", query.join("&"))
            };
            let doc = admin_call(&config, http::Method::GET, &path)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&doc)?);
            } else {
                let view: storehub::fleet::FleetView = serde_json::from_value(doc)
                    .context("the hub's fleet view does not have the expected shape")?;
                print!("{}", storehub::fleet::render_table(&view));
            }
            Ok(())
        }
    }
}

/// Percent-encodes a query value: everything but unreserved characters.
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// One call to the running hub's admin API on this machine, with the admin token of the
/// config; answers the JSON body of a successful answer.
fn admin_call(
    path: &std::path::Path,
    method: http::Method,
    call_path: &str,
) -> anyhow::Result<serde_json::Value> {
    let config = HubConfig::load(path)?;
    let token = std::fs::read_to_string(&config.admin.token_file)
        .with_context(|| format!("reading {}", config.admin.token_file.display()))?;
    let auth = format!("Bearer {}", token.trim());
    let mut addr = config.admin.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let (status, body) = runtime
        .block_on(storebox_http::call(
            addr,
            method,
            call_path,
            &[("authorization", auth.as_str())],
            bytes::Bytes::new(),
        ))
        .with_context(|| format!("asking the hub's admin API at {addr} (is storehub serving?)"))?;
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .with_context(|| format!("the hub answered {status} with a body that is not JSON"))?;
    anyhow::ensure!(status.is_success(), "the hub answered {status}: {doc}");
    Ok(doc)
}

/// Asks the running hub for a token, over the admin API on this machine.
fn enroll_token(path: &std::path::Path, store: &str) -> anyhow::Result<()> {
    let doc = admin_call(
        path,
        http::Method::POST,
        &format!("/admin/v1/stores/{store}/enroll-token"),
    )?;
    let token = doc["token"]
        .as_str()
        .context("the hub's answer has no token")?;
    println!("{token}");
    eprintln!(
        "one-time token for store {store}, valid until {}; on the box: storebox enroll --token {token}",
        doc["expires_at"].as_str().unwrap_or("?")
    );
    Ok(())
}

fn migrate(path: &std::path::Path) -> anyhow::Result<()> {
    let config = HubConfig::load(path)?;
    let Some(database) = &config.database else {
        println!(
            "nothing to migrate: {} has no [database]; the embedded database in {} needs no \
             migration",
            path.display(),
            config.data_dir.display()
        );
        return Ok(());
    };
    let ran = storehub::store::postgres::migrate(&database.connection())?;
    if ran.is_empty() {
        println!("the database schema is up to date");
    }
    for name in ran {
        println!("applied {name}");
    }
    Ok(())
}

/// glibc gives threads that allocate at the same moment arenas of their own, up to eight per
/// core, and memory freed in one arena serves no other: after a burst of thousands of boxes a
/// replica kept a third more memory than it used. A few arenas are plenty for a process whose
/// work runs on a few worker threads and a bounded blocking pool (measured with 1,000 boxes:
/// 62 KiB per box above idle with 4 arenas, 74 KiB with glibc's default).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    // SAFETY: mallopt only sets one of malloc's tunables; it is called first thing in main,
    // before any other thread exists. Its result (0 when refused) needs no handling: the
    // default arenas work, with more memory.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 4);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

/// Opens the configured database; for PostgreSQL, also starts listening to the other
/// replicas' change notifications. Blocking: called before the async runtime starts.
fn open_store(config: &HubConfig) -> anyhow::Result<HubStore> {
    let Some(database) = &config.database else {
        return Ok(HubStore::open(&config.data_dir)?.with_layout(config.layout()));
    };
    let connection = database.connection();
    let backend = storehub::store::postgres::Postgres::open(connection.clone())?;
    let watchers = Arc::new(storehub::store::Watchers::default());
    storehub::store::postgres::listen(connection, watchers.clone())
        .context("starting the change notification listener")?;
    Ok(HubStore::with_backend(Box::new(backend), watchers).with_layout(config.layout()))
}

/// Raises the soft limit of open files to the hard one, as far as `wanted`: every connected
/// box holds a descriptor, and the usual soft limit (1,024) is below a replica's fleet.
fn raise_open_files(wanted: u64) {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let mut limit = getrlimit(Resource::Nofile);
    let target = match limit.maximum {
        Some(hard) => wanted.min(hard),
        None => wanted,
    };
    if limit.current.is_some_and(|soft| soft >= target) {
        return;
    }
    limit.current = Some(target);
    if let Err(e) = setrlimit(Resource::Nofile, limit) {
        tracing::warn!("could not raise the open files limit to {target}: {e}");
    }
}

fn serve(path: &std::path::Path) -> anyhow::Result<()> {
    let config = HubConfig::load(path)?;
    // The boxes, plus the database's connections, the admin API and the files of the hub.
    raise_open_files(config.sync.max_connections as u64 + 1024);
    let store = Arc::new(open_store(&config)?);
    storehub::ota::prepare(&config.ota_dir(), &store)?;
    // Sync calls reach the database on the blocking pool. More threads than the database
    // can serve at once only wait for a connection, and each keeps its stack and allocator
    // cache: tokio's default of 512 cost a replica tens of MiB after a burst of 5,000 boxes.
    let blocking = match &config.database {
        Some(database) => (database.pool_size * 2).clamp(16, 512),
        None => 64,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(blocking)
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let token = std::fs::read_to_string(&config.admin.token_file)
            .with_context(|| format!("reading {}", config.admin.token_file.display()))?
            .trim()
            .to_owned();
        anyhow::ensure!(
            token.len() >= 16,
            "the admin token in {} is shorter than 16 characters",
            config.admin.token_file.display()
        );
        let mut pki = storehub::pki::Pki::open(
            &config.pki.ca_key,
            &config.pki_state(),
            config.cert_lifetime()?,
        )?;
        if let Some(database) = &config.database {
            let shared = storehub::store::postgres::SharedPki::new(database.connection());
            pki = tokio::task::block_in_place(|| pki.with_shared_state(Box::new(shared)))?;
        }
        storehub::pki::install(Arc::new(pki));
        let tls = storehub::sync_api::tls_acceptor(
            &config.sync.cert,
            &config.sync.key,
            &config.pki.ca_cert,
        )?;
        let sync_listener = tokio::net::TcpListener::bind(config.sync.listen)
            .await
            .with_context(|| format!("listening for boxes on {}", config.sync.listen))?;
        let admin_listener = tokio::net::TcpListener::bind(config.admin.listen)
            .await
            .with_context(|| format!("listening for admin calls on {}", config.admin.listen))?;
        tracing::info!(
            "storehub {} serving boxes on https://{}, admin on http://{}",
            env!("CARGO_PKG_VERSION"),
            sync_listener.local_addr()?,
            admin_listener.local_addr()?
        );
        let retention = config.tombstone_retention()?;
        let sync_state = Arc::new(SyncState::new(config.clone(), store.clone()));
        let admin_state = Arc::new(AdminState {
            config: config.clone(),
            store: store.clone(),
            token,
        });
        // A box's connection is recycled well within its certificate's lifetime: opened at
        // most two thirds in (it renews then), closed a sixth later, it never carries a
        // certificate past its expiry (docs/SECURITY.md).
        let sync_limits = storebox_http::Limits {
            max_connection_age: Some(
                (config.cert_lifetime()? / 6).max(std::time::Duration::from_secs(1)),
            ),
            // A box polling every 5 minutes keeps its connection between polls: closing it
            // after the default 2 idle minutes would cost each poll a TLS handshake, five
            // times the poll itself on the shop's line (docs/PROTOCOL.md).
            idle_timeout: SYNC_IDLE_TIMEOUT,
            max_connections: config.sync.max_connections,
            ..storebox_http::Limits::default()
        };
        tokio::spawn(storebox_http::serve_with(
            sync_listener,
            Some(tls),
            sync_limits,
            sync_state,
            storehub::sync_api::handle,
            std::future::pending(),
        ));
        tokio::spawn(storebox_http::serve(
            admin_listener,
            None,
            admin_state,
            storehub::admin_api::handle,
        ));
        tokio::spawn(prune_loop(store.clone(), retention));
        tokio::spawn(contact_loop(store.clone()));
        shutdown_signal().await;
        let last = store.clone();
        if let Ok(Err(e)) = tokio::task::spawn_blocking(move || last.flush_contacts()).await {
            tracing::error!("writing the last box contacts: {e}");
        }
        tracing::info!("storehub stopping");
        Ok(())
    })
}

/// Writes the boxes' contacts once a second, in one transaction.
async fn contact_loop(store: Arc<HubStore>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.flush_contacts()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!("writing box contacts (kept for the next try): {e}"),
            Err(e) => tracing::error!("writing box contacts: {e}"),
        }
    }
}

/// Forgets expired tombstones once an hour.
async fn prune_loop(store: Arc<HubStore>, retention: std::time::Duration) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
    loop {
        tick.tick().await;
        let before = storehub::now_ms() - retention.as_millis() as i64;
        let store = store.clone();
        match tokio::task::spawn_blocking(move || store.prune_tombstones(before)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => tracing::info!("forgot {n} expired tombstones"),
            Ok(Err(e)) => tracing::error!("pruning tombstones: {e}"),
            Err(e) => tracing::error!("pruning tombstones: {e}"),
        }
    }
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
