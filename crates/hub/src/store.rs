//! The hub's embedded database (redb): records, their change log, tombstones, activity.
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
//!
//! Firmware updates keep three more tables, described in [`ota`].
//!
//! `changes` holds at most one entry per record: writing a record moves its entry to the new
//! sequence number. A delta pull is then a range scan from the box's cursor, and its size is
//! bounded by the number of distinct records changed, not by how often they changed.
//! Deleted records stay in `records` as tombstones until the retention expires; pruning one
//! raises the module's `horizon`, and a box whose cursor is below it must full-sync.
//!
//! A live record also keeps its previous version and the sequence number that version was
//! written at: a box whose cursor lies between the two holds exactly that version, so its
//! delta can carry a merge patch against it instead of the whole record.
//!
//! This module knows nothing about HTTP; every function is blocking and is called from
//! `spawn_blocking` by the listeners. Writers wake the change watches of the store they wrote
//! to through [`HubStore::subscribe`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Mutex;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use storebox_protocol::{self as proto, CanonicalRecord, Change, ChangeBody, Digest, ModuleCursor};

const RECORDS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("records");
const CHANGES: TableDefinition<(&str, &str, u64), &str> = TableDefinition::new("changes");
const MODULE_HEADS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("module_heads");
const ACTIVITY: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("activity");
const ACTIVITY_IDS: TableDefinition<(&str, &str), u64> = TableDefinition::new("activity_ids");
const BOX_REPORTS: TableDefinition<&str, &[u8]> = TableDefinition::new("box_reports");

pub mod ota;

/// Errors of the hub database, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub database: {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("hub database: a stored {what} does not decode; the file may be damaged")]
    Corrupt { what: &'static str },
}

trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, context: &'static str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError::Db {
            context,
            source: e.into(),
        })
    }
}

/// A record as the hub keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredRecord {
    seq: u64,
    /// When it was deleted, for tombstones; `None` for a live record.
    deleted_at_ms: Option<i64>,
    /// Canonical JSON; empty for tombstones.
    json: String,
    /// The version this one replaced, with the sequence number it was written at; `None`
    /// for a record created (or re-created after a deletion) at `seq`, and for tombstones.
    prev: Option<(u64, String)>,
}

/// The newest sequence number of a module and the oldest it can still serve deltas from.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct ModuleHead {
    head: u64,
    /// Highest sequence number of a pruned tombstone: deltas from below it are incomplete.
    horizon: u64,
}

/// An activity event as the hub keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredEvent {
    id: String,
    received_at_ms: i64,
    hub_received_at_ms: i64,
    event: String,
}

/// An activity event as the admin API returns it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivityEvent {
    pub seq: u64,
    pub id: String,
    /// When the box received it from the till (RFC 3339).
    pub received_at: String,
    /// When the hub stored it (RFC 3339).
    pub hub_received_at: String,
    pub event: serde_json::Value,
}

/// What the hub knows of a store's box, from its last contact.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BoxReport {
    pub last_contact_ms: Option<i64>,
    /// Cursor per module the box has acknowledged applying.
    pub cursors: BTreeMap<String, u64>,
    pub pending_activity: Option<u64>,
    pub box_version: Option<String>,
    pub last_full_sync_ms: Option<i64>,
    /// The last pending-activity figures the box acknowledged, (time, figure), oldest first.
    #[serde(default)]
    pub pending_history: Vec<(i64, u64)>,
    /// Per module, when the box last reported a cursor equal to the module's head.
    #[serde(default)]
    pub in_step_ms: BTreeMap<String, i64>,
    /// The sync errors the box reported in its last acknowledgement, per module.
    #[serde(default)]
    pub module_errors: BTreeMap<String, crate::fleet::SeenError>,
}

/// The outcome of an import.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ImportOutcome {
    pub upserted: u64,
    pub deleted: u64,
    pub unchanged: u64,
}

/// The outcome of writing one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PutOutcome {
    Created,
    Updated,
    Unchanged,
}

/// The outcome of pushing a batch of activity.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PushOutcome {
    pub accepted: u32,
    pub duplicates: u32,
}

/// The hub database.
pub struct HubStore {
    db: Database,
    /// Per store: bumped after every committed write, watched by the boxes' change watches.
    watchers: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// Per (store, module): the digest and record hashes at a head, so a thousand boxes
    /// checking the same module do not each hash every record.
    digests: Mutex<HashMap<(String, String), ModuleHashes>>,
}

/// A module's record hashes at one head.
#[derive(Clone)]
pub struct ModuleHashes {
    pub head: u64,
    pub digest: Digest,
    /// (id, record hash) of every live record, in id order.
    pub hashes: std::sync::Arc<Vec<(String, u64)>>,
}

impl HubStore {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<HubStore> {
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
            txn.open_table(ota::BUNDLES)?;
            txn.open_table(ota::TARGETS)?;
            txn.open_table(ota::BOXES)?;
        }
        txn.commit().context("creating the hub tables")?;
        Ok(HubStore {
            db,
            watchers: Mutex::new(HashMap::new()),
            digests: Mutex::new(HashMap::new()),
        })
    }

    /// A receiver that changes after every write to `store`'s modules.
    pub fn subscribe(&self, store: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        watchers
            .entry(store.to_owned())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, store: &str) {
        let watchers = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = watchers.get(store) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// The digest and record hashes of a module at its head.
    pub fn module_hashes(&self, store: &str, module: &str) -> Result<ModuleHashes, StoreError> {
        let head = self.module_head(store, module)?;
        let key = (store.to_owned(), module.to_owned());
        if let Some(cached) = self
            .digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if cached.head == head {
                return Ok(cached.clone());
            }
        }
        let (records, head) = self.snapshot(store, module)?;
        let mut digest = Digest::default();
        let hashes: Vec<(String, u64)> = records
            .into_iter()
            .map(|(id, json)| {
                let h = proto::record_hash(&id, &json);
                digest.add_hash(h);
                (id, h)
            })
            .collect();
        let computed = ModuleHashes {
            head,
            digest,
            hashes: std::sync::Arc::new(hashes),
        };
        self.digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(key, computed.clone());
        Ok(computed)
    }

    /// The records a box must put and delete to make the given buckets equal to the hub's:
    /// every hub record of those buckets the box does not hold with the same hash, and every
    /// id the box holds there that the hub has not. Returns the changes and the head.
    pub fn repair(
        &self,
        store: &str,
        module: &str,
        bucket_count: u32,
        buckets: &BTreeSet<u32>,
        held: &HashMap<&str, u64>,
    ) -> Result<(Vec<Change>, u64), StoreError> {
        let (records, head) = self.snapshot(store, module)?;
        let mut changes = Vec::new();
        let mut live = BTreeSet::new();
        for (id, json) in records {
            if !buckets.contains(&proto::bucket_of(&id, bucket_count)) {
                continue;
            }
            if held.get(id.as_str()) != Some(&proto::record_hash(&id, &json)) {
                changes.push(Change {
                    id: id.clone(),
                    body: ChangeBody::Put(json),
                });
            }
            live.insert(id);
        }
        for id in held.keys() {
            if !live.contains(*id) {
                changes.push(Change {
                    id: (*id).to_owned(),
                    body: ChangeBody::Delete,
                });
            }
        }
        Ok((changes, head))
    }

    /// Upserts `records` into a module; with `replace`, deletes every live record not among
    /// them. All in one transaction: either the whole import applies or nothing does.
    pub fn import(
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
        self.notify(store);
        Ok(outcome)
    }

    /// Writes one record.
    pub fn put_record(
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
        self.notify(store);
        Ok((outcome, head))
    }

    /// Deletes one record; `false` when there was no live record with that id.
    pub fn delete_record(
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
        self.notify(store);
        Ok(deleted)
    }

    /// One live record's canonical JSON.
    pub fn get_record(
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
    pub fn changes_since(
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
    pub fn snapshot(
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
    pub fn module_head(&self, store: &str, module: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
        Ok(read_head(&heads, store, module)?.head)
    }

    /// Removes tombstones deleted before `before_ms`, raising each module's horizon.
    /// Returns how many were pruned.
    pub fn prune_tombstones(&self, before_ms: i64) -> Result<u64, StoreError> {
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
    pub fn push_activity(
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
    pub fn activity(
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
        let high_water = self.activity_high_water_in(&activity, store)?;
        Ok((out, high_water))
    }

    fn activity_high_water_in(
        &self,
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

    /// The activity high-water mark of a store.
    pub fn activity_high_water(&self, store: &str) -> Result<u64, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let activity = txn.open_table(ACTIVITY).ctx("opening activity")?;
        self.activity_high_water_in(&activity, store)
    }

    /// What the hub last heard from a store's box.
    pub fn box_report(&self, store: &str) -> Result<BoxReport, StoreError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let reports = txn.open_table(BOX_REPORTS).ctx("opening box reports")?;
        match reports.get(store).ctx("reading a box report")? {
            Some(v) => serde_json::from_slice(v.value())
                .map_err(|_| StoreError::Corrupt { what: "box report" }),
            None => Ok(BoxReport::default()),
        }
    }

    /// Records a box's contact. Cursors it reports replace the ones known.
    pub fn note_contact(
        &self,
        store: &str,
        now_ms: i64,
        cursors: Option<&[ModuleCursor]>,
        ack: Option<&storebox_protocol::Ack>,
    ) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write().ctx("starting a contact write")?;
        // Contact times are bookkeeping, not data a box depends on: losing the last one on a
        // crash is harmless, so this write does not wait for the disk.
        txn.set_durability(redb::Durability::None)
            .ctx("setting durability")?;
        {
            let mut reports = txn.open_table(BOX_REPORTS).ctx("opening box reports")?;
            // Read and written in one transaction, so the delta and push processes of one box
            // reporting at the same moment cannot undo each other's update.
            let mut report: BoxReport = match reports.get(store).ctx("reading a box report")? {
                Some(v) => serde_json::from_slice(v.value())
                    .map_err(|_| StoreError::Corrupt { what: "box report" })?,
                None => BoxReport::default(),
            };
            report.last_contact_ms = Some(now_ms);
            // A cursor equal to the module's head means the box was in step at this moment:
            // the fleet view measures how long a box has been behind from it.
            let heads = txn.open_table(MODULE_HEADS).ctx("opening module heads")?;
            let reported = cursors
                .into_iter()
                .flatten()
                .chain(ack.into_iter().flat_map(|a| &a.cursors));
            for c in reported {
                report.cursors.insert(c.module.clone(), c.cursor);
                if read_head(&heads, store, &c.module)?.head == c.cursor {
                    report.in_step_ms.insert(c.module.clone(), now_ms);
                }
            }
            if let Some(ack) = ack {
                report.pending_activity = Some(ack.pending_activity);
                crate::fleet::note_pending(
                    &mut report.pending_history,
                    now_ms,
                    ack.pending_activity,
                );
                report.box_version = Some(ack.box_version.clone());
                report.last_full_sync_ms = Some(now_ms);
                report.module_errors =
                    crate::fleet::note_errors(&report.module_errors, &ack.errors, now_ms);
            }
            let bytes = serde_json::to_vec(&report)
                .map_err(|_| StoreError::Corrupt { what: "box report" })?;
            reports
                .insert(store, bytes.as_slice())
                .ctx("writing a box report")?;
        }
        txn.commit().ctx("committing a contact")?;
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

/// What a box at `cursor` needs to learn of a record written after it: a merge patch when
/// the box holds the previous version (written at or before its cursor) and a patch can say
/// the change, else the whole record.
fn change_body(stored: StoredRecord, cursor: u64) -> ChangeBody {
    if stored.deleted_at_ms.is_some() {
        return ChangeBody::Delete;
    }
    if let Some((prev_seq, prev)) = &stored.prev {
        if *prev_seq <= cursor {
            let parsed = (
                serde_json::from_str::<serde_json::Value>(prev),
                serde_json::from_str::<serde_json::Value>(&stored.json),
            );
            if let (Ok(old), Ok(new)) = parsed {
                if let Some(patch) = proto::patch::diff(&old, &new) {
                    let patch = patch.to_string();
                    // A patch is only worth it when it is shorter than the record.
                    if patch.len() < stored.json.len() {
                        return ChangeBody::Patch(patch);
                    }
                }
            }
        }
    }
    ChangeBody::Put(stored.json)
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

/// Milliseconds since the epoch as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use storebox_protocol::canonical_record_from_text;

    fn rec(text: &str) -> CanonicalRecord {
        canonical_record_from_text(text).unwrap()
    }

    #[test]
    fn changes_follow_writes_and_deletes() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(dir.path()).unwrap();
        let out = hub
            .import(
                "s1",
                "catalog",
                &[rec(r#"{"id":"a","p":1}"#), rec(r#"{"id":"b","p":2}"#)],
                false,
                0,
            )
            .unwrap();
        assert_eq!(out.upserted, 2);
        let (changes, cursor, more) = hub.changes_since("s1", "catalog", 0, 100).unwrap().unwrap();
        assert_eq!((changes.len(), cursor, more), (2, 2, false));

        // Unchanged content writes nothing and does not move the head.
        let out = hub
            .import("s1", "catalog", &[rec(r#"{"p":1,"id":"a"}"#)], false, 0)
            .unwrap();
        assert_eq!(out.unchanged, 1);
        assert_eq!(hub.module_head("s1", "catalog").unwrap(), 2);

        // Replace deletes b; a is changed twice but appears once in the log.
        hub.put_record("s1", "catalog", &rec(r#"{"id":"a","p":3}"#))
            .unwrap();
        let out = hub
            .import("s1", "catalog", &[rec(r#"{"id":"a","p":4}"#)], true, 0)
            .unwrap();
        assert_eq!((out.upserted, out.deleted), (1, 1));
        let (changes, cursor, _) = hub.changes_since("s1", "catalog", 2, 100).unwrap().unwrap();
        assert_eq!(cursor, 5);
        assert_eq!(changes.len(), 2);
        // Upserts come first in an import, then the deletions of the replace.
        assert_eq!(
            changes[0].body,
            ChangeBody::Put(r#"{"id":"a","p":4}"#.into())
        );
        assert_eq!(changes[1].id, "b");
        assert_eq!(changes[1].body, ChangeBody::Delete);
        // A box at cursor 3 holds a's version of seq 3: it gets a patch against it.
        let (changes, _, _) = hub.changes_since("s1", "catalog", 3, 100).unwrap().unwrap();
        assert_eq!(changes[0].body, ChangeBody::Patch(r#"{"p":4}"#.into()));

        // Other stores and modules are untouched.
        assert!(hub.snapshot("s2", "catalog").unwrap().0.is_empty());
        let (snap, head) = hub.snapshot("s1", "catalog").unwrap();
        assert_eq!((snap.len(), head), (1, 5));
    }

    #[test]
    fn pruned_tombstones_force_a_reset_for_old_cursors() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(dir.path()).unwrap();
        hub.import(
            "s",
            "m",
            &[rec(r#"{"id":"a"}"#), rec(r#"{"id":"b"}"#)],
            false,
            0,
        )
        .unwrap();
        assert!(hub.delete_record("s", "m", "a", 100).unwrap());
        assert!(!hub.delete_record("s", "m", "a", 100).unwrap());
        assert_eq!(hub.prune_tombstones(50).unwrap(), 0);
        assert_eq!(hub.prune_tombstones(200).unwrap(), 1);
        assert!(hub.changes_since("s", "m", 0, 10).unwrap().is_none());
        let (changes, cursor, _) = hub.changes_since("s", "m", 3, 10).unwrap().unwrap();
        assert!(changes.is_empty());
        assert_eq!(cursor, 3);
    }

    #[test]
    fn activity_is_stored_once_per_id_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(dir.path()).unwrap();
        let ev = |id: &str| storebox_protocol::PushedEvent {
            id: id.into(),
            received_at_ms: 1,
            event: format!(r#"{{"id":"{id}"}}"#),
        };
        let out = hub.push_activity("s", &[ev("x"), ev("y")], 5).unwrap();
        assert_eq!((out.accepted, out.duplicates), (2, 0));
        let out = hub.push_activity("s", &[ev("y"), ev("z")], 6).unwrap();
        assert_eq!((out.accepted, out.duplicates), (1, 1));
        let (events, high) = hub.activity("s", 0, 10).unwrap();
        let ids: Vec<_> = events.iter().map(|e| e.id.as_str()).collect();
        assert_eq!(ids, ["x", "y", "z"]);
        assert_eq!(high, 3);
        let (events, _) = hub.activity("s", 2, 10).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(hub.activity("other", 0, 10).unwrap().1, 0);
    }
}
