//! A day's changes to a generated store: catalogue price, stock and label
//! updates, a few listings and delistings, new loyalty members and balance
//! updates, and a couple of promotion and configuration changes.
//!
//! Updates are whole records (the full new JSON object) of ids that exist in
//! the store passed in; created records use id and code ranges that base
//! stores never use and that differ between days, so applying several days in
//! any order never makes two records share an id, EAN or card number
//! (for `day` below 250,000,000).

use std::collections::{BTreeMap, BTreeSet};

use chrono::Days;
use serde_json::{json, Value};

use crate::catalog::{new_product, shelf_price};
use crate::config::{receipt_footer, user};
use crate::customers::{new_customer, tier};
use crate::identity::{midnight_utc, Identity};
use crate::prng::SplitMix64;
use crate::promotions::promotion;
use crate::{DayChanges, Store};

const PRICE_UPDATES: usize = 22;
const STOCK_UPDATES: usize = 18;
const LABEL_UPDATES: usize = 4;
const STATUS_UPDATES: usize = 2;
const NEW_PRODUCTS: u64 = 4;
const DELISTED_PRODUCTS: usize = 3;
const NEW_CUSTOMERS: u64 = 20;
const POINTS_UPDATES: usize = 30;

/// Labels get one of these when the supplier changes the product; stripped
/// before adding another so labels do not grow day after day.
const LABEL_SUFFIXES: &[&str] = &[
    " - nouvelle recette",
    " - édition limitée",
    " - format éco",
    " - nouveau",
];

fn module<'a>(store: &'a Store, name: &str) -> &'a [Value] {
    store.modules.get(name).map(Vec::as_slice).unwrap_or(&[])
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap_or_default().to_owned()
}

fn catalog_changes(rng: &mut SplitMix64, catalog: &[Value], day: u64) -> (Vec<Value>, Vec<String>) {
    let updates = PRICE_UPDATES + STOCK_UPDATES + LABEL_UPDATES + STATUS_UPDATES;
    // One draw of distinct products, so no product is both updated and
    // delisted, or updated twice, on the same day.
    let picked = rng.distinct_indices(catalog.len(), updates + DELISTED_PRODUCTS);
    let mut upserts = Vec::new();
    for (k, &i) in picked.iter().take(updates).enumerate() {
        let mut p = catalog[i].clone();
        if k < PRICE_UPDATES {
            let old = p["price_cents"].as_u64().unwrap_or(100);
            // Mostly small increases (inflation), some markdowns.
            let pct = if rng.percent(70) {
                100 + rng.range(2, 12)
            } else {
                100 - rng.range(5, 15)
            };
            let mut price = shelf_price(rng, old * pct / 100);
            if price == old {
                // Rounding to a shelf price undid a small change: move a step.
                price = shelf_price(rng, old + 10);
            }
            p["price_cents"] = json!(price);
        } else if k < PRICE_UPDATES + STOCK_UPDATES {
            let unit_max = if p["unit"] == json!("piece") { 240 } else { 80 };
            let old = p["stock"].as_u64().unwrap_or(0);
            // A delivery or an inventory count: never the same figure.
            let stock = (old + rng.range(1, unit_max)) % (unit_max + 1);
            p["stock"] = json!(stock);
        } else if k < PRICE_UPDATES + STOCK_UPDATES + LABEL_UPDATES {
            let mut label = p["label"].as_str().unwrap_or_default().to_owned();
            for s in LABEL_SUFFIXES {
                if let Some(stripped) = label.strip_suffix(s) {
                    label = stripped.to_owned();
                }
            }
            let suffix = *rng.pick(LABEL_SUFFIXES);
            label.push_str(suffix);
            p["label"] = json!(label);
        } else {
            let active = p["active"].as_bool().unwrap_or(true);
            p["active"] = json!(!active);
        }
        upserts.push(p);
    }
    for i in 0..NEW_PRODUCTS {
        upserts.push(new_product(rng, day * NEW_PRODUCTS + i));
    }
    let deletes = picked
        .iter()
        .skip(updates)
        .map(|&i| id_of(&catalog[i]))
        .collect();
    (upserts, deletes)
}

fn customer_changes(
    rng: &mut SplitMix64,
    customers: &[Value],
    day: u64,
    identity: &Identity,
) -> Vec<Value> {
    let mut upserts: Vec<Value> = (0..NEW_CUSTOMERS)
        .map(|i| new_customer(rng, day * NEW_CUSTOMERS + i, identity))
        .collect();
    for i in rng.distinct_indices(customers.len(), POINTS_UPDATES) {
        let mut c = customers[i].clone();
        let old = c["points"].as_u64().unwrap_or(0);
        // Earning (one point per euro of a basket) or redeeming a voucher.
        let points = if old >= 500 && rng.percent(20) {
            old - rng.range(1, 5) * 100
        } else {
            old + rng.range(5, 150)
        };
        c["points"] = json!(points);
        c["tier"] = json!(tier(points));
        upserts.push(c);
    }
    upserts
}

fn promotion_changes(
    rng: &mut SplitMix64,
    store: &Store,
    day: u64,
    today: chrono::NaiveDate,
) -> (Vec<Value>, Vec<String>) {
    let promotions = module(store, "promotions");
    let today_str = midnight_utc(today);
    // RFC 3339 UTC strings of one shape compare correctly as text.
    let (running, over): (Vec<&Value>, Vec<&Value>) = promotions.iter().partition(|p| {
        p["end"]
            .as_str()
            .is_some_and(|end| end > today_str.as_str())
    });
    let mut upserts = Vec::new();
    let mut deletes = Vec::new();
    if !running.is_empty() {
        // Marketing extends a running or upcoming offer by a week.
        let mut p = running[rng.index(running.len())].clone();
        if let Some(end) = p["end"]
            .as_str()
            .and_then(|e| e.get(..10))
            .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
        {
            p["end"] = json!(midnight_utc(end + Days::new(7)));
        }
        upserts.push(p);
    }
    let start = today + Days::new(rng.range(1, 7));
    let days = rng.range(7, 21);
    upserts.push(promotion(
        rng,
        format!("PROMO{:04}", 1_000 + day),
        module(store, "catalog"),
        start,
        days,
    ));
    // Remove an expired offer; if none has expired yet, any offer not updated.
    let candidates: Vec<&Value> = if over.is_empty() {
        promotions
            .iter()
            .filter(|p| upserts.first().is_none_or(|u| u["id"] != p["id"]))
            .collect()
    } else {
        over
    };
    if !candidates.is_empty() {
        deletes.push(id_of(candidates[rng.index(candidates.len())]));
    }
    (upserts, deletes)
}

fn config_changes(
    rng: &mut SplitMix64,
    store: &Store,
    day: u64,
    today: chrono::NaiveDate,
) -> Vec<Value> {
    let config = module(store, "config");
    let mut upserts = vec![receipt_footer(&format!(
        "Offre du {} : {}",
        today.format("%d/%m"),
        rng.pick(&[
            "vos points fidélité doublés sur le rayon frais !",
            "-30 % sur la deuxième baguette tradition.",
            "dégustation de fromages affinés samedi matin.",
            "le café offert aux membres Or.",
            "collecte de piles et d'ampoules à l'accueil.",
        ])
    ))];
    let users: Vec<&Value> = config
        .iter()
        .filter(|r| r["kind"] == json!("user"))
        .collect();
    if !users.is_empty() {
        // A cashier promoted to supervisor, or an account (de)activated.
        let mut u = users[rng.index(users.len())].clone();
        if u["role"] == json!("role-cashier") && rng.percent(50) {
            u["role"] = json!("role-supervisor");
            u["max_discount_percent"] = json!(20);
        } else {
            let active = u["active"].as_bool().unwrap_or(true);
            u["active"] = json!(!active);
        }
        upserts.push(u);
    }
    let mut logins: BTreeSet<String> = users
        .iter()
        .filter_map(|u| u["login"].as_str().map(str::to_owned))
        .collect();
    // New hires get numbers from 1000 up, which base stores never use.
    let number = u32::try_from(1_000 + day).unwrap_or(u32::MAX);
    let mut hire = user(rng, number, today, &mut logins);
    hire["hired"] = json!(today.format("%Y-%m-%d").to_string());
    hire["active"] = json!(true);
    upserts.push(hire);
    upserts
}

pub(crate) fn generate(store: &Store, seed: u64, day: u32) -> DayChanges {
    let identity = Identity::new(seed);
    let today = identity.reference_date + Days::new(u64::from(day));
    let day = u64::from(day);
    let mut rng = SplitMix64::derive(seed, "day", day);

    let (catalog, catalog_deletes) = catalog_changes(&mut rng, module(store, "catalog"), day);
    let customers = customer_changes(&mut rng, module(store, "customers"), day, &identity);
    let (promotions, promotion_deletes) = promotion_changes(&mut rng, store, day, today);
    let config = config_changes(&mut rng, store, day, today);

    let mut upserts = BTreeMap::new();
    upserts.insert("catalog".to_owned(), catalog);
    upserts.insert("customers".to_owned(), customers);
    upserts.insert("promotions".to_owned(), promotions);
    upserts.insert("config".to_owned(), config);
    let mut deletes = BTreeMap::new();
    if !catalog_deletes.is_empty() {
        deletes.insert("catalog".to_owned(), catalog_deletes);
    }
    if !promotion_deletes.is_empty() {
        deletes.insert("promotions".to_owned(), promotion_deletes);
    }
    DayChanges { upserts, deletes }
}
