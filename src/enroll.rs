//! Enrollment and renewal of the box's client certificate with the hub (`/pki/v1/` calls,
//! docs/SECURITY.md), and the task that keeps the certificate fresh.
//!
//! Each call opens its own short HTTPS/1.1 connection with the same TLS setup as the sync
//! links ([`crate::identity::hub_client_config`]): the hub's CA pinned, the current
//! certificate presented while it is valid. The proof of key possession (a signature of a hub
//! challenge with the device key) is what lets a box with no valid certificate (new, or back
//! after an outage longer than the lifetime) get one without a technician.
//!
//! Never in the way of serving: the task only logs its failures and retries with backoff.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use bytes::Bytes;
use rustls_pki_types::ServerName;
use serde::Deserialize;
use serde_json::json;

use crate::identity::{clock, CertDates, Identity};

/// The answer to an enrollment or renewal.
#[derive(Debug, Deserialize)]
struct Issued {
    certificate: String,
    fingerprint: String,
    not_before_ms: i64,
    not_after_ms: i64,
    hub_time_ms: i64,
}

/// Why a PKI call failed, as far as the retry policy cares.
#[derive(Debug, thiserror::Error)]
pub enum PkiCallError {
    /// The hub refused for good: revoked, unknown key, bad token. Retrying will not help.
    #[error("the hub refused: {0}")]
    Refused(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// Where the hub's PKI calls go.
pub struct HubPki {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
}

impl HubPki {
    pub fn new(url: &str, ca_file: &std::path::Path, timeout: Duration) -> anyhow::Result<HubPki> {
        let (host, port, server_name) = crate::sync::link::hub_address(url)?;
        let mut tls = crate::identity::hub_client_config(ca_file)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(HubPki {
            host,
            port,
            server_name,
            tls: Arc::new(tls),
            timeout,
        })
    }

    async fn post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> Result<serde_json::Value, PkiCallError> {
        let work = async {
            let addr = format!("{}:{}", self.host, self.port);
            let tcp = tokio::net::TcpStream::connect(&addr)
                .await
                .with_context(|| format!("connecting to the hub at {addr}"))?;
            let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
                .connect(self.server_name.clone(), tcp)
                .await
                .context("TLS handshake with the hub")?;
            let body = serde_json::to_vec(&body).context("encoding the request")?;
            let (status, answer) = storebox_http::call_on(
                tls,
                &addr,
                http::Method::POST,
                path,
                &[("content-type", "application/json")],
                Bytes::from(body),
            )
            .await
            .with_context(|| format!("calling {path} at the hub"))?;
            let doc: serde_json::Value = serde_json::from_slice(&answer).with_context(|| {
                format!("the hub answered {status} to {path} with a body that is not JSON")
            })?;
            if status == http::StatusCode::UNAUTHORIZED || status == http::StatusCode::NOT_FOUND {
                return Err(PkiCallError::Refused(format!(
                    "{status}: {}",
                    doc["message"].as_str().unwrap_or("")
                )));
            }
            if !status.is_success() {
                return Err(PkiCallError::Other(anyhow::anyhow!(
                    "the hub answered {status} to {path}: {}",
                    doc["message"].as_str().unwrap_or("")
                )));
            }
            Ok(doc)
        };
        match tokio::time::timeout(self.timeout, work).await {
            Ok(result) => result,
            Err(_) => Err(PkiCallError::Other(anyhow::anyhow!(
                "the hub did not answer {path} within {:?}",
                self.timeout
            ))),
        }
    }

    /// A fresh challenge; its answer also anchors the trusted clock to the hub's time.
    async fn challenge(&self) -> Result<String, PkiCallError> {
        let doc = self.post("/pki/v1/challenge", json!({})).await?;
        if let Some(hub_ms) = doc["hub_time_ms"].as_i64() {
            clock().observe_hub_time(hub_ms);
        }
        Ok(doc["challenge"]
            .as_str()
            .context("the hub's challenge answer has no challenge")?
            .to_owned())
    }

    /// Enrolls with a one-time token and installs the first certificate.
    pub async fn enroll(
        &self,
        identity: &Identity,
        store: &str,
        token: &str,
    ) -> Result<CertDates, PkiCallError> {
        let challenge = self.challenge().await?;
        let public_key = identity.public_key_hex().to_owned();
        let signature = identity.sign(&proof_message("enroll", store, &challenge, &public_key))?;
        let doc = self
            .post(
                "/pki/v1/enroll",
                json!({"store": store, "token": token, "public_key": public_key,
                       "challenge": challenge, "signature": signature}),
            )
            .await?;
        install(identity, doc).map_err(PkiCallError::Other)
    }

    /// Renews the certificate, proving possession of the enrolled device key.
    pub async fn renew(&self, identity: &Identity, store: &str) -> Result<CertDates, PkiCallError> {
        let challenge = self.challenge().await?;
        let public_key = identity.public_key_hex().to_owned();
        let signature = identity.sign(&proof_message("renew", store, &challenge, &public_key))?;
        let doc = self
            .post(
                "/pki/v1/renew",
                json!({"store": store, "public_key": public_key,
                       "challenge": challenge, "signature": signature}),
            )
            .await?;
        install(identity, doc).map_err(PkiCallError::Other)
    }
}

/// What the box signs; must match the hub's `pki::proof_message`.
fn proof_message(purpose: &str, store: &str, challenge: &str, public_key_hex: &str) -> String {
    format!("storebox-pki-v1\n{purpose}\n{store}\n{challenge}\n{public_key_hex}")
}

fn install(identity: &Identity, doc: serde_json::Value) -> anyhow::Result<CertDates> {
    let issued: Issued =
        serde_json::from_value(doc).context("the hub's certificate answer is malformed")?;
    if issued.not_after_ms <= issued.hub_time_ms || issued.not_before_ms > issued.hub_time_ms {
        bail!("the hub issued a certificate with inconsistent dates");
    }
    let dates = CertDates {
        not_before_ms: issued.not_before_ms,
        not_after_ms: issued.not_after_ms,
        hub_time_ms: issued.hub_time_ms,
    };
    identity.install_certificate(&issued.certificate, dates)?;
    tracing::info!(
        "client certificate {} installed, valid until {}",
        &issued.fingerprint[..16.min(issued.fingerprint.len())],
        rfc3339(issued.not_after_ms)
    );
    Ok(dates)
}

fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        .unwrap_or_else(|| ms.to_string())
}

/// Keeps the box's certificate fresh for as long as the daemon runs: enrolls with the
/// configured token when there is no certificate, renews at two thirds of the lifetime, and
/// after a failure retries with backoff (at most a quarter of the lifetime, so an outage
/// shorter than the remaining third never lets the certificate lapse).
pub async fn maintain(identity: Arc<Identity>, pki: HubPki, store: String, token: Option<String>) {
    let mut backoff = Duration::from_secs(1);
    let mut warned = false;
    // Anchor the trusted clock to the hub's time as soon as it can be reached.
    let _ = pki.challenge().await;
    loop {
        let cap = identity
            .certificate()
            .map(|(d, _)| {
                Duration::from_millis(((d.not_after_ms - d.hub_time_ms) / 4).max(1000) as u64)
            })
            .unwrap_or(Duration::from_secs(300))
            .min(Duration::from_secs(300));
        let outcome = match identity.certificate() {
            None => match &token {
                Some(token) => pki.enroll(&identity, &store, token).await.map(|_| ()),
                None => {
                    if !warned {
                        tracing::error!(
                            "this box is not enrolled: run `storebox enroll --token TOKEN` with a token from `storehub enroll-token`"
                        );
                        warned = true;
                    }
                    // A technician may enroll with the command while the daemon runs.
                    if let Err(e) = identity.reload() {
                        tracing::warn!("{e:#}");
                    }
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
            Some((dates, _)) => {
                let wait = dates.renew_at_ms() - clock().now_ms();
                if wait > 0 {
                    // Re-evaluated at least every minute: the trusted clock may be re-anchored.
                    tokio::time::sleep(
                        Duration::from_millis(wait as u64).min(Duration::from_secs(60)),
                    )
                    .await;
                    continue;
                }
                pki.renew(&identity, &store).await.map(|_| ())
            }
        };
        match outcome {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                let level_error = matches!(e, PkiCallError::Refused(_));
                if level_error {
                    tracing::error!("client certificate: {e:#}");
                } else {
                    tracing::warn!("client certificate: {e:#}; retrying in {backoff:?}");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(cap);
            }
        }
    }
}
