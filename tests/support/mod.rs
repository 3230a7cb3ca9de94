//! Shared helpers for the end-to-end tests: a real `storehub` and real `storebox` processes
//! on 127.0.0.1 in a temporary directory, and small HTTP helpers to talk to them.
//!
//! Every process is killed when its handle drops, so a failing test leaves nothing running.

#![allow(dead_code, clippy::unwrap_used)]

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::Value;

pub mod pg;

/// Runs a scenario twice, as `NAME::embedded` and `NAME::postgres`: the hub on its embedded
/// database, then on PostgreSQL (tests/support/pg.rs). Same behaviour through both.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                use super::support::{set_backend, Backend};

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn embedded() {
                    set_backend(Backend::Embedded);
                    super::$name().await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    set_backend(Backend::Postgres);
                    super::$name().await
                }
            }
        )*
    };
}
#[allow(unused_imports)]
pub use pg::{set_backend, Backend};

/// Path of a binary built by this workspace (storebox, storehub), next to the test's own.
pub fn bin(name: &str) -> PathBuf {
    let storebox = PathBuf::from(env!("CARGO_BIN_EXE_storebox"));
    let path = storebox.with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo test --workspace`",
        path.display()
    );
    path
}

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How the tests reach a box's till API: its data directory (where the LAN certificate
/// appears once it serves over TLS) and the tokens paired for the tests.
#[derive(Clone)]
struct LanAccess {
    data_dir: PathBuf,
    till: String,
    technician: String,
}

/// Boxes known to the tests, by LAN address: [`call`] speaks TLS pinned to the box's
/// certificate and adds the right token, so tests written for the plain API keep working.
static LANS: std::sync::Mutex<Vec<(SocketAddr, LanAccess)>> = std::sync::Mutex::new(Vec::new());

/// The data directory a box config names (relative to the config's directory).
pub fn box_data_dir(config: &std::path::Path) -> PathBuf {
    let text = std::fs::read_to_string(config).unwrap();
    let dir = text
        .lines()
        .find_map(|l| l.strip_prefix("data_dir = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap();
    config.parent().unwrap().join(dir)
}

/// Runs `storebox pair --name NAME --approve [--technician]` on a box config; the token.
pub fn pair_cli(config: &std::path::Path, name: &str, technician: bool) -> String {
    let mut command = Command::new(bin("storebox"));
    command
        .args(["pair", "--name", name, "--approve"])
        .arg("--config")
        .arg(config);
    if technician {
        command.arg("--technician");
    }
    let out = command.output().unwrap();
    assert!(
        out.status.success(),
        "storebox pair failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// Pairs a till and a technician for the box of `config` listening on `lan`, and registers
/// them for [`call`]. Idempotent per address.
pub fn prepare_lan(config: &std::path::Path, lan: SocketAddr) {
    if LANS.lock().unwrap().iter().any(|(a, _)| *a == lan) {
        return;
    }
    let access = LanAccess {
        data_dir: box_data_dir(config),
        till: pair_cli(config, "test till", false),
        technician: pair_cli(config, "test technician", true),
    };
    LANS.lock().unwrap().push((lan, access));
}

/// The SHA-256 fingerprint of a box's LAN certificate, once it has made one.
pub fn lan_fingerprint(data_dir: &std::path::Path) -> Option<String> {
    use rustls_pki_types::pem::PemObject;
    let cert =
        rustls_pki_types::CertificateDer::from_pem_file(data_dir.join("lan").join("lan.crt"))
            .ok()?;
    Some(storebox_http::pinned::fingerprint(&cert))
}

/// The TLS config and `Authorization` value for a call to a registered box.
fn lan_transport(
    addr: SocketAddr,
    path: &str,
) -> Option<(Option<std::sync::Arc<rustls::ClientConfig>>, String)> {
    let access = LANS
        .lock()
        .unwrap()
        .iter()
        .find(|(a, _)| *a == addr)
        .map(|(_, l)| l.clone())?;
    let tls = lan_fingerprint(&access.data_dir)
        .map(|f| storebox_http::pinned::pinned_client_config(&f).unwrap());
    let token = if ["/v1/sync", "/v1/tills", "/v1/ota"]
        .iter()
        .any(|p| path.starts_with(p))
    {
        access.technician
    } else {
        access.till
    };
    Some((tls, format!("Bearer {token}")))
}

/// One request to a daemon on loopback: over TLS with a token when `addr` is a registered
/// box (a caller's own `authorization` header wins), plain otherwise.
async fn raw_call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<(StatusCode, Bytes), storebox_http::CallError> {
    match lan_transport(addr, path) {
        Some((tls, auth)) => {
            let mut all: Vec<(&str, &str)> = headers.to_vec();
            if !headers
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
            {
                all.push(("authorization", auth.as_str()));
            }
            storebox_http::call_over(addr, tls.as_ref(), method, path, &all, body).await
        }
        None => storebox_http::call(addr, method, path, headers, body).await,
    }
}

/// An HTTP call to a daemon on loopback; the body parsed as JSON when it is JSON.
pub async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> (StatusCode, Value) {
    let (status, body) = raw_call(addr, method, path, headers, body.into())
        .await
        .unwrap_or_else(|e| panic!("calling {addr}{path}: {e}"));
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    (status, value)
}

/// A child process killed on drop.
pub struct Proc {
    child: Child,
    pub name: &'static str,
    pub log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, mut command: Command, log: PathBuf) -> Proc {
        let out = std::fs::File::create(&log).unwrap();
        let child = command
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        Proc { child, name, log }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A storehub set up by `storehub init` in a temporary directory.
pub struct Hub {
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub sync_port: u16,
    pub token: String,
    pub env: Vec<(String, String)>,
    pub proc: Option<Proc>,
    /// The hub's PostgreSQL database, when the test runs on that backend; after `proc`, so
    /// the hub stops before its database goes.
    pub database: Option<pg::Database>,
}

impl Hub {
    /// Initialises a hub for `stores` and starts it.
    pub async fn start(stores: &[&str]) -> Hub {
        Hub::start_with_env(stores, &[]).await
    }

    /// Same, with boxes' client certificates living `lifetime` (e.g. "6s") instead of 24 h.
    pub async fn start_with_lifetime(stores: &[&str], lifetime: &str) -> Hub {
        Hub::start_configured(stores, &[], Some(lifetime)).await
    }

    /// Same, with environment variables for the hub process (test fault switches).
    pub async fn start_with_env(stores: &[&str], env: &[(&str, &str)]) -> Hub {
        Hub::start_configured(stores, env, None).await
    }

    async fn start_configured(
        stores: &[&str],
        env: &[(&str, &str)],
        lifetime: Option<&str>,
    ) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let sync_port = free_port();
        let admin_port = free_port();
        let lan_port = free_port();
        let mut init = Command::new(bin("storehub"));
        init.arg("init")
            .arg("--dir")
            .arg(dir.path())
            .args(["--hub-port", &sync_port.to_string()])
            .args(["--admin-port", &admin_port.to_string()])
            .args(["--lan-port", &lan_port.to_string()]);
        for store in stores {
            init.args(["--store", store]);
        }
        let out = init.output().unwrap();
        assert!(
            out.status.success(),
            "storehub init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        if let Some(lifetime) = lifetime {
            let path = dir.path().join("hub.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            let edited = text.replace(
                "cert_lifetime = \"24h\"",
                &format!("cert_lifetime = \"{lifetime}\""),
            );
            assert_ne!(text, edited, "hub.toml has no cert_lifetime to change");
            std::fs::write(&path, edited).unwrap();
        }
        let database = (pg::backend() == Backend::Postgres).then(|| {
            let database = pg::Database::create();
            let path = dir.path().join("hub.toml");
            let mut text = std::fs::read_to_string(&path).unwrap();
            text.push_str(&format!("\n[database]\nurl = \"{}\"\n", database.url));
            std::fs::write(&path, text).unwrap();
            let out = Command::new(bin("storehub"))
                .arg("migrate")
                .arg("--config")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "storehub migrate failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            database
        });
        let mut hub = Hub {
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            sync_port,
            token,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            proc: None,
            database,
        };
        hub.restart().await;
        hub
    }

    /// Starts (again) the hub process on the same setup and data.
    pub async fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let mut command = Command::new(bin("storehub"));
        command
            .arg("serve")
            .arg("--config")
            .arg(self.dir.path().join("hub.toml"));
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let log = self.dir.path().join(format!("hub-{}.log", free_port()));
        self.proc = Some(Proc::spawn("storehub", command, log));
        let admin = self.admin;
        let token = self.token.clone();
        wait_for("the hub's admin API", Duration::from_secs(20), || {
            let token = token.clone();
            async move {
                let auth = format!("Bearer {token}");
                storebox_http::call(
                    admin,
                    Method::GET,
                    "/admin/v1/stores",
                    &[("authorization", auth.as_str())],
                    Bytes::new(),
                )
                .await
                .ok()
                .filter(|(s, _)| s.is_success())
            }
        })
        .await;
    }

    /// Stops the hub process (the shop's Internet link is down, as far as the box can tell).
    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// The hub's CA certificate (PEM).
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ca.crt")).unwrap()
    }

    /// The certificates the hub issued to a store (admin API), newest first.
    pub async fn certificates(&self, store: &str) -> Vec<Value> {
        let (status, doc) = self
            .admin(
                Method::GET,
                &format!("/admin/v1/stores/{store}/certificates"),
                Bytes::new(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        doc["certificates"].as_array().unwrap().clone()
    }

    pub fn box_config(&self, store: &str) -> PathBuf {
        self.dir.path().join("boxes").join(format!("{store}.toml"))
    }

    /// An admin call with the admin token.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        admin_call(self.admin, &self.token, method, path, body).await
    }

    /// Starts another `storehub serve` on the same setup and database, on ports of its own:
    /// a replica (PostgreSQL backend only; the embedded database is one process's).
    pub async fn start_replica(&self) -> Replica {
        assert!(
            self.database.is_some(),
            "replicas need the PostgreSQL backend"
        );
        let sync_port = free_port();
        let admin_port = free_port();
        let text = std::fs::read_to_string(self.dir.path().join("hub.toml")).unwrap();
        let edited = text
            .replace(
                &format!("127.0.0.1:{}\"", self.sync_port),
                &format!("127.0.0.1:{sync_port}\""),
            )
            .replace(
                &format!("127.0.0.1:{}\"", self.admin.port()),
                &format!("127.0.0.1:{admin_port}\""),
            );
        assert_ne!(text, edited, "hub.toml has no listen addresses to change");
        let config = self.dir.path().join(format!("hub-{sync_port}.toml"));
        std::fs::write(&config, edited).unwrap();
        let mut command = Command::new(bin("storehub"));
        command.arg("serve").arg("--config").arg(&config);
        let log = self.dir.path().join(format!("hub-{sync_port}.log"));
        let replica = Replica {
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            sync_port,
            token: self.token.clone(),
            proc: Some(Proc::spawn("storehub", command, log)),
        };
        wait_for(
            "the replica's admin API",
            Duration::from_secs(20),
            || async {
                let (s, _) = replica.try_admin(Method::GET, "/admin/v1/stores").await?;
                s.is_success().then_some(())
            },
        )
        .await;
        replica
    }

    /// Imports records into a module; panics unless the hub accepts them.
    pub async fn import(
        &self,
        store: &str,
        module: &str,
        records: &[Value],
        replace: bool,
    ) -> Value {
        let body = storebox_sim::to_ndjson(records);
        let path = format!(
            "/admin/v1/stores/{store}/modules/{module}/import{}",
            if replace { "?replace=true" } else { "" }
        );
        let (status, answer) = self.admin(Method::POST, &path, body).await;
        assert_eq!(status, StatusCode::OK, "import into {module}: {answer}");
        answer
    }

    /// Imports a whole generated store.
    pub async fn import_store(&self, store: &str, data: &storebox_sim::Store) {
        for (module, records) in &data.modules {
            self.import(store, module, records, false).await;
        }
    }

    /// Every activity event the hub holds for a store, in receipt order.
    pub async fn activity(&self, store: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after = 0;
        loop {
            let (status, page) = self
                .admin(
                    Method::GET,
                    &format!("/admin/v1/stores/{store}/activity?after={after}&limit=1000"),
                    Bytes::new(),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{page}");
            let events = page["events"].as_array().unwrap().clone();
            if events.is_empty() {
                return out;
            }
            after = page["next"].as_u64().unwrap();
            out.extend(events);
        }
    }
}

/// An admin call with the admin token.
async fn admin_call(
    addr: SocketAddr,
    token: &str,
    method: Method,
    path: &str,
    body: impl Into<Bytes>,
) -> (StatusCode, Value) {
    let auth = format!("Bearer {token}");
    call(
        addr,
        method,
        path,
        &[("authorization", auth.as_str())],
        body,
    )
    .await
}

/// A second `storehub serve` process of a [`Hub`] (`Hub::start_replica`).
pub struct Replica {
    pub admin: SocketAddr,
    pub sync_port: u16,
    token: String,
    pub proc: Option<Proc>,
}

impl Replica {
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        admin_call(self.admin, &self.token, method, path, body).await
    }

    async fn try_admin(&self, method: Method, path: &str) -> Option<(StatusCode, Bytes)> {
        let auth = format!("Bearer {}", self.token);
        storebox_http::call(
            self.admin,
            method,
            path,
            &[("authorization", auth.as_str())],
            Bytes::new(),
        )
        .await
        .ok()
    }

    pub fn stop(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }
}

/// A storebox process for one store of a [`Hub`].
pub struct StoreBox {
    pub config: PathBuf,
    pub lan: SocketAddr,
    pub proc: Option<Proc>,
    /// Environment of the box process (test fault switches).
    pub env: Vec<(String, String)>,
}

impl StoreBox {
    /// Starts the box of `store` with extra config (a drop-in) such as
    /// `"[sync]\ndelta_interval = \"off\"\n"`, and waits for its LAN API. The drop-in
    /// directory is shared by every box config of the hub's setup, so tests run one store
    /// per hub.
    pub async fn start(hub: &Hub, store: &str, dropin: &str) -> StoreBox {
        StoreBox::start_with_env(hub, store, dropin, &[]).await
    }

    /// Same, with environment variables for the box process.
    pub async fn start_with_env(
        hub: &Hub,
        store: &str,
        dropin: &str,
        env: &[(&str, &str)],
    ) -> StoreBox {
        let config = hub.box_config(store);
        let dir = config.parent().unwrap().join("storebox.d");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("50-{store}-test.toml")), dropin).unwrap();
        let text = std::fs::read_to_string(&config).unwrap();
        let listen = text
            .lines()
            .find_map(|l| l.strip_prefix("listen = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap()
            .parse()
            .unwrap();
        prepare_lan(&config, listen);
        let mut b = StoreBox {
            config,
            lan: listen,
            proc: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        b.restart().await;
        b
    }

    /// Starts (again) the box process.
    pub async fn restart(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let mut command = Command::new(bin("storebox"));
        command.arg("serve").arg("--config").arg(&self.config);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let log = self
            .config
            .with_file_name(format!("box-{}.log", free_port()));
        self.proc = Some(Proc::spawn("storebox", command, log));
        let lan = self.lan;
        wait_for(
            "the box's LAN API",
            Duration::from_secs(20),
            || async move {
                raw_call(lan, Method::GET, "/v1/status", &[], Bytes::new())
                    .await
                    .ok()
                    .filter(|(s, _)| s.is_success())
            },
        )
        .await;
    }

    pub async fn get(&self, path: &str) -> (StatusCode, Value) {
        call(self.lan, Method::GET, path, &[], Bytes::new()).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> (StatusCode, Value) {
        call(self.lan, Method::POST, path, &[], body).await
    }

    pub async fn status(&self) -> Value {
        let (status, doc) = self.get("/v1/status").await;
        assert_eq!(status, StatusCode::OK);
        doc
    }

    /// Waits until every one of `modules` has completed a full sync.
    pub async fn wait_full_sync(&self, modules: &[&str]) -> Value {
        wait_for(
            "a full sync of every module",
            Duration::from_secs(60),
            || async {
                let doc = self.status().await;
                modules
                    .iter()
                    .all(|m| doc["modules"][m]["last_full_ok"].is_string())
                    .then_some(doc)
            },
        )
        .await
    }

    /// Waits until no activity is pending.
    pub async fn wait_pushed(&self, timeout: Duration) -> Value {
        wait_for("all activity pushed", timeout, || async {
            let doc = self.status().await;
            (doc["activity"]["pending"] == 0).then_some(doc)
        })
        .await
    }

    /// Runs a `storebox` command against this box's config, returning (success, stdout).
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(bin("storebox"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// Like [`call`], but a failed connection or exchange (the daemon is down, or dies before it
/// answers) is returned as an error instead of panicking.
pub async fn try_call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<(StatusCode, Value), String> {
    let (status, body) = raw_call(addr, method, path, headers, body.into())
        .await
        .map_err(|e| format!("calling {addr}{path}: {e}"))?;
    let value = serde_json::from_slice(&body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()));
    Ok((status, value))
}

impl StoreBox {
    /// Kills the running box with SIGKILL (`Child::kill`: no shutdown, no push mark saved)
    /// and starts it again on the same data, like [`StoreBox::restart`]; but instead of
    /// panicking, answers the new process's log when it exits or its LAN API does not
    /// answer within `timeout`. Answers how long the box took to serve again.
    pub async fn try_restart(&mut self, timeout: Duration) -> Result<Duration, String> {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
        let started = Instant::now();
        let mut command = Command::new(bin("storebox"));
        command.arg("serve").arg("--config").arg(&self.config);
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let log = self
            .config
            .with_file_name(format!("box-{}.log", free_port()));
        let mut proc = Proc::spawn("storebox", command, log);
        loop {
            if let Ok(Some(exit)) = proc.child.try_wait() {
                return Err(format!(
                    "the box exited ({exit}) while starting; its log:\n{}",
                    proc.log_text()
                ));
            }
            let answer = raw_call(self.lan, Method::GET, "/v1/status", &[], Bytes::new()).await;
            if matches!(answer, Ok((s, _)) if s.is_success()) {
                self.proc = Some(proc);
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                return Err(format!(
                    "the box's LAN API did not answer within {timeout:?}; its log:\n{}",
                    proc.log_text()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The text of every log this box's processes wrote (one file per start), oldest first.
    pub fn all_logs(&self) -> Vec<(PathBuf, String)> {
        let dir = self.config.parent().unwrap();
        let mut logs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("box-") && n.ends_with(".log"))
            })
            .filter_map(|p| Some((p.metadata().ok()?.modified().ok()?, p)))
            .collect();
        logs.sort();
        logs.into_iter()
            .map(|(_, p)| {
                let text = std::fs::read_to_string(&p).unwrap_or_default();
                (p, text)
            })
            .collect()
    }
}
