//! The box configuration: `storebox.toml` plus sorted drop-ins from `storebox.d/*.toml`.
//!
//! Drop-ins let a board image ship defaults and a technician override one key without editing
//! the main file: tables merge key by key, later files win. Unknown keys are refused with
//! their name. Relative paths are resolved against the main file's directory.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The whole box configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BoxConfig {
    /// The store this box serves, as the hub knows it.
    pub store_id: String,
    /// Where the box keeps its database.
    pub data_dir: PathBuf,
    pub hub: HubConfig,
    #[serde(default)]
    pub lan: LanConfig,
    #[serde(default)]
    pub sync: SyncConfig,
    #[serde(default)]
    pub storage: StorageConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub ota: OtaConfig,
}

/// Firmware updates (`docs/OTA.md`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaConfig {
    /// Whether the box asks the hub for updates; a technician's LAN install works either way.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// When an update from the hub may be installed and the box rebooted, local time:
    /// "HH:MM-HH:MM" (may span midnight) or "always". A technician's install does not wait.
    #[serde(default = "default_ota_window")]
    pub window: String,
    /// How often the box asks the hub for a target version.
    #[serde(default = "default_ota_check_interval")]
    pub check_interval: String,
    /// How long a new slot has to become healthy before it is given up (and rebooted).
    #[serde(default = "default_ota_health_timeout")]
    pub health_timeout: String,
    /// A new slot that cannot reach the hub counts as healthy after this long, so an update
    /// installed during an Internet outage is not rolled back for it.
    #[serde(default = "default_ota_offline_grace")]
    pub offline_grace: String,
    /// Cap of a bundle download from the hub when `[hub] download_cap` is off, so a bundle
    /// never takes the whole line from the payment terminals; "off" for none.
    #[serde(default = "default_ota_download_cap")]
    pub download_cap: String,
    /// The image's version file.
    #[serde(default = "default_ota_version_file")]
    pub version_file: PathBuf,
    /// RAUC's system config: the board's `compatible` and the signing keyring.
    #[serde(default = "default_ota_rauc_conf")]
    pub rauc_conf: PathBuf,
    /// The `rauc` command.
    #[serde(default = "default_ota_rauc")]
    pub rauc: PathBuf,
    /// The command that marks the booted slot good in the boot state.
    #[serde(default = "default_ota_mark_good")]
    pub mark_good_command: PathBuf,
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            enabled: true,
            window: default_ota_window(),
            check_interval: default_ota_check_interval(),
            health_timeout: default_ota_health_timeout(),
            offline_grace: default_ota_offline_grace(),
            download_cap: default_ota_download_cap(),
            version_file: default_ota_version_file(),
            rauc_conf: default_ota_rauc_conf(),
            rauc: default_ota_rauc(),
            mark_good_command: default_ota_mark_good(),
        }
    }
}

impl OtaConfig {
    /// The section, checked.
    pub fn settings(&self) -> anyhow::Result<crate::ota::OtaSettings> {
        let o = self;
        let duration = |key: &str, text: &str| {
            storebox_protocol::parse_duration(text).map_err(|e| anyhow::anyhow!("[ota] {key}: {e}"))
        };
        let check_interval = duration("check_interval", &o.check_interval)?;
        if check_interval < Duration::from_secs(1) {
            bail!("[ota] check_interval must be at least 1s");
        }
        Ok(crate::ota::OtaSettings {
            enabled: o.enabled,
            window: crate::ota::Window::parse(&o.window)
                .map_err(|e| anyhow::anyhow!("[ota] window: {e}"))?,
            check_interval,
            health_timeout: duration("health_timeout", &o.health_timeout)?,
            offline_grace: duration("offline_grace", &o.offline_grace)?,
            download_rate: parse_rate(&o.download_cap)
                .map_err(|e| anyhow::anyhow!("[ota] download_cap: {e}"))?,
            version_file: o.version_file.clone(),
            rauc_conf: o.rauc_conf.clone(),
            rauc: o.rauc.clone(),
            mark_good_command: o.mark_good_command.clone(),
        })
    }
}

fn default_ota_window() -> String {
    "01:00-05:00".into()
}
fn default_ota_check_interval() -> String {
    "1h".into()
}
fn default_ota_health_timeout() -> String {
    "5m".into()
}
fn default_ota_offline_grace() -> String {
    "10m".into()
}
fn default_ota_download_cap() -> String {
    "2Mbit/s".into()
}
fn default_ota_version_file() -> PathBuf {
    "/usr/lib/storebox/image-version".into()
}
fn default_ota_rauc_conf() -> PathBuf {
    "/etc/rauc/system.conf".into()
}
fn default_ota_rauc() -> PathBuf {
    "rauc".into()
}
fn default_ota_mark_good() -> PathBuf {
    "/usr/libexec/storebox/mark-good".into()
}

/// Logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// "error", "warn", "info", "debug" or "trace"; `RUST_LOG` wins when set.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
        }
    }
}

fn default_log_level() -> String {
    "info".into()
}

/// How to reach the hub.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// `https://host:port` of the hub's sync listener.
    pub url: String,
    /// PEM file of the CA the hub's certificate must chain to; nothing else is trusted.
    pub ca_file: PathBuf,
    /// Legacy bearer credential, inline or in a file (the file wins); honoured by a hub only
    /// with `[pki] legacy_credentials`. The box's identity is its client certificate.
    #[serde(default)]
    pub credential: Option<String>,
    #[serde(default)]
    pub credential_file: Option<PathBuf>,
    /// A one-time enrollment token from `storehub enroll-token`: when the box has no
    /// certificate yet, the daemon enrolls with it.
    #[serde(default)]
    pub enroll_token: Option<String>,
    /// Longest wait for one hub call.
    #[serde(default = "default_hub_timeout")]
    pub timeout: String,
    /// Cap on what the box sends to the hub, e.g. "256kbit/s", "1Mbit/s", "64kB/s", or "off".
    #[serde(default = "default_off")]
    pub upload_cap: String,
    /// Cap on what the box receives from the hub, in the same form.
    #[serde(default = "default_off")]
    pub download_cap: String,
    /// Link sharing (`docs/LINK.md`): "auto" (the default) keeps the queueing delay the
    /// box adds on the shop's line under 5 ms; a delay such as "10ms" sets that target;
    /// "off" for a line of the box's own.
    #[serde(default = "default_link_sharing")]
    pub link_sharing: String,
}

fn default_link_sharing() -> String {
    "auto".into()
}

/// Parses `[hub] link_sharing`: None for "off".
pub fn parse_link_sharing(
    text: &str,
) -> Result<Option<crate::sync::sharing::SharingParams>, String> {
    let defaults = crate::sync::sharing::SharingParams::default();
    match text.trim() {
        "off" => Ok(None),
        "auto" => Ok(Some(defaults)),
        other => {
            let target = parse_millis(other)
                .filter(|d| other.ends_with("ms") && !d.is_zero())
                .ok_or_else(|| {
                    format!("{other:?} is not \"auto\", \"off\" or a delay like \"5ms\"")
                })?;
            if !(Duration::from_millis(2)..=Duration::from_millis(100)).contains(&target) {
                return Err(format!("{other:?}: the delay must be from 2ms to 100ms"));
            }
            Ok(Some(crate::sync::sharing::SharingParams {
                yield_above: target,
                grow_below: target.mul_f64(0.4),
                ..defaults
            }))
        }
    }
}

/// The till-facing listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanConfig {
    #[serde(default = "default_lan_listen")]
    pub listen: SocketAddr,
    /// Largest activity event a till may post, in bytes.
    #[serde(default = "default_max_activity_bytes")]
    pub max_activity_bytes: usize,
    /// Serve the till API over TLS with the box-local certificate (tills pin its
    /// fingerprint). `false` serves plain HTTP: only for a LAN where that is acceptable.
    #[serde(default = "default_true")]
    pub tls: bool,
}

/// The three sync processes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncConfig {
    /// Local times ("HH:MM") of the daily full sync. Not set (or `["hub"]`): the slot the
    /// hub gives this box in its fleet window, else 07:00. Set: these times, whatever the
    /// hub says.
    #[serde(default)]
    pub full_sync_at: Option<Vec<String>>,
    /// Period of the delta pull ("5m", "30s", "90"), or "off".
    #[serde(default = "default_delta_interval")]
    pub delta_interval: String,
    /// Push activity as it happens; when false, full sync carries it.
    #[serde(default = "default_true")]
    pub push: bool,
    /// Most events in one push.
    #[serde(default = "default_push_batch")]
    pub push_batch: usize,
    /// Keep a change watch open on the hub, so changes arrive within seconds; the periodic
    /// delta pull then runs hourly as a safety net. When false, the periodic pull alone.
    #[serde(default = "default_true")]
    pub notify: bool,
}

/// The local database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// redb page cache, in MiB. redb's own default (1 GiB) does not suit a 512 MB board.
    #[serde(default = "default_cache_mib")]
    pub cache_mib: usize,
    /// Most activity events gathered into one durable commit.
    #[serde(default = "default_activity_batch")]
    pub activity_batch_max: usize,
    /// How long the activity writer waits for more posts after the first of a commit
    /// ("0" waits for nothing: posts arriving during a commit join the next one anyway).
    #[serde(default = "default_activity_window")]
    pub activity_batch_window: String,
}

fn default_hub_timeout() -> String {
    "60s".into()
}
fn default_lan_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}
fn default_max_activity_bytes() -> usize {
    64 * 1024
}
fn default_delta_interval() -> String {
    "5m".into()
}
fn default_true() -> bool {
    true
}
fn default_off() -> String {
    "off".into()
}
fn default_push_batch() -> usize {
    500
}
fn default_cache_mib() -> usize {
    16
}
fn default_activity_batch() -> usize {
    512
}
fn default_activity_window() -> String {
    "0".into()
}

impl Default for LanConfig {
    fn default() -> Self {
        LanConfig {
            listen: default_lan_listen(),
            max_activity_bytes: default_max_activity_bytes(),
            tls: true,
        }
    }
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            full_sync_at: None,
            delta_interval: default_delta_interval(),
            push: true,
            push_batch: default_push_batch(),
            notify: true,
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        StorageConfig {
            cache_mib: default_cache_mib(),
            activity_batch_max: default_activity_batch(),
            activity_batch_window: default_activity_window(),
        }
    }
}

/// How tills find the box on the LAN (`discovery.rs`): mDNS and the UDP broadcast probe.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Advertise the box at all.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// The box's name on the LAN (mDNS instance); `storebox-<store_id>` when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// UDP port of the broadcast probe.
    #[serde(default = "default_discovery_udp_port")]
    pub udp_port: u16,
    /// Advertise over multicast DNS as well; the UDP probe is answered either way.
    #[serde(default = "default_true")]
    pub mdns: bool,
}

fn default_discovery_udp_port() -> u16 {
    crate::discovery::DEFAULT_UDP_PORT
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig {
            enabled: true,
            name: None,
            udp_port: default_discovery_udp_port(),
            mdns: true,
        }
    }
}

impl DiscoveryConfig {
    fn check(&self) -> anyhow::Result<()> {
        if let Some(name) = &self.name {
            // One DNS label: 63 bytes; control characters would garble tills' screens.
            let name = name.trim();
            if name.is_empty() || name.len() > 63 || name.chars().any(char::is_control) {
                bail!("[discovery] name must be 1 to 63 bytes of printable text (got {name:?})");
            }
        }
        if self.udp_port == 0 {
            bail!("[discovery] udp_port must be a port number, 1 to 65535");
        }
        Ok(())
    }
}

/// A local time of day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct TimeOfDay {
    pub hour: u32,
    pub minute: u32,
    /// Always 0 in the config; the hub's slots are to the second.
    pub second: u32,
}

impl BoxConfig {
    /// Reads `path` and the drop-ins of `<dir>/storebox.d/`, then checks the result.
    pub fn load(path: &Path) -> anyhow::Result<BoxConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the config {}", path.display()))?;
        let mut merged: toml::Table = toml::from_str(&text)
            .with_context(|| format!("parsing the config {}", path.display()))?;
        check_keys(&merged, path)?;
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        let dropin_dir = base.join("storebox.d");
        if dropin_dir.is_dir() {
            let mut dropins: Vec<PathBuf> = std::fs::read_dir(&dropin_dir)
                .with_context(|| format!("listing {}", dropin_dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "toml"))
                .collect();
            dropins.sort();
            for dropin in dropins {
                let text = std::fs::read_to_string(&dropin)
                    .with_context(|| format!("reading the drop-in {}", dropin.display()))?;
                let table: toml::Table = toml::from_str(&text)
                    .with_context(|| format!("parsing the drop-in {}", dropin.display()))?;
                check_keys(&table, &dropin)?;
                merge(&mut merged, table);
            }
        }
        let mut config: BoxConfig = merged
            .try_into()
            .with_context(|| format!("reading the config {}", path.display()))?;
        for p in [&mut config.data_dir, &mut config.hub.ca_file] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = &mut config.hub.credential_file {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config
            .check()
            .with_context(|| format!("checking the config {}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        if !storebox_protocol::is_valid_module_name(&self.store_id) {
            bail!(
                "store_id {:?} is invalid: use 1 to 64 of a-z, 0-9, _ and -",
                self.store_id
            );
        }
        self.full_sync_times()?;
        self.delta_interval()?;
        self.hub_timeout()?;
        self.link_settings()?;
        if !self.hub.url.starts_with("https://") {
            bail!(
                "[hub] url must start with https:// (got {:?})",
                self.hub.url
            );
        }
        if self.storage.cache_mib == 0 || self.storage.activity_batch_max == 0 {
            bail!("[storage] cache_mib and activity_batch_max must be at least 1");
        }
        self.activity_batch_window()?;
        if self.sync.push_batch == 0 {
            bail!("[sync] push_batch must be at least 1");
        }
        self.discovery.check()?;
        self.ota_settings()?;
        Ok(())
    }

    /// The `[ota]` section, checked.
    pub fn ota_settings(&self) -> anyhow::Result<crate::ota::OtaSettings> {
        self.ota.settings()
    }

    /// The configured full sync times, sorted, or the hub's slot when none are set.
    pub fn full_sync_times(&self) -> anyhow::Result<crate::sync::plan::FullSyncAt> {
        use crate::sync::plan::FullSyncAt;
        let Some(texts) = &self.sync.full_sync_at else {
            return Ok(FullSyncAt::Hub);
        };
        if texts.len() == 1 && texts[0].trim() == "hub" {
            return Ok(FullSyncAt::Hub);
        }
        let mut times = Vec::new();
        for text in texts {
            times.push(parse_time_of_day(text).with_context(|| {
                format!("[sync] full_sync_at: {text:?} is not a time like \"07:00\" (or [\"hub\"] alone)")
            })?);
        }
        times.sort();
        Ok(FullSyncAt::Local(times))
    }

    /// The delta pull period, or `None` when switched off.
    pub fn delta_interval(&self) -> anyhow::Result<Option<Duration>> {
        if self.sync.delta_interval.trim() == "off" {
            return Ok(None);
        }
        let d = storebox_protocol::parse_duration(&self.sync.delta_interval)
            .map_err(|e| anyhow::anyhow!("[sync] delta_interval: {e}"))?;
        if d.is_zero() {
            bail!("[sync] delta_interval must be positive, or \"off\"");
        }
        Ok(Some(d))
    }

    /// How long the activity writer gathers posts for one commit.
    pub fn activity_batch_window(&self) -> anyhow::Result<Duration> {
        parse_millis(&self.storage.activity_batch_window).with_context(|| {
            "[storage] activity_batch_window must look like \"0\", \"2ms\" or \"1s\""
        })
    }

    /// The longest wait for one hub call.
    /// The upload and download caps of the hub link.
    pub fn link_settings(&self) -> anyhow::Result<crate::sync::link::LinkSettings> {
        Ok(crate::sync::link::LinkSettings {
            upload_rate: parse_rate(&self.hub.upload_cap)
                .map_err(|e| anyhow::anyhow!("[hub] upload_cap: {e}"))?,
            download_rate: parse_rate(&self.hub.download_cap)
                .map_err(|e| anyhow::anyhow!("[hub] download_cap: {e}"))?,
            sharing: parse_link_sharing(&self.hub.link_sharing)
                .map_err(|e| anyhow::anyhow!("[hub] link_sharing: {e}"))?,
        })
    }

    pub fn hub_timeout(&self) -> anyhow::Result<Duration> {
        storebox_protocol::parse_duration(&self.hub.timeout)
            .map_err(|e| anyhow::anyhow!("[hub] timeout: {e}"))
    }

    /// The legacy store credential, from the file when one is configured; empty when none.
    pub fn credential(&self) -> anyhow::Result<String> {
        if let Some(path) = &self.hub.credential_file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the credential {}", path.display()))?;
            return Ok(text.trim().to_owned());
        }
        Ok(self.hub.credential.clone().unwrap_or_default())
    }
}

/// A short duration: "2ms", "1s", or a plain number of milliseconds.
fn parse_millis(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    if let Some(s) = text.strip_suffix('s') {
        return s.trim().parse().ok().map(Duration::from_secs);
    }
    text.parse().ok().map(Duration::from_millis)
}

fn parse_time_of_day(text: &str) -> Option<TimeOfDay> {
    let (h, m) = text.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let hour: u32 = h.parse().ok()?;
    let minute: u32 = m.parse().ok()?;
    (hour < 24 && minute < 60).then_some(TimeOfDay {
        hour,
        minute,
        second: 0,
    })
}

/// Refuses a file with a key the config does not know, naming the key and the file.
///
/// The file alone is deserialised over placeholders for the required keys, so the check is
/// the config type itself and cannot drift from it; a wrong value type is left for the check
/// of the merged config, which reports it.
/// Parses a rate as a shop's line is described, into bytes per second: "512kbit/s",
/// "2Mbit/s", "64kB/s", "1MB/s" ("/s" may be left out; k and M are powers of 1000), or
/// "off" for no cap.
pub fn parse_rate(text: &str) -> Result<Option<u64>, String> {
    let text = text.trim();
    if text == "off" {
        return Ok(None);
    }
    let body = text.strip_suffix("/s").unwrap_or(text);
    let split = body
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(body.len());
    let (number, unit) = body.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let bits_per_unit = match unit.trim() {
        "bit" => 1.0,
        "kbit" => 1e3,
        "Mbit" => 1e6,
        "B" => 8.0,
        "kB" => 8e3,
        "MB" => 8e6,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use kbit/s, Mbit/s, kB/s or MB/s, or \"off\")"
            ))
        }
    };
    let bytes = n * bits_per_unit / 8.0;
    if !(1_000.0..=1e10).contains(&bytes) {
        return Err(format!("{text:?} is out of range (8kbit/s to 80Gbit/s)"));
    }
    Ok(Some(bytes as u64))
}

fn check_keys(table: &toml::Table, file: &Path) -> anyhow::Result<()> {
    let mut probe: toml::Table = toml::from_str(
        "store_id = \"x\"\ndata_dir = \"x\"\n[hub]\nurl = \"https://x\"\nca_file = \"x\"\n",
    )
    .context("building the key check")?;
    merge(&mut probe, table.clone());
    match probe.try_into::<BoxConfig>() {
        Err(e) if e.message().contains("unknown field") => Err(anyhow::anyhow!(
            "{}: {}",
            file.display(),
            e.message().trim()
        )),
        _ => Ok(()),
    }
}

/// Merges `over` into `base`: tables key by key, anything else replaced.
fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    #[test]
    fn link_sharing_is_auto_off_or_a_delay() {
        use super::parse_link_sharing;
        use std::time::Duration;
        let auto = parse_link_sharing("auto").unwrap().unwrap();
        assert_eq!(auto.yield_above, Duration::from_millis(5));
        assert_eq!(parse_link_sharing("off"), Ok(None));
        let wide = parse_link_sharing("15ms").unwrap().unwrap();
        assert_eq!(wide.yield_above, Duration::from_millis(15));
        assert_eq!(wide.grow_below, Duration::from_millis(6));
        for bad in ["on", "5", "5s", "0ms", "1ms", "500ms", ""] {
            assert!(parse_link_sharing(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn rates_read_as_a_line_is_described() {
        use super::parse_rate;
        assert_eq!(parse_rate("off"), Ok(None));
        assert_eq!(parse_rate("512kbit/s"), Ok(Some(64_000)));
        assert_eq!(parse_rate("2Mbit"), Ok(Some(250_000)));
        assert_eq!(parse_rate("64kB/s"), Ok(Some(64_000)));
        assert_eq!(parse_rate("1.5MB/s"), Ok(Some(1_500_000)));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 furlongs").is_err());
        assert!(parse_rate("1bit/s").is_err());
    }

    use super::*;

    const MINIMAL: &str = r#"
store_id = "shop-1"
data_dir = "data"
[hub]
url = "https://127.0.0.1:7443"
ca_file = "ca.crt"
credential = "secret"
"#;

    #[test]
    fn defaults_and_relative_paths() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storebox.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        let config = BoxConfig::load(&path).unwrap();
        assert_eq!(config.data_dir, dir.path().join("data"));
        // No time of its own: the box takes the hub's slot.
        assert_eq!(
            config.full_sync_times().unwrap(),
            crate::sync::plan::FullSyncAt::Hub
        );
        assert_eq!(
            config.delta_interval().unwrap(),
            Some(Duration::from_secs(300))
        );
        assert!(config.sync.push);
        assert_eq!(config.lan.listen.port(), 8080);
    }

    #[test]
    fn dropins_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storebox.toml");
        std::fs::write(&path, MINIMAL).unwrap();
        std::fs::create_dir(dir.path().join("storebox.d")).unwrap();
        std::fs::write(
            dir.path().join("storebox.d/10-a.toml"),
            "[sync]\ndelta_interval = \"off\"\npush = false\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("storebox.d/20-b.toml"),
            "[sync]\nfull_sync_at = [\"23:30\", \"06:15\"]\n",
        )
        .unwrap();
        let config = BoxConfig::load(&path).unwrap();
        assert_eq!(config.delta_interval().unwrap(), None);
        assert!(!config.sync.push);
        assert_eq!(
            config.full_sync_times().unwrap(),
            crate::sync::plan::FullSyncAt::Local(vec![
                TimeOfDay {
                    hour: 6,
                    minute: 15,
                    second: 0,
                },
                TimeOfDay {
                    hour: 23,
                    minute: 30,
                    second: 0,
                }
            ])
        );
        // A later drop-in hands the box back to the hub.
        std::fs::write(
            dir.path().join("storebox.d/30-c.toml"),
            "[sync]\nfull_sync_at = [\"hub\"]\n",
        )
        .unwrap();
        let config = BoxConfig::load(&path).unwrap();
        assert_eq!(
            config.full_sync_times().unwrap(),
            crate::sync::plan::FullSyncAt::Hub
        );
    }

    #[test]
    fn bad_values_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("storebox.toml");
        std::fs::write(
            &path,
            format!("{MINIMAL}\n[sync]\nfull_sync_at = [\"7h\"]\n"),
        )
        .unwrap();
        let e = format!("{:#}", BoxConfig::load(&path).unwrap_err());
        assert!(e.contains("full_sync_at"), "{e}");
        std::fs::write(&path, format!("{MINIMAL}\n[sync]\nflul_sync = 1\n")).unwrap();
        let e = format!("{:#}", BoxConfig::load(&path).unwrap_err());
        assert!(
            e.contains("flul_sync") && e.contains("storebox.toml"),
            "{e}"
        );
        // A drop-in's unknown key names the drop-in.
        std::fs::write(&path, MINIMAL).unwrap();
        std::fs::create_dir(dir.path().join("storebox.d")).unwrap();
        std::fs::write(
            dir.path().join("storebox.d/30-typo.toml"),
            "[lan]\nlisten_on = 1\n",
        )
        .unwrap();
        let e = format!("{:#}", BoxConfig::load(&path).unwrap_err());
        assert!(e.contains("listen_on") && e.contains("30-typo.toml"), "{e}");
    }
}
