//! Tills and technicians on the LAN: pairing, per-till bearer tokens, roles, unpairing; and
//! the box-local TLS certificate of the till API.
//!
//! Pairing: a till asks (`POST /v1/pair` with its name) and gets a request id and a six-digit
//! code, which it shows; the box shows the same code on its status page and in
//! `storebox pair`. A manager who sees the two codes match confirms (`storebox pair --confirm
//! CODE`, or `POST /v1/tills/confirm` with a technician token); the till's next poll of
//! `GET /v1/pair/{request}` then receives its token, once. Provisioning scripts pair at once
//! on the box (`storebox pair --name TILL --approve [--technician]`).
//!
//! State lives in one JSON file, `<data_dir>/pairing/tills.json` (mode 0600), holding only
//! SHA-256 digests of tokens. Both the daemon and the command line change it, each change
//! under an exclusive `flock` and written atomically; the daemon re-reads it when its
//! modification time or size changes, so a till paired or unpaired from the shell counts at
//! its next request.
//!
//! Nothing here knows about HTTP routes; `lan.rs` calls it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// How long a pairing request waits for confirmation.
pub const PAIRING_LIFETIME_MS: i64 = 10 * 60_000;
/// Pending pairing requests at most; more are refused (429) until some expire.
pub const MAX_PENDING: usize = 16;
/// Pairing requests per minute at most, whoever asks.
pub const MAX_REQUESTS_PER_MINUTE: usize = 20;

/// What a credential may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Lookups and activity.
    Till,
    /// Everything: sync triggers, pairing management.
    Technician,
}

/// A paired till (or technician credential).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    pub id: String,
    pub name: String,
    pub role: Role,
    token_sha256: String,
    pub paired_ms: i64,
}

/// A pairing request waiting for a manager.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Pending {
    request: String,
    pub code: String,
    pub name: String,
    pub expires_ms: i64,
    /// Set on confirmation; handed to the till at its next poll, then forgotten.
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    till_id: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    #[serde(default)]
    tills: Vec<Paired>,
    #[serde(default)]
    pending: Vec<Pending>,
}

/// The answer to a till polling its pairing request.
#[derive(Debug)]
pub enum Poll {
    Pending { expires_ms: i64 },
    Paired { token: String, till_id: String },
    Unknown,
}

/// Why a pairing call was refused.
#[derive(Debug, thiserror::Error)]
pub enum PairingError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("too many pairing requests; retry in a minute")]
    TooMany,
    #[error("pairing state: {0:#}")]
    Storage(#[from] anyhow::Error),
}

/// What identifies a version of the pairing file: modification time, size and inode (each
/// write renames a new file into place, so a change within one timestamp tick still shows).
type Stamp = Option<(std::time::SystemTime, u64, u64)>;

/// The pairing file and the daemon's cached view of it.
pub struct Pairing {
    path: PathBuf,
    cache: Mutex<(Stamp, Arc<State>)>,
    requests: Mutex<Vec<i64>>,
}

fn random_hex(bytes: usize) -> anyhow::Result<String> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
    Ok(crate::identity::hex(&buf))
}

fn sha256(text: &str) -> String {
    storebox_http::pinned::fingerprint(text.as_bytes())
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Pairing {
    /// Opens (creating its directory) the pairing state of `data_dir`.
    pub fn open(data_dir: &Path) -> anyhow::Result<Pairing> {
        let dir = data_dir.join("pairing");
        crate::identity::create_private_dir(&dir)?;
        Ok(Pairing {
            path: dir.join("tills.json"),
            cache: Mutex::new((None, Arc::new(State::default()))),
            requests: Mutex::new(Vec::new()),
        })
    }

    fn read(path: &Path) -> anyhow::Result<State> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("parsing {}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// The current state, re-read when the file changed.
    fn state(&self) -> anyhow::Result<Arc<State>> {
        use std::os::unix::fs::MetadataExt;
        let stamp = std::fs::metadata(&self.path)
            .ok()
            .and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())));
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.0 != stamp || stamp.is_none() {
            cache.1 = Arc::new(Pairing::read(&self.path)?);
            cache.0 = stamp;
        }
        Ok(cache.1.clone())
    }

    /// Changes the state under an exclusive lock, writing it back atomically.
    fn change<T>(
        &self,
        f: impl FnOnce(&mut State) -> Result<T, PairingError>,
    ) -> Result<T, PairingError> {
        let lock_path = self.path.with_extension("lock");
        let lock = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(0o600)
                .open(&lock_path)
                .with_context(|| format!("opening {}", lock_path.display()))?
        };
        crate::identity::hand_over(&lock, &lock_path);
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .with_context(|| format!("locking {}", lock_path.display()))?;
        let mut state = Pairing::read(&self.path)?;
        let now = now_ms();
        state.pending.retain(|p| p.expires_ms > now);
        let result = f(&mut state)?;
        let bytes = serde_json::to_vec_pretty(&state).context("encoding the pairing state")?;
        crate::identity::write_private(&self.path, &bytes)?;
        // This process's own change is seen at once, whatever the timestamps say.
        self.cache.lock().unwrap_or_else(|p| p.into_inner()).0 = None;
        // The lock is released when `lock` closes.
        Ok(result)
    }

    /// The role of a bearer token, if it belongs to a paired till or technician.
    pub fn authorize(&self, token: &str) -> Option<Role> {
        let state = match self.state() {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("{e:#}");
                return None;
            }
        };
        let digest = sha256(token);
        // Every entry is compared, in constant time, so timing tells nothing.
        let mut role = None;
        for till in &state.tills {
            if secrets_equal(till.token_sha256.as_bytes(), digest.as_bytes()) {
                role = Some(till.role);
            }
        }
        role
    }

    /// A till asks to pair: answers the request id and the code to show.
    pub fn request(&self, name: &str) -> Result<Pending, PairingError> {
        let name = check_name(name)?;
        {
            let now = now_ms();
            let mut requests = self.requests.lock().unwrap_or_else(|p| p.into_inner());
            requests.retain(|t| now - t < 60_000);
            if requests.len() >= MAX_REQUESTS_PER_MINUTE {
                return Err(PairingError::TooMany);
            }
            requests.push(now);
        }
        self.change(|state| {
            if state.pending.len() >= MAX_PENDING {
                return Err(PairingError::TooMany);
            }
            let mut code;
            loop {
                let mut n = [0u8; 4];
                getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("no randomness: {e}"))?;
                code = format!("{:06}", u32::from_le_bytes(n) % 1_000_000);
                if !state.pending.iter().any(|p| p.code == code) {
                    break;
                }
            }
            let pending = Pending {
                request: random_hex(16)?,
                code,
                name,
                expires_ms: now_ms() + PAIRING_LIFETIME_MS,
                token: None,
                till_id: None,
            };
            state.pending.push(pending.clone());
            Ok(pending)
        })
    }

    /// The request id of a pending request (for the till that made it).
    pub fn request_id(pending: &Pending) -> &str {
        &pending.request
    }

    /// A manager confirms the request showing `code`: the till is paired.
    pub fn confirm(&self, code: &str) -> Result<Paired, PairingError> {
        self.change(|state| {
            let Some(pending) = state
                .pending
                .iter_mut()
                .find(|p| p.code == code.trim() && p.token.is_none())
            else {
                return Err(PairingError::NotFound(format!(
                    "no pairing request waits with code {code:?}"
                )));
            };
            let token = random_hex(32)?;
            let till = Paired {
                id: random_hex(6)?,
                name: pending.name.clone(),
                role: Role::Till,
                token_sha256: sha256(&token),
                paired_ms: now_ms(),
            };
            pending.token = Some(token);
            pending.till_id = Some(till.id.clone());
            state.tills.push(till.clone());
            Ok(till)
        })
    }

    /// A till polls its request; a confirmed one gets its token, once.
    pub fn poll(&self, request: &str) -> Result<Poll, PairingError> {
        let state = self.state()?;
        let Some(found) = state.pending.iter().find(|p| {
            secrets_equal(p.request.as_bytes(), request.as_bytes()) && p.expires_ms > now_ms()
        }) else {
            return Ok(Poll::Unknown);
        };
        if found.token.is_none() {
            return Ok(Poll::Pending {
                expires_ms: found.expires_ms,
            });
        }
        self.change(|state| {
            let Some(i) = state
                .pending
                .iter()
                .position(|p| secrets_equal(p.request.as_bytes(), request.as_bytes()))
            else {
                return Ok(Poll::Unknown);
            };
            let pending = state.pending.remove(i);
            match (pending.token, pending.till_id) {
                (Some(token), Some(till_id)) => Ok(Poll::Paired { token, till_id }),
                _ => Ok(Poll::Unknown),
            }
        })
    }

    /// Pairs at once (provisioning, on the box): answers the till and its token.
    pub fn pair_now(&self, name: &str, role: Role) -> Result<(Paired, String), PairingError> {
        let name = check_name(name)?;
        self.change(|state| {
            let token = random_hex(32)?;
            let till = Paired {
                id: random_hex(6)?,
                name,
                role,
                token_sha256: sha256(&token),
                paired_ms: now_ms(),
            };
            state.tills.push(till.clone());
            Ok((till, token))
        })
    }

    /// A technician token for the command line on the box (`storebox status`, `sync`),
    /// replacing the previous one.
    pub fn local_token(&self) -> Result<String, PairingError> {
        const NAME: &str = "(storebox command line)";
        self.change(|state| {
            state.tills.retain(|t| t.name != NAME);
            let token = random_hex(32)?;
            state.tills.push(Paired {
                id: random_hex(6)?,
                name: NAME.into(),
                role: Role::Technician,
                token_sha256: sha256(&token),
                paired_ms: now_ms(),
            });
            Ok(token)
        })
    }

    /// Unpairs the till with this id (or, failing that, every till of this name).
    pub fn unpair(&self, id_or_name: &str) -> Result<usize, PairingError> {
        self.change(|state| {
            let before = state.tills.len();
            if state.tills.iter().any(|t| t.id == id_or_name) {
                state.tills.retain(|t| t.id != id_or_name);
            } else {
                state.tills.retain(|t| t.name != id_or_name);
            }
            match before - state.tills.len() {
                0 => Err(PairingError::NotFound(format!(
                    "no paired till {id_or_name:?}"
                ))),
                n => Ok(n),
            }
        })
    }

    /// The paired tills and the pending requests (codes included: for the manager).
    pub fn list(&self) -> anyhow::Result<(Vec<Paired>, Vec<Pending>)> {
        let state = self.state()?;
        let now = now_ms();
        Ok((
            state.tills.clone(),
            state
                .pending
                .iter()
                .filter(|p| p.expires_ms > now && p.token.is_none())
                .cloned()
                .collect(),
        ))
    }
}

fn check_name(name: &str) -> Result<String, PairingError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(PairingError::Invalid(
            "a till name is 1 to 64 characters of printable text".into(),
        ));
    }
    Ok(name.to_owned())
}

fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The till API's TLS: a self-signed certificate made on the box at first start and kept in
/// `<data_dir>/lan/` (key mode 0600). Tills pin its SHA-256 fingerprint, published by
/// discovery and on the status page; its names and dates do not matter to them, so it lives
/// ten years and never needs renewing. TLS 1.2 and 1.3 with rustls's default suites only
/// (all AEAD with forward secrecy).
pub fn lan_tls(
    data_dir: &Path,
    listen: std::net::SocketAddr,
) -> anyhow::Result<(tokio_rustls::TlsAcceptor, String)> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let dir = data_dir.join("lan");
    crate::identity::create_private_dir(&dir)?;
    let cert_path = dir.join("lan.crt");
    let key_path = dir.join("lan.key");
    if !cert_path.exists() || !key_path.exists() {
        let key = rcgen::KeyPair::generate().context("generating the LAN key")?;
        let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
        if !listen.ip().is_unspecified() && !listen.ip().is_loopback() {
            names.push(listen.ip().to_string());
        }
        let mut params =
            rcgen::CertificateParams::new(names).context("building the LAN certificate")?;
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CommonName, "storebox till API");
        params.distinguished_name = dn;
        let now = std::time::SystemTime::now();
        params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
        params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
        let cert = params
            .self_signed(&key)
            .context("signing the LAN certificate")?;
        crate::identity::write_private(&key_path, key.serialize_pem().as_bytes())?;
        crate::identity::write_private(&cert_path, cert.pem().as_bytes())?;
        tracing::info!("made the LAN TLS certificate {}", cert_path.display());
    }
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading {}", cert_path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parsing {}", cert_path.display()))?;
    let fingerprint = certs
        .first()
        .map(|c| storebox_http::pinned::fingerprint(c))
        .with_context(|| format!("{} holds no certificate", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("choosing TLS versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("loading the LAN certificate")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok((
        tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        fingerprint,
    ))
}

/// The fingerprint of the LAN certificate on disk, for the command line.
pub fn lan_fingerprint(data_dir: &Path) -> anyhow::Result<String> {
    use rustls_pki_types::pem::PemObject;
    let path = data_dir.join("lan").join("lan.crt");
    let cert = rustls_pki_types::CertificateDer::from_pem_file(&path)
        .with_context(|| format!("reading {} (has the daemon started once?)", path.display()))?;
    Ok(storebox_http::pinned::fingerprint(&cert))
}

/// Checks a name given on the command line.
pub fn check_cli_name(name: &str) -> anyhow::Result<()> {
    if let Err(e) = check_name(name) {
        bail!("{e}");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn pair_confirm_poll_once_and_unpair() {
        let dir = tempfile::tempdir().unwrap();
        let pairing = Pairing::open(dir.path()).unwrap();
        let pending = pairing.request("till 1").unwrap();
        assert_eq!(pending.code.len(), 6);
        let request = Pairing::request_id(&pending).to_owned();
        assert!(matches!(
            pairing.poll(&request).unwrap(),
            Poll::Pending { .. }
        ));
        assert!(pairing.confirm("000000x").is_err());
        let till = pairing.confirm(&pending.code).unwrap();
        let Poll::Paired { token, till_id } = pairing.poll(&request).unwrap() else {
            panic!("not paired");
        };
        assert_eq!(till_id, till.id);
        // The token is handed out once.
        assert!(matches!(pairing.poll(&request).unwrap(), Poll::Unknown));
        assert_eq!(pairing.authorize(&token), Some(Role::Till));
        assert_eq!(pairing.authorize("nope"), None);
        // Another process (the command line) changes the file: seen at once.
        let other = Pairing::open(dir.path()).unwrap();
        let (_, tech) = other.pair_now("tech", Role::Technician).unwrap();
        assert_eq!(pairing.authorize(&tech), Some(Role::Technician));
        assert_eq!(other.unpair(&till.id).unwrap(), 1);
        assert_eq!(pairing.authorize(&token), None);
        let text = std::fs::read_to_string(dir.path().join("pairing/tills.json")).unwrap();
        assert!(!text.contains(&tech), "a token is stored in clear");
    }

    #[test]
    fn pairing_requests_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let pairing = Pairing::open(dir.path()).unwrap();
        let mut refused = 0;
        for i in 0..MAX_REQUESTS_PER_MINUTE + 5 {
            if pairing.request(&format!("t{i}")).is_err() {
                refused += 1;
            }
        }
        assert!(refused >= 5, "{refused}");
        assert!(pairing.list().unwrap().1.len() <= MAX_PENDING);
    }
}
