//! Firmware updates: signed RAUC bundles installed into the other root filesystem slot, from a
//! technician on the LAN or from the hub, with a health check that decides whether the new
//! slot is kept. The whole story, and the alternatives we rejected, is in `docs/OTA.md`.
//!
//! Privileges are split. The daemon (user `storebox`, sandboxed) only receives bundles into
//! `<data_dir>/ota/` and writes an install request there; `storebox ota apply`, a root oneshot
//! started by a path unit when the request appears, checks the bundle with RAUC, installs
//! it, asks the daemon for a safe moment and reboots. After the reboot `storebox ota
//! mark-good`, another root oneshot, waits for the daemon to be healthy and marks the slot
//! good; a slot on trial that never becomes healthy is rebooted until U-Boot's boot counter
//! runs out and the previous slot boots again, where the daemon reports the rollback.
//!
//! The shared state is `<data_dir>/ota/state.json`, changed under an exclusive `flock` by
//! whichever process acts, and written atomically.
//!
//! Owns: the update state, the bundle's journey (receive, download, check, install), the
//! health verdict for a new slot. Knows the hub only through the sync link.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use storebox_protocol as proto;
use storebox_protocol::ota as wire;

/// Space left free on the data partition beyond a bundle: the database and the activity
/// journal must keep room to grow while a bundle waits there.
pub const SPACE_RESERVE: u64 = 64 * 1024 * 1024;

/// Largest chunk of one LAN upload request.
pub const MAX_UPLOAD_CHUNK: usize = 16 * 1024 * 1024;

/// How many events the state keeps (the newest).
const MAX_EVENTS: usize = 20;

/// `[ota]` settings, checked.
#[derive(Debug, Clone)]
pub struct OtaSettings {
    pub enabled: bool,
    pub window: Window,
    pub check_interval: Duration,
    pub health_timeout: Duration,
    pub offline_grace: Duration,
    pub download_rate: Option<u64>,
    pub version_file: PathBuf,
    pub rauc_conf: PathBuf,
    pub rauc: PathBuf,
    pub mark_good_command: PathBuf,
}

/// When an update from the hub may be installed, in minutes of the local day.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Window {
    Always,
    /// From the first minute (included) to the second (excluded); spans midnight when the
    /// first is later.
    Between(u32, u32),
}

impl Window {
    pub fn parse(text: &str) -> Result<Window, String> {
        let text = text.trim();
        if text == "always" {
            return Ok(Window::Always);
        }
        let minute = |t: &str| {
            let (h, m) = t.trim().split_once(':')?;
            let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
            (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
        };
        let (from, to) = text
            .split_once('-')
            .and_then(|(a, b)| Some((minute(a)?, minute(b)?)))
            .ok_or_else(|| format!("{text:?} is neither \"HH:MM-HH:MM\" nor \"always\""))?;
        if from == to {
            return Err(format!("{text:?} is empty; use \"always\" for any time"));
        }
        Ok(Window::Between(from, to))
    }

    pub fn contains(self, minute_of_day: u32) -> bool {
        match self {
            Window::Always => true,
            Window::Between(from, to) if from < to => (from..to).contains(&minute_of_day),
            Window::Between(from, to) => minute_of_day >= from || minute_of_day < to,
        }
    }

    /// Whether the local time now is inside.
    pub fn open_now(self) -> bool {
        use chrono::Timelike;
        let now = chrono::Local::now();
        self.contains(now.hour() * 60 + now.minute())
    }
}

/// What the running image is.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Image {
    /// From the image's version file; empty when the box does not run from an image.
    pub version: String,
    /// RAUC's `compatible` for this board; empty when RAUC is not configured.
    pub compatible: String,
    /// The booted slot, `A` or `B`, from the kernel command line; empty when unknown.
    pub slot: String,
}

impl Image {
    pub fn read(settings: &OtaSettings) -> Image {
        let version = std::fs::read_to_string(&settings.version_file)
            .map(|s| s.trim().to_owned())
            .unwrap_or_default();
        let compatible = std::fs::read_to_string(&settings.rauc_conf)
            .map(|text| rauc_conf(&text).0)
            .unwrap_or_default();
        let slot = std::fs::read_to_string("/proc/cmdline")
            .ok()
            .and_then(|c| {
                c.split_whitespace()
                    .find_map(|a| a.strip_prefix("rauc.slot=").map(str::to_owned))
            })
            .unwrap_or_default();
        Image {
            version,
            compatible,
            slot,
        }
    }

    /// The slot an install writes: the one not booted.
    pub fn other_slot(&self) -> Option<&'static str> {
        match self.slot.as_str() {
            "A" => Some("B"),
            "B" => Some("A"),
            _ => None,
        }
    }
}

/// `compatible` of `[system]` and `path` of `[keyring]` in RAUC's ini-style system config.
fn rauc_conf(text: &str) -> (String, Option<String>) {
    let mut section = "";
    let (mut compatible, mut keyring) = (String::new(), None);
    for line in text.lines().map(str::trim) {
        if line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name;
            continue;
        }
        let Some((key, value)) = line.split_once('=') else {
            continue;
        };
        match (section, key.trim()) {
            ("system", "compatible") => compatible = value.trim().to_owned(),
            ("keyring", "path") => keyring = Some(value.trim().to_owned()),
            _ => {}
        }
    }
    (compatible, keyring)
}

/// This boot's id: tells a reboot from a daemon restart.
pub fn boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The files of the update state.
#[derive(Debug, Clone)]
pub struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path) -> Paths {
        Paths {
            dir: data_dir.join("ota"),
        }
    }
    /// The bundle being received or downloaded.
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("incoming.raucb")
    }
    /// What is known of it: where it comes from, its size and hash.
    pub fn bundle_meta(&self) -> PathBuf {
        self.dir.join("incoming.json")
    }
    /// The install request the path unit watches.
    pub fn request(&self) -> PathBuf {
        self.dir.join("apply.request")
    }
    pub fn state(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    fn lock(&self) -> PathBuf {
        self.dir.join("state.lock")
    }
    /// Copies of the database made before a schema migration, kept until the new slot is
    /// marked good (see `migrate.rs`).
    pub fn rollback(&self) -> PathBuf {
        self.dir.join("rollback")
    }

    fn ensure(&self) -> anyhow::Result<()> {
        if !self.dir.is_dir() {
            std::fs::create_dir_all(&self.dir)
                .with_context(|| format!("creating {}", self.dir.display()))?;
            if let Ok(dir) = std::fs::File::open(&self.dir) {
                crate::identity::hand_over(&dir, &self.dir);
            }
        }
        Ok(())
    }
}

/// Where an update stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Idle,
    /// A bundle is being received from the LAN or downloaded from the hub.
    Receiving,
    /// A complete bundle waits for its install (the maintenance window, for the hub's).
    Received,
    /// The root oneshot is checking and installing it.
    Installing,
    /// Installed in the other slot; the box reboots into it at a safe moment.
    Installed,
    /// Booted into the new slot, which is not yet marked good.
    Trial,
}

/// One thing that happened, kept for the status page and reported to the hub.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Event {
    pub event: wire::OtaEvent,
    pub at_ms: i64,
    pub reported: bool,
}

/// Where the bundle in `incoming.raucb` comes from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BundleMeta {
    /// "lan" or "hub".
    pub source: String,
    /// What the sender called it (a file name or URL), for the status page.
    pub name: String,
    /// The whole bundle's size.
    pub total: u64,
    /// The hub's version and SHA-256 (hex) for a hub download.
    pub version: Option<String>,
    pub sha256: Option<String>,
}

/// The install request: written by the daemon, taken by `storebox ota apply`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub attempt: u64,
    pub force_downgrade: bool,
    pub source: String,
}

/// The update state shared by the daemon and the root oneshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    pub phase: Phase,
    /// Which install request the phase belongs to.
    pub attempt: u64,
    /// The version being installed or on trial.
    pub version: Option<String>,
    /// The slot it was installed into.
    pub slot: Option<String>,
    pub from_version: Option<String>,
    pub from_slot: Option<String>,
    /// The boot during which it was installed.
    pub install_boot: Option<String>,
    /// When the install started, for the time to healthy.
    pub started_ms: Option<i64>,
    /// Why each boot of the slot on trial failed its health check.
    pub boot_failures: Vec<String>,
    /// Versions that failed or rolled back: the hub's offer of one of them is not taken
    /// again (a technician may still install it).
    pub refused: Vec<String>,
    pub events: Vec<Event>,
}

impl State {
    pub fn push(&mut self, event: wire::OtaEvent) {
        self.events.push(Event {
            event,
            at_ms: now_ms(),
            reported: false,
        });
        let excess = self.events.len().saturating_sub(MAX_EVENTS);
        self.events.drain(..excess);
    }

    fn refuse(&mut self, version: &str) {
        if !self.refused.iter().any(|v| v == version) {
            self.refused.push(version.to_owned());
        }
    }

    /// Whether the booted slot is an installed one not yet marked good.
    pub fn on_trial(&self, image: &Image, boot: &str) -> bool {
        matches!(self.phase, Phase::Installed | Phase::Trial)
            && self.slot.as_deref() == Some(image.slot.as_str())
            && self.install_boot.as_deref() != Some(boot)
    }
}

pub fn now_ms() -> i64 {
    crate::identity::Clock::system_ms()
}

/// Reads the state without the lock (a reader may see the previous version, never half of
/// one: writes are atomic).
pub fn read_state(paths: &Paths) -> State {
    match std::fs::read(paths.state()) {
        Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            tracing::warn!(
                "{}: unreadable ({e}); starting afresh",
                paths.state().display()
            );
            State::default()
        }),
        Err(_) => State::default(),
    }
}

/// Changes the state under the lock and writes it back.
pub fn with_state<T>(paths: &Paths, f: impl FnOnce(&mut State) -> T) -> anyhow::Result<T> {
    paths.ensure()?;
    let lock_path = paths.lock();
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
    let mut state = read_state(paths);
    let out = f(&mut state);
    let bytes = serde_json::to_vec_pretty(&state).context("encoding the update state")?;
    crate::identity::write_private(&paths.state(), &bytes)?;
    Ok(out)
}

pub fn read_meta(paths: &Paths) -> Option<BundleMeta> {
    serde_json::from_slice(&std::fs::read(paths.bundle_meta()).ok()?).ok()
}

fn write_meta(paths: &Paths, meta: &BundleMeta) -> anyhow::Result<()> {
    paths.ensure()?;
    let bytes = serde_json::to_vec(meta).context("encoding the bundle's description")?;
    crate::identity::write_private(&paths.bundle_meta(), &bytes)
}

/// Bytes of the bundle on disk.
pub fn received(paths: &Paths) -> u64 {
    std::fs::metadata(paths.bundle()).map_or(0, |m| m.len())
}

/// Forgets the bundle on disk.
pub fn discard(paths: &Paths) {
    for p in [paths.bundle(), paths.bundle_meta()] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => tracing::warn!("removing {}: {e}", p.display()),
        }
    }
}

/// Bytes free for the daemon on the data partition.
pub fn free_space(dir: &Path) -> anyhow::Result<u64> {
    let s = rustix::fs::statvfs(dir).with_context(|| format!("statvfs {}", dir.display()))?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Refuses a bundle of `total` bytes that would leave the data partition without its reserve.
pub fn check_space(paths: &Paths, total: u64) -> anyhow::Result<()> {
    paths.ensure()?;
    let have = received(paths);
    let free = free_space(&paths.dir)?;
    let need = total.saturating_sub(have).saturating_add(SPACE_RESERVE);
    if need > free {
        bail!(
            "not enough space on the data partition for a {} MiB bundle: {} MiB free, {} MiB \
             needed (the bundle plus {} MiB kept for the shop's data)",
            total >> 20,
            free >> 20,
            need >> 20,
            SPACE_RESERVE >> 20
        );
    }
    Ok(())
}

/// Appends one chunk of a LAN upload at `offset` of a bundle of `total` bytes. A chunk at 0
/// starts a new upload; any other offset must be where the previous chunk ended (a cut
/// upload resumes from `received`).
pub fn receive_chunk(
    paths: &Paths,
    name: &str,
    offset: u64,
    total: u64,
    chunk: &[u8],
) -> Result<u64, UploadError> {
    let state = read_state(paths);
    if matches!(state.phase, Phase::Installing | Phase::Installed) {
        return Err(UploadError::Busy(state.phase));
    }
    if offset == 0 {
        discard(paths);
        check_space(paths, total).map_err(UploadError::Space)?;
        write_meta(
            paths,
            &BundleMeta {
                source: "lan".into(),
                name: name.chars().take(200).collect(),
                total,
                version: None,
                sha256: None,
            },
        )
        .map_err(UploadError::Io)?;
    } else {
        match read_meta(paths) {
            Some(meta) if meta.source == "lan" && meta.total == total => {}
            _ => return Err(UploadError::Offset { received: 0 }),
        }
    }
    let have = received(paths);
    if offset != have {
        return Err(UploadError::Offset { received: have });
    }
    if offset + chunk.len() as u64 > total {
        return Err(UploadError::TooLong { total });
    }
    let path = paths.bundle();
    let write = || -> std::io::Result<()> {
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        file.write_all(chunk)?;
        file.sync_data()
    };
    write()
        .with_context(|| format!("writing {}", path.display()))
        .map_err(UploadError::Io)?;
    let now = offset + chunk.len() as u64;
    let phase = if now == total {
        Phase::Received
    } else {
        Phase::Receiving
    };
    with_state(paths, |s| s.phase = phase).map_err(UploadError::Io)?;
    Ok(now)
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("an update is being installed ({0:?}); try again once it is done")]
    Busy(Phase),
    #[error("{0:#}")]
    Space(anyhow::Error),
    #[error("this chunk does not follow the bytes received: resume from byte {received}")]
    Offset { received: u64 },
    #[error("the chunk goes past the announced size of {total} bytes")]
    TooLong { total: u64 },
    #[error("{0:#}")]
    Io(anyhow::Error),
}

/// Queues the complete bundle on disk for `storebox ota apply`; returns the attempt number.
pub fn request_install(paths: &Paths, force_downgrade: bool) -> anyhow::Result<u64> {
    let meta = read_meta(paths).context("no bundle has been received")?;
    let have = received(paths);
    if have != meta.total {
        bail!(
            "the bundle is incomplete: {have} of {} bytes received; resume the upload",
            meta.total
        );
    }
    let attempt = with_state(paths, |s| -> anyhow::Result<u64> {
        if matches!(s.phase, Phase::Installing | Phase::Installed) {
            bail!("an update is already being installed");
        }
        s.attempt = s.attempt.wrapping_add(1).max(now_ms() as u64);
        s.phase = Phase::Received;
        Ok(s.attempt)
    })??;
    let request = Request {
        attempt,
        force_downgrade,
        source: meta.source,
    };
    let bytes = serde_json::to_vec(&request).context("encoding the install request")?;
    crate::identity::write_private(&paths.request(), &bytes)?;
    Ok(attempt)
}

/// The `ota` block of `/v1/status` and `GET /v1/ota`.
pub fn status_doc(
    paths: &Paths,
    image: &Image,
    health: &serde_json::Value,
    target: Option<&wire::OtaTarget>,
) -> serde_json::Value {
    let state = read_state(paths);
    let meta = read_meta(paths);
    let last = state.events.last().map(event_doc);
    serde_json::json!({
        "running": image.version,
        "compatible": image.compatible,
        "slot": image.slot,
        "phase": state.phase,
        "attempt": state.attempt,
        "version": state.version,
        "target": target.map(|t| serde_json::json!({"version": t.version, "size": t.size})),
        "incoming": meta.map(|m| serde_json::json!({
            "source": m.source, "name": m.name, "total": m.total,
            "received": received(paths), "version": m.version,
        })),
        "last": last,
        "events": state.events.iter().rev().map(event_doc).collect::<Vec<_>>(),
        "refused": state.refused,
        "health": health,
    })
}

fn event_doc(e: &Event) -> serde_json::Value {
    let (kind, version, reason) = match &e.event {
        wire::OtaEvent::Downloaded { version } => ("downloaded", version, None),
        wire::OtaEvent::Installed { version } => ("installed", version, None),
        wire::OtaEvent::Healthy { version } => ("healthy", version, None),
        wire::OtaEvent::Failed { version, reason } => ("failed", version, Some(reason)),
        wire::OtaEvent::RolledBack { version, reason } => ("rolled_back", version, Some(reason)),
    };
    serde_json::json!({
        "event": kind,
        "version": version,
        "reason": reason,
        "at": chrono::DateTime::from_timestamp_millis(e.at_ms)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)),
        "reported": e.reported,
    })
}

// --- the root oneshot: check and install ------------------------------------------------

/// What RAUC says of a bundle whose signature it verified.
#[derive(Debug)]
pub struct BundleInfo {
    pub version: String,
    pub compatible: String,
}

/// Runs `rauc info`: verifies the signature against the keyring of RAUC's config and reads
/// the manifest.
pub fn rauc_info(settings: &OtaSettings, bundle: &Path) -> anyhow::Result<BundleInfo> {
    let mut cmd = std::process::Command::new(&settings.rauc);
    cmd.arg(format!("--conf={}", settings.rauc_conf.display()))
        .arg("info")
        .arg("--output-format=json")
        .arg(bundle);
    let out = cmd
        .output()
        .with_context(|| format!("running {}", settings.rauc.display()))?;
    if !out.status.success() {
        bail!(
            "the bundle does not check: {}",
            rauc_error(&String::from_utf8_lossy(&out.stderr))
        );
    }
    // RAUC prints its JSON on one line of stdout, possibly after informational lines.
    let stdout = String::from_utf8_lossy(&out.stdout);
    let doc: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
        .context("rauc info printed no JSON")?;
    let field = |k: &str| doc[k].as_str().unwrap_or_default().to_owned();
    Ok(BundleInfo {
        version: field("version"),
        compatible: field("compatible"),
    })
}

/// The useful lines of RAUC's error output, without its log prefixes.
fn rauc_error(stderr: &str) -> String {
    // RAUC's informational lines ("rauc-Message: <time>: Reading bundle...") say what it
    // did, not what went wrong: keep the others when there are any.
    let all: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let errors: Vec<&str> = all
        .iter()
        .copied()
        .filter(|l| !l.starts_with("rauc-Message:"))
        .collect();
    let lines = if errors.is_empty() { all } else { errors };
    let text = lines
        .iter()
        .rev()
        .take(3)
        .rev()
        .copied()
        .collect::<Vec<_>>()
        .join(" / ");
    if text.is_empty() {
        "rauc failed without a message".into()
    } else {
        text.chars().take(600).collect()
    }
}

/// The checks before an install, each with the reason a technician reads.
pub fn check_bundle(
    settings: &OtaSettings,
    image: &Image,
    bundle: &Path,
    total: Option<u64>,
    force_downgrade: bool,
) -> anyhow::Result<BundleInfo> {
    let len = std::fs::metadata(bundle)
        .with_context(|| format!("reading {}", bundle.display()))?
        .len();
    if let Some(total) = total {
        if len != total {
            bail!("the bundle is truncated: {len} of {total} bytes");
        }
    }
    if image.compatible.is_empty() {
        bail!(
            "this box has no RAUC configuration ({} missing or without compatible=): it does \
             not run from an updatable image",
            settings.rauc_conf.display()
        );
    }
    let info = rauc_info(settings, bundle)?;
    if info.compatible != image.compatible {
        bail!(
            "the bundle is for {:?}, this box is {:?}",
            info.compatible,
            image.compatible
        );
    }
    if !wire::is_valid_version(&info.version) {
        bail!(
            "the bundle's version {:?} is not a valid version",
            info.version
        );
    }
    if !image.version.is_empty()
        && wire::compare_versions(&info.version, &image.version) != std::cmp::Ordering::Greater
        && !force_downgrade
    {
        bail!(
            "the bundle is version {}, not newer than the running {}: refused (a technician \
             may force it with --force-downgrade)",
            info.version,
            image.version
        );
    }
    Ok(info)
}

/// `storebox ota apply`: takes the install request, checks and installs the bundle, then
/// reboots at a safe moment. Run as root by `storebox-ota-apply.service`.
pub fn apply(config: &crate::config::BoxConfig, reboot: bool) -> anyhow::Result<()> {
    let settings = config.ota_settings()?;
    let paths = Paths::new(&config.data_dir);
    let bytes = match std::fs::read(paths.request()) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            println!("no install request");
            return Ok(());
        }
        Err(e) => return Err(e).context(format!("reading {}", paths.request().display())),
    };
    // Taken before anything else, even a request that does not parse: the path unit must
    // not start again on the same request.
    std::fs::remove_file(paths.request())
        .with_context(|| format!("removing {}", paths.request().display()))?;
    let request: Request = serde_json::from_slice(&bytes)
        .with_context(|| format!("reading {}", paths.request().display()))?;
    let image = Image::read(&settings);
    let started = now_ms();
    with_state(&paths, |s| {
        s.phase = Phase::Installing;
        s.attempt = request.attempt;
        s.started_ms = Some(started);
    })?;
    let meta = read_meta(&paths);
    let outcome = install(&settings, &image, &paths, meta.as_ref(), &request);
    let boot = boot_id();
    match outcome {
        Ok((info, slot)) => {
            discard(&paths);
            with_state(&paths, |s| {
                s.phase = Phase::Installed;
                s.version = Some(info.version.clone());
                s.slot = Some(slot.clone());
                s.from_version = Some(image.version.clone());
                s.from_slot = Some(image.slot.clone());
                s.install_boot = Some(boot);
                s.boot_failures.clear();
                s.refused.retain(|v| *v != info.version);
                s.push(wire::OtaEvent::Installed {
                    version: info.version.clone(),
                });
            })?;
            println!(
                "installed {} into slot {slot} in {:.1} s",
                info.version,
                (now_ms() - started) as f64 / 1000.0
            );
            if reboot {
                reboot_safely(config)?;
            }
            Ok(())
        }
        Err(e) => {
            let reason = format!("{e:#}");
            let version = meta
                .and_then(|m| m.version)
                .unwrap_or_else(|| "unknown".into());
            discard(&paths);
            with_state(&paths, |s| {
                s.phase = Phase::Idle;
                if version != "unknown" {
                    s.refuse(&version);
                }
                s.push(wire::OtaEvent::Failed {
                    version,
                    reason: reason.clone(),
                });
            })?;
            Err(e)
        }
    }
}

fn install(
    settings: &OtaSettings,
    image: &Image,
    paths: &Paths,
    meta: Option<&BundleMeta>,
    request: &Request,
) -> anyhow::Result<(BundleInfo, String)> {
    let bundle = paths.bundle();
    let meta = meta.context("no bundle has been received")?;
    let info = check_bundle(
        settings,
        image,
        &bundle,
        Some(meta.total),
        request.force_downgrade,
    )?;
    if let Some(want) = &meta.version {
        if *want != info.version {
            bail!(
                "the hub offered version {want} but the bundle says {}",
                info.version
            );
        }
    }
    let slot = image
        .other_slot()
        .context("the booted slot is unknown (no rauc.slot= on the kernel command line)")?;
    verify_payload(settings, &bundle)?;
    tracing::info!("installing {} into slot {slot}", info.version);
    // No --conf: `rauc install` hands the bundle to RAUC's service, which runs with the
    // system's own config; the checks above read the same file.
    let out = std::process::Command::new(&settings.rauc)
        .arg("install")
        .arg(&bundle)
        .output()
        .with_context(|| format!("running {}", settings.rauc.display()))?;
    if !out.status.success() {
        bail!(
            "rauc install failed: {}",
            rauc_error(&String::from_utf8_lossy(&out.stderr))
        );
    }
    Ok((info, slot.to_owned()))
}

/// Where `verify_payload` mounts a bundle (RAUC adds `/bundle`).
const VERIFY_MOUNT: &str = "/run/storebox-ota";

/// Reads the whole payload once through RAUC's dm-verity mount before installing. `rauc
/// install` checks the payload only while it writes it: a bundle changed after signing fails
/// in the middle, after RAUC has already taken the other slot out of the boot order. Read
/// first, a tampered bundle is refused with nothing changed.
fn verify_payload(settings: &OtaSettings, bundle: &Path) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mounted = Path::new(VERIFY_MOUNT).join("bundle");
    std::fs::create_dir_all(&mounted).with_context(|| format!("creating {}", mounted.display()))?;
    let out = std::process::Command::new(&settings.rauc)
        .arg(format!("--conf={}", settings.rauc_conf.display()))
        .arg(format!("--mount={VERIFY_MOUNT}"))
        .arg("mount")
        .arg(bundle)
        .output()
        .with_context(|| format!("running {} mount", settings.rauc.display()))?;
    if !out.status.success() {
        bail!(
            "the bundle's payload cannot be opened: {}",
            rauc_error(&String::from_utf8_lossy(&out.stderr))
        );
    }
    let read = read_tree(&mounted);
    let unmounted = std::process::Command::new("umount")
        .arg(&mounted)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !unmounted {
        tracing::warn!("could not unmount {}", mounted.display());
    }
    let bytes = read.map_err(|e| {
        anyhow::anyhow!(
            "the bundle's payload does not match its signature (dm-verity: {e}); the bundle \
             was changed after it was signed"
        )
    })?;
    tracing::info!(
        "payload verified: {} MiB in {:.1} s",
        bytes >> 20,
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Reads every file under `dir`, returning the bytes read.
fn read_tree(dir: &Path) -> std::io::Result<u64> {
    let mut total = 0;
    let mut buf = vec![0u8; 1 << 20];
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_dir() {
            total += read_tree(&entry.path())?;
        } else if kind.is_file() {
            let mut file = std::fs::File::open(entry.path())?;
            loop {
                let n = file.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
        }
    }
    Ok(total)
}

/// Asks the daemon for a safe moment (no sale in flight, activity committed and pushed if the
/// hub answers), then reboots.
fn reboot_safely(config: &crate::config::BoxConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    match runtime.block_on(crate::daemon_call(
        config,
        http::Method::POST,
        "/v1/ota/quiesce",
    )) {
        Ok(doc) => println!("the daemon is ready for the reboot: {doc}"),
        // A daemon that does not answer has nothing in flight; its journal is durable.
        Err(e) => eprintln!("the daemon did not answer the quiesce call ({e:#}); rebooting"),
    }
    reboot_now()
}

fn reboot_now() -> anyhow::Result<()> {
    let status = std::process::Command::new("systemctl")
        .arg("reboot")
        .status()
        .context("running systemctl reboot")?;
    if !status.success() {
        bail!("systemctl reboot failed: {status}");
    }
    Ok(())
}

// --- after the reboot: the health check -------------------------------------------------

/// `storebox ota mark-good`: waits for the daemon to be healthy, then marks the booted slot
/// good. A slot on trial that does not become healthy is rebooted, which costs it one of its
/// boot attempts; when they run out U-Boot boots the previous slot.
///
/// Only a slot on trial fails the command (its unit then reboots, `FailureAction=reboot`, as
/// it does when this binary cannot run at all): on a slot marked good before, a problem is
/// reported and the slot left unmarked, since falling back to an older release would not
/// help the shop with, say, a full disk.
pub fn mark_good(config_path: &Path) -> anyhow::Result<()> {
    let mut trial = false;
    match mark_good_checked(config_path, &mut trial) {
        Err(e) if !trial => {
            eprintln!(
                "storebox: warning: {e:#} (this slot is not on trial: it is left as it is, \
                 not rebooted)"
            );
            Ok(())
        }
        outcome => outcome,
    }
}

fn mark_good_checked(config_path: &Path, on_trial: &mut bool) -> anyhow::Result<()> {
    let loaded = crate::config::BoxConfig::load(config_path);
    let (data_dir, settings) = match &loaded {
        Ok(c) => (c.data_dir.clone(), c.ota_settings()?),
        Err(_) => (
            PathBuf::from("/var/lib/storebox"),
            crate::config::OtaConfig::default().settings()?,
        ),
    };
    let paths = Paths::new(&data_dir);
    let image = Image::read(&settings);
    let boot = boot_id();
    let trial = read_state(&paths).on_trial(&image, &boot);
    *on_trial = trial;
    if trial {
        with_state(&paths, |s| s.phase = Phase::Trial)?;
    }
    let verdict = match &loaded {
        Err(e) => Err(format!("the configuration does not load: {e:#}")),
        Ok(config) => wait_healthy(config, settings.health_timeout),
    };
    match verdict {
        Ok(()) => {
            let status = std::process::Command::new(&settings.mark_good_command)
                .status()
                .with_context(|| format!("running {}", settings.mark_good_command.display()))?;
            if !status.success() {
                bail!("{} failed: {status}", settings.mark_good_command.display());
            }
            if trial {
                let took = with_state(&paths, |s| {
                    s.phase = Phase::Idle;
                    s.boot_failures.clear();
                    s.push(wire::OtaEvent::Healthy {
                        version: image.version.clone(),
                    });
                    s.started_ms.map(|t| now_ms() - t)
                })?;
                // The previous release's copy of the data is no use once this one is good.
                let _ = std::fs::remove_dir_all(paths.rollback());
                println!(
                    "slot {} ({}) is healthy and marked good{}",
                    image.slot,
                    image.version,
                    took.map(|ms| format!(
                        ", {:.1} s after the install started",
                        ms as f64 / 1000.0
                    ))
                    .unwrap_or_default()
                );
            } else {
                println!("slot {} is healthy and marked good", image.slot);
            }
            Ok(())
        }
        Err(reason) => {
            if trial {
                with_state(&paths, |s| {
                    let n = s.boot_failures.len() + 1;
                    s.boot_failures
                        .push(format!("boot {n} of slot {}: {reason}", image.slot));
                })?;
                eprintln!("slot {} is not healthy: {reason}; rebooting", image.slot);
                reboot_now()?;
            }
            bail!("slot {} is not healthy: {reason}", image.slot)
        }
    }
}

/// Polls the daemon's status over its LAN API until it says healthy.
fn wait_healthy(config: &crate::config::BoxConfig, timeout: Duration) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting a runtime: {e}"))?;
    let deadline = std::time::Instant::now() + timeout;
    let mut last;
    loop {
        match runtime.block_on(crate::daemon_call(config, http::Method::GET, "/v1/status")) {
            Ok(doc) => {
                let health = &doc["ota"]["health"];
                if health["healthy"].as_bool() == Some(true) {
                    return Ok(());
                }
                last = health["problems"]
                    .as_array()
                    .map(|p| {
                        p.iter()
                            .filter_map(|x| x.as_str())
                            .collect::<Vec<_>>()
                            .join("; ")
                    })
                    .filter(|s| !s.is_empty())
                    .unwrap_or_else(|| "the daemon says it is not healthy".into());
            }
            Err(e) => {
                last = format!("{e:#}");
                // A daemon that keeps exiting will not get healthy by waiting longer.
                if let Some(reason) = crash_loop() {
                    return Err(reason);
                }
            }
        }
        if std::time::Instant::now() >= deadline {
            return Err(format!(
                "not healthy within {} s: {last}",
                timeout.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// How many times systemd restarted the daemon this boot before it counts as failing.
const CRASH_LOOP_RESTARTS: u64 = 3;

/// Under systemd: the reason, when `storebox.service` has been restarted
/// [`CRASH_LOOP_RESTARTS`] times since boot, with the daemon's last log line.
fn crash_loop() -> Option<String> {
    std::env::var_os("INVOCATION_ID")?;
    let show = |property: &str| {
        std::process::Command::new("systemctl")
            .args(["show", "-P", property, "storebox.service"])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let restarts: u64 = show("NRestarts")?.parse().ok()?;
    if restarts < CRASH_LOOP_RESTARTS {
        return None;
    }
    let result = show("Result").unwrap_or_default();
    let last_line = std::process::Command::new("journalctl")
        .args([
            "-b",
            "-u",
            "storebox.service",
            "-n",
            "1",
            "-o",
            "cat",
            "--no-pager",
        ])
        .output()
        .ok()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .trim()
                .chars()
                .take(300)
                .collect::<String>()
        })
        .filter(|l| !l.is_empty());
    Some(format!(
        "storebox.service was restarted {restarts} times since boot (result: {result}){}",
        last_line
            .map(|l| format!("; its last line: {l}"))
            .unwrap_or_default()
    ))
}

/// The daemon's health verdict for a new slot: storage open and the till API answering (the
/// watchdog's own checks), `READY=1` sent and watchdog pings flowing, and the hub reached
/// since the start or the offline grace over.
pub fn health(
    started: std::time::Instant,
    started_ms: i64,
    hub_last_ok_ms: Option<i64>,
    offline_grace: Duration,
) -> serde_json::Value {
    let w = crate::watchdog::health();
    let mut problems = Vec::new();
    if !w.ready {
        problems.push("READY=1 not sent yet".to_owned());
    }
    if !w.problems.is_empty() {
        problems.push(format!("watchdog: {}", w.problems));
    }
    if w.watchdog && w.pings < 2 {
        problems.push(format!("{} watchdog pings so far", w.pings));
    }
    let hub = hub_last_ok_ms.is_some_and(|ms| ms >= started_ms);
    let uptime = started.elapsed();
    if !hub && uptime < offline_grace {
        problems.push(format!(
            "no hub contact yet ({} s of the {} s offline grace)",
            uptime.as_secs(),
            offline_grace.as_secs()
        ));
    }
    serde_json::json!({
        "healthy": problems.is_empty(),
        "problems": problems,
        "ready": w.ready,
        "watchdog_pings": w.pings,
        "hub_contact": hub,
    })
}

// --- the daemon's task ------------------------------------------------------------------

/// What the daemon's update task needs.
pub struct OtaTask {
    pub settings: OtaSettings,
    pub paths: Paths,
    pub image: Image,
    pub engine: Arc<crate::sync::SyncEngine>,
    /// The hub's last offer, for the status page.
    pub target: std::sync::Mutex<Option<wire::OtaTarget>>,
}

impl OtaTask {
    pub fn new(
        settings: OtaSettings,
        data_dir: &Path,
        engine: Arc<crate::sync::SyncEngine>,
    ) -> Arc<OtaTask> {
        let image = Image::read(&settings);
        Arc::new(OtaTask {
            settings,
            paths: Paths::new(data_dir),
            image,
            engine,
            target: std::sync::Mutex::new(None),
        })
    }

    pub fn target(&self) -> Option<wire::OtaTarget> {
        self.target
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// After a boot: a slot on trial waits for `mark-good`; an install whose slot is not the
    /// one booted was rolled back by U-Boot.
    pub fn settle_after_boot(&self) -> anyhow::Result<()> {
        let boot = boot_id();
        let image = &self.image;
        with_state(&self.paths, |s| {
            let pending = matches!(s.phase, Phase::Installed | Phase::Trial);
            if !pending || s.install_boot.as_deref() == Some(boot.as_str()) {
                // A daemon restarted during an unfinished install or upload: nothing runs it
                // any more.
                if s.phase == Phase::Installing && !self.paths.request().exists() {
                    s.phase = Phase::Idle;
                }
                return;
            }
            if s.slot.as_deref() == Some(image.slot.as_str()) {
                s.phase = Phase::Trial;
                return;
            }
            let version = s.version.clone().unwrap_or_else(|| "unknown".into());
            let slot = s.slot.clone().unwrap_or_default();
            let reason = if s.boot_failures.is_empty() {
                format!(
                    "slot {slot} did not come up healthy in its boot attempts (no health \
                     check ran: the kernel or the system did not start)"
                )
            } else {
                s.boot_failures.join("; ")
            };
            tracing::warn!(
                "update to {version} rolled back to slot {}: {reason}",
                image.slot
            );
            s.phase = Phase::Idle;
            s.refuse(&version);
            s.push(wire::OtaEvent::RolledBack { version, reason });
        })
    }

    /// The task: reports events to the hub, asks for a target, downloads and queues it.
    pub async fn run(self: Arc<Self>) {
        if let Err(e) = self.settle_after_boot() {
            tracing::warn!("update state: {e:#}");
        }
        let mut next_check =
            tokio::time::Instant::now() + self.settings.check_interval.min(Duration::from_secs(20));
        loop {
            self.report_events().await;
            if self.settings.enabled
                && !self.image.version.is_empty()
                && tokio::time::Instant::now() >= next_check
            {
                next_check = tokio::time::Instant::now() + self.settings.check_interval;
                if let Err(e) = self.check_hub().await {
                    tracing::warn!("update check: {e:#}");
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    }

    async fn report_events(&self) {
        let state = read_state(&self.paths);
        for (i, event) in state.events.iter().enumerate() {
            if event.reported {
                continue;
            }
            let report = wire::OtaReport {
                running: self.image.version.clone(),
                event: event.event.clone(),
                at: event.at_ms / 1000,
            };
            let Ok(body) = proto::encode(&report, 3) else {
                continue;
            };
            match self
                .engine
                .link()
                .post(crate::sync::link::Process::Ota, wire::PATH_OTA_REPORT, body)
                .await
            {
                Ok(_) => {
                    let at = event.at_ms;
                    let _ = with_state(&self.paths, |s| {
                        if let Some(e) = s.events.get_mut(i).filter(|e| e.at_ms == at) {
                            e.reported = true;
                        }
                    });
                }
                Err(e) => {
                    tracing::debug!("reporting an update event: {e}");
                    return;
                }
            }
        }
    }

    async fn check_hub(&self) -> anyhow::Result<()> {
        let check = wire::OtaCheck {
            running: self.image.version.clone(),
            compatible: self.image.compatible.clone(),
            slot: self.image.slot.clone(),
        };
        let body = proto::encode(&check, 3)?;
        let answer = self
            .engine
            .link()
            .post(crate::sync::link::Process::Ota, wire::PATH_OTA, body)
            .await?;
        let offer: wire::OtaOffer = proto::decode(&answer, "an update offer")?;
        *self.target.lock().unwrap_or_else(|e| e.into_inner()) = offer.target.clone();
        let Some(target) = offer.target else {
            return Ok(());
        };
        if !wire::is_valid_version(&target.version) || target.version == self.image.version {
            return Ok(());
        }
        let state = read_state(&self.paths);
        if state.refused.contains(&target.version) {
            tracing::debug!(
                "the hub offers {}, which failed here before",
                target.version
            );
            return Ok(());
        }
        if !matches!(
            state.phase,
            Phase::Idle | Phase::Receiving | Phase::Received
        ) {
            return Ok(());
        }
        let sha = hex(&target.sha256);
        let meta = read_meta(&self.paths);
        let same = meta
            .as_ref()
            .is_some_and(|m| m.source == "hub" && m.sha256.as_deref() == Some(sha.as_str()));
        if !same {
            // A LAN upload in progress has precedence over the hub's offer.
            if meta.as_ref().is_some_and(|m| m.source == "lan") && state.phase != Phase::Idle {
                return Ok(());
            }
            discard(&self.paths);
            check_space(&self.paths, target.size)?;
            write_meta(
                &self.paths,
                &BundleMeta {
                    source: "hub".into(),
                    name: format!("hub bundle {}", target.version),
                    total: target.size,
                    version: Some(target.version.clone()),
                    sha256: Some(sha.clone()),
                },
            )?;
        }
        if received(&self.paths) < target.size || state.phase != Phase::Received {
            self.download(&target).await?;
            with_state(&self.paths, |s| {
                s.phase = Phase::Received;
                s.push(wire::OtaEvent::Downloaded {
                    version: target.version.clone(),
                });
            })?;
        }
        if self.settings.window.open_now() && !self.paths.request().exists() {
            tracing::info!("installing {} from the hub", target.version);
            request_install(&self.paths, false)?;
        }
        Ok(())
    }

    /// Downloads the target into `incoming.raucb`, resuming after what is there, at the
    /// lowest priority of the link, then checks its SHA-256.
    async fn download(&self, target: &wire::OtaTarget) -> anyhow::Result<()> {
        with_state(&self.paths, |s| s.phase = Phase::Receiving)?;
        let path = format!("{}/{}", wire::PATH_OTA_BUNDLE, target.version);
        let pace = self
            .settings
            .download_rate
            .map(crate::sync::link::Shaper::new);
        let mut attempts = 0;
        loop {
            let have = received(&self.paths);
            if have >= target.size {
                break;
            }
            let mut file = tokio::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(false)
                .open(self.paths.bundle())
                .await
                .with_context(|| format!("opening {}", self.paths.bundle().display()))?;
            match self
                .engine
                .link()
                .download(&path, have, &mut file, pace.as_deref())
                .await
            {
                Ok(()) => {}
                Err(crate::sync::link::LinkError::Status { status, .. })
                    if status == http::StatusCode::RANGE_NOT_SATISFIABLE =>
                {
                    // What is on disk is longer than the hub's bundle: start again.
                    discard_bundle_only(&self.paths);
                }
                Err(e) => {
                    attempts += 1;
                    if attempts >= 3 {
                        return Err(e).context("downloading the bundle from the hub");
                    }
                    tracing::info!(
                        "bundle download cut at {} of {} bytes ({e}); resuming",
                        received(&self.paths),
                        target.size
                    );
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
            }
        }
        let bundle = self.paths.bundle();
        let digest = tokio::task::spawn_blocking(move || sha256_file(&bundle))
            .await
            .context("hashing the bundle")??;
        if digest != target.sha256 || received(&self.paths) != target.size {
            discard_bundle_only(&self.paths);
            bail!(
                "the downloaded bundle {} does not match the hub's size and SHA-256; discarded",
                target.version
            );
        }
        tracing::info!("bundle {} downloaded and verified", target.version);
        Ok(())
    }
}

fn discard_bundle_only(paths: &Paths) {
    let _ = std::fs::remove_file(paths.bundle());
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sha256_file(path: &Path) -> anyhow::Result<[u8; 32]> {
    let mut file =
        std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    file.rewind()?;
    let mut ctx = ring_digest();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    let out = ctx.finish();
    let mut digest = [0u8; 32];
    digest.copy_from_slice(out.as_ref());
    Ok(digest)
}

fn ring_digest() -> ring::digest::Context {
    ring::digest::Context::new(&ring::digest::SHA256)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn windows_span_midnight() {
        let w = Window::parse("22:00-06:00").unwrap();
        assert!(w.contains(23 * 60));
        assert!(w.contains(5 * 60 + 59));
        assert!(!w.contains(6 * 60));
        assert!(!w.contains(12 * 60));
        let w = Window::parse("01:00-05:00").unwrap();
        assert!(w.contains(60) && !w.contains(5 * 60) && !w.contains(0));
        assert!(Window::parse("always").unwrap().contains(0));
        assert!(Window::parse("01:00-01:00").is_err());
        assert!(Window::parse("25:00-01:00").is_err());
        assert!(Window::parse("tonight").is_err());
    }

    #[test]
    fn reads_rauc_config() {
        let (c, k) = rauc_conf(
            "[system]\ncompatible=storebox-x\nbootloader=uboot\n\n[keyring]\npath=/etc/rauc/keyring.pem\n# path=no\n[slot.rootfs.0]\ncompatible=no\n",
        );
        assert_eq!(c, "storebox-x");
        assert_eq!(k.as_deref(), Some("/etc/rauc/keyring.pem"));
    }

    #[test]
    fn chunks_resume_where_they_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        assert_eq!(receive_chunk(&paths, "b", 0, 10, b"12345").unwrap(), 5);
        // A repeated chunk is told where to resume.
        assert!(matches!(receive_chunk(&paths, "b", 0, 10, b"12345"), Ok(5)));
        assert!(matches!(
            receive_chunk(&paths, "b", 7, 10, b"890"),
            Err(UploadError::Offset { received: 5 })
        ));
        assert!(matches!(
            receive_chunk(&paths, "b", 5, 10, b"6789012"),
            Err(UploadError::TooLong { total: 10 })
        ));
        assert!(request_install(&paths, false).is_err(), "incomplete");
        assert_eq!(receive_chunk(&paths, "b", 5, 10, b"67890").unwrap(), 10);
        assert_eq!(std::fs::read(paths.bundle()).unwrap(), b"1234567890");
        assert_eq!(read_state(&paths).phase, Phase::Received);
        let attempt = request_install(&paths, true).unwrap();
        let request: Request =
            serde_json::from_slice(&std::fs::read(paths.request()).unwrap()).unwrap();
        assert_eq!(request.attempt, attempt);
        assert!(request.force_downgrade);
    }

    #[test]
    fn a_bundle_larger_than_the_free_space_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        let err = receive_chunk(&paths, "b", 0, u64::MAX / 2, b"1").unwrap_err();
        assert!(err.to_string().contains("not enough space"), "{err}");
        assert_eq!(received(&paths), 0);
    }

    #[test]
    fn a_rollback_is_detected_after_a_reboot_only() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        with_state(&paths, |s| {
            s.phase = Phase::Installed;
            s.version = Some("2.0".into());
            s.slot = Some("B".into());
            s.install_boot = Some("an earlier boot".into());
            s.boot_failures
                .push("boot 1 of slot B: the till API did not answer".into());
        })
        .unwrap();
        let on_a = Image {
            version: "1.0".into(),
            compatible: "x".into(),
            slot: "A".into(),
        };
        let state = read_state(&paths);
        assert!(!state.on_trial(&on_a, "now"));
        let on_b = Image {
            slot: "B".into(),
            ..on_a.clone()
        };
        assert!(state.on_trial(&on_b, "now"));
        assert!(!state.on_trial(&on_b, "an earlier boot"));
    }
}
