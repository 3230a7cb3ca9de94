//! The daemon under systemd's notify protocol, with the test playing systemd: it binds the
//! `NOTIFY_SOCKET` datagram socket, starts the real `storebox serve` with `WATCHDOG_USEC`
//! set (1 s, so pings every half second) and reads what the daemon says.
//!
//! READY and WATCHDOG must mean healthy, not started: pings go on through a hub outage, stop
//! when a loop is wedged (a fault switch of debug builds), and SIGTERM drains cleanly.

#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::json;
use support::{wait_for, Hub};

const STORE: &str = "shop-wd";
/// What the test tells the daemon its watchdog interval is.
const WATCHDOG_USEC: &str = "1000000";
/// Longer than any gap between two pings of a healthy daemon (0.5 s apart), with room for a
/// loaded machine; shorter than the daemon's limits for a wedged loop (10 s and more).
const PING_GAP: Duration = Duration::from_secs(4);

/// The service manager's end of `NOTIFY_SOCKET`: every line received, with when.
struct Systemd {
    path: PathBuf,
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
    reader: tokio::task::JoinHandle<()>,
}

impl Systemd {
    fn bind(dir: &Path) -> Systemd {
        let path = dir.join("notify.sock");
        let socket = tokio::net::UnixDatagram::bind(&path).unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let reader = tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf).await {
                let now = Instant::now();
                let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                let mut sink = sink.lock().unwrap();
                for line in text.lines().filter(|l| !l.is_empty()) {
                    sink.push((now, line.to_owned()));
                }
            }
        });
        Systemd {
            path,
            lines,
            reader,
        }
    }

    fn lines(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap().clone()
    }

    /// When the daemon last said `line` exactly, if it did.
    fn last(&self, line: &str) -> Option<Instant> {
        self.lines()
            .iter()
            .rev()
            .find(|(_, l)| l == line)
            .map(|(at, _)| *at)
    }

    /// How many `WATCHDOG=1` arrived after `since`.
    fn pings_since(&self, since: Instant) -> usize {
        self.lines()
            .iter()
            .filter(|(at, l)| *at > since && l == "WATCHDOG=1")
            .count()
    }

    /// Waits for a line after `since` that `matches`, and answers it.
    async fn wait_line(
        &self,
        what: &str,
        since: Instant,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> (Instant, String) {
        wait_for(what, timeout, || {
            let found = self
                .lines()
                .into_iter()
                .find(|(at, l)| *at >= since && matches(l));
            async move { found }
        })
        .await
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A `storebox serve` process started as systemd would start it; killed on drop.
struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    async fn start(hub: &Hub, systemd: &Systemd, env: &[(&str, &str)]) -> Daemon {
        let config = hub.box_config(STORE);
        support::prepare_lan(&config, lan_addr(hub));
        let log = config.with_file_name(format!("box-{}.log", support::free_port()));
        let out = std::fs::File::create(&log).unwrap();
        let mut command = Command::new(support::bin("storebox"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .env("NOTIFY_SOCKET", &systemd.path)
            .env("WATCHDOG_USEC", WATCHDOG_USEC)
            .env_remove("WATCHDOG_PID")
            .env_remove("STOREBOX_FAULT_WEDGE")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        let child = command.spawn().unwrap();
        Daemon { child, log }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM, as `systemctl stop` does.
    fn terminate(&self) {
        let status = Command::new("sh")
            .args(["-c", "kill -TERM \"$1\"", "sh"])
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit; answers how it exited.
    async fn wait_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let log = self.log.clone();
        let child = &mut self.child;
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                start.elapsed() < timeout,
                "storebox did not exit within {timeout:?}; its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The box's LAN address, from the config `storehub init` wrote.
fn lan_addr(hub: &Hub) -> SocketAddr {
    std::fs::read_to_string(hub.box_config(STORE))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("listen = \""))
        .and_then(|l| l.strip_suffix('"'))
        .unwrap()
        .parse()
        .unwrap()
}

/// Writes the test's config drop-in beside the box config.
fn dropin(hub: &Hub, text: &str) {
    let dir = hub.box_config(STORE).parent().unwrap().join("storebox.d");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("50-watchdog-test.toml"), text).unwrap();
}

async fn post_sale(lan: SocketAddr, id: &str) -> (StatusCode, serde_json::Value) {
    let body = json!({"id": id, "type": "sale", "total_cents": 1250}).to_string();
    support::call(lan, Method::POST, "/v1/activity", &[], Bytes::from(body)).await
}

/// Waits for READY=1 and checks the till API answers at once: ready means serving.
async fn wait_ready(systemd: &Systemd, since: Instant, lan: SocketAddr, daemon: &Daemon) {
    systemd
        .wait_line("READY=1", since, Duration::from_secs(30), |l| {
            l == "READY=1"
        })
        .await;
    let (status, doc) = support::call(lan, Method::GET, "/v1/status", &[], Bytes::new()).await;
    assert_eq!(status, StatusCode::OK, "{doc}\n{}", daemon.log_text());
}

/// Stops the daemon with SIGTERM: STOPPING=1, no ping after it, a successful exit soon.
async fn stop_cleanly(systemd: &Systemd, daemon: &mut Daemon) -> Duration {
    let sent = Instant::now();
    daemon.terminate();
    let (stopping, _) = systemd
        .wait_line("STOPPING=1", sent, Duration::from_secs(10), |l| {
            l == "STOPPING=1"
        })
        .await;
    let exit = daemon.wait_exit(Duration::from_secs(15)).await;
    let took = sent.elapsed();
    assert!(exit.success(), "{exit}; log:\n{}", daemon.log_text());
    assert_eq!(
        systemd.pings_since(stopping),
        0,
        "a ping after STOPPING=1: {:?}",
        systemd.lines()
    );
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_pings_go_on_through_a_hub_outage_and_sigterm_drains() {
    let mut hub = Hub::start(&[STORE]).await;
    let lan = lan_addr(&hub);
    // Delta pulls every 2 s, so the outage is felt by every sync process.
    dropin(&hub, "[sync]\ndelta_interval = \"2s\"\n");
    let systemd = Systemd::bind(hub.dir.path());
    let started = Instant::now();
    let mut daemon = Daemon::start(&hub, &systemd, &[]).await;
    wait_ready(&systemd, started, lan, &daemon).await;

    // Pings at half the interval, each with a status line; the first full sync shows.
    wait_for("pings", Duration::from_secs(20), || {
        let n = systemd.pings_since(started);
        async move { (n >= 4).then_some(()) }
    })
    .await;
    let (_, status) = systemd
        .wait_line(
            "STATUS= after a full sync",
            started,
            Duration::from_secs(30),
            |l| l.starts_with("STATUS=hub link up;") && l.contains("last full sync 20"),
        )
        .await;
    assert!(status.contains("pending activity 0;"), "{status}");

    // The shop's line goes down; a sale waits for the hub. Pings go on, for longer than any
    // loop may go without progress, while every sync process fails.
    hub.stop();
    let outage = Instant::now();
    let (s, answer) = post_sale(lan, "wd-sale-1").await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");
    systemd
        .wait_line(
            "STATUS= showing the outage",
            outage,
            Duration::from_secs(30),
            |l| l.starts_with("STATUS=hub link down;") && l.contains("pending activity 1;"),
        )
        .await;
    wait_for("15 s of outage with pings", Duration::from_secs(60), || {
        let last = systemd.last("WATCHDOG=1").unwrap();
        assert!(
            last.elapsed() < PING_GAP,
            "the pings stopped during the outage: {:?}\n{}",
            systemd.lines().last(),
            daemon.log_text()
        );
        async move { (outage.elapsed() > Duration::from_secs(15)).then_some(()) }
    })
    .await;
    assert!(systemd.pings_since(outage) >= 10, "{:?}", systemd.lines());

    // A sale acknowledged just before SIGTERM survives the stop.
    let (s, answer) = post_sale(lan, "wd-sale-2").await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");
    let took = stop_cleanly(&systemd, &mut daemon).await;
    assert!(took < Duration::from_secs(10), "stopping took {took:?}");
    let log = daemon.log_text();
    drop(daemon);

    let restarted = Instant::now();
    let mut daemon = Daemon::start(&hub, &systemd, &[]).await;
    wait_ready(&systemd, restarted, lan, &daemon).await;
    for id in ["wd-sale-1", "wd-sale-2"] {
        let (s, answer) = post_sale(lan, id).await;
        assert_eq!(
            (s, answer["stored"].as_str()),
            (StatusCode::OK, Some("duplicate")),
            "{id} was lost by the stop: {answer}\nlog of the first run:\n{log}"
        );
    }
    // The line comes back: the push delivers both, once each.
    hub.restart().await;
    let events = wait_for("both sales at the hub", Duration::from_secs(60), || async {
        let events = hub.activity(STORE).await;
        (events.len() >= 2).then_some(events)
    })
    .await;
    let ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
    assert_eq!(ids, ["wd-sale-1", "wd-sale-2"]);
    stop_cleanly(&systemd, &mut daemon).await;
}

// The fault switch exists only in debug builds (what `cargo test` builds), so the test does too.
#[cfg(debug_assertions)]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_scheduler_stops_the_pings_and_sigterm_still_drains() {
    let hub = Hub::start(&[STORE]).await;
    let lan = lan_addr(&hub);
    // The delta scheduler's first wait ends after 1 s; at its second it wedges.
    dropin(&hub, "[sync]\ndelta_interval = \"1s\"\n");
    let systemd = Systemd::bind(hub.dir.path());
    let started = Instant::now();
    let mut daemon = Daemon::start(&hub, &systemd, &[("STOREBOX_FAULT_WEDGE", "delta")]).await;
    wait_ready(&systemd, started, lan, &daemon).await;

    // The pings stop, while the daemon goes on serving tills.
    wait_for("the pings to stop", Duration::from_secs(60), || {
        let stopped = systemd
            .last("WATCHDOG=1")
            .is_some_and(|last| last.elapsed() > PING_GAP);
        async move { stopped.then_some(()) }
    })
    .await;
    let (_, status) = systemd
        .wait_line(
            "STATUS= naming the wedged loop",
            started,
            Duration::from_secs(10),
            |l| l.starts_with("STATUS=unhealthy:"),
        )
        .await;
    assert!(status.contains("delta pull scheduler"), "{status}");
    assert!(
        daemon.log_text().contains("withholding the ping"),
        "{}",
        daemon.log_text()
    );
    let (s, answer) = post_sale(lan, "wd-wedged-1").await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");

    stop_cleanly(&systemd, &mut daemon).await;
    drop(daemon);
    let restarted = Instant::now();
    let mut daemon = Daemon::start(&hub, &systemd, &[]).await;
    wait_ready(&systemd, restarted, lan, &daemon).await;
    let (s, answer) = post_sale(lan, "wd-wedged-1").await;
    assert_eq!(
        (s, answer["stored"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );
    stop_cleanly(&systemd, &mut daemon).await;
}
