//! The hub database's part of firmware updates: which bundles exist, which version each
//! store should run, and what each box last said about its updates.
//!
//! Three tables in either backend: bundles by version ([`BundleMeta`]), targets by store
//! (`""` for the fleet default), and each store's firmware state ([`BoxOta`]).
//!
//! The bundles' bytes are files (`ota.rs`); a bundle's record names its file, so a
//! replacement is a new file and a new record, never bytes changing under a name a download
//! has open. The rules that tie targets to bundles (a targeted bundle cannot be deleted or
//! replaced; a target needs its bundle) are checked inside the write transaction that
//! changes them, with writers serialised by each backend, so two admin calls cannot both
//! pass a check that only one of them may pass.

use serde::{Deserialize, Serialize};
use storebox_protocol::ota::{OtaCheck, OtaEvent, OtaReport};

use super::{HubStore, StoreError};

/// The key of the fleet's default target in `ota_targets`: never a valid store id.
pub(super) const FLEET: &str = "";

/// How many reports per store the hub keeps for the admin view.
pub const REPORT_HISTORY: usize = 20;

/// A stored firmware bundle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleMeta {
    /// Name of its file in the bundle directory.
    pub file: String,
    pub size: u64,
    /// SHA-256 of the whole file, lowercase hex.
    pub sha256: String,
    pub uploaded_at_ms: i64,
}

/// Who targets a version: the fleet default, and the stores whose own target it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TargetedBy {
    pub fleet: bool,
    pub stores: Vec<String>,
}

impl TargetedBy {
    pub fn any(&self) -> bool {
        self.fleet || !self.stores.is_empty()
    }
}

impl std::fmt::Display for TargetedBy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut who: Vec<String> = Vec::new();
        if self.fleet {
            who.push("the fleet default".into());
        }
        who.extend(self.stores.iter().map(|s| format!("store {s}")));
        f.write_str(&who.join(", "))
    }
}

/// The outcome of recording an uploaded bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutBundle {
    Created,
    /// It replaced a bundle of the same version, whose file the caller removes.
    Replaced {
        old_file: String,
    },
    /// Refused: the version is targeted, so boxes may be downloading it.
    Targeted(TargetedBy),
}

/// The outcome of deleting a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeleteBundle {
    /// Its record is gone; the caller removes the file.
    Deleted {
        file: String,
    },
    Unknown,
    Targeted(TargetedBy),
}

/// The version a store should run, and where that comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EffectiveTarget {
    pub version: String,
    /// The store's own target; `false` when it is the fleet default.
    pub from_store: bool,
    pub bundle: BundleMeta,
}

/// What a box said about its updates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BoxOta {
    pub last_check: Option<SeenCheck>,
    /// The latest reports, oldest first, at most [`REPORT_HISTORY`].
    #[serde(default)]
    pub reports: Vec<StoredReport>,
}

/// A box's last check: what it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SeenCheck {
    pub at_ms: i64,
    pub running: String,
    pub compatible: String,
    pub slot: String,
}

/// One report, in the hub's own flat form so the stored JSON does not follow the protocol's
/// enum as it evolves.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredReport {
    /// When the hub received it.
    pub received_at_ms: i64,
    /// When it happened, Unix seconds by the box's clock.
    pub at: i64,
    pub running: String,
    /// `downloaded`, `installed`, `healthy`, `failed` or `rolled_back`.
    pub event: String,
    pub version: String,
    pub reason: Option<String>,
}

impl StoredReport {
    pub fn new(report: &OtaReport, received_at_ms: i64) -> StoredReport {
        let (event, version, reason) = match &report.event {
            OtaEvent::Downloaded { version } => ("downloaded", version, None),
            OtaEvent::Installed { version } => ("installed", version, None),
            OtaEvent::Healthy { version } => ("healthy", version, None),
            OtaEvent::Failed { version, reason } => ("failed", version, Some(reason.clone())),
            OtaEvent::RolledBack { version, reason } => {
                ("rolled_back", version, Some(reason.clone()))
            }
        };
        StoredReport {
            received_at_ms,
            at: report.at,
            running: report.running.clone(),
            event: event.to_owned(),
            version: version.clone(),
            reason,
        }
    }
}

impl HubStore {
    /// Records a box's check: what it runs, and when it asked.
    pub fn ota_note_check(
        &self,
        store: &str,
        check: &OtaCheck,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // Like contact times, a lost check is replaced by the next one: no wait for the disk.
        self.update_box_ota(store, false, &mut |state| {
            state.last_check = Some(SeenCheck {
                at_ms: now_ms,
                running: check.running.clone(),
                compatible: check.compatible.clone(),
                slot: check.slot.clone(),
            });
        })
    }

    /// Records a box's report, keeping the latest [`REPORT_HISTORY`]. Durable: a rollback
    /// may be reported once only.
    pub fn ota_note_report(&self, store: &str, report: StoredReport) -> Result<(), StoreError> {
        self.update_box_ota(store, true, &mut |state| {
            state.reports.push(report.clone());
            let excess = state.reports.len().saturating_sub(REPORT_HISTORY);
            state.reports.drain(..excess);
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn meta(file: &str) -> BundleMeta {
        BundleMeta {
            file: file.into(),
            size: 10,
            sha256: "00".repeat(32),
            uploaded_at_ms: 1,
        }
    }

    #[test]
    fn targets_need_bundles_and_protect_them() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(dir.path()).unwrap();
        assert!(!hub.ota_set_target(None, Some("1.0.0")).unwrap());
        assert_eq!(
            hub.ota_put_bundle("1.0.0", &meta("a")).unwrap(),
            PutBundle::Created
        );
        assert_eq!(
            hub.ota_put_bundle("1.0.0", &meta("b")).unwrap(),
            PutBundle::Replaced {
                old_file: "a".into()
            }
        );
        hub.ota_put_bundle("1.1.0", &meta("c")).unwrap();
        assert!(hub.ota_set_target(None, Some("1.0.0")).unwrap());
        assert!(hub.ota_set_target(Some("s2"), Some("1.1.0")).unwrap());

        // The store's own target wins over the fleet's.
        let t = hub.ota_effective_target("s1").unwrap().unwrap();
        assert_eq!((t.version.as_str(), t.from_store), ("1.0.0", false));
        let t = hub.ota_effective_target("s2").unwrap().unwrap();
        assert_eq!((t.version.as_str(), t.from_store), ("1.1.0", true));
        assert_eq!(t.bundle.file, "c");

        // Targeted bundles can be neither replaced nor deleted.
        let by = TargetedBy {
            fleet: true,
            stores: vec![],
        };
        assert_eq!(
            hub.ota_put_bundle("1.0.0", &meta("d")).unwrap(),
            PutBundle::Targeted(by.clone())
        );
        assert_eq!(
            hub.ota_delete_bundle("1.0.0").unwrap(),
            DeleteBundle::Targeted(by)
        );
        assert!(matches!(
            hub.ota_delete_bundle("1.1.0").unwrap(),
            DeleteBundle::Targeted(TargetedBy { fleet: false, ref stores }) if stores == &["s2"]
        ));

        // Cleared, they can.
        hub.ota_set_target(None, None).unwrap();
        hub.ota_set_target(Some("s2"), None).unwrap();
        assert!(hub.ota_effective_target("s1").unwrap().is_none());
        assert_eq!(
            hub.ota_delete_bundle("1.0.0").unwrap(),
            DeleteBundle::Deleted { file: "b".into() }
        );
        assert_eq!(
            hub.ota_delete_bundle("1.0.0").unwrap(),
            DeleteBundle::Unknown
        );
        assert_eq!(hub.ota_bundles().unwrap().len(), 1);
    }

    #[test]
    fn reports_keep_a_short_history() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(dir.path()).unwrap();
        for n in 0..(REPORT_HISTORY as i64 + 5) {
            let report = OtaReport {
                running: "1.0.0".into(),
                event: OtaEvent::Failed {
                    version: "1.1.0".into(),
                    reason: format!("attempt {n}"),
                },
                at: n,
            };
            hub.ota_note_report("s", StoredReport::new(&report, n))
                .unwrap();
        }
        let check = OtaCheck {
            running: "1.0.0".into(),
            compatible: "board".into(),
            slot: "A".into(),
        };
        hub.ota_note_check("s", &check, 99).unwrap();
        let state = hub.ota_box("s").unwrap();
        assert_eq!(state.reports.len(), REPORT_HISTORY);
        assert_eq!(state.reports[0].at, 5);
        let last = state.reports.last().unwrap();
        assert_eq!(last.event, "failed");
        assert_eq!(last.reason.as_deref(), Some("attempt 24"));
        assert_eq!(state.last_check.unwrap().slot, "A");
        assert!(hub.ota_box("other").unwrap().last_check.is_none());
    }
}
