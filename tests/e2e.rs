//! End-to-end tests: real `storehub` and `storebox` processes on 127.0.0.1, the generated
//! seed-scale store, and tills played by the test over the LAN API.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Hub, StoreBox};

const SEED: u64 = 42;
const MODULES: [&str; 4] = ["config", "catalog", "customers", "promotions"];
const DELTA_OFF: &str = "[sync]\ndelta_interval = \"off\"\nnotify = false\n";

on_both_backends!(
    cold_full_sync_serves_the_generated_store,
    the_days_changes_arrive_by_delta,
    full_sync_repairs_what_the_box_missed,
    activity_from_concurrent_tills_arrives_once_and_in_order,
    tills_keep_working_while_the_hub_is_down_and_the_box_catches_up,
    one_failing_module_does_not_stop_the_others,
    bad_input_on_the_till_api_gets_documented_errors,
    bad_input_on_the_admin_api_gets_documented_errors_and_changes_nothing,
    config_check_validates_without_starting_and_names_bad_keys,
    full_sync_repairs_a_record_damaged_on_the_box,
    a_change_on_the_hub_reaches_the_box_by_notification,
    full_sync_repairs_records_damaged_on_the_box,
);

/// The box's copy of a module, by id, read record by record over the till API.
async fn box_module(b: &StoreBox, module: &str, ids: &[String]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for id in ids {
        let (status, record) = b.get(&format!("/v1/{module}/{id}")).await;
        if status == StatusCode::OK {
            out.insert(id.clone(), record);
        }
    }
    out
}

fn ids(records: &[Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn cold_full_sync_serves_the_generated_store() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start(&["shop-a"]).await;
    hub.import_store("shop-a", &data).await;
    let b = StoreBox::start(&hub, "shop-a", DELTA_OFF).await;
    let status = b.wait_full_sync(&MODULES).await;
    for module in MODULES {
        assert_eq!(
            status["modules"][module]["records"].as_u64().unwrap() as usize,
            data.modules[module].len(),
            "{module}: {status}"
        );
        assert_eq!(status["modules"][module]["quarantined"], 0);
    }
    let bytes = &status["bytes"]["full"];
    assert!(bytes["received"].as_u64().unwrap() > 10_000, "{status}");

    // Lookups answer from local data with the hub's records.
    let product = &data.modules["catalog"][123];
    let (s, got) = b
        .get(&format!(
            "/v1/catalog/by-ean/{}",
            product["ean13"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&got, product);
    let customer = &data.modules["customers"][77];
    let (s, got) = b
        .get(&format!(
            "/v1/customers/by-card/{}",
            customer["loyalty_card"].as_str().unwrap()
        ))
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(&got, customer);
    let (s, got) = b
        .get(&format!(
            "/v1/customers/{}",
            customer["id"].as_str().unwrap()
        ))
        .await;
    assert_eq!((s, &got), (StatusCode::OK, customer));

    // Config is one object keyed by id.
    let (s, config) = b.get("/v1/config").await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        config.as_object().unwrap().len(),
        data.modules["config"].len()
    );

    // Promotions active at a time are exactly those whose window holds it.
    let at = "2026-06-15T12:00:00Z";
    let t = chrono::DateTime::parse_from_rfc3339(at).unwrap();
    let mut expected: Vec<String> = data.modules["promotions"]
        .iter()
        .filter(|p| {
            let start = chrono::DateTime::parse_from_rfc3339(p["start"].as_str().unwrap()).unwrap();
            let end = chrono::DateTime::parse_from_rfc3339(p["end"].as_str().unwrap()).unwrap();
            start <= t && t < end
        })
        .map(|p| p["id"].as_str().unwrap().to_owned())
        .collect();
    let (s, promos) = b.get(&format!("/v1/promotions?active_at={at}")).await;
    assert_eq!(s, StatusCode::OK);
    let mut got = ids(promos["promotions"].as_array().unwrap());
    expected.sort();
    got.sort();
    assert_eq!(got, expected);
    let (_, all) = b.get("/v1/promotions").await;
    assert_eq!(
        all["promotions"].as_array().unwrap().len(),
        data.modules["promotions"].len()
    );

    // The hub learns that the box acknowledged its cursors: the acknowledgement ends the full
    // sync, after the data is already served and checked.
    let hub_status = support::wait_for(
        "the box's acknowledgement",
        Duration::from_secs(20),
        || async {
            let (s, hub_status) = hub
                .admin(Method::GET, "/admin/v1/stores/shop-a/status", Bytes::new())
                .await;
            assert_eq!(s, StatusCode::OK);
            MODULES
                .iter()
                .all(|m| {
                    hub_status["modules"][m]["acknowledged"] == hub_status["modules"][m]["head"]
                })
                .then_some(hub_status)
        },
    )
    .await;
    assert!(hub_status["last_contact"].is_string());
}

async fn the_days_changes_arrive_by_delta() {
    let data = storebox_sim::generate_store(SEED);
    let changes = storebox_sim::day_changes(&data, SEED, 1);
    let hub = Hub::start(&["shop-b"]).await;
    hub.import_store("shop-b", &data).await;
    let b = StoreBox::start(&hub, "shop-b", DELTA_OFF).await;
    b.wait_full_sync(&MODULES).await;

    for (module, records) in &changes.upserts {
        hub.import("shop-b", module, records, false).await;
    }
    for (module, deleted) in &changes.deletes {
        for id in deleted {
            let (s, _) = hub
                .admin(
                    Method::DELETE,
                    &format!("/admin/v1/stores/shop-b/modules/{module}/records/{id}"),
                    Bytes::new(),
                )
                .await;
            assert_eq!(s, StatusCode::OK);
        }
    }
    let (s, report) = b.post("/v1/sync/delta", Bytes::new()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(report["ok"], true, "{report}");
    let received = report["bytes_received"].as_u64().unwrap();
    assert!(received > 0 && received < 200_000, "{report}");

    for (module, records) in &changes.upserts {
        let got = box_module(&b, module, &ids(records)).await;
        for record in records {
            assert_eq!(got.get(record["id"].as_str().unwrap()), Some(record));
        }
    }
    for (module, deleted) in &changes.deletes {
        assert!(!deleted.is_empty());
        assert!(box_module(&b, module, deleted).await.is_empty());
    }

    // A second pull finds nothing and moves nothing, and on the open connection it is one
    // small request and one small answer for all modules together.
    let (_, again) = b.post("/v1/sync/delta", Bytes::new()).await;
    assert_eq!(again["ok"], true);
    let idle = again["bytes_sent"].as_u64().unwrap() + again["bytes_received"].as_u64().unwrap();
    assert!(idle < 400, "an idle poll cost {idle} bytes: {again}");
    for module in MODULES {
        assert_eq!(again["modules"][module]["upserted"], 0, "{again}");
    }
}

async fn full_sync_repairs_what_the_box_missed() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start(&["shop-c"]).await;
    hub.import_store("shop-c", &data).await;
    let b = StoreBox::start(&hub, "shop-c", DELTA_OFF).await;
    b.wait_full_sync(&MODULES).await;

    // With nothing changed, a full sync compares digests and downloads nothing.
    let (_, idle) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(idle["ok"], true, "{idle}");
    for module in MODULES {
        assert_eq!(idle["modules"][module]["upserted"], 0, "{idle}");
    }
    let idle_bytes =
        idle["bytes_received"].as_u64().unwrap() + idle["bytes_sent"].as_u64().unwrap();
    assert!(
        idle_bytes < 2_000,
        "an idle full sync cost {idle_bytes} bytes: {idle}"
    );

    // The hub drops 100 products by replacing the catalog, changes one and deletes a
    // customer; the box, with delta pulls off, sees none of it.
    let catalog = &data.modules["catalog"];
    let mut kept: Vec<Value> = catalog[100..].to_vec();
    kept[0]["price_cents"] = json!(1);
    let out = hub.import("shop-c", "catalog", &kept, true).await;
    assert_eq!(out["deleted"], 100);
    assert_eq!(out["upserted"], 1);
    let gone_customer = data.modules["customers"][5]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    hub.admin(
        Method::DELETE,
        &format!("/admin/v1/stores/shop-c/modules/customers/records/{gone_customer}"),
        Bytes::new(),
    )
    .await;
    assert_eq!(
        box_module(&b, "catalog", &ids(&catalog[..100])).await.len(),
        100
    );

    let (ok, out) = b.cli(&["sync", "full"]);
    assert!(ok, "{out}");
    assert!(out.contains("full sync: ok"), "{out}");
    assert!(box_module(&b, "catalog", &ids(&catalog[..100]))
        .await
        .is_empty());
    let (_, first) = b
        .get(&format!("/v1/catalog/{}", kept[0]["id"].as_str().unwrap()))
        .await;
    assert_eq!(first, kept[0]);
    let (s, _) = b.get(&format!("/v1/customers/{gone_customer}")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let status = b.status().await;
    assert_eq!(status["modules"]["catalog"]["records"], kept.len());
    assert_eq!(
        status["modules"]["customers"]["records"],
        data.modules["customers"].len() - 1
    );
    let (ok, table) = b.cli(&["status"]);
    assert!(ok, "{table}");
    assert!(
        table.contains("catalog") && table.contains(&kept.len().to_string()),
        "{table}"
    );
}

async fn activity_from_concurrent_tills_arrives_once_and_in_order() {
    let hub = Hub::start(&["shop-d"]).await;
    let b = StoreBox::start(&hub, "shop-d", DELTA_OFF).await;
    const TILLS: usize = 4;
    const SALES: usize = 40;
    let mut tasks = Vec::new();
    for till in 0..TILLS {
        let lan = b.lan;
        tasks.push(tokio::spawn(async move {
            for n in 0..SALES {
                let body = json!({"id": format!("till-{till}-{n:04}"), "type": "sale", "till": till, "n": n, "total_cents": 100 + n});
                let body = Bytes::from(body.to_string());
                let (s, answer) = support::call(lan, Method::POST, "/v1/activity", &[], body.clone()).await;
                assert_eq!(s, StatusCode::CREATED, "{answer}");
                // Every fifth sale is sent twice, as a till does when an answer is lost.
                if n % 5 == 0 {
                    let (s, answer) = support::call(lan, Method::POST, "/v1/activity", &[], body).await;
                    assert_eq!(s, StatusCode::OK, "{answer}");
                    assert_eq!(answer["stored"], "duplicate");
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    b.wait_pushed(Duration::from_secs(30)).await;
    let events = hub.activity("shop-d").await;
    assert_eq!(events.len(), TILLS * SALES);
    let mut last_per_till = BTreeMap::new();
    let mut seen = std::collections::BTreeSet::new();
    for e in &events {
        assert!(seen.insert(e["id"].as_str().unwrap().to_owned()));
        let till = e["event"]["till"].as_u64().unwrap();
        let n = e["event"]["n"].as_i64().unwrap();
        let last = last_per_till.insert(till, n).unwrap_or(-1);
        assert!(n > last, "till {till}: sale {n} after {last}");
    }
    let status = b.status().await;
    assert_eq!(status["activity"]["pushed"], TILLS * SALES);
}

async fn tills_keep_working_while_the_hub_is_down_and_the_box_catches_up() {
    let data = storebox_sim::generate_store(SEED);
    let mut hub = Hub::start(&["shop-e"]).await;
    hub.import_store("shop-e", &data).await;
    let b = StoreBox::start(&hub, "shop-e", "[sync]\ndelta_interval = \"2s\"\n").await;
    b.wait_full_sync(&MODULES).await;

    hub.stop();
    let product = &data.modules["catalog"][10];
    for n in 0..20 {
        let (s, got) = b
            .get(&format!("/v1/catalog/{}", product["id"].as_str().unwrap()))
            .await;
        assert_eq!((s, &got), (StatusCode::OK, product));
        let (s, _) = b
            .post(
                "/v1/activity",
                json!({"id": format!("offline-{n}"), "type": "sale"}).to_string(),
            )
            .await;
        assert_eq!(s, StatusCode::CREATED);
    }
    let status = support::wait_for(
        "the box to see the hub down",
        Duration::from_secs(20),
        || async {
            let doc = b.status().await;
            (doc["hub"]["state"] == "down").then_some(doc)
        },
    )
    .await;
    assert_eq!(status["activity"]["pending"], 20, "{status}");
    assert!(status["hub"]["last_error"].is_string());

    // The box restarts too (a power cut during the outage): nothing it acknowledged is lost.
    let mut b = b;
    b.restart().await;
    assert_eq!(b.status().await["activity"]["pending"], 20);

    hub.restart().await;
    let mut changed = data.modules["catalog"][10].clone();
    changed["price_cents"] = json!(4242);
    hub.import("shop-e", "catalog", std::slice::from_ref(&changed), false)
        .await;
    b.wait_pushed(Duration::from_secs(40)).await;
    let events = hub.activity("shop-e").await;
    let got: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let want: Vec<String> = (0..20).map(|n| format!("offline-{n}")).collect();
    assert_eq!(got, want);
    support::wait_for(
        "the change to arrive by delta",
        Duration::from_secs(40),
        || async {
            let (_, got) = b
                .get(&format!("/v1/catalog/{}", changed["id"].as_str().unwrap()))
                .await;
            (got == changed).then_some(())
        },
    )
    .await;
    assert_eq!(b.status().await["hub"]["state"], "up");
}

async fn one_failing_module_does_not_stop_the_others() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start_with_env(
        &["shop-f"],
        &[
            ("STOREHUB_FAULT_FAIL_MODULES", "customers"),
            ("STOREHUB_FAULT_CORRUPT_MODULES", "promotions"),
        ],
    )
    .await;
    hub.import_store("shop-f", &data).await;
    // One catalog record the box must refuse: its indexed EAN is an object.
    let mut bad = data.modules["catalog"][0].clone();
    bad["ean13"] = json!({"not": "a code"});
    hub.import("shop-f", "catalog", &[bad.clone()], false).await;

    let b = StoreBox::start(&hub, "shop-f", DELTA_OFF).await;
    let status = b.wait_full_sync(&["config", "catalog"]).await;
    let (_, report) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(report["ok"], false);
    assert_eq!(report["modules"]["catalog"]["ok"], true, "{report}");
    assert_eq!(report["modules"]["config"]["ok"], true);
    assert!(
        report["modules"]["customers"]["error"].is_string(),
        "{report}"
    );
    assert!(report["modules"]["promotions"]["error"]
        .as_str()
        .unwrap()
        .contains("decode"));

    assert_eq!(
        status["modules"]["catalog"]["records"].as_u64().unwrap() as usize,
        data.modules["catalog"].len() - 1
    );
    let status = b.status().await;
    assert_eq!(status["modules"]["catalog"]["quarantined"], 1);
    assert_eq!(
        status["modules"]["catalog"]["quarantine"][0]["id"],
        bad["id"]
    );
    // Modules the hub failed before the box ever had them are listed, empty, with the error.
    assert_eq!(status["modules"]["customers"]["records"], 0, "{status}");
    assert!(
        status["modules"]["customers"]["last_error"].is_string(),
        "{status}"
    );
    assert!(
        status["modules"]["promotions"]["last_error"].is_string(),
        "{status}"
    );
    assert!(status["modules"]["catalog"]["last_error"].is_null());

    // Delta pulls keep the healthy modules going.
    let mut p = data.modules["catalog"][3].clone();
    p["label"] = json!("Changed while customers fail");
    hub.import("shop-f", "catalog", &[p.clone()], false).await;
    let (_, report) = b.post("/v1/sync/delta", Bytes::new()).await;
    assert_eq!(report["modules"]["catalog"]["upserted"], 1, "{report}");
    let (_, got) = b
        .get(&format!("/v1/catalog/{}", p["id"].as_str().unwrap()))
        .await;
    assert_eq!(got, p);
}

async fn bad_input_on_the_till_api_gets_documented_errors() {
    let hub = Hub::start(&["shop-g"]).await;
    let b = StoreBox::start(&hub, "shop-g", DELTA_OFF).await;
    b.wait_full_sync(&MODULES).await;
    let cases: Vec<(Method, &str, Bytes, StatusCode, &str)> = vec![
        (
            Method::POST,
            "/v1/activity",
            Bytes::from("{not json"),
            StatusCode::BAD_REQUEST,
            "bad_json",
        ),
        (
            Method::POST,
            "/v1/activity",
            Bytes::from(r#"{"type":"sale"}"#),
            StatusCode::BAD_REQUEST,
            "bad_event",
        ),
        (
            Method::POST,
            "/v1/activity",
            Bytes::from(r#"{"id":7}"#),
            StatusCode::BAD_REQUEST,
            "bad_event",
        ),
        (
            Method::POST,
            "/v1/activity",
            Bytes::from(r#"["id"]"#),
            StatusCode::BAD_REQUEST,
            "bad_event",
        ),
        (
            Method::POST,
            "/v1/activity",
            Bytes::from(format!(r#"{{"id":"big","pad":"{}"}}"#, "x".repeat(70_000))),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            Method::GET,
            "/v1/catalog/nope",
            Bytes::new(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/catalog/by-ean/0000000000000",
            Bytes::new(),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            Method::GET,
            "/v1/nosuchmodule/x",
            Bytes::new(),
            StatusCode::NOT_FOUND,
            "unknown_module",
        ),
        (
            Method::GET,
            "/v1/promotions?active_at=yesterday",
            Bytes::new(),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            Method::GET,
            "/v2/anything",
            Bytes::new(),
            StatusCode::NOT_FOUND,
            "no_route",
        ),
        (
            Method::DELETE,
            "/v1/activity",
            Bytes::new(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (method, path, body, want, kind) in cases {
        let (status, answer) = support::call(b.lan, method.clone(), path, &[], body).await;
        assert_eq!(status, want, "{method} {path}: {answer}");
        assert_eq!(answer["error"], kind, "{method} {path}: {answer}");
        assert!(answer["message"].is_string());
    }
    // Nothing of the refused posts was stored.
    assert_eq!(b.status().await["activity"]["pending"], 0);
}

async fn bad_input_on_the_admin_api_gets_documented_errors_and_changes_nothing() {
    let hub = Hub::start(&["shop-h"]).await;
    let base = "/admin/v1/stores/shop-h";
    // Authentication.
    let (s, _) = support::call(
        hub.admin,
        Method::GET,
        "/admin/v1/stores",
        &[],
        Bytes::new(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);
    let (s, _) = support::call(
        hub.admin,
        Method::GET,
        "/admin/v1/stores",
        &[("authorization", "Bearer wrong")],
        Bytes::new(),
    )
    .await;
    assert_eq!(s, StatusCode::UNAUTHORIZED);

    // A bad third line refuses the whole import, naming the line.
    let body = "{\"id\":\"a\"}\n{\"id\":\"b\"}\n{\"id\": 3}\n{\"id\":\"d\"}\n";
    let (s, answer) = hub
        .admin(
            Method::POST,
            &format!("{base}/modules/catalog/import"),
            body,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST);
    assert!(
        answer["message"].as_str().unwrap().contains("line 3"),
        "{answer}"
    );
    let (s, _) = hub
        .admin(
            Method::GET,
            &format!("{base}/modules/catalog/records/a"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, answer) = hub
        .admin(
            Method::POST,
            &format!("{base}/modules/catalog/import"),
            "not json\n",
        )
        .await;
    assert_eq!(
        (s, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_record"))
    );

    // Unknown store and module.
    let (s, answer) = hub
        .admin(Method::GET, "/admin/v1/stores/nope/status", Bytes::new())
        .await;
    assert_eq!(
        (s, answer["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_store"))
    );
    let (s, answer) = hub
        .admin(
            Method::POST,
            &format!("{base}/modules/nope/import"),
            "{\"id\":\"a\"}",
        )
        .await;
    assert_eq!(
        (s, answer["error"].as_str()),
        (StatusCode::NOT_FOUND, Some("unknown_module"))
    );

    // Record routes.
    let (s, answer) = hub
        .admin(
            Method::PUT,
            &format!("{base}/modules/catalog/records/x"),
            r#"{"id":"y"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::BAD_REQUEST, "{answer}");
    let (s, answer) = hub
        .admin(
            Method::PUT,
            &format!("{base}/modules/catalog/records/x"),
            r#"{"label":"X"}"#,
        )
        .await;
    assert_eq!(s, StatusCode::CREATED, "{answer}");
    let (s, answer) = hub
        .admin(
            Method::PUT,
            &format!("{base}/modules/catalog/records/x"),
            r#"{"label":"X"}"#,
        )
        .await;
    assert_eq!(
        (s, answer["outcome"].as_str()),
        (StatusCode::OK, Some("unchanged"))
    );
    let (s, got) = hub
        .admin(
            Method::GET,
            &format!("{base}/modules/catalog/records/x"),
            Bytes::new(),
        )
        .await;
    assert_eq!((s, got), (StatusCode::OK, json!({"id": "x", "label": "X"})));
    let (s, _) = hub
        .admin(
            Method::DELETE,
            &format!("{base}/modules/catalog/records/x"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    let (s, _) = hub
        .admin(
            Method::DELETE,
            &format!("{base}/modules/catalog/records/x"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (s, answer) = hub
        .admin(
            Method::GET,
            &format!("{base}/activity?after=abc"),
            Bytes::new(),
        )
        .await;
    assert_eq!(
        (s, answer["error"].as_str()),
        (StatusCode::BAD_REQUEST, Some("bad_request"))
    );

    // The import with replace answers the documented counts.
    let (s, answer) = hub
        .admin(
            Method::POST,
            &format!("{base}/modules/catalog/import?replace=true"),
            "{\"id\":\"a\"}\n{\"id\":\"b\"}\n",
        )
        .await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(answer, json!({"upserted": 2, "deleted": 0, "unchanged": 0}));
    let (_, answer) = hub
        .admin(
            Method::POST,
            &format!("{base}/modules/catalog/import?replace=true"),
            "{\"id\":\"a\"}\n",
        )
        .await;
    assert_eq!(answer, json!({"upserted": 0, "deleted": 1, "unchanged": 1}));
}

async fn config_check_validates_without_starting_and_names_bad_keys() {
    let hub = Hub::start(&["shop-i"]).await;
    let config = hub.box_config("shop-i");
    let storebox = support::bin("storebox");
    let check = |config: &std::path::Path| {
        std::process::Command::new(&storebox)
            .args(["config", "check", "--config"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = std::process::Command::new(&storebox)
        .args(["config", "check"])
        .env("STOREBOX_CONFIG", &config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("OK") && text.contains("shop-i"), "{text}");
    // Nothing was started: no data directory was created.
    assert!(!config.with_file_name("shop-i-data").exists());

    let dropins = config.with_file_name("storebox.d");
    std::fs::create_dir_all(&dropins).unwrap();
    std::fs::write(
        dropins.join("40-typo.toml"),
        "[sync]\ndelta_intervall = \"1m\"\n",
    )
    .unwrap();
    let out = check(&config);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("delta_intervall") && err.contains("40-typo.toml"),
        "{err}"
    );

    // A CA file that is not a certificate is caught too.
    std::fs::remove_file(dropins.join("40-typo.toml")).unwrap();
    std::fs::write(
        dropins.join("40-ca.toml"),
        "[hub]\nca_file = \"/dev/null\"\n",
    )
    .unwrap();
    let out = check(&config);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("CA"));
}

async fn full_sync_repairs_a_record_damaged_on_the_box() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start(&["shop-j"]).await;
    hub.import_store("shop-j", &data).await;
    let mut b = StoreBox::start(&hub, "shop-j", DELTA_OFF).await;
    b.wait_full_sync(&MODULES).await;
    let product = &data.modules["catalog"][42];
    let id = product["id"].as_str().unwrap();

    // Stop the box and damage one stored record behind its back, as bad flash would.
    if let Some(mut p) = b.proc.take() {
        p.kill();
    }
    let db_path = b.config.with_file_name("shop-j-data").join("storebox.redb");
    {
        const RECORDS: redb::TableDefinition<(&str, &str), &str> =
            redb::TableDefinition::new("records");
        let db = redb::Database::create(&db_path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut records = txn.open_table(RECORDS).unwrap();
            records
                .insert(("catalog", id), r#"{"id":"damaged","price_cents":0}"#)
                .unwrap();
        }
        txn.commit().unwrap();
    }
    b.restart().await;
    let (_, damaged) = b.get(&format!("/v1/catalog/{id}")).await;
    assert_ne!(&damaged, product);

    let (_, report) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(report["ok"], true, "{report}");
    assert_eq!(report["modules"]["catalog"]["upserted"], 1, "{report}");
    assert_eq!(report["modules"]["customers"]["upserted"], 0, "{report}");
    let (_, repaired) = b.get(&format!("/v1/catalog/{id}")).await;
    assert_eq!(&repaired, product);
}

async fn a_change_on_the_hub_reaches_the_box_by_notification() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start(&["shop-n"]).await;
    hub.import_store("shop-n", &data).await;
    // No periodic pull at all: only the change watch can bring the new price.
    let b = StoreBox::start(&hub, "shop-n", "[sync]\ndelta_interval = \"off\"\n").await;
    b.wait_full_sync(&MODULES).await;
    support::wait_for("the change watch", Duration::from_secs(20), || async {
        (b.status().await["wire"]["watching"] == true).then_some(())
    })
    .await;

    let mut product = data.modules["catalog"][7].clone();
    product["price_cents"] = json!(4242);
    let id = product["id"].as_str().unwrap().to_owned();
    let (s, answer) = hub
        .admin(
            Method::PUT,
            &format!("/admin/v1/stores/shop-n/modules/catalog/records/{id}"),
            product.to_string(),
        )
        .await;
    assert!(s.is_success(), "{answer}");
    let started = std::time::Instant::now();
    support::wait_for(
        "the new price on the box",
        Duration::from_secs(10),
        || async {
            let (_, got) = b.get(&format!("/v1/catalog/{id}")).await;
            (got["price_cents"] == 4242).then_some(())
        },
    )
    .await;
    eprintln!("price change reached the box in {:?}", started.elapsed());
    // The watch is open again after the pull, and one delta carried the change, as a
    // patch: a few hundred bytes at most.
    let status = support::wait_for("the watch re-armed", Duration::from_secs(10), || async {
        let status = b.status().await;
        (status["bytes"]["watch"]["requests"].as_u64() >= Some(2)).then_some(status)
    })
    .await;
    assert_eq!(status["bytes"]["delta"]["requests"], 1, "{status}");
    assert!(
        status["bytes"]["delta"]["received"].as_u64().unwrap() < 400,
        "{status}"
    );
}

async fn full_sync_repairs_records_damaged_on_the_box() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start(&["shop-r"]).await;
    hub.import_store("shop-r", &data).await;
    let mut b = StoreBox::start(&hub, "shop-r", DELTA_OFF).await;
    b.wait_full_sync(&MODULES).await;
    if let Some(mut p) = b.proc.take() {
        p.kill();
    }

    // Damage the box's database behind its back: a changed product, a lost customer and a
    // product the hub never had.
    let db_path = b.config.with_file_name("shop-r-data").join("storebox.redb");
    let changed_id = data.modules["catalog"][3]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let lost_id = data.modules["customers"][9]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    {
        let records: redb::TableDefinition<(&str, &str), &str> =
            redb::TableDefinition::new("records");
        let db = redb::Database::open(&db_path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(records).unwrap();
            let mut damaged = data.modules["catalog"][3].clone();
            damaged["price_cents"] = json!(1);
            table
                .insert(
                    ("catalog", changed_id.as_str()),
                    damaged.to_string().as_str(),
                )
                .unwrap();
            table.remove(("customers", lost_id.as_str())).unwrap();
            table
                .insert(("catalog", "ZZ-stray"), r#"{"id":"ZZ-stray"}"#)
                .unwrap();
        }
        txn.commit().unwrap();
    }
    b.restart().await;

    let (s, report) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(report["ok"], true, "{report}");
    for module in ["catalog", "customers"] {
        assert_eq!(report["modules"][module]["method"], "repaired", "{report}");
    }
    for module in ["config", "promotions"] {
        assert_eq!(report["modules"][module]["method"], "unchanged", "{report}");
    }
    let cost = report["bytes_sent"].as_u64().unwrap() + report["bytes_received"].as_u64().unwrap();
    assert!(
        cost < 8_000,
        "repairing three records cost {cost} bytes: {report}"
    );

    let (_, got) = b.get(&format!("/v1/catalog/{changed_id}")).await;
    assert_eq!(got, data.modules["catalog"][3]);
    let (s, got) = b.get(&format!("/v1/customers/{lost_id}")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(got, data.modules["customers"][9]);
    let (s, _) = b.get("/v1/catalog/ZZ-stray").await;
    assert_eq!(s, StatusCode::NOT_FOUND);

    // Repaired, the next full sync finds nothing to do.
    let (_, again) = b.post("/v1/sync/full", Bytes::new()).await;
    for module in MODULES {
        assert_eq!(again["modules"][module]["method"], "unchanged", "{again}");
    }
}
