//! Box identity end to end: enrollment, short-lived client certificates checked on every
//! request (resumed TLS sessions included), revocation, renewal with sync in flight,
//! re-authentication after an outage, and the box's pinning of the hub's CA.
//!
//! The hub is driven both by real boxes and by a raw TLS client of the test's own, so a
//! certificate the hub never issued (expired, not yet valid, from a foreign CA) can be put
//! in front of it.

#![allow(clippy::unwrap_used)]

mod support;

use std::io::Read;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use rcgen::{CertificateParams, DistinguishedName, DnType, Issuer, KeyPair, SigningKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use support::{wait_for, Hub, StoreBox};

const STORE: &str = "shop-sec";

/// A path behind the certificate check that no sync call uses: 404 proves the request was
/// authenticated, 401 that it was refused.
const PROBE: &str = "/sync/v1/auth-probe";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A TLS client config trusting the hub's CA, with an optional client certificate.
fn client_config(hub: &Hub, client: Option<(&str, &KeyPair)>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(hub.ca_pem().as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match client {
        Some((pem, key)) => {
            let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            builder.with_client_auth_cert(chain, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// One POST to the hub's sync listener on a new connection (resumed when `config` holds a
/// session). Answers the status, the JSON body and whether TLS was resumed; a refused
/// handshake is an error.
async fn hub_post(
    hub: &Hub,
    config: &Arc<rustls::ClientConfig>,
    path: &str,
    body: Value,
) -> Result<(StatusCode, Value, bool), String> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", hub.sync_port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config.clone())
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let (status, body) = storebox_http::call_on(
        tls,
        "localhost",
        Method::POST,
        path,
        &[("content-type", "application/json")],
        Bytes::from(body.to_string()),
    )
    .await
    .map_err(|e| format!("exchange: {e}"))?;
    let value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok((status, value, resumed))
}

/// Enrolls a device key of the test's own for `store`, as a box would; answers the key and
/// the hub's answer (certificate and dates).
async fn enroll(hub: &Hub, store: &str) -> (KeyPair, Value) {
    let (status, doc) = hub
        .admin(
            Method::POST,
            &format!("/admin/v1/stores/{store}/enroll-token"),
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let token = doc["token"].as_str().unwrap().to_owned();
    let key = KeyPair::generate().unwrap();
    let answer = prove(hub, &key, store, "enroll", Some(&token))
        .await
        .unwrap();
    assert_eq!(answer.0, StatusCode::OK, "{}", answer.1);
    (key, answer.1)
}

/// A challenge, signed with `key`, sent to `/pki/v1/{purpose}`.
async fn prove(
    hub: &Hub,
    key: &KeyPair,
    store: &str,
    purpose: &str,
    token: Option<&str>,
) -> Result<(StatusCode, Value, bool), String> {
    let anonymous = client_config(hub, None);
    let (_, challenge, _) = hub_post(hub, &anonymous, "/pki/v1/challenge", json!({})).await?;
    let challenge = challenge["challenge"].as_str().unwrap().to_owned();
    let public = hex(key.public_key_raw());
    let message = format!("storebox-pki-v1\n{purpose}\n{store}\n{challenge}\n{public}");
    let signature = hex(&key.sign(message.as_bytes()).unwrap());
    let mut body = json!({"store": store, "public_key": public, "challenge": challenge,
                          "signature": signature});
    if let Some(token) = token {
        body["token"] = json!(token);
    }
    hub_post(hub, &anonymous, &format!("/pki/v1/{purpose}"), body).await
}

/// A client certificate for `store` made outside the hub: signed by `issuer`, with the given
/// validity (milliseconds from now).
fn forged(issuer: &Issuer<'_, KeyPair>, from_ms: i64, until_ms: i64) -> (String, KeyPair) {
    let now = std::time::SystemTime::now();
    let at = |ms: i64| {
        if ms >= 0 {
            now + Duration::from_millis(ms as u64)
        } else {
            now - Duration::from_millis((-ms) as u64)
        }
    };
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, STORE);
    params.distinguished_name = dn;
    params.not_before = at(from_ms).into();
    params.not_after = at(until_ms).into();
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key)
}

/// The hub's CA as an issuer, rebuilt from its key the way the hub does.
fn hub_issuer(hub: &Hub) -> Issuer<'static, KeyPair> {
    let key = std::fs::read_to_string(hub.dir.path().join("ca.key")).unwrap();
    let key = KeyPair::from_pem(&key).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "storehub private CA");
    params.distinguished_name = dn;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    Issuer::new(params, key)
}

fn refused(answer: &Result<(StatusCode, Value, bool), String>) -> bool {
    match answer {
        Err(_) => true,
        Ok((status, _, _)) => *status == StatusCode::UNAUTHORIZED,
    }
}

#[tokio::test]
async fn certificates_are_checked_on_every_request_including_resumed_sessions() {
    let hub = Hub::start_with_lifetime(&[STORE], "4s").await;
    let anonymous = client_config(&hub, None);
    let (status, doc, _) = hub_post(&hub, &anonymous, PROBE, json!({})).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{doc}");
    assert_eq!(doc["error"], "unauthorized");

    let (key, issued) = enroll(&hub, STORE).await;
    let pem = issued["certificate"].as_str().unwrap();
    let config = client_config(&hub, Some((pem, &key)));
    let (status, _, resumed) = hub_post(&hub, &config, PROBE, json!({})).await.unwrap();
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "an issued certificate is accepted"
    );
    assert!(!resumed);
    let (status, _, resumed) = hub_post(&hub, &config, PROBE, json!({})).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert!(resumed, "the second connection resumes the TLS session");

    // Past the certificate's end, a resumed session (no certificate check by TLS) is refused
    // by the hub's own check...
    let remaining =
        issued["not_after_ms"].as_i64().unwrap() - issued["hub_time_ms"].as_i64().unwrap();
    tokio::time::sleep(Duration::from_millis(remaining as u64 + 300)).await;
    let (status, doc, resumed) = hub_post(&hub, &config, PROBE, json!({})).await.unwrap();
    assert!(resumed, "the session was resumed");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{doc}");
    assert!(
        doc["message"].as_str().unwrap().contains("expired"),
        "{doc}"
    );
    // ...and so is a full handshake with it.
    let fresh = client_config(&hub, Some((pem, &key)));
    assert!(refused(&hub_post(&hub, &fresh, PROBE, json!({})).await));

    // After the outage, the enrolled key renews without a token: a signed renewal.
    let (status, renewed, _) = prove(&hub, &key, STORE, "renew", None).await.unwrap();
    assert_eq!(status, StatusCode::OK, "{renewed}");
    let config = client_config(&hub, Some((renewed["certificate"].as_str().unwrap(), &key)));
    let (status, _, _) = hub_post(&hub, &config, PROBE, json!({})).await.unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn revoked_certificates_are_refused_at_the_next_request_even_resumed() {
    let hub = Hub::start(&[STORE]).await;
    let (key, issued) = enroll(&hub, STORE).await;
    let config = client_config(&hub, Some((issued["certificate"].as_str().unwrap(), &key)));
    assert_eq!(
        hub_post(&hub, &config, PROBE, json!({})).await.unwrap().0,
        StatusCode::NOT_FOUND
    );
    let (status, doc) = hub
        .admin(
            Method::POST,
            &format!("/admin/v1/stores/{STORE}/revoke"),
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["revoked_certificates"], 1);
    let (status, doc, resumed) = hub_post(&hub, &config, PROBE, json!({})).await.unwrap();
    assert!(resumed, "the session was resumed");
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{doc}");
    assert_eq!(doc["error"], "revoked");
    // The revoked key cannot renew itself back in.
    let (status, doc, _) = prove(&hub, &key, STORE, "renew", None).await.unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{doc}");
    let certs = hub.certificates(STORE).await;
    assert!(certs[0]["revoked_at"].is_string(), "{certs:?}");
}

#[tokio::test]
async fn certificates_the_hub_did_not_issue_are_refused() {
    let hub = Hub::start(&[STORE]).await;
    let ca = hub_issuer(&hub);
    const HOUR: i64 = 3_600_000;
    let cases = [
        (
            "expired, signed by the hub's CA",
            forged(&ca, -2 * HOUR, -HOUR),
        ),
        (
            "not yet valid, signed by the hub's CA",
            forged(&ca, HOUR, 2 * HOUR),
        ),
        (
            "valid dates, signed by the hub's CA, never issued",
            forged(&ca, -HOUR, HOUR),
        ),
    ];
    let foreign_key = KeyPair::generate().unwrap();
    let mut foreign_params = CertificateParams::default();
    foreign_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "storehub private CA");
    foreign_params.distinguished_name = dn;
    let foreign = Issuer::new(foreign_params, foreign_key);
    let foreign_case = (
        "valid dates, foreign CA of the same name",
        forged(&foreign, -HOUR, HOUR),
    );
    for (what, (pem, key)) in cases.iter().chain(std::iter::once(&foreign_case)) {
        let config = client_config(&hub, Some((pem, key)));
        let answer = hub_post(&hub, &config, PROBE, json!({})).await;
        assert!(refused(&answer), "{what}: {answer:?}");
    }
    // A wrong enrollment token is refused and, repeated, rate limited.
    let key = KeyPair::generate().unwrap();
    let mut statuses = Vec::new();
    for _ in 0..7 {
        let (status, _, _) = prove(&hub, &key, STORE, "enroll", Some("0123456789abcdef"))
            .await
            .unwrap();
        statuses.push(status);
    }
    assert_eq!(statuses[0], StatusCode::UNAUTHORIZED);
    assert_eq!(statuses[6], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
}

#[tokio::test]
async fn a_box_renews_with_sync_in_flight_and_reauthenticates_after_an_outage() {
    let mut hub = Hub::start_with_lifetime(&[STORE], "6s").await;
    let products: Vec<Value> = (0..500)
        .map(|i| json!({"id": format!("p{i}"), "name": format!("product {i}"), "ean13": format!("{:013}", i)}))
        .collect();
    hub.import(STORE, "catalog", &products, false).await;
    let store_box = StoreBox::start(&hub, STORE, "[sync]\ndelta_interval = \"off\"\n").await;
    store_box.wait_full_sync(&["catalog"]).await;
    // Eight seconds of back-to-back syncs span at least one renewal (at 4 s) and the expiry
    // of the first certificate (at 6 s): every one must succeed. The hub recycles each box
    // connection after a sixth of the lifetime (here 1 s) with an HTTP/2 GOAWAY; a request
    // the box starts in the instant the GOAWAY arrives is sent again by the box's link on a
    // new connection, so no sync may fail.
    let started = std::time::Instant::now();
    let mut runs = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let path = if runs % 4 == 0 {
            "/v1/sync/full"
        } else {
            "/v1/sync/delta"
        };
        let (status, report) = store_box.post(path, Bytes::new()).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(report["ok"], true, "sync {runs} failed: {report}");
        runs += 1;
    }
    eprintln!("{runs} syncs");
    let certs = hub.certificates(STORE).await;
    assert!(certs.len() >= 2, "no renewal in 8 s: {certs:?}");

    // An outage of twice the lifetime: the certificate expires while the hub is away.
    hub.stop();
    tokio::time::sleep(Duration::from_secs(12)).await;
    hub.restart().await;
    let before = hub.certificates(STORE).await.len();
    wait_for(
        "a sync after the outage",
        Duration::from_secs(30),
        || async {
            let (_, report) = store_box.post("/v1/sync/delta", Bytes::new()).await;
            (report["ok"] == true).then_some(())
        },
    )
    .await;
    let after = hub.certificates(STORE).await;
    assert!(after.len() > before, "no new certificate after the outage");
    let log = store_box.proc.as_ref().unwrap().log_text();
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test]
async fn a_box_refuses_a_hub_outside_its_pinned_ca() {
    let hub = Hub::start(&[STORE]).await;
    // Another CA, not the one that signed the hub's certificate.
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let foreign = params.self_signed(&key).unwrap().pem();
    let boxes = hub.box_config(STORE).parent().unwrap().to_path_buf();
    std::fs::write(boxes.join("foreign-ca.crt"), foreign).unwrap();
    let store_box = StoreBox::start(
        &hub,
        STORE,
        "[hub]\nca_file = \"foreign-ca.crt\"\n[sync]\ndelta_interval = \"off\"\n",
    )
    .await;
    let (status, report) = store_box.post("/v1/sync/delta", Bytes::new()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(report["ok"], false, "{report}");
    let error = report["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        error.contains("certificate") || error.contains("TLS"),
        "{error}"
    );
    // It never enrolled either: the hub issued nothing to it.
    assert!(hub.certificates(STORE).await.is_empty());
}

#[tokio::test]
async fn a_box_whose_clock_says_1990_still_enrolls_and_syncs() {
    let hub = Hub::start(&[STORE]).await;
    hub.import(STORE, "config", &[json!({"id": "c1", "v": 1})], false)
        .await;
    // About 36 years behind: before the CA and the hub certificate were made.
    let store_box = StoreBox::start_with_env(
        &hub,
        STORE,
        "[sync]\ndelta_interval = \"off\"\n",
        &[("STOREBOX_FAULT_CLOCK_OFFSET_S", "-1136073600")],
    )
    .await;
    let doc = store_box.wait_full_sync(&["config"]).await;
    assert_eq!(doc["modules"]["config"]["records"], 1);
    assert_eq!(hub.certificates(STORE).await.len(), 1);
}

#[tokio::test]
async fn malformed_and_bomb_bodies_from_an_enrolled_box_get_400_and_the_hub_goes_on() {
    let hub = Hub::start(&[STORE]).await;
    let (key, issued) = enroll(&hub, STORE).await;
    let config = client_config(&hub, Some((issued["certificate"].as_str().unwrap(), &key)));
    // 300 MiB of zeros in a few kilobytes: beyond what the hub decompresses.
    let bomb = zstd::encode_all(std::io::repeat(0).take(300 << 20), 3).unwrap();
    assert!(bomb.len() < 1 << 20, "{} bytes", bomb.len());
    for (what, body) in [
        ("a decompression bomb", bomb),
        ("bytes that are not zstd", b"not a frame".to_vec()),
        (
            "zstd of bytes that are not postcard",
            zstd::encode_all(&[0xffu8; 64][..], 3).unwrap(),
        ),
    ] {
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", hub.sync_port))
            .await
            .unwrap();
        let tls = tokio_rustls::TlsConnector::from(config.clone())
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let (status, body) = storebox_http::call_on(
            tls,
            "localhost",
            Method::POST,
            storebox_protocol::PATH_DELTA,
            &[("content-type", storebox_protocol::CONTENT_TYPE)],
            Bytes::from(body),
        )
        .await
        .unwrap();
        let doc: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(status, StatusCode::BAD_REQUEST, "{what}: {doc}");
        assert_eq!(doc["error"], "bad_request", "{what}");
    }
    let (status, _) = hub
        .admin(Method::GET, "/admin/v1/stores", Bytes::new())
        .await;
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn a_technician_enrolls_a_box_with_a_hub_token_and_reenrolls_it_after_revocation() {
    let hub = Hub::start(&[STORE]).await;
    hub.import(STORE, "config", &[json!({"id": "c1"})], false)
        .await;
    // The technician's way: no token in the box config.
    let config = hub.box_config(STORE);
    let text = std::fs::read_to_string(&config).unwrap();
    let without: String = text
        .lines()
        .filter(|l| !l.starts_with("enroll_token"))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&config, without).unwrap();
    let token = |hub: &Hub| {
        let out = std::process::Command::new(support::bin("storehub"))
            .args(["enroll-token", "--store", STORE, "--config"])
            .arg(hub.dir.path().join("hub.toml"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_owned()
    };
    let enroll = |token: &str| {
        let out = std::process::Command::new(support::bin("storebox"))
            .args(["enroll", "--token", token, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let first = token(&hub);
    let (ok, out) = enroll(&first);
    assert!(ok && out.contains("enrolled"), "{out}");
    // A token works once.
    let (ok, out) = enroll(&first);
    assert!(!ok && out.contains("unknown, used or expired"), "{out}");

    let mut b = StoreBox::start(&hub, STORE, "[sync]\ndelta_interval = \"off\"\n").await;
    b.wait_full_sync(&["config"]).await;

    let (status, _) = hub
        .admin(
            Method::POST,
            &format!("/admin/v1/stores/{STORE}/revoke"),
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    // The box's link may still hold a connection opened before: the check is per request.
    let (_, report) = b.post("/v1/sync/delta", Bytes::new()).await;
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap_or_default()
            .contains("revoked"),
        "{report}"
    );

    let (ok, out) = enroll(&token(&hub));
    assert!(ok, "{out}");
    b.restart().await;
    wait_for(
        "a sync after re-enrollment",
        Duration::from_secs(30),
        || async {
            let (_, report) = b.post("/v1/sync/delta", Bytes::new()).await;
            (report["ok"] == true).then_some(())
        },
    )
    .await;
}
