//! The embedded backend: one redb file in the hub's data directory. The default, for the
//! demo, small chains and tests; one process only (redb locks its file).
//!
//! Layout (all keys begin with the store id, so stores never mix):
//!
//! | table            | key                         | value                                  |
//! |------------------|-----------------------------|----------------------------------------|
//! | `records`        | (store, module, id)         | [`StoredRecord`] (postcard)            |
//! | `changes`        | (store, module, seq)        | record id                              |
//! | `module_heads`   | (store, module)             | [`ModuleHead`] (postcard)              |
//! | `activity`       | (store, seq)                | [`StoredEvent`] (postcard)             |
//! | `activity_ids`   | (store, event id)           | seq                                    |
//! | `box_reports`    | store                       | [`BoxReport`] (JSON)                   |
//! | `ota_bundles`    | version                     | [`BundleMeta`] (JSON)                  |
//! | `ota_targets`    | store, or `""` for the fleet| version                                |
//! | `ota_boxes`      | store                       | [`BoxOta`] (JSON)                      |
//!
//! `changes` holds at most one entry per record: writing a record moves its entry to the new
//! sequence number. A read is one redb read transaction, so the head it reports and the
//! changes it lists are of the same moment; redb serialises writers, so the rules that tie
//! firmware targets to bundles are checked inside the transaction that changes them.

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use storebox_protocol::{CanonicalRecord, Change, ChangeBody};

use super::ota::{BoxOta, BundleMeta, DeleteBundle, EffectiveTarget, PutBundle, TargetedBy, FLEET};
use super::{
    change_body, rfc3339, ActivityEvent, Backend, BoxReport, ImportOutcome, PushOutcome,
    PutOutcome, StoreError, StoredRecord,
};

const RECORDS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("records");
const CHANGES: TableDefinition<(&str, &str, u64), &str> = TableDefinition::new("changes");
const MODULE_HEADS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("module_heads");
const ACTIVITY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("activity");
const ACTIVITY_IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("activity_ids");
const BOX_REPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("box_reports");
const BUNDLES: TableDefinition<&str, &[u8]> = TableDefinition::new("ota_bundles");
const TARGETS: TableDefinition<&str, &str> = TableDefinition::new("ota_targets");
const BOXES: TableDefinition<&str, &[u8]> = TableDefinition::new("ota_boxes");

trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db {
            context,
            source: Box::new(e.into()),
        })
    }
}

/// The newest sequence number of a module and the oldest it can still serve deltas from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct ModuleHead {
    head: u64,
    /// Highest sequence number of a pruned tombstone: deltas from below it are incomplete.
    horizon: u64,
}

/// An activity event as the embedded backend keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEvent {
    id: String,
    received_at_ms: i64,
    hub_received_at_ms: i64,
    event: String,
}

/// The hub database in one redb file.
pub struct Embedded {
    db: Database,
}

impl Embedded {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<Embedded> {
        use anyhow::Context;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the hub data directory {}", dir.display()))?;
        let path = dir.join("hub.redb");
        let db = Database::create(&path)
            .with_context(|| format!("opening the hub database {}", path.display()))?;
        let txn = db.begin_write().context("starting the first transaction")?;
        {
            // Creating every table up front lets readers open them without special cases.
            txn.open_table(RECORDS)?;
            txn.open_table(CHANGES)?;
            txn.open_table(MODULE_HEADS)?;
            txn.open_table(ACTIVITY)?;
            txn.open_table(ACTIVITY_IDS)?;
            txn.open_table(BOX_REPORTS)?;
            txn.open_table(BUNDLES)?;
            txn.open_table(TARGETS)?;
            txn.open_table(BOXES)?;
        }
        txn.commit().context("creating the hub tables")?;
        Ok(Embedded { db })
    }
}

impl Backend for Embedded {
    /// Upserts `records` into a module; with `replace`, deletes every live record not among
    /// them. All in one transaction: either the whole import applies or nothing does.
    fn import(
        &self,
        store: &str,
        module: &str,
        records: &[CanonicalRecord],
        replace: bool,
        now_ms: i64,
    ) -> Result<ImportOutcome, StoreError> {
        let txn = self.db.begin_write().ctx("starting an import")?;
        let mut outcome = ImportOutcome::default();
        {
            let mut writer = ModuleWriter::open(&txn, store, module)?;
            let mut seen = std::collections::BTreeSet::new();
            for record in records {
                match writer.put(&record.id, &record.json)? {
                    PutOutcome::Unchanged => outcome.unchanged += 1,
                    PutOutcome::Created | PutOutcome::Updated => outcome.upserted += 1,
                }
                seen.insert(record.id.as_str());
            }
            if replace {
                for id in writer.live_ids()? {
                    if !seen.contains(id.as_str()) && writer.delete(&id, now_ms)? {
                        outcome.deleted += 1;
                    }
                }
            }
            writer.finish()?;
        }
        txn.commit().ctx("committing an import")?;
        Ok(outcome)
    }

    /// Writes one record.
    fn put_record(
        &self,
        store: &str,
        module: &str,
        record: &CanonicalRecord,
    ) -> Result<(PutOutcome, u64), StoreError> {
        let txn = self.db.begin_write().ctx("starting a record write")?;
        let outcome;
        let head;
        {
            let mut writer = ModuleWriter::open(&txn, store, module)?;
            outcome = writer.put(&record.id, &record.json)?;
            head = writer.head.head;
            writer.finish()?;
        }
        txn.commit().ctx("committing a record write")?;
        Ok((outcome, head))
    }

    /// Deletes one record; `false` when there was no live record with that id.
    fn delete_record(
        &self,
        store: &str,
        module: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let txn = self.db.begin_write().ctx("starting a record delete")?;
        let deleted;
        {
            let mut writer = ModuleWriter::open(&txn, store, module)?;
            deleted = writer.delete(id, now_ms)?;
            writer.finish()?;
        }
        txn.commit().ctx("committing a record delete")?;
        Ok(deleted)
    }

    /// One live record's canonical JSON.
    fn get_record(
        &self,
        store: &str,
        module: &str,
        id: &str,
    ) -> Result<Option<String>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let records = txn.open_table(RECORDS).ctx("opening records")?;
        let Some(value) = records.get((store, module, id)).ctx("reading a record")? else {
            return Ok(None);
        };
        let stored = decode_record(value.value())?;
        Ok(stored.deleted_at_ms.is_none().then_some(stored.json))
    }

    /// The changes of a module after `cursor`, at most `limit` of them, and whether more wait.
    /// `None` when the cursor is below the tombstone horizon: the box must full-sync.
    fn changes_since(
        &self,
        store: &str,
        module: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<Option<(Vec<Change>, u64, bool)>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
        let head = read_head(&heads, store, module)?;
        // Below the horizon a deletion may have been forgotten; above the head the box holds
        // state from some other database (the hub's was restored or recreated). Either way
        // only a full sync makes the module exact again.
        if cursor < head.horizon || cursor > head.head {
            return Ok(None);
        }
        let changes = txn.open_table(CHANGES).ctx("opening changes")?;
        let records = txn.open_table(RECORDS).ctx("opening records")?;
        let mut out = Vec::new();
        let mut more = false;
        let mut last = cursor;
        for entry in changes
            .range((store, module, cursor + 1)..=(store, module, u64::MAX))
            .ctx("scanning changes")?
        {
            let (key, id) = entry.ctx("reading a change")?;
            if out.len() >= limit {
                more = true;
                break;
            }
            let seq = key.value().2;
            let id = id.value().to_owned();
            let body = match records
                .get((store, module, id.as_str()))
                .ctx("reading a changed record")?
            {
                Some(v) => {
                    let stored = decode_record(v.value())?;
                    change_body(stored, cursor)
                }
                None => ChangeBody::Delete,
            };
            last = seq;
            out.push(Change { id, body });
        }
        // Read in the same transaction as the scan, the head is where a complete answer
        // leaves the box.
        if !more {
            last = head.head;
        }
        Ok(Some((out, last, more)))
    }

    /// Every live record of a module, in id order, and the cursor they correspond to.
    fn snapshot(
        &self,
        store: &str,
        module: &str,
    ) -> Result<(Vec<(String, String)>, u64), StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
        let head = read_head(&heads, store, module)?;
        let records = txn.open_table(RECORDS).ctx("opening records")?;
        let mut out = Vec::new();
        for entry in records
            .range((store, module, "")..)
            .ctx("scanning records")?
        {
            let (key, value) = entry.ctx("reading a record")?;
            let (s, m, id) = key.value();
            if s != store || m != module {
                break;
            }
            let stored = decode_record(value.value())?;
            if stored.deleted_at_ms.is_none() {
                out.push((id.to_owned(), stored.json));
            }
        }
        Ok((out, head.head))
    }

    /// Number of live records and the head sequence of a module.
    fn module_head(&self, store: &str, module: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
        Ok(read_head(&heads, store, module)?.head)
    }

    /// Removes tombstones deleted before `before_ms`, raising each module's horizon.
    /// Returns how many were pruned.
    fn module_heads(
        &self,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<(String, String), u64>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
        let mut out = std::collections::HashMap::new();
        for key in keys {
            for entry in heads.range((*key, "")..).ctx("scanning module heads")? {
                let (k, v) = entry.ctx("reading a module head")?;
                let (store, module) = k.value();
                if store != *key {
                    break;
                }
                let head: ModuleHead =
                    postcard::from_bytes(v.value()).map_err(|_| StoreError::Corrupt {
                        what: "module head",
                    })?;
                out.insert((store.to_owned(), module.to_owned()), head.head);
            }
        }
        Ok(out)
    }

    fn prune_tombstones(&self, before_ms: i64) -> Result<u64, StoreError> {
        let txn = self.db.begin_write().ctx("starting a prune")?;
        let mut pruned = 0;
        {
            let mut records = txn.open_table(RECORDS).ctx("opening records")?;
            let mut changes = txn.open_table(CHANGES).ctx("opening changes")?;
            let mut heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
            let mut expired: Vec<(String, String, String, u64)> = Vec::new();
            for entry in records.iter().ctx("scanning records")? {
                let (key, value) = entry.ctx("reading a record")?;
                let stored = decode_record(value.value())?;
                if matches!(stored.deleted_at_ms, Some(at) if at < before_ms) {
                    let (s, m, id) = key.value();
                    expired.push((s.to_owned(), m.to_owned(), id.to_owned(), stored.seq));
                }
            }
            for (s, m, id, seq) in expired {
                records
                    .remove((s.as_str(), m.as_str(), id.as_str()))
                    .ctx("removing a tombstone")?;
                changes
                    .remove((s.as_str(), m.as_str(), seq))
                    .ctx("removing a tombstone's change")?;
                let mut head = read_head(&heads, &s, &m)?;
                head.horizon = head.horizon.max(seq);
                write_head(&mut heads, &s, &m, head)?;
                pruned += 1;
            }
        }
        if pruned > 0 {
            txn.commit().ctx("committing a prune")?;
        } else {
            txn.abort().ctx("abandoning an empty prune")?;
        }
        Ok(pruned)
    }

    /// Stores pushed events once each by id, in the order given. Durable when it returns.
    fn push_activity(
        &self,
        store: &str,
        events: &[storebox_protocol::PushedEvent],
        now_ms: i64,
    ) -> Result<PushOutcome, StoreError> {
        let txn = self.db.begin_write().ctx("starting an activity write")?;
        let mut outcome = PushOutcome::default();
        {
            let mut activity = txn.open_table(ACTIVITY).ctx("opening activity")?;
            let mut ids = txn.open_table(ACTIVITY_IDS).ctx("opening activity ids")?;
            let mut next = match activity
                .range((store, 0)..=(store, u64::MAX))
                .ctx("finding the activity head")?
                .next_back()
            {
                Some(entry) => entry.ctx("reading the activity head")?.0.value().1 + 1,
                None => 1,
            };
            for event in events {
                if ids
                    .get((store, event.id.as_str()))
                    .ctx("checking an event id")?
                    .is_some()
                {
                    outcome.duplicates += 1;
                    continue;
                }
                let stored = StoredEvent {
                    id: event.id.clone(),
                    received_at_ms: event.received_at_ms,
                    hub_received_at_ms: now_ms,
                    event: event.event.clone(),
                };
                let bytes = postcard::to_stdvec(&stored)
                    .map_err(|_| StoreError::Corrupt { what: "event" })?;
                activity
                    .insert((store, next), bytes.as_slice())
                    .ctx("storing an event")?;
                ids.insert((store, event.id.as_str()), next)
                    .ctx("storing an event id")?;
                next += 1;
                outcome.accepted += 1;
            }
        }
        txn.commit().ctx("committing activity")?;
        Ok(outcome)
    }

    /// Events after `after`, in receipt order, at most `limit`; and the activity high-water mark.
    fn activity(
        &self,
        store: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<ActivityEvent>, u64), StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let activity = txn.open_table(ACTIVITY).ctx("opening activity")?;
        let mut out = Vec::new();
        for entry in activity
            .range((store, after.saturating_add(1))..=(store, u64::MAX))
            .ctx("scanning activity")?
        {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry.ctx("reading an event")?;
            let stored: StoredEvent = postcard::from_bytes(value.value())
                .map_err(|_| StoreError::Corrupt { what: "event" })?;
            let event = serde_json::from_str(&stored.event)
                .map_err(|_| StoreError::Corrupt { what: "event body" })?;
            out.push(ActivityEvent {
                seq: key.value().1,
                id: stored.id,
                received_at: rfc3339(stored.received_at_ms),
                hub_received_at: rfc3339(stored.hub_received_at_ms),
                event,
            });
        }
        let high_water = activity_high_water_in(&activity, store)?;
        Ok((out, high_water))
    }

    /// The activity high-water mark of a store.
    fn activity_high_water(&self, store: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let activity = txn.open_table(ACTIVITY).ctx("opening activity")?;
        activity_high_water_in(&activity, store)
    }

    /// What the hub last heard from a store's box.
    fn box_report(&self, store: &str) -> Result<BoxReport, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let reports = txn.open_table(BOX_REPORTS).ctx("opening box reports")?;
        match reports.get(store).ctx("reading a box report")? {
            Some(v) => serde_json::from_slice(v.value())
                .map_err(|_| StoreError::Corrupt { what: "box report" }),
            None => Ok(BoxReport::default()),
        }
    }

    fn update_box_reports(
        &self,
        stores: &[&str],
        change: &mut dyn FnMut(&str, &mut BoxReport),
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().ctx("starting a contact write")?;
        // Contact times are bookkeeping, not data a box depends on: losing the last one on a
        // crash is harmless, so this write does not wait for the disk.
        txn.set_durability(redb::Durability::None)
            .ctx("setting durability")?;
        {
            let mut reports = txn.open_table(BOX_REPORTS).ctx("opening box reports")?;
            for store in stores {
                let mut report: BoxReport = match reports.get(*store).ctx("reading a box report")? {
                    Some(v) => serde_json::from_slice(v.value())
                        .map_err(|_| StoreError::Corrupt { what: "box report" })?,
                    None => BoxReport::default(),
                };
                change(store, &mut report);
                let bytes = serde_json::to_vec(&report)
                    .map_err(|_| StoreError::Corrupt { what: "box report" })?;
                reports
                    .insert(*store, bytes.as_slice())
                    .ctx("writing a box report")?;
            }
        }
        txn.commit().ctx("committing a contact")?;
        Ok(())
    }

    // Firmware updates.

    /// Every stored bundle, by version.
    fn ota_bundles(&self) -> Result<Vec<(String, BundleMeta)>, StoreError> {
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
    fn ota_bundle(&self, version: &str) -> Result<Option<BundleMeta>, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let bundles = txn.open_table(BUNDLES).ctx("opening firmware bundles")?;
        match bundles.get(version).ctx("reading a firmware bundle")? {
            Some(v) => Ok(Some(decode_meta(v.value())?)),
            None => Ok(None),
        }
    }

    /// Who targets `version` now.
    fn ota_targeted_by(&self, version: &str) -> Result<TargetedBy, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let targets = txn.open_table(TARGETS).ctx("opening firmware targets")?;
        targeted_by(&targets, version)
    }

    /// Records an uploaded bundle whose file is already in place, unless its version is
    /// targeted.
    fn ota_put_bundle(&self, version: &str, meta: &BundleMeta) -> Result<PutBundle, StoreError> {
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
    fn ota_delete_bundle(&self, version: &str) -> Result<DeleteBundle, StoreError> {
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
    fn ota_set_target(
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
    fn ota_targets(
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
    fn ota_effective_target(&self, store: &str) -> Result<Option<EffectiveTarget>, StoreError> {
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
    fn ota_box(&self, store: &str) -> Result<BoxOta, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let boxes = txn.open_table(BOXES).ctx("opening firmware states")?;
        match boxes.get(store).ctx("reading a firmware state")? {
            Some(v) => serde_json::from_slice(v.value()).map_err(|_| StoreError::Corrupt {
                what: "firmware state",
            }),
            None => Ok(BoxOta::default()),
        }
    }

    /// Reads, changes and writes a store's firmware state in one transaction, so a check
    /// and a report arriving together cannot undo each other.
    fn update_box_ota(
        &self,
        store: &str,
        durable: bool,
        change: &mut dyn FnMut(&mut BoxOta),
    ) -> Result<(), StoreError> {
        let mut txn = self
            .db
            .begin_write()
            .ctx("starting a firmware state write")?;
        txn.set_durability(if durable {
            redb::Durability::Immediate
        } else {
            redb::Durability::None
        })
        .ctx("setting durability")?;
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

/// Writes to one module inside a transaction, keeping the change log and head in step.
struct ModuleWriter<'t> {
    store: String,
    module: String,
    records: redb::Table<'t, (&'static str, &'static str, &'static str), &'static [u8]>,
    changes: redb::Table<'t, (&'static str, &'static str, u64), &'static str>,
    heads: redb::Table<'t, (&'static str, &'static str), &'static [u8]>,
    head: ModuleHead,
    dirty: bool,
}

impl<'t> ModuleWriter<'t> {
    fn open(
        txn: &'t redb::WriteTransaction,
        store: &str,
        module: &str,
    ) -> Result<ModuleWriter<'t>, StoreError> {
        let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
        let head = read_head(&heads, store, module)?;
        Ok(ModuleWriter {
            store: store.to_owned(),
            module: module.to_owned(),
            records: txn.open_table(RECORDS).ctx("opening records")?,
            changes: txn.open_table(CHANGES).ctx("opening changes")?,
            heads,
            head,
            dirty: false,
        })
    }

    fn current(&self, id: &str) -> Result<Option<StoredRecord>, StoreError> {
        match self
            .records
            .get((self.store.as_str(), self.module.as_str(), id))
            .ctx("reading a record")?
        {
            Some(v) => Ok(Some(decode_record(v.value())?)),
            None => Ok(None),
        }
    }

    fn write(
        &mut self,
        id: &str,
        previous: Option<u64>,
        stored: StoredRecord,
    ) -> Result<(), StoreError> {
        let (s, m) = (self.store.as_str(), self.module.as_str());
        if let Some(seq) = previous {
            self.changes.remove((s, m, seq)).ctx("moving a change")?;
        }
        self.changes
            .insert((s, m, stored.seq), id)
            .ctx("logging a change")?;
        let bytes =
            postcard::to_stdvec(&stored).map_err(|_| StoreError::Corrupt { what: "record" })?;
        self.records
            .insert((s, m, id), bytes.as_slice())
            .ctx("writing a record")?;
        self.dirty = true;
        Ok(())
    }

    fn put(&mut self, id: &str, json: &str) -> Result<PutOutcome, StoreError> {
        let current = self.current(id)?;
        let outcome = match &current {
            Some(c) if c.deleted_at_ms.is_none() && c.json == json => {
                return Ok(PutOutcome::Unchanged)
            }
            Some(c) if c.deleted_at_ms.is_none() => PutOutcome::Updated,
            _ => PutOutcome::Created,
        };
        self.head.head += 1;
        let previous = current.as_ref().map(|c| c.seq);
        let prev = current
            .filter(|c| c.deleted_at_ms.is_none())
            .map(|c| (c.seq, c.json));
        let stored = StoredRecord {
            seq: self.head.head,
            deleted_at_ms: None,
            json: json.to_owned(),
            prev,
        };
        self.write(id, previous, stored)?;
        Ok(outcome)
    }

    fn delete(&mut self, id: &str, now_ms: i64) -> Result<bool, StoreError> {
        let Some(current) = self.current(id)? else {
            return Ok(false);
        };
        if current.deleted_at_ms.is_some() {
            return Ok(false);
        }
        self.head.head += 1;
        let stored = StoredRecord {
            seq: self.head.head,
            deleted_at_ms: Some(now_ms),
            json: String::new(),
            prev: None,
        };
        self.write(id, Some(current.seq), stored)?;
        Ok(true)
    }

    fn live_ids(&self) -> Result<Vec<String>, StoreError> {
        let (s, m) = (self.store.as_str(), self.module.as_str());
        let mut out = Vec::new();
        for entry in self.records.range((s, m, "")..).ctx("scanning records")? {
            let (key, value) = entry.ctx("reading a record")?;
            let (ks, km, id) = key.value();
            if ks != s || km != m {
                break;
            }
            if decode_record(value.value())?.deleted_at_ms.is_none() {
                out.push(id.to_owned());
            }
        }
        Ok(out)
    }

    fn finish(mut self) -> Result<(), StoreError> {
        if self.dirty {
            let head = self.head;
            write_head(&mut self.heads, &self.store, &self.module, head)?;
        }
        Ok(())
    }
}

fn decode_record(bytes: &[u8]) -> Result<StoredRecord, StoreError> {
    postcard::from_bytes(bytes).map_err(|_| StoreError::Corrupt { what: "record" })
}

fn read_head(
    heads: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    store: &str,
    module: &str,
) -> Result<ModuleHead, StoreError> {
    match heads.get((store, module)).ctx("reading a module head")? {
        Some(v) => postcard::from_bytes(v.value()).map_err(|_| StoreError::Corrupt {
            what: "module head",
        }),
        None => Ok(ModuleHead::default()),
    }
}

fn write_head(
    heads: &mut redb::Table<(&'static str, &'static str), &'static [u8]>,
    store: &str,
    module: &str,
    head: ModuleHead,
) -> Result<(), StoreError> {
    let bytes = postcard::to_stdvec(&head).map_err(|_| StoreError::Corrupt {
        what: "module head",
    })?;
    heads
        .insert((store, module), bytes.as_slice())
        .ctx("writing a module head")?;
    Ok(())
}

fn activity_high_water_in(
    activity: &redb::ReadOnlyTable<(&str, u64), &[u8]>,
    store: &str,
) -> Result<u64, StoreError> {
    Ok(
        match activity
            .range((store, 0)..=(store, u64::MAX))
            .ctx("finding the activity head")?
            .next_back()
        {
            Some(entry) => entry.ctx("reading the activity head")?.0.value().1,
            None => 0,
        },
    )
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
