//! Firmware updates (OTA) on the hub: the bundle files, the admin calls that manage bundles
//! and targets, and the three calls boxes make (docs/PROTOCOL.md, "Firmware updates").
//!
//! A bundle is a signed RAUC bundle the hub keeps as opaque bytes: the box verifies its
//! signature, so the hub is trusted with availability only. Bundles are 50 to 300 MB, so
//! neither an upload nor a download is ever held in memory: an upload is streamed to a
//! temporary file while its SHA-256 is computed, then renamed to a name of its own; a
//! download is read from disk in 64 KiB chunks as the box takes them.
//!
//! Files live in `<data_dir>/ota/` as `<version>@<random>.raucb`; the database record of a
//! version names its file ([`crate::store::ota`]). A new upload of a version gets a new file,
//! so a download that has its file open never sees bytes change, and a crash between the
//! rename and the commit leaves only an orphan file, removed at the next start ([`prepare`]).

use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{header, Method, Response, StatusCode};
use http_body_util::{BodyExt, Either};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::Request;
use serde_json::{json, Value};
use storebox_protocol::{self as proto, ota};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::config::HubConfig;
use crate::store::ota::{BoxOta, BundleMeta, DeleteBundle, PutBundle, StoredReport, TargetedBy};
use crate::store::{rfc3339, HubStore};
use crate::sync_api::SyncBody;
use storebox_http::{self as h, Body};

/// Largest compressed body of a check or a report: a few short strings.
pub const MAX_OTA_BODY: usize = 16 * 1024;
/// Largest decompressed check or report, so a small body cannot inflate into a large one.
const MAX_OTA_DECODED: usize = 64 * 1024;
/// Longest version, slot, `compatible` or running string the hub records from a box.
const MAX_FIELD_BYTES: usize = 256;
/// Longest failure reason kept; a longer one is cut, not refused, so the report is not lost.
const MAX_REASON_BYTES: usize = 2048;
/// Bytes read from disk per frame of a download.
const CHUNK: usize = 64 * 1024;
/// Frames read ahead of the box: bounds a download's memory to a few chunks however slowly
/// the box reads.
const READ_AHEAD: usize = 4;
/// Largest JSON body of a target call.
const MAX_TARGET_BODY: usize = 4 * 1024;
/// Suffix of bundle files, and of uploads still being received.
const BUNDLE_SUFFIX: &str = ".raucb";
const PART_SUFFIX: &str = ".part";

/// Whether the hub takes `version` as a bundle's version: the protocol's rule, and not `.` or
/// `..`, which URL clients resolve as path steps, so such a bundle could not be downloaded.
pub fn is_valid_version(version: &str) -> bool {
    ota::is_valid_version(version) && version != "." && version != ".."
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn random_hex() -> std::io::Result<String> {
    let mut id = [0u8; 8];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(format!("no randomness: {e}")))?;
    Ok(hex(&id))
}

/// Makes the bundle directory and removes what a crash can leave there: uploads never
/// finished, and files no record names (renamed but never committed, or replaced or deleted
/// just before the crash). Called at startup, before either listener serves.
pub fn prepare(dir: &Path, store: &HubStore) -> anyhow::Result<()> {
    use anyhow::Context;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("creating the bundle directory {}", dir.display()))?;
    let bundles = store.ota_bundles().context("listing firmware bundles")?;
    let named: std::collections::BTreeSet<&str> =
        bundles.iter().map(|(_, m)| m.file.as_str()).collect();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let leftover =
            name.ends_with(PART_SUFFIX) || (name.ends_with(BUNDLE_SUFFIX) && !named.contains(name));
        if leftover {
            tracing::info!("removing the leftover bundle file {name}");
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        }
    }
    for (version, meta) in &bundles {
        if !dir.join(&meta.file).exists() {
            tracing::error!(
                "firmware bundle {version}: its file {} is missing from {}",
                meta.file,
                dir.display()
            );
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

// ---------------------------------------------------------------------------------------
// Receiving a bundle.

/// An upload written to its temporary file, flushed to disk.
#[derive(Debug)]
pub struct Received {
    pub temp: PathBuf,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Why an upload was not received.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("the bundle is larger than the hub's limit of {limit} bytes ([ota] max_bundle_size)")]
    TooLarge { limit: u64 },
    #[error("the bundle is empty")]
    Empty,
    #[error("reading the upload: {0}")]
    Body(String),
    #[error("writing the bundle to {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl ReceiveError {
    fn response(&self) -> Response<Body> {
        match self {
            ReceiveError::TooLarge { .. } => {
                h::error(StatusCode::PAYLOAD_TOO_LARGE, "too_large", self)
            }
            ReceiveError::Empty => h::error(StatusCode::BAD_REQUEST, "empty_bundle", self),
            ReceiveError::Body(_) => h::error(StatusCode::BAD_REQUEST, "bad_body", self),
            ReceiveError::Io { .. } => internal(self),
        }
    }
}

/// Streams `body` into a new temporary file in `dir`, computing its SHA-256 on the way and
/// stopping as soon as it passes `limit` bytes. The file is removed on any failure.
pub async fn receive<B>(mut body: B, dir: &Path, limit: u64) -> Result<Received, ReceiveError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let io = |path: &Path| {
        let path = path.display().to_string();
        move |source| ReceiveError::Io { path, source }
    };
    let temp = dir.join(format!(
        ".upload-{}{PART_SUFFIX}",
        random_hex().map_err(io(dir))?
    ));
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .await
        .map_err(io(&temp))?;
    let result = async {
        // Frames are a few KiB; writing them a MiB at a time spares the disk and the blocking
        // pool a call per frame.
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
        let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ReceiveError::Body(e.to_string()))?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            size += data.len() as u64;
            if size > limit {
                return Err(ReceiveError::TooLarge { limit });
            }
            digest.update(&data);
            out.write_all(&data).await.map_err(io(&temp))?;
        }
        if size == 0 {
            return Err(ReceiveError::Empty);
        }
        out.flush().await.map_err(io(&temp))?;
        out.into_inner().sync_all().await.map_err(io(&temp))?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(digest.finish().as_ref());
        Ok((size, sha256))
    }
    .await;
    match result {
        Ok((size, sha256)) => Ok(Received { temp, size, sha256 }),
        Err(e) => {
            let _ = tokio::fs::remove_file(&temp).await;
            Err(e)
        }
    }
}

/// Gives a received upload its file name and records it as `version`, unless the version is
/// targeted. Blocking.
fn commit_upload(
    hub: &HubStore,
    dir: &Path,
    version: &str,
    received: &Received,
) -> Result<(PutBundle, BundleMeta), String> {
    let discard = |e: String| {
        let _ = std::fs::remove_file(&received.temp);
        e
    };
    let file = format!(
        "{version}@{}{BUNDLE_SUFFIX}",
        random_hex().map_err(|e| discard(e.to_string()))?
    );
    let path = dir.join(&file);
    std::fs::rename(&received.temp, &path)
        .map_err(|e| discard(format!("moving the upload to {}: {e}", path.display())))?;
    let meta = BundleMeta {
        file,
        size: received.size,
        sha256: hex(&received.sha256),
        uploaded_at_ms: crate::now_ms(),
    };
    let outcome = match hub.ota_put_bundle(version, &meta) {
        Ok(o) => o,
        Err(e) => {
            let _ = std::fs::remove_file(&path);
            return Err(e.to_string());
        }
    };
    match &outcome {
        PutBundle::Targeted(_) => {
            let _ = std::fs::remove_file(&path);
        }
        PutBundle::Replaced { old_file } => remove_bundle_file(dir, old_file),
        PutBundle::Created => {}
    }
    // The record is committed; the new name must survive a power cut as well.
    if let Err(e) = sync_dir(dir) {
        tracing::warn!("syncing {}: {e}", dir.display());
    }
    Ok((outcome, meta))
}

/// Removes a bundle file no record names any more. A download that has it open keeps
/// reading it; a failure only leaves a file [`prepare`] removes at the next start.
fn remove_bundle_file(dir: &Path, file: &str) {
    if let Err(e) = std::fs::remove_file(dir.join(file)) {
        tracing::warn!("removing the old bundle file {file}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// Admin calls. Each answers JSON in the admin API's style; the blocking ones run under
// `spawn_blocking` in `admin_api.rs`.

fn internal(e: impl std::fmt::Display) -> Response<Body> {
    tracing::error!("firmware update call failed: {e}");
    h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
}

fn invalid_version(version: &str) -> Response<Body> {
    h::error(
        StatusCode::BAD_REQUEST,
        "invalid_version",
        format!(
            "{version:?} is not a version: use 1 to {} of letters, digits, '.', '-', '+' and '_' \
             (not \".\" or \"..\")",
            ota::MAX_VERSION_BYTES
        ),
    )
}

fn unknown_bundle(version: &str) -> Response<Body> {
    h::error(
        StatusCode::NOT_FOUND,
        "unknown_bundle",
        format!("the hub has no bundle of version {version:?}: upload it first"),
    )
}

fn targeted(version: &str, by: &TargetedBy) -> Response<Body> {
    h::error(
        StatusCode::CONFLICT,
        "bundle_targeted",
        format!("bundle {version} is the target of {by}: clear or change those targets first"),
    )
}

/// `PUT /admin/v1/ota/bundles/{version}`: the raw body is the bundle.
pub async fn put_bundle(
    hub: Arc<HubStore>,
    config: &HubConfig,
    version: String,
    req: Request<Incoming>,
) -> Response<Body> {
    if !is_valid_version(&version) {
        return invalid_version(&version);
    }
    let limit = match config.max_bundle_size() {
        Ok(l) => l,
        Err(e) => return internal(format!("{e:#}")),
    };
    // A declared length over the limit is refused before a byte of the body is read.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return ReceiveError::TooLarge { limit }.response();
    }
    // Checked again when the upload is recorded; checking first spares sending 300 MB to
    // be refused.
    let early = {
        let hub = hub.clone();
        let version = version.clone();
        tokio::task::spawn_blocking(move || hub.ota_targeted_by(&version)).await
    };
    match early {
        Ok(Ok(by)) if by.any() => return targeted(&version, &by),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    }
    let dir = config.ota_dir();
    let received = match receive(req.into_body(), &dir, limit).await {
        Ok(r) => r,
        Err(e) => {
            if !matches!(e, ReceiveError::TooLarge { .. } | ReceiveError::Empty) {
                tracing::warn!("upload of bundle {version}: {e}");
            }
            return e.response();
        }
    };
    let committed = {
        let version = version.clone();
        tokio::task::spawn_blocking(move || commit_upload(&hub, &dir, &version, &received)).await
    };
    let (outcome, meta) = match committed {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => return internal(e),
        Err(e) => return internal(e),
    };
    let status = match outcome {
        PutBundle::Targeted(by) => return targeted(&version, &by),
        PutBundle::Created => StatusCode::CREATED,
        PutBundle::Replaced { .. } => StatusCode::OK,
    };
    tracing::info!(
        "firmware bundle {version} stored: {} bytes, sha256 {}",
        meta.size,
        meta.sha256
    );
    h::json(
        status,
        &json!({
            "version": version,
            "size": meta.size,
            "sha256": meta.sha256,
            "uploaded_at": rfc3339(meta.uploaded_at_ms),
        }),
    )
}

/// `GET /admin/v1/ota/bundles`: every bundle, newest version first, with who targets it.
pub fn list_bundles(hub: &HubStore) -> Response<Body> {
    let (bundles, (fleet, stores)) =
        match hub.ota_bundles().and_then(|b| Ok((b, hub.ota_targets()?))) {
            Ok(v) => v,
            Err(e) => return internal(e),
        };
    let mut bundles = bundles;
    bundles.sort_by(|(a, _), (b, _)| ota::compare_versions(b, a).then_with(|| b.cmp(a)));
    let list: Vec<Value> = bundles
        .iter()
        .map(|(version, meta)| {
            let targeted_by: Vec<&str> = stores
                .iter()
                .filter(|(_, v)| *v == version)
                .map(|(s, _)| s.as_str())
                .collect();
            json!({
                "version": version,
                "size": meta.size,
                "sha256": meta.sha256,
                "uploaded_at": rfc3339(meta.uploaded_at_ms),
                "fleet_target": fleet.as_deref() == Some(version.as_str()),
                "store_targets": targeted_by,
            })
        })
        .collect();
    h::json(StatusCode::OK, &json!({ "bundles": list }))
}

/// `DELETE /admin/v1/ota/bundles/{version}`.
pub fn delete_bundle(hub: &HubStore, config: &HubConfig, version: &str) -> Response<Body> {
    if !is_valid_version(version) {
        return invalid_version(version);
    }
    match hub.ota_delete_bundle(version) {
        Ok(DeleteBundle::Deleted { file }) => {
            remove_bundle_file(&config.ota_dir(), &file);
            tracing::info!("firmware bundle {version} deleted");
            h::json(StatusCode::OK, &json!({ "deleted": version }))
        }
        Ok(DeleteBundle::Unknown) => unknown_bundle(version),
        Ok(DeleteBundle::Targeted(by)) => targeted(version, &by),
        Err(e) => internal(e),
    }
}

/// The version of a target call's body `{"version": "1.2.0"}` or `{"version": null}`. The
/// key is required, so an empty object cannot clear a target by mistake.
fn target_version(body: &[u8]) -> Result<Option<String>, Response<Body>> {
    let bad = |m: &str| h::error(StatusCode::BAD_REQUEST, "bad_request", m);
    let value: Value = h::parse_json(body)?;
    let Some(object) = value.as_object() else {
        return Err(bad(
            r#"the body must be {"version": "..."} or {"version": null}"#,
        ));
    };
    if let Some(other) = object.keys().find(|k| *k != "version") {
        return Err(bad(&format!(
            "unknown key {other:?}: only \"version\" is read"
        )));
    }
    match object.get("version") {
        Some(Value::Null) => Ok(None),
        Some(Value::String(v)) if is_valid_version(v) => Ok(Some(v.clone())),
        Some(Value::String(v)) => Err(invalid_version(v)),
        Some(_) => Err(bad("\"version\" must be a string or null")),
        None => Err(bad(
            r#"the body must name "version" (a string, or null to clear the target)"#,
        )),
    }
}

/// `PUT /admin/v1/ota/target` (`store` is `None`) and `PUT /admin/v1/stores/{store}/ota`.
pub fn set_target(hub: &HubStore, store: Option<&str>, body: &[u8]) -> Response<Body> {
    let version = match target_version(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    match hub.ota_set_target(store, version.as_deref()) {
        Ok(true) => {}
        Ok(false) => return unknown_bundle(version.as_deref().unwrap_or_default()),
        Err(e) => return internal(e),
    }
    let scope = store.map_or("the fleet".to_owned(), |s| format!("store {s}"));
    match &version {
        Some(v) => tracing::info!("firmware target of {scope}: {v}"),
        None => tracing::info!("firmware target of {scope} cleared"),
    }
    match store {
        Some(store) => store_view(hub, store),
        None => h::json(StatusCode::OK, &json!({ "fleet_target": version })),
    }
}

/// One store's firmware state as the admin API shows it. `reports` adds the history.
fn store_json(
    store: &str,
    fleet: Option<&str>,
    own: Option<&str>,
    bundles: &std::collections::BTreeMap<String, BundleMeta>,
    state: &BoxOta,
    reports: bool,
) -> Value {
    let report_json = |r: &StoredReport| {
        json!({
            "event": r.event,
            "version": r.version,
            "reason": r.reason,
            "running": r.running,
            "at": rfc3339(r.at.saturating_mul(1000)),
            "received_at": rfc3339(r.received_at_ms),
        })
    };
    let (effective, source) = match (own, fleet) {
        (Some(v), _) => (Some(v), "store"),
        (None, Some(v)) => (Some(v), "fleet"),
        (None, None) => (None, ""),
    };
    let target = effective.map(|v| {
        let bundle = bundles.get(v);
        json!({
            "version": v,
            "source": source,
            "size": bundle.map(|b| b.size),
            "sha256": bundle.map(|b| b.sha256.as_str()),
        })
    });
    let check = state.last_check.as_ref();
    let on_target = match (effective, check) {
        (Some(v), Some(c)) => Some(c.running == v),
        _ => None,
    };
    let mut doc = json!({
        "store": store,
        "target": target,
        "store_target": own,
        "running": check.map(|c| c.running.as_str()),
        "compatible": check.map(|c| c.compatible.as_str()),
        "slot": check.map(|c| c.slot.as_str()),
        "last_check": check.map(|c| rfc3339(c.at_ms)),
        "on_target": on_target,
        "last_report": state.reports.last().map(report_json),
    });
    if reports {
        doc["reports"] = state.reports.iter().rev().map(report_json).collect();
    }
    doc
}

type Targets = (
    Option<String>,
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, BundleMeta>,
);

fn targets_and_bundles(hub: &HubStore) -> Result<Targets, crate::store::StoreError> {
    let (fleet, stores) = hub.ota_targets()?;
    let bundles = hub.ota_bundles()?.into_iter().collect();
    Ok((fleet, stores, bundles))
}

/// `GET /admin/v1/stores/{store}/ota`: the store's effective target, what its box runs, and
/// its last reports (newest first, at most
/// [`crate::store::ota::REPORT_HISTORY`]).
pub fn store_view(hub: &HubStore, store: &str) -> Response<Body> {
    let result = targets_and_bundles(hub).and_then(|t| Ok((t, hub.ota_box(store)?)));
    match result {
        Ok(((fleet, stores, bundles), state)) => h::json(
            StatusCode::OK,
            &store_json(
                store,
                fleet.as_deref(),
                stores.get(store).map(String::as_str),
                &bundles,
                &state,
                true,
            ),
        ),
        Err(e) => internal(e),
    }
}

/// `GET /admin/v1/ota`: the fleet default and every configured store's state.
pub fn fleet_view(hub: &HubStore, config: &HubConfig) -> Response<Body> {
    let (fleet, stores, bundles) = match targets_and_bundles(hub) {
        Ok(t) => t,
        Err(e) => return internal(e),
    };
    let mut list = Vec::with_capacity(config.stores.len());
    for store in &config.stores {
        let state = match hub.ota_box(&store.id) {
            Ok(s) => s,
            Err(e) => return internal(e),
        };
        list.push(store_json(
            &store.id,
            fleet.as_deref(),
            stores.get(&store.id).map(String::as_str),
            &bundles,
            &state,
            false,
        ));
    }
    h::json(
        StatusCode::OK,
        &json!({ "fleet_target": fleet, "stores": list }),
    )
}

/// Reads a target call's small JSON body.
pub async fn read_target_body(body: Incoming) -> Result<Bytes, Response<Body>> {
    h::read_body(body, MAX_TARGET_BODY).await
}

// ---------------------------------------------------------------------------------------
// Sync calls.

fn bad_request(e: impl std::fmt::Display) -> Response<Body> {
    h::error(StatusCode::BAD_REQUEST, "bad_request", e)
}

/// Decodes a check or a report like every sync message (one zstd frame of postcard), under
/// a limit fitting a few short strings.
fn decode<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &'static str,
) -> Result<T, Response<Body>> {
    let raw = proto::decompress(body, MAX_OTA_DECODED).map_err(bad_request)?;
    proto::decode_plain(&raw, what).map_err(bad_request)
}

fn check_field(name: &str, value: &str) -> Result<(), Response<Body>> {
    if value.len() > MAX_FIELD_BYTES {
        return Err(bad_request(format!(
            "{name} is longer than {MAX_FIELD_BYTES} bytes"
        )));
    }
    Ok(())
}

/// `POST /sync/v2/ota`: records what the box runs and answers the [`ota::OtaOffer`]. Blocking.
pub fn check(
    hub: &HubStore,
    zstd_level: i32,
    store: &str,
    body: &[u8],
) -> Result<Vec<u8>, Response<Body>> {
    let check: ota::OtaCheck = decode(body, "a firmware check")?;
    check_field("running", &check.running)?;
    check_field("compatible", &check.compatible)?;
    check_field("slot", &check.slot)?;
    let now = crate::now_ms();
    hub.note_contact(store, now, None, None).map_err(internal)?;
    hub.ota_note_check(store, &check, now).map_err(internal)?;
    let target = hub
        .ota_effective_target(store)
        .map_err(internal)?
        // A box already running the target has nothing to do. Plain equality: the hub offers
        // what it was told, and the box refuses a downgrade it was not asked for.
        .filter(|t| t.version != check.running)
        .map(|t| -> Result<ota::OtaTarget, Response<Body>> {
            let digest = crate::pki::hex_decode(&t.bundle.sha256)
                .and_then(|d| <[u8; 32]>::try_from(d).ok())
                .ok_or_else(|| internal(format!("bundle {}: a damaged digest", t.version)))?;
            Ok(ota::OtaTarget {
                version: t.version,
                size: t.bundle.size,
                sha256: digest,
            })
        })
        .transpose()?;
    proto::encode(&ota::OtaOffer { target }, zstd_level).map_err(internal)
}

/// `POST /sync/v2/ota/report`: keeps the report for the admin view. Blocking.
pub fn report(hub: &HubStore, store: &str, body: &[u8]) -> Result<(), Response<Body>> {
    let mut report: ota::OtaReport = decode(body, "a firmware report")?;
    check_field("running", &report.running)?;
    let (version, reason) = match &mut report.event {
        ota::OtaEvent::Downloaded { version }
        | ota::OtaEvent::Installed { version }
        | ota::OtaEvent::Healthy { version } => (version.clone(), None),
        ota::OtaEvent::Failed { version, reason }
        | ota::OtaEvent::RolledBack { version, reason } => {
            if reason.len() > MAX_REASON_BYTES {
                let mut cut = MAX_REASON_BYTES;
                while !reason.is_char_boundary(cut) {
                    cut -= 1;
                }
                reason.truncate(cut);
            }
            (version.clone(), Some(reason.clone()))
        }
    };
    check_field("version", &version)?;
    let now = crate::now_ms();
    let stored = StoredReport::new(&report, now);
    match reason {
        Some(reason) => tracing::warn!(
            "store {store}: firmware {version} {} (running {}): {reason}",
            stored.event.replace('_', " "),
            report.running
        ),
        None => tracing::info!(
            "store {store}: firmware {version} {} (running {})",
            stored.event,
            report.running
        ),
    }
    hub.ota_note_report(store, stored).map_err(internal)?;
    hub.note_contact(store, now, None, None).map_err(internal)?;
    Ok(())
}

/// The version a bundle download asks for, when `path` is one.
pub fn bundle_version(path: &str) -> Option<&str> {
    path.strip_prefix(ota::PATH_OTA_BUNDLE)?.strip_prefix('/')
}

/// What a `Range` header asks of a file of `size` bytes (not 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    Whole,
    /// From `start` to `end`, both included.
    Part {
        start: u64,
        end: u64,
    },
    Unsatisfiable,
}

/// Reads a `Range` header: one range of bytes, `N-`, `N-M` or `-N` (the last N bytes). A
/// header the hub does not understand (another unit, several ranges, bad syntax) is ignored
/// and the whole file is served, as HTTP allows.
pub fn parse_range(header: Option<&str>, size: u64) -> RangeAsk {
    let Some(header) = header else {
        return RangeAsk::Whole;
    };
    let header = header.trim();
    let Some(spec) = header
        .get(..6)
        .filter(|unit| unit.eq_ignore_ascii_case("bytes="))
        .and_then(|_| header.get(6..))
    else {
        return RangeAsk::Whole;
    };
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeAsk::Whole;
    };
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().ok())
            .flatten()
    };
    match (first.trim(), last.trim()) {
        ("", suffix) => match number(suffix) {
            Some(0) => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part {
                start: size.saturating_sub(n),
                end: size - 1,
            },
            None => RangeAsk::Whole,
        },
        (start, "") => match number(start) {
            Some(start) if start < size => RangeAsk::Part {
                start,
                end: size - 1,
            },
            Some(_) => RangeAsk::Unsatisfiable,
            None => RangeAsk::Whole,
        },
        (start, end) => match (number(start), number(end)) {
            (Some(start), Some(end)) if start <= end => {
                if start >= size {
                    RangeAsk::Unsatisfiable
                } else {
                    RangeAsk::Part {
                        start,
                        end: end.min(size - 1),
                    }
                }
            }
            _ => RangeAsk::Whole,
        },
    }
}

/// A download's body: chunks read from disk by a task of its own, a few ahead of the box.
/// When the box goes away hyper drops the body, the task's next send fails and it stops.
pub struct FileBody {
    chunks: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    remaining: u64,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = std::io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, std::io::Error>>> {
        match self.chunks.poll_recv(cx) {
            Poll::Ready(Some(Ok(chunk))) => {
                self.remaining = self.remaining.saturating_sub(chunk.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(chunk))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

/// Streams `len` bytes of `file` from `start`. A read error, or a file shorter than its
/// record says, ends the body with an error, so the box sees a cut download (and resumes)
/// rather than a short one.
fn stream_file(mut file: tokio::fs::File, start: u64, len: u64) -> FileBody {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    // An async task, not a blocking thread: a slow box holds its download for half an hour,
    // and a fleet updating at once must not exhaust the blocking pool the other calls use.
    tokio::spawn(async move {
        if let Err(e) = file.seek(std::io::SeekFrom::Start(start)).await {
            let _ = tx.send(Err(e)).await;
            return;
        }
        let mut left = len;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let mut buf = vec![0u8; n];
            if let Err(e) = file.read_exact(&mut buf).await {
                tracing::error!("reading a firmware bundle: {e}");
                let _ = tx.send(Err(e)).await;
                return;
            }
            if tx.send(Ok(Bytes::from(buf))).await.is_err() {
                // The box went away; it resumes with a Range later.
                return;
            }
            left -= n as u64;
        }
    });
    FileBody {
        chunks: rx,
        remaining: len,
    }
}

/// `GET /sync/v2/ota/bundle/{version}`: the bundle of the calling store's effective target,
/// whole or from a `Range`.
///
/// How long a download may take: the sync listener's header timeout covers only the TLS
/// handshake and the request's head. Its idle timeout (`SYNC_IDLE_TIMEOUT` in `main.rs`, 15
/// minutes) closes a connection only when no byte has moved on it for that long, and a
/// download moves bytes as the box reads (a request counts as in flight only until its
/// answer's head is sent; then the bytes keep it open). So a 100 MB download at a low rate
/// cap runs for as long as it needs, and only a box that stops reading for 15 minutes loses
/// its connection; it resumes with `Range`. The connection age limit (a sixth of the
/// certificate lifetime) closes gracefully: the download in progress finishes first, and the
/// box's next request opens a new connection. The certificate was checked when the download
/// began.
pub async fn serve_bundle(
    hub: &Arc<HubStore>,
    config: &HubConfig,
    store: &str,
    version: &str,
    req: &Request<Incoming>,
) -> Response<SyncBody> {
    let left = |r: Response<Body>| r.map(Either::Left);
    if req.method() != Method::GET {
        return left(h::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "bundles are downloaded with GET",
        ));
    }
    let not_offered = || {
        left(h::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("bundle {version:?} is not this store's firmware target"),
        ))
    };
    if !is_valid_version(version) {
        return not_offered();
    }
    let target = {
        let hub = hub.clone();
        let store = store.to_owned();
        tokio::task::spawn_blocking(move || hub.ota_effective_target(&store)).await
    };
    // A box may download only what it is asked to run: bundles are not a public store.
    let bundle = match target {
        Ok(Ok(Some(t))) if t.version == version => t.bundle,
        Ok(Ok(_)) => return not_offered(),
        Ok(Err(e)) => return left(internal(e)),
        Err(e) => return left(internal(e)),
    };
    let path = config.ota_dir().join(&bundle.file);
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => return left(internal(format!("opening {}: {e}", path.display()))),
    };
    match file.metadata().await {
        Ok(m) if m.len() == bundle.size => {}
        Ok(m) => {
            return left(internal(format!(
                "{} holds {} bytes, its record says {}",
                path.display(),
                m.len(),
                bundle.size
            )))
        }
        Err(e) => return left(internal(format!("reading {}: {e}", path.display()))),
    }
    let etag = format!("\"{}\"", bundle.sha256);
    let header_text =
        |name: header::HeaderName| req.headers().get(name).and_then(|v| v.to_str().ok());
    // A resumed download names the bundle it began; a different one is sent whole.
    let same_bundle = header_text(header::IF_RANGE).is_none_or(|v| v.trim() == etag);
    let range = if same_bundle {
        parse_range(header_text(header::RANGE), bundle.size)
    } else {
        RangeAsk::Whole
    };
    let builder = Response::builder()
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::ETAG, &etag);
    let (builder, start, len) = match range {
        RangeAsk::Whole => (builder.status(StatusCode::OK), 0, bundle.size),
        RangeAsk::Part { start, end } => (
            builder.status(StatusCode::PARTIAL_CONTENT).header(
                header::CONTENT_RANGE,
                format!("bytes {start}-{end}/{}", bundle.size),
            ),
            start,
            end - start + 1,
        ),
        RangeAsk::Unsatisfiable => {
            let mut r = h::error(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("the bundle has {} bytes", bundle.size),
            );
            if let Ok(v) = format!("bytes */{}", bundle.size).parse() {
                r.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return left(r);
        }
    };
    builder
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len)
        .body(Either::Right(stream_file(file, start, len)))
        .unwrap_or_else(|e| left(internal(format!("building a bundle answer: {e}"))))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ranges_are_read_as_http_says() {
        use RangeAsk::*;
        let r = |h: &str| parse_range(Some(h), 1000);
        assert_eq!(parse_range(None, 1000), Whole);
        assert_eq!(r("bytes=0-"), Part { start: 0, end: 999 });
        assert_eq!(
            r("bytes=100-"),
            Part {
                start: 100,
                end: 999
            }
        );
        assert_eq!(
            r("bytes=100-199"),
            Part {
                start: 100,
                end: 199
            }
        );
        assert_eq!(
            r("Bytes=100-5000"),
            Part {
                start: 100,
                end: 999
            }
        );
        assert_eq!(
            r("bytes=-10"),
            Part {
                start: 990,
                end: 999
            }
        );
        assert_eq!(r("bytes=-5000"), Part { start: 0, end: 999 });
        assert_eq!(
            r("bytes=999-"),
            Part {
                start: 999,
                end: 999
            }
        );
        assert_eq!(r("bytes=1000-"), Unsatisfiable);
        assert_eq!(r("bytes=1000-2000"), Unsatisfiable);
        assert_eq!(r("bytes=-0"), Unsatisfiable);
        // What the hub does not understand is ignored: the whole file.
        assert_eq!(r("bytes=5-1"), Whole);
        assert_eq!(r("bytes=0-1,5-6"), Whole);
        assert_eq!(r("items=0-1"), Whole);
        assert_eq!(r("bytes=+1-"), Whole);
        assert_eq!(r("bytes=x-"), Whole);
        assert_eq!(r("bytes"), Whole);
    }

    #[tokio::test]
    async fn an_upload_is_hashed_on_the_way_and_refused_past_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let body = http_body_util::Full::new(Bytes::from(data.clone()));
        let got = receive(body, dir.path(), 200_000).await.unwrap();
        assert_eq!(got.size, 200_000);
        assert_eq!(hex(&got.sha256), crate::sha256_hex(&data));
        assert_eq!(std::fs::read(&got.temp).unwrap(), data);

        let body = http_body_util::Full::new(Bytes::from(data));
        let err = receive(body, dir.path(), 199_999).await.unwrap_err();
        assert!(matches!(err, ReceiveError::TooLarge { limit: 199_999 }));
        let body = http_body_util::Full::new(Bytes::new());
        assert!(matches!(
            receive(body, dir.path(), 10).await.unwrap_err(),
            ReceiveError::Empty
        ));
        // Only the first upload's file is left; the refused ones removed theirs.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn leftovers_are_removed_at_start_and_recorded_bundles_kept() {
        let dir = tempfile::tempdir().unwrap();
        let hub = HubStore::open(&dir.path().join("db")).unwrap();
        let ota_dir = dir.path().join("ota");
        std::fs::create_dir_all(&ota_dir).unwrap();
        let received = Received {
            temp: ota_dir.join(".upload-1.part"),
            size: 3,
            sha256: [7; 32],
        };
        std::fs::write(&received.temp, b"abc").unwrap();
        let (outcome, meta) = commit_upload(&hub, &ota_dir, "1.0.0", &received).unwrap();
        assert_eq!(outcome, PutBundle::Created);
        std::fs::write(ota_dir.join(".upload-2.part"), b"half").unwrap();
        std::fs::write(ota_dir.join("0.9.0@00.raucb"), b"orphan").unwrap();
        prepare(&ota_dir, &hub).unwrap();
        let left: Vec<String> = std::fs::read_dir(&ota_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, [meta.file]);
    }
}
