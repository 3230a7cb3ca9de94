//! The `storehub` command line: `init` writes a complete, private setup and refuses to
//! overwrite one; `serve` refuses a broken config with the key named.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

fn storehub() -> Command {
    Command::new(env!("CARGO_BIN_EXE_storehub"))
}

#[test]
fn init_writes_a_private_setup_and_refuses_to_overwrite_it() {
    let dir = tempfile::tempdir().unwrap();
    let out = storehub()
        .args(["init", "--dir"])
        .arg(dir.path())
        .args([
            "--store",
            "shop-1",
            "--store",
            "shop-2",
            "--lan-port",
            "9000",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for file in [
        "hub.toml",
        "ca.crt",
        "ca.key",
        "hub.crt",
        "hub.key",
        "admin.token",
    ] {
        assert!(dir.path().join(file).exists(), "{file} missing");
    }
    for secret in [
        "ca.key",
        "hub.key",
        "admin.token",
        "boxes/shop-1.toml",
        "hub-data/pki.json",
    ] {
        let mode = std::fs::metadata(dir.path().join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "{secret} is readable by others");
    }
    let box2 = std::fs::read_to_string(dir.path().join("boxes/shop-2.toml")).unwrap();
    assert!(box2.contains("store_id = \"shop-2\""));
    assert!(box2.contains("listen = \"127.0.0.1:9001\""), "{box2}");
    let hub = std::fs::read_to_string(dir.path().join("hub.toml")).unwrap();
    let token = box2
        .lines()
        .find_map(|l| l.strip_prefix("enroll_token = \""))
        .unwrap()
        .trim_end_matches('"');
    // The hub keeps only a digest of each store's one-time enrollment token, and no box key:
    // the box makes its own.
    let pki = std::fs::read_to_string(dir.path().join("hub-data/pki.json")).unwrap();
    assert!(!pki.contains(token) && !hub.contains(token));
    assert!(pki.contains(&storehub::sha256_hex(token.as_bytes())));
    let mode = std::fs::metadata(dir.path().join("hub-data/pki.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "pki.json is readable by others");

    let again = storehub()
        .args(["init", "--dir"])
        .arg(dir.path())
        .args(["--store", "shop-1"])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
}

#[test]
fn bad_store_ids_and_configs_are_refused_with_a_reason() {
    let dir = tempfile::tempdir().unwrap();
    let out = storehub()
        .args(["init", "--dir"])
        .arg(dir.path())
        .args(["--store", "Shop 1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid"));

    let config = dir.path().join("hub.toml");
    std::fs::write(
        &config,
        "data_dir = \"d\"\nbogus_key = 1\n[sync]\nlisten = \"127.0.0.1:1\"\ncert = \"c\"\nkey = \"k\"\n[admin]\ntoken_file = \"t\"\n",
    )
    .unwrap();
    let out = storehub()
        .args(["serve", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("bogus_key"));
}
