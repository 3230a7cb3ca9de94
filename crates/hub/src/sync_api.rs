//! The HTTPS listener boxes talk to: delta pull, full sync, activity push, acknowledgement.
//!
//! Every answer is built from the database alone, so any number of boxes can be served at
//! once; the only per-request state is the store the caller's client certificate names.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, Response, StatusCode};
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

/// What the sync listener needs.
pub struct SyncState {
    pub config: HubConfig,
    pub store: Arc<HubStore>,
    /// Store id by SHA-256 of its credential.
    credentials: BTreeMap<String, String>,
    faults: Faults,
}

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
        }
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
pub async fn handle(state: Arc<SyncState>, req: Request<Incoming>) -> Response<Body> {
    if req.uri().path().starts_with(crate::enroll::PATH_PREFIX) {
        return crate::enroll::handle(&state.config, req).await;
    }
    let store = match authenticate(&state, &req) {
        Ok(store) => store,
        Err(response) => return response,
    };
    if req.method() != Method::POST {
        return h::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "sync calls are POST",
        );
    }
    let path = req.uri().path().to_owned();
    let body = match h::read_body(req.into_body(), MAX_SYNC_BODY).await {
        Ok(b) => b,
        Err(response) => return response,
    };
    let worker = state.clone();
    let result = tokio::task::spawn_blocking(move || -> Result<Vec<u8>, Response<Body>> {
        match path.as_str() {
            proto::PATH_DELTA => delta(&worker, &store, &body),
            proto::PATH_FULL => full(&worker, &store, &body),
            proto::PATH_ACTIVITY => activity(&worker, &store, &body),
            proto::PATH_ACK => ack(&worker, &store, &body),
            _ => Err(h::error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no sync call at {path}"),
            )),
        }
    })
    .await;
    match result {
        Ok(Ok(bytes)) => Response::builder()
            .status(StatusCode::OK)
            .header(http::header::CONTENT_TYPE, proto::CONTENT_TYPE)
            .body(Body::from(bytes))
            .unwrap_or_else(|_| h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "")),
        Ok(Err(response)) => response,
        Err(e) => h::error(StatusCode::INTERNAL_SERVER_ERROR, "internal", e),
    }
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
    let mut bytes = proto::encode_plain(payload).map_err(internal)?;
    if state.faults.corrupt.contains(&module.name) {
        bytes = vec![0xff; 7];
    }
    Ok(proto::ModuleFrame {
        module: module.name.clone(),
        indexes: module.indexes.clone(),
        payload: bytes,
    })
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
                Ok(Some((changes, cursor, more))) => proto::ModuleDelta::Changes {
                    changes,
                    cursor,
                    more,
                },
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
    encode_answer(
        state,
        &proto::ModulesAnswer {
            hub_time_ms: now,
            frames,
        },
    )
}

fn full(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let request: proto::FullRequest =
        proto::decode(body, "a full sync request").map_err(bad_request)?;
    let now = crate::now_ms();
    state
        .store
        .note_contact(store, now, None, None)
        .map_err(internal)?;
    let mut frames = Vec::new();
    for module in &state.config.modules {
        if !request.modules.is_empty() && !request.modules.contains(&module.name) {
            continue;
        }
        let payload = if state.faults.fail.contains(&module.name) {
            proto::ModuleSnapshot::Failed {
                error: "fault injected for tests".into(),
            }
        } else {
            match state.store.snapshot(store, &module.name) {
                Ok((records, cursor)) => {
                    let held = request.digests.iter().find(|d| d.module == module.name);
                    let same = held.is_some_and(|held| {
                        let mut digest = proto::Digest::default();
                        for (id, json) in &records {
                            digest.add(id, json);
                        }
                        held.cursor == cursor && held.digest == digest
                    });
                    if same {
                        proto::ModuleSnapshot::Unchanged { cursor }
                    } else {
                        proto::ModuleSnapshot::Records { records, cursor }
                    }
                }
                Err(e) => {
                    tracing::error!("store {store}, module {}: {e}", module.name);
                    proto::ModuleSnapshot::Failed {
                        error: e.to_string(),
                    }
                }
            }
        };
        frames.push(frame(state, module, &payload)?);
    }
    encode_answer(
        state,
        &proto::ModulesAnswer {
            hub_time_ms: now,
            frames,
        },
    )
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

fn ack(state: &SyncState, store: &str, body: &[u8]) -> Result<Vec<u8>, Response<Body>> {
    let ack: proto::Ack = proto::decode(body, "an acknowledgement").map_err(bad_request)?;
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
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(config)))
}
