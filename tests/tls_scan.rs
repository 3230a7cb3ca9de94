//! An independent TLS scanner, sslyze (PyPI, `python3 -m sslyze`), against the real hub sync
//! listener and the real box till API on 127.0.0.1: no SSL 2/3, TLS 1.0 or 1.1; TLS 1.2
//! (box only) with forward-secret AEAD suites only; no compression, Heartbleed, CCS
//! injection, ROBOT or client renegotiation. `.ci/run` installs sslyze; without it this test
//! fails saying how to install it.
//!
//! sslyze's Mozilla-profile verdict is not asserted: it also judges certificate trust (our
//! CAs are private, pinned by the clients) and lifespan (the box's LAN certificate is pinned
//! and lives ten years), which say nothing about protocol strength.

#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use serde_json::Value;
use support::{Hub, StoreBox};

const STORE: &str = "shop-scan";

fn accepted(result: &Value, suite: &str) -> Vec<String> {
    result[suite]["result"]["accepted_cipher_suites"]
        .as_array()
        .unwrap_or_else(|| panic!("no {suite} result: {}", result[suite]))
        .iter()
        .map(|c| c["cipher_suite"]["name"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn sslyze_finds_no_weak_protocol_or_cipher_on_the_hub_and_the_lan() {
    let version = Command::new("python3")
        .args(["-m", "sslyze", "--help"])
        .output();
    assert!(
        version.is_ok_and(|o| o.status.success()),
        "sslyze is missing: `python3 -m pip install sslyze` (.ci/run does)"
    );
    let hub = Hub::start(&[STORE]).await;
    let b = StoreBox::start(&hub, STORE, "[sync]\ndelta_interval = \"off\"\n").await;
    let out_file = hub.dir.path().join("sslyze.json");
    let hub_target = format!("127.0.0.1:{}", hub.sync_port);
    let lan_target = b.lan.to_string();
    let started = std::time::Instant::now();
    let output = tokio::task::spawn_blocking({
        let out_file = out_file.clone();
        let (hub_target, lan_target) = (hub_target.clone(), lan_target.clone());
        move || {
            Command::new("python3")
                .args(["-m", "sslyze", "--quiet"])
                .arg(format!("--json_out={}", out_file.display()))
                .args([&hub_target, &lan_target])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let report: Value = serde_json::from_slice(&std::fs::read(&out_file).unwrap_or_else(|e| {
        panic!(
            "sslyze wrote no report ({e}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    }))
    .unwrap();
    let results = report["server_scan_results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "{report}");
    for server in results {
        let port = server["server_location"]["port"].as_u64().unwrap();
        let is_hub = port == u64::from(hub.sync_port);
        let what = if is_hub { "hub" } else { "LAN" };
        assert_eq!(server["scan_status"], "COMPLETED", "{what}: {server}");
        let r = &server["scan_result"];
        for weak in [
            "ssl_2_0_cipher_suites",
            "ssl_3_0_cipher_suites",
            "tls_1_0_cipher_suites",
            "tls_1_1_cipher_suites",
        ] {
            assert_eq!(accepted(r, weak), Vec::<String>::new(), "{what}: {weak}");
        }
        let tls12 = accepted(r, "tls_1_2_cipher_suites");
        if is_hub {
            assert!(tls12.is_empty(), "the hub is TLS 1.3 only: {tls12:?}");
        } else {
            assert!(!tls12.is_empty(), "the LAN offers TLS 1.2 for older tills");
        }
        for suite in &tls12 {
            assert!(
                suite.starts_with("TLS_ECDHE_")
                    && (suite.contains("_GCM_") || suite.contains("CHACHA20_POLY1305")),
                "{what}: TLS 1.2 suite without forward secrecy or AEAD: {suite}"
            );
        }
        assert!(!accepted(r, "tls_1_3_cipher_suites").is_empty(), "{what}");
        assert_eq!(
            r["heartbleed"]["result"]["is_vulnerable_to_heartbleed"], false,
            "{what}"
        );
        assert_eq!(
            r["openssl_ccs_injection"]["result"]["is_vulnerable_to_ccs_injection"], false,
            "{what}"
        );
        assert_eq!(
            r["tls_compression"]["result"]["supports_compression"], false,
            "{what}"
        );
        let robot = r["robot"]["result"]["robot_result"].as_str().unwrap_or("");
        assert!(robot.starts_with("NOT_VULNERABLE"), "{what}: ROBOT {robot}");
        assert_eq!(
            r["session_renegotiation"]["result"]["is_vulnerable_to_client_renegotiation_dos"],
            false,
            "{what}"
        );
    }
    eprintln!(
        "sslyze scanned the hub ({hub_target}) and the LAN ({lan_target}) in {:?}",
        started.elapsed()
    );
}
