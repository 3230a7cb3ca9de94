//! The hub's database: records, their change log, tombstones, activity, what each box last
//! reported, and firmware targets, behind one interface with two backends.
//!
//! - [`embedded`] (the default): one redb file in the data directory. The demo, small
//!   chains and the tests; one `storehub serve` process.
//! - [`postgres`] (production): PostgreSQL, schema versioned in `crates/hub/migrations` and
//!   applied by `storehub migrate`. Any number of `storehub serve` replicas share it; a write
//!   on one wakes the boxes waiting on every other through `LISTEN`/`NOTIFY`.
//!
//! Both keep the same model. Each record carries the sequence number of its last write in its
//! module, and the change log holds at most one entry per record, at that number: a delta pull
//! is a range scan from the box's cursor, bounded by the number of distinct records changed,
//! not by how often they changed. Deleted records stay as tombstones until the retention
//! expires; pruning one raises the module's `horizon`, and a box whose cursor is below it must
//! full-sync. A live record also keeps its previous version and the sequence number that
//! version was written at: a box whose cursor lies between the two holds exactly that version,
//! so its delta can carry a merge patch against it instead of the whole record.
//!
//! Every function is blocking and is called from `spawn_blocking` by the listeners. Writers
//! wake the change watches of the store they wrote to through [`HubStore::subscribe`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use storebox_protocol::{self as proto, CanonicalRecord, Change, ChangeBody, Digest, ModuleCursor};

pub mod embedded;
pub mod ota;
pub mod postgres;

use ota::{BoxOta, BundleMeta, DeleteBundle, EffectiveTarget, PutBundle, TargetedBy};

/// Errors of the hub database, each naming what was being done.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("hub database: {context}: {source}")]
    Db {
        context: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("hub database: a stored {what} does not decode; the database may be damaged")]
    Corrupt { what: &'static str },
}

/// A record as the hub keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct StoredRecord {
    pub(crate) seq: u64,
    /// When it was deleted, for tombstones; `None` for a live record.
    pub(crate) deleted_at_ms: Option<i64>,
    /// Canonical JSON; empty for tombstones.
    pub(crate) json: String,
    /// The version this one replaced, with the sequence number it was written at; `None`
    /// for a record created (or re-created after a deletion) at `seq`, and for tombstones.
    pub(crate) prev: Option<(u64, String)>,
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

/// What a backend does. Reads of several things (a module's head and its changes) are of
/// one moment; writes to a module are serialised, so its sequence numbers commit in order.
pub trait Backend: Send + Sync {
    /// Upserts `records` into a module; with `replace`, deletes every live record not among
    /// them. Either the whole import applies or nothing does.
    fn import(
        &self,
        store: &str,
        module: &str,
        records: &[CanonicalRecord],
        replace: bool,
        now_ms: i64,
    ) -> Result<ImportOutcome, StoreError>;

    /// Writes one record; returns what happened and the module's head after it.
    fn put_record(
        &self,
        store: &str,
        module: &str,
        record: &CanonicalRecord,
    ) -> Result<(PutOutcome, u64), StoreError>;

    /// Deletes one record; `false` when there was no live record with that id.
    fn delete_record(
        &self,
        store: &str,
        module: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError>;

    /// One live record's canonical JSON.
    fn get_record(&self, store: &str, module: &str, id: &str)
        -> Result<Option<String>, StoreError>;

    /// The changes of a module after `cursor`, at most `limit` of them, the cursor they leave
    /// the box at, and whether more wait. `None` when the cursor is below the tombstone
    /// horizon or above the head: the box must full-sync.
    #[allow(clippy::type_complexity)]
    fn changes_since(
        &self,
        store: &str,
        module: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<Option<(Vec<Change>, u64, bool)>, StoreError>;

    /// Every live record of a module, in id order, and the cursor they correspond to.
    fn snapshot(
        &self,
        store: &str,
        module: &str,
    ) -> Result<(Vec<(String, String)>, u64), StoreError>;

    /// The head sequence number of a module.
    fn module_head(&self, store: &str, module: &str) -> Result<u64, StoreError>;

    /// Removes tombstones deleted before `before_ms`, raising each module's horizon. Returns
    /// how many were pruned.
    fn prune_tombstones(&self, before_ms: i64) -> Result<u64, StoreError>;

    /// Stores pushed events once each by id, in the order given. Durable when it returns.
    fn push_activity(
        &self,
        store: &str,
        events: &[proto::PushedEvent],
        now_ms: i64,
    ) -> Result<PushOutcome, StoreError>;

    /// Events after `after`, in receipt order, at most `limit`; and the activity high-water
    /// mark.
    fn activity(
        &self,
        store: &str,
        after: u64,
        limit: usize,
    ) -> Result<(Vec<ActivityEvent>, u64), StoreError>;

    /// The activity high-water mark of a store.
    fn activity_high_water(&self, store: &str) -> Result<u64, StoreError>;

    /// What the hub last heard from a store's box.
    fn box_report(&self, store: &str) -> Result<BoxReport, StoreError>;

    /// Reads, changes and writes a store's box report in one transaction, so the delta and
    /// push processes of one box reporting at the same moment cannot undo each other's update.
    /// Not waited for on disk: a lost contact time is replaced by the next one.
    fn update_box_report(
        &self,
        store: &str,
        change: &mut dyn FnMut(&mut BoxReport),
    ) -> Result<(), StoreError>;

    /// Every stored firmware bundle, by version.
    fn ota_bundles(&self) -> Result<Vec<(String, BundleMeta)>, StoreError>;

    /// One bundle's record.
    fn ota_bundle(&self, version: &str) -> Result<Option<BundleMeta>, StoreError>;

    /// Who targets `version` now.
    fn ota_targeted_by(&self, version: &str) -> Result<TargetedBy, StoreError>;

    /// Records an uploaded bundle whose file is already in place, unless its version is
    /// targeted.
    fn ota_put_bundle(&self, version: &str, meta: &BundleMeta) -> Result<PutBundle, StoreError>;

    /// Forgets a bundle, unless its version is targeted.
    fn ota_delete_bundle(&self, version: &str) -> Result<DeleteBundle, StoreError>;

    /// Sets (or with `None` clears) the target of `store`, or of the fleet when `store` is
    /// `None`. `false` when the version has no bundle: nothing is changed.
    fn ota_set_target(
        &self,
        store: Option<&str>,
        version: Option<&str>,
    ) -> Result<bool, StoreError>;

    /// The fleet default and the stores' own targets.
    #[allow(clippy::type_complexity)]
    fn ota_targets(&self) -> Result<(Option<String>, BTreeMap<String, String>), StoreError>;

    /// The version `store` should run: its own target, else the fleet's; with its bundle,
    /// read at the same moment as the target.
    fn ota_effective_target(&self, store: &str) -> Result<Option<EffectiveTarget>, StoreError>;

    /// What a store's box said about its updates.
    fn ota_box(&self, store: &str) -> Result<BoxOta, StoreError>;

    /// Reads, changes and writes a store's firmware state in one transaction, so a check and
    /// a report arriving together cannot undo each other; waited for on disk when `durable`.
    fn update_box_ota(
        &self,
        store: &str,
        durable: bool,
        change: &mut dyn FnMut(&mut BoxOta),
    ) -> Result<(), StoreError>;
}

/// The change watches of the boxes connected to this process, by store.
#[derive(Default)]
pub struct Watchers {
    by_store: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
}

impl Watchers {
    /// Wakes the boxes of `store` waiting for a change.
    pub fn wake(&self, store: &str) {
        let watchers = self.by_store.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = watchers.get(store) {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    /// Wakes every waiting box, after notifications may have been missed.
    pub fn wake_all(&self) {
        let watchers = self.by_store.lock().unwrap_or_else(|e| e.into_inner());
        for tx in watchers.values() {
            tx.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

/// The hub database: a backend, the change watches of this process, and a cache of module
/// digests. Reads go straight to the backend (through `Deref`); the writes that change what
/// boxes hold are methods here, so that none can forget to wake the boxes.
pub struct HubStore {
    backend: Box<dyn Backend>,
    watchers: Arc<Watchers>,
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
    pub hashes: Arc<Vec<(String, u64)>>,
}

impl std::ops::Deref for HubStore {
    type Target = dyn Backend;

    fn deref(&self) -> &Self::Target {
        self.backend.as_ref()
    }
}

impl HubStore {
    /// Opens (or creates) the embedded database in `dir`.
    pub fn open(dir: &std::path::Path) -> anyhow::Result<HubStore> {
        Ok(HubStore::with_backend(
            Box::new(embedded::Embedded::open(dir)?),
            Arc::new(Watchers::default()),
        ))
    }

    /// A hub database on `backend`, waking `watchers` on writes.
    pub fn with_backend(backend: Box<dyn Backend>, watchers: Arc<Watchers>) -> HubStore {
        HubStore {
            backend,
            watchers,
            digests: Mutex::new(HashMap::new()),
        }
    }

    /// A receiver that changes after every write to `store`'s modules.
    pub fn subscribe(&self, store: &str) -> tokio::sync::watch::Receiver<u64> {
        let mut watchers = self
            .watchers
            .by_store
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        watchers
            .entry(store.to_owned())
            .or_insert_with(|| tokio::sync::watch::channel(0).0)
            .subscribe()
    }

    fn notify(&self, store: &str) {
        self.watchers.wake(store);
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
            hashes: Arc::new(hashes),
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
    /// them. All or nothing.
    pub fn import(
        &self,
        store: &str,
        module: &str,
        records: &[CanonicalRecord],
        replace: bool,
        now_ms: i64,
    ) -> Result<ImportOutcome, StoreError> {
        let outcome = self
            .backend
            .import(store, module, records, replace, now_ms)?;
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
        let outcome = self.backend.put_record(store, module, record)?;
        self.notify(store);
        Ok(outcome)
    }

    /// Deletes one record; `false` when there was no live record with that id.
    pub fn delete_record(
        &self,
        store: &str,
        module: &str,
        id: &str,
        now_ms: i64,
    ) -> Result<bool, StoreError> {
        let deleted = self.backend.delete_record(store, module, id, now_ms)?;
        self.notify(store);
        Ok(deleted)
    }

    /// Records a box's contact. Cursors it reports replace the ones known.
    pub fn note_contact(
        &self,
        store: &str,
        now_ms: i64,
        cursors: Option<&[ModuleCursor]>,
        ack: Option<&proto::Ack>,
    ) -> Result<(), StoreError> {
        let reported: Vec<&ModuleCursor> = cursors
            .into_iter()
            .flatten()
            .chain(ack.into_iter().flat_map(|a| &a.cursors))
            .collect();
        // A cursor equal to the module's head means the box was in step at this moment: the
        // fleet view measures how long a box has been behind from it. The heads are read
        // before the report is locked, so a write landing between makes the box look
        // behind, never in step when it is not.
        let mut heads = HashMap::new();
        for c in &reported {
            heads.insert(
                c.module.as_str(),
                self.backend.module_head(store, &c.module)?,
            );
        }
        self.backend.update_box_report(store, &mut |report| {
            report.last_contact_ms = Some(now_ms);
            for c in &reported {
                report.cursors.insert(c.module.clone(), c.cursor);
                if heads.get(c.module.as_str()) == Some(&c.cursor) {
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
        })
    }
}

/// What a box at `cursor` needs to learn of a record written after it: a merge patch when
/// the box holds the previous version (written at or before its cursor) and a patch can say
/// the change, else the whole record.
pub(crate) fn change_body(stored: StoredRecord, cursor: u64) -> ChangeBody {
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
