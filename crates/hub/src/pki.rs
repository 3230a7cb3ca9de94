//! The hub's private PKI for boxes: the CA that signs short-lived client certificates, the
//! one-time enrollment tokens, the devices (one enrolled public key per store), the register
//! of issued certificates and the revocations.
//!
//! A box's private key never leaves the box: it sends its public key and proves it holds the
//! private key by signing a challenge the hub made ([`Pki::challenge`]). The hub signs a
//! certificate for that public key, valid for `[pki] cert_lifetime` (24 h by default). A box
//! renews with the same proof, with or without a still-valid certificate, so an outage longer
//! than the lifetime needs neither a new token nor a technician.
//!
//! Every certificate the hub issues is entered in a register keyed by the SHA-256 of its DER.
//! [`Pki::authenticate`] looks the presented leaf up on *every request*: the TLS handshake
//! checks the chain to the CA, but a resumed TLS session carries the client certificate of the
//! original handshake without checking it again, so expiry and revocation are enforced here,
//! per request, against the hub's clock. A certificate not in the register is refused even
//! if the CA signed it (a key or CA leak cannot mint accepted identities without the register).
//!
//! State is one JSON file (`pki.json` in the hub's data directory), rewritten atomically on
//! each change: changes are rare (an enrollment, a renewal per box every 16 h, a revocation),
//! and keeping it out of the sync database keeps the two concerns independent.
//!
//! This module knows nothing about HTTP: `enroll.rs` and `admin_api.rs` call it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use serde::{Deserialize, Serialize};

/// Common name of the private CA; issued certificates name it as their issuer, so the CA's
/// parameters are rebuilt from it (and the CA key) rather than parsed from `ca.crt`.
pub const CA_COMMON_NAME: &str = "storehub private CA";

/// How long a challenge stays usable.
pub const CHALLENGE_LIFETIME_MS: i64 = 120_000;

/// How far before "now" a new certificate's validity starts, so a box whose clock is a little
/// behind the hub's still accepts it.
const BACKDATE_MS: i64 = 5 * 60_000;

/// Failed enrollment or renewal attempts allowed per store in [`FAILURE_WINDOW_MS`], and in
/// total over all stores; beyond, attempts are refused with 429 until the window passes.
pub const MAX_FAILURES_PER_STORE: usize = 5;
pub const MAX_FAILURES_TOTAL: usize = 30;
pub const FAILURE_WINDOW_MS: i64 = 5 * 60_000;

/// Why a PKI operation was refused. Each maps to one HTTP status and JSON `error` kind.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Revoked(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("too many failed attempts; retry in {0} s")]
    RateLimited(i64),
    #[error("internal PKI error: {0:#}")]
    Internal(anyhow::Error),
}

/// The SHA-256 (hex) of a certificate's DER: its key in the register, and its fingerprint.
pub fn fingerprint(der: &[u8]) -> String {
    crate::sha256_hex(der)
}

/// A pending one-time enrollment token (its digest only).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenEntry {
    sha256: String,
    store: String,
    expires_ms: i64,
}

/// The enrolled device of a store.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Device {
    /// Raw P-256 public key (uncompressed point), hex.
    pub public_key: String,
    pub enrolled_ms: i64,
}

/// One issued certificate.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Issued {
    pub store: String,
    pub serial: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    #[serde(default)]
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    tokens: Vec<TokenEntry>,
    #[serde(default)]
    devices: BTreeMap<String, Device>,
    /// By certificate fingerprint.
    #[serde(default)]
    issued: BTreeMap<String, Issued>,
    /// The version of the shared copy this state was read from (replicas; not in the file).
    #[serde(skip)]
    version: Option<i64>,
}

/// Another replica changed the shared PKI state between our read and our write: the change
/// is redone on the newer state ([`Pki::retrying`]).
#[derive(Debug, thiserror::Error)]
#[error("the PKI state changed on another replica at the same moment; try again")]
pub struct Conflict;

/// How many times a change lost to another replica's is redone before the caller is told.
const CONFLICT_RETRIES: usize = 8;

fn is_conflict(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Conflict>().is_some()
}

/// Where replicas keep the PKI state they share (the PostgreSQL backend), so that a box
/// enrolled or renewed through one replica is known to all, and a revocation through one is
/// refused by all. Each change is written whole, only over the version it was made from.
pub trait SharedPkiState: Send + Sync {
    /// The stored state and its version; `None` when none was ever stored.
    fn load(&self) -> anyhow::Result<Option<(i64, Vec<u8>)>>;
    /// Stores `bytes` if the stored version is still `version` (`None`: nothing stored);
    /// the new version, or `None` when another replica changed it first. Tells the other
    /// replicas, which [`Pki::reload`].
    fn store(&self, version: Option<i64>, bytes: &[u8]) -> anyhow::Result<Option<i64>>;
}

/// A certificate just issued.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedCert {
    pub certificate: String,
    pub fingerprint: String,
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    /// The hub's clock when it signed: a time the box can trust (see docs/SECURITY.md).
    pub hub_time_ms: i64,
}

/// The PKI: CA, state file, rate limiter.
pub struct Pki {
    ca: Issuer<'static, KeyPair>,
    lifetime: Duration,
    path: PathBuf,
    state: Mutex<State>,
    /// Set on replicas: the state shared through the database, of which `state` is a copy.
    shared: Option<Box<dyn SharedPkiState>>,
    challenge_key: ring::hmac::Key,
    failures: Mutex<Vec<(String, i64)>>,
}

static GLOBAL: OnceLock<Arc<Pki>> = OnceLock::new();

/// Installs the process's PKI, once, at startup. The sync listener's per-request check reads
/// it from here so its state type stays independent of the PKI.
pub fn install(pki: Arc<Pki>) {
    let _ = GLOBAL.set(pki);
}

/// The process's PKI, when installed.
pub fn global() -> Option<&'static Arc<Pki>> {
    GLOBAL.get()
}

/// The CA's parameters (everything an issued certificate copies from its issuer).
pub fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, CA_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

/// A raw P-256 public key, as rcgen signs certificates for keys it does not hold.
struct RawP256<'a>(&'a [u8]);

impl rcgen::PublicKeyData for RawP256<'_> {
    fn der_bytes(&self) -> &[u8] {
        self.0
    }
    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_ECDSA_P256_SHA256
    }
}

/// The message a box signs to prove it holds its device key.
pub fn proof_message(purpose: &str, store: &str, challenge: &str, public_key_hex: &str) -> String {
    format!("storebox-pki-v1\n{purpose}\n{store}\n{challenge}\n{public_key_hex}")
}

/// Hex to bytes; `None` on anything but an even number of hex digits.
pub fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Pki {
    /// Loads the CA key and the state file (created empty when absent).
    pub fn open(ca_key: &Path, state: &Path, lifetime: Duration) -> anyhow::Result<Pki> {
        let pem = std::fs::read_to_string(ca_key)
            .with_context(|| format!("reading the CA key {}", ca_key.display()))?;
        let key = KeyPair::from_pem(&pem)
            .with_context(|| format!("parsing the CA key {}", ca_key.display()))?;
        let loaded = match std::fs::read(state) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing the PKI state {}", state.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => {
                return Err(e).with_context(|| format!("reading the PKI state {}", state.display()))
            }
        };
        // Derived from the CA key, so that every replica checks the challenges any replica
        // gave: a box's challenge and enrollment may reach different ones.
        let secret = ring::digest::digest(
            &ring::digest::SHA256,
            format!("storehub enrollment challenges\n{pem}").as_bytes(),
        );
        Ok(Pki {
            ca: Issuer::new(ca_params(), key),
            lifetime,
            path: state.to_path_buf(),
            state: Mutex::new(loaded),
            shared: None,
            challenge_key: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_ref()),
            failures: Mutex::new(Vec::new()),
        })
    }

    /// The configured certificate lifetime.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the state half-changed in a way that
        // matters: every change is saved whole, so the poisoned value is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Shares the state through `shared` from now on. The first replica to start on an empty
    /// database stores the state of its file there; every later one takes the stored one.
    pub fn with_shared_state(mut self, shared: Box<dyn SharedPkiState>) -> anyhow::Result<Pki> {
        {
            let state = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
            match shared.load()? {
                Some((version, bytes)) => {
                    *state = serde_json::from_slice(&bytes)
                        .context("the PKI state in the database does not parse")?;
                    state.version = Some(version);
                }
                None => {
                    let bytes = serde_json::to_vec(&*state).context("encoding the PKI state")?;
                    state.version = shared.store(None, &bytes)?;
                    if state.version.is_none() {
                        // Another replica stored its state first: take that one.
                        let (version, bytes) = shared
                            .load()?
                            .context("the PKI state in the database vanished")?;
                        *state = serde_json::from_slice(&bytes)
                            .context("the PKI state in the database does not parse")?;
                        state.version = Some(version);
                    }
                }
            }
        }
        self.shared = Some(shared);
        Ok(self)
    }

    /// Takes the shared state again when another replica changed it (called on its
    /// notification).
    pub fn reload(&self) -> anyhow::Result<()> {
        let Some(shared) = &self.shared else {
            return Ok(());
        };
        // Read and parsed without the lock: every request's certificate check takes it, and
        // a fleet's state is megabytes. Swapped in only if still newer than ours.
        let Some((version, bytes)) = shared.load()? else {
            return Ok(());
        };
        if self.lock().version == Some(version) {
            return Ok(());
        }
        let mut loaded: State = serde_json::from_slice(&bytes)
            .context("the PKI state in the database does not parse")?;
        loaded.version = Some(version);
        let mut state = self.lock();
        if state.version.is_none_or(|v| v < version) {
            *state = loaded;
        }
        Ok(())
    }

    /// The state, to change: on replicas, first brought up to date with the shared copy.
    fn lock_for_change(&self) -> anyhow::Result<std::sync::MutexGuard<'_, State>> {
        let mut state = self.lock();
        if let Some(shared) = &self.shared {
            refresh(shared.as_ref(), &mut state)?;
        }
        Ok(state)
    }

    fn save(&self, state: &mut State) -> anyhow::Result<()> {
        let Some(shared) = &self.shared else {
            return save_state(&self.path, state);
        };
        let bytes = serde_json::to_vec(&*state).context("encoding the PKI state")?;
        match shared.store(state.version, &bytes)? {
            Some(version) => {
                state.version = Some(version);
                Ok(())
            }
            None => {
                // Our change is lost; take theirs, so the caller's retry starts from it.
                refresh(shared.as_ref(), state)?;
                Err(anyhow::Error::new(Conflict))
            }
        }
    }

    /// A new one-time enrollment token for `store`, valid for `valid`.
    pub fn new_token(&self, store: &str, valid: Duration, now_ms: i64) -> anyhow::Result<String> {
        let token = crate::init::random_token()?;
        self.retrying(|| {
            let mut state = self.lock_for_change()?;
            state.tokens.retain(|t| t.expires_ms > now_ms);
            state.tokens.push(TokenEntry {
                sha256: crate::sha256_hex(token.as_bytes()),
                store: store.to_owned(),
                expires_ms: now_ms.saturating_add(valid.as_millis() as i64),
            });
            self.save(&mut state)
        })?;
        Ok(token)
    }

    /// A challenge: the hub's time and a MAC over it, so the hub keeps no state per challenge.
    pub fn challenge(&self, now_ms: i64) -> String {
        let tag = ring::hmac::sign(&self.challenge_key, now_ms.to_string().as_bytes());
        format!("{now_ms}.{}", hex(tag.as_ref()))
    }

    fn check_challenge(&self, challenge: &str, now_ms: i64) -> Result<(), PkiError> {
        let bad = || PkiError::Unauthorized("the challenge is unknown or expired".into());
        let (time, tag) = challenge.split_once('.').ok_or_else(bad)?;
        let tag = hex_decode(tag).ok_or_else(bad)?;
        ring::hmac::verify(&self.challenge_key, time.as_bytes(), &tag).map_err(|_| bad())?;
        let time: i64 = time.parse().map_err(|_| bad())?;
        if now_ms < time || now_ms - time > CHALLENGE_LIFETIME_MS {
            return Err(bad());
        }
        Ok(())
    }

    fn check_rate(&self, store: &str, now_ms: i64) -> Result<(), PkiError> {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.retain(|(_, t)| now_ms - t < FAILURE_WINDOW_MS);
        let of_store: Vec<i64> = failures
            .iter()
            .filter(|(s, _)| s == store)
            .map(|(_, t)| *t)
            .collect();
        let blocked_until = if of_store.len() >= MAX_FAILURES_PER_STORE {
            of_store.iter().min().map(|t| t + FAILURE_WINDOW_MS)
        } else if failures.len() >= MAX_FAILURES_TOTAL {
            failures
                .iter()
                .map(|(_, t)| *t)
                .min()
                .map(|t| t + FAILURE_WINDOW_MS)
        } else {
            None
        };
        match blocked_until {
            Some(until) => Err(PkiError::RateLimited(((until - now_ms) / 1000).max(1))),
            None => Ok(()),
        }
    }

    fn note_failure(&self, store: &str, now_ms: i64) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.push((store.to_owned(), now_ms));
    }

    /// Runs `change` again, on the newer state, while it loses to another replica's change.
    fn retrying<T>(&self, change: impl Fn() -> anyhow::Result<T>) -> anyhow::Result<T> {
        let mut tries = 0;
        loop {
            match change() {
                Err(e) if is_conflict(&e) && tries < CONFLICT_RETRIES => tries += 1,
                result => return result,
            }
        }
    }

    /// Runs `attempt` under the rate limit, counting its failure (but not the limit itself),
    /// and again while it loses to another replica's change.
    fn limited<T>(
        &self,
        store: &str,
        now_ms: i64,
        attempt: impl Fn() -> Result<T, PkiError>,
    ) -> Result<T, PkiError> {
        self.check_rate(store, now_ms)?;
        let mut tries = 0;
        let result = loop {
            match attempt() {
                Err(PkiError::Internal(e)) if is_conflict(&e) && tries < CONFLICT_RETRIES => {
                    tries += 1
                }
                result => break result,
            }
        };
        if matches!(
            result,
            Err(PkiError::Unauthorized(_) | PkiError::BadRequest(_) | PkiError::Revoked(_))
        ) {
            self.note_failure(store, now_ms);
        }
        result
    }

    /// Enrolls the device of `store`: checks and consumes the token, checks the proof of
    /// possession, records the public key and issues a first certificate.
    pub fn enroll(
        &self,
        store: &str,
        token: &str,
        public_key_hex: &str,
        challenge: &str,
        signature_hex: &str,
        now_ms: i64,
    ) -> Result<IssuedCert, PkiError> {
        self.limited(store, now_ms, || {
            self.check_challenge(challenge, now_ms)?;
            let public_key = parse_public_key(public_key_hex)?;
            verify_proof(
                &public_key,
                &proof_message("enroll", store, challenge, public_key_hex),
                signature_hex,
            )?;
            let digest = crate::sha256_hex(token.as_bytes());
            let mut state = self.lock_for_change().map_err(PkiError::Internal)?;
            let position = state.tokens.iter().position(|t| {
                crate::secrets_equal(t.sha256.as_bytes(), digest.as_bytes())
                    && t.store == store
                    && t.expires_ms > now_ms
            });
            let Some(position) = position else {
                return Err(PkiError::Unauthorized(format!(
                    "the enrollment token is unknown, used or expired for store {store:?}"
                )));
            };
            state.tokens.remove(position);
            state.devices.insert(
                store.to_owned(),
                Device {
                    public_key: public_key_hex.to_ascii_lowercase(),
                    enrolled_ms: now_ms,
                },
            );
            let issued = self.issue(&mut state, store, &public_key, now_ms)?;
            self.save(&mut state).map_err(PkiError::Internal)?;
            tracing::info!("enrolled the box of store {store}");
            Ok(issued)
        })
    }

    /// Renews the certificate of `store`'s enrolled device, on proof that the caller holds
    /// its key. `presented_store` is the store of the client certificate of the connection,
    /// if any: a box may not renew another store's certificate.
    pub fn renew(
        &self,
        store: &str,
        public_key_hex: &str,
        challenge: &str,
        signature_hex: &str,
        presented_store: Option<&str>,
        now_ms: i64,
    ) -> Result<IssuedCert, PkiError> {
        self.limited(store, now_ms, || {
            if let Some(presented) = presented_store {
                if presented != store {
                    return Err(PkiError::Unauthorized(format!(
                        "a certificate of store {presented:?} cannot renew store {store:?}"
                    )));
                }
            }
            self.check_challenge(challenge, now_ms)?;
            let mut state = self.lock_for_change().map_err(PkiError::Internal)?;
            let Some(device) = state.devices.get(store) else {
                return Err(PkiError::Revoked(format!(
                    "no enrolled box for store {store:?} (revoked or never enrolled): enroll again with a new token"
                )));
            };
            if !crate::secrets_equal(
                device.public_key.as_bytes(),
                public_key_hex.to_ascii_lowercase().as_bytes(),
            ) {
                return Err(PkiError::Unauthorized(format!(
                    "the key is not the enrolled key of store {store:?}"
                )));
            }
            let public_key = parse_public_key(public_key_hex)?;
            verify_proof(
                &public_key,
                &proof_message("renew", store, challenge, public_key_hex),
                signature_hex,
            )?;
            let issued = self.issue(&mut state, store, &public_key, now_ms)?;
            self.save(&mut state).map_err(PkiError::Internal)?;
            tracing::info!("renewed the certificate of store {store}");
            Ok(issued)
        })
    }

    fn issue(
        &self,
        state: &mut State,
        store: &str,
        public_key: &[u8],
        now_ms: i64,
    ) -> Result<IssuedCert, PkiError> {
        let internal = |e: rcgen::Error| PkiError::Internal(anyhow::anyhow!("signing: {e}"));
        let mut serial = [0u8; 16];
        getrandom::fill(&mut serial)
            .map_err(|e| PkiError::Internal(anyhow::anyhow!("no randomness: {e}")))?;
        // A positive serial: the top bit clear.
        serial[0] &= 0x7f;
        let not_before_ms = now_ms - BACKDATE_MS;
        let not_after_ms = now_ms.saturating_add(self.lifetime.as_millis() as i64);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, store);
        dn.push(DnType::OrganizationalUnitName, "storebox");
        params.distinguished_name = dn;
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        params.not_before = system_time(not_before_ms).into();
        params.not_after = system_time(not_after_ms).into();
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&RawP256(public_key), &self.ca)
            .map_err(internal)?;
        let fp = fingerprint(cert.der());
        // Forget certificates expired for a day: they can never be accepted again anyway.
        state
            .issued
            .retain(|_, i| i.not_after_ms > now_ms - 86_400_000);
        state.issued.insert(
            fp.clone(),
            Issued {
                store: store.to_owned(),
                serial: hex(&serial),
                not_before_ms,
                not_after_ms,
                revoked_ms: None,
            },
        );
        Ok(IssuedCert {
            certificate: cert.pem(),
            fingerprint: fp,
            not_before_ms,
            not_after_ms,
            hub_time_ms: now_ms,
        })
    }

    /// Revokes the box of `store`: every certificate issued to it is refused from its next
    /// request on, and its device key can no longer renew. Answers how many certificates
    /// were still valid.
    pub fn revoke(&self, store: &str, now_ms: i64) -> anyhow::Result<usize> {
        self.retrying(|| {
            let mut state = self.lock_for_change()?;
            let mut count = 0;
            for issued in state.issued.values_mut() {
                if issued.store == store && issued.revoked_ms.is_none() {
                    issued.revoked_ms = Some(now_ms);
                    if issued.not_after_ms > now_ms {
                        count += 1;
                    }
                }
            }
            state.devices.remove(store);
            state.tokens.retain(|t| t.store != store);
            self.save(&mut state)?;
            tracing::info!("revoked the box of store {store} ({count} valid certificates)");
            Ok(count)
        })
    }

    /// The certificates issued to `store`, newest first, and its device.
    pub fn certificates(&self, store: &str) -> (Option<Device>, Vec<(String, Issued)>) {
        let state = self.lock();
        let mut list: Vec<(String, Issued)> = state
            .issued
            .iter()
            .filter(|(_, i)| i.store == store)
            .map(|(f, i)| (f.clone(), i.clone()))
            .collect();
        list.sort_by_key(|(_, i)| std::cmp::Reverse(i.not_after_ms));
        (state.devices.get(store).cloned(), list)
    }

    /// The store a request's client certificate names, after checking it is a certificate
    /// this hub issued, within its validity at `now_ms`, and not revoked. Called on every
    /// request: resumed TLS sessions are not re-verified by rustls.
    pub fn authenticate(&self, leaf_der: &[u8], now_ms: i64) -> Result<String, PkiError> {
        let fp = fingerprint(leaf_der);
        let state = self.lock();
        let Some(issued) = state.issued.get(&fp) else {
            return Err(PkiError::Unauthorized(
                "the client certificate was not issued by this hub".into(),
            ));
        };
        if issued.revoked_ms.is_some() {
            return Err(PkiError::Revoked(format!(
                "the certificate of store {:?} was revoked",
                issued.store
            )));
        }
        if now_ms < issued.not_before_ms {
            return Err(PkiError::Unauthorized(
                "the client certificate is not valid yet".into(),
            ));
        }
        if now_ms >= issued.not_after_ms {
            return Err(PkiError::Unauthorized(
                "the client certificate has expired: renew it".into(),
            ));
        }
        Ok(issued.store.clone())
    }
}

fn system_time(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn parse_public_key(hex_text: &str) -> Result<Vec<u8>, PkiError> {
    let key = hex_decode(hex_text)
        .ok_or_else(|| PkiError::BadRequest("public_key must be hex".into()))?;
    // An uncompressed P-256 point: 0x04, then 32 bytes of x and 32 of y.
    if key.len() != 65 || key[0] != 4 {
        return Err(PkiError::BadRequest(
            "public_key must be an uncompressed P-256 point (65 bytes)".into(),
        ));
    }
    Ok(key)
}

fn verify_proof(public_key: &[u8], message: &str, signature_hex: &str) -> Result<(), PkiError> {
    let signature = hex_decode(signature_hex)
        .ok_or_else(|| PkiError::BadRequest("signature must be hex".into()))?;
    ring::signature::UnparsedPublicKey::new(&ring::signature::ECDSA_P256_SHA256_ASN1, public_key)
        .verify(message.as_bytes(), &signature)
        .map_err(|_| PkiError::Unauthorized("the proof of key possession does not verify".into()))
}

/// Writes the state atomically: a temporary file, synced, renamed over the old one.
fn refresh(shared: &dyn SharedPkiState, state: &mut State) -> anyhow::Result<()> {
    if let Some((version, bytes)) = shared.load()? {
        if Some(version) != state.version {
            *state = serde_json::from_slice(&bytes)
                .context("the PKI state in the database does not parse")?;
            state.version = Some(version);
        }
    }
    Ok(())
}

fn save_state(path: &Path, state: &State) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes = serde_json::to_vec_pretty(state).context("encoding the PKI state")?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    file.write_all(&bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

/// Writes a state holding one pending token per `(store, token)`: what `storehub init` needs
/// to let the demo's boxes enroll themselves on first start.
pub fn write_initial_state(
    path: &Path,
    tokens: &[(String, String)],
    valid: Duration,
    now_ms: i64,
) -> anyhow::Result<()> {
    let state = State {
        tokens: tokens
            .iter()
            .map(|(store, token)| TokenEntry {
                sha256: crate::sha256_hex(token.as_bytes()),
                store: store.clone(),
                expires_ms: now_ms.saturating_add(valid.as_millis() as i64),
            })
            .collect(),
        ..State::default()
    };
    save_state(path, &state)
}

/// Checks a lifetime from the config.
pub fn parse_lifetime(text: &str, what: &str) -> anyhow::Result<Duration> {
    let d = storebox_protocol::parse_duration(text).map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    if d < Duration::from_secs(1) {
        bail!("{what} must be at least 1s");
    }
    Ok(d)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn pki(dir: &Path, lifetime: Duration) -> Pki {
        let key = KeyPair::generate().unwrap();
        std::fs::write(dir.join("ca.key"), key.serialize_pem()).unwrap();
        Pki::open(&dir.join("ca.key"), &dir.join("pki.json"), lifetime).unwrap()
    }

    fn prove(key: &KeyPair, purpose: &str, store: &str, challenge: &str) -> (String, String) {
        use rcgen::SigningKey;
        let public = hex(key.public_key_raw());
        let sig = key
            .sign(proof_message(purpose, store, challenge, &public).as_bytes())
            .unwrap();
        (public, hex(&sig))
    }

    #[test]
    fn enroll_renew_revoke() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), Duration::from_secs(3600));
        let now = 1_700_000_000_000;
        let token = pki.new_token("s1", Duration::from_secs(60), now).unwrap();
        let device = KeyPair::generate().unwrap();
        let c = pki.challenge(now);
        let (public, sig) = prove(&device, "enroll", "s1", &c);
        // The token is bound to its store.
        assert!(matches!(
            pki.enroll("s2", &token, &public, &c, &sig, now),
            Err(PkiError::Unauthorized(_))
        ));
        let cert = pki.enroll("s1", &token, &public, &c, &sig, now).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert.certificate.as_bytes());
        use rustls_pki_types::pem::PemObject;
        let der = der.unwrap();
        assert_eq!(pki.authenticate(&der, now).unwrap(), "s1");
        assert!(pki.authenticate(&der, now + 3_600_000).is_err(), "expired");
        assert!(pki.authenticate(&der, now - 3_600_000).is_err(), "not yet");
        // One-time token.
        assert!(pki.enroll("s1", &token, &public, &c, &sig, now).is_err());
        // Renewal needs the enrolled key's proof.
        let c2 = pki.challenge(now + 1000);
        let other = KeyPair::generate().unwrap();
        let (other_public, other_sig) = prove(&other, "renew", "s1", &c2);
        assert!(pki
            .renew("s1", &other_public, &c2, &other_sig, None, now + 1000)
            .is_err());
        let (public, sig) = prove(&device, "renew", "s1", &c2);
        // A proof made for enrollment is not a renewal proof.
        let (_, enroll_sig) = prove(&device, "enroll", "s1", &c2);
        assert!(pki
            .renew("s1", &public, &c2, &enroll_sig, None, now + 1000)
            .is_err());
        let renewed = pki
            .renew("s1", &public, &c2, &sig, Some("s1"), now + 1000)
            .unwrap();
        assert!(renewed.not_after_ms > cert.not_after_ms);
        // Stale challenges are refused.
        let (public, sig) = prove(&device, "renew", "s1", &c2);
        assert!(pki
            .renew(
                "s1",
                &public,
                &c2,
                &sig,
                None,
                now + 1000 + CHALLENGE_LIFETIME_MS + 1
            )
            .is_err());
        // The state survives a restart; revocation refuses the certificate and the key.
        drop(pki);
        let pki = Pki::open(
            &dir.path().join("ca.key"),
            &dir.path().join("pki.json"),
            Duration::from_secs(3600),
        )
        .unwrap();
        assert_eq!(pki.authenticate(&der, now).unwrap(), "s1");
        assert_eq!(pki.revoke("s1", now).unwrap(), 2);
        assert!(matches!(
            pki.authenticate(&der, now),
            Err(PkiError::Revoked(_))
        ));
        let c3 = pki.challenge(now);
        let (public, sig) = prove(&device, "renew", "s1", &c3);
        assert!(matches!(
            pki.renew("s1", &public, &c3, &sig, None, now),
            Err(PkiError::Revoked(_))
        ));
    }

    #[test]
    fn failures_are_rate_limited() {
        let dir = tempfile::tempdir().unwrap();
        let pki = pki(dir.path(), Duration::from_secs(3600));
        let now = 1_700_000_000_000;
        let device = KeyPair::generate().unwrap();
        for _ in 0..MAX_FAILURES_PER_STORE {
            let c = pki.challenge(now);
            let (public, sig) = prove(&device, "enroll", "s1", &c);
            assert!(matches!(
                pki.enroll("s1", "wrong", &public, &c, &sig, now),
                Err(PkiError::Unauthorized(_))
            ));
        }
        let token = pki.new_token("s1", Duration::from_secs(600), now).unwrap();
        let c = pki.challenge(now);
        let (public, sig) = prove(&device, "enroll", "s1", &c);
        assert!(matches!(
            pki.enroll("s1", &token, &public, &c, &sig, now),
            Err(PkiError::RateLimited(_))
        ));
        // After the window the right token works.
        let later = now + FAILURE_WINDOW_MS + 1;
        let c = pki.challenge(later);
        let (public, sig) = prove(&device, "enroll", "s1", &c);
        assert!(pki.enroll("s1", &token, &public, &c, &sig, later).is_ok());
    }

    /// A shared state in memory that, once, lets another "replica" write between a change's
    /// read and its write.
    struct Racy {
        stored: Mutex<Option<(i64, Vec<u8>)>>,
        race_once: Mutex<Option<Vec<u8>>>,
    }

    impl SharedPkiState for Racy {
        fn load(&self) -> anyhow::Result<Option<(i64, Vec<u8>)>> {
            Ok(self.stored.lock().unwrap().clone())
        }

        fn store(&self, version: Option<i64>, bytes: &[u8]) -> anyhow::Result<Option<i64>> {
            let mut stored = self.stored.lock().unwrap();
            if let Some(theirs) = self.race_once.lock().unwrap().take() {
                let v = stored.as_ref().map_or(1, |(v, _)| v + 1);
                *stored = Some((v, theirs));
            }
            let current = stored.as_ref().map(|(v, _)| *v);
            if current != version {
                return Ok(None);
            }
            let v = current.map_or(1, |v| v + 1);
            *stored = Some((v, bytes.to_vec()));
            Ok(Some(v))
        }
    }

    #[test]
    fn a_change_lost_to_another_replica_is_redone_on_its_state() {
        let dir = tempfile::tempdir().unwrap();
        let now = 1_700_000_000_000;
        let shared = std::sync::Arc::new(Racy {
            stored: Mutex::new(None),
            race_once: Mutex::new(None),
        });
        struct Handle(std::sync::Arc<Racy>);
        impl SharedPkiState for Handle {
            fn load(&self) -> anyhow::Result<Option<(i64, Vec<u8>)>> {
                self.0.load()
            }
            fn store(&self, v: Option<i64>, b: &[u8]) -> anyhow::Result<Option<i64>> {
                self.0.store(v, b)
            }
        }
        let a = pki(dir.path(), Duration::from_secs(3600))
            .with_shared_state(Box::new(Handle(shared.clone())))
            .unwrap();
        // The other replica's write: a token for s2, on the state as stored now.
        let mut theirs: State = serde_json::from_slice(&shared.load().unwrap().unwrap().1).unwrap();
        theirs.tokens.push(TokenEntry {
            sha256: "ab".repeat(32),
            store: "s2".into(),
            expires_ms: now + 60_000,
        });
        *shared.race_once.lock().unwrap() = Some(serde_json::to_vec(&theirs).unwrap());

        a.new_token("s1", Duration::from_secs(60), now).unwrap();
        let stored: State = serde_json::from_slice(&shared.load().unwrap().unwrap().1).unwrap();
        let stores: Vec<&str> = stored.tokens.iter().map(|t| t.store.as_str()).collect();
        assert_eq!(stores, ["s2", "s1"], "both changes kept");
    }
}
