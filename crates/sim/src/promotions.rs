//! Promotions: about forty offers on groups of catalogue products, with a mix
//! of past, current and future windows around the store's reference date.

use chrono::{Days, NaiveDate};
use serde_json::{json, Value};

use crate::identity::midnight_utc;
use crate::prng::SplitMix64;

/// Number of promotions in a generated store.
pub const PROMOTION_COUNT: usize = 40;

/// Products grouped by `family / subfamily`, keeping only active ones: a
/// promotion targets a shelf, as in a real store's leaflet.
fn shelves(catalog: &[Value]) -> Vec<(String, Vec<String>)> {
    let mut map: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for p in catalog {
        if p["active"] != json!(true) {
            continue;
        }
        if let (Some(sub), Some(id)) = (p["subfamily"].as_str(), p["id"].as_str()) {
            map.entry(sub.to_owned()).or_default().push(id.to_owned());
        }
    }
    map.into_iter().collect()
}

fn euros(cents: u64) -> String {
    format!("{},{:02} €", cents / 100, cents % 100)
}

/// One promotion with the given id whose window starts on `start` and lasts
/// `days` days; `end` is exclusive (midnight after the last day).
pub(crate) fn promotion(
    rng: &mut SplitMix64,
    id: String,
    catalog: &[Value],
    start: NaiveDate,
    days: u64,
) -> Value {
    let shelves = shelves(catalog);
    let (shelf, products) = if shelves.is_empty() {
        (String::from("Tout le magasin"), Vec::new())
    } else {
        shelves[rng.index(shelves.len())].clone()
    };
    let count = rng.range(8, 40) as usize;
    let mut chosen: Vec<String> = rng
        .distinct_indices(products.len(), count)
        .into_iter()
        .map(|i| products[i].clone())
        .collect();
    chosen.sort();
    let shelf_lc = shelf.to_lowercase();
    let (kind, value, label) = match rng.below(100) {
        0..=44 => {
            let pct = *rng.pick(&[10u64, 15, 20, 25, 30, 34, 40, 50]);
            ("percent", pct, format!("-{pct} % sur le rayon {shelf_lc}"))
        }
        45..=74 => {
            let cents = *rng.pick(&[50u64, 100, 150, 200, 300, 500]);
            (
                "amount",
                cents,
                format!("{} de remise immédiate : {shelf_lc}", euros(cents)),
            )
        }
        _ => {
            // value N means "N for the price of N-1".
            let n = *rng.pick(&[2u64, 3, 3, 4]);
            let label = if n == 2 {
                format!("1 acheté = 1 offert : {shelf_lc}")
            } else {
                format!("{} achetés = le {n}e offert : {shelf_lc}", n - 1)
            };
            ("bundle", n, label)
        }
    };
    let min_basket_cents = if rng.percent(60) {
        0
    } else {
        *rng.pick(&[1_000u64, 1_500, 2_000, 3_000])
    };
    json!({
        "id": id,
        "label": label,
        "kind": kind,
        "value": value,
        "start": midnight_utc(start),
        "end": midnight_utc(start + Days::new(days)),
        "products": chosen,
        "min_basket_cents": min_basket_cents,
        "loyalty_only": rng.percent(30),
    })
}

/// The promotions of a store, ids `PROMO0001`..`PROMO0040`: roughly 30% over,
/// 40% running and 30% yet to start on `reference`.
pub(crate) fn generate(seed: u64, catalog: &[Value], reference: NaiveDate) -> Vec<Value> {
    let mut rng = SplitMix64::derive(seed, "promotions", 0);
    (1..=PROMOTION_COUNT)
        .map(|n| {
            let days = rng.range(7, 28);
            let start = match rng.below(10) {
                // Ended on the reference date or up to 59 days before it.
                0..=2 => reference - Days::new(days + rng.range(0, 59)),
                // Running: started at most days-1 days ago, so it covers today.
                3..=6 => reference - Days::new(rng.range(0, days - 1)),
                // Starts 1 to 45 days from now.
                _ => reference + Days::new(rng.range(1, 45)),
            };
            promotion(&mut rng, format!("PROMO{n:04}"), catalog, start, days)
        })
        .collect()
}
