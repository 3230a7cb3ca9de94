//! The box's local database (redb on flash): synced module data, its indexes, per-module sync
//! state, and the activity push mark. The activity itself lives in the journal
//! (`journal.rs`), which writes far less flash per event than a redb commit.
//!
//! Tables (see `docs/STORAGE.md` for the reasoning):
//!
//! | table          | key                      | value                           |
//! |----------------|--------------------------|---------------------------------|
//! | `records`      | (module, id)             | canonical JSON                  |
//! | `index`        | (module, field, value)   | record id                       |
//! | `modules`      | module                   | [`ModuleState`] (postcard)      |
//! | `quarantine`   | (module, id)             | why the record was kept out     |
//! | `meta`         | name                     | u64 (`pushed_through`, `schema_version`) |
//!
//! A module's records, index entries and cursor change in the same transaction, so after a
//! power cut the cursor always describes the data beside it.
//!
//! This module knows nothing about HTTP or the hub.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use storebox_protocol::{self as proto, Change, ChangeBody};

const RECORDS: TableDefinition<(&str, &str), &str> = TableDefinition::new("records");
const INDEX: TableDefinition<(&str, &str, &str), &str> = TableDefinition::new("index");
const MODULES: TableDefinition<&str, &[u8]> = TableDefinition::new("modules");
const QUARANTINE: TableDefinition<(&str, &str), &str> = TableDefinition::new("quarantine");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const PUSHED_THROUGH: &str = "pushed_through";

/// Errors of the local database, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("local database: {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: redb::Error,
    },
    #[error("local database: a stored {what} does not decode; the file may be damaged")]
    Corrupt { what: &'static str },
    #[error("local database: the task running the request failed: {0}")]
    Task(String),
}

trait Ctx<T> {
    fn ctx(self, context: &'static str) -> Result<T, StorageError>;
}

impl<T, E: Into<redb::Error>> Ctx<T> for Result<T, E> {
    fn ctx(self, context: &'static str) -> Result<T, StorageError> {
        self.map_err(|e| StorageError::Db {
            context,
            source: e.into(),
        })
    }
}

/// What the box keeps about one module's sync.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleState {
    /// Hub change sequence up to which the local data is complete.
    pub cursor: u64,
    /// Fields indexed for lookups, as the hub announced them.
    pub indexes: Vec<String>,
    /// Live records.
    pub records: u64,
    /// Records kept out because they failed validation.
    pub quarantined: u64,
    pub last_full_ok_ms: Option<i64>,
    pub last_delta_ok_ms: Option<i64>,
}

/// An activity event as kept on the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub id: String,
    pub received_at_ms: i64,
    /// Canonical JSON of the event as the till posted it.
    pub event: String,
}

/// What to apply to one module.
#[derive(Debug, Clone)]
pub struct ModuleApply {
    pub module: String,
    pub indexes: Vec<String>,
    pub kind: ApplyKind,
    pub now_ms: i64,
}

/// A delta or a snapshot.
#[derive(Debug, Clone)]
pub enum ApplyKind {
    /// Changes made on top of `from_cursor`. Dropped if the module's cursor moved meanwhile
    /// (a full sync got there first): the next pull fetches them again from the new cursor.
    Delta {
        from_cursor: u64,
        changes: Vec<Change>,
        cursor: u64,
        /// These changes end a full sync (the hub caught the module up instead of sending
        /// it whole): the module counts as fully synced.
        completes_full: bool,
    },
    /// The module's whole content: the local module becomes exactly this.
    Snapshot {
        records: Vec<(String, String)>,
        cursor: u64,
    },
    /// The hub found the box's digest of the module equal to its own at `cursor`: a full
    /// sync with nothing to change. Only a first confirmation is written; later ones are
    /// kept in memory by the sync engine, so a daily full sync that finds nothing writes
    /// nothing.
    Unchanged { cursor: u64 },
}

/// What applying did to one module.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Applied {
    pub upserted: u64,
    pub deleted: u64,
    pub unchanged: u64,
    /// Records kept out in this apply, with the reason.
    pub quarantined: Vec<(String, String)>,
    /// The delta was dropped because the module moved on meanwhile.
    pub stale: bool,
    /// Of `upserted`, the ids that were not there before: keeps the record count without a
    /// scan.
    #[serde(skip)]
    pub upserted_new: u64,
    /// Patches for records the box does not hold: skipped; the module digest check then
    /// repairs the module.
    pub unpatchable: u64,
}

/// The local database.
pub struct BoxStore {
    db: Arc<Database>,
}

impl BoxStore {
    /// The database file's name inside the data directory.
    pub const FILE_NAME: &'static str = "storebox.redb";

    /// Opens (or creates) the database in `dir` with a page cache of `cache_mib` MiB.
    pub fn open(dir: &Path, cache_mib: usize) -> anyhow::Result<BoxStore> {
        use anyhow::Context;
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the data directory {}", dir.display()))?;
        let path = dir.join(Self::FILE_NAME);
        let db = Database::builder()
            .set_cache_size(cache_mib * 1024 * 1024)
            .create(&path)
            .with_context(|| format!("opening the database {}", path.display()))?;
        BoxStore::from_database(db)
    }

    /// Wraps an open database, creating the tables it lacks.
    fn from_database(db: Database) -> anyhow::Result<BoxStore> {
        use anyhow::Context;
        let txn = db.begin_write().context("starting the first transaction")?;
        {
            txn.open_table(RECORDS)?;
            txn.open_table(INDEX)?;
            txn.open_table(MODULES)?;
            txn.open_table(QUARANTINE)?;
            txn.open_table(META)?;
        }
        txn.commit().context("creating the tables")?;
        Ok(BoxStore { db: Arc::new(db) })
    }

    /// One record's canonical JSON.
    pub fn get(&self, module: &str, id: &str) -> Result<Option<String>, StorageError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let records = txn.open_table(RECORDS).ctx("opening records")?;
        Ok(records
            .get((module, id))
            .ctx("reading a record")?
            .map(|v| v.value().to_owned()))
    }

    /// The record whose indexed `field` equals `value`.
    pub fn get_by(
        &self,
        module: &str,
        field: &str,
        value: &str,
    ) -> Result<Option<String>, StorageError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let index = txn.open_table(INDEX).ctx("opening the index")?;
        let Some(id) = index.get((module, field, value)).ctx("reading the index")? else {
            return Ok(None);
        };
        let records = txn.open_table(RECORDS).ctx("opening records")?;
        Ok(records
            .get((module, id.value()))
            .ctx("reading a record")?
            .map(|v| v.value().to_owned()))
    }

    /// Every record of a module, in id order.
    pub fn all(&self, module: &str) -> Result<Vec<(String, String)>, StorageError> {
        self.scan_module(RECORDS, module, |id, json| (id.to_owned(), json.to_owned()))
    }

    /// `each(id, value)` of every entry of `module` in a table keyed by (module, id), in id
    /// order, in one read transaction.
    fn scan_module<T>(
        &self,
        table: TableDefinition<(&'static str, &'static str), &'static str>,
        module: &str,
        mut each: impl FnMut(&str, &str) -> T,
    ) -> Result<Vec<T>, StorageError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let table = txn.open_table(table).ctx("opening a module's table")?;
        let mut out = Vec::new();
        for entry in table.range((module, "")..).ctx("scanning a module")? {
            let (key, value) = entry.ctx("reading a module's entry")?;
            let (m, id) = key.value();
            if m != module {
                break;
            }
            out.push(each(id, value.value()));
        }
        Ok(out)
    }

    /// The sync state of every module the box has heard of.
    pub fn modules(&self) -> Result<BTreeMap<String, ModuleState>, StorageError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let modules = txn.open_table(MODULES).ctx("opening modules")?;
        let mut out = BTreeMap::new();
        for entry in modules.iter().ctx("scanning modules")? {
            let (key, value) = entry.ctx("reading a module")?;
            out.insert(key.value().to_owned(), decode_state(value.value())?);
        }
        Ok(out)
    }

    /// The digest of every module, over the bytes stored: what a full sync compares with
    /// the hub's. A record damaged on flash changes it, and the full sync then rewrites the
    /// module from the hub's copy.
    ///
    /// `only` limits it to those modules (empty: every module): a later round of a full sync
    /// hashes the modules it asks about, not the whole store again.
    pub fn digests(&self, only: &[String]) -> Result<Vec<proto::ModuleDigest>, StorageError> {
        let modules = self.modules()?;
        let mut out = Vec::new();
        for (module, state) in modules {
            if !only.is_empty() && !only.contains(&module) {
                continue;
            }
            let digest = self.module_digest(&module)?;
            out.push(proto::ModuleDigest {
                module,
                cursor: state.cursor,
                digest,
            });
        }
        Ok(out)
    }

    /// One module's digest over the bytes stored.
    pub fn module_digest(&self, module: &str) -> Result<proto::Digest, StorageError> {
        let mut digest = proto::Digest::default();
        for (_, h) in self.record_hashes(module)? {
            digest.add_hash(h);
        }
        Ok(digest)
    }

    /// (id, [`proto::record_hash`]) of every record of a module, over the bytes stored.
    pub fn record_hashes(&self, module: &str) -> Result<Vec<(String, u64)>, StorageError> {
        self.scan_module(RECORDS, module, |id, json| {
            (id.to_owned(), proto::record_hash(id, json))
        })
    }

    /// The quarantined records of a module, with the reasons.
    pub fn quarantined(&self, module: &str) -> Result<Vec<(String, String)>, StorageError> {
        self.scan_module(QUARANTINE, module, |id, reason| {
            (id.to_owned(), reason.to_owned())
        })
    }

    /// Applies deltas and snapshots of several modules in one durable transaction. Records
    /// identical to the stored ones are not rewritten; when nothing at all changes, nothing is
    /// committed, so an idle pull costs the flash nothing.
    pub fn apply(&self, applies: &[ModuleApply]) -> Result<Vec<Applied>, StorageError> {
        let txn = self.db.begin_write().ctx("starting an apply")?;
        let mut results = Vec::new();
        let mut dirty = false;
        {
            let mut t = Tables {
                records: txn.open_table(RECORDS).ctx("opening records")?,
                index: txn.open_table(INDEX).ctx("opening the index")?,
                modules: txn.open_table(MODULES).ctx("opening modules")?,
                quarantine: txn.open_table(QUARANTINE).ctx("opening quarantine")?,
            };
            for apply in applies {
                let (applied, changed) = t.apply_module(apply)?;
                dirty |= changed;
                results.push(applied);
            }
        }
        if dirty {
            txn.commit().ctx("committing an apply")?;
        } else {
            txn.abort().ctx("abandoning an empty apply")?;
        }
        Ok(results)
    }

    /// The last activity event the hub is known to have, as last saved.
    pub fn pushed_through(&self) -> Result<u64, StorageError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let meta = txn.open_table(META).ctx("opening meta")?;
        Ok(meta
            .get(PUSHED_THROUGH)
            .ctx("reading the push mark")?
            .map_or(0, |v| v.value()))
    }

    /// Saves the push mark. Called on a period and at shutdown, not at every push: a mark
    /// lost in a power cut only makes the box push some events again, which the hub drops.
    pub fn save_pushed_through(&self, seq: u64) -> Result<(), StorageError> {
        let txn = self.db.begin_write().ctx("starting a push mark")?;
        {
            let mut meta = txn.open_table(META).ctx("opening meta")?;
            let current = meta
                .get(PUSHED_THROUGH)
                .ctx("reading the push mark")?
                .map_or(0, |v| v.value());
            if current >= seq {
                drop(meta);
                txn.abort().ctx("abandoning a push mark")?;
                return Ok(());
            }
            meta.insert(PUSHED_THROUGH, seq)
                .ctx("writing the push mark")?;
        }
        txn.commit().ctx("committing a push mark")?;
        Ok(())
    }

    /// A `meta` entry (for `migrate.rs`: the schema version).
    pub fn meta(&self, name: &str) -> Result<Option<u64>, StorageError> {
        let txn = self.db.begin_read().ctx("starting a read")?;
        let meta = txn.open_table(META).ctx("opening meta")?;
        Ok(meta.get(name).ctx("reading meta")?.map(|v| v.value()))
    }

    /// Writes a `meta` entry in a transaction of its own.
    pub fn set_meta(&self, name: &str, value: u64) -> Result<(), StorageError> {
        let txn = self.db.begin_write().ctx("starting a meta write")?;
        txn.open_table(META)
            .ctx("opening meta")?
            .insert(name, value)
            .ctx("writing meta")?;
        txn.commit().ctx("committing meta")?;
        Ok(())
    }

    /// Logical bytes stored per table, for flash accounting.
    pub fn table_bytes(&self) -> Result<BTreeMap<&'static str, u64>, StorageError> {
        use redb::ReadableTableMetadata;
        let txn = self.db.begin_read().ctx("starting a read")?;
        let mut out = BTreeMap::new();
        out.insert(
            "records",
            txn.open_table(RECORDS)
                .ctx("opening records")?
                .stats()
                .ctx("table stats")?
                .stored_bytes(),
        );
        out.insert(
            "index",
            txn.open_table(INDEX)
                .ctx("opening the index")?
                .stats()
                .ctx("table stats")?
                .stored_bytes(),
        );
        out.insert(
            "modules",
            txn.open_table(MODULES)
                .ctx("opening modules")?
                .stats()
                .ctx("table stats")?
                .stored_bytes(),
        );
        out.insert(
            "quarantine",
            txn.open_table(QUARANTINE)
                .ctx("opening quarantine")?
                .stats()
                .ctx("table stats")?
                .stored_bytes(),
        );
        Ok(out)
    }
}

struct Tables<'t> {
    records: redb::Table<'t, (&'static str, &'static str), &'static str>,
    index: redb::Table<'t, (&'static str, &'static str, &'static str), &'static str>,
    modules: redb::Table<'t, &'static str, &'static [u8]>,
    quarantine: redb::Table<'t, (&'static str, &'static str), &'static str>,
}

impl Tables<'_> {
    /// Applies one module; returns what happened and whether anything was written.
    fn apply_module(&mut self, apply: &ModuleApply) -> Result<(Applied, bool), StorageError> {
        let m = apply.module.as_str();
        let before = match self.modules.get(m).ctx("reading a module")? {
            Some(v) => Some(decode_state(v.value())?),
            None => None,
        };
        let mut state = before.clone().unwrap_or_default();
        let mut applied = Applied::default();
        let mut changed = false;
        if state.indexes != apply.indexes {
            self.reindex(m, &state.indexes, &apply.indexes)?;
            state.indexes = apply.indexes.clone();
        }
        match &apply.kind {
            ApplyKind::Delta {
                from_cursor,
                changes,
                cursor,
                completes_full,
            } => {
                if before.is_some() && state.cursor != *from_cursor {
                    applied.stale = true;
                    return Ok((applied, false));
                }
                for change in changes {
                    let id = change.id.as_str();
                    match &change.body {
                        ChangeBody::Put(json) => {
                            changed |= self.upsert(m, id, json, &state.indexes, &mut applied)?
                        }
                        ChangeBody::Patch(patch) => match self.patched(m, id, patch)? {
                            Some(json) => {
                                changed |=
                                    self.upsert(m, id, &json, &state.indexes, &mut applied)?
                            }
                            None => applied.unpatchable += 1,
                        },
                        ChangeBody::Delete => {
                            changed |= self.delete(m, id, &state.indexes, &mut applied)?
                        }
                    }
                }
                state.cursor = *cursor;
                if *completes_full {
                    state.last_full_ok_ms = Some(apply.now_ms);
                } else {
                    state.last_delta_ok_ms = Some(apply.now_ms);
                }
            }
            ApplyKind::Unchanged { cursor } => {
                if before.is_none() || state.cursor != *cursor {
                    applied.stale = true;
                    return Ok((applied, false));
                }
                if state.last_full_ok_ms.is_none() {
                    state.last_full_ok_ms = Some(apply.now_ms);
                }
            }
            ApplyKind::Snapshot { records, cursor } => {
                let wanted: BTreeSet<&str> = records.iter().map(|(id, _)| id.as_str()).collect();
                let mut stale_ids = Vec::new();
                for entry in self.records.range((m, "")..).ctx("scanning records")? {
                    let (key, _) = entry.ctx("reading a record")?;
                    let (km, id) = key.value();
                    if km != m {
                        break;
                    }
                    if !wanted.contains(id) {
                        stale_ids.push(id.to_owned());
                    }
                }
                for id in stale_ids {
                    changed |= self.delete(m, &id, &state.indexes, &mut applied)?;
                }
                // Quarantine entries of records gone from the hub go too.
                let mut gone = Vec::new();
                for entry in self
                    .quarantine
                    .range((m, "")..)
                    .ctx("scanning quarantine")?
                {
                    let (key, _) = entry.ctx("reading quarantine")?;
                    let (km, id) = key.value();
                    if km != m {
                        break;
                    }
                    if !wanted.contains(id) {
                        gone.push(id.to_owned());
                    }
                }
                for id in gone {
                    self.quarantine
                        .remove((m, id.as_str()))
                        .ctx("clearing quarantine")?;
                    changed = true;
                }
                for (id, json) in records {
                    changed |= self.upsert(m, id, json, &state.indexes, &mut applied)?;
                }
                state.cursor = *cursor;
                state.last_full_ok_ms = Some(apply.now_ms);
            }
        }
        state.records = (state.records + applied.upserted_new).saturating_sub(applied.deleted);
        state.quarantined = self.quarantine_count(m)?;
        if before.as_ref() != Some(&state) {
            // Cursor or counters moved. A pull that only refreshed `last_delta_ok` writes
            // nothing: that time is kept in memory by the sync engine until the next commit.
            let cursor_or_counts_moved = before.as_ref().is_none_or(|b| {
                b.cursor != state.cursor
                    || b.records != state.records
                    || b.quarantined != state.quarantined
                    || b.indexes != state.indexes
                    || b.last_full_ok_ms != state.last_full_ok_ms
            });
            if changed || cursor_or_counts_moved {
                let bytes = postcard::to_stdvec(&state).map_err(|_| StorageError::Corrupt {
                    what: "module state",
                })?;
                self.modules
                    .insert(m, bytes.as_slice())
                    .ctx("writing a module state")?;
                changed = true;
            }
        }
        Ok((applied, changed))
    }

    /// The stored record `id` with a merge patch applied, in canonical form; `None` when the
    /// box does not hold the record or the patch is not JSON.
    fn patched(&self, module: &str, id: &str, patch: &str) -> Result<Option<String>, StorageError> {
        let Some(base) = self.records.get((module, id)).ctx("reading a record")? else {
            return Ok(None);
        };
        let parsed = (
            serde_json::from_str::<serde_json::Value>(base.value()),
            serde_json::from_str::<serde_json::Value>(patch),
        );
        let (Ok(mut record), Ok(patch)) = parsed else {
            return Ok(None);
        };
        proto::patch::apply(&mut record, &patch);
        Ok(serde_json::to_string(&record).ok())
    }

    fn quarantine_count(&self, module: &str) -> Result<u64, StorageError> {
        let mut n = 0;
        for entry in self
            .quarantine
            .range((module, "")..)
            .ctx("scanning quarantine")?
        {
            let (key, _) = entry.ctx("reading quarantine")?;
            if key.value().0 != module {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Writes a record unless identical; quarantines it if it fails validation. Returns
    /// whether anything was written.
    fn upsert(
        &mut self,
        module: &str,
        id: &str,
        json: &str,
        indexes: &[String],
        applied: &mut Applied,
    ) -> Result<bool, StorageError> {
        let (canonical, keys) = match validate(id, json, indexes) {
            Ok(ok) => ok,
            Err(reason) => {
                tracing::warn!("module {module}: record {id:?} quarantined: {reason}");
                self.quarantine
                    .insert((module, id), reason.as_str())
                    .ctx("quarantining a record")?;
                applied.quarantined.push((id.to_owned(), reason));
                // The previous good version, if any, stays: a till can still sell the
                // product at its last valid price while the hub's data is corrected.
                return Ok(true);
            }
        };
        let mut wrote = false;
        if self
            .quarantine
            .remove((module, id))
            .ctx("clearing quarantine")?
            .is_some()
        {
            wrote = true;
        }
        let old = self
            .records
            .get((module, id))
            .ctx("reading a record")?
            .map(|v| v.value().to_owned());
        if old.as_deref() == Some(canonical.as_str()) {
            applied.unchanged += 1;
            return Ok(wrote);
        }
        if let Some(old) = &old {
            for (field, value) in index_keys(old, indexes) {
                self.unindex(module, &field, &value, id)?;
            }
        } else {
            applied.upserted_new += 1;
        }
        self.records
            .insert((module, id), canonical.as_str())
            .ctx("writing a record")?;
        for (field, value) in keys {
            self.index
                .insert((module, field.as_str(), value.as_str()), id)
                .ctx("writing the index")?;
        }
        applied.upserted += 1;
        Ok(true)
    }

    fn delete(
        &mut self,
        module: &str,
        id: &str,
        indexes: &[String],
        applied: &mut Applied,
    ) -> Result<bool, StorageError> {
        let mut wrote = self
            .quarantine
            .remove((module, id))
            .ctx("clearing quarantine")?
            .is_some();
        let old = self
            .records
            .remove((module, id))
            .ctx("deleting a record")?
            .map(|v| v.value().to_owned());
        if let Some(old) = old {
            for (field, value) in index_keys(&old, indexes) {
                self.unindex(module, &field, &value, id)?;
            }
            applied.deleted += 1;
            wrote = true;
        }
        Ok(wrote)
    }

    /// Removes an index entry if it still points at `id` (another record may have taken
    /// the value since).
    fn unindex(
        &mut self,
        module: &str,
        field: &str,
        value: &str,
        id: &str,
    ) -> Result<(), StorageError> {
        let points_here = self
            .index
            .get((module, field, value))
            .ctx("reading the index")?
            .is_some_and(|v| v.value() == id);
        if points_here {
            self.index
                .remove((module, field, value))
                .ctx("writing the index")?;
        }
        Ok(())
    }

    /// Rebuilds a module's index when the hub changes which fields are indexed.
    fn reindex(
        &mut self,
        module: &str,
        old: &[String],
        new: &[String],
    ) -> Result<(), StorageError> {
        let mut records = Vec::new();
        for entry in self.records.range((module, "")..).ctx("scanning records")? {
            let (key, value) = entry.ctx("reading a record")?;
            let (m, id) = key.value();
            if m != module {
                break;
            }
            records.push((id.to_owned(), value.value().to_owned()));
        }
        for (id, json) in &records {
            for (field, value) in index_keys(json, old) {
                self.unindex(module, &field, &value, id)?;
            }
            for (field, value) in index_keys(json, new) {
                self.index
                    .insert((module, field.as_str(), value.as_str()), id.as_str())
                    .ctx("writing the index")?;
            }
        }
        Ok(())
    }
}

/// Checks a record from the hub and returns its canonical JSON and index keys.
fn validate(
    id: &str,
    json: &str,
    indexes: &[String],
) -> Result<(String, Vec<(String, String)>), String> {
    let value: serde_json::Value =
        serde_json::from_str(json).map_err(|e| format!("not valid JSON: {e}"))?;
    let record = proto::canonical_record(&value).map_err(|e| e.to_string())?;
    if record.id != id {
        return Err(format!(
            "the record's id {:?} differs from the change's",
            record.id
        ));
    }
    let mut keys = Vec::new();
    for field in indexes {
        match value.get(field) {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::String(s)) if !s.is_empty() => {
                keys.push((field.clone(), s.clone()))
            }
            Some(serde_json::Value::Number(n)) => keys.push((field.clone(), n.to_string())),
            Some(other) => {
                return Err(format!(
                    "indexed field {field:?} must be a non-empty string or a number, not {other}"
                ))
            }
        }
    }
    Ok((record.json, keys))
}

/// Index keys of a stored (already valid) record.
fn index_keys(json: &str, indexes: &[String]) -> Vec<(String, String)> {
    let Ok(value) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    indexes
        .iter()
        .filter_map(|field| match value.get(field)? {
            serde_json::Value::String(s) if !s.is_empty() => Some((field.clone(), s.clone())),
            serde_json::Value::Number(n) => Some((field.clone(), n.to_string())),
            _ => None,
        })
        .collect()
}

fn decode_state(bytes: &[u8]) -> Result<ModuleState, StorageError> {
    postcard::from_bytes(bytes).map_err(|_| StorageError::Corrupt {
        what: "module state",
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn delta(module: &str, from: u64, changes: Vec<Change>, cursor: u64) -> ModuleApply {
        ModuleApply {
            module: module.into(),
            indexes: vec!["ean13".into()],
            kind: ApplyKind::Delta {
                from_cursor: from,
                changes,
                cursor,
                completes_full: false,
            },
            now_ms: 1,
        }
    }

    fn change(id: &str, _seq: u64, record: Option<&str>) -> Change {
        Change {
            id: id.into(),
            body: match record {
                Some(json) => ChangeBody::Put(json.to_owned()),
                None => ChangeBody::Delete,
            },
        }
    }

    #[test]
    fn patches_apply_to_the_stored_version_and_keep_it_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let store = BoxStore::open(dir.path(), 4).unwrap();
        let put = change(
            "a",
            1,
            Some(r#"{"ean13":"111","id":"a","label":"Pain","price":120}"#),
        );
        store.apply(&[delta("catalog", 0, vec![put], 1)]).unwrap();
        let patch = |id: &str, p: &str| Change {
            id: id.into(),
            body: ChangeBody::Patch(p.into()),
        };
        let applied = store
            .apply(&[delta(
                "catalog",
                1,
                vec![
                    patch("a", r#"{"price":135,"label":null,"tag":{"z":1,"b":2}}"#),
                    // No base on the box: skipped and counted, for the digest check to repair.
                    patch("missing", r#"{"price":1}"#),
                ],
                3,
            )])
            .unwrap();
        assert_eq!(applied[0].unpatchable, 1);
        assert_eq!(
            store.get("catalog", "a").unwrap().as_deref(),
            Some(r#"{"ean13":"111","id":"a","price":135,"tag":{"b":2,"z":1}}"#)
        );
        assert!(store.get("catalog", "missing").unwrap().is_none());
        let mut digest = proto::Digest::default();
        digest.add(
            "a",
            r#"{"ean13":"111","id":"a","price":135,"tag":{"b":2,"z":1}}"#,
        );
        assert_eq!(store.module_digest("catalog").unwrap(), digest);
    }

    #[test]
    fn deltas_update_records_indexes_and_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let store = BoxStore::open(dir.path(), 4).unwrap();
        store
            .apply(&[delta(
                "catalog",
                0,
                vec![
                    change("a", 1, Some(r#"{"id":"a","ean13":"111"}"#)),
                    change("b", 2, Some(r#"{"id":"b","ean13":{"bad":1}}"#)),
                    change("c", 3, Some(r#"{"id":"c","ean13":"333"}"#)),
                ],
                3,
            )])
            .unwrap();
        assert!(store.get_by("catalog", "ean13", "111").unwrap().is_some());
        assert!(store.get("catalog", "b").unwrap().is_none());
        assert_eq!(store.quarantined("catalog").unwrap().len(), 1);
        let state = &store.modules().unwrap()["catalog"];
        assert_eq!((state.cursor, state.records, state.quarantined), (3, 2, 1));

        // An EAN moves from a to c's old value: the index follows, deletes clean up.
        store
            .apply(&[delta(
                "catalog",
                3,
                vec![
                    change("c", 4, None),
                    change("a", 5, Some(r#"{"id":"a","ean13":"333"}"#)),
                    change("b", 6, Some(r#"{"id":"b","ean13":"222"}"#)),
                ],
                6,
            )])
            .unwrap();
        assert_eq!(
            store.get_by("catalog", "ean13", "333").unwrap().as_deref(),
            Some(r#"{"ean13":"333","id":"a"}"#)
        );
        assert!(store.get_by("catalog", "ean13", "111").unwrap().is_none());
        assert!(store.get("catalog", "c").unwrap().is_none());
        let state = &store.modules().unwrap()["catalog"];
        assert_eq!((state.cursor, state.records, state.quarantined), (6, 2, 0));

        // A delta computed from an old cursor is dropped.
        let out = store
            .apply(&[delta(
                "catalog",
                3,
                vec![change("z", 9, Some(r#"{"id":"z"}"#))],
                9,
            )])
            .unwrap();
        assert!(out[0].stale);
        assert!(store.get("catalog", "z").unwrap().is_none());
    }

    #[test]
    fn snapshots_replace_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = BoxStore::open(dir.path(), 4).unwrap();
        store
            .apply(&[delta(
                "catalog",
                0,
                vec![
                    change("a", 1, Some(r#"{"id":"a","ean13":"1"}"#)),
                    change("b", 2, Some(r#"{"id":"b","ean13":"2"}"#)),
                ],
                2,
            )])
            .unwrap();
        let snapshot = ModuleApply {
            module: "catalog".into(),
            indexes: vec!["ean13".into()],
            kind: ApplyKind::Snapshot {
                records: vec![
                    ("a".into(), r#"{"ean13":"1","id":"a"}"#.into()),
                    ("c".into(), r#"{"ean13":"3","id":"c"}"#.into()),
                ],
                cursor: 10,
            },
            now_ms: 2,
        };
        let out = store.apply(std::slice::from_ref(&snapshot)).unwrap();
        assert_eq!(
            (out[0].upserted, out[0].deleted, out[0].unchanged),
            (1, 1, 1)
        );
        let ids: Vec<_> = store
            .all("catalog")
            .unwrap()
            .into_iter()
            .map(|r| r.0)
            .collect();
        assert_eq!(ids, ["a", "c"]);
        assert!(store.get_by("catalog", "ean13", "2").unwrap().is_none());
        assert_eq!(store.modules().unwrap()["catalog"].records, 2);
    }

    /// A storage backend that loses power: writes since the last sync survive at random,
    /// 4 KiB at a time, and a write can be made to fail to stop a commit half-way.
    #[derive(Debug, Clone, Default)]
    struct Lossy(Arc<std::sync::Mutex<LossyState>>);

    #[derive(Debug, Default)]
    struct LossyState {
        durable: Vec<u8>,
        current: Vec<u8>,
        unsynced: Vec<(u64, Vec<u8>)>,
        rng: u64,
        writes_left: Option<u32>,
    }

    impl LossyState {
        fn next(&mut self) -> u64 {
            crate::journal::tests::splitmix64(&mut self.rng)
        }
    }

    impl Lossy {
        fn power_cut(&self) {
            let mut s = self.0.lock().unwrap();
            let writes = std::mem::take(&mut s.unsynced);
            let mut image = s.durable.clone();
            for (offset, data) in writes {
                for (i, chunk) in data.chunks(4096).enumerate() {
                    if s.next() % 2 == 0 {
                        let at = offset as usize + i * 4096;
                        if image.len() < at + chunk.len() {
                            image.resize(at + chunk.len(), 0);
                        }
                        image[at..at + chunk.len()].copy_from_slice(chunk);
                    }
                }
            }
            s.durable = image.clone();
            s.current = image;
            s.writes_left = None;
        }
    }

    impl redb::StorageBackend for Lossy {
        fn len(&self) -> Result<u64, std::io::Error> {
            Ok(self.0.lock().unwrap().current.len() as u64)
        }
        fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), std::io::Error> {
            let s = self.0.lock().unwrap();
            let start = offset as usize;
            let data = s
                .current
                .get(start..start + out.len())
                .ok_or_else(|| std::io::Error::other("read past the end"))?;
            out.copy_from_slice(data);
            Ok(())
        }
        fn set_len(&self, len: u64) -> Result<(), std::io::Error> {
            let mut s = self.0.lock().unwrap();
            s.current.resize(len as usize, 0);
            // A file's length is metadata the filesystem journals: kept across a cut.
            s.durable.resize(len as usize, 0);
            Ok(())
        }
        fn sync_data(&self) -> Result<(), std::io::Error> {
            let mut s = self.0.lock().unwrap();
            s.durable = s.current.clone();
            s.unsynced.clear();
            Ok(())
        }
        fn write(&self, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
            let mut s = self.0.lock().unwrap();
            if let Some(left) = s.writes_left.as_mut() {
                if *left == 0 {
                    return Err(std::io::Error::other("power is going"));
                }
                *left -= 1;
            }
            let start = offset as usize;
            if s.current.len() < start + data.len() {
                s.current.resize(start + data.len(), 0);
            }
            s.current[start..start + data.len()].copy_from_slice(data);
            s.unsynced.push((offset, data.to_vec()));
            Ok(())
        }
    }

    type Model = BTreeMap<String, (u64, BTreeMap<String, String>)>;

    /// The store's content as (cursor, records) per module, after checking that indexes
    /// and counters agree with the records.
    fn checked_content(store: &BoxStore) -> Model {
        let mut out = Model::new();
        for (module, state) in store.modules().unwrap() {
            let records: BTreeMap<String, String> =
                store.all(&module).unwrap().into_iter().collect();
            assert_eq!(
                state.records as usize,
                records.len(),
                "{module}: record count"
            );
            for (id, json) in &records {
                for (field, value) in index_keys(json, &state.indexes) {
                    let found = store.get_by(&module, &field, &value).unwrap();
                    assert!(
                        found.is_some(),
                        "{module}/{id}: no index entry for {field}={value}"
                    );
                }
            }
            out.insert(module, (state.cursor, records));
        }
        out
    }

    #[test]
    fn power_cuts_during_applies_leave_data_indexes_and_cursors_consistent() {
        for seed in 0..40u64 {
            let disk = Lossy::default();
            disk.0.lock().unwrap().rng = seed;
            let mut committed = Model::new();
            let mut cursor = 0u64;
            let mut live: BTreeMap<String, String> = BTreeMap::new();
            for round in 0..6 {
                let db = Database::builder()
                    .set_cache_size(1 << 20)
                    .create_with_backend(disk.clone())
                    .unwrap();
                let store = BoxStore::from_database(db).unwrap();
                let content = checked_content(&store);
                assert_eq!(content, committed, "seed {seed} round {round}");
                // A few good applies, each a delta of random upserts and deletes.
                for step in 0..3 {
                    let mut changes = Vec::new();
                    let count = 1 + disk.0.lock().unwrap().next() % 20;
                    for _ in 0..count {
                        let n = disk.0.lock().unwrap().next() % 40;
                        let id = format!("p{n}");
                        cursor += 1;
                        if disk.0.lock().unwrap().next() % 4 == 0 {
                            live.remove(&id);
                            changes.push(change(&id, cursor, None));
                        } else {
                            let json = format!(
                                r#"{{"ean13":"{}","id":"{id}","r":{round},"s":{step}}}"#,
                                n * 7 + u64::from(step as u8)
                            );
                            live.insert(id.clone(), json.clone());
                            changes.push(change(&id, cursor, Some(&json)));
                        }
                    }
                    let from = committed.get("catalog").map_or(0, |c| c.0);
                    let apply = delta("catalog", from, changes, cursor);
                    let fail = disk.0.lock().unwrap().next() % 3 == 0;
                    if fail {
                        // The power goes during this commit.
                        let left = (disk.0.lock().unwrap().next() % 12) as u32;
                        disk.0.lock().unwrap().writes_left = Some(left);
                        let outcome = store.apply(&[apply]);
                        let next = (cursor, live.clone());
                        drop(store);
                        disk.power_cut();
                        // Either the whole apply is there, or none of it.
                        let db = Database::builder()
                            .set_cache_size(1 << 20)
                            .create_with_backend(disk.clone())
                            .unwrap();
                        let reopened = BoxStore::from_database(db).unwrap();
                        let content = checked_content(&reopened);
                        if content.get("catalog") == Some(&next) {
                            committed.insert("catalog".into(), next);
                        } else {
                            assert!(outcome.is_err(), "seed {seed}: an applied delta vanished");
                            assert_eq!(content, committed, "seed {seed}: a half-applied delta");
                            let (c, l) = committed
                                .get("catalog")
                                .cloned()
                                .unwrap_or((0, BTreeMap::new()));
                            cursor = c;
                            live = l;
                        }
                        break;
                    }
                    store.apply(&[apply]).unwrap();
                    committed.insert("catalog".into(), (cursor, live.clone()));
                }
            }
        }
    }
}
