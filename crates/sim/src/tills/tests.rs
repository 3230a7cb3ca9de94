//! Simulated tills against an in-process mock box: steady selling, and
//! selling through a box that is down at start and restarts mid-run.

#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use super::{run, TillsOptions};

/// A box stand-in: answers lookups from a generated store (with the first
/// 500 products "delisted") and records posted sales by id.
struct MockBox {
    products: BTreeMap<String, Value>,
    customers: BTreeMap<String, Value>,
    sales: Mutex<BTreeMap<String, Value>>,
    bad: Mutex<Vec<String>>,
}

impl MockBox {
    fn new(seed: u64) -> Arc<Self> {
        let store = crate::generate_store(seed);
        let products = store.modules["catalog"]
            .iter()
            .skip(500)
            .map(|p| (p["ean13"].as_str().unwrap().to_owned(), p.clone()))
            .collect();
        let customers = store.modules["customers"]
            .iter()
            .map(|c| (c["loyalty_card"].as_str().unwrap().to_owned(), c.clone()))
            .collect();
        Arc::new(Self {
            products,
            customers,
            sales: Mutex::default(),
            bad: Mutex::default(),
        })
    }

    fn check_sale(&self, sale: &Value) -> Result<(), String> {
        let lines = sale["lines"].as_array().ok_or("no lines")?;
        if lines.is_empty() {
            return Err("empty sale".into());
        }
        let total: u64 = lines
            .iter()
            .map(|l| l["qty"].as_u64().unwrap_or(0) * l["price_cents"].as_u64().unwrap_or(0))
            .sum();
        if sale["total_cents"].as_u64() != Some(total) {
            return Err(format!("total {} != {total}", sale["total_cents"]));
        }
        let id = sale["id"].as_str().ok_or("no id")?;
        let till = sale["till"].as_str().ok_or("no till")?;
        if sale["type"] != "sale" || !id.starts_with(&format!("{till}-")) {
            return Err(format!("bad type or id {id}"));
        }
        if chrono::DateTime::parse_from_rfc3339(sale["at"].as_str().ok_or("no at")?).is_err() {
            return Err("bad at".into());
        }
        if !(sale["customer"].is_null() || sale["customer"].is_string())
            || !sale["payment"].is_string()
        {
            return Err("bad customer or payment".into());
        }
        Ok(())
    }

    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or_default().to_owned();
        let found = |v: Option<&Value>| match v {
            Some(v) => (StatusCode::OK, v.to_string()),
            None => (StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.to_owned()),
        };
        let (status, body) = if let Some(ean) = path.strip_prefix("/v1/catalog/by-ean/") {
            found(self.products.get(ean))
        } else if let Some(card) = path.strip_prefix("/v1/customers/by-card/") {
            found(self.customers.get(card))
        } else if path == "/v1/promotions" && query.starts_with("active_at=") {
            (StatusCode::OK, "[]".to_owned())
        } else if path == "/v1/activity" && req.method() == Method::POST {
            let bytes = req
                .into_body()
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            match serde_json::from_slice::<Value>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|v| self.check_sale(&v).map(|()| v))
            {
                Ok(sale) => {
                    let id = sale["id"].as_str().unwrap_or_default().to_owned();
                    let mut sales = self.sales.lock().unwrap();
                    if sales.insert(id, sale).is_some() {
                        (StatusCode::OK, "{}".to_owned())
                    } else {
                        (StatusCode::CREATED, "{}".to_owned())
                    }
                }
                Err(e) => {
                    self.bad.lock().unwrap().push(e.clone());
                    (StatusCode::BAD_REQUEST, e)
                }
            }
        } else {
            (StatusCode::NOT_FOUND, format!("no route {path}"))
        };
        Ok(Response::builder()
            .status(status)
            .body(Full::new(Bytes::from(body)))
            .unwrap())
    }
}

/// Serves `state` on `listener` until the returned task is aborted, which
/// also drops every open connection (as a box restart would).
fn serve(listener: TcpListener, state: Arc<MockBox>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut connections = JoinSet::new();
        while let Ok((stream, _)) = listener.accept().await {
            let state = Arc::clone(&state);
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |req| Arc::clone(&state).handle(req));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

async fn bind(addr: SocketAddr) -> TcpListener {
    for _ in 0..50 {
        if let Ok(l) = TcpListener::bind(addr).await {
            return l;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("cannot bind {addr}");
}

fn options(addr: SocketAddr, tills: u32, secs: f64, rate: f64) -> TillsOptions {
    TillsOptions {
        base_url: format!("http://{addr}"),
        tills,
        duration: Some(Duration::from_secs_f64(secs)),
        rate,
        seed: 9,
        report_every: None,
        fingerprint: None,
        token: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tills_sell_against_a_box() {
    let state = MockBox::new(9);
    let listener = bind("127.0.0.1:0".parse().unwrap()).await;
    let addr = listener.local_addr().unwrap();
    let server = serve(listener, Arc::clone(&state));

    let reports = run(options(addr, 3, 1.5, 20.0), std::future::pending())
        .await
        .unwrap();
    server.abort();

    assert_eq!(
        reports.iter().map(|r| r.till.as_str()).collect::<Vec<_>>(),
        ["till-01", "till-02", "till-03"]
    );
    for r in &reports {
        assert_eq!(r.errors, 0, "{r}");
        assert!(r.sales >= 5, "{r}");
        assert!(r.lookups > r.sales, "{r}");
        assert!(r.lookup_p50_ms.is_some() && r.post_p99_ms.is_some(), "{r}");
    }
    assert!(
        reports.iter().map(|r| r.not_found).sum::<u64>() > 0,
        "some delisted products were scanned"
    );
    assert!(
        state.bad.lock().unwrap().is_empty(),
        "{:?}",
        state.bad.lock().unwrap()
    );
    let sales = state.sales.lock().unwrap();
    assert_eq!(
        sales.len() as u64,
        reports.iter().map(|r| r.sales).sum::<u64>()
    );
    // One run prefix shared by all tills.
    let prefixes: BTreeSet<&str> = sales
        .keys()
        .map(|id| id.split('-').nth(2).unwrap())
        .collect();
    assert_eq!(prefixes.len(), 1, "{prefixes:?}");
    assert!(sales.values().any(|s| s["customer"].is_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tills_keep_going_while_the_box_restarts() {
    let state = MockBox::new(9);
    // Reserve a free port, then leave it closed: the box is "down" at start.
    let addr = bind("127.0.0.1:0".parse().unwrap())
        .await
        .local_addr()
        .unwrap();
    let tills = tokio::spawn(run(options(addr, 2, 4.0, 20.0), std::future::pending()));

    tokio::time::sleep(Duration::from_millis(600)).await;
    let server = serve(bind(addr).await, Arc::clone(&state));
    // Wait for real selling (store generation is slow in debug builds on a
    // busy machine), then take the box down for a while.
    for _ in 0..200 {
        if state.sales.lock().unwrap().len() >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.abort();
    let _ = server.await;
    let before_restart = state.sales.lock().unwrap().len();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let server = serve(bind(addr).await, Arc::clone(&state));

    let reports = tills.await.unwrap().unwrap();
    server.abort();
    let errors: u64 = reports.iter().map(|r| r.errors).sum();
    let sold: u64 = reports.iter().map(|r| r.sales).sum();
    let stored = state.sales.lock().unwrap().len() as u64;
    assert!(errors > 0, "connection failures are reported");
    assert!(before_restart > 0, "sales before the restart");
    assert!(stored > before_restart as u64, "sales after the restart");
    // Every acknowledged sale is stored once; at most one per till may be
    // stored without its acknowledgement reaching the till.
    assert!(
        sold <= stored && stored <= sold + 2,
        "sold {sold}, stored {stored}"
    );
    assert!(state.bad.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stop_future_ends_the_run() {
    let state = MockBox::new(9);
    let listener = bind("127.0.0.1:0".parse().unwrap()).await;
    let addr = listener.local_addr().unwrap();
    let server = serve(listener, state);
    let mut opts = options(addr, 1, 0.0, 0.0);
    opts.duration = None;
    let started = std::time::Instant::now();
    let reports = run(opts, tokio::time::sleep(Duration::from_millis(1_500)))
        .await
        .unwrap();
    server.abort();
    assert!(started.elapsed() < Duration::from_secs(6));
    assert!(reports[0].sales > 0, "{}", reports[0]);
}

#[tokio::test]
async fn rejects_bad_options() {
    let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
    assert!(run(options(addr, 0, 1.0, 1.0), std::future::pending())
        .await
        .is_err());
    assert!(run(options(addr, 1, 1.0, -1.0), std::future::pending())
        .await
        .is_err());
    let mut opts = options(addr, 1, 1.0, 1.0);
    opts.base_url = "https://127.0.0.1:9".into();
    assert!(run(opts, std::future::pending()).await.is_err());
}
