//! The daemon's side of systemd's service protocol (`Type=notify`, `WatchdogSec=`):
//! `READY=1` once the box is healthy, `WATCHDOG=1` at half the watchdog interval while it stays
//! healthy, a one-line `STATUS=` with each of them, and `STOPPING=1` at shutdown.
//!
//! **READY and WATCHDOG mean healthy, not started.** A ping is sent only when, at that moment:
//!
//! - the LAN accept loop answers: the watchdog connects to the till API like a till would and
//!   asks `GET /v1/status` with a short timeout;
//! - a storage read succeeds within that timeout;
//! - every critical loop has shown progress recently: the activity writer thread, and the
//!   scheduler of each sync process (full, delta, push).
//!
//! **An outage never stops the watchdog.** Progress is never "the hub answered". A scheduler
//! waiting for its timer is *idle* and beats every [`TICK`] from inside that wait
//! ([`idle`]), however far away the timer is; it is stale only when it stops beating. A
//! scheduler running a sync is *busy*; every hub call is bounded by the hub timeout and
//! every sync process either ends its run or moves bytes on its hub link, so a busy
//! scheduler is stale only after [`Limits::busy_grace`] without either. A hub that refuses,
//! times out or answers garbage keeps every loop alive; a loop blocked forever (a lock never
//! released, a future that never resolves, a blocking call that never returns) stops the
//! pings, and systemd restarts the daemon. So does a runtime too starved to run the watchdog
//! task or to answer the probe.
//!
//! The loops report through process-wide atomics ([`beat`], [`idle`]) rather than a handle
//! passed down, so wiring a loop in is one call at the place it waits.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;

use crate::activity::Activity;
use crate::storage::BoxStore;
use crate::sync::SyncEngine;

/// How often a waiting loop beats. Also the writer thread's longest wait for a post.
pub const TICK: Duration = Duration::from_secs(1);

/// How long the LAN probe and the storage read may take before the check fails.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// After a failed check, how soon to check again: a passing glitch (a slow storage read under
/// load) should cost a late ping, not a missed one.
const RETRY: Duration = Duration::from_secs(1);

/// How often `STATUS=` is refreshed when systemd asked for no watchdog.
const STATUS_PERIOD: Duration = Duration::from_secs(30);

/// The loops that beat. The LAN accept loop is probed over HTTP instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loop {
    /// The activity writer thread (group commits of tills' posts).
    Writer,
    /// The full sync scheduler.
    Full,
    /// The delta pull scheduler.
    Delta,
    /// The activity push scheduler.
    Push,
}

impl Loop {
    fn index(self) -> usize {
        self as usize
    }

    fn name(self) -> &'static str {
        match self {
            Loop::Writer => "activity writer",
            Loop::Full => "full sync scheduler",
            Loop::Delta => "delta pull scheduler",
            Loop::Push => "activity push scheduler",
        }
    }
}

/// What a loop last said about itself.
struct Beat {
    /// Milliseconds since [`EPOCH`] of the last beat; 0 (never) counts as the epoch itself,
    /// so a loop gets its grace from the daemon's start to report.
    at_ms: AtomicU64,
    /// Waiting for its timer or an order (beats every [`TICK`]), as opposed to running.
    idle: AtomicBool,
}

static BEATS: [Beat; 4] = [const {
    Beat {
        at_ms: AtomicU64::new(0),
        idle: AtomicBool::new(false),
    }
}; 4];
static EPOCH: OnceLock<Instant> = OnceLock::new();

/// What the checker last told systemd, for the health check of a new slot (`ota.rs`).
static READY_SENT: AtomicBool = AtomicBool::new(false);
static WATCHDOG_ON: AtomicBool = AtomicBool::new(false);
static PINGS: AtomicU64 = AtomicU64::new(0);
static PROBLEMS: std::sync::Mutex<String> = std::sync::Mutex::new(String::new());

/// The watchdog's view of the daemon's health.
pub struct HealthView {
    /// `READY=1` was sent.
    pub ready: bool,
    /// systemd asked for watchdog pings.
    pub watchdog: bool,
    /// Pings sent since the start.
    pub pings: u64,
    /// Why the last check withheld its ping; empty when it passed.
    pub problems: String,
}

pub fn health() -> HealthView {
    HealthView {
        ready: READY_SENT.load(Ordering::Relaxed),
        watchdog: WATCHDOG_ON.load(Ordering::Relaxed),
        pings: PINGS.load(Ordering::Relaxed),
        problems: PROBLEMS.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    }
}

fn record_check(problems: &str, pinged: bool) {
    *PROBLEMS.lock().unwrap_or_else(|p| p.into_inner()) = problems.to_owned();
    if pinged {
        PINGS.fetch_add(1, Ordering::Relaxed);
    }
}

fn now_ms() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// Records that `which` is making progress now.
pub fn beat(which: Loop) {
    BEATS[which.index()]
        .at_ms
        .store(now_ms(), Ordering::Relaxed);
}

/// Marks `which` idle (and beats) while it lives; beats and marks it busy when dropped, which
/// is when the loop stops waiting and starts its work.
struct IdleGuard(Loop);

impl IdleGuard {
    fn enter(which: Loop) -> IdleGuard {
        beat(which);
        BEATS[which.index()].idle.store(true, Ordering::Relaxed);
        IdleGuard(which)
    }
}

impl Drop for IdleGuard {
    fn drop(&mut self) {
        beat(self.0);
        BEATS[self.0.index()].idle.store(false, Ordering::Relaxed);
    }
}

/// Wraps a scheduler's wait (its timer, or its whole `select!`) so the loop beats every
/// [`TICK`] while it waits, however long the wait: an idle loop is a live loop. Call it once
/// per loop iteration, where the loop waits.
pub fn idle<F: Future>(which: Loop, wait: F) -> impl Future<Output = F::Output> {
    let wedged = fault::wedge_now(which);
    let guard = (!wedged).then(|| IdleGuard::enter(which));
    async move {
        if wedged {
            // The debug-build fault switch: the loop stays here, idle, and never beats again.
            BEATS[which.index()].idle.store(true, Ordering::Relaxed);
            return std::future::pending().await;
        }
        let _guard = guard;
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut wait = std::pin::pin!(wait);
        loop {
            tokio::select! {
                out = wait.as_mut() => return out,
                _ = tick.tick() => beat(which),
            }
        }
    }
}

/// Test-only fault switch: `STOREBOX_FAULT_WEDGE=delta` (or `full`, `push`) makes that
/// scheduler block forever, without beating, from its second wait on (after its first
/// iteration). Read once, at the first wait of any loop. Absent from release builds unless
/// built with the `fault-injection` feature (the image's boot test does, on purpose).
#[cfg(any(debug_assertions, feature = "fault-injection"))]
mod fault {
    use super::*;

    static WEDGE: OnceLock<Option<Loop>> = OnceLock::new();
    static WAITS: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

    pub fn wedge_now(which: Loop) -> bool {
        let wedge = WEDGE.get_or_init(|| {
            let value = std::env::var("STOREBOX_FAULT_WEDGE").ok()?;
            let wedge = match value.as_str() {
                "full" => Loop::Full,
                "delta" => Loop::Delta,
                "push" => Loop::Push,
                other => {
                    tracing::warn!("STOREBOX_FAULT_WEDGE={other:?} names no loop; ignored");
                    return None;
                }
            };
            tracing::warn!("test fault: the {} will wedge", wedge.name());
            Some(wedge)
        });
        let waits = WAITS[which.index()].fetch_add(1, Ordering::Relaxed);
        *wedge == Some(which) && waits >= 1
    }
}

#[cfg(not(any(debug_assertions, feature = "fault-injection")))]
mod fault {
    pub fn wedge_now(_: super::Loop) -> bool {
        false
    }
}

/// How long a loop may go without showing progress.
#[derive(Debug, Clone, Copy)]
struct Limits {
    /// An idle scheduler beats every [`TICK`]; this many missed beats is a wedge.
    idle_stale: Duration,
    /// The writer beats every [`TICK`] and after each commit; a commit is one write and one
    /// `fdatasync`, so this long without a beat means storage or the thread is stuck.
    writer_stale: Duration,
    /// A busy scheduler may spend this long without ending its run or moving a byte on its
    /// hub link: one hub call (bounded by the hub timeout), the push's backoff pause after a
    /// failure (up to a minute), and applying an answer to storage.
    busy_grace: Duration,
}

impl Limits {
    fn new(hub_timeout: Duration) -> Limits {
        Limits {
            idle_stale: TICK * 10,
            writer_stale: Duration::from_secs(30),
            busy_grace: hub_timeout + Duration::from_secs(90),
        }
    }
}

/// A loop's state as the watchdog sees it at one check.
#[derive(Debug, Clone, Copy)]
struct LoopView {
    idle: bool,
    beat_ms: u64,
    /// When the watchdog last saw the loop's hub link move bytes.
    bytes_moved_ms: u64,
}

/// For how long `which` has shown no progress, if longer than it may.
fn stale_for(which: Loop, view: LoopView, now_ms: u64, limits: Limits) -> Option<Duration> {
    let (since, limit) = match which {
        Loop::Writer => (view.beat_ms, limits.writer_stale),
        _ if view.idle => (view.beat_ms, limits.idle_stale),
        _ => (view.beat_ms.max(view.bytes_moved_ms), limits.busy_grace),
    };
    let silent = Duration::from_millis(now_ms.saturating_sub(since));
    (silent > limit).then_some(silent)
}

/// What the watchdog checks.
pub struct Watched {
    /// Where the till API answers on this machine.
    pub lan: SocketAddr,
    /// TLS to the till API (pinned to its own certificate) when it is served over TLS.
    pub lan_tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    pub store: Arc<BoxStore>,
    pub activity: Arc<Activity>,
    pub engine: Arc<SyncEngine>,
    pub hub_timeout: Duration,
    /// Whether the push scheduler runs (`[sync] push`); when off it is not watched.
    pub push: bool,
}

/// The running watchdog; [`Watchdog::stopping`] ends it.
pub struct Watchdog {
    task: Option<tokio::task::JoinHandle<()>>,
    sender: Arc<Sender>,
}

/// Sends notifications one at a time, and none but `STOPPING=1` once stopping: aborting the
/// checker task alone could still let a ping it is sending at that moment follow it.
#[derive(Default)]
struct Sender {
    stopping: std::sync::Mutex<bool>,
}

impl Sender {
    fn send(&self, states: &[NotifyState]) {
        let stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        if !*stopping {
            notify(states);
        }
    }

    fn stop(&self, states: &[NotifyState]) {
        let mut stopping = self.stopping.lock().unwrap_or_else(|p| p.into_inner());
        *stopping = true;
        notify(states);
    }
}

impl Watchdog {
    /// Starts checking and notifying, when systemd (or a test playing it) gave a
    /// `NOTIFY_SOCKET`; otherwise does nothing.
    pub fn start(watched: Watched) -> Watchdog {
        let sender = Arc::new(Sender::default());
        if std::env::var_os("NOTIFY_SOCKET").is_none() {
            return Watchdog { task: None, sender };
        }
        let interval = sd_notify::watchdog_enabled();
        match interval {
            Some(i) => tracing::info!(
                "systemd watchdog: {} ms, pinging every {} ms while healthy",
                i.as_millis(),
                (i / 2).as_millis()
            ),
            None => tracing::info!("systemd notification socket without a watchdog"),
        }
        let checker = Checker::new(watched, sender.clone());
        Watchdog {
            task: Some(tokio::spawn(checker.run(interval))),
            sender,
        }
    }

    /// Stops the pings and tells systemd the daemon is stopping (it then waits up to
    /// `TimeoutStopSec=` for the drain).
    pub fn stopping(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            self.sender.stop(&[
                NotifyState::Stopping,
                NotifyState::Status("stopping: draining till connections and activity"),
            ]);
        }
    }
}

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        // The service manager went away or its queue is full: nothing to do but carry on;
        // if it matters, the missing pings will tell.
        tracing::debug!("sd_notify: {e}");
    }
}

/// The result of one check.
struct Health {
    problems: Vec<String>,
    /// The `STATUS=` line.
    status: String,
}

struct Checker {
    watched: Watched,
    sender: Arc<Sender>,
    loops: Vec<Loop>,
    limits: Limits,
    /// Per loop: the link byte total seen at the previous check, and when it last changed.
    bytes: [(u64, u64); 4],
    /// A storage read that outlived its timeout: never start a second one beside it.
    stuck_read: Option<tokio::task::JoinHandle<()>>,
}

/// What the storage read returns besides proving that storage answers.
struct StoreFacts {
    pending: u64,
    last_full_ok_ms: Option<i64>,
}

impl Checker {
    fn new(watched: Watched, sender: Arc<Sender>) -> Checker {
        let mut loops = vec![Loop::Writer, Loop::Full, Loop::Delta];
        if watched.push {
            loops.push(Loop::Push);
        }
        Checker {
            limits: Limits::new(watched.hub_timeout),
            watched,
            sender,
            loops,
            bytes: [(0, 0); 4],
            stuck_read: None,
        }
    }

    async fn run(mut self, interval: Option<Duration>) {
        let period = interval.map_or(STATUS_PERIOD, |i| i / 2);
        let mut ready = false;
        let mut last_problems = String::new();
        WATCHDOG_ON.store(interval.is_some(), Ordering::Relaxed);
        loop {
            let health = self.check().await;
            if health.problems.is_empty() {
                if !last_problems.is_empty() {
                    tracing::info!("watchdog: healthy again");
                    last_problems.clear();
                }
                let mut states = vec![NotifyState::Status(&health.status)];
                if !ready {
                    states.push(NotifyState::Ready);
                }
                if interval.is_some() {
                    states.push(NotifyState::Watchdog);
                }
                self.sender.send(&states);
                ready = true;
                READY_SENT.store(true, Ordering::Relaxed);
                record_check("", interval.is_some());
                tokio::time::sleep(period).await;
            } else {
                let problems = health.problems.join("; ");
                if problems != last_problems {
                    tracing::warn!("watchdog: withholding the ping: {problems}");
                    last_problems = problems.clone();
                }
                record_check(&problems, false);
                let status = format!("unhealthy: {problems}");
                self.sender.send(&[NotifyState::Status(&status)]);
                tokio::time::sleep(RETRY.min(period)).await;
            }
        }
    }

    async fn check(&mut self) -> Health {
        let mut problems = self.stale_loops();
        if let Err(e) = self.probe_lan().await {
            problems.push(format!(
                "the till API on {} does not answer: {e}",
                self.watched.lan
            ));
        }
        let facts = match self.read_storage().await {
            Ok(facts) => Some(facts),
            Err(e) => {
                problems.push(e);
                None
            }
        };
        let link = self.watched.engine.live.link();
        let last_full = match facts.as_ref().and_then(|f| f.last_full_ok_ms) {
            Some(ms) => chrono::DateTime::from_timestamp_millis(ms)
                .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
                .unwrap_or_else(|| "?".into()),
            None => "never".into(),
        };
        let failed = match self.watched.engine.live.last_full() {
            Some(report) if !report.ok => " (last attempt failed)",
            _ => "",
        };
        let status = format!(
            "hub link {}; pending activity {}; last full sync {last_full}{failed}",
            link.state,
            facts.map_or_else(|| "?".into(), |f| f.pending.to_string()),
        );
        Health { problems, status }
    }

    /// The loops that have shown no progress for longer than they may, as problems.
    fn stale_loops(&mut self) -> Vec<String> {
        let now = now_ms();
        let links = self.watched.engine.bytes();
        let total = |names: &[&str]| -> u64 {
            names
                .iter()
                .filter_map(|n| links.get(n))
                .map(|(sent, received)| sent + received)
                .sum()
        };
        let mut problems = Vec::new();
        for &which in &self.loops {
            // A full sync pushes pending activity first, on the push link.
            let moved = match which {
                Loop::Writer => 0,
                Loop::Full => total(&["full", "push"]),
                Loop::Delta => total(&["delta"]),
                Loop::Push => total(&["push"]),
            };
            let seen = &mut self.bytes[which.index()];
            if moved != seen.0 {
                *seen = (moved, now);
            }
            let beat = &BEATS[which.index()];
            let view = LoopView {
                idle: beat.idle.load(Ordering::Relaxed),
                beat_ms: beat.at_ms.load(Ordering::Relaxed),
                bytes_moved_ms: seen.1,
            };
            if let Some(silent) = stale_for(which, view, now, self.limits) {
                problems.push(format!(
                    "the {} has shown no progress for {} s",
                    which.name(),
                    silent.as_secs()
                ));
            }
        }
        problems
    }

    /// Asks the till API for its status, as a till on the LAN would.
    async fn probe_lan(&self) -> Result<(), String> {
        let call = storebox_http::call_over(
            self.watched.lan,
            self.watched.lan_tls.as_ref(),
            http::Method::GET,
            "/v1/status",
            &[],
            bytes::Bytes::new(),
        );
        match tokio::time::timeout(PROBE_TIMEOUT, call).await {
            Ok(Ok((status, _))) if status.is_success() => Ok(()),
            Ok(Ok((status, _))) => Err(format!("it answered {status}")),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {} s", PROBE_TIMEOUT.as_secs())),
        }
    }

    /// Reads the module states from storage (and the pending activity) on a blocking thread.
    async fn read_storage(&mut self) -> Result<StoreFacts, String> {
        if let Some(previous) = &self.stuck_read {
            if !previous.is_finished() {
                return Err("a storage read started earlier has still not returned".into());
            }
            self.stuck_read = None;
        }
        let store = self.watched.store.clone();
        let activity = self.watched.activity.clone();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let read = tokio::task::spawn_blocking(move || {
            let facts = store.modules().map(|modules| StoreFacts {
                pending: activity.pending().pending,
                last_full_ok_ms: modules.values().filter_map(|m| m.last_full_ok_ms).max(),
            });
            let _ = tx.send(facts);
        });
        match tokio::time::timeout(PROBE_TIMEOUT, rx).await {
            Ok(Ok(Ok(facts))) => Ok(facts),
            Ok(Ok(Err(e))) => Err(format!("reading storage failed: {e}")),
            Ok(Err(_)) => Err("the storage read ended without an answer".into()),
            Err(_) => {
                self.stuck_read = Some(read);
                Err(format!(
                    "a storage read took more than {} s",
                    PROBE_TIMEOUT.as_secs()
                ))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const S: u64 = 1000;

    fn limits() -> Limits {
        Limits::new(Duration::from_secs(60))
    }

    fn view(idle: bool, beat_s: u64, bytes_s: u64) -> LoopView {
        LoopView {
            idle,
            beat_ms: beat_s * S,
            bytes_moved_ms: bytes_s * S,
        }
    }

    #[test]
    fn an_idle_scheduler_is_alive_while_it_beats_whatever_its_timer() {
        // Beating every second inside a five-minute (or a day's) wait.
        assert_eq!(
            stale_for(Loop::Delta, view(true, 3599, 0), 3600 * S, limits()),
            None
        );
        // A wait that stopped beating is a wedge, even though its timer is far away.
        assert_eq!(
            stale_for(Loop::Delta, view(true, 100, 0), 111 * S, limits()),
            Some(Duration::from_secs(11))
        );
    }

    #[test]
    fn a_busy_scheduler_has_the_hub_timeout_and_its_own_bytes_as_grace() {
        // In one hub call that will time out at 60 s, plus the push backoff: alive.
        assert_eq!(
            stale_for(Loop::Push, view(false, 100, 0), 100 * S + 149 * S, limits()),
            None
        );
        // A long catch-up push that keeps moving bytes: alive, however long it runs.
        assert_eq!(
            stale_for(Loop::Full, view(false, 100, 3000), 3010 * S, limits()),
            None
        );
        // Blocked past any bounded call with no byte moving: wedged.
        assert_eq!(
            stale_for(Loop::Full, view(false, 100, 0), 100 * S + 151 * S, limits()),
            Some(Duration::from_secs(151))
        );
    }

    #[test]
    fn the_writer_must_beat_within_its_own_limit() {
        assert_eq!(
            stale_for(Loop::Writer, view(false, 10, 0), 39 * S, limits()),
            None
        );
        assert!(stale_for(Loop::Writer, view(false, 10, 0), 41 * S, limits()).is_some());
    }

    #[tokio::test]
    async fn a_wait_is_idle_until_it_ends_or_is_dropped() {
        let slot = &BEATS[Loop::Delta.index()];
        // Ends by itself: its timer fired.
        let wait = idle(Loop::Delta, tokio::time::sleep(Duration::from_millis(100)));
        assert!(slot.idle.load(Ordering::Relaxed));
        wait.await;
        assert!(!slot.idle.load(Ordering::Relaxed));
        // Dropped: an order arrived first in the scheduler's `select!`.
        let wait = idle(Loop::Delta, std::future::pending::<()>());
        assert!(slot.idle.load(Ordering::Relaxed));
        drop(wait);
        assert!(!slot.idle.load(Ordering::Relaxed));
    }

    #[tokio::test]
    async fn a_long_wait_beats_on_every_tick() {
        let slot = &BEATS[Loop::Push.index()];
        let wait = idle(Loop::Push, std::future::pending::<()>());
        let entered = slot.at_ms.load(Ordering::Relaxed);
        let mut wait = std::pin::pin!(wait);
        tokio::select! {
            _ = wait.as_mut() => unreachable!(),
            _ = tokio::time::sleep(TICK + TICK / 2) => {}
        }
        let beat = slot.at_ms.load(Ordering::Relaxed);
        assert!(
            beat >= entered + TICK.as_millis() as u64 - 50,
            "{entered} {beat}"
        );
        assert!(slot.idle.load(Ordering::Relaxed));
    }

    /// The board overlay's config template must stay a valid config once its placeholders
    /// are filled in, and must refuse to start while they are not. Kept here, beside the
    /// rest of what the board's systemd unit relies on.
    #[test]
    fn the_board_config_template_loads_once_filled_in() {
        let template = include_str!("../board/common/rootfs-overlay/etc/storebox/storebox.toml");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storebox.toml");
        std::fs::write(&path, template).unwrap();
        assert!(crate::config::BoxConfig::load(&path).is_err());
        let filled = template
            .replace("@STORE_ID@", "shop-001")
            .replace("@HUB_HOST@", "hub.example.com");
        assert!(!filled.contains('@'), "a placeholder is left: {filled}");
        std::fs::write(&path, filled).unwrap();
        let config = crate::config::BoxConfig::load(&path).unwrap();
        assert_eq!(config.store_id, "shop-001");
        assert_eq!(config.data_dir, std::path::Path::new("/var/lib/storebox"));
    }
}
