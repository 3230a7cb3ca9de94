//! Fleet scale, end to end with the real binaries on 127.0.0.1: a full sync that finds
//! nothing to do is one round trip, the hub hands each box its full sync slot, and the
//! hub's fleet view (admin API and `storehub fleet`) shows what a technician must look at.

#![allow(clippy::unwrap_used)]

#[macro_use]
mod support;

use std::process::Command;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use serde_json::{json, Value};
use support::{Hub, StoreBox};

const SEED: u64 = 42;
const MODULES: [&str; 4] = ["config", "catalog", "customers", "promotions"];
const DELTA_OFF: &str = "[sync]\ndelta_interval = \"off\"\nnotify = false\n";

async fn fleet(hub: &Hub, query: &str) -> Value {
    let (status, doc) = hub
        .admin(
            Method::GET,
            &format!("/admin/v1/fleet{query}"),
            Bytes::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{doc}");
    doc
}

/// Runs `storehub fleet` against the hub's config.
fn fleet_cli(hub: &Hub, args: &[&str]) -> String {
    let out = Command::new(support::bin("storehub"))
        .arg("fleet")
        .arg("--config")
        .arg(hub.dir.path().join("hub.toml"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "storehub fleet {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

async fn a_full_sync_with_nothing_changed_is_one_round_trip() {
    let data = storebox_sim::generate_store(SEED);
    let hub = Hub::start(&["shop-n"]).await;
    hub.import_store("shop-n", &data).await;
    let b = StoreBox::start(&hub, "shop-n", DELTA_OFF).await;
    b.wait_full_sync(&MODULES).await;
    // Let the first full sync's acknowledgement land, so the run below is alone on the link.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = fleet(&hub, "?store=shop-n").await["stores"][0].clone();

    let (status, report) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(status, StatusCode::OK, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    for module in MODULES {
        assert_eq!(report["modules"][module]["method"], "unchanged", "{report}");
    }
    eprintln!(
        "no-change full sync: {} requests, bodies {} B sent + {} B received, socket {} B sent + {} B received",
        report["requests"],
        report["body_bytes_sent"],
        report["body_bytes_received"],
        report["bytes_sent"],
        report["bytes_received"],
    );
    // One request, one answer: the digests of every module and the box's status go up, "all
    // unchanged" and the box's slot come down, and the hub takes it as the acknowledgement.
    assert_eq!(report["requests"], 1, "{report}");
    assert!(
        report["body_bytes_sent"].as_u64().unwrap() < 200,
        "{report}"
    );
    let after = fleet(&hub, "?store=shop-n").await["stores"][0].clone();
    assert_ne!(after["last_full_sync"], before["last_full_sync"], "{after}");
    assert_eq!(after["box_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(after["pending_activity"], 0);

    // With a change to make, the box acknowledges after applying: two round trips, and the
    // hub learns the new cursor.
    let mut p = data.modules["catalog"][5].clone();
    p["price_cents"] = json!(4242);
    hub.import("shop-n", "catalog", &[p], false).await;
    let (_, report) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(
        report["modules"]["catalog"]["method"], "changes",
        "{report}"
    );
    assert_eq!(report["requests"], 2, "{report}");
    let view = fleet(&hub, "?store=shop-n").await["stores"][0].clone();
    let catalog = &view["modules"]["catalog"];
    assert_eq!(catalog["acknowledged"], catalog["head"], "{view}");
    assert_eq!(catalog["behind"], 0);
    assert_eq!(catalog["data_age_s"], 0);
}

async fn the_box_runs_its_full_sync_at_the_slot_the_hub_gives_it() {
    let hub = Hub::start(&["shop-s"]).await;
    let b_dropin = DELTA_OFF;
    let mut b = StoreBox::start(&hub, "shop-s", b_dropin).await;
    b.wait_full_sync(&MODULES).await;
    let view = fleet(&hub, "").await;
    assert_eq!(view["full_sync_window"], "05:00-07:00");
    let slot = view["stores"][0]["full_sync_slot"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(("05:00:00".."07:00:00").contains(&slot.as_str()), "{slot}");
    let schedule = &b.status().await["full_sync_schedule"];
    assert_eq!(schedule["source"], "hub", "{schedule}");
    assert_eq!(schedule["at"], json!([slot]));

    // A restart does not forget it, though no full sync runs before the slot.
    b.restart().await;
    let schedule = &b.status().await["full_sync_schedule"];
    assert_eq!(schedule["source"], "hub", "{schedule}");
    assert_eq!(schedule["at"], json!([slot]));

    // A time set on the box wins over the hub's slot.
    let dropin = format!("{DELTA_OFF}full_sync_at = [\"06:30\"]\n");
    let b2 = {
        drop(b);
        StoreBox::start(&hub, "shop-s", &dropin).await
    };
    let schedule = &b2.status().await["full_sync_schedule"];
    assert_eq!(schedule["source"], "config", "{schedule}");
    assert_eq!(schedule["at"], json!(["06:30:00"]));
}

async fn the_fleet_view_names_the_boxes_that_need_a_technician() {
    let data = storebox_sim::generate_store(SEED);
    let mut hub = Hub::start_with_env(
        &["shop-ok", "shop-new"],
        &[("STOREHUB_FAULT_FAIL_MODULES", "customers")],
    )
    .await;
    hub.import_store("shop-ok", &data).await;
    let b = StoreBox::start(&hub, "shop-ok", DELTA_OFF).await;
    b.wait_full_sync(&["config", "catalog", "promotions"]).await;

    // The box reports the module the hub failed with its acknowledgement.
    let view = support::wait_for(
        "the box's module error at the hub",
        Duration::from_secs(20),
        || async {
            let view = fleet(&hub, "").await;
            let ok = view["stores"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["store"] == "shop-ok")
                .cloned()
                .unwrap();
            ok["modules"]["customers"]["error"]
                .is_string()
                .then_some(view)
        },
    )
    .await;
    let stores = view["stores"].as_array().unwrap();
    assert_eq!(stores.len(), 2, "{view}");
    let ok = stores.iter().find(|s| s["store"] == "shop-ok").unwrap();
    let new = stores.iter().find(|s| s["store"] == "shop-new").unwrap();
    // Everything a technician looks at, from the box's own reports and the hub's records.
    assert_eq!(ok["seen"], true);
    assert_eq!(ok["box_version"], env!("CARGO_PKG_VERSION"));
    assert!(ok["last_contact_age_s"].as_i64().unwrap() < 60, "{ok}");
    let cert = &ok["certificate"];
    assert_eq!(cert["revoked"], false, "{ok}");
    assert!(cert["expires_in_s"].as_i64().unwrap() > 20 * 3600, "{ok}");
    assert_eq!(ok["pending_activity"], 0);
    assert_eq!(ok["modules"]["catalog"]["behind"], 0, "{ok}");
    assert!(ok["modules"]["customers"]["error"]
        .as_str()
        .unwrap()
        .contains("fault injected"));
    let reasons: Vec<&str> = ok["attention"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["module_error"], "{ok}");
    // A store whose box never called is listed as such.
    assert_eq!(new["seen"], false);
    assert_eq!(new["attention"][0]["reason"], "never_seen", "{new}");

    // Filters: by reason, and the thresholds. A certificate of 24 h expires within 2 days.
    let by_reason = fleet(&hub, "?reason=never_seen").await;
    assert_eq!(by_reason["stores"].as_array().unwrap().len(), 1);
    assert_eq!(by_reason["stores"][0]["store"], "shop-new");
    let certs = fleet(&hub, "?reason=cert_expiring&cert_within=2d").await;
    assert_eq!(certs["stores"][0]["store"], "shop-ok", "{certs}");
    let (status, doc) = hub
        .admin(Method::GET, "/admin/v1/fleet?no_contact=soon", Bytes::new())
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{doc}");

    // The CLI: a table for people, JSON for scripts.
    let table = fleet_cli(&hub, &["--needs-attention"]);
    assert!(table.starts_with("STORE"), "{table}");
    assert!(table.contains("shop-new"), "{table}");
    assert!(
        table.contains("shop-ok: module_error: customers:"),
        "{table}"
    );
    assert!(table.contains("shop-new: never_seen:"), "{table}");
    let json: Value =
        serde_json::from_str(&fleet_cli(&hub, &["--json", "--reason", "module_error"])).unwrap();
    let listed: Vec<&str> = json["stores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["store"].as_str().unwrap())
        .collect();
    assert_eq!(listed, ["shop-ok"]);

    // Once the hub serves the module again and the box syncs it, its error clears.
    hub.env.clear();
    hub.restart().await;
    let (_, report) = b.post("/v1/sync/full", Bytes::new()).await;
    assert_eq!(report["ok"], true, "{report}");
    let ok = fleet(&hub, "?store=shop-ok").await["stores"][0].clone();
    assert!(ok["modules"]["customers"]["error"].is_null(), "{ok}");
    assert_eq!(ok["attention"], json!([]), "{ok}");
}

/// A chain's catalog kept once for the group (`scope = "group"`), each store overriding a
/// record locally: every box holds the chain's records with its own on top, a chain-wide
/// change reaches all of them, and removing an override shows the chain's record again.
async fn a_chain_catalog_is_kept_once_and_reaches_every_box_with_local_prices() {
    let data = storebox_sim::generate_store(SEED);
    let mut hub = Hub::start(&["shop-g1", "shop-g2"]).await;
    let path = hub.dir.path().join("hub.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let edited = text
        .replace(
            "indexes = [\"ean13\"]\n",
            "indexes = [\"ean13\"]\nscope = \"group\"\n",
        )
        .replace(
            "id = \"shop-g1\"\n",
            "id = \"shop-g1\"\ngroup = \"chain\"\n",
        )
        .replace(
            "id = \"shop-g2\"\n",
            "id = \"shop-g2\"\ngroup = \"chain\"\n",
        );
    assert_eq!(edited.matches("group = \"chain\"").count(), 2, "{edited}");
    assert!(edited.contains("scope = \"group\""), "{edited}");
    std::fs::write(&path, edited).unwrap();
    hub.restart().await;

    // The catalog goes in once, for the group; the other modules per store.
    let body = storebox_sim::to_ndjson(&data.modules["catalog"]);
    let (s, answer) = hub
        .admin(
            Method::POST,
            "/admin/v1/groups/chain/modules/catalog/import",
            body,
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    assert_eq!(
        answer["upserted"],
        data.modules["catalog"].len(),
        "{answer}"
    );
    for store in ["shop-g1", "shop-g2"] {
        for (module, records) in &data.modules {
            if module != "catalog" {
                hub.import(store, module, records, false).await;
            }
        }
    }
    // A module kept per store cannot be imported for a group, and an unknown group is named.
    let (s, answer) = hub
        .admin(
            Method::POST,
            "/admin/v1/groups/chain/modules/customers/import",
            Bytes::new(),
        )
        .await;
    assert_eq!(
        (s, &answer["error"]),
        (StatusCode::BAD_REQUEST, &json!("module_not_shared"))
    );
    let (s, answer) = hub
        .admin(
            Method::POST,
            "/admin/v1/groups/nowhere/modules/catalog/import",
            Bytes::new(),
        )
        .await;
    assert_eq!(
        (s, &answer["error"]),
        (StatusCode::NOT_FOUND, &json!("unknown_group"))
    );

    let dropin = "[sync]\ndelta_interval = \"off\"\n";
    let one = StoreBox::start(&hub, "shop-g1", dropin).await;
    let two = StoreBox::start(&hub, "shop-g2", dropin).await;
    for b in [&one, &two] {
        let status = b.wait_full_sync(&MODULES).await;
        assert_eq!(
            status["modules"]["catalog"]["records"],
            data.modules["catalog"].len(),
            "{status}"
        );
        support::wait_for("the change watch", Duration::from_secs(20), || async {
            (b.status().await["wire"]["watching"] == true).then_some(())
        })
        .await;
    }

    let local = data.modules["catalog"][3]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let chain = data.modules["catalog"][4]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let record = |n: usize, cents: u64| {
        let mut r = data.modules["catalog"][n].clone();
        r["price_cents"] = json!(cents);
        r.to_string()
    };
    let set = |scope: &str, id: &str, body: String| {
        let path = format!("/admin/v1/{scope}/modules/catalog/records/{id}");
        let hub = &hub;
        async move {
            let (s, answer) = hub.admin(Method::PUT, &path, body).await;
            assert!(s.is_success(), "{answer}");
        }
    };
    async fn sees(b: &StoreBox, id: &str, cents: u64) {
        support::wait_for(
            &format!("price {cents} of {id} on {}", b.config.display()),
            Duration::from_secs(20),
            || async {
                let (_, got) = b.get(&format!("/v1/catalog/{id}")).await;
                (got["price_cents"] == cents).then_some(())
            },
        )
        .await;
    }

    // A local price on one store; the other keeps the chain's.
    set("stores/shop-g1", &local, record(3, 999)).await;
    sees(&one, &local, 999).await;
    let chain_price = data.modules["catalog"][3]["price_cents"].as_u64().unwrap();
    sees(&two, &local, chain_price).await;

    // One write for the chain reaches both boxes.
    set("groups/chain", &chain, record(4, 4242)).await;
    sees(&one, &chain, 4242).await;
    sees(&two, &chain, 4242).await;

    // The chain changes the record a store overrides: the store keeps its own price.
    set("groups/chain", &local, record(3, 5555)).await;
    sees(&two, &local, 5555).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, got) = one.get(&format!("/v1/catalog/{local}")).await;
    assert_eq!(got["price_cents"], 999, "{got}");

    // Without its override, the store has the chain's record again.
    let (s, answer) = hub
        .admin(
            Method::DELETE,
            &format!("/admin/v1/stores/shop-g1/modules/catalog/records/{local}"),
            Bytes::new(),
        )
        .await;
    assert_eq!(s, StatusCode::OK, "{answer}");
    sees(&one, &local, 5555).await;

    // Each box holds exactly what the hub serves it: a full sync finds nothing to change.
    for b in [&one, &two] {
        let (status, report) = b.post("/v1/sync/full", Bytes::new()).await;
        assert_eq!(status, StatusCode::OK, "{report}");
        for module in MODULES {
            assert_eq!(report["modules"][module]["method"], "unchanged", "{report}");
        }
    }
}

on_both_backends!(
    a_chain_catalog_is_kept_once_and_reaches_every_box_with_local_prices,
    a_full_sync_with_nothing_changed_is_one_round_trip,
    the_box_runs_its_full_sync_at_the_slot_the_hub_gives_it,
    the_fleet_view_names_the_boxes_that_need_a_technician,
);
