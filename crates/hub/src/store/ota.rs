//! The hub database's part of firmware updates: which bundles exist, which version each
//! store should run, and what each box last said about its updates.
//!
//! | table         | key                               | value                          |
//! |---------------|-----------------------------------|--------------------------------|
//! | `ota_bundles` | version                           | [`BundleMeta`] (JSON)          |
//! | `ota_targets` | store, or `""` for the fleet      | version                        |
//! | `ota_boxes`   | store                             | [`BoxOta`] (JSON)              |
//!
//! The bundles' bytes are files (`ota.rs`); a bundle's record names its file, so a
//! replacement is a new file and a new record, never bytes changing under a name a download
//! has open. The rules that tie targets to bundles (a targeted bundle cannot be deleted or
//! replaced; a target needs its bundle) are checked inside the write transaction that
//! changes them: redb serialises writers, so two admin calls cannot both pass a check that
//! only one of them may pass.

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use storebox_protocol::ota::{OtaCheck, OtaEvent, OtaReport};

use super::{Ctx, HubStore, StoreError};

pub(super) const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("ota_bundles");
pub(super) const TARGETS: TableDefinition<&str, &str> = TableDefinition::new("ota_targets");
pub(super) const BOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("ota_boxes");

/// The key of the fleet's default target in `ota_targets`: never a valid store id.
const FLEET: &str = "";

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

fn decode_meta(bytes: &[u8]) -> Result<BundleMeta, StoreError> {
    serde_json::from_slice(bytes).map_err(|_| StoreError::Corrupt {
        what: "firmware bundle record",
    })
}

fn encode_json<T: Serialize>(value: &T, what: &'static str) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|_| StoreError::Corrupt { what })
}

/// Who targets `version`, from an open targets table.
fn targeted_by(
    targets: &impl ReadableTable<&'static str, &'static str>,
    version: &str,
) -> Result<TargetedBy, StoreError> {
    let mut by = TargetedBy::default();
    for entry in targets.iter().ctx("scanning firmware targets")? {
        let (key, value) = entry.ctx("reading a firmware target")?;
        if value.value() != version {
            continue;
        }
        if key.value() == FLEET {
            by.fleet = true;
        } else {
            by.stores.push(key.value().to_owned());
        }
    }
    Ok(by)
}

impl HubStore {
    /// Every stored bundle, by version.
    pub fn ota_bundles(&self) -> Result<Vec<(String, BundleMeta)>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
        let mut out = Vec::new();
        for entry in bundles.iter().ctx("scanning firmware bundles")? {
            let (key, value) = entry.ctx("reading a firmware bundle")?;
            out.push((key.value().to_owned(), decode_meta(value.value())?));
        }
        Ok(out)
    }

    /// One bundle's record.
    pub fn ota_bundle(&self, version: &str) -> Result<Option<BundleMeta>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
        match bundles.get(version).ctx("reading a firmware bundle")? {
            Some(v) => Ok(Some(decode_meta(v.value())?)),
            None => Ok(None),
        }
    }

    /// Who targets `version` now.
    pub fn ota_targeted_by(&self, version: &str) -> Result<TargetedBy, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
        targeted_by(&targets, version)
    }

    /// Records an uploaded bundle whose file is already in place, unless its version is
    /// targeted.
    pub fn ota_put_bundle(
        &self,
        version: &str,
        meta: &BundleMeta,
    ) -> Result<PutBundle, StoreError> {
        let txn = self.db.begin_write().ctx("starting a bundle write")?;
        let outcome;
        {
            let targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
            let by = targeted_by(&targets, version)?;
            if by.any() {
                return Ok(PutBundle::Targeted(by));
            }
            let mut bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
            let bytes = encode_json(meta, "firmware bundle record")?;
            let old = bundles
                .insert(version, bytes.as_slice())
                .ctx("writing a firmware bundle")?
                .map(|v| decode_meta(v.value()))
                .transpose()?;
            outcome = match old {
                Some(old) => PutBundle::Replaced { old_file: old.file },
                None => PutBundle::Created,
            };
        }
        txn.commit().ctx("committing a bundle write")?;
        Ok(outcome)
    }

    /// Forgets a bundle, unless its version is targeted.
    pub fn ota_delete_bundle(&self, version: &str) -> Result<DeleteBundle, StoreError> {
        let txn = self.db.begin_write().ctx("starting a bundle delete")?;
        let outcome;
        {
            let targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
            let by = targeted_by(&targets, version)?;
            if by.any() {
                return Ok(DeleteBundle::Targeted(by));
            }
            let mut bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
            let old = bundles
                .remove(version)
                .ctx("deleting a firmware bundle")?
                .map(|v| decode_meta(v.value()))
                .transpose()?;
            outcome = match old {
                Some(old) => DeleteBundle::Deleted { file: old.file },
                None => DeleteBundle::Unknown,
            };
        }
        txn.commit().ctx("committing a bundle delete")?;
        Ok(outcome)
    }

    /// Sets (or with `None` clears) the target of `store`, or of the fleet when `store` is
    /// `None`. `false` when the version has no bundle: nothing is changed.
    pub fn ota_set_target(
        &self,
        store: Option<&str>,
        version: Option<&str>,
    ) -> Result<bool, StoreError> {
        let key = store.unwrap_or(FLEET);
        let txn = self.db.begin_write().ctx("starting a target write")?;
        {
            let mut targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
            match version {
                Some(version) => {
                    let bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
                    if bundles
                        .get(version)
                        .ctx("reading a firmware bundle")?
                        .is_none()
                    {
                        return Ok(false);
                    }
                    targets
                        .insert(key, version)
                        .ctx("writing a firmware target")?;
                }
                None => {
                    targets.remove(key).ctx("clearing a firmware target")?;
                }
            }
        }
        txn.commit().ctx("committing a target write")?;
        Ok(true)
    }

    /// The fleet default and the stores' own targets.
    pub fn ota_targets(
        &self,
    ) -> Result<(Option<String>, std::collections::BTreeMap<String, String>), StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
        let mut fleet = None;
        let mut stores = std::collections::BTreeMap::new();
        for entry in targets.iter().ctx("scanning firmware targets")? {
            let (key, value) = entry.ctx("reading a firmware target")?;
            if key.value() == FLEET {
                fleet = Some(value.value().to_owned());
            } else {
                stores.insert(key.value().to_owned(), value.value().to_owned());
            }
        }
        Ok((fleet, stores))
    }

    /// The version `store` should run: its own target, else the fleet's; with its bundle.
    /// Read in one transaction, so the bundle is the one the target names.
    pub fn ota_effective_target(&self, store: &str) -> Result<Option<EffectiveTarget>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
        let (version, from_store) = match targets.get(store).ctx("reading a firmware target")? {
            Some(v) => (v.value().to_owned(), true),
            None => match targets.get(FLEET).ctx("reading the fleet target")? {
                Some(v) => (v.value().to_owned(), false),
                None => return Ok(None),
            },
        };
        let bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
        let Some(bundle) = bundles
            .get(version.as_str())
            .ctx("reading a firmware bundle")?
        else {
            // Deleting a targeted bundle is refused, so this is damage, not a state.
            return Err(StoreError::Corrupt {
                what: "firmware target (its bundle is missing)",
            });
        };
        Ok(Some(EffectiveTarget {
            version,
            from_store,
            bundle: decode_meta(bundle.value())?,
        }))
    }

    /// What a store's box said about its updates.
    pub fn ota_box(&self, store: &str) -> Result<BoxOta, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let boxes = txn.open_table(BOXES).ctx("opening firmware states")?;
        match boxes.get(store).ctx("reading a firmware state")? {
            Some(v) => serde_json::from_slice(v.value()).map_err(|_| StoreError::Corrupt {
                what: "firmware state",
            }),
            None => Ok(BoxOta::default()),
        }
    }

    /// Records a box's check: what it runs, and when it asked.
    pub fn ota_note_check(
        &self,
        store: &str,
        check: &OtaCheck,
        now_ms: i64,
    ) -> Result<(), StoreError> {
        // Like contact times, a lost check is replaced by the next one: no wait for the disk.
        self.update_box_ota(store, redb::Durability::None, |state| {
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
        self.update_box_ota(store, redb::Durability::Immediate, move |state| {
            state.reports.push(report);
            let excess = state.reports.len().saturating_sub(REPORT_HISTORY);
            state.reports.drain(..excess);
        })
    }

    /// Reads, changes and writes a store's firmware state in one transaction, so a check
    /// and a report arriving together cannot undo each other.
    fn update_box_ota(
        &self,
        store: &str,
        durability: redb::Durability,
        change: impl FnOnce(&mut BoxOta),
    ) -> Result<(), StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .ctx("starting a firmware state write")?;
        txn.set_durability(durability).ctx("setting durability")?;
        {
            let mut boxes = txn.open_table(BOXES).ctx("opening firmware states")?;
            let mut state: BoxOta = match boxes.get(store).ctx("reading a firmware state")? {
                Some(v) => serde_json::from_slice(v.value()).map_err(|_| StoreError::Corrupt {
                    what: "firmware state",
                })?,
                None => BoxOta::default(),
            };
            change(&mut state);
            let bytes = encode_json(&state, "firmware state")?;
            boxes
                .insert(store, bytes.as_slice())
                .ctx("writing a firmware state")?;
        }
        txn.commit().ctx("committing a firmware state")?;
        Ok(())
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
