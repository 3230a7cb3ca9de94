//! The HTTPS listener boxes talk to: delta pull, full sync, activity push, acknowledgement,
//! and firmware updates (check, bundle download, report: `ota.rs`). Full sync and
//! acknowledgement are served in protocol versions 2 and 3 (`storebox_protocol::v2`).
//!
//! Every answer is built from the database alone, so any number of boxes can be served at
//! once; the only per-request state is the store the caller's client certificate names.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Response, StatusCode};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::Request;
use storebox_protocol as proto;

use crate::config::HubConfig;
use crate::store::HubStore;
use storebox_http::{self as h, Body};

/// Largest compressed request body a box may send.
pub const MAX_SYNC_BODY: usize = 64 * 1024 * 1024;

/// Most changes per module in one delta answer, whatever the box asks.
pub const MAX_DELTA_LIMIT: u32 = 50_000;

/// Longest a change watch is held open. The box asks for less; this bounds what a broken or
/// hostile box can make the hub hold.
pub const MAX_WATCH: Duration = Duration::from_secs(15 * 60);

/// How many encoded module snapshots the hub keeps. A snapshot is compressed at the slowest
/// zstd level, which costs about a second for a 1 MB module: boxes syncing the same module
/// at the same head share one encoding.
const SNAPSHOT_CACHE: usize = 64;

/// The body of a sync answer: an encoded message or a JSON error, or a bundle streamed from
/// disk.
pub type SyncBody = Either<Body, crate::ota::FileBody>;

/// What the sync listener needs.
pub struct SyncState {
    pub config: HubConfig,
    pub store: Arc<HubStore>,
    /// Store id by SHA-256 of its credential.
    credentials: BTreeMap<String, String>,
    faults: Faults,
    /// Encoded `Records` payloads by (store, module, head), oldest first.
    snapshots: Mutex<VecDeque<(SnapshotKey, Arc<Vec<u8>>)>>,
}

/// (store, module, head) of an encoded snapshot.
type SnapshotKey = (String, String, u64);

/// Faults a test can switch on to prove module independence. Present only in debug builds:
/// a release hub has no way to misbehave on purpose.
#[derive(Default)]
struct Faults {
    /// Modules answered with `Failed`.
    fail: Vec<String>,
    /// Modules answered with a payload that does not decode.
    corrupt: Vec<String>,
}

impl Faults {
    #[cfg(debug_assertions)]
    fn from_env() -> Faults {
        let list = |name: &str| -> Vec<String> {
            std::env::var(name)
                .unwrap_or_default()
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        };
        Faults {
            fail: list("STOREHUB_FAULT_FAIL_MODULES"),
            corrupt: list("STOREHUB_FAULT_CORRUPT_MODULES"),
        }
    }

    #[cfg(not(debug_assertions))]
    fn from_env() -> Faults {
        Faults::default()
    }
}

impl SyncState {
    pub fn new(config: HubConfig, store: Arc<HubStore>) -> SyncState {
        let credentials = config
            .stores
            .iter()
            .map(|s| (s.credential_sha256.to_ascii_lowercase(), s.id.clone()))
            .collect();
        SyncState {
            config,
            store,
            credentials,
            faults: Faults::from_env(),
            snapshots: Mutex::new(VecDeque::new()),
        }
    }

    /// The encoded `Records` snapshot of a module at head `at` (whose digest is `at_digest`),
    /// from the cache, or read and encoded now. The cache is looked at before the database
    /// is read, so a box whose snapshot is cached costs no scan.
    fn records_payload(
        &self,
        store: &str,
        module: &str,
        at: u64,
        at_digest: proto::Digest,
    ) -> Result<Arc<Vec<u8>>, String> {
        let cached = |head: u64| {
            let key = (store.to_owned(), module.to_owned(), head);
            self.snapshots
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, payload)| payload.clone())
        };
        if let Some(payload) = cached(at) {
            return Ok(payload);
        }
        let (records, head) = self
            .store
            .snapshot(store, module)
            .map_err(|e| e.to_string())?;
        // A write landed since the digest was taken: the snapshot is of a newer head.
        let digest = if head == at {
            at_digest
        } else {
            if let Some(payload) = cached(head) {
                return Ok(payload);
            }
            let mut d = proto::Digest::default();
            for (id, json) in &records {
                d.add(id, json);
            }
            d
        };
        let key = (store.to_owned(), module.to_owned(), head);
        let table = proto::RecordTable::from_records(&records).map_err(|e| e.to_string())?;
        let snapshot = proto::ModuleSnapshot::Records {
            table,
            cursor: head,
            digest,
        };
        let payload = Arc::new(
            proto::encode(&snapshot, proto::PAYLOAD_ZSTD_LEVEL).map_err(|e| e.to_string())?,
        );
        let mut cache = self.snapshots.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= SNAPSHOT_CACHE {
            cache.pop_front();
        }
        cache.push_back((key, payload.clone()));
        Ok(payload)
    }

    fn store_for(&self, credential: &str) -> Option<String> {
        let digest = crate::sha256_hex(credential.as_bytes());
        // Walk every entry so the time taken does not depend on which one matches.
        let mut found = None;
        for (hash, store) in &self.credentials {
            if crate::secrets_equal(hash.as_bytes(), digest.as_bytes()) {
                found = Some(store.clone());
            }
        }
        found
    }
}

/// Answers one request from a box.
pub async fn handle(state: Arc<SyncState>, req: Request<Incoming>) -> Response<SyncBody> {
    if req.uri().path().starts_with(crate::enroll::PATH_PREFIX) {
        return crate::enroll::handle(&state.config, req)
            .await
            .map(Either::Left);
    }
    let store = match authenticate(&state, &req) {
        Ok(store) => store,
        Err(response) => return response.map(Either::Left),
    };
    // The one call answered with a stream, and the one that is not a POST.
    if let Some(version) = crate::ota::bundle_version(req.uri().path()) {
        return crate::ota::serve_bundle(&state.store, &state.config, &store, version, &req).await;
    }
    call(state, store, req).await.map(Either::Left)
}

/// Answers one of the calls whose request and answer are encoded messages.
async fn call(state: Arc<SyncState>, store: String, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::POST {
        return h::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "sync calls are POST",
        );
    }
    let path = req.uri().path().to_owned();
    let ota = path == proto::ota::PATH_OTA || path == proto::ota::PATH_OTA_REPORT;
    let limit = if ota {
        crate::ota::MAX_OTA_BODY
    } else {
        MAX_SYNC_BODY
    };
    let body = match h::read_body(req.into_body(), limit).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    if path == proto::ota::PATH_OTA_REPORT {
        let worker = state.clone();
        let result =
            tokio::task::spawn_blocking(move || crate::ota::report(&worker.store, &store, &body))
                .await;
        return match result {
            Ok(Ok(())) => Response::builder()
                .status(StatusCode::NO_CONTENT)
                .body(Body::default())
                .unwrap_or_else(|_| h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "")),
            Ok(Err(response)) => response,
            Err(e) => h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
        };
    }
    if path == proto::PATH_WATCH {
        return match watch(&state, &store, &body).await {
            Ok(bytes) => answer(bytes),
            Err(response) => response,
        };
    }
    let worker = state.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Response<Body>> {
        match path.as_str() {
            proto::PATH_DELTA => delta(&worker, &store, &body),
            proto::PATH_FULL => full(&worker, &store, &body),
            proto::v2::PATH_FULL => full_v2(&worker, &store, &body),
            proto::PATH_REPAIR => repair(&worker, &store, &body),
            proto::PATH_ACTIVITY => activity(&worker, &store, &body),
            proto::PATH_ACK => {
                let ack = proto::decode(&body, "an acknowledgement").map_err(bad_request)?;
                ack_v3(&worker, &store, ack)
            }
            proto::v2::PATH_ACK => {
                let ack: proto::v2::Ack =
                    proto::decode(&body, "an acknowledgement").map_err(bad_request)?;
                ack_v3(&worker, &store, ack.into())
            }
            proto::ota::PATH_OTA => {
                crate::ota::check(&worker.store, worker.config.zstd_level, &store, &body)
            }
            _ => Err(h::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no sync call at {path}"),
            )),
        }
    })
    .await;
    match result {
        Ok(Ok(bytes)) => answer(bytes),
        Ok(Err(response)) => response,
        Err(e) => h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
}

fn answer(bytes: Vec<u8>) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, proto::CONTENT_TYPE)
        .body(Body::from(bytes))
        .unwrap_or_else(|_| h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", ""))
}

fn bad_request(e: impl std::fmt::Display) -> Response<Body> {
    h::error(StatusCode::BAD_REQUEST, "bad_request", e)
}

fn internal(e: impl std::fmt::Display) -> Response<Body> {
    tracing::error!("{e}");
    h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
}

fn encode_answer<T: serde::Serialize>(
    state: &SyncState,
    answer: &T,
) -> Result<Vec<u8>, Response<Body>> {
    proto::encode(answer, state.config.zstd_level).map_err(internal)
}

/// Builds one module's frame, applying the test faults.
fn frame<T: serde::Serialize>(
    state: &SyncState,
    module: &crate::config::ModuleConfig,
    payload: &T,
) -> Result<proto::ModuleFrame, Response<Body>> {
    let bytes = proto::encode(payload, proto::PAYLOAD_ZSTD_LEVEL).map_err(internal)?;
    Ok(frame_from(state, module, bytes))
}

/// A module's frame around an already encoded payload.
fn frame_from(
    state: &SyncState,
    module: &crate::config::ModuleConfig,
    mut bytes: Vec<u8>,
) -> proto::ModuleFrame {
    if state.faults.corrupt.contains(&module.name) {
        bytes = vec![0xff; 7];
    }
    proto::ModuleFrame {
        module: module.name.clone(),
        indexes: module.indexes.clone(),
        payload: bytes,
    }
}

/// The answer carrying module frames: not compressed as a whole, each payload already is.
fn modules_answer(now: i64, frames: Vec<proto::ModuleFrame>) -> Result<Vec<u8>, Response<Body>> {
    proto::encode_plain(&proto::ModulesAnswer {
        hub_time_ms: now,
        frames,
    })
    .map_err(internal)
}

fn delta(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let request: proto::DeltaRequest =
        proto::decode(body, "a delta request").map_err(bad_request)?;
    let now = crate::now_ms();
    state
        .store
        .note_contact(store, now, Some(&request.cursors), None)
        .map_err(internal)?;
    let limit = request.limit.clamp(1, MAX_DELTA_LIMIT) as usize;
    let mut frames = Vec::new();
    for module in &state.config.modules {
        if request.skip.contains(&module.name) {
            continue;
        }
        let known = request.cursors.iter().find(|c| c.module == module.name);
        let cursor = known.map_or(0, |c| c.cursor);
        let payload = if state.faults.fail.contains(&module.name) {
            proto::ModuleDelta::Failed {
                error: "fault injected for tests".into(),
            }
        } else {
            match state
                .store
                .changes_since(store, &module.name, cursor, limit)
            {
                Ok(Some((changes, cursor, more))) => {
                    // The digest lets the box check the result; it is only worth computing
                    // when something changed.
                    let digest = if more || changes.is_empty() {
                        None
                    } else {
                        match state.store.module_digest(store, &module.name) {
                            Ok((head, digest)) if head == cursor => Some(digest),
                            Ok(_) => None,
                            Err(e) => {
                                tracing::error!("store {store}, module {}: {e}", module.name);
                                None
                            }
                        }
                    };
                    proto::ModuleDelta::Changes {
                        changes,
                        cursor,
                        more,
                        digest,
                    }
                }
                Ok(None) => proto::ModuleDelta::ResetNeeded,
                Err(e) => {
                    // One module's storage trouble must not cost the others their update.
                    tracing::error!("store {store}, module {}: {e}", module.name);
                    proto::ModuleDelta::Failed {
                        error: e.to_string(),
                    }
                }
            }
        };
        // A module the box knows that has nothing new is left out of the answer: when
        // nothing changed anywhere, the poll's answer is a few bytes whatever the number of
        // modules.
        let idle = matches!(
            &payload,
            proto::ModuleDelta::Changes { changes, more: false, .. } if changes.is_empty()
        );
        if idle && known.is_some() {
            continue;
        }
        frames.push(frame(state, module, &payload)?);
    }
    modules_answer(now, frames)
}

/// A full sync of protocol version 3: the frames, the box's full sync slot, and, when
/// every module of the store is unchanged, the request's status recorded as the box's
/// acknowledgement, so a full sync that finds nothing to do costs the box one round trip.
fn full(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let request: proto::FullRequest =
        proto::decode(body, "a full sync request").map_err(bad_request)?;
    let now = crate::now_ms();
    let (frames, all_unchanged) = full_frames(state, store, &request)?;
    // Only a full sync of every module, nothing asked whole, can stand for the
    // acknowledgement: the hub then knows the box holds exactly its heads.
    let acknowledged = all_unchanged && request.modules.is_empty() && request.records.is_empty();
    let ack = acknowledged.then(|| {
        let cursors = request
            .digests
            .iter()
            .map(|d| proto::ModuleCursor {
                module: d.module.clone(),
                cursor: d.cursor,
            })
            .collect();
        proto::Ack::new(cursors, request.status.clone())
    });
    state
        .store
        .note_contact(store, now, None, ack.as_ref())
        .map_err(internal)?;
    proto::encode_plain(&proto::FullAnswer {
        hub_time_ms: now,
        frames,
        acknowledged,
        full_sync_at_s: crate::fleet::slot_for(&state.config, store),
    })
    .map_err(internal)
}

/// A full sync of protocol version 2: the frames alone; the box acknowledges separately.
fn full_v2(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let request: proto::v2::FullRequest =
        proto::decode(body, "a full sync request").map_err(bad_request)?;
    let now = crate::now_ms();
    state
        .store
        .note_contact(store, now, None, None)
        .map_err(internal)?;
    let (frames, _) = full_frames(state, store, &request.into())?;
    modules_answer(now, frames)
}

/// Every requested module's frame of a full sync, and whether each was `Unchanged` (every
/// module of the store, when the request names none).
fn full_frames(
    state: &SyncState,
    store: &str,
    request: &proto::FullRequest,
) -> Result<(Vec<proto::ModuleFrame>, bool), Response<Body>> {
    let mut frames = Vec::new();
    let mut all_unchanged = true;
    for module in &state.config.modules {
        if !request.modules.is_empty() && !request.modules.contains(&module.name) {
            continue;
        }
        if state.faults.fail.contains(&module.name) {
            let payload = proto::ModuleSnapshot::Failed {
                error: "fault injected for tests".into(),
            };
            frames.push(frame(state, module, &payload)?);
            all_unchanged = false;
            continue;
        }
        let held = request
            .digests
            .iter()
            .find(|d| d.module == module.name)
            .filter(|d| d.digest.count > 0 && !request.records.contains(&module.name));
        match full_module(state, store, &module.name, held) {
            Ok((payload, unchanged)) => {
                all_unchanged &= unchanged && !state.faults.corrupt.contains(&module.name);
                frames.push(frame_from(state, module, payload));
            }
            Err(e) => {
                tracing::error!("store {store}, module {}: {e}", module.name);
                let payload = proto::ModuleSnapshot::Failed { error: e };
                frames.push(frame(state, module, &payload)?);
                all_unchanged = false;
            }
        }
    }
    Ok((frames, all_unchanged))
}

/// One module's part of a full sync, encoded: the cheapest answer that makes the box's module
/// exactly the hub's, and whether it is `Unchanged`.
fn full_module(
    state: &SyncState,
    store: &str,
    module: &str,
    held: Option<&proto::ModuleDigest>,
) -> Result<(Vec<u8>, bool), String> {
    let (head, digest) = state
        .store
        .module_digest(store, module)
        .map_err(|e| e.to_string())?;
    let encode = |s: &proto::ModuleSnapshot| {
        proto::encode(s, proto::PAYLOAD_ZSTD_LEVEL).map_err(|e| e.to_string())
    };
    let Some(held) = held else {
        // A box that holds nothing of the module gets every record.
        return state
            .records_payload(store, module, head, digest)
            .map(|p| (p.as_ref().clone(), false));
    };
    if held.cursor == head && held.digest == digest {
        return Ok((
            encode(&proto::ModuleSnapshot::Unchanged { cursor: head })?,
            true,
        ));
    }
    // The box missed some changes but the hub still has them all: they and a digest check
    // cost what a delta costs.
    if held.cursor < head {
        if let Some((changes, cursor, false)) = state
            .store
            .changes_since(store, module, held.cursor, MAX_DELTA_LIMIT as usize)
            .map_err(|e| e.to_string())?
        {
            if cursor == head {
                let payload = encode(&proto::ModuleSnapshot::Changes {
                    changes,
                    cursor,
                    digest,
                })?;
                return Ok((payload, false));
            }
        }
    }
    // The box's records differ in a way the change log cannot tell (damage, a cursor the
    // hub cannot serve): compare bucket by bucket.
    let hashes = state
        .store
        .module_hashes(store, module)
        .map_err(|e| e.to_string())?;
    let count = proto::bucket_count_for(hashes.digest.count);
    let buckets =
        proto::bucket_hashes(hashes.hashes.iter().map(|(id, h)| (id.as_str(), *h)), count);
    let payload = encode(&proto::ModuleSnapshot::Buckets {
        cursor: hashes.head,
        digest: hashes.digest,
        buckets,
    })?;
    Ok((payload, false))
}

fn repair(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let request: proto::RepairRequest =
        proto::decode(body, "a repair request").map_err(bad_request)?;
    let Some(module) = state
        .config
        .modules
        .iter()
        .find(|m| m.name == request.module)
    else {
        return Err(h::error(
            StatusCode::NOT_FOUND,
            "unknown_module",
            format!("this hub has no module {:?}", request.module),
        ));
    };
    if request.bucket_count == 0 || request.bucket_count > 1024 {
        return Err(bad_request("bucket_count must be 1 to 1024"));
    }
    if let Some(b) = request.buckets.iter().find(|b| **b >= request.bucket_count) {
        return Err(bad_request(format!("bucket {b} is out of range")));
    }
    let buckets: BTreeSet<u32> = request.buckets.iter().copied().collect();
    let held: HashMap<&str, u64> = request
        .held
        .iter()
        .map(|(id, h)| (id.as_str(), *h))
        .collect();
    let now = crate::now_ms();
    let payload = match state
        .store
        .repair(store, &module.name, request.bucket_count, &buckets, &held)
        .and_then(|(changes, head)| {
            let (_, digest) = state.store.module_digest(store, &module.name)?;
            Ok((changes, head, digest))
        }) {
        Ok((changes, head, digest)) => proto::ModuleSnapshot::Changes {
            changes,
            cursor: head,
            digest,
        },
        Err(e) => proto::ModuleSnapshot::Failed {
            error: e.to_string(),
        },
    };
    modules_answer(now, vec![frame(state, module, &payload)?])
}

/// Holds a change watch until one of the store's modules moves past the box's cursor, or the
/// wait runs out.
async fn watch(
    state: &Arc<SyncState>,
    store: &str,
    body: &[u8],
) -> Result<Vec<u8>, Response<Body>> {
    let request: proto::WatchRequest =
        proto::decode(body, "a watch request").map_err(bad_request)?;
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(request.wait_ms).min(MAX_WATCH);
    // Subscribe before looking, so a write between the look and the wait is not missed.
    let mut changes = state.store.subscribe(store);
    loop {
        changes.borrow_and_update();
        let changed = match changed_in_memory(state, store, &request.cursors) {
            Some(changed) => changed,
            None => {
                let worker = state.clone();
                let cursors = request.cursors.clone();
                let store_id = store.to_owned();
                tokio::task::spawn_blocking(move || -> Result<Vec<String>, String> {
                    let mut changed = Vec::new();
                    for module in &worker.config.modules {
                        let head = worker
                            .store
                            .module_head(&store_id, &module.name)
                            .map_err(|e| e.to_string())?;
                        if moved(&cursors, &module.name, head) {
                            changed.push(module.name.clone());
                        }
                    }
                    Ok(changed)
                })
                .await
                .map_err(internal)?
                .map_err(internal)?
            }
        };
        if !changed.is_empty() {
            return proto::encode(&proto::WatchAnswer { changed }, 3).map_err(internal);
        }
        match tokio::time::timeout_at(deadline, changes.changed()).await {
            Ok(Ok(())) => continue,
            // The wait ran out, or the hub is shutting down: nothing changed.
            Ok(Err(_)) | Err(_) => {
                return proto::encode(&proto::WatchAnswer { changed }, 3).map_err(internal)
            }
        }
    }
}

/// Whether a module's head differs from the box's cursor (or the box has none).
fn moved(cursors: &[proto::ModuleCursor], module: &str, head: u64) -> bool {
    cursors
        .iter()
        .find(|c| c.module == module)
        .is_none_or(|c| c.cursor != head)
}

/// The modules whose head moved past the box's cursors, when every head is in this
/// process's memory: a watch then checks without a trip to the blocking pool, which matters
/// when a change to a group wakes thousands of watches at once.
fn changed_in_memory(
    state: &SyncState,
    store: &str,
    cursors: &[proto::ModuleCursor],
) -> Option<Vec<String>> {
    let mut changed = Vec::new();
    for module in &state.config.modules {
        let head = state.store.cached_module_head(store, &module.name)?;
        if moved(cursors, &module.name, head) {
            changed.push(module.name.clone());
        }
    }
    Some(changed)
}

fn activity(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let batch: proto::ActivityBatch =
        proto::decode(body, "an activity batch").map_err(bad_request)?;
    for event in &batch.events {
        if !proto::is_valid_id(&event.id) {
            return Err(bad_request(format!("event id {:?} is invalid", event.id)));
        }
        if serde_json::from_str::<serde_json::Value>(&event.event).is_err() {
            return Err(bad_request(format!("event {:?} is not JSON", event.id)));
        }
    }
    let now = crate::now_ms();
    let outcome = state
        .store
        .push_activity(store, &batch.events, now)
        .map_err(internal)?;
    state
        .store
        .note_contact(store, now, None, None)
        .map_err(internal)?;
    encode_answer(
        state,
        &proto::ActivityAck {
            accepted: outcome.accepted,
            duplicates: outcome.duplicates,
        },
    )
}

/// Records an acknowledgement, of either version (a version 2 one reports no errors).
fn ack_v3(state: &SyncState, store: &str, ack: proto::Ack) -> Result<Vec<u8>, Response<Body>> {
    state
        .store
        .note_contact(store, crate::now_ms(), None, Some(&ack))
        .map_err(internal)?;
    encode_answer(state, &())
}

/// The store a request comes from: the client certificate of its connection, looked up in
/// the PKI's register on every request, so expiry and revocation apply to resumed TLS
/// sessions too (rustls does not re-verify a client certificate on resumption). Legacy
/// bearer credentials only when `[pki] legacy_credentials` is on.
fn authenticate(state: &SyncState, req: &Request<Incoming>) -> Result<String, Response<Body>> {
    let leaf = req
        .extensions()
        .get::<h::PeerCertificates>()
        .and_then(|c| c.0.first());
    if let (Some(pki), Some(leaf)) = (crate::pki::global(), leaf) {
        return pki
            .authenticate(leaf, crate::now_ms())
            .map_err(crate::enroll::error_response);
    }
    if state.config.pki.legacy_credentials {
        if let Some(store) = h::bearer(req).and_then(|c| state.store_for(c)) {
            return Ok(store);
        }
    }
    Err(h::error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "a client certificate issued by this hub is required: enroll the box (storebox enroll)",
    ))
}

/// A TLS acceptor for the sync listener, offering HTTP/2 and HTTP/1.1, TLS 1.3 only.
///
/// Client certificates are asked for and, when sent, must chain to `client_ca`; a connection
/// without one is let through the handshake because enrollment and renewal after an outage
/// happen before the box holds a valid certificate. Every other call refuses it
/// ([`authenticate`]).
pub fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    use anyhow::Context;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .with_context(|| format!("reading {}", cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(key)
        .with_context(|| format!("reading the key {}", key.display()))?;
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(client_ca)
        .with_context(|| format!("reading the CA {}", client_ca.display()))?
    {
        let ca = ca.with_context(|| format!("parsing the CA {}", client_ca.display()))?;
        roots
            .add(ca)
            .with_context(|| format!("loading the CA {}", client_ca.display()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .allow_unauthenticated()
    .build()
    .context("building the client certificate verifier")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("choosing TLS versions")?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)
        .context("loading the hub certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Session resumption saves a box reconnecting after a line cut the certificate chain and
    // most of a handshake. Stateless tickets keep it working across hub restarts and
    // replicas sharing the key; one ticket per handshake is all a box uses.
    config.ticketer = rustls::crypto::ring::Ticketer::new().context("creating the TLS ticketer")?;
    config.send_tls13_tickets = 1;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
