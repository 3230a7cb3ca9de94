//! The till-facing HTTP API on the shop LAN: lookups from local data, activity posts, status,
//! and sync on demand. Documented for integrators in `docs/TILL_API.md`.
//!
//! Invariant: no route waits on the hub. Lookups read the local database; an activity post
//! waits only for its own durable commit; `POST /v1/sync/*` is the one exception, and only
//! the caller who asked for a sync waits for it.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::{json, Value};
use storebox_http::{self as h, Body};
use storebox_protocol as proto;

use crate::activity::{Activity, Stored};
use crate::storage::{BoxStore, StoredEvent};
use crate::sync::link::Process;
use crate::sync::SyncEngine;

/// What the LAN listener needs.
pub struct LanState {
    pub store_id: String,
    pub store: Arc<BoxStore>,
    pub activity: Arc<Activity>,
    pub sync: Arc<SyncEngine>,
    pub max_activity_bytes: usize,
    pub started: std::time::Instant,
    pub pairing: Arc<crate::pairing::Pairing>,
    /// SHA-256 of the LAN TLS certificate, when the API is served over TLS.
    pub fingerprint: Option<String>,
    /// Firmware updates.
    pub ota: Arc<crate::ota::OtaTask>,
    /// When the daemon started, wall clock, for the health check (hub contact since then).
    pub started_ms: i64,
    /// Activity posts being handled, and when the last one arrived: the safe moment for a
    /// reboot is when no sale is in flight.
    pub activity_in_flight: std::sync::atomic::AtomicU64,
    pub last_activity_ms: std::sync::atomic::AtomicI64,
    /// Until when activity posts are turned away because the box is about to reboot.
    pub closing_until_ms: std::sync::atomic::AtomicI64,
}

/// Largest body of a pairing or till-management call.
const MAX_SMALL_BODY: usize = 4 * 1024;

/// Who may call a route.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anyone on the LAN: the status page and document, metrics, asking to pair.
    Open,
    /// A paired till (or a technician): lookups, activity.
    Till,
    /// A technician: sync triggers, pairing management.
    Technician,
}

fn access(method: &Method, segs: &[&str]) -> Access {
    match (method, segs) {
        (&Method::GET, [""] | ["update"] | ["metrics"] | ["v1", "status"]) => Access::Open,
        (&Method::POST, ["v1", "pair"]) | (&Method::GET, ["v1", "pair", _]) => Access::Open,
        (_, ["v1", "sync", ..] | ["v1", "tills", ..] | ["v1", "ota", ..]) => Access::Technician,
        _ => Access::Till,
    }
}

/// Checks the caller's token against the route's access; the refusal is a JSON 401 or 403.
fn authorize(
    state: &LanState,
    req: &Request<Incoming>,
    needed: Access,
) -> Result<(), Response<Body>> {
    if needed == Access::Open {
        return Ok(());
    }
    let role = h::bearer(req).and_then(|t| state.pairing.authorize(t));
    match (needed, role) {
        (_, None) => Err(h::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this till is not paired: POST /v1/pair with its name, have a manager confirm the code, then send Authorization: Bearer <token>",
        )),
        (Access::Technician, Some(crate::pairing::Role::Till)) => Err(h::error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this call needs a technician credential (storebox pair --technician)",
        )),
        _ => Ok(()),
    }
}

/// Lookup aliases: `/v1/{module}/by-{alias}/{value}` reads the index of `field`.
const ALIASES: &[(&str, &str, &str)] = &[
    ("catalog", "by-ean", "ean13"),
    ("customers", "by-card", "loyalty_card"),
];

/// Answers one request from a till, timing it into the latency histogram of `/metrics`.
pub async fn handle(state: Arc<LanState>, req: Request<Incoming>) -> Response<Body> {
    let started = std::time::Instant::now();
    let route_class = crate::metrics::Route::classify(req.method(), req.uri().path());
    let response = route(state, req).await;
    crate::metrics::global().observe_request(route_class, response.status(), started.elapsed());
    response
}

async fn route(state: Arc<LanState>, req: Request<Incoming>) -> Response<Body> {
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let segments = h::path_segments(&path);
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    if let Err(refused) = authorize(&state, &req, access(&method, &segs)) {
        return refused;
    }
    match (&method, segs.as_slice()) {
        (&Method::GET, [""]) => crate::statuspage::page(&state),
        (&Method::GET, ["update"]) => crate::statuspage::update_page(),
        (&Method::POST, ["v1", "pair"]) => pair_request(&state, req.into_body()).await,
        (&Method::GET, ["v1", "pair", request]) => pair_poll(&state, request),
        (&Method::GET, ["v1", "tills"]) => tills(&state),
        (&Method::POST, ["v1", "tills", "confirm"]) => confirm(&state, req.into_body()).await,
        (&Method::DELETE, ["v1", "tills", id]) => unpair(&state, id),
        (&Method::GET, ["metrics"]) => crate::metrics::page(&state),
        (&Method::GET, ["v1", "status"]) => h::json(StatusCode::OK, &status(&state)),
        (&Method::POST, ["v1", "activity"]) => post_activity(&state, req.into_body()).await,
        (&Method::GET, ["v1", "ota"]) => h::json(StatusCode::OK, &ota_doc(&state)),
        (&Method::PUT, ["v1", "ota", "bundle"]) => ota_upload(&state, req).await,
        (&Method::DELETE, ["v1", "ota", "bundle"]) => ota_discard(&state),
        (&Method::POST, ["v1", "ota", "install"]) => ota_install(&state, req.into_body()).await,
        (&Method::POST, ["v1", "ota", "quiesce"]) => ota_quiesce(&state).await,
        (&Method::POST, ["v1", "sync", "full"]) => {
            let report = state.sync.full_now().await;
            h::json(StatusCode::OK, &report)
        }
        (&Method::POST, ["v1", "sync", "delta"]) => {
            let report = state.sync.delta_now().await;
            h::json(StatusCode::OK, &report)
        }
        (&Method::GET, ["v1", "config"]) => config(&state),
        (&Method::GET, ["v1", "promotions"]) => promotions(&state, query.as_deref()),
        (&Method::GET, ["v1", module, "by", field, value]) => lookup(&state, module, field, value),
        (&Method::GET, ["v1", module, alias, value]) if alias.starts_with("by-") => {
            match ALIASES.iter().find(|(m, a, _)| m == module && a == alias) {
                Some((_, _, field)) => lookup(&state, module, field, value),
                None => not_found("no_route", format!("no lookup {alias} for module {module}")),
            }
        }
        (&Method::GET, ["v1", module, id]) => get_record(&state, module, id),
        (_, ["v1", ..]) if method != Method::GET && method != Method::POST => h::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        ),
        _ => not_found("no_route", format!("no route {method} {path}")),
    }
}

fn pairing_error(e: crate::pairing::PairingError) -> Response<Body> {
    use crate::pairing::PairingError as E;
    match e {
        E::Invalid(m) => h::error(StatusCode::BAD_REQUEST, "bad_request", m),
        E::NotFound(m) => h::error(StatusCode::NOT_FOUND, "not_found", m),
        e @ E::TooMany => h::error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e),
        E::Storage(e) => storage_error(format!("{e:#}")),
    }
}

/// `POST /v1/pair {"name"}`: a till asks to pair.
async fn pair_request(state: &LanState, body: Incoming) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Ask {
        name: String,
    }
    let body = match h::read_body(body, MAX_SMALL_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ask: Ask = match h::parse_json(&body) {
        Ok(a) => a,
        Err(r) => return r,
    };
    match state.pairing.request(&ask.name) {
        Ok(pending) => {
            tracing::info!(
                "till {:?} asks to pair, code {}",
                pending.name,
                pending.code
            );
            h::json(
                StatusCode::ACCEPTED,
                &json!({
                    "request": crate::pairing::Pairing::request_id(&pending),
                    "code": pending.code,
                    "expires_at": rfc3339(Some(pending.expires_ms)),
                }),
            )
        }
        Err(e) => pairing_error(e),
    }
}

/// `GET /v1/pair/{request}`: 202 while waiting, 200 with the token once (then 404).
fn pair_poll(state: &LanState, request: &str) -> Response<Body> {
    use crate::pairing::Poll;
    match state.pairing.poll(request) {
        Ok(Poll::Pending { expires_ms }) => h::json(
            StatusCode::ACCEPTED,
            &json!({"state": "pending", "expires_at": rfc3339(Some(expires_ms))}),
        ),
        Ok(Poll::Paired { token, till_id }) => h::json(
            StatusCode::OK,
            &json!({"state": "paired", "till": till_id, "token": token}),
        ),
        Ok(Poll::Unknown) => not_found(
            "not_found",
            "no such pairing request (expired, already answered, or never made)",
        ),
        Err(e) => pairing_error(e),
    }
}

/// `GET /v1/tills` (technician): paired tills and pending requests.
fn tills(state: &LanState) -> Response<Body> {
    match state.pairing.list() {
        Ok((tills, pending)) => h::json(
            StatusCode::OK,
            &json!({
                "tills": tills.iter().map(|t| json!({
                    "id": t.id, "name": t.name, "role": t.role,
                    "paired_at": rfc3339(Some(t.paired_ms)),
                })).collect::<Vec<_>>(),
                "pending": pending.iter().map(|p| json!({
                    "name": p.name, "code": p.code, "expires_at": rfc3339(Some(p.expires_ms)),
                })).collect::<Vec<_>>(),
            }),
        ),
        Err(e) => storage_error(format!("{e:#}")),
    }
}

/// `POST /v1/tills/confirm {"code"}` (technician): a manager confirms a pairing.
async fn confirm(state: &LanState, body: Incoming) -> Response<Body> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Confirm {
        code: String,
    }
    let body = match h::read_body(body, MAX_SMALL_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let confirm: Confirm = match h::parse_json(&body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match state.pairing.confirm(&confirm.code) {
        Ok(till) => h::json(StatusCode::OK, &json!({"till": till.id, "name": till.name})),
        Err(e) => pairing_error(e),
    }
}

/// `DELETE /v1/tills/{id}` (technician): unpairs a till; its token is refused at once.
fn unpair(state: &LanState, id: &str) -> Response<Body> {
    match state.pairing.unpair(id) {
        Ok(n) => h::json(StatusCode::OK, &json!({"unpaired": n})),
        Err(e) => pairing_error(e),
    }
}

fn not_found(kind: &str, message: impl std::fmt::Display) -> Response<Body> {
    h::error(StatusCode::NOT_FOUND, kind, message)
}

fn storage_error(e: impl std::fmt::Display) -> Response<Body> {
    tracing::error!("till API: {e}");
    h::error(StatusCode::INTERNAL_SERVER_ERROR, "storage", e)
}

fn raw_json(text: String) -> Response<Body> {
    Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Body::new(Bytes::from(text)))
        .unwrap_or_else(storage_error)
}

fn known_module(state: &LanState, module: &str) -> Result<(), Response<Body>> {
    match state.store.modules() {
        Ok(modules) if modules.contains_key(module) => Ok(()),
        Ok(_) => Err(not_found(
            "unknown_module",
            format!("no module {module:?} on this box (yet)"),
        )),
        Err(e) => Err(storage_error(e)),
    }
}

fn get_record(state: &LanState, module: &str, id: &str) -> Response<Body> {
    match state.store.get(module, id) {
        Ok(Some(json)) => raw_json(json),
        Ok(None) => {
            if let Err(r) = known_module(state, module) {
                return r;
            }
            not_found("not_found", format!("no record {id:?} in {module}"))
        }
        Err(e) => storage_error(e),
    }
}

fn lookup(state: &LanState, module: &str, field: &str, value: &str) -> Response<Body> {
    match state.store.get_by(module, field, value) {
        Ok(Some(json)) => raw_json(json),
        Ok(None) => {
            if let Err(r) = known_module(state, module) {
                return r;
            }
            not_found(
                "not_found",
                format!("no record with {field} = {value:?} in {module}"),
            )
        }
        Err(e) => storage_error(e),
    }
}

fn config(state: &LanState) -> Response<Body> {
    let records = match state.store.all("config") {
        Ok(r) => r,
        Err(e) => return storage_error(e),
    };
    let mut out = serde_json::Map::new();
    for (id, json) in records {
        if let Ok(value) = serde_json::from_str::<Value>(&json) {
            out.insert(id, value);
        }
    }
    h::json(StatusCode::OK, &Value::Object(out))
}

fn promotions(state: &LanState, query: Option<&str>) -> Response<Body> {
    let at = match h::query_param(query, "active_at") {
        None => None,
        Some(text) => match chrono::DateTime::parse_from_rfc3339(&text) {
            Ok(t) => Some(t),
            Err(e) => {
                return h::error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    format!("active_at {text:?} is not an RFC 3339 time: {e}"),
                )
            }
        },
    };
    let records = match state.store.all("promotions") {
        Ok(r) => r,
        Err(e) => return storage_error(e),
    };
    let mut out = Vec::new();
    for (_, json) in records {
        let Ok(value) = serde_json::from_str::<Value>(&json) else {
            continue;
        };
        if let Some(at) = at {
            let bound = |name: &str| {
                value
                    .get(name)
                    .and_then(Value::as_str)
                    .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
            };
            // A promotion without a readable window is not shown as active: better a missed
            // discount than one applied outside its dates.
            match (bound("start"), bound("end")) {
                (Some(start), Some(end)) if start <= at && at < end => {}
                _ => continue,
            }
        }
        out.push(value);
    }
    h::json(StatusCode::OK, &json!({ "promotions": out }))
}

async fn post_activity(state: &LanState, body: Incoming) -> Response<Body> {
    let now = chrono::Utc::now().timestamp_millis();
    if now < state.closing_until_ms.load(Ordering::SeqCst) {
        let mut r = h::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "restarting",
            "the box is restarting for a software update: keep the event and post it again in a minute",
        );
        r.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("60"),
        );
        return r;
    }
    state.last_activity_ms.store(now, Ordering::SeqCst);
    state.activity_in_flight.fetch_add(1, Ordering::SeqCst);
    let response = store_activity(state, body).await;
    state.activity_in_flight.fetch_sub(1, Ordering::SeqCst);
    response
}

async fn store_activity(state: &LanState, body: Incoming) -> Response<Body> {
    let body = match h::read_body(body, state.max_activity_bytes).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    // Depth-limited: a deeply nested body is refused before it is parsed.
    let value: Value = match h::parse_json(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    let record = match proto::canonical_record(&value) {
        Ok(r) => r,
        Err(e) => return h::error(StatusCode::BAD_REQUEST, "bad_event", e),
    };
    let event = StoredEvent {
        id: record.id.clone(),
        received_at_ms: chrono::Utc::now().timestamp_millis(),
        event: record.json,
    };
    match state.activity.store(event).await {
        Ok(Stored::New { seq }) => {
            state.sync.push_wake.notify_one();
            h::json(
                StatusCode::CREATED,
                &json!({"id": record.id, "seq": seq, "stored": "new"}),
            )
        }
        Ok(Stored::Duplicate { seq }) => h::json(
            StatusCode::OK,
            &json!({"id": record.id, "seq": seq, "stored": "duplicate"}),
        ),
        Err(e) => {
            tracing::error!("activity {:?} not stored: {e}", record.id);
            h::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_stored",
                format!("the event was not stored, post it again: {e}"),
            )
        }
    }
}

fn rfc3339(ms: Option<i64>) -> Value {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
        .map(|t| Value::String(t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)))
        .unwrap_or(Value::Null)
}

/// The status document of `GET /v1/status`.
pub fn status(state: &LanState) -> Value {
    let now = chrono::Utc::now().timestamp_millis();
    let mut modules = BTreeMap::new();
    let mut stored = state.store.modules().unwrap_or_else(|e| {
        tracing::error!("status: {e}");
        BTreeMap::new()
    });
    // A module the hub failed before the box ever received it has no stored state; it is
    // shown all the same, empty, with its error.
    for name in state.sync.live.module_names() {
        stored.entry(name).or_default();
    }
    for (name, m) in &stored {
        let live = state.sync.live.module(name);
        // The first few quarantined records, so a technician sees what to fix at the hub.
        let quarantine: Vec<Value> = if m.quarantined > 0 {
            state
                .store
                .quarantined(name)
                .unwrap_or_default()
                .into_iter()
                .take(20)
                .map(|(id, reason)| json!({"id": id, "reason": reason}))
                .collect()
        } else {
            Vec::new()
        };
        let last_delta = live.last_delta_ok_ms.max(m.last_delta_ok_ms);
        let last_full = live.last_full_ok_ms.max(m.last_full_ok_ms);
        let last_ok = last_delta.max(last_full);
        modules.insert(
            name.clone(),
            json!({
                "records": m.records,
                "cursor": m.cursor,
                "quarantined": m.quarantined,
                "quarantine": quarantine,
                "last_delta_ok": rfc3339(last_delta),
                "last_full_ok": rfc3339(last_full),
                "last_error": live.last_error,
                "data_age_s": last_ok.map(|t| (now - t).max(0) / 1000),
            }),
        );
    }
    let pending = state.activity.pending();
    let journal = state.activity.stats();
    let tables = state.store.table_bytes().unwrap_or_else(|e| {
        tracing::error!("status: {e}");
        BTreeMap::new()
    });
    let link = state.sync.live.link();
    let wire = state.sync.wire();
    let bytes: BTreeMap<_, _> = Process::ALL
        .into_iter()
        .map(|p| {
            let b = wire.process(p);
            (
                p.name(),
                json!({
                    "sent": b.sent.load(Ordering::Relaxed),
                    "received": b.received.load(Ordering::Relaxed),
                    "requests": b.requests.load(Ordering::Relaxed),
                }),
            )
        })
        .collect();
    let socket_sent = wire.socket.sent.load(Ordering::Relaxed);
    let socket_received = wire.socket.received.load(Ordering::Relaxed);
    let body_sent: u64 = bytes.values().filter_map(|b| b["sent"].as_u64()).sum();
    let body_received: u64 = bytes.values().filter_map(|b| b["received"].as_u64()).sum();
    json!({
        "store_id": state.store_id,
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": state.started.elapsed().as_secs(),
        "ota": ota_doc(state),
        "modules": modules,
        "activity": {
            "pending": pending.pending,
            "pushed": pending.pushed_through,
            "oldest_pending_age_s": pending.oldest_pending_ms.map(|t| (now - t).max(0) / 1000),
        },
        "hub": {
            "state": link.state,
            "last_ok": rfc3339(link.last_ok_ms),
            "last_error": link.last_error,
        },
        // Request and answer bodies per process; the socket's own count, TLS and HTTP/2
        // included, is in "wire".
        "bytes": bytes,
        "wire": {
            "sent": socket_sent,
            "received": socket_received,
            "overhead": {
                "sent": socket_sent.saturating_sub(body_sent),
                "received": socket_received.saturating_sub(body_received),
            },
            "connections": wire.connections.load(Ordering::Relaxed),
            "resumed_connections": wire.resumed.load(Ordering::Relaxed),
            "watching": state.sync.watching(),
            "modules": wire.modules(),
        },
        "storage": {
            "process_write_bytes": process_write_bytes(),
            "journal": journal,
            "table_bytes": tables,
        },
        "last_full_sync": state.sync.live.last_full(),
        "full_sync_schedule": full_sync_schedule(&state.sync),
        "lan_tls": {
            "enabled": state.fingerprint.is_some(),
            "fingerprint": state.fingerprint,
        },
        "identity": identity_status(),
        "pairing": pairing_status(state),
    })
}

/// The daily full sync times in force ("HH:MM:SS", local) and where they come from:
/// "config", "hub" (the slot in the hub's fleet window) or "default".
fn full_sync_schedule(sync: &SyncEngine) -> Value {
    let (times, source) = sync.full_sync_schedule();
    let at: Vec<String> = times
        .iter()
        .map(|t| format!("{:02}:{:02}:{:02}", t.hour, t.minute, t.second))
        .collect();
    json!({"at": at, "source": source})
}

/// The box's client certificate towards the hub, for people and monitoring.
fn identity_status() -> Value {
    match crate::identity::installed().and_then(|i| i.certificate()) {
        Some((dates, fingerprint)) => json!({
            "enrolled": true,
            "certificate": fingerprint,
            "not_after": rfc3339(Some(dates.not_after_ms)),
            "renew_at": rfc3339(Some(dates.renew_at_ms())),
        }),
        None => json!({"enrolled": false}),
    }
}

/// Pending pairing codes (for the manager to compare with the till's) and the number of
/// paired tills. The codes alone pair nothing: a manager must confirm.
fn pairing_status(state: &LanState) -> Value {
    match state.pairing.list() {
        Ok((tills, pending)) => json!({
            "paired_tills": tills.iter().filter(|t| t.role == crate::pairing::Role::Till).count(),
            "pending": pending.iter().map(|p| json!({"name": p.name, "code": p.code})).collect::<Vec<_>>(),
        }),
        Err(e) => json!({"error": format!("{e:#}")}),
    }
}

/// Bytes this process caused to be written to storage (`write_bytes` of `/proc/self/io`):
/// the flash wear the box is responsible for. `None` where the kernel does not say.
pub fn process_write_bytes() -> Option<u64> {
    let io = std::fs::read_to_string("/proc/self/io").ok()?;
    io.lines()
        .find_map(|l| l.strip_prefix("write_bytes:"))
        .and_then(|v| v.trim().parse().ok())
}

// --- firmware updates ------------------------------------------------------------------

/// The `ota` block: the update state and the health verdict for a new slot.
pub fn ota_doc(state: &LanState) -> Value {
    let health = crate::ota::health(
        state.started,
        state.started_ms,
        state.sync.live.link().last_ok_ms,
        state.ota.settings.offline_grace,
    );
    crate::ota::status_doc(
        &state.ota.paths,
        &state.ota.image,
        &health,
        state.ota.target().as_ref(),
    )
}

/// `PUT /v1/ota/bundle` (technician): one chunk of a bundle, at most 16 MiB, placed by
/// `Content-Range: bytes START-END/TOTAL` (without it, the body is the whole bundle). A cut
/// upload resumes at the `received` of `GET /v1/ota`; a name for the status page may come in
/// `X-Bundle-Name`.
async fn ota_upload(state: &LanState, req: Request<Incoming>) -> Response<Body> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let range = header("content-range");
    let name = header("x-bundle-name").unwrap_or_else(|| "uploaded bundle".into());
    let placed = match range.as_deref() {
        Some(r) => parse_content_range(r),
        None => None,
    };
    let body = match h::read_body(req.into_body(), crate::ota::MAX_UPLOAD_CHUNK).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let (offset, total) = match (range, placed) {
        (None, _) => (0, body.len() as u64),
        (Some(_), Some((start, end, total))) if end + 1 - start == body.len() as u64 => {
            (start, total)
        }
        (Some(r), _) => {
            return h::error(
                StatusCode::BAD_REQUEST,
                "bad_range",
                format!("Content-Range {r:?} must be \"bytes START-END/TOTAL\" and match the body"),
            )
        }
    };
    let paths = state.ota.paths.clone();
    let outcome = tokio::task::spawn_blocking(move || {
        crate::ota::receive_chunk(&paths, &name, offset, total, &body)
    })
    .await;
    use crate::ota::UploadError as E;
    match outcome {
        Ok(Ok(received)) => h::json(
            StatusCode::OK,
            &json!({"received": received, "total": total}),
        ),
        Ok(Err(e @ E::Offset { received })) => h::json(
            StatusCode::CONFLICT,
            &json!({"error": "offset", "message": e.to_string(), "received": received}),
        ),
        Ok(Err(e @ E::Space(_))) => h::error(StatusCode::INSUFFICIENT_STORAGE, "no_space", e),
        Ok(Err(e @ (E::Busy(_) | E::TooLong { .. }))) => {
            h::error(StatusCode::CONFLICT, "refused", e)
        }
        Ok(Err(e @ E::Io(_))) => storage_error(e.to_string()),
        Err(e) => storage_error(e.to_string()),
    }
}

/// `bytes START-END/TOTAL`.
fn parse_content_range(text: &str) -> Option<(u64, u64, u64)> {
    let rest = text.trim().strip_prefix("bytes ")?;
    let (span, total) = rest.split_once('/')?;
    let (start, end) = span.split_once('-')?;
    let (start, end, total): (u64, u64, u64) = (
        start.trim().parse().ok()?,
        end.trim().parse().ok()?,
        total.trim().parse().ok()?,
    );
    (start <= end && end < total).then_some((start, end, total))
}

/// `DELETE /v1/ota/bundle` (technician): forgets a received bundle.
fn ota_discard(state: &LanState) -> Response<Body> {
    let paths = &state.ota.paths;
    let phase = crate::ota::read_state(paths).phase;
    if matches!(
        phase,
        crate::ota::Phase::Installing | crate::ota::Phase::Installed
    ) {
        return h::error(
            StatusCode::CONFLICT,
            "refused",
            "an update is being installed",
        );
    }
    crate::ota::discard(paths);
    let _ = std::fs::remove_file(paths.request());
    let _ = crate::ota::with_state(paths, |s| s.phase = crate::ota::Phase::Idle);
    h::json(StatusCode::OK, &json!({"discarded": true}))
}

/// `POST /v1/ota/install {"force_downgrade"}` (technician): queues the received bundle for
/// the root oneshot that checks and installs it; `GET /v1/ota` follows the attempt.
async fn ota_install(state: &LanState, body: Incoming) -> Response<Body> {
    #[derive(serde::Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Ask {
        force_downgrade: bool,
    }
    let body = match h::read_body(body, MAX_SMALL_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let ask: Ask = if body.iter().all(u8::is_ascii_whitespace) {
        Ask::default()
    } else {
        match h::parse_json(&body) {
            Ok(a) => a,
            Err(r) => return r,
        }
    };
    match crate::ota::request_install(&state.ota.paths, ask.force_downgrade) {
        Ok(attempt) => {
            tracing::info!("update install requested (attempt {attempt})");
            h::json(StatusCode::ACCEPTED, &json!({"attempt": attempt}))
        }
        Err(e) => h::error(StatusCode::CONFLICT, "refused", format!("{e:#}")),
    }
}

/// `POST /v1/ota/quiesce` (technician): waits for a safe moment to reboot (no activity post
/// for a few seconds, at most five minutes), then turns new posts away for five minutes,
/// lets those in flight finish, pushes pending activity if the hub answers, and saves the
/// push mark. The reboot itself is the caller's.
async fn ota_quiesce(state: &LanState) -> Response<Body> {
    const QUIET: i64 = 5_000;
    let now = || chrono::Utc::now().timestamp_millis();
    let give_up = now() + 300_000;
    while now() - state.last_activity_ms.load(Ordering::SeqCst) < QUIET && now() < give_up {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    state
        .closing_until_ms
        .store(now() + 300_000, Ordering::SeqCst);
    let drained = now() + 10_000;
    while state.activity_in_flight.load(Ordering::SeqCst) > 0 && now() < drained {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let pushed = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        state.sync.push_pending(),
    )
    .await;
    let activity = state.activity.clone();
    let saved = tokio::task::spawn_blocking(move || activity.save_mark()).await;
    let pending = state.activity.pending().pending;
    h::json(
        StatusCode::OK,
        &json!({
            "pushed": match pushed { Ok(Ok(n)) => json!(n), Ok(Err(e)) => json!(e), Err(_) => json!("timed out") },
            "pending": pending,
            "mark_saved": matches!(saved, Ok(Ok(()))),
        }),
    )
}
