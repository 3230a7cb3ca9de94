//! What both benchmarks share: the child processes (hub, box, baselines) and the guards that
//! kill them, the hub's admin calls, the box's status and sync calls, a keep-alive client,
//! latency series, and the machine description written next to the results.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

/// The one store of the run.
pub const STORE: &str = "bench-001";
/// How often the cold sync is polled: its wall time is exact to within one period.
pub const POLL: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// Child processes

/// Every child still running. Guards own an entry each; the panic hook empties it, since with
/// `panic = "abort"` no guard's destructor would run.
pub static CHILDREN: Mutex<Vec<Child>> = Mutex::new(Vec::new());

/// The run's temporary directory, for the panic hook to remove (its `TempDir` will not drop).
pub static RUN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

pub fn children() -> MutexGuard<'static, Vec<Child>> {
    CHILDREN.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Processes that are not the bench's children but must stop with it: a server started
/// through `runuser`, which forks, so that killing the child would leave the server.
static QUIT_ON_EXIT: Mutex<Vec<u32>> = Mutex::new(Vec::new());

/// Sends `pid` SIGQUIT when the children are killed (PostgreSQL's immediate shutdown).
pub fn quit_on_exit(pid: u32) {
    QUIT_ON_EXIT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(pid);
}

/// Undoes [`quit_on_exit`], once the process was stopped otherwise.
pub fn forget_quit_on_exit(pid: u32) {
    QUIT_ON_EXIT
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .retain(|&p| p != pid);
}

pub fn signal_quit(pid: u32) {
    if let Some(pid) = rustix::process::Pid::from_raw(pid as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
    }
}

pub fn kill_all_children() {
    if let Ok(pids) = QUIT_ON_EXIT.try_lock() {
        for &pid in pids.iter() {
            signal_quit(pid);
        }
    }
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
pub struct Proc {
    pub pid: u32,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(mut command: Command, log: PathBuf) -> anyhow::Result<Proc> {
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
    pub fn check_alive(&self) -> anyhow::Result<()> {
        let exited = children()
            .iter_mut()
            .find(|c| c.id() == self.pid)
            .and_then(|c| c.try_wait().ok().flatten());
        match exited {
            Some(status) => bail!("process {} exited ({status}):\n{}", self.pid, self.tail()),
            None => Ok(()),
        }
    }

    pub fn tail(&self) -> String {
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

pub struct Bins {
    pub hub: PathBuf,
    pub storebox: PathBuf,
}

/// A binary of the workspace next to the bench's own executable.
pub fn sibling(exe: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let path = exe.with_file_name(name);
    ensure!(
        path.is_file(),
        "{} is missing: build the daemons first with `cargo build --release --workspace --bins`",
        path.display()
    );
    Ok(path)
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Polls `check` every `every` until it gives a value, for at most `timeout`.
pub async fn wait_for<T, F, Fut>(
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
pub async fn call(
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
pub struct Hub {
    // Declared before `dir`: the process goes before its directory.
    pub proc: Proc,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub auth: String,
}

impl Hub {
    pub async fn start(bins: &Bins) -> anyhow::Result<Hub> {
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

    pub async fn admin(&self, method: Method, path: &str, body: Bytes) -> anyhow::Result<Value> {
        let headers = [("authorization", self.auth.as_str())];
        let (status, answer) = call(self.admin, method.clone(), path, &headers, body).await?;
        ensure!(status.is_success(), "{method} {path}: {status} {answer}");
        Ok(answer)
    }

    pub async fn import(&self, module: &str, records: &[Value]) -> anyhow::Result<()> {
        let path = format!("/admin/v1/stores/{STORE}/modules/{module}/import");
        let body = Bytes::from(storebox_sim::to_ndjson(records));
        self.admin(Method::POST, &path, body).await.map(drop)
    }

    pub async fn delete(&self, module: &str, id: &str) -> anyhow::Result<()> {
        // Generated ids are plain ASCII letters and digits: nothing to percent-encode.
        let path = format!("/admin/v1/stores/{STORE}/modules/{module}/records/{id}");
        self.admin(Method::DELETE, &path, Bytes::new())
            .await
            .map(drop)
    }
}

/// `Authorization` value of the box's paired bench token (set when the box is spawned).
static BENCH_AUTH: Mutex<String> = Mutex::new(String::new());

/// Sets the token [`bench_auth`] answers (a box paired by the caller).
pub fn set_bench_auth(token: &str) {
    *BENCH_AUTH.lock().unwrap_or_else(PoisonError::into_inner) = format!("Bearer {token}");
}

pub fn bench_auth() -> String {
    BENCH_AUTH
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone()
}

/// The store's box, with the config `storehub init` wrote for it.
pub struct BoxProc {
    pub proc: Proc,
    pub spawned: Instant,
    pub lan: SocketAddr,
    pub data_dir: PathBuf,
}

impl BoxProc {
    pub fn spawn(bins: &Bins, hub: &Hub) -> anyhow::Result<BoxProc> {
        BoxProc::spawn_with(bins, hub, "")
    }

    /// As [`BoxProc::spawn`], with `extra_sync` added to the drop-in's `[sync]` table.
    pub fn spawn_with(bins: &Bins, hub: &Hub, extra_sync: &str) -> anyhow::Result<BoxProc> {
        let boxes = hub.dir.path().join("boxes");
        let config = boxes.join(format!("{STORE}.toml"));
        // No periodic delta pull: the only deltas are the ones measured.
        std::fs::create_dir_all(boxes.join("storebox.d"))?;
        // Plain HTTP on the LAN keeps the lookup figures comparable with the plain nginx
        // baseline; a technician token (paired on the box) lets every call through.
        std::fs::write(
            boxes.join("storebox.d/50-bench.toml"),
            format!("[sync]\ndelta_interval = \"off\"\nnotify = false\n{extra_sync}\n[lan]\ntls = false\n"),
        )?;
        let paired = Command::new(&bins.storebox)
            .args([
                "pair",
                "--name",
                "bench",
                "--approve",
                "--technician",
                "--config",
            ])
            .arg(&config)
            .output()?;
        ensure!(
            paired.status.success(),
            "storebox pair: {}",
            String::from_utf8_lossy(&paired.stderr)
        );
        let token = String::from_utf8(paired.stdout)?.trim().to_owned();
        *BENCH_AUTH.lock().unwrap_or_else(PoisonError::into_inner) = format!("Bearer {token}");
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

    pub async fn status(&self) -> anyhow::Result<Value> {
        let auth = bench_auth();
        let headers = [("authorization", auth.as_str())];
        let (status, doc) =
            call(self.lan, Method::GET, "/v1/status", &headers, Bytes::new()).await?;
        ensure!(status == StatusCode::OK, "GET /v1/status: {status} {doc}");
        Ok(doc)
    }

    /// Waits (polling every [`POLL`]) until every module has completed a full sync.
    pub async fn wait_full_sync(&self, timeout: Duration) -> anyhow::Result<Value> {
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
    pub async fn wait_full_report(&self, timeout: Duration) -> anyhow::Result<Value> {
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

    pub async fn post_json(&self, path: &str) -> anyhow::Result<Value> {
        let auth = bench_auth();
        let headers = [("authorization", auth.as_str())];
        let (status, doc) = call(self.lan, Method::POST, path, &headers, Bytes::new()).await?;
        ensure!(status == StatusCode::OK, "POST {path}: {status} {doc}");
        Ok(doc)
    }
}

// ---------------------------------------------------------------------------------------------
// Keep-alive client and latencies

/// One keep-alive HTTP/1.1 connection, as a till holds one.
pub struct Conn {
    sender: SendRequest<Full<Bytes>>,
    host: String,
}

impl Conn {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Conn> {
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

    pub async fn send(
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
            .header(http::header::AUTHORIZATION, bench_auth())
            .body(Full::new(body))?;
        let resp = self.sender.send_request(req).await?;
        let status = resp.status();
        // Read the whole answer: a till needs it, and the connection is reused.
        resp.into_body().collect().await?;
        Ok(status)
    }
}

/// Latencies of one series.
pub struct Lat(pub Vec<Duration>);

impl Lat {
    /// Nearest-rank percentile.
    pub fn pct(&self, p: f64) -> Duration {
        let mut v = self.0.clone();
        v.sort_unstable();
        let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v.get(rank.saturating_sub(1)).copied().unwrap_or_default()
    }
    pub fn p50_ms(&self) -> f64 {
        self.pct(50.0).as_secs_f64() * 1e3
    }
    pub fn p99_ms(&self) -> f64 {
        self.pct(99.0).as_secs_f64() * 1e3
    }
    pub fn json_us(&self) -> Value {
        json!({
            "requests": self.0.len(),
            "p50_us": self.pct(50.0).as_secs_f64() * 1e6,
            "p99_us": self.pct(99.0).as_secs_f64() * 1e6,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Footprint, machine, report

pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmRSS in /proc/<pid>/status")
}

/// Apparent and allocated sizes of every file under `dir`: a database file may be grown
/// ahead of its contents, and sparse.
pub fn dir_size(dir: &Path) -> anyhow::Result<(u64, u64)> {
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

pub fn machine_info(started: chrono::DateTime<chrono::Utc>) -> Value {
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
        // The version only: a local suffix may name the build host or the virtualisation.
        "kernel": read("/proc/sys/kernel/osrelease").trim().split('-').next().unwrap_or(""),
        "arch": std::env::consts::ARCH,
        "cpu": cpu,
        "mem_total_kib": mem_kib,
        "temp_dir": std::env::temp_dir(),
        "source": source_info(),
    })
}

/// The commit measured, and whether the working tree differed from it (then the figures
/// are those of uncommitted code).
pub fn source_info() -> Value {
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

pub fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        (a / b * 1e3).round() / 1e3
    } else {
        0.0
    }
}

pub fn bytes_h(n: u64) -> String {
    match n {
        0..1_024 => format!("{n} B"),
        1_024..1_048_576 => format!("{:.1} KiB", n as f64 / 1_024.0),
        _ => format!("{:.2} MiB", n as f64 / 1_048_576.0),
    }
}

/// The line under a results page's title: when, on what machine, from which source.
pub fn machine_line(m: &Value) -> String {
    format!(
        "{} · {} × {} · {} · Linux {} · {:.1} GiB RAM · source {}{}\n",
        m["date"].as_str().unwrap_or("?"),
        m["nproc"].as_u64().unwrap_or(0),
        m["cpu"].as_str().unwrap_or("?"),
        m["arch"].as_str().unwrap_or("?"),
        m["kernel"].as_str().unwrap_or("?"),
        m["mem_total_kib"].as_f64().unwrap_or(0.0) / 1_048_576.0,
        m["source"]["commit"].as_str().unwrap_or("?"),
        if m["source"]["dirty"] == true {
            " + uncommitted changes"
        } else {
            ""
        },
    )
}

/// Writes `bench/results/<name>.json` and `<name>.md`, and prints the table.
pub fn write_results(name: &str, results: &Value, table: &str) -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("results");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(
        dir.join(format!("{name}.json")),
        serde_json::to_string_pretty(results)? + "\n",
    )?;
    std::fs::write(dir.join(format!("{name}.md")), table)?;
    println!("\n{table}");
    println!("written: {}/{name}.{{json,md}}", dir.display());
    Ok(())
}
