//! Stateless hub replicas on one PostgreSQL database: a box reaches them through a switch
//! standing in for the platform's load balancer, moves from one to the other when its replica
//! stops, hears of changes written through either, and its activity is stored exactly once.

#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{set_backend, Backend, Hub, StoreBox};

const SEED: u64 = 42;
const MODULES: [&str; 4] = ["config", "catalog", "customers", "promotions"];

/// A TCP switch on 127.0.0.1: each new connection goes to the port set last. The boxes'
/// TLS passes through it untouched, as through a layer-4 load balancer.
async fn switch(target: Arc<AtomicU16>) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((mut inbound, _)) = listener.accept().await else {
                return;
            };
            let to = target.load(Ordering::SeqCst);
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    port
}

/// Sales `r-N` for each N of `numbers`, each accepted by the box.
async fn sell(b: &StoreBox, numbers: std::ops::Range<u32>) {
    for n in numbers {
        let (s, _) = b
            .post(
                "/v1/activity",
                json!({"id": format!("r-{n}"), "type": "sale"}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
}

async fn price_on_box(b: &StoreBox, id: &str, cents: u64, within: Duration) -> Duration {
    let started = std::time::Instant::now();
    support::wait_for("the new price on the box", within, || async {
        let (_, got) = b.get(&format!("/v1/catalog/{id}")).await;
        (got["price_cents"] == cents).then_some(())
    })
    .await;
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_box_moves_between_replicas_and_its_activity_is_stored_once() {
    set_backend(Backend::Postgres);
    let data = storebox_sim::generate_store(SEED);
    let mut hub = Hub::start(&["shop-r"]).await;
    hub.import_store("shop-r", &data).await;
    let mut second = hub.start_replica().await;

    // The box reaches the first replica through the switch.
    let target = Arc::new(AtomicU16::new(hub.sync_port));
    let switch_port = switch(target.clone()).await;
    let config = hub.box_config("shop-r");
    let text = std::fs::read_to_string(&config).unwrap();
    let edited = text.replace(
        &format!("127.0.0.1:{}\"", hub.sync_port),
        &format!("127.0.0.1:{switch_port}\""),
    );
    assert_ne!(text, edited, "the box config names no hub address");
    std::fs::write(&config, edited).unwrap();
    // Only the change watch brings changes: no periodic pull.
    let b = StoreBox::start(&hub, "shop-r", "[sync]\ndelta_interval = \"off\"\n").await;
    b.wait_full_sync(&MODULES).await;
    support::wait_for("the change watch", Duration::from_secs(20), || async {
        (b.status().await["wire"]["watching"] == true).then_some(())
    })
    .await;

    // A price written through the second replica reaches the box waiting on the first:
    // the database's notification crosses between them.
    let mut product = data.modules["catalog"][7].clone();
    let id = product["id"].as_str().unwrap().to_owned();
    product["price_cents"] = json!(4242);
    let path = format!("/admin/v1/stores/shop-r/modules/catalog/records/{id}");
    let (s, answer) = second.admin(Method::PUT, &path, product.to_string()).await;
    assert!(s.is_success(), "{answer}");
    let took = price_on_box(&b, &id, 4242, Duration::from_secs(10)).await;
    eprintln!("change through the other replica reached the box in {took:?}");

    sell(&b, 0..10).await;
    b.wait_pushed(Duration::from_secs(30)).await;

    // The first replica goes away; new connections go to the second. Sales made meanwhile
    // reach the hub through it, and so do changes.
    target.store(second.sync_port, Ordering::SeqCst);
    hub.stop();
    sell(&b, 10..20).await;
    b.wait_pushed(Duration::from_secs(60)).await;
    product["price_cents"] = json!(4343);
    let (s, answer) = second.admin(Method::PUT, &path, product.to_string()).await;
    assert!(s.is_success(), "{answer}");
    let took = price_on_box(&b, &id, 4343, Duration::from_secs(40)).await;
    eprintln!("change after the move reached the box in {took:?}");

    let events = activity(&second, "shop-r").await;
    let got: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..20).map(|n| format!("r-{n}")).collect();
    assert_eq!(got, want);
    second.stop();
}

async fn activity(replica: &support::Replica, store: &str) -> Vec<Value> {
    let (status, page) = replica
        .admin(
            Method::GET,
            &format!("/admin/v1/stores/{store}/activity?after=0&limit=1000"),
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{page}");
    page["events"].as_array().unwrap().clone()
}

/// Two replicas (two connection pools) receiving the same batches at the same moment store
/// each event once, numbered without gaps: uniqueness lives in the database.
#[test]
fn the_same_batch_pushed_to_two_replicas_at_once_is_stored_once() {
    let database = support::pg::Database::create();
    let connection = storehub::store::postgres::Connection {
        url: database.url.clone(),
        pool_size: 4,
        ca_cert: None,
    };
    storehub::store::postgres::migrate(&connection).unwrap();
    let replicas: Vec<_> = (0..2)
        .map(|_| Arc::new(storehub::store::postgres::Postgres::open(connection.clone()).unwrap()))
        .collect();
    let batches: Vec<Vec<storebox_protocol::PushedEvent>> = (0..20)
        .map(|b| {
            (0..50)
                .map(|n| storebox_protocol::PushedEvent {
                    id: format!("e-{b}-{n}"),
                    received_at_ms: 1,
                    event: format!(r#"{{"id":"e-{b}-{n}","type":"sale"}}"#),
                })
                .collect()
        })
        .collect();
    let batches = Arc::new(batches);
    let threads: Vec<_> = replicas
        .iter()
        .map(|replica| {
            let replica = replica.clone();
            let batches = batches.clone();
            std::thread::spawn(move || {
                use storehub::store::Backend;
                let mut accepted = 0;
                for batch in batches.iter() {
                    accepted += replica.push_activity("s", batch, 2).unwrap().accepted;
                }
                accepted
            })
        })
        .collect();
    let accepted: u32 = threads.into_iter().map(|t| t.join().unwrap()).sum();
    assert_eq!(accepted, 1000);
    use storehub::store::Backend;
    let (events, high) = replicas[0].activity("s", 0, 5000).unwrap();
    assert_eq!((events.len(), high), (1000, 1000));
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=1000).collect::<Vec<u64>>());
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 1000);
}

/// With `[database] ca_cert`, the hub talks to PostgreSQL over TLS, checks the server's
/// certificate, and does not fall back to plain TCP.
#[test]
fn the_hub_reaches_postgresql_over_tls_only_with_the_right_ca() {
    use storehub::store::Backend;
    let database = support::pg::TlsDatabase::create();
    let connection = storehub::store::postgres::Connection {
        url: database.url.clone(),
        pool_size: 2,
        ca_cert: Some(database.ca_cert.clone()),
    };
    storehub::store::postgres::migrate(&connection).unwrap();
    let backend = storehub::store::postgres::Postgres::open(connection.clone()).unwrap();
    let event = storebox_protocol::PushedEvent {
        id: "e-1".into(),
        received_at_ms: 1,
        event: r#"{"id":"e-1","type":"sale"}"#.into(),
    };
    assert_eq!(backend.push_activity("s", &[event], 2).unwrap().accepted, 1);
    // The server sees the hub's connections encrypted.
    let mut local = postgres::Client::connect(&database.socket_url(), postgres::NoTls).unwrap();
    let row = local
        .query_one(
            "SELECT count(*) FILTER (WHERE s.ssl), count(*) FROM pg_stat_activity a \
             JOIN pg_stat_ssl s USING (pid) WHERE a.application_name = 'storehub'",
            &[],
        )
        .unwrap();
    let (tls, all): (i64, i64) = (row.get(0), row.get(1));
    assert!(
        all >= 1 && tls == all,
        "{tls} of {all} connections over TLS"
    );

    // Another CA: the certificate is refused, and no plain connection is tried instead.
    let other = support::pg::TlsDatabase::create();
    let wrong = storehub::store::postgres::Connection {
        ca_cert: Some(other.ca_cert.clone()),
        ..connection.clone()
    };
    let e = storehub::store::postgres::migrate(&wrong).unwrap_err();
    assert!(format!("{e:#}").contains("certificate"), "{e:#}");
    // Without a CA the hub tries plain TCP, which this server refuses.
    let plain = storehub::store::postgres::Connection {
        ca_cert: None,
        ..connection
    };
    assert!(storehub::store::postgres::migrate(&plain).is_err());
}
