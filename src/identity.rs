//! The box's identity towards the hub: its device key, its short-lived client certificate,
//! and the clock it trusts for certificate dates.
//!
//! - The device key (ECDSA P-256) is generated on the box and kept in
//!   `<data_dir>/identity/device.key`, mode 0600; it never leaves the box. The hub knows only
//!   its public half (`enroll.rs` proves possession by signing hub challenges).
//! - The current certificate (`device.crt`, with its dates in `device.json`) is held behind a
//!   lock and handed to rustls by a [`ResolvesClientCert`] at each new handshake: renewal
//!   swaps it in place, with no restart, while connections already open carry on with the
//!   certificate they started with.
//! - The clock rule (docs/SECURITY.md): a board without a real-time clock may boot in 1970.
//!   Certificate dates are judged against [`Clock::now_ms`]: the hub's own time, anchored to
//!   the monotonic clock, once the hub has been reached in this boot; before that, the later
//!   of the system clock and a persisted *floor* (the latest hub time seen, signed into the
//!   box's certificate or sent over the pinned TLS link). A clock behind therefore neither
//!   rejects valid certificates forever nor accepts any certificate that had expired by the
//!   last hub contact.
//!
//! This module does no networking; `enroll.rs` talks to the hub.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, SignatureScheme};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};

/// The floor is saved only when it moved this much: a few writes a day at most on flash.
const FLOOR_SAVE_STEP_MS: i64 = 10 * 60_000;

/// The dates of the current certificate, as the hub signed them.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct CertDates {
    pub not_before_ms: i64,
    pub not_after_ms: i64,
    /// The hub's clock when it signed.
    pub hub_time_ms: i64,
}

impl CertDates {
    /// When to renew: two thirds into the lifetime counted from issuance.
    pub fn renew_at_ms(&self) -> i64 {
        self.hub_time_ms + (self.not_after_ms - self.hub_time_ms) * 2 / 3
    }
}

struct Current {
    certified: Arc<CertifiedKey>,
    dates: CertDates,
    fingerprint: String,
}

/// The box's device key and current certificate.
pub struct Identity {
    dir: PathBuf,
    key: rcgen::KeyPair,
    public_hex: String,
    current: RwLock<Option<Current>>,
}

/// The time the box trusts for certificate dates (see the module doc).
pub struct Clock {
    /// The system clock (a parameter so tests can give a wrong one).
    system: fn() -> i64,
    floor_ms: AtomicI64,
    saved_floor_ms: AtomicI64,
    anchor: Mutex<Option<(i64, Instant)>>,
    floor_path: Mutex<Option<PathBuf>>,
}

/// The trusted time: the hub's anchored time when known, else the later of the system clock
/// and the floor. A pure function so the rule is tested without a clock.
pub fn trusted_now(system_ms: i64, floor_ms: i64, anchor: Option<(i64, Duration)>) -> i64 {
    match anchor {
        Some((hub_ms, elapsed)) => hub_ms.saturating_add(elapsed.as_millis() as i64),
        None => system_ms.max(floor_ms),
    }
}

impl Clock {
    const fn new(system: fn() -> i64) -> Clock {
        Clock {
            system,
            floor_ms: AtomicI64::new(0),
            saved_floor_ms: AtomicI64::new(0),
            anchor: Mutex::new(None),
            floor_path: Mutex::new(None),
        }
    }

    /// The system clock, shifted in debug builds by `STOREBOX_FAULT_CLOCK_OFFSET_S` so tests
    /// can boot a box with a wrong clock. A release box has no way to lie to itself.
    pub fn system_ms() -> i64 {
        let now = chrono::Utc::now().timestamp_millis();
        #[cfg(debug_assertions)]
        {
            let offset: i64 = std::env::var("STOREBOX_FAULT_CLOCK_OFFSET_S")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            now.saturating_add(offset.saturating_mul(1000))
        }
        #[cfg(not(debug_assertions))]
        now
    }

    /// Milliseconds since the epoch by the rule of the module doc.
    pub fn now_ms(&self) -> i64 {
        let anchor = *self.anchor.lock().unwrap_or_else(|p| p.into_inner());
        trusted_now(
            (self.system)(),
            self.floor_ms.load(Ordering::Relaxed),
            anchor.map(|(hub, at)| (hub, at.elapsed())),
        )
    }

    /// The hub's time, received over the pinned TLS link or signed into a certificate.
    pub fn observe_hub_time(&self, hub_ms: i64) {
        *self.anchor.lock().unwrap_or_else(|p| p.into_inner()) = Some((hub_ms, Instant::now()));
        self.raise_floor(hub_ms);
    }

    /// Raises the floor to `ms` (never lowers it), saving it when it moved enough.
    pub fn raise_floor(&self, ms: i64) {
        let previous = self.floor_ms.fetch_max(ms, Ordering::Relaxed);
        if ms <= previous {
            return;
        }
        if ms - self.saved_floor_ms.load(Ordering::Relaxed) < FLOOR_SAVE_STEP_MS {
            return;
        }
        let path = self
            .floor_path
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(path) = path {
            match write_private(&path, ms.to_string().as_bytes()) {
                Ok(()) => self.saved_floor_ms.store(ms, Ordering::Relaxed),
                Err(e) => tracing::warn!("saving the time floor: {e:#}"),
            }
        }
    }

    /// Loads the floor saved in `path` and saves there from now on.
    fn load_floor(&self, path: &Path) {
        let saved = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse::<i64>().ok())
            .unwrap_or(0);
        self.floor_ms.fetch_max(saved, Ordering::Relaxed);
        self.saved_floor_ms.fetch_max(saved, Ordering::Relaxed);
        *self.floor_path.lock().unwrap_or_else(|p| p.into_inner()) = Some(path.to_path_buf());
    }
}

static CLOCK: Clock = Clock::new(Clock::system_ms);
static IDENTITY: OnceLock<Arc<Identity>> = OnceLock::new();

/// The process's trusted clock.
pub fn clock() -> &'static Clock {
    &CLOCK
}

/// Makes `identity` the one whose certificate every hub connection presents.
pub fn install(identity: Arc<Identity>) {
    let _ = IDENTITY.set(identity);
}

/// The installed identity.
pub fn installed() -> Option<&'static Arc<Identity>> {
    IDENTITY.get()
}

impl Identity {
    /// Opens the identity directory `<data_dir>/identity`, generating the device key on first
    /// use, and loads the current certificate when there is one.
    pub fn open(data_dir: &Path) -> anyhow::Result<Identity> {
        let dir = data_dir.join("identity");
        create_private_dir(&dir)?;
        CLOCK.load_floor(&dir.join("time-floor"));
        let key_path = dir.join("device.key");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => rcgen::KeyPair::from_pem(&pem)
                .with_context(|| format!("parsing the device key {}", key_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = rcgen::KeyPair::generate().context("generating the device key")?;
                write_private(&key_path, key.serialize_pem().as_bytes())?;
                tracing::info!("generated the device key {}", key_path.display());
                key
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("reading the device key {}", key_path.display()))
            }
        };
        let public_hex = hex(key.public_key_raw());
        let identity = Identity {
            dir,
            key,
            public_hex,
            current: RwLock::new(None),
        };
        identity.load_certificate()?;
        Ok(identity)
    }

    /// Loads the certificate saved on disk again (after `storebox enroll` ran beside the
    /// daemon).
    pub fn reload(&self) -> anyhow::Result<()> {
        self.load_certificate()
    }

    fn load_certificate(&self) -> anyhow::Result<()> {
        let cert_path = self.dir.join("device.crt");
        let dates_path = self.dir.join("device.json");
        let (Ok(pem), Ok(dates)) = (
            std::fs::read_to_string(&cert_path),
            std::fs::read(&dates_path),
        ) else {
            return Ok(());
        };
        let dates: CertDates = serde_json::from_slice(&dates)
            .with_context(|| format!("parsing {}", dates_path.display()))?;
        self.set_certificate(&pem, dates)
            .with_context(|| format!("loading {}", cert_path.display()))
    }

    /// The device's public key: an uncompressed P-256 point, hex.
    pub fn public_key_hex(&self) -> &str {
        &self.public_hex
    }

    /// Signs `message` with the device key (ECDSA P-256, SHA-256, ASN.1), hex.
    pub fn sign(&self, message: &str) -> anyhow::Result<String> {
        use rcgen::SigningKey;
        let signature = self
            .key
            .sign(message.as_bytes())
            .context("signing with the device key")?;
        Ok(hex(&signature))
    }

    fn set_certificate(&self, pem: &str, dates: CertDates) -> anyhow::Result<()> {
        let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("parsing the certificate")?;
        let leaf = chain.first().context("the certificate file is empty")?;
        let fingerprint = storebox_http::pinned::fingerprint(leaf);
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()));
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider
            .key_provider
            .load_private_key(key)
            .context("loading the device key for TLS")?;
        let certified = Arc::new(CertifiedKey::new(chain, signing));
        // The hub signed its time into the certificate (not_before is a little before it).
        CLOCK.raise_floor(dates.not_before_ms);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Current {
            certified,
            dates,
            fingerprint,
        });
        // Sessions resumed from now on must carry this certificate, not the one before.
        SESSIONS.forget();
        Ok(())
    }

    /// Saves and swaps in a certificate the hub just issued; connections opened from now on
    /// present it.
    pub fn install_certificate(&self, pem: &str, dates: CertDates) -> anyhow::Result<()> {
        self.set_certificate(pem, dates)?;
        write_private(&self.dir.join("device.crt"), pem.as_bytes())?;
        let json = serde_json::to_vec(&dates).context("encoding the certificate dates")?;
        write_private(&self.dir.join("device.json"), &json)?;
        CLOCK.observe_hub_time(dates.hub_time_ms);
        Ok(())
    }

    /// The dates and fingerprint of the current certificate, if any.
    pub fn certificate(&self) -> Option<(CertDates, String)> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|c| (c.dates, c.fingerprint.clone()))
    }

    /// The certificate to present now: none once it has expired by the trusted clock, so an
    /// expired certificate does not fail the handshake and the box can still renew.
    fn presentable(&self) -> Option<Arc<CertifiedKey>> {
        let current = self.current.read().unwrap_or_else(|p| p.into_inner());
        let current = current.as_ref()?;
        (CLOCK.now_ms() < current.dates.not_after_ms).then(|| current.certified.clone())
    }
}

/// Hands the installed identity's certificate to rustls at each handshake.
#[derive(Debug)]
struct InstalledIdentity;

impl ResolvesClientCert for InstalledIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        installed()?.presentable()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Checks the hub's certificate against the pinned CA at the trusted time (the clock rule)
/// instead of the raw system clock.
struct ClockRuleVerifier {
    inner: Arc<rustls::client::WebPkiServerVerifier>,
    clock: &'static Clock,
}

impl std::fmt::Debug for ClockRuleVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClockRuleVerifier").finish_non_exhaustive()
    }
}

impl ServerCertVerifier for ClockRuleVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let now =
            UnixTime::since_unix_epoch(Duration::from_millis(self.clock.now_ms().max(0) as u64));
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The TLS client config of every connection to the hub: TLS 1.3, only the CA(s) in
/// `ca_file` trusted, dates judged by the clock rule, and the installed identity's current
/// certificate presented. Callers set ALPN.
pub fn hub_client_config(ca_file: &Path) -> anyhow::Result<rustls::ClientConfig> {
    client_config_with_clock(ca_file, &CLOCK)
}

fn client_config_with_clock(
    ca_file: &Path,
    clock: &'static Clock,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = clock_rule_verifier(ca_file, clock, provider.clone())?;
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .context("choosing TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(InstalledIdentity));
    // Resumption saves the shop's line the certificate chains at every reconnection. A
    // resumed session carries the client certificate of its first handshake, so the store
    // forgets every session when the certificate changes (renewal, enrollment).
    config.resumption = rustls::client::Resumption::store(SESSIONS.clone());
    Ok(config)
}

/// The TLS sessions the box may resume with the hub, all forgotten at once when the box's
/// certificate changes.
#[derive(Debug)]
struct Sessions(RwLock<Arc<rustls::client::ClientSessionMemoryCache>>);

/// Sessions kept: a box talks to one hub, a few are plenty.
const SESSIONS_KEPT: usize = 8;

static SESSIONS: std::sync::LazyLock<Arc<Sessions>> = std::sync::LazyLock::new(|| {
    Arc::new(Sessions(RwLock::new(Arc::new(
        rustls::client::ClientSessionMemoryCache::new(SESSIONS_KEPT),
    ))))
});

impl Sessions {
    fn current(&self) -> Arc<rustls::client::ClientSessionMemoryCache> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn forget(&self) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(rustls::client::ClientSessionMemoryCache::new(SESSIONS_KEPT));
    }
}

impl rustls::client::ClientSessionStore for Sessions {
    fn set_kx_hint(&self, server_name: ServerName<'static>, group: rustls::NamedGroup) {
        self.current().set_kx_hint(server_name, group);
    }

    fn kx_hint(&self, server_name: &ServerName<'_>) -> Option<rustls::NamedGroup> {
        self.current().kx_hint(server_name)
    }

    fn set_tls12_session(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls12ClientSessionValue,
    ) {
        self.current().set_tls12_session(server_name, value);
    }

    fn tls12_session(
        &self,
        server_name: &ServerName<'_>,
    ) -> Option<rustls::client::Tls12ClientSessionValue> {
        self.current().tls12_session(server_name)
    }

    fn remove_tls12_session(&self, server_name: &ServerName<'static>) {
        self.current().remove_tls12_session(server_name);
    }

    fn insert_tls13_ticket(
        &self,
        server_name: ServerName<'static>,
        value: rustls::client::Tls13ClientSessionValue,
    ) {
        self.current().insert_tls13_ticket(server_name, value);
    }

    fn take_tls13_ticket(
        &self,
        server_name: &ServerName<'static>,
    ) -> Option<rustls::client::Tls13ClientSessionValue> {
        self.current().take_tls13_ticket(server_name)
    }
}

fn clock_rule_verifier(
    ca_file: &Path,
    clock: &'static Clock,
    provider: Arc<rustls::crypto::CryptoProvider>,
) -> anyhow::Result<ClockRuleVerifier> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .with_context(|| format!("reading the hub CA {}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.with_context(|| format!("parsing the hub CA {}", ca_file.display()))?;
        // The CA's start of validity is a time the hub signed: the clock is at least that.
        if let Some(ms) = not_before_ms(&cert) {
            clock.raise_floor(ms);
        }
        roots
            .add(cert)
            .with_context(|| format!("loading the hub CA {}", ca_file.display()))?;
    }
    anyhow::ensure!(
        !roots.is_empty(),
        "the hub CA file {} holds no certificate",
        ca_file.display()
    );
    let inner =
        rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .context("building the hub certificate verifier")?;
    Ok(ClockRuleVerifier { inner, clock })
}

/// The `notBefore` of a DER certificate, in milliseconds since the epoch. A minimal DER walk
/// (Certificate → TBSCertificate → validity) so no X.509 parser is needed for one date;
/// `None` on anything unexpected.
pub fn not_before_ms(der: &[u8]) -> Option<i64> {
    // One TLV: (tag, content, rest).
    fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
        let (&tag, rest) = input.split_first()?;
        let (&first, mut rest) = rest.split_first()?;
        let len = if first < 0x80 {
            first as usize
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | *b as usize);
            rest = &rest[n..];
            len
        };
        if rest.len() < len {
            return None;
        }
        Some((tag, &rest[..len], &rest[len..]))
    }
    let (_, certificate, _) = tlv(der)?;
    let (_, mut tbs, _) = tlv(certificate)?;
    // Optional [0] version, then serial, signature algorithm, issuer, validity.
    let (tag, _, rest) = tlv(tbs)?;
    if tag == 0xa0 {
        tbs = rest;
        tbs = tlv(tbs)?.2; // serial
    } else {
        tbs = rest; // that was the serial
    }
    tbs = tlv(tbs)?.2; // signature algorithm
    tbs = tlv(tbs)?.2; // issuer
    let (_, validity, _) = tlv(tbs)?;
    let (tag, time, _) = tlv(validity)?;
    let text = std::str::from_utf8(time).ok()?;
    let full = match tag {
        // UTCTime YYMMDDHHMMSSZ: years 50-99 are 19xx.
        0x17 => {
            let yy: i32 = text.get(0..2)?.parse().ok()?;
            format!("{}{}", if yy >= 50 { 19 } else { 20 }, text)
        }
        // GeneralizedTime YYYYMMDDHHMMSSZ.
        0x18 => text.to_owned(),
        _ => return None,
    };
    chrono::NaiveDateTime::parse_from_str(full.trim_end_matches('Z'), "%Y%m%d%H%M%S")
        .ok()
        .map(|t| t.and_utc().timestamp_millis())
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Creates `dir` (mode 0700) if missing, owned like its parent (see [`hand_over`]).
pub fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    if let (Some(parent), Ok(meta)) = (dir.parent(), std::fs::metadata(dir)) {
        if let Ok(owner) = std::fs::metadata(parent) {
            if (owner.uid(), owner.gid()) != (meta.uid(), meta.gid()) {
                if let Err(e) = std::os::unix::fs::chown(dir, Some(owner.uid()), Some(owner.gid()))
                {
                    tracing::warn!(
                        "{} is not owned like {}: {e}",
                        dir.display(),
                        parent.display()
                    );
                }
            }
        }
    }
    Ok(())
}

/// Gives a file just written in the data directory to the directory's owner. The commands a
/// technician runs as root on the box (`storebox enroll`, `storebox pair`) would otherwise
/// leave files the daemon, running as `storebox`, cannot read; for an unprivileged caller
/// the owners already match and nothing happens.
pub fn hand_over(file: &std::fs::File, path: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Some(dir) = path.parent() else {
        return;
    };
    let (Ok(owner), Ok(meta)) = (std::fs::metadata(dir), file.metadata()) else {
        return;
    };
    if (owner.uid(), owner.gid()) != (meta.uid(), meta.gid()) {
        if let Err(e) = std::os::unix::fs::fchown(file, Some(owner.uid()), Some(owner.gid())) {
            tracing::warn!(
                "{} is not owned like {}: {e}",
                path.display(),
                dir.display()
            );
        }
    }
}

/// Writes a file readable by its owner only, atomically (temporary file, fsync, rename).
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    hand_over(&file, &tmp);
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    const NOW: i64 = 1_780_000_000_000;

    #[test]
    fn a_clock_behind_is_raised_to_the_floor() {
        // A board without RTC boots in 1970: the floor (last hub time) wins, so a hub
        // certificate valid since last month is accepted...
        assert_eq!(trusted_now(0, NOW, None), NOW);
        // ...and a correct clock ahead of the floor is used as it is.
        assert_eq!(trusted_now(NOW + DAY, NOW, None), NOW + DAY);
    }

    #[test]
    fn hub_time_wins_once_known() {
        // Whatever the system clock says, after contact the hub's time (plus the monotonic
        // time since) judges certificates: a clock ten years ahead cannot expire them.
        let anchored = trusted_now(NOW + 3650 * DAY, 0, Some((NOW, Duration::from_secs(60))));
        assert_eq!(anchored, NOW + 60_000);
        let behind = trusted_now(0, 0, Some((NOW, Duration::ZERO)));
        assert_eq!(behind, NOW);
    }

    fn ca_and_server(not_before: i64, not_after: i64) -> (String, CertificateDer<'static>) {
        use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
        let at = |ms: i64| std::time::UNIX_EPOCH + Duration::from_millis(ms as u64);
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.not_before = at(NOW - 3650 * DAY).into();
        ca.not_after = at(NOW + 3650 * DAY).into();
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let key = KeyPair::generate().unwrap();
        let mut server = CertificateParams::new(vec!["hub.example".to_owned()]).unwrap();
        server.not_before = at(not_before).into();
        server.not_after = at(not_after).into();
        let cert = server.signed_by(&key, &Issuer::new(ca, ca_key)).unwrap();
        (ca_pem, cert.der().clone())
    }

    fn verify_with(system: fn() -> i64, floor: i64, not_before: i64, not_after: i64) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let (ca_pem, server) = ca_and_server(not_before, not_after);
        std::fs::write(dir.path().join("ca.crt"), ca_pem).unwrap();
        let clock: &'static Clock = Box::leak(Box::new(Clock::new(system)));
        clock.raise_floor(floor);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = clock_rule_verifier(&dir.path().join("ca.crt"), clock, provider).unwrap();
        let name = ServerName::try_from("hub.example").unwrap();
        verifier
            .verify_server_cert(&server, &[], &name, &[], UnixTime::now())
            .is_ok()
    }

    #[test]
    fn a_box_in_1970_accepts_a_valid_hub_certificate_and_refuses_an_expired_one() {
        fn in_1970() -> i64 {
            0
        }
        // Valid since last month for a year: accepted although the clock says 1970.
        assert!(verify_with(in_1970, NOW, NOW - 30 * DAY, NOW + 365 * DAY));
        // Expired yesterday, before the last hub time the box saw: refused, although by the
        // 1970 clock it would look valid.
        assert!(!verify_with(in_1970, NOW, NOW - 365 * DAY, NOW - DAY));
        // The CA's own start of validity raises the floor even with no hub time seen yet: a
        // certificate expired before the CA existed is refused.
        assert!(!verify_with(in_1970, 0, 1, 1000));
    }

    #[test]
    fn not_before_is_read_from_der() {
        let (_, server) = ca_and_server(NOW - DAY, NOW + DAY);
        assert_eq!(not_before_ms(&server), Some(NOW - DAY));
        assert_eq!(not_before_ms(b"garbage"), None);
    }

    #[test]
    fn files_written_by_root_go_to_the_data_directory_owner() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        // As root (CI, a technician's shell on the box) the data directory can belong to
        // another user, as it belongs to `storebox` on a board; unprivileged, it stays ours
        // and nothing changes hands.
        let _ = std::os::unix::fs::chown(&data, Some(65534), Some(65534));
        let want = std::fs::metadata(&data).unwrap();
        write_private(&data.join("f"), b"x").unwrap();
        create_private_dir(&data.join("sub")).unwrap();
        for path in [data.join("f"), data.join("sub")] {
            let meta = std::fs::metadata(&path).unwrap();
            assert_eq!(
                (meta.uid(), meta.gid()),
                (want.uid(), want.gid()),
                "{}",
                path.display()
            );
        }
    }

    #[test]
    fn renewal_is_at_two_thirds() {
        let dates = CertDates {
            not_before_ms: NOW - 300_000,
            not_after_ms: NOW + DAY,
            hub_time_ms: NOW,
        };
        assert_eq!(dates.renew_at_ms(), NOW + 16 * 3_600_000);
    }

    #[test]
    fn the_device_key_is_private_and_kept() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Identity::open(dir.path()).unwrap();
        let key = dir.path().join("identity/device.key");
        let mode = std::fs::metadata(&key).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "the device key is readable by others");
        let b = Identity::open(dir.path()).unwrap();
        assert_eq!(a.public_key_hex(), b.public_key_hex());
        assert_eq!(a.public_key_hex().len(), 130);
    }
}
