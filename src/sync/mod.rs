//! The seed's three sync processes, each its own task with its own hub connection:
//!
//! - **full sync** ([`SyncEngine::run_full`]) at the configured local times, on demand, on a
//!   new box, and for any module whose delta the hub can no longer serve: uploads pending
//!   activity, then makes every module exactly the hub's;
//! - **delta pull** ([`SyncEngine::run_delta`]) every `delta_interval`: the day's changes;
//! - **activity push** ([`SyncEngine::push_pending`]) as events arrive, in order, in batches.
//!
//! Each module keeps its own cursor, error and backoff: a module the hub fails to serve, or
//! whose payload does not decode, is reported and retried later while the others apply.
//! Nothing here is on a till's path: tills read the local database and never wait on a sync.

pub mod link;
pub mod plan;

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
use link::{HubLink, HubTarget, LinkError};

/// Longest pause between retries of a failing process or module.
const MAX_BACKOFF: Duration = Duration::from_secs(300);

/// What one run of a sync process did, as `storebox sync` and `POST /v1/sync/*` show it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncReport {
    pub process: &'static str,
    pub ok: bool,
    /// Link-level failure, when the run could not complete at all.
    pub error: Option<String>,
    pub modules: BTreeMap<String, ModuleReport>,
    pub activity_pushed: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
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
}

/// The sync settings the engine needs.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub full_sync_at: Vec<crate::config::TimeOfDay>,
    pub delta_interval: Option<Duration>,
    pub push: bool,
    pub push_batch: usize,
}

type Reply = oneshot::Sender<SyncReport>;

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
    full_link: HubLink,
    delta_link: HubLink,
    push_link: HubLink,
    full_tx: mpsc::Sender<FullOrder>,
    delta_tx: mpsc::Sender<Reply>,
    /// Wakes the push task when a till posts an event.
    pub push_wake: Arc<Notify>,
    /// One push at a time: the push task and a full sync both push.
    push_lock: tokio::sync::Mutex<()>,
    receivers: std::sync::Mutex<Option<(mpsc::Receiver<FullOrder>, mpsc::Receiver<Reply>)>>,
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
        Arc::new(SyncEngine {
            store,
            activity,
            live,
            settings,
            full_link: HubLink::new(target.clone()),
            delta_link: HubLink::new(target.clone()),
            push_link: HubLink::new(target),
            full_tx,
            delta_tx,
            push_wake: Arc::new(Notify::new()),
            push_lock: tokio::sync::Mutex::new(()),
            receivers: std::sync::Mutex::new(Some((full_rx, delta_rx))),
        })
    }

    /// Bytes sent and received by each process's link, for status.
    pub fn bytes(&self) -> BTreeMap<&'static str, (u64, u64)> {
        [
            ("full", &self.full_link),
            ("delta", &self.delta_link),
            ("push", &self.push_link),
        ]
        .into_iter()
        .map(|(name, link)| {
            (
                name,
                (
                    link.bytes.sent.load(Ordering::Relaxed),
                    link.bytes.received.load(Ordering::Relaxed),
                ),
            )
        })
        .collect()
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
        if self.delta_tx.send(reply).await.is_err() {
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
            let scheduled = plan::next_full_sync(now.naive_local(), &self.settings.full_sync_at)
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

    async fn delta_task(self: Arc<Self>, mut orders: mpsc::Receiver<Reply>) {
        let mut failures = 0u32;
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
            let reply = tokio::select! {
                _ = sleep => None,
                order = orders.recv() => match order {
                    Some(reply) => Some(reply),
                    None => return,
                },
            };
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
            let answer = match self.push_link.post(proto::PATH_ACTIVITY, body).await {
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
        let started = Instant::now();
        let before = self.delta_link.bytes.sent.load(Ordering::Relaxed);
        let before_rx = self.delta_link.bytes.received.load(Ordering::Relaxed);
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
                let answer = self.call(&self.delta_link, proto::PATH_DELTA, body).await?;
                let mut applies = Vec::new();
                let mut more = false;
                let now = hub_or_local_time(answer.hub_time_ms);
                for frame in answer.frames {
                    if !proto::is_valid_module_name(&frame.module) {
                        tracing::warn!("ignoring a module with an invalid name from the hub");
                        continue;
                    }
                    let entry = report.modules.entry(frame.module.clone()).or_default();
                    match proto::decode_plain::<proto::ModuleDelta>(
                        &frame.payload,
                        "a module delta",
                    ) {
                        Ok(proto::ModuleDelta::Changes {
                            changes,
                            cursor,
                            more: module_more,
                        }) => {
                            more |= module_more;
                            applies.push(ModuleApply {
                                module: frame.module.clone(),
                                indexes: frame.indexes,
                                kind: ApplyKind::Delta {
                                    from_cursor: modules.get(&frame.module).map_or(0, |m| m.cursor),
                                    changes,
                                    cursor,
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
                            entry.error = Some(e.to_string());
                        }
                    }
                }
                self.apply(applies, &mut report).await?;
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
            tracing::info!("the hub asks for a full sync of {resets:?}");
            let order = FullOrder {
                modules: resets.into_iter().collect(),
                reply: None,
            };
            let _ = self.full_tx.try_send(order);
        }
        self.finish(report, result, started, &self.delta_link, before, before_rx)
    }

    /// One full sync of `modules` (empty: all): activity first, then every module's snapshot
    /// applied as an exact cancel-and-replace, then the acknowledgement to the hub.
    pub async fn run_full(&self, modules: Vec<String>) -> SyncReport {
        let started = Instant::now();
        let before = self.full_link.bytes.sent.load(Ordering::Relaxed);
        let before_rx = self.full_link.bytes.received.load(Ordering::Relaxed);
        let mut report = SyncReport {
            process: "full",
            ..Default::default()
        };
        let result: Result<(), String> = async {
            report.activity_pushed = self.push_pending().await?;
            let store = self.store.clone();
            let digests = tokio::task::spawn_blocking(move || store.digests())
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let request = proto::FullRequest { modules, digests };
            let body = proto::encode(&request, 3).map_err(|e| e.to_string())?;
            let answer = self.call(&self.full_link, proto::PATH_FULL, body).await?;
            let now = hub_or_local_time(answer.hub_time_ms);
            let mut applies = Vec::new();
            for frame in answer.frames {
                if !proto::is_valid_module_name(&frame.module) {
                    tracing::warn!("ignoring a module with an invalid name from the hub");
                    continue;
                }
                let entry = report.modules.entry(frame.module.clone()).or_default();
                match proto::decode_plain::<proto::ModuleSnapshot>(
                    &frame.payload,
                    "a module snapshot",
                ) {
                    Ok(proto::ModuleSnapshot::Unchanged { cursor }) => {
                        applies.push(ModuleApply {
                            module: frame.module,
                            indexes: frame.indexes,
                            kind: ApplyKind::Unchanged { cursor },
                            now_ms: now,
                        });
                    }
                    Ok(proto::ModuleSnapshot::Records { records, cursor }) => {
                        applies.push(ModuleApply {
                            module: frame.module,
                            indexes: frame.indexes,
                            kind: ApplyKind::Snapshot { records, cursor },
                            now_ms: now,
                        });
                    }
                    Ok(proto::ModuleSnapshot::Failed { error }) => {
                        entry.error = Some(format!("the hub failed this module: {error}"));
                    }
                    Err(e) => entry.error = Some(e.to_string()),
                }
            }
            self.apply(applies, &mut report).await?;
            let modules = self.modules().await.map_err(|e| e.to_string())?;
            let pending = self.activity.pending();
            let ack = proto::Ack {
                cursors: plan::delta_request(&modules, &[]).cursors,
                pending_activity: pending.pending,
                box_version: env!("CARGO_PKG_VERSION").to_owned(),
            };
            let body = proto::encode(&ack, 3).map_err(|e| e.to_string())?;
            self.full_link
                .post(proto::PATH_ACK, body)
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
        self.finish(report, result, started, &self.full_link, before, before_rx)
    }

    /// Posts to the hub and decodes a [`proto::ModulesAnswer`], keeping the link state.
    async fn call(
        &self,
        link: &HubLink,
        path: &str,
        body: Vec<u8>,
    ) -> Result<proto::ModulesAnswer, String> {
        let answer = link.post(path, body).await.map_err(|e: LinkError| {
            self.live.link_failed(&e.to_string());
            e.to_string()
        })?;
        self.live.link_ok();
        proto::decode(&answer, "a modules answer").map_err(|e| {
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

    fn finish(
        &self,
        mut report: SyncReport,
        result: Result<(), String>,
        started: Instant,
        link: &HubLink,
        sent_before: u64,
        received_before: u64,
    ) -> SyncReport {
        report.error = result.err();
        report.ok = report.error.is_none() && report.modules.values().all(|m| m.error.is_none());
        report.bytes_sent = link.bytes.sent.load(Ordering::Relaxed) - sent_before;
        report.bytes_received = link.bytes.received.load(Ordering::Relaxed) - received_before;
        report.duration_ms = started.elapsed().as_millis() as u64;
        crate::metrics::global().record_sync(&report);
        if report.process == "full" {
            self.live.full_done(&report);
        }
        report
    }
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
