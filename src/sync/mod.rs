//! The seed's three sync processes, each its own task, sharing one HTTP/2 connection to the
//! hub (see [`link`]), plus the change watch that wakes the delta pull:
//!
//! - **full sync** ([`SyncEngine::run_full`]) at the configured local times, on demand, on a
//!   new box, and for any module whose delta the hub can no longer serve: uploads pending
//!   activity, then makes every module exactly the hub's;
//! - **delta pull** ([`SyncEngine::run_delta`]) every `delta_interval`: the day's changes;
//! - **activity push** ([`SyncEngine::push_pending`]) as events arrive, in order, in batches;
//! - **change watch** (`watch_task`), when switched on: a request the hub holds open until a
//!   module changes, so a price change reaches the tills in seconds without polling.
//!
//! A full sync reconciles rather than downloads: a module the box holds is compared by digest,
//! caught up by the changes the hub still has, or repaired bucket by bucket; only a module
//! the box does not hold, or one that reconciliation could not make equal, comes whole. The
//! result is checked against the hub's digest every time: an exact cancel and replace.
//!
//! Each module keeps its own cursor, error and backoff: a module the hub fails to serve, or
//! whose payload does not decode, is reported and retried later while the others apply.
//! Nothing here is on a till's path: tills read the local database and never wait on a sync.

pub mod link;
pub mod plan;
pub mod sharing;
pub mod tcp;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use storebox_protocol as proto;
use tokio::sync::{mpsc, oneshot, Notify};

use crate::activity::Activity;
use crate::status::LiveStatus;
use crate::storage::{ApplyKind, BoxStore, ModuleApply};
use link::{HubLink, HubTarget, LinkError, LinkSettings, Process, WireStats};

/// Longest pause between retries of a failing process or module.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// How long the hub holds a change watch before answering "nothing". Each round costs the
/// line a few hundred bytes, and keeps NAT state on the shop's router alive.
const WATCH_WAIT: Duration = Duration::from_secs(600);

/// With a working change watch, the periodic delta pull runs only this often, as a safety net.
const POLL_UNDER_WATCH: Duration = Duration::from_secs(3600);

/// Rounds of a full sync: compare, then repair what differs, then whole records for what
/// still differs.
const FULL_ROUNDS: usize = 3;

/// What one run of a sync process did, as `storebox sync` and `POST /v1/sync/*` show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    pub process: &'static str,
    pub ok: bool,
    /// Link-level failure, when the run could not complete at all.
    pub error: Option<String>,
    pub modules: BTreeMap<String, ModuleReport>,
    pub activity_pushed: u64,
    /// Bytes the link's socket sent and received during the run, TLS included (other
    /// processes running at the same moment count here too).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Of which request and answer bodies of this run.
    pub body_bytes_sent: u64,
    pub body_bytes_received: u64,
    /// HTTP requests this run's process sent to the hub (round trips; a request repeated on
    /// a new connection counts twice).
    pub requests: u64,
    pub duration_ms: u64,
}

/// What a run did to one module.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ModuleReport {
    pub ok: bool,
    pub upserted: u64,
    pub deleted: u64,
    pub unchanged: u64,
    pub quarantined: u64,
    pub error: Option<String>,
    /// The hub can no longer serve this module's delta: a full sync of it was scheduled.
    pub reset_needed: bool,
    /// How a full sync made this module exact: "unchanged", "changes", "repaired" or
    /// "records".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<&'static str>,
    /// Payload bytes the module's answers carried.
    pub bytes: u64,
}

/// The sync settings the engine needs.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    /// The box's own full sync times, or the hub's slot.
    pub full_sync_at: plan::FullSyncAt,
    pub delta_interval: Option<Duration>,
    pub push: bool,
    pub push_batch: usize,
    /// Keep a change watch open on the hub connection.
    pub notify: bool,
    pub link: LinkSettings,
}

type Reply = oneshot::Sender<SyncReport>;

/// The order queues of the full sync and delta pull tasks, taken when they start.
type Receivers = (mpsc::Receiver<FullOrder>, mpsc::Receiver<Option<Reply>>);

/// A request to the full sync task: which modules (empty: all), and who waits for the report.
struct FullOrder {
    modules: Vec<String>,
    reply: Option<Reply>,
}

/// The three processes and what they share.
pub struct SyncEngine {
    store: Arc<BoxStore>,
    activity: Arc<Activity>,
    pub live: Arc<LiveStatus>,
    settings: SyncSettings,
    link: HubLink,
    full_tx: mpsc::Sender<FullOrder>,
    delta_tx: mpsc::Sender<Option<Reply>>,
    /// When the change watch last had an answer from the hub (ms since the epoch; 0: never).
    watch_ok_ms: std::sync::atomic::AtomicI64,
    /// A change watch is held open by the hub right now.
    watch_open: std::sync::atomic::AtomicBool,
    /// Wakes the push task when a till posts an event.
    pub push_wake: Arc<Notify>,
    /// One push at a time: the push task and a full sync both push.
    push_lock: tokio::sync::Mutex<()>,
    receivers: std::sync::Mutex<Option<Receivers>>,
    /// The full sync slot the hub gave this box, seconds after local midnight;
    /// `u32::MAX` when it gave none.
    hub_slot: std::sync::atomic::AtomicU32,
}

/// The `meta` entry keeping the hub's full sync slot (`u64::MAX`: none).
const HUB_SLOT_META: &str = "hub_full_sync_slot";

/// Cuts `text` to at most `max` bytes on a character boundary.
fn cut(text: &str, max: usize) -> String {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl SyncEngine {
    pub fn new(
        store: Arc<BoxStore>,
        activity: Arc<Activity>,
        live: Arc<LiveStatus>,
        target: Arc<HubTarget>,
        settings: SyncSettings,
    ) -> Arc<SyncEngine> {
        let (full_tx, full_rx) = mpsc::channel(16);
        let (delta_tx, delta_rx) = mpsc::channel(16);
        let link = HubLink::new(target, &settings.link);
        // A slot the hub gave before a restart; an unreadable one is learnt again at the
        // next full sync.
        let hub_slot = match store.meta(HUB_SLOT_META) {
            Ok(Some(s)) if s < u64::from(plan::DAY_S) => s as u32,
            _ => u32::MAX,
        };
        Arc::new(SyncEngine {
            store,
            activity,
            live,
            settings,
            link,
            full_tx,
            delta_tx,
            watch_ok_ms: std::sync::atomic::AtomicI64::new(0),
            watch_open: std::sync::atomic::AtomicBool::new(false),
            push_wake: Arc::new(Notify::new()),
            push_lock: tokio::sync::Mutex::new(()),
            receivers: std::sync::Mutex::new(Some((full_rx, delta_rx))),
            hub_slot: std::sync::atomic::AtomicU32::new(hub_slot),
        })
    }

    /// The daily full sync times in force and where they come from ("config", "hub" or
    /// "default"): see [`plan::full_sync_schedule`].
    pub fn full_sync_schedule(&self) -> (Vec<crate::config::TimeOfDay>, &'static str) {
        plan::full_sync_schedule(&self.settings.full_sync_at, self.hub_slot())
    }

    /// Body bytes sent and received by each process, for status.
    pub fn bytes(&self) -> BTreeMap<&'static str, (u64, u64)> {
        Process::ALL
            .into_iter()
            .map(|p| {
                let b = self.link.wire.process(p);
                (
                    p.name(),
                    (
                        b.sent.load(Ordering::Relaxed),
                        b.received.load(Ordering::Relaxed),
                    ),
                )
            })
            .collect()
    }

    /// The hub link, for the firmware update task.
    pub fn link(&self) -> &HubLink {
        &self.link
    }

    /// Everything the hub link counts.
    pub fn wire(&self) -> &WireStats {
        &self.link.wire
    }

    /// Whether the change watch is on and working: held open by the hub now, or answered
    /// recently.
    pub fn watching(&self) -> bool {
        let last = self.watch_ok_ms.load(Ordering::Relaxed);
        self.settings.notify
            && (self.watch_open.load(Ordering::Relaxed)
                || (last > 0
                    && chrono::Utc::now().timestamp_millis() - last
                        < (WATCH_WAIT.as_millis() as i64) + 120_000))
    }

    /// Starts the three tasks. Call once.
    pub fn start(self: &Arc<Self>) {
        let Some((full_rx, delta_rx)) = self.receivers.lock().ok().and_then(|mut r| r.take())
        else {
            return;
        };
        tokio::spawn(self.clone().full_task(full_rx));
        tokio::spawn(self.clone().delta_task(delta_rx));
        tokio::spawn(self.clone().push_task());
        tokio::spawn(self.clone().watch_task());
    }

    /// Asks for a full sync now and waits for its report.
    pub async fn full_now(&self) -> SyncReport {
        let (reply, answer) = oneshot::channel();
        let order = FullOrder {
            modules: Vec::new(),
            reply: Some(reply),
        };
        if self.full_tx.send(order).await.is_err() {
            return stopped("full");
        }
        answer.await.unwrap_or_else(|_| stopped("full"))
    }

    /// Asks for a delta pull now and waits for its report.
    pub async fn delta_now(&self) -> SyncReport {
        let (reply, answer) = oneshot::channel();
        if self.delta_tx.send(Some(reply)).await.is_err() {
            return stopped("delta");
        }
        answer.await.unwrap_or_else(|_| stopped("delta"))
    }

    async fn full_task(self: Arc<Self>, mut orders: mpsc::Receiver<FullOrder>) {
        let mut failures = 0u32;
        // A new box, or one that never completed a full sync of some module, syncs at once.
        let mut due_now = match self.modules().await {
            Ok(modules) => plan::needs_initial_full(&modules),
            Err(_) => true,
        };
        // After a failure only what failed is fetched again: one module the hub cannot serve
        // must not make the box download the whole store at every retry.
        let mut retry: Option<(tokio::time::Instant, Vec<String>)> = None;
        loop {
            let now = chrono::Local::now();
            let (times, _) = self.full_sync_schedule();
            let scheduled = plan::next_full_sync(now.naive_local(), &times)
                .and_then(|next| (next - now.naive_local()).to_std().ok())
                .map(|wait| tokio::time::Instant::now() + wait);
            // What to sync when the timer fires, and when it fires.
            let (wake, timed_modules) = match (due_now, scheduled, &retry) {
                (true, _, _) => (Some(tokio::time::Instant::now()), Vec::new()),
                (false, Some(at), Some((r, modules))) if *r < at => (Some(*r), modules.clone()),
                (false, None, Some((r, modules))) => (Some(*r), modules.clone()),
                (false, at, _) => (at, Vec::new()),
            };
            let sleep = crate::watchdog::idle(crate::watchdog::Loop::Full, async {
                match wake {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            });
            let (modules, reply) = tokio::select! {
                _ = sleep => (timed_modules, None),
                order = orders.recv() => match order {
                    Some(order) => (order.modules, order.reply),
                    None => return,
                },
            };
            let report = self.run_full(modules.clone()).await;
            due_now = false;
            if report.ok {
                failures = 0;
                retry = None;
            } else {
                let wait = plan::backoff(failures, MAX_BACKOFF, plan::jitter());
                failures = failures.saturating_add(1);
                let again = if report.error.is_some() {
                    modules
                } else {
                    report
                        .modules
                        .iter()
                        .filter(|(_, m)| m.error.is_some())
                        .map(|(name, _)| name.clone())
                        .collect()
                };
                tracing::warn!(
                    "full sync incomplete, retrying {} in {}s: {}",
                    if again.is_empty() {
                        "every module".to_owned()
                    } else {
                        again.join(", ")
                    },
                    wait.as_secs(),
                    report
                        .error
                        .clone()
                        .unwrap_or_else(|| "some modules failed".into())
                );
                retry = Some((tokio::time::Instant::now() + wait, again));
            }
            if let Some(reply) = reply {
                let _ = reply.send(report);
            }
        }
    }

    async fn delta_task(self: Arc<Self>, mut orders: mpsc::Receiver<Option<Reply>>) {
        let mut failures = 0u32;
        let mut last_run = tokio::time::Instant::now();
        let mut next = self
            .settings
            .delta_interval
            .map(|i| tokio::time::Instant::now() + i);
        loop {
            let sleep = crate::watchdog::idle(crate::watchdog::Loop::Delta, async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            });
            let (reply, timed) = tokio::select! {
                _ = sleep => (None, true),
                order = orders.recv() => match order {
                    Some(reply) => (reply, false),
                    None => return,
                },
            };
            // While the change watch works, the hub tells the box when to pull: the timer
            // only runs a safety pull now and then.
            if timed && self.watching() && last_run.elapsed() < POLL_UNDER_WATCH {
                if let Some(interval) = self.settings.delta_interval {
                    next = Some(tokio::time::Instant::now() + interval);
                }
                continue;
            }
            last_run = tokio::time::Instant::now();
            let report = self.run_delta().await;
            if let Some(interval) = self.settings.delta_interval {
                // After a link failure retry sooner than the interval, so a shop whose line
                // comes back catches up in seconds, not at the next period.
                let wait = if report.error.is_some() {
                    let wait = plan::backoff(failures, interval.min(MAX_BACKOFF), plan::jitter());
                    failures = failures.saturating_add(1);
                    wait
                } else {
                    failures = 0;
                    interval
                };
                next = Some(tokio::time::Instant::now() + wait);
            }
            if let Some(reply) = reply {
                let _ = reply.send(report);
            }
        }
    }

    async fn push_task(self: Arc<Self>) {
        if !self.settings.push {
            tracing::info!("activity push is off: full sync carries the activity");
            return;
        }
        let mut failures = 0u32;
        let mut wait = Duration::from_secs(1);
        loop {
            // A post wakes the task at once; the timer catches events left by a failed push
            // or stored before start.
            tokio::select! {
                _ = self.push_wake.notified() => {}
                _ = crate::watchdog::idle(
                    crate::watchdog::Loop::Push,
                    tokio::time::sleep(wait),
                ) => {}
            }
            match self.push_pending().await {
                Ok(_) => {
                    failures = 0;
                    wait = Duration::from_secs(1);
                }
                Err(e) => {
                    wait = plan::backoff(failures, Duration::from_secs(60), plan::jitter());
                    failures = failures.saturating_add(1);
                    tracing::warn!("activity push failed, retrying in {}s: {e}", wait.as_secs());
                    // Do not let the next post wake a push into a link that just failed.
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Keeps a change watch open on the hub and pulls a delta when it says a module moved.
    async fn watch_task(self: Arc<Self>) {
        if !self.settings.notify {
            return;
        }
        let mut failures = 0u32;
        loop {
            let outcome: Result<bool, String> = async {
                let modules = self.modules().await.map_err(|e| e.to_string())?;
                // Until the first full sync has brought every module, a watch would only
                // say "everything changed" and start a delta racing the full sync.
                if plan::needs_initial_full(&modules) {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return Ok(true);
                }
                let request = proto::WatchRequest {
                    cursors: plan::delta_request(&modules, &[]).cursors,
                    wait_ms: WATCH_WAIT.as_millis() as u64,
                };
                let body = proto::encode(&request, 3).map_err(|e| e.to_string())?;
                let answer = self
                    .link
                    .post_within(
                        Process::Watch,
                        proto::PATH_WATCH,
                        body,
                        WATCH_WAIT + self.link.timeout(),
                        Some(&self.watch_open),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let answer: proto::WatchAnswer =
                    proto::decode(&answer, "a watch answer").map_err(|e| e.to_string())?;
                self.watch_ok_ms
                    .store(chrono::Utc::now().timestamp_millis(), Ordering::Relaxed);
                if answer.changed.is_empty() {
                    return Ok(true);
                }
                tracing::debug!("the hub says {:?} changed: pulling", answer.changed);
                let (reply, report) = oneshot::channel();
                self.delta_tx
                    .send(Some(reply))
                    .await
                    .map_err(|_| "the delta task has stopped".to_owned())?;
                let report = report
                    .await
                    .map_err(|_| "the delta task has stopped".to_owned())?;
                // A pull that could not bring the module up to date would make the watch
                // answer at once again: pause as after a failure.
                Ok(report.ok && !report.modules.values().any(|m| m.reset_needed))
            }
            .await;
            match outcome {
                Ok(true) => failures = 0,
                Ok(false) | Err(_) => {
                    let wait = plan::backoff(failures, MAX_BACKOFF, plan::jitter());
                    failures = failures.saturating_add(1);
                    if let Err(e) = outcome {
                        tracing::debug!("change watch failed, again in {}s: {e}", wait.as_secs());
                    }
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn modules(
        &self,
    ) -> Result<BTreeMap<String, crate::storage::ModuleState>, crate::storage::StorageError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.modules())
            .await
            .map_err(|e| crate::storage::StorageError::Task(e.to_string()))?
    }

    /// Pushes every pending event, oldest first, in batches. Returns how many the hub took.
    pub async fn push_pending(&self) -> Result<u64, String> {
        let _one_at_a_time = self.push_lock.lock().await;
        let mut pushed = 0u64;
        loop {
            let activity = self.activity.clone();
            let batch_size = self.settings.push_batch;
            let events = tokio::task::spawn_blocking(move || activity.unpushed(batch_size))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("{e:#}"))?;
            let Some(last_seq) = events.last().map(|(seq, _)| *seq) else {
                return Ok(pushed);
            };
            let batch = proto::ActivityBatch {
                events: events
                    .into_iter()
                    .map(|(_, e)| proto::PushedEvent {
                        id: e.id,
                        received_at_ms: e.received_at_ms,
                        event: e.event,
                    })
                    .collect(),
            };
            let n = batch.events.len() as u64;
            let body = proto::encode(&batch, 3).map_err(|e| e.to_string())?;
            let answer = match self
                .link
                .post(Process::Push, proto::PATH_ACTIVITY, body)
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    self.live.link_failed(&e.to_string());
                    return Err(e.to_string());
                }
            };
            self.live.link_ok();
            let ack: proto::ActivityAck =
                proto::decode(&answer, "an activity acknowledgement").map_err(|e| e.to_string())?;
            tracing::debug!(
                "pushed {n} events: {} new at the hub, {} already there",
                ack.accepted,
                ack.duplicates
            );
            self.activity.mark_pushed(last_seq);
            pushed += n;
        }
    }

    /// One delta pull, following `more` until every module is up to date.
    pub async fn run_delta(&self) -> SyncReport {
        let mark = self.mark(Process::Delta);
        let mut report = SyncReport {
            process: "delta",
            ..Default::default()
        };
        let mut resets = BTreeSet::new();
        let result: Result<(), String> = async {
            loop {
                let modules = self.modules().await.map_err(|e| e.to_string())?;
                let request = plan::delta_request(&modules, &self.live.backing_off());
                let body = proto::encode(&request, 3).map_err(|e| e.to_string())?;
                let answer = self.call(Process::Delta, proto::PATH_DELTA, body).await?;
                let mut applies = Vec::new();
                let mut checks = Vec::new();
                let mut more = false;
                let now = hub_or_local_time(answer.hub_time_ms);
                for frame in answer.frames {
                    let Some(entry) = self.frame_entry(&mut report, &frame) else {
                        continue;
                    };
                    match proto::decode_payload::<proto::ModuleDelta>(
                        &frame.payload,
                        "a module delta",
                    ) {
                        Ok(proto::ModuleDelta::Changes {
                            changes,
                            cursor,
                            more: module_more,
                            digest,
                        }) => {
                            more |= module_more;
                            if let Some(digest) = digest {
                                checks.push((frame.module.clone(), digest));
                            }
                            applies.push(ModuleApply {
                                module: frame.module.clone(),
                                indexes: frame.indexes,
                                kind: ApplyKind::Delta {
                                    from_cursor: modules.get(&frame.module).map_or(0, |m| m.cursor),
                                    changes,
                                    cursor,
                                    completes_full: false,
                                },
                                now_ms: now,
                            });
                        }
                        Ok(proto::ModuleDelta::ResetNeeded) => {
                            entry.reset_needed = true;
                            entry.ok = true;
                            resets.insert(frame.module.clone());
                        }
                        Ok(proto::ModuleDelta::Failed { error }) => {
                            entry.error = Some(format!("the hub failed this module: {error}"));
                        }
                        Err(e) => {
                            entry.error = Some(format!("the hub's payload does not decode: {e}"));
                        }
                    }
                }
                self.apply(applies, &mut report).await?;
                // A patch applied to a record the box did not hold as the hub thought, or a
                // damaged record, shows here: a full sync of the module repairs it.
                for (module, digest) in checks {
                    if self.verify(&module, &digest).await? == Verified::Differs {
                        tracing::warn!("module {module}: digest differs after a delta; repairing");
                        resets.insert(module.clone());
                        report.modules.entry(module).or_default().reset_needed = true;
                    }
                }
                // Modules the hub left out of its answer had nothing new: they are up to date.
                for module in modules.keys() {
                    if !request.skip.contains(module) {
                        report
                            .modules
                            .entry(module.clone())
                            .or_insert_with(|| ModuleReport {
                                ok: true,
                                ..Default::default()
                            });
                    }
                }
                if !more {
                    return Ok(());
                }
            }
        }
        .await;
        for (module, m) in &report.modules {
            match &m.error {
                Some(e) => self.live.module_failed(module, e),
                None => self.live.module_ok(module, "delta"),
            }
        }
        if !resets.is_empty() {
            tracing::info!("full sync of {resets:?} needed");
            let order = FullOrder {
                modules: resets.into_iter().collect(),
                reply: None,
            };
            let _ = self.full_tx.try_send(order);
        }
        self.finish(report, result, mark)
    }

    /// One full sync of `modules` (empty: all): activity first, then every module made exactly
    /// the hub's (compared, caught up, repaired or replaced, and checked by digest), then the
    /// acknowledgement to the hub.
    pub async fn run_full(&self, modules: Vec<String>) -> SyncReport {
        let mark = self.mark(Process::Full);
        let mut report = SyncReport {
            process: "full",
            ..Default::default()
        };
        let result: Result<(), String> = async {
            report.activity_pushed = self.push_pending().await?;
            let mut todo = modules.clone();
            let mut whole: Vec<String> = Vec::new();
            // What the box reports of itself with the request; when the hub finds every
            // module unchanged it records this as the acknowledgement.
            let status = self.box_status(&BTreeMap::new());
            let mut acknowledged = false;
            for round in 0..FULL_ROUNDS {
                let store = self.store.clone();
                let only = todo.clone();
                let digests = tokio::task::spawn_blocking(move || store.digests(&only))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                let held: BTreeMap<String, u64> = digests
                    .iter()
                    .map(|d| (d.module.clone(), d.cursor))
                    .collect();
                let request = proto::FullRequest {
                    modules: todo.clone(),
                    digests,
                    records: whole.clone(),
                    status: status.clone(),
                };
                let body = proto::encode(&request, 3).map_err(|e| e.to_string())?;
                let answer: proto::FullAnswer = self
                    .call_as(Process::Full, proto::PATH_FULL, body, "a full sync answer")
                    .await?;
                acknowledged = answer.acknowledged;
                self.note_hub_slot(answer.full_sync_at_s).await;
                let now = hub_or_local_time(answer.hub_time_ms);
                let mut again = Vec::new();
                let mut next_whole = Vec::new();
                // Every module of the round is applied in one transaction, so a till (or the
                // change watch) never sees some modules of the full sync and not others.
                let mut applies = Vec::new();
                let mut checks = Vec::new();
                for frame in answer.frames {
                    if self.frame_entry(&mut report, &frame).is_none() {
                        continue;
                    }
                    let module = frame.module.clone();
                    if let Some((apply, check)) = self
                        .full_module(frame, held.get(&module).copied(), now, &mut report)
                        .await?
                    {
                        applies.extend(apply);
                        checks.push((module, check));
                    }
                }
                self.apply(applies, &mut report).await?;
                for (module, check) in checks {
                    let outcome = match check {
                        Check::Ready(outcome) => outcome,
                        Check::Digest { digest, whole } => {
                            match self.verify(&module, &digest).await? {
                                Verified::Equal | Verified::Quarantined => FullOutcome::Done,
                                // Whole records or a repair that still differ: the hub changed
                                // meanwhile, or the flash is failing. Ask for whole records.
                                Verified::Differs if whole => FullOutcome::Whole,
                                Verified::Differs => FullOutcome::Compare,
                            }
                        }
                    };
                    let last_round = round + 1 == FULL_ROUNDS;
                    match outcome {
                        FullOutcome::Done => {}
                        FullOutcome::Compare if !last_round => again.push(module),
                        FullOutcome::Whole if !last_round => {
                            again.push(module.clone());
                            next_whole.push(module);
                        }
                        FullOutcome::Compare | FullOutcome::Whole => {
                            report.modules.entry(module).or_default().error = Some(
                                "still differs from the hub after a full sync; retrying later"
                                    .into(),
                            );
                        }
                    }
                }
                if again.is_empty() {
                    break;
                }
                todo = again;
                whole = next_whole;
            }
            // The hub took the request as the acknowledgement when it found every module
            // unchanged: then one round sufficed, and nothing the box reported has changed
            // unless an error came or went, which the acknowledgement must carry.
            let errors_now: BTreeMap<String, Option<String>> = report
                .modules
                .iter()
                .map(|(name, m)| (name.clone(), m.error.clone()))
                .collect();
            let status_after = self.box_status(&errors_now);
            if acknowledged && status_after.errors.is_empty() && status.errors.is_empty() {
                return Ok(());
            }
            let modules = self.modules().await.map_err(|e| e.to_string())?;
            let ack = proto::Ack::new(plan::delta_request(&modules, &[]).cursors, status_after);
            let body = proto::encode(&ack, 3).map_err(|e| e.to_string())?;
            self.link
                .post(Process::Full, proto::PATH_ACK, body)
                .await
                .map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        for (module, m) in &report.modules {
            match &m.error {
                Some(e) => self.live.module_failed(module, e),
                None => self.live.module_ok(module, "full"),
            }
        }
        self.finish(report, result, mark)
    }

    /// Turns one module's part of a full sync answer into what to apply and how to check
    /// it; `None` when the module failed (the error is in the report).
    async fn full_module(
        &self,
        frame: proto::ModuleFrame,
        held_cursor: Option<u64>,
        now: i64,
        report: &mut SyncReport,
    ) -> Result<Option<(Option<ModuleApply>, Check)>, String> {
        let module = frame.module.clone();
        let snapshot = match proto::decode_payload::<proto::ModuleSnapshot>(
            &frame.payload,
            "a module snapshot",
        ) {
            Ok(s) => s,
            Err(e) => {
                report.modules.entry(module).or_default().error =
                    Some(format!("the hub's payload does not decode: {e}"));
                return Ok(None);
            }
        };
        let (kind, check, method) = match snapshot {
            proto::ModuleSnapshot::Unchanged { cursor } => (
                ApplyKind::Unchanged { cursor },
                Check::Ready(FullOutcome::Done),
                "unchanged",
            ),
            proto::ModuleSnapshot::Records {
                table,
                cursor,
                digest,
            } => match table.into_records() {
                Ok(records) => (
                    ApplyKind::Snapshot { records, cursor },
                    Check::Digest {
                        digest,
                        whole: true,
                    },
                    "records",
                ),
                Err(e) => {
                    report.modules.entry(module).or_default().error =
                        Some(format!("the hub's records do not decode: {e}"));
                    return Ok(None);
                }
            },
            proto::ModuleSnapshot::Changes {
                changes,
                cursor,
                digest,
            } => (
                ApplyKind::Delta {
                    from_cursor: held_cursor.unwrap_or(0),
                    changes,
                    cursor,
                    completes_full: true,
                },
                Check::Digest {
                    digest,
                    whole: false,
                },
                "changes",
            ),
            proto::ModuleSnapshot::Buckets { buckets, .. } => {
                return self.repair(frame, buckets, now, report).await;
            }
            proto::ModuleSnapshot::Failed { error } => {
                report.modules.entry(module).or_default().error =
                    Some(format!("the hub failed this module: {error}"));
                return Ok(None);
            }
        };
        report.modules.entry(module.clone()).or_default().method = Some(method);
        let apply = ModuleApply {
            module,
            indexes: frame.indexes,
            kind,
            now_ms: now,
        };
        Ok(Some((Some(apply), check)))
    }

    /// Finds the buckets where the box and the hub differ and asks the hub what to put and
    /// delete there.
    async fn repair(
        &self,
        frame: proto::ModuleFrame,
        hub_buckets: Vec<u64>,
        now: i64,
        report: &mut SyncReport,
    ) -> Result<Option<(Option<ModuleApply>, Check)>, String> {
        let module = frame.module.clone();
        let bucket_count = hub_buckets.len() as u32;
        if !(1..=1024).contains(&bucket_count) {
            report.modules.entry(module).or_default().error =
                Some(format!("the hub sent {bucket_count} buckets"));
            return Ok(None);
        }
        let store = self.store.clone();
        let m = module.clone();
        let (hashes, cursor) = tokio::task::spawn_blocking(move || {
            let hashes = store.record_hashes(&m)?;
            let cursor = store.modules()?.get(&m).map_or(0, |s| s.cursor);
            Ok::<_, crate::storage::StorageError>((hashes, cursor))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        let mine =
            proto::bucket_hashes(hashes.iter().map(|(id, h)| (id.as_str(), *h)), bucket_count);
        let differing: Vec<u32> = (0..bucket_count)
            .filter(|&b| mine[b as usize] != hub_buckets[b as usize])
            .collect();
        // Past a quarter of the buckets, listing what the box holds costs about what the
        // records cost: ask for them whole.
        if differing.len() * 4 > bucket_count as usize && bucket_count >= 4 {
            return Ok(Some((None, Check::Ready(FullOutcome::Whole))));
        }
        let wanted: BTreeSet<u32> = differing.iter().copied().collect();
        let held: Vec<(String, u64)> = hashes
            .into_iter()
            .filter(|(id, _)| wanted.contains(&proto::bucket_of(id, bucket_count)))
            .collect();
        let request = proto::RepairRequest {
            module: module.clone(),
            bucket_count,
            buckets: differing,
            held,
        };
        let body = proto::encode(&request, 3).map_err(|e| e.to_string())?;
        let answer = self.call(Process::Full, proto::PATH_REPAIR, body).await?;
        let Some(frame) = answer.frames.into_iter().find(|f| f.module == module) else {
            report.modules.entry(module).or_default().error =
                Some("the hub's repair answer has no frame for the module".into());
            return Ok(None);
        };
        self.frame_entry(report, &frame);
        match proto::decode_payload::<proto::ModuleSnapshot>(&frame.payload, "a repair") {
            Ok(proto::ModuleSnapshot::Changes {
                changes,
                cursor: to,
                digest,
            }) => {
                report.modules.entry(module.clone()).or_default().method = Some("repaired");
                let apply = ModuleApply {
                    module,
                    indexes: frame.indexes,
                    kind: ApplyKind::Delta {
                        from_cursor: cursor,
                        changes,
                        cursor: to,
                        completes_full: true,
                    },
                    now_ms: now,
                };
                Ok(Some((
                    Some(apply),
                    Check::Digest {
                        digest,
                        whole: true,
                    },
                )))
            }
            Ok(proto::ModuleSnapshot::Failed { error }) => {
                report.modules.entry(module).or_default().error =
                    Some(format!("the hub failed this module: {error}"));
                Ok(None)
            }
            Ok(_) => Ok(Some((None, Check::Ready(FullOutcome::Whole)))),
            Err(e) => {
                report.modules.entry(module).or_default().error =
                    Some(format!("the hub's payload does not decode: {e}"));
                Ok(None)
            }
        }
    }

    /// Compares a module's digest over the stored bytes with the hub's.
    async fn verify(&self, module: &str, digest: &proto::Digest) -> Result<Verified, String> {
        let store = self.store.clone();
        let m = module.to_owned();
        let (mine, quarantined) = tokio::task::spawn_blocking(move || {
            let digest = store.module_digest(&m)?;
            let quarantined = store.modules()?.get(&m).map_or(0, |s| s.quarantined);
            Ok::<_, crate::storage::StorageError>((digest, quarantined))
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
        Ok(if mine == *digest {
            Verified::Equal
        } else if quarantined > 0 {
            // Records the box refused cannot match the hub's: known, reported, not retried.
            Verified::Quarantined
        } else {
            Verified::Differs
        })
    }

    /// Checks a frame's module name and counts its bytes; `None` for a frame to ignore.
    fn frame_entry<'r>(
        &self,
        report: &'r mut SyncReport,
        frame: &proto::ModuleFrame,
    ) -> Option<&'r mut ModuleReport> {
        if !proto::is_valid_module_name(&frame.module) {
            tracing::warn!("ignoring a module with an invalid name from the hub");
            return None;
        }
        let bytes = frame.payload.len() as u64;
        self.link.wire.add_module(&frame.module, bytes);
        let entry = report.modules.entry(frame.module.clone()).or_default();
        entry.bytes += bytes;
        Some(entry)
    }

    /// What the box reports of itself to the hub: pending activity, its version, and every
    /// module's last error; `this_run` (module → error) overrides what the live status
    /// holds, for a run whose outcome is not in it yet.
    fn box_status(&self, this_run: &BTreeMap<String, Option<String>>) -> proto::BoxStatus {
        let mut errors: BTreeMap<String, String> = BTreeMap::new();
        for module in self.live.module_names() {
            if let Some(e) = self.live.module(&module).last_error {
                errors.insert(module, e);
            }
        }
        for (module, error) in this_run {
            match error {
                Some(e) => errors.insert(module.clone(), e.clone()),
                None => errors.remove(module),
            };
        }
        proto::BoxStatus {
            pending_activity: self.activity.pending().pending,
            box_version: env!("CARGO_PKG_VERSION").to_owned(),
            errors: errors
                .into_iter()
                .map(|(module, error)| proto::ModuleError {
                    module,
                    error: cut(&error, proto::MAX_ERROR_BYTES),
                })
                .collect(),
        }
    }

    /// The full sync slot the hub gives this box (seconds after local midnight), or `None`.
    pub fn hub_slot(&self) -> Option<u32> {
        let s = self.hub_slot.load(Ordering::Relaxed);
        (s < plan::DAY_S).then_some(s)
    }

    /// Keeps the slot the hub sent, in memory for the scheduler and in the database so a
    /// restart does not forget it (the next full sync may be a day away).
    async fn note_hub_slot(&self, slot: Option<u32>) {
        let slot = slot.filter(|s| *s < plan::DAY_S);
        let value = slot.unwrap_or(u32::MAX);
        if self.hub_slot.swap(value, Ordering::Relaxed) == value {
            return;
        }
        match slot {
            Some(s) => tracing::info!("the hub's full sync slot for this box: {}", plan::clock(s)),
            None => tracing::info!("the hub sets no full sync slot"),
        }
        let store = self.store.clone();
        let saved = tokio::task::spawn_blocking(move || {
            store.set_meta(HUB_SLOT_META, slot.map_or(u64::MAX, u64::from))
        })
        .await;
        if let Err(e) = saved
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!("could not save the hub's full sync slot: {e}");
        }
    }

    /// Posts to the hub and decodes a [`proto::ModulesAnswer`], keeping the link state.
    async fn call(
        &self,
        process: Process,
        path: &str,
        body: Vec<u8>,
    ) -> Result<proto::ModulesAnswer, String> {
        self.call_as(process, path, body, "a modules answer").await
    }

    /// Posts to the hub and decodes its plain (not compressed as a whole) answer as `T`,
    /// keeping the link state.
    async fn call_as<T: serde::de::DeserializeOwned>(
        &self,
        process: Process,
        path: &str,
        body: Vec<u8>,
        what: &'static str,
    ) -> Result<T, String> {
        let answer = self
            .link
            .post(process, path, body)
            .await
            .map_err(|e: LinkError| {
                self.live.link_failed(&e.to_string());
                e.to_string()
            })?;
        self.live.link_ok();
        proto::decode_plain(&answer, what).map_err(|e| {
            let message = format!("the hub's answer does not decode: {e}");
            self.live.link_failed(&message);
            message
        })
    }

    async fn apply(
        &self,
        applies: Vec<ModuleApply>,
        report: &mut SyncReport,
    ) -> Result<(), String> {
        if applies.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let names: Vec<String> = applies.iter().map(|a| a.module.clone()).collect();
        let results = tokio::task::spawn_blocking(move || store.apply(&applies))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        for (module, applied) in names.into_iter().zip(results) {
            let entry = report.modules.entry(module).or_default();
            entry.ok = true;
            entry.upserted += applied.upserted;
            entry.deleted += applied.deleted;
            entry.unchanged += applied.unchanged;
            entry.quarantined += applied.quarantined.len() as u64;
        }
        Ok(())
    }

    /// The counters at the start of a run.
    fn mark(&self, process: Process) -> RunMark {
        let wire = &self.link.wire;
        let p = wire.process(process);
        RunMark {
            process,
            started: Instant::now(),
            socket: (
                wire.socket.sent.load(Ordering::Relaxed),
                wire.socket.received.load(Ordering::Relaxed),
            ),
            body: (
                p.sent.load(Ordering::Relaxed),
                p.received.load(Ordering::Relaxed),
            ),
            requests: p.requests.load(Ordering::Relaxed),
        }
    }

    fn finish(
        &self,
        mut report: SyncReport,
        result: Result<(), String>,
        mark: RunMark,
    ) -> SyncReport {
        let wire = &self.link.wire;
        let p = wire.process(mark.process);
        report.error = result.err();
        report.ok = report.error.is_none() && report.modules.values().all(|m| m.error.is_none());
        report.bytes_sent = wire.socket.sent.load(Ordering::Relaxed) - mark.socket.0;
        report.bytes_received = wire.socket.received.load(Ordering::Relaxed) - mark.socket.1;
        report.body_bytes_sent = p.sent.load(Ordering::Relaxed) - mark.body.0;
        report.body_bytes_received = p.received.load(Ordering::Relaxed) - mark.body.1;
        report.requests = p.requests.load(Ordering::Relaxed) - mark.requests;
        report.duration_ms = mark.started.elapsed().as_millis() as u64;
        crate::metrics::global().record_sync(&report);
        if report.process == "full" {
            self.live.full_done(&report);
        }
        report
    }
}

/// Counters at the start of a run, to report what the run moved.
struct RunMark {
    process: Process,
    started: Instant,
    socket: (u64, u64),
    body: (u64, u64),
    requests: u64,
}

/// How to tell, after applying, whether a module is done.
enum Check {
    Ready(FullOutcome),
    /// Compare with the hub's digest; on a difference, ask for whole records (`whole`) or
    /// compare again.
    Digest {
        digest: proto::Digest,
        whole: bool,
    },
}

/// What a full sync round left to do for a module.
enum FullOutcome {
    Done,
    /// Compare again (digests, then buckets).
    Compare,
    /// Ask for the records whole.
    Whole,
}

#[derive(Debug, PartialEq, Eq)]
enum Verified {
    Equal,
    Differs,
    /// Differs, but the box holds quarantined records of the module, which explains it.
    Quarantined,
}

/// The hub's time when it is plausible, else the box's: a box without a real-time clock may
/// boot in 1970, and "last synced" must not say so.
fn hub_or_local_time(hub_ms: i64) -> i64 {
    let local = chrono::Utc::now().timestamp_millis();
    if hub_ms > 1_600_000_000_000 {
        hub_ms
    } else {
        local
    }
}

fn stopped(process: &'static str) -> SyncReport {
    SyncReport {
        process,
        error: Some("the sync engine has stopped".into()),
        ..Default::default()
    }
}
