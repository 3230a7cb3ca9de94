//! The enrollment and renewal calls boxes make on the sync listener, under `/pki/v1/`:
//!
//! - `POST /pki/v1/challenge` → `{"challenge", "hub_time_ms"}`;
//! - `POST /pki/v1/enroll` `{"store", "token", "public_key", "challenge", "signature"}`;
//! - `POST /pki/v1/renew` `{"store", "public_key", "challenge", "signature"}`;
//!
//! both answering `{"certificate", "fingerprint", "not_before_ms", "not_after_ms",
//! "hub_time_ms"}`. These are the only calls the sync listener serves without a client
//! certificate: a box has none before enrollment, and none still valid after an outage
//! longer than the certificate lifetime. The proof of key possession is what authenticates
//! them (`pki.rs`). Bodies are small JSON, read with a tight limit.

use std::sync::Arc;

use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
use hyper::Request;
use serde::Deserialize;
use serde_json::json;

use crate::config::HubConfig;
use crate::pki::{Pki, PkiError};
use storebox_http::{self as h, Body};

/// The path prefix of these calls.
pub const PATH_PREFIX: &str = "/pki/v1/";

/// Largest request body: a few hex strings.
const MAX_BODY: usize = 16 * 1024;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EnrollRequest {
    store: String,
    token: String,
    public_key: String,
    challenge: String,
    signature: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RenewRequest {
    store: String,
    public_key: String,
    challenge: String,
    signature: String,
}

/// The JSON error answer of a refused PKI operation.
pub fn error_response(e: PkiError) -> Response<Body> {
    match e {
        PkiError::Unauthorized(m) => h::error(StatusCode::UNAUTHORIZED, "unauthorized", m),
        PkiError::Revoked(m) => h::error(StatusCode::UNAUTHORIZED, "revoked", m),
        PkiError::BadRequest(m) => h::error(StatusCode::BAD_REQUEST, "bad_request", m),
        e @ PkiError::RateLimited(_) => h::error(StatusCode::TOO_MANY_REQUESTS, "rate_limited", e),
        PkiError::Internal(e) => {
            tracing::error!("{e:#}");
            h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "PKI failure")
        }
    }
}

/// Answers one `/pki/v1/` call.
pub async fn handle(config: &HubConfig, req: Request<Incoming>) -> Response<Body> {
    let Some(pki) = crate::pki::global().cloned() else {
        return h::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "this hub has no PKI configured",
        );
    };
    if req.method() != Method::POST {
        return h::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "PKI calls are POST",
        );
    }
    // The store of a client certificate the connection presented, when it is still valid:
    // a box may renew only its own store.
    let presented = req
        .extensions()
        .get::<h::PeerCertificates>()
        .and_then(|c| c.0.first())
        .and_then(|leaf| pki.authenticate(leaf, crate::now_ms()).ok());
    let path = req.uri().path().to_owned();
    let body = match h::read_body(req.into_body(), MAX_BODY).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    match path.strip_prefix(PATH_PREFIX) {
        Some("challenge") => {
            let now = crate::now_ms();
            h::json(
                StatusCode::OK,
                &json!({"challenge": pki.challenge(now), "hub_time_ms": now}),
            )
        }
        Some("enroll") => {
            let request: EnrollRequest = match h::parse_json(&body) {
                Ok(r) => r,
                Err(r) => return r,
            };
            if let Err(r) = known_store(config, &request.store) {
                return r;
            }
            blocking(pki, move |pki| {
                pki.enroll(
                    &request.store,
                    &request.token,
                    &request.public_key,
                    &request.challenge,
                    &request.signature,
                    crate::now_ms(),
                )
            })
            .await
        }
        Some("renew") => {
            let request: RenewRequest = match h::parse_json(&body) {
                Ok(r) => r,
                Err(r) => return r,
            };
            if let Err(r) = known_store(config, &request.store) {
                return r;
            }
            blocking(pki, move |pki| {
                pki.renew(
                    &request.store,
                    &request.public_key,
                    &request.challenge,
                    &request.signature,
                    presented.as_deref(),
                    crate::now_ms(),
                )
            })
            .await
        }
        _ => h::error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no PKI call at {path}"),
        ),
    }
}

fn known_store(config: &HubConfig, store: &str) -> Result<(), Response<Body>> {
    if config.has_store(store) {
        Ok(())
    } else {
        Err(h::error(
            StatusCode::NOT_FOUND,
            "unknown_store",
            format!("no store {store:?} at this hub"),
        ))
    }
}

/// Signing and the state file's fsync block: off the async threads.
async fn blocking(
    pki: Arc<Pki>,
    work: impl FnOnce(&Pki) -> Result<crate::pki::IssuedCert, PkiError> + Send + 'static,
) -> Response<Body> {
    match tokio::task::spawn_blocking(move || work(&pki)).await {
        Ok(Ok(issued)) => h::json(StatusCode::OK, &issued),
        Ok(Err(e)) => error_response(e),
        Err(e) => h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
}
