//! The back-office API: import and edit module records, read a store's activity and status,
//! manage firmware bundles and targets (`ota.rs`), the fleet view (`fleet.rs`).
//!
//! Served on its own listener (loopback by default) so it can stay off the network boxes
//! reach; every call needs `Authorization: Bearer <admin token>`.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use serde_json::json;
use storebox_protocol as proto;

use crate::ota;
use crate::store::{rfc3339, HubStore};
use storebox_http::{self as h, Body};

/// Largest import body.
pub const MAX_IMPORT_BODY: usize = 64 * 1024 * 1024;
/// Largest single record.
pub const MAX_RECORD_BODY: usize = 1024 * 1024;
/// Most activity events in one answer.
pub const MAX_ACTIVITY_PAGE: usize = 10_000;

/// What the admin listener needs.
pub struct AdminState {
    pub config: crate::config::HubConfig,
    pub store: Arc<HubStore>,
    pub token: String,
}

/// Answers one admin request.
pub async fn handle(state: Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    let authorised =
        h::bearer(&req).is_some_and(|t| crate::secrets_equal(t.as_bytes(), state.token.as_bytes()));
    if !authorised {
        return h::error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing or wrong admin token",
        );
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let segments = h::path_segments(&path);
    let segs: Vec<&str> = segments.iter().map(String::as_str).collect();
    let route = match segs.as_slice() {
        ["admin", "v1", "stores"] => Route::Stores,
        ["admin", "v1", "fleet"] => Route::Fleet,
        ["admin", "v1", "ota"] => Route::OtaFleet,
        ["admin", "v1", "ota", "target"] => Route::OtaTarget,
        ["admin", "v1", "ota", "bundles"] => Route::OtaBundles,
        ["admin", "v1", "ota", "bundles", version] => Route::OtaBundle(version.to_string()),
        ["admin", "v1", "groups", group, "modules", module, tail @ ..] => {
            if !state.config.groups().contains_key(*group) {
                return h::error(
                    StatusCode::NOT_FOUND,
                    "unknown_group",
                    format!("no store of the hub config is in group {group:?}"),
                );
            }
            match state.config.module(module) {
                None => {
                    return h::error(
                        StatusCode::NOT_FOUND,
                        "unknown_module",
                        format!("no module {module:?} in the hub config"),
                    )
                }
                Some(m) if m.scope != crate::config::ModuleScope::Group => {
                    return h::error(
                        StatusCode::BAD_REQUEST,
                        "module_not_shared",
                        format!(
                            "module {module:?} is kept per store: import it under \
                             /admin/v1/stores/{{store}}, or set scope = \"group\" in the hub config"
                        ),
                    )
                }
                Some(_) => {}
            }
            let key = crate::store::group_key(group);
            match tail {
                ["import"] => Route::Import(key, module.to_string()),
                ["records", id] => Route::Record(key, module.to_string(), id.to_string()),
                _ => Route::NotFound,
            }
        }
        ["admin", "v1", "stores", store, rest @ ..] => {
            if !state.config.has_store(store) {
                return h::error(
                    StatusCode::NOT_FOUND,
                    "unknown_store",
                    format!("no store {store:?} in the hub config"),
                );
            }
            match rest {
                ["status"] => Route::Status(store.to_string()),
                ["enroll-token"] => Route::EnrollToken(store.to_string()),
                ["revoke"] => Route::Revoke(store.to_string()),
                ["certificates"] => Route::Certificates(store.to_string()),
                ["activity"] => Route::Activity(store.to_string()),
                ["ota"] => Route::StoreOta(store.to_string()),
                ["modules", module, tail @ ..] => {
                    if state.config.module(module).is_none() {
                        return h::error(
                            StatusCode::NOT_FOUND,
                            "unknown_module",
                            format!("no module {module:?} in the hub config"),
                        );
                    }
                    match tail {
                        ["import"] => Route::Import(store.to_string(), module.to_string()),
                        ["records", id] => {
                            Route::Record(store.to_string(), module.to_string(), id.to_string())
                        }
                        _ => Route::NotFound,
                    }
                }
                _ => Route::NotFound,
            }
        }
        _ => Route::NotFound,
    };
    match (method, route) {
        (Method::GET, Route::Stores) => {
            let stores: Vec<&str> = state.config.stores.iter().map(|s| s.id.as_str()).collect();
            h::json(StatusCode::OK, &json!({ "stores": stores }))
        }
        (Method::GET, Route::Status(store)) => blocking(state, move |s| status(s, &store)).await,
        (Method::GET, Route::Fleet) => {
            let (filter, thresholds) = match fleet_query(&state.config, query.as_deref()) {
                Ok(q) => q,
                Err(r) => return r,
            };
            blocking(state, move |s| {
                match crate::fleet::view(&s.config, &s.store, &filter, &thresholds, crate::now_ms())
                {
                    Ok(view) => h::json(StatusCode::OK, &view),
                    Err(e) => internal(e),
                }
            })
            .await
        }
        (Method::GET, Route::Activity(store)) => {
            let after = match parse_param(query.as_deref(), "after", 0) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let limit = match parse_param(query.as_deref(), "limit", 1000) {
                Ok(v) => (v as usize).clamp(1, MAX_ACTIVITY_PAGE),
                Err(r) => return r,
            };
            blocking(state, move |s| activity(s, &store, after, limit)).await
        }
        (Method::POST, Route::Import(store, module)) => {
            let replace = h::query_param(query.as_deref(), "replace").as_deref() == Some("true");
            let body = match h::read_body(req.into_body(), MAX_IMPORT_BODY).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            blocking(state, move |s| import(s, &store, &module, &body, replace)).await
        }
        (Method::PUT, Route::Record(store, module, id)) => {
            let body = match h::read_body(req.into_body(), MAX_RECORD_BODY).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            blocking(state, move |s| put_record(s, &store, &module, &id, &body)).await
        }
        (Method::GET, Route::Record(store, module, id)) => {
            blocking(state, move |s| {
                match s.store.get_record(&store, &module, &id) {
                    Ok(Some(json)) => Response::builder()
                        .header(http::header::CONTENT_TYPE, "application/json")
                        .body(Body::from(json))
                        .unwrap_or_else(|_| internal("building a response")),
                    Ok(None) => not_found_record(&module, &id),
                    Err(e) => internal(e),
                }
            })
            .await
        }
        (Method::DELETE, Route::Record(store, module, id)) => {
            blocking(state, move |s| {
                match s.store.delete_record(&store, &module, &id, crate::now_ms()) {
                    Ok(true) => h::json(StatusCode::OK, &json!({"deleted": true})),
                    Ok(false) => not_found_record(&module, &id),
                    Err(e) => internal(e),
                }
            })
            .await
        }
        (Method::POST, Route::EnrollToken(store)) => {
            blocking(state, move |s| enroll_token(s, &store)).await
        }
        (Method::POST, Route::Revoke(store)) => blocking(state, move |_| revoke(&store)).await,
        (Method::GET, Route::Certificates(store)) => certificates(&store),
        (Method::GET, Route::OtaFleet) => {
            blocking(state, |s| ota::fleet_view(&s.store, &s.config)).await
        }
        (Method::PUT, Route::OtaTarget) => {
            let body = match ota::read_target_body(req.into_body()).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            blocking(state, move |s| ota::set_target(&s.store, None, &body)).await
        }
        (Method::GET, Route::OtaBundles) => blocking(state, |s| ota::list_bundles(&s.store)).await,
        // Streamed to disk as it arrives: the admin listener's idle timeout does not apply
        // while the request is in flight, so a slow back-office upload is not cut.
        (Method::PUT, Route::OtaBundle(version)) => {
            ota::put_bundle(state.store.clone(), &state.config, version, req).await
        }
        (Method::DELETE, Route::OtaBundle(version)) => {
            blocking(state, move |s| {
                ota::delete_bundle(&s.store, &s.config, &version)
            })
            .await
        }
        (Method::GET, Route::StoreOta(store)) => {
            blocking(state, move |s| ota::store_view(&s.store, &store)).await
        }
        (Method::PUT, Route::StoreOta(store)) => {
            let body = match ota::read_target_body(req.into_body()).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            blocking(state, move |s| {
                ota::set_target(&s.store, Some(&store), &body)
            })
            .await
        }
        (_, Route::NotFound) => h::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no admin call at {path}"),
        ),
        (method, _) => h::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not allowed on {path}"),
        ),
    }
}

enum Route {
    Stores,
    Fleet,
    Status(String),
    Activity(String),
    Import(String, String),
    Record(String, String, String),
    EnrollToken(String),
    Revoke(String),
    Certificates(String),
    OtaFleet,
    OtaTarget,
    OtaBundles,
    OtaBundle(String),
    StoreOta(String),
    NotFound,
}

fn pki() -> Result<&'static Arc<crate::pki::Pki>, Response<Body>> {
    crate::pki::global().ok_or_else(|| {
        h::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this hub has no PKI configured",
        )
    })
}

/// A one-time enrollment token for the store's box.
fn enroll_token(state: &AdminState, store: &str) -> Response<Body> {
    let pki = match pki() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let valid = match state.config.token_lifetime() {
        Ok(v) => v,
        Err(e) => return internal(e),
    };
    let now = crate::now_ms();
    match pki.new_token(store, valid, now) {
        Ok(token) => h::json(
            StatusCode::OK,
            &json!({
                "store": store,
                "token": token,
                "expires_at": rfc3339(now.saturating_add(valid.as_millis() as i64)),
            }),
        ),
        Err(e) => internal(e),
    }
}

/// Revokes the store's box: its certificates are refused from its next request, its key can
/// no longer renew; it needs a new token to enroll again.
fn revoke(store: &str) -> Response<Body> {
    let pki = match pki() {
        Ok(p) => p,
        Err(r) => return r,
    };
    match pki.revoke(store, crate::now_ms()) {
        Ok(n) => h::json(
            StatusCode::OK,
            &json!({"store": store, "revoked_certificates": n}),
        ),
        Err(e) => internal(e),
    }
}

/// The store's enrolled device and the certificates issued to it.
fn certificates(store: &str) -> Response<Body> {
    let pki = match pki() {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (device, issued) = pki.certificates(store);
    let list: Vec<_> = issued
        .iter()
        .map(|(fp, i)| {
            json!({
                "fingerprint": fp,
                "serial": i.serial,
                "not_before": rfc3339(i.not_before_ms),
                "not_after": rfc3339(i.not_after_ms),
                "revoked_at": i.revoked_ms.map(rfc3339),
            })
        })
        .collect();
    h::json(
        StatusCode::OK,
        &json!({
            "store": store,
            "enrolled": device.as_ref().map(|d| rfc3339(d.enrolled_ms)),
            "public_key": device.map(|d| d.public_key),
            "certificates": list,
        }),
    )
}

async fn blocking(
    state: Arc<AdminState>,
    work: impl FnOnce(&AdminState) -> Response<Body> + Send + 'static,
) -> Response<Body> {
    tokio::task::spawn_blocking(move || work(&state))
        .await
        .unwrap_or_else(internal)
}

fn internal(e: impl std::fmt::Display) -> Response<Body> {
    tracing::error!("admin call failed: {e}");
    h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e)
}

fn not_found_record(module: &str, id: &str) -> Response<Body> {
    h::error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no record {id:?} in module {module:?}"),
    )
}

fn parse_param(query: Option<&str>, name: &str, default: u64) -> Result<u64, Response<Body>> {
    match h::query_param(query, name) {
        None => Ok(default),
        Some(v) => v.parse().map_err(|_| {
            h::error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{name} must be a non-negative integer, not {v:?}"),
            )
        }),
    }
}

/// The filter and thresholds of `GET /admin/v1/fleet`: `needs_attention=true`, `reason=R`,
/// `store=ID`, and durations ("6h", "7d") `no_contact`, `cert_within`, `full_sync_within`
/// replacing the defaults of [`crate::fleet::Thresholds::defaults`].
fn fleet_query(
    config: &crate::config::HubConfig,
    query: Option<&str>,
) -> Result<(crate::fleet::Filter, crate::fleet::Thresholds), Response<Body>> {
    let bad = |m: String| h::error(StatusCode::BAD_REQUEST, "bad_request", m);
    let lifetime = config.cert_lifetime().map_err(internal)?;
    let mut thresholds = crate::fleet::Thresholds::defaults(lifetime);
    for (name, slot) in [
        ("no_contact", &mut thresholds.no_contact_s),
        ("cert_within", &mut thresholds.cert_within_s),
        ("full_sync_within", &mut thresholds.full_sync_within_s),
    ] {
        if let Some(text) = h::query_param(query, name) {
            *slot = proto::parse_duration(&text)
                .map_err(|e| bad(format!("{name}: {e}")))?
                .as_secs();
        }
    }
    let needs_attention = match h::query_param(query, "needs_attention").as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            return Err(bad(format!(
                "needs_attention must be true or false, not {other:?}"
            )))
        }
    };
    let store = h::query_param(query, "store");
    if let Some(store) = &store {
        if !config.has_store(store) {
            return Err(h::error(
                StatusCode::NOT_FOUND,
                "unknown_store",
                format!("no store {store:?} in the hub config"),
            ));
        }
    }
    let filter = crate::fleet::Filter {
        needs_attention,
        reason: h::query_param(query, "reason"),
        store,
    };
    Ok((filter, thresholds))
}

/// Parses NDJSON: every non-blank line must be a record. The first bad line fails the whole
/// import, so a half-applied file can never leave a module in a state nobody asked for.
pub fn parse_ndjson(body: &[u8]) -> Result<Vec<proto::CanonicalRecord>, String> {
    let text = std::str::from_utf8(body).map_err(|e| format!("the body is not UTF-8: {e}"))?;
    let mut records = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        if h::json_depth(line.as_bytes()) > h::MAX_JSON_DEPTH {
            return Err(format!(
                "line {}: JSON nested deeper than {} levels",
                n + 1,
                h::MAX_JSON_DEPTH
            ));
        }
        let record =
            proto::canonical_record_from_text(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        records.push(record);
    }
    Ok(records)
}

fn import(
    state: &AdminState,
    store: &str,
    module: &str,
    body: &[u8],
    replace: bool,
) -> Response<Body> {
    let records = match parse_ndjson(body) {
        Ok(r) => r,
        Err(e) => return h::error(StatusCode::BAD_REQUEST, "bad_record", e),
    };
    match state
        .store
        .import(store, module, &records, replace, crate::now_ms())
    {
        Ok(outcome) => h::json(StatusCode::OK, &outcome),
        Err(e) => internal(e),
    }
}

fn put_record(
    state: &AdminState,
    store: &str,
    module: &str,
    id: &str,
    body: &[u8],
) -> Response<Body> {
    if h::json_depth(body) > h::MAX_JSON_DEPTH {
        return h::error(
            StatusCode::BAD_REQUEST,
            "bad_record",
            format!("JSON nested deeper than {} levels", h::MAX_JSON_DEPTH),
        );
    }
    let mut value: serde_json::Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) => {
            return h::error(
                StatusCode::BAD_REQUEST,
                "bad_record",
                format!("not valid JSON: {e}"),
            )
        }
    };
    if let Some(object) = value.as_object_mut() {
        match object.get("id") {
            None => {
                object.insert("id".into(), id.into());
            }
            Some(given) if given.as_str() != Some(id) => {
                return h::error(
                    StatusCode::BAD_REQUEST,
                    "bad_record",
                    format!("the body's id {given} differs from the path's {id:?}"),
                )
            }
            Some(_) => {}
        }
    }
    let record = match proto::canonical_record(&value) {
        Ok(r) => r,
        Err(e) => return h::error(StatusCode::BAD_REQUEST, "bad_record", e),
    };
    match state.store.put_record(store, module, &record) {
        Ok((outcome, seq)) => {
            let status = if outcome == crate::store::PutOutcome::Created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            h::json(status, &json!({"outcome": outcome, "seq": seq}))
        }
        Err(e) => internal(e),
    }
}

fn activity(state: &AdminState, store: &str, after: u64, limit: usize) -> Response<Body> {
    match state.store.activity(store, after, limit) {
        Ok((events, _)) => {
            let next = events.last().map_or(after, |e| e.seq);
            h::json(StatusCode::OK, &json!({"events": events, "next": next}))
        }
        Err(e) => internal(e),
    }
}

fn status(state: &AdminState, store: &str) -> Response<Body> {
    let report = match state.store.box_report(store) {
        Ok(r) => r,
        Err(e) => return internal(e),
    };
    let mut modules = BTreeMap::new();
    for module in &state.config.modules {
        let head = match state.store.module_head(store, &module.name) {
            Ok(h) => h,
            Err(e) => return internal(e),
        };
        modules.insert(
            module.name.clone(),
            json!({
                "head": head,
                "acknowledged": report.cursors.get(&module.name),
            }),
        );
    }
    let high_water = match state.store.activity_high_water(store) {
        Ok(h) => h,
        Err(e) => return internal(e),
    };
    h::json(
        StatusCode::OK,
        &json!({
            "store": store,
            "last_contact": report.last_contact_ms.map(rfc3339),
            "last_full_sync": report.last_full_sync_ms.map(rfc3339),
            "box_version": report.box_version,
            "pending_activity": report.pending_activity,
            "modules": modules,
            "activity": {"high_water": high_water},
        }),
    )
}
