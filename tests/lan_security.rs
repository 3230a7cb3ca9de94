//! The till API's security: TLS with a pinned box-local certificate, pairing and per-till
//! tokens with roles, unpairing, and listeners that cut off silent and slow clients and
//! refuse oversized or deeply nested bodies.

#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{box_data_dir, lan_fingerprint, Hub, StoreBox};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const STORE: &str = "shop-lan";
const DROPIN: &str = "[sync]\ndelta_interval = \"off\"\n";

/// A call over TLS pinned to `fingerprint`, with `token` (if any) as bearer.
async fn pinned_call(
    b: &StoreBox,
    fingerprint: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: impl Into<Bytes>,
) -> Result<(StatusCode, Value), String> {
    let tls = storebox_http::pinned::pinned_client_config(fingerprint)?;
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("authorization", a)])
        .unwrap_or_default();
    let (status, body) =
        storebox_http::call_over(b.lan, Some(&tls), method, path, &headers, body.into())
            .await
            .map_err(|e| e.to_string())?;
    Ok((status, serde_json::from_slice(&body).unwrap_or(Value::Null)))
}

#[tokio::test]
async fn tills_pair_with_a_confirmed_code_use_their_token_and_can_be_unpaired() {
    let hub = Hub::start(&[STORE]).await;
    hub.import(
        STORE,
        "catalog",
        &[json!({"id": "p1", "ean13": "4000000000001"})],
        false,
    )
    .await;
    let b = StoreBox::start(&hub, STORE, DROPIN).await;
    b.wait_full_sync(&["catalog"]).await;
    let fp = lan_fingerprint(&box_data_dir(&b.config)).unwrap();

    // The fingerprint a till pins is the one the status document publishes; a till pinned
    // to anything else does not get through the handshake.
    let (status, doc) = pinned_call(&b, &fp, Method::GET, "/v1/status", None, Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["lan_tls"]["fingerprint"], fp.as_str());
    let wrong = "00".repeat(32);
    assert!(
        pinned_call(&b, &wrong, Method::GET, "/v1/status", None, Bytes::new())
            .await
            .is_err()
    );
    // Plain HTTP to the TLS port gets no answer.
    assert!(
        storebox_http::call(b.lan, Method::GET, "/v1/status", &[], Bytes::new())
            .await
            .is_err()
    );

    // Unpaired: 401 with a JSON error saying what to do.
    let (status, doc) = pinned_call(&b, &fp, Method::GET, "/v1/catalog/p1", None, Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{doc}");
    assert_eq!(doc["error"], "unauthorized");
    assert!(doc["message"].as_str().unwrap().contains("pair"), "{doc}");

    // The till asks; the code appears on the status page and in `storebox pair`.
    let (status, ask) = pinned_call(
        &b,
        &fp,
        Method::POST,
        "/v1/pair",
        None,
        json!({"name": "till 7"}).to_string(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED, "{ask}");
    let code = ask["code"].as_str().unwrap().to_owned();
    let request = ask["request"].as_str().unwrap().to_owned();
    let poll = format!("/v1/pair/{request}");
    let (status, _) = pinned_call(&b, &fp, Method::GET, &poll, None, Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::ACCEPTED);
    let (_, page) = pinned_call(&b, &fp, Method::GET, "/v1/status", None, Bytes::new())
        .await
        .unwrap();
    assert_eq!(
        page["pairing"]["pending"][0]["code"],
        code.as_str(),
        "{page}"
    );
    let tls = storebox_http::pinned::pinned_client_config(&fp).unwrap();
    let (status, html) =
        storebox_http::call_over(b.lan, Some(&tls), Method::GET, "/", &[], Bytes::new())
            .await
            .unwrap();
    let html = String::from_utf8_lossy(&html);
    assert_eq!(status, StatusCode::OK);
    assert!(
        html.contains(&code) && html.contains(&fp),
        "the status page shows the code and fingerprint"
    );
    let (ok, listing) = b.cli(&["pair"]);
    assert!(
        ok && listing.contains(&code) && listing.contains(&fp),
        "{listing}"
    );

    // A manager confirms the code; the till's next poll gets its token, once.
    let (ok, out) = b.cli(&["pair", "--confirm", &code]);
    assert!(ok, "{out}");
    let (status, paired) = pinned_call(&b, &fp, Method::GET, &poll, None, Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::OK, "{paired}");
    let token = paired["token"].as_str().unwrap().to_owned();
    let till_id = paired["till"].as_str().unwrap().to_owned();
    let (status, _) = pinned_call(&b, &fp, Method::GET, &poll, None, Bytes::new())
        .await
        .unwrap();
    assert_eq!(status, StatusCode::NOT_FOUND, "a token is handed out once");

    // The till may look up and post; it may not trigger syncs or manage tills.
    let (status, record) = pinned_call(
        &b,
        &fp,
        Method::GET,
        "/v1/catalog/by-ean/4000000000001",
        Some(&token),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{record}");
    assert_eq!(record["id"], "p1");
    let sale = json!({"id": "sale-lan-1", "type": "sale"}).to_string();
    let (status, _) = pinned_call(&b, &fp, Method::POST, "/v1/activity", Some(&token), sale)
        .await
        .unwrap();
    assert_eq!(status, StatusCode::CREATED);
    let (status, doc) = pinned_call(
        &b,
        &fp,
        Method::POST,
        "/v1/sync/delta",
        Some(&token),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::FORBIDDEN, "{doc}");
    assert_eq!(doc["error"], "forbidden");

    // A technician credential, made on the box, can; and unpairs the till.
    let (ok, tech) = b.cli(&["pair", "--name", "tech 1", "--approve", "--technician"]);
    assert!(ok, "{tech}");
    let tech = tech.lines().next().unwrap().trim().to_owned();
    let (status, report) = pinned_call(
        &b,
        &fp,
        Method::POST,
        "/v1/sync/delta",
        Some(&tech),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK, "{report}");
    let (status, listing) =
        pinned_call(&b, &fp, Method::GET, "/v1/tills", Some(&tech), Bytes::new())
            .await
            .unwrap();
    assert_eq!(status, StatusCode::OK);
    assert!(listing["tills"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["id"] == till_id.as_str() && t["name"] == "till 7"));
    let (status, _) = pinned_call(
        &b,
        &fp,
        Method::DELETE,
        &format!("/v1/tills/{till_id}"),
        Some(&tech),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(status, StatusCode::OK);
    let (status, _) = pinned_call(
        &b,
        &fp,
        Method::GET,
        "/v1/catalog/p1",
        Some(&token),
        Bytes::new(),
    )
    .await
    .unwrap();
    assert_eq!(
        status,
        StatusCode::UNAUTHORIZED,
        "an unpaired till is refused at once"
    );
    // A wrong code confirms nothing.
    let (ok, out) = b.cli(&["pair", "--confirm", "999999x"]);
    assert!(!ok, "{out}");
}

#[tokio::test]
async fn oversized_and_deeply_nested_bodies_get_json_errors() {
    let hub = Hub::start(&[STORE]).await;
    let b = StoreBox::start(&hub, STORE, DROPIN).await;
    let big = format!(r#"{{"id":"big","pad":"{}"}}"#, "x".repeat(200 * 1024));
    let (status, doc) = b.post("/v1/activity", big).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{doc}");
    assert_eq!(doc["error"], "too_large");
    let deep = format!(
        r#"{{"id":"deep","x":{}1{}}}"#,
        "[".repeat(5000),
        "]".repeat(5000)
    );
    let (status, doc) = b.post("/v1/activity", deep).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{doc}");
    assert_eq!(doc["error"], "bad_json");
    let (status, doc) = b.post("/v1/pair", "{\"name\": 7}").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{doc}");
    // Nothing of it was stored; the box still serves.
    assert_eq!(b.status().await["activity"]["pending"], 0);
}

/// Reads until the peer closes; answers how long that took (or `None` after `limit`).
async fn closed_within(
    stream: &mut (impl AsyncReadExt + Unpin),
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match tokio::time::timeout(
            limit.saturating_sub(started.elapsed()),
            stream.read(&mut buf),
        )
        .await
        {
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => continue,
            Err(_) => return None,
        }
    }
}

#[tokio::test]
async fn silent_and_slow_clients_are_cut_off_and_the_api_keeps_serving() {
    let hub = Hub::start(&[STORE]).await;
    let b = StoreBox::start(&hub, STORE, DROPIN).await;
    let fp = lan_fingerprint(&box_data_dir(&b.config)).unwrap();
    // Silent: connects and sends nothing at all (not even a TLS hello).
    let silent = async {
        let mut tcp = tokio::net::TcpStream::connect(b.lan).await.unwrap();
        closed_within(&mut tcp, Duration::from_secs(30)).await
    };
    // Slow: completes TLS, then trickles a request head that never ends.
    let slow = async {
        let tcp = tokio::net::TcpStream::connect(b.lan).await.unwrap();
        let tls = storebox_http::pinned::pinned_client_config(&fp).unwrap();
        let name = rustls_pki_types::ServerName::IpAddress(b.lan.ip().into());
        let mut stream = tokio_rustls::TlsConnector::from(tls)
            .connect(name, tcp)
            .await
            .unwrap();
        stream
            .write_all(b"GET /v1/status HTTP/1.1\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        for i in 0..30 {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if stream
                .write_all(format!("x-slow-{i}: 1\r\n").as_bytes())
                .await
                .is_err()
            {
                return Some(started.elapsed());
            }
        }
        closed_within(&mut stream, Duration::from_secs(5))
            .await
            .map(|d| d + started.elapsed())
    };
    let (silent, slow) = tokio::join!(silent, slow);
    let silent = silent.expect("a silent connection stayed open for 30 s");
    let slow = slow.expect("a slow request head stayed open for 20 s");
    // The header timeout is 10 s.
    assert!(silent >= Duration::from_secs(9), "{silent:?}");
    assert!(slow >= Duration::from_secs(9), "{slow:?}");
    let (status, _) = b.get("/v1/status").await;
    assert_eq!(status, StatusCode::OK);
}
