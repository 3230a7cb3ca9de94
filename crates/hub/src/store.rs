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
pub mod heads;
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

    /// The heads of every module of `keys` (stores or group keys) that was ever written, by
    /// (key, module): one read for a whole flush of contacts.
    fn module_heads(&self, keys: &[&str]) -> Result<HashMap<(String, String), u64>, StoreError>;

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

    /// Reads, changes and writes the box reports of `stores` in one transaction, so two
    /// replicas recording contacts of one box at the same moment cannot undo each other's
    /// update. Not waited for on disk: a lost contact time is replaced by the next one.
    fn update_box_reports(
        &self,
        stores: &[&str],
        change: &mut dyn FnMut(&str, &mut BoxReport),
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

/// How the stores share modules: which stores belong to which group, and which modules are
/// kept per group (docs/FLEET.md).
#[derive(Debug, Clone, Default)]
pub struct Layout {
    /// Group name to its stores.
    pub groups: BTreeMap<String, Vec<String>>,
    /// Modules whose records belong to a store's group, overridden by the store's own.
    pub group_modules: BTreeSet<String>,
}

/// The key a group's records are kept under, beside the stores' own: store ids never begin
/// with `@`, so the two cannot meet.
pub fn group_key(group: &str) -> String {
    format!("@{group}")
}

/// How fresh a box's "last contact" is kept when its contacts say nothing else new.
pub const CONTACT_RESOLUTION_MS: i64 = 30_000;

/// How many complete pages of group changes are kept: a handful of cursors per module is the
/// usual case (the boxes of a group are at the same place), so this is plenty.
const GROUP_PAGES: usize = 256;

/// A box's cursor in a module shared with its group holds two sequence numbers: the group's
/// in the high 32 bits, the store's own overrides' in the low 32. Four billion writes of
/// either is more than a module sees in its life.
fn join_cursor(group: u64, own: u64) -> u64 {
    (group.min(u64::from(u32::MAX)) << 32) | own.min(u64::from(u32::MAX))
}

fn split_cursor(cursor: u64) -> (u64, u64) {
    (cursor >> 32, cursor & u64::from(u32::MAX))
}

/// The change watches of the boxes connected to this process, by store.
#[derive(Default)]
pub struct Watchers {
    by_store: Mutex<HashMap<String, tokio::sync::watch::Sender<u64>>>,
    /// Group key to its stores: a write to a group wakes all of them.
    groups: Mutex<HashMap<String, Vec<String>>>,
    /// The module heads this process has read, forgotten on every notification of a write.
    pub heads: heads::HeadCache,
}

impl Watchers {
    /// Wakes the boxes waiting for a change of `key`: a store, or every store of a group.
    pub fn wake(&self, key: &str) {
        // Forgotten before the boxes wake, so that what they read next is the write's.
        self.heads.forget(key);
        let groups = self.groups.lock().unwrap_or_else(|e| e.into_inner());
        let watchers = self.by_store.lock().unwrap_or_else(|e| e.into_inner());
        let wake = |store: &str| {
            if let Some(tx) = watchers.get(store) {
                tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        };
        match groups.get(key) {
            Some(stores) => stores.iter().for_each(|s| wake(s)),
            None => wake(key),
        }
    }

    /// Wakes every waiting box, after notifications may have been missed.
    pub fn wake_all(&self) {
        self.heads.forget_all();
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
    /// Per (store, module): the digest at a head, so a thousand boxes checking the same
    /// module do not each hash every record. Stores that override nothing of a shared module
    /// share one entry, under the group's key.
    digests: Mutex<HashMap<(String, String), (u64, Digest)>>,
    /// Per (group key, module): the record hashes at a head ([`HubStore::module_hashes`]).
    shared_hashes: Mutex<HashMap<(String, String), ModuleHashes>>,
    /// Store id to its group's key, for the stores in a group.
    group_of: HashMap<String, String>,
    /// Contacts not written yet, per store, oldest first ([`HubStore::flush_contacts`]).
    contacts: Mutex<HashMap<String, Vec<Contact>>>,
    /// Per store, when this process last recorded a contact and the cursors it carried.
    #[allow(clippy::type_complexity)]
    recorded_contacts: Mutex<HashMap<String, (i64, Vec<ModuleCursor>)>>,
    /// Complete answers of [`HubStore::group_changes`], by (group key, module, cursor, limit),
    /// with the head they were read at.
    #[allow(clippy::type_complexity)]
    group_pages: Mutex<HashMap<(String, String, u64, usize), (u64, Arc<Vec<Change>>)>>,
    group_modules: BTreeSet<String>,
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
        let watchers = Arc::new(Watchers::default());
        // This process is the embedded database's only writer, and every write goes through
        // this facade, which forgets the heads it changes.
        watchers.heads.set_on(true);
        Ok(HubStore::with_backend(
            Box::new(embedded::Embedded::open(dir)?),
            watchers,
        ))
    }

    /// A hub database on `backend`, waking `watchers` on writes.
    pub fn with_backend(backend: Box<dyn Backend>, watchers: Arc<Watchers>) -> HubStore {
        HubStore {
            backend,
            watchers,
            digests: Mutex::new(HashMap::new()),
            shared_hashes: Mutex::new(HashMap::new()),
            group_of: HashMap::new(),
            group_modules: BTreeSet::new(),
            contacts: Mutex::new(HashMap::new()),
            recorded_contacts: Mutex::new(HashMap::new()),
            group_pages: Mutex::new(HashMap::new()),
        }
    }

    /// Lays the stores out in groups sharing the group-scoped modules.
    pub fn with_layout(mut self, layout: Layout) -> HubStore {
        let mut members = HashMap::new();
        for (group, stores) in &layout.groups {
            for store in stores {
                self.group_of.insert(store.clone(), group_key(group));
            }
            members.insert(group_key(group), stores.clone());
        }
        *self
            .watchers
            .groups
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = members;
        self.group_modules = layout.group_modules;
        self
    }

    /// The group key whose records `store` sees in `module` under its own, if any.
    fn shared_with(&self, store: &str, module: &str) -> Option<&str> {
        if !self.group_modules.contains(module) {
            return None;
        }
        self.group_of.get(store).map(String::as_str)
    }

    /// The heads of every module of `key` (a store or a group's key), from memory when this
    /// process can trust it ([`heads`]).
    fn heads_of(&self, key: &str) -> Result<heads::Heads, StoreError> {
        let read = || -> Result<heads::Heads, StoreError> {
            let heads = self.backend.module_heads(&[key])?;
            Ok(Arc::new(
                heads.into_iter().map(|((_, m), head)| (m, head)).collect(),
            ))
        };
        match self.watchers.heads.lookup(key) {
            heads::Lookup::Hit(heads) => Ok(heads),
            heads::Lookup::Miss(ticket) => {
                let heads = read()?;
                self.watchers.heads.offer(key, ticket, heads.clone());
                Ok(heads)
            }
            heads::Lookup::Off => read(),
        }
    }

    /// The head of `key`'s own records of a module (not its group's).
    fn own_head(&self, key: &str, module: &str) -> Result<u64, StoreError> {
        Ok(self.heads_of(key)?.get(module).copied().unwrap_or(0))
    }

    /// A module's head as a box of `store` sees it, if this process holds it in memory: for
    /// callers on an async thread, which must not wait for the database.
    pub fn cached_module_head(&self, store: &str, module: &str) -> Option<u64> {
        let own = |key: &str| match self.watchers.heads.lookup(key) {
            heads::Lookup::Hit(heads) => Some(heads.get(module).copied().unwrap_or(0)),
            heads::Lookup::Miss(_) | heads::Lookup::Off => None,
        };
        match self.shared_with(store, module) {
            None => own(store),
            Some(group) => Some(join_cursor(own(group)?, own(store)?)),
        }
    }

    /// A module's head as a box of `store` sees it.
    pub fn module_head(&self, store: &str, module: &str) -> Result<u64, StoreError> {
        match self.shared_with(store, module) {
            None => self.own_head(store, module),
            Some(group) => Ok(join_cursor(
                self.own_head(group, module)?,
                self.own_head(store, module)?,
            )),
        }
    }

    /// Every live record of a module as a box of `store` sees it (its group's, overridden by
    /// its own), in id order, and the cursor they correspond to.
    pub fn snapshot(
        &self,
        store: &str,
        module: &str,
    ) -> Result<(Vec<(String, String)>, u64), StoreError> {
        let Some(group) = self.shared_with(store, module) else {
            return self.backend.snapshot(store, module);
        };
        let (shared, group_head) = self.backend.snapshot(group, module)?;
        let (own, own_head) = self.backend.snapshot(store, module)?;
        let mut merged = Vec::with_capacity(shared.len() + own.len());
        let mut own = own.into_iter().peekable();
        for (id, json) in shared {
            while let Some((oid, _)) = own.peek() {
                if oid.as_str() >= id.as_str() {
                    break;
                }
                merged.extend(own.next());
            }
            match own.peek() {
                Some((oid, _)) if *oid == id => merged.extend(own.next()),
                _ => merged.push((id, json)),
            }
        }
        merged.extend(own);
        Ok((merged, join_cursor(group_head, own_head)))
    }

    /// The changes of a module after `cursor` as a box of `store` sees them, at most about
    /// `limit`; see [`Backend::changes_since`].
    #[allow(clippy::type_complexity)]
    pub fn changes_since(
        &self,
        store: &str,
        module: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<Option<(Vec<Change>, u64, bool)>, StoreError> {
        let Some(group) = self.shared_with(store, module) else {
            // A box at the head has nothing to read (a cursor above the head is left to the
            // backend, which knows whether it is valid).
            if cursor == self.own_head(store, module)? {
                return Ok(Some((Vec::new(), cursor, false)));
            }
            return self.backend.changes_since(store, module, cursor, limit);
        };
        let (group_cursor, own_cursor) = split_cursor(cursor);
        let own_head = self.own_head(store, module)?;
        let Some((shared, group_last, group_more)) =
            self.group_changes(group, module, group_cursor, limit)?
        else {
            return Ok(None);
        };
        // While the group's changes fill pages, the store's own wait: asked for none, the
        // backend still says whether its cursor is valid and whether changes wait.
        let own_limit = if group_more {
            0
        } else {
            limit.saturating_sub(shared.len())
        };
        let (own, own_last, own_more) = if own_cursor == own_head {
            (Vec::new(), own_cursor, false)
        } else {
            match self
                .backend
                .changes_since(store, module, own_cursor, own_limit)?
            {
                Some(own) => own,
                None => return Ok(None),
            }
        };
        let own_ids: std::collections::HashSet<&str> = own.iter().map(|c| c.id.as_str()).collect();
        // A store that never wrote to the module overrides nothing: no lookups.
        let overrides = own_head > 0;
        let mut out = Vec::with_capacity(shared.len() + own.len());
        for change in shared.iter() {
            // The store's own version of a record hides the group's; one changed in this
            // answer too is resolved below.
            if own_ids.contains(change.id.as_str())
                || (overrides
                    && self
                        .backend
                        .get_record(store, module, &change.id)?
                        .is_some())
            {
                continue;
            }
            out.push(change.clone());
        }
        for change in own {
            let body = match change.body {
                // An override removed shows the group's record again, if it has one.
                ChangeBody::Delete => match self.backend.get_record(group, module, &change.id)? {
                    Some(json) => ChangeBody::Put(json),
                    None => ChangeBody::Delete,
                },
                body => body,
            };
            out.push(Change {
                id: change.id,
                body,
            });
        }
        Ok(Some((
            out,
            join_cursor(group_last, own_last),
            group_more || own_more,
        )))
    }

    /// A group's changes of a module after `cursor`, as [`Backend::changes_since`]. A
    /// complete answer (no more pages) depends only on the cursor and the group's head, so
    /// the boxes of a group pulling the same change at once share one read of it.
    #[allow(clippy::type_complexity)]
    fn group_changes(
        &self,
        group: &str,
        module: &str,
        cursor: u64,
        limit: usize,
    ) -> Result<Option<(Arc<Vec<Change>>, u64, bool)>, StoreError> {
        let head = self.own_head(group, module)?;
        if cursor == head {
            return Ok(Some((Arc::new(Vec::new()), cursor, false)));
        }
        let key = (group.to_owned(), module.to_owned(), cursor, limit);
        let mut pages = self.group_pages.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((last, changes)) = pages.get(&key) {
            // Kept only for the head it was read at: a later write may have moved records
            // out of it.
            if *last == head {
                return Ok(Some((changes.clone(), head, false)));
            }
        }
        drop(pages);
        let Some((changes, last, more)) =
            self.backend.changes_since(group, module, cursor, limit)?
        else {
            return Ok(None);
        };
        let changes = Arc::new(changes);
        if !more {
            pages = self.group_pages.lock().unwrap_or_else(|e| e.into_inner());
            if pages.len() >= GROUP_PAGES {
                pages.clear();
            }
            pages.insert(key, (last, changes.clone()));
        }
        Ok(Some((changes, last, more)))
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

    /// The key a module's digest is kept under: the group's, for a store that overrides
    /// nothing of a shared module (it sees exactly its group's records).
    fn digest_key(&self, store: &str, module: &str, head: u64) -> (String, String) {
        match self.shared_with(store, module) {
            Some(group) if split_cursor(head).1 == 0 => (group.to_owned(), module.to_owned()),
            _ => (store.to_owned(), module.to_owned()),
        }
    }

    /// The head and digest of a module as a box of `store` sees it: kept for every store and
    /// module (a few dozen bytes each), so a delta or a full sync that finds nothing new
    /// reads no records.
    pub fn module_digest(&self, store: &str, module: &str) -> Result<(u64, Digest), StoreError> {
        let head = self.module_head(store, module)?;
        let key = self.digest_key(store, module, head);
        if let Some((at, digest)) = self
            .digests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            if *at == head {
                return Ok((head, *digest));
            }
        }
        let hashes = self.module_hashes(store, module)?;
        Ok((hashes.head, hashes.digest))
    }

    /// The digest and record hashes of a module at its head. The hashes (a few dozen bytes
    /// per record) are kept only for a group's modules, which a whole group compares with;
    /// a store's own are read again when needed, which is when a box's module differs.
    pub fn module_hashes(&self, store: &str, module: &str) -> Result<ModuleHashes, StoreError> {
        let head = self.module_head(store, module)?;
        let key = self.digest_key(store, module, head);
        let shared = key.0 != store;
        if shared {
            if let Some(cached) = self
                .shared_hashes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
            {
                if cached.head == head {
                    return Ok(cached.clone());
                }
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
            .insert(key.clone(), (head, digest));
        if shared {
            self.shared_hashes
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key, computed.clone());
        }
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

    /// Records a box's contact. Cursors it reports replace the ones known. Kept in memory
    /// until the next [`HubStore::flush_contacts`]: every call of every box reports a contact,
    /// and one transaction a second for all of them costs the database far less than one per
    /// call. Reads of the report through [`HubStore::box_report`] see it at once.
    pub fn note_contact(
        &self,
        store: &str,
        now_ms: i64,
        cursors: Option<&[ModuleCursor]>,
        ack: Option<&proto::Ack>,
    ) -> Result<(), StoreError> {
        let contact = Contact {
            at_ms: now_ms,
            cursors: cursors.map(<[ModuleCursor]>::to_vec).unwrap_or_default(),
            ack: ack.cloned(),
        };
        // A contact that says nothing new (no acknowledgement, the cursors last recorded, or
        // none) within CONTACT_RESOLUTION of the last recorded one is not written: a fleet
        // pushing sales every few seconds would otherwise rewrite every box's report every
        // second, for a "last contact" nobody reads to the second.
        {
            let mut recorded = self
                .recorded_contacts
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let news = match recorded.get(store) {
                None => true,
                Some((at_ms, known)) => {
                    contact.ack.is_some()
                        || (!contact.cursors.is_empty() && contact.cursors != *known)
                        || now_ms.saturating_sub(*at_ms) >= CONTACT_RESOLUTION_MS
                }
            };
            if !news {
                return Ok(());
            }
            let cursors = match (contact.cursors.is_empty(), recorded.remove(store)) {
                (true, Some((_, known))) => known,
                _ => contact.cursors.clone(),
            };
            recorded.insert(store.to_owned(), (now_ms, cursors));
        }
        self.contacts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(store.to_owned())
            .or_default()
            .push(contact);
        Ok(())
    }

    /// Writes the contacts recorded since the last flush, in one transaction; returns how
    /// many stores were written. Kept for the next flush when the write fails.
    pub fn flush_contacts(&self) -> Result<usize, StoreError> {
        let pending = std::mem::take(&mut *self.contacts.lock().unwrap_or_else(|e| e.into_inner()));
        if pending.is_empty() {
            return Ok(0);
        }
        let written = (|| {
            let keys: Vec<&str> = pending.keys().map(String::as_str).collect();
            let all = self.all_heads(&keys)?;
            let heads: HashMap<&str, HashMap<String, u64>> = pending
                .iter()
                .map(|(store, contacts)| {
                    (store.as_str(), self.reported_heads(&all, store, contacts))
                })
                .collect();
            let stores: Vec<&str> = pending.keys().map(String::as_str).collect();
            self.backend
                .update_box_reports(&stores, &mut |store, report| {
                    if let (Some(contacts), Some(heads)) = (pending.get(store), heads.get(store)) {
                        apply_contacts(report, contacts, heads);
                    }
                })
        })();
        if let Err(e) = written {
            // Put back before anything newer, so a retry applies them in order.
            let mut now = self.contacts.lock().unwrap_or_else(|e| e.into_inner());
            for (store, mut older) in pending {
                let newer = now.remove(&store).unwrap_or_default();
                older.extend(newer);
                now.insert(store, older);
            }
            return Err(e);
        }
        Ok(pending.len())
    }

    /// The heads of every module of `stores` and of the groups: one read of the backend.
    fn all_heads(&self, stores: &[&str]) -> Result<HashMap<(String, String), u64>, StoreError> {
        let mut keys: BTreeSet<&str> = stores.iter().copied().collect();
        keys.extend(self.group_of.values().map(String::as_str));
        self.backend
            .module_heads(&keys.into_iter().collect::<Vec<_>>())
    }

    /// The heads, as `store`'s box sees them, of the modules `contacts` report cursors of,
    /// from the heads `all` read by [`HubStore::all_heads`].
    fn reported_heads(
        &self,
        all: &HashMap<(String, String), u64>,
        store: &str,
        contacts: &[Contact],
    ) -> HashMap<String, u64> {
        let head = |key: &str, module: &str| {
            all.get(&(key.to_owned(), module.to_owned()))
                .copied()
                .unwrap_or(0)
        };
        let mut heads = HashMap::new();
        for contact in contacts {
            let reported = contact
                .cursors
                .iter()
                .chain(contact.ack.iter().flat_map(|a| &a.cursors));
            for c in reported {
                let h = match self.shared_with(store, &c.module) {
                    Some(group) => join_cursor(head(group, &c.module), head(store, &c.module)),
                    None => head(store, &c.module),
                };
                heads.insert(c.module.clone(), h);
            }
        }
        heads
    }

    /// What the hub last heard from a store's box, contacts not yet written included.
    pub fn box_report(&self, store: &str) -> Result<BoxReport, StoreError> {
        let mut report = self.backend.box_report(store)?;
        let pending = self
            .contacts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(store)
            .cloned();
        if let Some(contacts) = pending {
            let all = self.all_heads(&[store])?;
            let heads = self.reported_heads(&all, store, &contacts);
            apply_contacts(&mut report, &contacts, &heads);
        }
        Ok(report)
    }
}

/// A box's contact as a sync call reported it.
#[derive(Clone)]
struct Contact {
    at_ms: i64,
    cursors: Vec<ModuleCursor>,
    ack: Option<proto::Ack>,
}

/// Applies contacts, oldest first, to a box report. A cursor equal to the module's head in
/// `heads` (read at the flush, after the contact) means the box was in step: the fleet view
/// measures how long a box has been behind from it. A write landing between the contact and
/// the flush makes the box look behind, never in step when it is not.
fn apply_contacts(report: &mut BoxReport, contacts: &[Contact], heads: &HashMap<String, u64>) {
    for contact in contacts {
        let now_ms = contact.at_ms;
        report.last_contact_ms = Some(report.last_contact_ms.unwrap_or(now_ms).max(now_ms));
        let reported = contact
            .cursors
            .iter()
            .chain(contact.ack.iter().flat_map(|a| &a.cursors));
        for c in reported {
            report.cursors.insert(c.module.clone(), c.cursor);
            if heads.get(&c.module) == Some(&c.cursor) {
                report.in_step_ms.insert(c.module.clone(), now_ms);
            }
        }
        if let Some(ack) = &contact.ack {
            report.pending_activity = Some(ack.pending_activity);
            crate::fleet::note_pending(&mut report.pending_history, now_ms, ack.pending_activity);
            report.box_version = Some(ack.box_version.clone());
            report.last_full_sync_ms = Some(now_ms);
            report.module_errors =
                crate::fleet::note_errors(&report.module_errors, &ack.errors, now_ms);
        }
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
    fn contacts_that_say_nothing_new_are_written_at_most_every_resolution() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(dir.path()).unwrap();
        let cursor = |c: u64| {
            vec![ModuleCursor {
                module: "catalog".into(),
                cursor: c,
            }]
        };
        let last = |hub: &HubStore| hub.box_report("s").unwrap().last_contact_ms;
        hub.note_contact("s", 1_000, Some(&cursor(3)), None)
            .unwrap();
        hub.flush_contacts().unwrap();
        assert_eq!(last(&hub), Some(1_000));
        // A push and an idle poll with the same cursors, a second later: nothing to write.
        hub.note_contact("s", 2_000, None, None).unwrap();
        hub.note_contact("s", 2_500, Some(&cursor(3)), None)
            .unwrap();
        assert_eq!(hub.flush_contacts().unwrap(), 0);
        assert_eq!(last(&hub), Some(1_000));
        // New cursors are news at once, and so is an acknowledgement.
        hub.note_contact("s", 3_000, Some(&cursor(4)), None)
            .unwrap();
        assert_eq!(hub.flush_contacts().unwrap(), 1);
        assert_eq!(
            hub.box_report("s").unwrap().cursors.get("catalog"),
            Some(&4)
        );
        let ack = proto::Ack::new(cursor(4), Default::default());
        hub.note_contact("s", 4_000, None, Some(&ack)).unwrap();
        assert_eq!(hub.flush_contacts().unwrap(), 1);
        assert_eq!(last(&hub), Some(4_000));
        // Nothing new but the resolution passed: the time is written.
        hub.note_contact("s", 4_000 + CONTACT_RESOLUTION_MS - 1, None, None)
            .unwrap();
        assert_eq!(hub.flush_contacts().unwrap(), 0);
        hub.note_contact("s", 4_000 + CONTACT_RESOLUTION_MS, Some(&cursor(4)), None)
            .unwrap();
        assert_eq!(hub.flush_contacts().unwrap(), 1);
        assert_eq!(last(&hub), Some(4_000 + CONTACT_RESOLUTION_MS));
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

    #[test]
    fn a_group_module_shows_the_groups_records_under_the_stores_own() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout {
            groups: [("chain".to_owned(), vec!["s1".to_owned(), "s2".to_owned()])].into(),
            group_modules: ["catalog".to_owned()].into(),
        };
        let hub = HubStore::open(dir.path()).unwrap().with_layout(layout);
        let g = group_key("chain");
        let mut watch = hub.subscribe("s2");
        hub.import(
            &g,
            "catalog",
            &[rec(r#"{"id":"a","p":1}"#), rec(r#"{"id":"b","p":2}"#)],
            false,
            0,
        )
        .unwrap();
        // A write to the group wakes its stores' watches.
        assert!(watch.has_changed().unwrap());
        watch.mark_unchanged();
        hub.put_record("s1", "catalog", &rec(r#"{"id":"b","p":9}"#))
            .unwrap();
        hub.put_record("s1", "catalog", &rec(r#"{"id":"c","p":3}"#))
            .unwrap();
        assert!(!watch.has_changed().unwrap());

        let (s1, head1) = hub.snapshot("s1", "catalog").unwrap();
        let ids: Vec<(&str, &str)> = s1.iter().map(|(i, j)| (i.as_str(), j.as_str())).collect();
        assert_eq!(
            ids,
            [
                ("a", r#"{"id":"a","p":1}"#),
                ("b", r#"{"id":"b","p":9}"#),
                ("c", r#"{"id":"c","p":3}"#)
            ]
        );
        assert_eq!(head1, (2 << 32) | 2);
        assert_eq!(hub.module_head("s1", "catalog").unwrap(), head1);
        let (s2, head2) = hub.snapshot("s2", "catalog").unwrap();
        assert_eq!((s2.len(), head2), (2, 2 << 32));
        // A store with nothing of its own shares the group's digest entry.
        assert_eq!(
            hub.module_hashes("s2", "catalog").unwrap().digest,
            hub.module_hashes("s2", "catalog").unwrap().digest
        );

        // Paged one change at a time from zero, s1 ends with what the snapshot holds.
        let mut cursor = 0;
        let mut held: BTreeMap<String, String> = BTreeMap::new();
        loop {
            let (changes, next, more) = hub
                .changes_since("s1", "catalog", cursor, 1)
                .unwrap()
                .unwrap();
            for c in changes {
                match c.body {
                    ChangeBody::Put(json) => {
                        held.insert(c.id, json);
                    }
                    ChangeBody::Delete => {
                        held.remove(&c.id);
                    }
                    ChangeBody::Patch(_) => panic!("no version to patch from zero"),
                }
            }
            cursor = next;
            if !more {
                break;
            }
        }
        assert_eq!(cursor, head1);
        assert_eq!(held.into_iter().collect::<Vec<_>>(), s1);

        // The group changes b, which s1 overrides: s1 is told nothing, s2 is.
        hub.put_record(&g, "catalog", &rec(r#"{"id":"b","p":5}"#))
            .unwrap();
        let (changes, c1, _) = hub
            .changes_since("s1", "catalog", cursor, 100)
            .unwrap()
            .unwrap();
        assert!(changes.is_empty(), "{changes:?}");
        let (changes, _, _) = hub
            .changes_since("s2", "catalog", head2, 100)
            .unwrap()
            .unwrap();
        assert_eq!(changes.len(), 1);
        // s1 drops its override of b: it gets the group's b whole; its own c is deleted.
        assert!(hub.delete_record("s1", "catalog", "b", 1).unwrap());
        assert!(hub.delete_record("s1", "catalog", "c", 1).unwrap());
        let (changes, _, _) = hub
            .changes_since("s1", "catalog", c1, 100)
            .unwrap()
            .unwrap();
        assert_eq!(
            changes,
            [
                Change {
                    id: "b".into(),
                    body: ChangeBody::Put(r#"{"id":"b","p":5}"#.into())
                },
                Change {
                    id: "c".into(),
                    body: ChangeBody::Delete
                }
            ]
        );
        // A cursor of the store's part beyond its head is refused, as for a plain module.
        assert!(hub
            .changes_since("s2", "catalog", (3 << 32) | 7, 10)
            .unwrap()
            .is_none());
        // Modules kept per store, and stores in no group, are untouched by the layout.
        assert_eq!(hub.module_head("s1", "config").unwrap(), 0);
        assert_eq!(hub.snapshot("s3", "catalog").unwrap().0.len(), 0);
    }
}
