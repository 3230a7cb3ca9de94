//! `storehub init`: a ready-to-run hub and one box config per store, for the demo, tests and
//! a first look. It makes a private CA, a server certificate for `localhost` and `127.0.0.1`,
//! the admin token and one one-time enrollment token per store, written into that store's box
//! config: a box started on it generates its own key and enrolls itself on first contact, so
//! the demo needs no technician step and no private key is ever made off the box.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

use crate::config::{AdminListener, HubConfig, StoreConfig, SyncListener};

/// What `storehub init` needs to know.
#[derive(Debug, Clone)]
pub struct InitOptions {
    pub dir: PathBuf,
    pub stores: Vec<String>,
    pub hub_port: u16,
    pub admin_port: u16,
    /// LAN port of the first store's box; the next stores get the following ports.
    pub lan_port: u16,
    pub force: bool,
}

/// Writes the setup and returns the paths of the box configs.
pub fn init(options: &InitOptions) -> anyhow::Result<Vec<PathBuf>> {
    let dir = &options.dir;
    if options.stores.is_empty() {
        bail!("give at least one --store");
    }
    for store in &options.stores {
        if !storebox_protocol::is_valid_module_name(store) {
            bail!("store id {store:?} is invalid: use 1 to 64 of a-z, 0-9, _ and -");
        }
    }
    let hub_toml = dir.join("hub.toml");
    if hub_toml.exists() && !options.force {
        bail!(
            "{} already exists; pass --force to overwrite the setup",
            hub_toml.display()
        );
    }
    std::fs::create_dir_all(dir.join("boxes"))
        .with_context(|| format!("creating {}", dir.display()))?;

    let (ca_pem, ca_params, ca_key) = make_ca()?;
    let (cert_pem, key_pem) = make_server_cert(&ca_params, &ca_key)?;
    write(&dir.join("ca.crt"), &ca_pem, 0o644)?;
    // The CA key signs future box certificates; it stays beside the hub, readable by it only.
    write(&dir.join("ca.key"), &ca_key.serialize_pem(), 0o600)?;
    write(&dir.join("hub.crt"), &cert_pem, 0o644)?;
    write(&dir.join("hub.key"), &key_pem, 0o600)?;
    let admin_token = random_token()?;
    write(&dir.join("admin.token"), &format!("{admin_token}\n"), 0o600)?;

    let mut stores = Vec::new();
    let mut box_configs = Vec::new();
    let mut tokens = Vec::new();
    for (i, store) in options.stores.iter().enumerate() {
        let token = random_token()?;
        tokens.push((store.clone(), token.clone()));
        stores.push(StoreConfig {
            id: store.clone(),
            credential_sha256: String::new(),
            group: None,
        });
        let lan_port = options
            .lan_port
            .checked_add(i as u16)
            .context("the LAN ports run past 65535")?;
        let path = dir.join("boxes").join(format!("{store}.toml"));
        let text = format!(
            "# Box config written by `storehub init` for store {store}.\n\
             store_id = \"{store}\"\n\
             data_dir = \"{store}-data\"\n\n\
             [hub]\n\
             url = \"https://127.0.0.1:{hub}\"\n\
             ca_file = \"../ca.crt\"\n\
             # One-time: the box enrolls with it on first start, then renews by itself.\n\
             enroll_token = \"{token}\"\n\n\
             [lan]\n\
             listen = \"127.0.0.1:{lan_port}\"\n\n\
             [sync]\n\
             # No full_sync_at: the daily full sync runs at the slot the hub gives this box\n\
             # in its [fleet] full_sync_window; a time set here wins over the hub's.\n\
             delta_interval = \"5m\"\n\
             push = true\n",
            hub = options.hub_port,
        );
        write(&path, &text, 0o600)?;
        box_configs.push(path);
    }

    let config = HubConfig {
        data_dir: "hub-data".into(),
        sync: SyncListener {
            listen: ([127, 0, 0, 1], options.hub_port).into(),
            cert: "hub.crt".into(),
            key: "hub.key".into(),
            max_connections: 4096,
        },
        admin: AdminListener {
            listen: ([127, 0, 0, 1], options.admin_port).into(),
            token_file: "admin.token".into(),
        },
        modules: crate::config::default_modules(),
        tombstone_retention: "30d".into(),
        zstd_level: 3,
        stores,
        pki: crate::config::PkiConfig::default(),
        ota: crate::config::OtaConfig::default(),
        database: None,
        fleet: crate::config::FleetConfig::default(),
    };
    // The tokens stay usable for a week: a demo or test setup may be started days later.
    crate::pki::write_initial_state(
        &dir.join("hub-data").join("pki.json"),
        &tokens,
        std::time::Duration::from_secs(7 * 86_400),
        crate::now_ms(),
    )?;
    let text = toml::to_string_pretty(&config).context("writing hub.toml")?;
    write(
        &hub_toml,
        &format!("# Hub config written by `storehub init`.\n{text}"),
        0o600,
    )?;
    Ok(box_configs)
}

fn make_ca() -> anyhow::Result<(String, CertificateParams, KeyPair)> {
    let key = KeyPair::generate().context("generating the CA key")?;
    // The same parameters the PKI rebuilds to sign boxes' certificates.
    let mut params = crate::pki::ca_params();
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
    let cert = params.self_signed(&key).context("signing the CA")?;
    Ok((cert.pem(), params, key))
}

fn make_server_cert(
    ca_params: &CertificateParams,
    ca_key: &KeyPair,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating the hub key")?;
    let mut params = CertificateParams::new(vec!["localhost".to_owned()])
        .context("building the hub certificate")?;
    params
        .subject_alt_names
        .push(SanType::IpAddress([127, 0, 0, 1].into()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "storehub");
    params.distinguished_name = dn;
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(3600)).into();
    params.not_after = (now + std::time::Duration::from_secs(365 * 86_400)).into();
    let issuer = rcgen::Issuer::from_params(ca_params, ca_key);
    let cert = params
        .signed_by(&key, &issuer)
        .context("signing the hub certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// 32 random bytes as hex.
pub fn random_token() -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    getrandom::fill(&mut bytes).map_err(|e| anyhow::anyhow!("no randomness available: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
