//! Firmware updates through the real `storehub`: bundles and targets on the admin API, and
//! the check, the ranged bundle download and the report on the sync listener, called with
//! a client certificate the test enrolls for itself, as a box would; and, with the same
//! client, the protocol version 2 calls a hub still serves.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{KeyPair, SigningKey};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use serde_json::{json, Value};
use storebox_protocol::ota::{OtaCheck, OtaEvent, OtaOffer, OtaReport, OtaTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The hub's bundle size limit in these tests.
const LIMIT: usize = 4 << 20;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes standing in for a bundle: not compressible, different per seed.
fn bundle(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A `storehub` set up by `storehub init` in a temporary directory, killed on drop.
struct Hub {
    dir: tempfile::TempDir,
    admin: SocketAddr,
    sync: SocketAddr,
    token: String,
    child: Child,
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Hub {
    async fn start(stores: &[&str]) -> Hub {
        let dir = tempfile::tempdir().unwrap();
        let (sync_port, admin_port) = (free_port(), free_port());
        let mut init = Command::new(env!("CARGO_BIN_EXE_storehub"));
        init.arg("init")
            .arg("--dir")
            .arg(dir.path())
            .args(["--hub-port", &sync_port.to_string()])
            .args(["--admin-port", &admin_port.to_string()]);
        for store in stores {
            init.args(["--store", store]);
        }
        let out = init.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let config = dir.path().join("hub.toml");
        let text = std::fs::read_to_string(&config).unwrap();
        let edited = text.replace(
            "max_bundle_size = \"1GiB\"",
            &format!("max_bundle_size = \"{}MiB\"", LIMIT >> 20),
        );
        assert_ne!(text, edited, "hub.toml has no [ota] max_bundle_size");
        std::fs::write(&config, edited).unwrap();
        let log = std::fs::File::create(dir.path().join("hub.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_storehub"))
            .arg("serve")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        let token = std::fs::read_to_string(dir.path().join("admin.token"))
            .unwrap()
            .trim()
            .to_owned();
        let hub = Hub {
            dir,
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            sync: SocketAddr::from(([127, 0, 0, 1], sync_port)),
            token,
            child,
        };
        let start = Instant::now();
        loop {
            let up = storebox_http::call(
                hub.admin,
                Method::GET,
                "/admin/v1/stores",
                &[("authorization", &format!("Bearer {}", hub.token))],
                Bytes::new(),
            )
            .await;
            if up.is_ok_and(|(s, _)| s.is_success()) {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(20), "{}", hub.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        hub
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hub.log")).unwrap_or_default()
    }

    async fn admin(
        &self,
        method: Method,
        path: &str,
        body: impl Into<Bytes>,
    ) -> (StatusCode, Value) {
        let (status, body) = storebox_http::call(
            self.admin,
            method,
            path,
            &[("authorization", &format!("Bearer {}", self.token))],
            body.into(),
        )
        .await
        .unwrap();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    async fn upload(&self, version: &str, data: &[u8]) -> (StatusCode, Value) {
        self.admin(
            Method::PUT,
            &format!("/admin/v1/ota/bundles/{version}"),
            Bytes::copy_from_slice(data),
        )
        .await
    }

    async fn target(&self, path: &str, version: Option<&str>) -> (StatusCode, Value) {
        let body = json!({ "version": version }).to_string();
        self.admin(Method::PUT, path, body).await
    }

    /// A TLS client trusting the hub's CA, with `client`'s certificate when given.
    fn tls(&self, client: Option<&Client>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
        let ca = std::fs::read(self.dir.path().join("ca.crt")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca) {
            roots.add(cert.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match client {
            Some(c) => {
                let chain = CertificateDer::pem_slice_iter(c.certificate.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.serialize_der()));
                builder.with_client_auth_cert(chain, key).unwrap()
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(config)
    }

    /// One request to the sync listener over HTTP/1.1, or HTTP/2 with `h2`.
    async fn sync(
        &self,
        client: Option<&Client>,
        h2: bool,
        method: Method,
        path: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let alpn: &[u8] = if h2 { b"h2" } else { b"http/1.1" };
        let tcp = tokio::net::TcpStream::connect(self.sync).await.unwrap();
        let tls = tokio_rustls::TlsConnector::from(self.tls(client, alpn))
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
            .unwrap();
        let mut request = Request::builder()
            .method(method)
            .uri(format!("https://localhost{path}"));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from(body))).unwrap();
        let io = TokioIo::new(tls);
        let response = if h2 {
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        } else {
            let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.unwrap();
            tokio::spawn(connection);
            sender.send_request(request).await.unwrap()
        };
        let (parts, body) = response.into_parts();
        let body = body.collect().await.unwrap().to_bytes();
        (parts.status, parts.headers, body)
    }

    /// Enrolls a device key for `store` the way a box does: a token from the admin API, a
    /// challenge from the hub, the challenge signed.
    async fn enroll(&self, store: &str) -> Client {
        let (status, doc) = self
            .admin(
                Method::POST,
                &format!("/admin/v1/stores/{store}/enroll-token"),
                Bytes::new(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{doc}");
        let token = doc["token"].as_str().unwrap();
        let post = |path: &'static str, body: Value| async move {
            let (status, _, body) = self
                .sync(
                    None,
                    false,
                    Method::POST,
                    path,
                    &[("content-type", "application/json")],
                    body.to_string().into_bytes(),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            serde_json::from_slice::<Value>(&body).unwrap()
        };
        let challenge = post("/pki/v1/challenge", json!({})).await["challenge"]
            .as_str()
            .unwrap()
            .to_owned();
        let key = KeyPair::generate().unwrap();
        let public = hex(key.public_key_raw());
        let message = format!("storebox-pki-v1\nenroll\n{store}\n{challenge}\n{public}");
        let signature = hex(&key.sign(message.as_bytes()).unwrap());
        let issued = post(
            "/pki/v1/enroll",
            json!({"store": store, "token": token, "public_key": public,
                   "challenge": challenge, "signature": signature}),
        )
        .await;
        Client {
            certificate: issued["certificate"].as_str().unwrap().to_owned(),
            key,
        }
    }

    /// A box's check: what the hub offers a box of `client` running `running`.
    async fn check(&self, client: &Client, running: &str) -> Option<OtaTarget> {
        let check = OtaCheck {
            running: running.into(),
            compatible: "storebox-test-board".into(),
            slot: "A".into(),
        };
        let (status, headers, body) = self
            .sync(
                Some(client),
                true,
                Method::POST,
                storebox_protocol::ota::PATH_OTA,
                &[("content-type", storebox_protocol::CONTENT_TYPE)],
                storebox_protocol::encode(&check, 3).unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
        assert_eq!(headers["content-type"], storebox_protocol::CONTENT_TYPE);
        storebox_protocol::decode::<OtaOffer>(&body, "an offer")
            .unwrap()
            .target
    }

    /// Downloads (part of) a bundle as `client`.
    async fn download(
        &self,
        client: &Client,
        h2: bool,
        version: &str,
        range: Option<&str>,
    ) -> (StatusCode, HeaderMap, Bytes) {
        let path = format!("{}/{version}", storebox_protocol::ota::PATH_OTA_BUNDLE);
        let headers: Vec<(&str, &str)> = range.iter().map(|r| ("range", *r)).collect();
        self.sync(Some(client), h2, Method::GET, &path, &headers, Vec::new())
            .await
    }
}

/// A box's identity, enrolled by the test.
struct Client {
    certificate: String,
    key: KeyPair,
}

#[tokio::test]
async fn bundles_are_uploaded_listed_protected_while_targeted_and_refused_when_invalid() {
    let hub = Hub::start(&["shop-1"]).await;
    let data = bundle(1_500_000, 1);
    let (status, doc) = hub.upload("1.2.0", &data).await;
    assert_eq!(status, StatusCode::CREATED, "{doc}");
    assert_eq!(doc["version"], "1.2.0");
    assert_eq!(doc["size"], data.len());
    assert_eq!(doc["sha256"], storehub::sha256_hex(&data));
    let (status, _) = hub.upload("1.10.0", &bundle(1000, 2)).await;
    assert_eq!(status, StatusCode::CREATED);

    // Listed newest version first, by version order rather than text.
    let (status, doc) = hub.admin(Method::GET, "/admin/v1/ota/bundles", "").await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let versions: Vec<&str> = doc["bundles"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions, ["1.10.0", "1.2.0"]);
    assert_eq!(doc["bundles"][1]["sha256"], storehub::sha256_hex(&data));
    assert_eq!(doc["bundles"][1]["fleet_target"], false);

    // Not targeted, a version is replaced by a new upload.
    let replacement = bundle(1_200_000, 3);
    let (status, doc) = hub.upload("1.2.0", &replacement).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["sha256"], storehub::sha256_hex(&replacement));

    // Targeted (by the fleet or by a store), it can be neither replaced nor deleted.
    let (status, doc) = hub.target("/admin/v1/ota/target", Some("1.2.0")).await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["fleet_target"], "1.2.0");
    let (status, doc) = hub.upload("1.2.0", &data).await;
    assert_eq!(status, StatusCode::CONFLICT, "{doc}");
    assert_eq!(doc["error"], "bundle_targeted");
    assert!(doc["message"].as_str().unwrap().contains("fleet"), "{doc}");
    let (status, doc) = hub
        .admin(Method::DELETE, "/admin/v1/ota/bundles/1.2.0", "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{doc}");
    let (status, _) = hub.target("/admin/v1/ota/target", None).await;
    assert_eq!(status, StatusCode::OK);
    let (status, doc) = hub
        .target("/admin/v1/stores/shop-1/ota", Some("1.2.0"))
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    assert_eq!(doc["target"]["source"], "store");
    let (status, doc) = hub
        .admin(Method::DELETE, "/admin/v1/ota/bundles/1.2.0", "")
        .await;
    assert_eq!(status, StatusCode::CONFLICT, "{doc}");
    assert!(doc["message"].as_str().unwrap().contains("shop-1"), "{doc}");
    hub.target("/admin/v1/stores/shop-1/ota", None).await;
    let (status, doc) = hub
        .admin(Method::DELETE, "/admin/v1/ota/bundles/1.2.0", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let (status, doc) = hub
        .admin(Method::DELETE, "/admin/v1/ota/bundles/1.2.0", "")
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(doc["error"], "unknown_bundle");

    // A target needs its bundle; the body must say what it means.
    let (status, doc) = hub.target("/admin/v1/ota/target", Some("1.2.0")).await;
    assert_eq!(status, StatusCode::NOT_FOUND, "{doc}");
    assert_eq!(doc["error"], "unknown_bundle");
    let (status, _) = hub.admin(Method::PUT, "/admin/v1/ota/target", "{}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, doc) = hub
        .target("/admin/v1/stores/nowhere/ota", Some("1.10.0"))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(doc["error"], "unknown_store");

    // Invalid versions, empty bundles.
    for bad in ["1%202", "..", "a%2Fb", &"9".repeat(65)] {
        let (status, doc) = hub.upload(bad, b"bytes").await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}: {doc}");
        assert_eq!(doc["error"], "invalid_version", "{bad}");
    }
    let (status, doc) = hub.target("/admin/v1/ota/target", Some("1 2")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(doc["error"], "invalid_version");
    let (status, doc) = hub.upload("2.0.0", b"").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(doc["error"], "empty_bundle");

    // Over the limit: a declared length is refused before any of the body is sent...
    let mut tcp = tokio::net::TcpStream::connect(hub.admin).await.unwrap();
    let head = format!(
        "PUT /admin/v1/ota/bundles/2.0.0 HTTP/1.1\r\nhost: hub\r\nauthorization: Bearer {}\r\n\
         content-length: {}\r\n\r\n",
        hub.token,
        LIMIT + 1
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).contains("}") {
            let n = tcp.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no answer to an over-limit upload");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("\"too_large\""), "{answer}");
    assert!(answer.contains("max_bundle_size"), "{answer}");
    // ...and a bundle at the limit is accepted (past it while streaming: a unit test).
    let (status, doc) = hub.upload("2.0.0", &bundle(LIMIT, 4)).await;
    assert_eq!(status, StatusCode::CREATED, "{doc}");

    // The files on disk are exactly the recorded bundles.
    let files = std::fs::read_dir(hub.dir.path().join("hub-data/ota"))
        .unwrap()
        .count();
    assert_eq!(files, 2);
}

#[tokio::test]
async fn boxes_are_offered_their_target_download_it_whole_or_resumed_and_report() {
    let hub = Hub::start(&["shop-a", "shop-b"]).await;
    let a = hub.enroll("shop-a").await;
    let b = hub.enroll("shop-b").await;
    let v11 = bundle(1_000_003, 11);
    let v12 = bundle(700_001, 12);
    assert_eq!(hub.upload("1.1.0", &v11).await.0, StatusCode::CREATED);
    assert_eq!(hub.upload("1.2.0", &v12).await.0, StatusCode::CREATED);

    // Nothing targeted: nothing offered.
    assert_eq!(hub.check(&a, "1.0.0").await, None);

    // The fleet default, overridden for shop-b.
    hub.target("/admin/v1/ota/target", Some("1.1.0")).await;
    let (status, doc) = hub
        .target("/admin/v1/stores/shop-b/ota", Some("1.2.0"))
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    let offer = hub.check(&a, "1.0.0").await.unwrap();
    assert_eq!(offer.version, "1.1.0");
    assert_eq!(offer.size, v11.len() as u64);
    assert_eq!(hex(&offer.sha256), storehub::sha256_hex(&v11));
    let offer = hub.check(&b, "1.0.0").await.unwrap();
    assert_eq!(offer.version, "1.2.0");
    assert_eq!(hex(&offer.sha256), storehub::sha256_hex(&v12));
    // A box running its target is offered nothing.
    assert_eq!(hub.check(&b, "1.2.0").await, None);

    // The whole bundle, over HTTP/1.1 and HTTP/2.
    for h2 in [false, true] {
        let (status, headers, body) = hub.download(&a, h2, "1.1.0", None).await;
        assert_eq!(status, StatusCode::OK, "h2 {h2}");
        assert_eq!(headers["content-type"], "application/octet-stream");
        assert_eq!(headers["content-length"], v11.len().to_string());
        assert_eq!(headers["accept-ranges"], "bytes");
        assert_eq!(
            headers["etag"],
            format!("\"{}\"", storehub::sha256_hex(&v11))
        );
        assert!(body == v11, "h2 {h2}: the download differs from the upload");
    }

    // A download cut at an odd offset, resumed from there: the two parts are the bundle.
    let cut = 333_333;
    let (status, headers, first) = hub
        .download(&a, false, "1.1.0", Some(&format!("bytes=0-{}", cut - 1)))
        .await;
    assert_eq!(status, StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        headers["content-range"],
        format!("bytes 0-{}/{}", cut - 1, v11.len())
    );
    assert_eq!(first.len(), cut);
    for h2 in [false, true] {
        let (status, headers, rest) = hub
            .download(&a, h2, "1.1.0", Some(&format!("bytes={cut}-")))
            .await;
        assert_eq!(status, StatusCode::PARTIAL_CONTENT);
        assert_eq!(
            headers["content-range"],
            format!("bytes {cut}-{}/{}", v11.len() - 1, v11.len())
        );
        assert_eq!(headers["content-length"], (v11.len() - cut).to_string());
        let whole = [first.as_ref(), rest.as_ref()].concat();
        assert!(whole == v11, "h2 {h2}: the resumed download differs");
    }

    // A resumption naming another bundle (the target changed meanwhile) gets the whole new
    // one; naming this one, its range.
    let path = format!("{}/1.1.0", storebox_protocol::ota::PATH_OTA_BUNDLE);
    let etag = format!("\"{}\"", storehub::sha256_hex(&v11));
    for (validator, expected) in [
        ("\"0000\"", StatusCode::OK),
        (etag.as_str(), StatusCode::PARTIAL_CONTENT),
    ] {
        let headers = [("range", "bytes=10-"), ("if-range", validator)];
        let (status, _, body) = hub
            .sync(Some(&a), false, Method::GET, &path, &headers, Vec::new())
            .await;
        assert_eq!(status, expected, "if-range {validator}");
        let offset = if expected == StatusCode::OK { 0 } else { 10 };
        assert!(body == v11[offset..], "if-range {validator}");
    }

    // Past the end: 416, with the size.
    let (status, headers, body) = hub
        .download(&a, false, "1.1.0", Some(&format!("bytes={}-", v11.len())))
        .await;
    assert_eq!(status, StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(headers["content-range"], format!("bytes */{}", v11.len()));
    let doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["error"], "range_not_satisfiable");

    // Only a store's own target: not another store's, not an unknown or invalid version,
    // not without a client certificate.
    for (client, version) in [(&a, "1.2.0"), (&b, "1.1.0"), (&a, "9.9.9"), (&a, "..")] {
        let (status, _, _) = hub.download(client, false, version, None).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{version}");
    }
    let path = format!("{}/1.1.0", storebox_protocol::ota::PATH_OTA_BUNDLE);
    let (status, _, _) = hub
        .sync(None, false, Method::GET, &path, &[], Vec::new())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Reports, kept per store and shown with what the box last said it runs.
    let report = OtaReport {
        running: "1.0.0".into(),
        event: OtaEvent::RolledBack {
            version: "1.2.0".into(),
            reason: "health check: the LAN API did not answer".into(),
        },
        at: 1_790_000_000,
    };
    for report in [
        OtaReport {
            running: "1.0.0".into(),
            event: OtaEvent::Downloaded {
                version: "1.2.0".into(),
            },
            at: 1_789_999_000,
        },
        report,
    ] {
        let (status, _, body) = hub
            .sync(
                Some(&b),
                true,
                Method::POST,
                storebox_protocol::ota::PATH_OTA_REPORT,
                &[("content-type", storebox_protocol::CONTENT_TYPE)],
                storebox_protocol::encode(&report, 3).unwrap(),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(body.is_empty());
    }
    assert!(hub.check(&b, "1.0.0").await.is_some());
    let (status, fleet) = hub.admin(Method::GET, "/admin/v1/ota", "").await;
    assert_eq!(status, StatusCode::OK, "{fleet}");
    assert_eq!(fleet["fleet_target"], "1.1.0");
    let stores = fleet["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 2);
    let (sa, sb) = (&stores[0], &stores[1]);
    assert_eq!(sa["store"], "shop-a");
    assert_eq!(sa["target"]["version"], "1.1.0");
    assert_eq!(sa["target"]["source"], "fleet");
    assert_eq!(sa["running"], "1.0.0");
    assert_eq!(sa["on_target"], false);
    assert_eq!(sa["last_report"], Value::Null);
    assert_eq!(sb["target"]["version"], "1.2.0");
    assert_eq!(sb["target"]["source"], "store");
    assert_eq!(sb["store_target"], "1.2.0");
    assert_eq!(sb["running"], "1.0.0");
    assert_eq!(sb["compatible"], "storebox-test-board");
    assert_eq!(sb["slot"], "A");
    assert!(sb["last_check"].as_str().unwrap().ends_with('Z'), "{sb}");
    assert_eq!(sb["last_report"]["event"], "rolled_back");
    assert_eq!(sb["last_report"]["version"], "1.2.0");
    assert_eq!(
        sb["last_report"]["reason"],
        "health check: the LAN API did not answer"
    );
    assert_eq!(sb["last_report"]["at"], "2026-09-21T14:13:20.000Z");
    assert!(sb.get("reports").is_none(), "the fleet view has no history");
    let (status, store) = hub
        .admin(Method::GET, "/admin/v1/stores/shop-b/ota", "")
        .await;
    assert_eq!(status, StatusCode::OK, "{store}");
    let events: Vec<&str> = store["reports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(events, ["rolled_back", "downloaded"]);
    assert!(
        hub.log().contains("WARN") && hub.log().contains("rolled back"),
        "{}",
        hub.log()
    );

    // A malformed check is a 400, and the hub goes on.
    let (status, _, _) = hub
        .sync(
            Some(&a),
            false,
            Method::POST,
            storebox_protocol::ota::PATH_OTA,
            &[],
            b"not zstd".to_vec(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(hub.check(&a, "1.1.0").await.is_none());
}

/// Protocol version 2 boxes are still served next to version 3 ones: the old full sync and
/// acknowledgement messages at their old paths. Here because this file's client enrolls a
/// certificate of its own and speaks the sync protocol without a box.
#[tokio::test]
async fn version_2_full_syncs_and_acknowledgements_are_still_served() {
    use storebox_protocol::{self as proto, v2};
    let hub = Hub::start(&["shop-v2"]).await;
    let client = hub.enroll("shop-v2").await;
    let post = |path: &'static str, body: Vec<u8>| {
        let (hub, client) = (&hub, &client);
        async move {
            let (status, _, body) = hub
                .sync(
                    Some(client),
                    true,
                    Method::POST,
                    path,
                    &[("content-type", proto::CONTENT_TYPE)],
                    body,
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
            body
        }
    };
    // An old box's full sync: the plain modules answer, one frame per module, no slot.
    let request = v2::FullRequest {
        modules: vec![],
        digests: vec![],
        records: vec![],
    };
    let body = post(v2::PATH_FULL, proto::encode(&request, 3).unwrap()).await;
    let answer: proto::ModulesAnswer = proto::decode_plain(&body, "v2 answer").unwrap();
    assert_eq!(answer.frames.len(), 4);
    // The same request at the version 3 path does not decode: it is refused, not misread.
    let (status, _, _) = hub
        .sync(
            Some(&client),
            true,
            Method::POST,
            proto::PATH_FULL,
            &[("content-type", proto::CONTENT_TYPE)],
            proto::encode(&request, 3).unwrap(),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // An old box's acknowledgement is recorded.
    let ack = v2::Ack {
        cursors: vec![proto::ModuleCursor {
            module: "catalog".into(),
            cursor: 0,
        }],
        pending_activity: 3,
        box_version: "0.0.9".into(),
    };
    post(v2::PATH_ACK, proto::encode(&ack, 3).unwrap()).await;
    let (status, view) = hub
        .admin(Method::GET, "/admin/v1/fleet?store=shop-v2", Vec::new())
        .await;
    assert_eq!(status, StatusCode::OK, "{view}");
    let store = &view["stores"][0];
    assert_eq!(store["box_version"], "0.0.9", "{view}");
    assert_eq!(store["pending_activity"], 3);
    assert_eq!(store["modules"]["catalog"]["behind"], 0);
    // A version 2 box gets no slot, but the hub knows the one it would give.
    assert!(store["full_sync_slot"].is_string(), "{view}");
}
