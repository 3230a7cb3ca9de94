//! What the box knows about itself in memory: the hub link's state, each module's last error
//! and backoff, the last full sync. Kept in RAM because it changes on every pull; the durable
//! part of a module's state (cursor, counts, last successful syncs) lives in storage.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::sync::{plan, SyncReport};

/// The hub link as the status page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LinkStatus {
    /// "unknown" before the first call, then "up" or "down".
    pub state: &'static str,
    pub last_ok_ms: Option<i64>,
    pub last_error: Option<String>,
    pub last_error_ms: Option<i64>,
}

/// One module's live state.
#[derive(Debug, Clone, Default)]
pub struct ModuleLive {
    pub last_delta_ok_ms: Option<i64>,
    pub last_full_ok_ms: Option<i64>,
    pub last_error: Option<String>,
    pub failures: u32,
    pub retry_after: Option<Instant>,
}

#[derive(Debug, Default)]
struct Inner {
    link: LinkStatus,
    modules: BTreeMap<String, ModuleLive>,
    last_full: Option<SyncReport>,
}

/// Shared, lock-protected live status. Every method holds the lock only to copy or update.
#[derive(Debug, Default)]
pub struct LiveStatus {
    inner: Mutex<Inner>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl LiveStatus {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A panic while holding the lock would poison it; the data is plain counters and
        // strings, still meaningful, so carry on with it.
        let mut guard = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut guard)
    }

    pub fn link_ok(&self) {
        self.with(|i| {
            i.link.state = "up";
            i.link.last_ok_ms = Some(now_ms());
        });
    }

    pub fn link_failed(&self, error: &str) {
        tracing::warn!("hub link: {error}");
        self.with(|i| {
            i.link.state = "down";
            i.link.last_error = Some(error.to_owned());
            i.link.last_error_ms = Some(now_ms());
        });
    }

    pub fn module_ok(&self, module: &str, process: &str) {
        self.with(|i| {
            let m = i.modules.entry(module.to_owned()).or_default();
            m.last_error = None;
            m.failures = 0;
            m.retry_after = None;
            match process {
                "full" => m.last_full_ok_ms = Some(now_ms()),
                _ => m.last_delta_ok_ms = Some(now_ms()),
            }
        });
    }

    pub fn module_failed(&self, module: &str, error: &str) {
        tracing::warn!("module {module}: {error}");
        self.with(|i| {
            let m = i.modules.entry(module.to_owned()).or_default();
            let wait = plan::backoff(m.failures, Duration::from_secs(300), plan::jitter());
            m.failures = m.failures.saturating_add(1);
            m.retry_after = Some(Instant::now() + wait);
            m.last_error = Some(error.to_owned());
        });
    }

    /// Modules still waiting out a backoff.
    pub fn backing_off(&self) -> Vec<String> {
        let now = Instant::now();
        self.with(|i| {
            i.modules
                .iter()
                .filter(|(_, m)| m.retry_after.is_some_and(|t| t > now))
                .map(|(name, _)| name.clone())
                .collect()
        })
    }

    pub fn full_done(&self, report: &SyncReport) {
        self.with(|i| i.last_full = Some(report.clone()));
    }

    pub fn link(&self) -> LinkStatus {
        self.with(|i| {
            let mut link = i.link.clone();
            if link.state.is_empty() {
                link.state = "unknown";
            }
            link
        })
    }

    /// Every module the sync processes have heard of, stored or not.
    pub fn module_names(&self) -> Vec<String> {
        self.with(|i| i.modules.keys().cloned().collect())
    }

    pub fn module(&self, module: &str) -> ModuleLive {
        self.with(|i| i.modules.get(module).cloned().unwrap_or_default())
    }

    pub fn last_full(&self) -> Option<SyncReport> {
        self.with(|i| i.last_full.clone())
    }
}
