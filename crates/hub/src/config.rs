//! `hub.toml`: where the hub listens, where it keeps data, which stores and modules exist.
//!
//! Relative paths are resolved against the directory of the config file, so a setup made by
//! `storehub init` can be moved as a whole. Unknown keys are refused with their name, so a typo
//! never silently falls back to a default.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};

/// The hub's whole configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Directory of the hub database.
    pub data_dir: PathBuf,
    pub sync: SyncListener,
    pub admin: AdminListener,
    /// The modules every store has, with the fields boxes index.
    #[serde(default = "default_modules")]
    pub modules: Vec<ModuleConfig>,
    /// How long deleted records are remembered for delta pulls, e.g. "30d". A box whose cursor
    /// is older than the oldest remembered deletion repairs that module by full sync.
    #[serde(default = "default_tombstone_retention")]
    pub tombstone_retention: String,
    /// zstd level of answers to boxes.
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    #[serde(default)]
    pub stores: Vec<StoreConfig>,
    /// Box identities: the CA that signs boxes' short-lived client certificates.
    #[serde(default)]
    pub pki: PkiConfig,
    /// Firmware updates the hub serves to boxes.
    #[serde(default)]
    pub ota: OtaConfig,
    /// PostgreSQL, for a fleet served by several replicas; without it the hub keeps its
    /// database in `data_dir` (docs/FLEET.md).
    #[serde(default)]
    pub database: Option<DatabaseConfig>,
    /// The fleet: when boxes run their daily full sync.
    #[serde(default)]
    pub fleet: FleetConfig,
}

/// The PostgreSQL database the hub keeps its data in (`store/postgres.rs`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseConfig {
    /// A libpq-style connection string or URL, e.g. "postgres://storehub@127.0.0.1/storehub".
    pub url: String,
    /// Connections this process opens at most; requests beyond wait for a free one.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PEM file of the CA(s) the database server's certificate chains to: set, the hub
    /// talks to PostgreSQL over TLS only, checking the server's name from `url`.
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
}

fn default_pool_size() -> usize {
    16
}

impl DatabaseConfig {
    pub fn connection(&self) -> crate::store::postgres::Connection {
        crate::store::postgres::Connection {
            url: self.url.clone(),
            pool_size: self.pool_size,
            ca_cert: self.ca_cert.clone(),
        }
    }
}

/// The fleet as a whole (`fleet.rs`, docs/FLEET.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// Local time window ("05:00-07:00", may span midnight) over which the boxes' daily full
    /// syncs are spread, each box at a slot of its own derived from its store id; "off" lets
    /// every box keep its own `[sync] full_sync_at`.
    #[serde(default = "default_full_sync_window")]
    pub full_sync_window: String,
}

impl Default for FleetConfig {
    fn default() -> Self {
        FleetConfig {
            full_sync_window: default_full_sync_window(),
        }
    }
}

fn default_full_sync_window() -> String {
    "05:00-07:00".into()
}

/// Firmware bundles (`ota.rs`, docs/PROTOCOL.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OtaConfig {
    /// Largest bundle the admin API accepts ("1GiB", "300MiB", or bytes). A board's bundle
    /// is 50 to 300 MB; the limit only stops a wrong file from filling the hub's disk.
    #[serde(default = "default_max_bundle_size")]
    pub max_bundle_size: String,
}

impl Default for OtaConfig {
    fn default() -> Self {
        OtaConfig {
            max_bundle_size: default_max_bundle_size(),
        }
    }
}

fn default_max_bundle_size() -> String {
    "1GiB".into()
}

/// The private PKI for boxes (`pki.rs`, docs/SECURITY.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PkiConfig {
    /// PEM CA certificate boxes' client certificates must chain to.
    #[serde(default = "default_ca_cert")]
    pub ca_cert: PathBuf,
    /// PEM private key of that CA; the hub signs boxes' certificates with it.
    #[serde(default = "default_ca_key")]
    pub ca_key: PathBuf,
    /// Lifetime of a box's client certificate ("24h"); boxes renew at two thirds of it.
    #[serde(default = "default_cert_lifetime")]
    pub cert_lifetime: String,
    /// How long an enrollment token stays usable ("24h").
    #[serde(default = "default_token_lifetime")]
    pub token_lifetime: String,
    /// Also accept the bearer store credentials of boxes set up before client certificates,
    /// while they are enrolled. Off by default: the client certificate is the identity.
    #[serde(default)]
    pub legacy_credentials: bool,
}

impl Default for PkiConfig {
    fn default() -> Self {
        PkiConfig {
            ca_cert: default_ca_cert(),
            ca_key: default_ca_key(),
            cert_lifetime: default_cert_lifetime(),
            token_lifetime: default_token_lifetime(),
            legacy_credentials: false,
        }
    }
}

fn default_ca_cert() -> PathBuf {
    "ca.crt".into()
}
fn default_ca_key() -> PathBuf {
    "ca.key".into()
}
fn default_cert_lifetime() -> String {
    "24h".into()
}
fn default_token_lifetime() -> String {
    "24h".into()
}

/// The HTTPS listener for boxes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncListener {
    pub listen: SocketAddr,
    /// PEM certificate chain presented to boxes.
    pub cert: PathBuf,
    /// PEM private key of that certificate.
    pub key: PathBuf,
    /// Boxes connected at once at most; beyond, new connections wait in the kernel's
    /// backlog. Each box keeps one connection open: a replica serving 2,000 boxes needs
    /// 2,000, and as many file descriptors (`LimitNOFILE` in its unit).
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
}

fn default_max_connections() -> usize {
    4096
}

/// The back-office listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminListener {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// File holding the bearer token every admin call must present.
    pub token_file: PathBuf,
}

/// One data module.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ModuleConfig {
    pub name: String,
    #[serde(default)]
    pub indexes: Vec<String>,
    /// `"store"`: each store has its own records. `"group"`: the stores of a group share
    /// the group's records, each store's own records overriding them by id (a local price);
    /// a store in no group has only its own (docs/FLEET.md).
    #[serde(default, skip_serializing_if = "ModuleScope::is_store")]
    pub scope: ModuleScope,
}

/// Who a module's records belong to.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModuleScope {
    #[default]
    Store,
    Group,
}

impl ModuleScope {
    fn is_store(&self) -> bool {
        *self == ModuleScope::Store
    }
}

/// One store and the credential its box presents.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub id: String,
    /// SHA-256 (hex) of the store's legacy bearer credential, honoured only with
    /// `[pki] legacy_credentials = true`; boxes now authenticate by client certificate.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub credential_sha256: String,
    /// The group (a chain, a region) whose records of group-scoped modules the store shares.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7080))
}

fn default_tombstone_retention() -> String {
    "30d".to_owned()
}

fn default_zstd_level() -> i32 {
    3
}

/// The seed's four modules: configuration, catalog, customers and loyalty, promotions.
pub fn default_modules() -> Vec<ModuleConfig> {
    vec![
        ModuleConfig {
            name: "config".into(),
            indexes: vec![],
            scope: ModuleScope::Store,
        },
        ModuleConfig {
            name: "catalog".into(),
            indexes: vec!["ean13".into()],
            scope: ModuleScope::Store,
        },
        ModuleConfig {
            name: "customers".into(),
            indexes: vec!["loyalty_card".into()],
            scope: ModuleScope::Store,
        },
        ModuleConfig {
            name: "promotions".into(),
            indexes: vec![],
            scope: ModuleScope::Store,
        },
    ]
}

impl HubConfig {
    /// Reads and checks `path`, resolving relative paths against its directory.
    pub fn load(path: &Path) -> anyhow::Result<HubConfig> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the hub config {}", path.display()))?;
        let mut config: HubConfig = toml::from_str(&text)
            .with_context(|| format!("parsing the hub config {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut config.data_dir,
            &mut config.sync.cert,
            &mut config.sync.key,
            &mut config.admin.token_file,
            &mut config.pki.ca_cert,
            &mut config.pki.ca_key,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        if let Some(p) = config.database.as_mut().and_then(|d| d.ca_cert.as_mut()) {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        config
            .check()
            .with_context(|| format!("checking the hub config {}", path.display()))?;
        Ok(config)
    }

    fn check(&self) -> anyhow::Result<()> {
        if let Some(db) = &self.database {
            anyhow::ensure!(
                (1..=1000).contains(&db.pool_size),
                "[database] pool_size must be between 1 and 1000, not {}",
                db.pool_size
            );
            db.url
                .parse::<postgres::Config>()
                .map_err(|e| anyhow::anyhow!("[database] url: {e}"))?;
        }
        let mut names = BTreeSet::new();
        for module in &self.modules {
            if !storebox_protocol::is_valid_module_name(&module.name) {
                bail!(
                    "module name {:?} is invalid: use 1 to 64 of a-z, 0-9, _ and -",
                    module.name
                );
            }
            if !names.insert(&module.name) {
                bail!("module {:?} is listed twice", module.name);
            }
        }
        anyhow::ensure!(
            (1..=1_000_000).contains(&self.sync.max_connections),
            "[sync] max_connections must be between 1 and 1000000, not {}",
            self.sync.max_connections
        );
        let mut stores = BTreeSet::new();
        for store in &self.stores {
            if !storebox_protocol::is_valid_module_name(&store.id) {
                bail!(
                    "store id {:?} is invalid: use 1 to 64 of a-z, 0-9, _ and -",
                    store.id
                );
            }
            if !stores.insert(&store.id) {
                bail!("store {:?} is listed twice", store.id);
            }
            if let Some(group) = &store.group {
                if !storebox_protocol::is_valid_module_name(group) {
                    bail!(
                        "group {group:?} of store {:?} is invalid: use 1 to 64 of a-z, 0-9, _ and -",
                        store.id
                    );
                }
            }
        }
        self.tombstone_retention()?;
        self.cert_lifetime()?;
        self.token_lifetime()?;
        self.max_bundle_size()?;
        self.full_sync_window()?;
        Ok(())
    }

    /// The fleet's full sync window, or `None` when it is off.
    pub fn full_sync_window(&self) -> anyhow::Result<Option<crate::fleet::Window>> {
        crate::fleet::Window::parse(&self.fleet.full_sync_window)
            .map_err(|e| anyhow::anyhow!("[fleet] full_sync_window: {e}"))
    }

    /// The largest firmware bundle the admin API accepts, in bytes.
    pub fn max_bundle_size(&self) -> anyhow::Result<u64> {
        let size = parse_size(&self.ota.max_bundle_size)
            .map_err(|e| anyhow::anyhow!("[ota] max_bundle_size: {e}"))?;
        if size == 0 {
            bail!("[ota] max_bundle_size must be at least 1 byte");
        }
        Ok(size)
    }

    /// Where firmware bundles are kept: beside the hub database.
    pub fn ota_dir(&self) -> PathBuf {
        self.data_dir.join("ota")
    }

    /// Lifetime of boxes' client certificates.
    pub fn cert_lifetime(&self) -> anyhow::Result<Duration> {
        crate::pki::parse_lifetime(&self.pki.cert_lifetime, "[pki] cert_lifetime")
    }

    /// Lifetime of enrollment tokens.
    pub fn token_lifetime(&self) -> anyhow::Result<Duration> {
        crate::pki::parse_lifetime(&self.pki.token_lifetime, "[pki] token_lifetime")
    }

    /// Where the PKI keeps its state: beside the hub database.
    pub fn pki_state(&self) -> PathBuf {
        self.data_dir.join("pki.json")
    }

    /// The tombstone retention as a duration.
    pub fn tombstone_retention(&self) -> anyhow::Result<Duration> {
        storebox_protocol::parse_duration(&self.tombstone_retention)
            .map_err(|e| anyhow::anyhow!("tombstone_retention: {e}"))
    }

    /// The module named `name`, if configured.
    pub fn module(&self, name: &str) -> Option<&ModuleConfig> {
        self.modules.iter().find(|m| m.name == name)
    }

    /// The groups and their stores, for the stores that have one.
    pub fn groups(&self) -> std::collections::BTreeMap<String, Vec<String>> {
        let mut groups: std::collections::BTreeMap<String, Vec<String>> = Default::default();
        for store in &self.stores {
            if let Some(group) = &store.group {
                groups
                    .entry(group.clone())
                    .or_default()
                    .push(store.id.clone());
            }
        }
        groups
    }

    /// How the hub database lays out the stores and modules.
    pub fn layout(&self) -> crate::store::Layout {
        crate::store::Layout {
            groups: self.groups(),
            group_modules: self
                .modules
                .iter()
                .filter(|m| m.scope == ModuleScope::Group)
                .map(|m| m.name.clone())
                .collect(),
        }
    }

    /// Whether `store` is configured.
    pub fn has_store(&self, store: &str) -> bool {
        self.stores.iter().any(|s| s.id == store)
    }
}

/// Parses a size as people write it: "1GiB", "300MiB", "512KiB" (powers of 1024), "1GB",
/// "500MB", "64kB" (powers of 1000), "1000B" or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a whole number"))?;
    let factor: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use B, KiB, MiB, GiB, kB, MB or GB)"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("{text:?} is too large"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_both_kinds_of_units() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size(" 300MiB ").unwrap(), 300 << 20);
        assert_eq!(parse_size("64kB").unwrap(), 64_000);
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("12 MB").unwrap(), 12_000_000);
        assert!(parse_size("1.5GiB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("1gib").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }
}
