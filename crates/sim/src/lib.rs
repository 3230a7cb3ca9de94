//! `storebox-sim`: a deterministic generator of a realistic French store (its
//! configuration, catalogue, loyalty customers and promotions) and of a day's
//! changes to it, plus simulated tills that drive a storebox's till API.
//!
//! Everything generated is a pure function of the seed (and day): the same
//! bytes on every run and every platform, with no wall clock and no
//! dependency on `std`'s unstable hashing. Volumes follow the seed document:
//! about 100 KB of configuration, 1 MB of catalogue for 5,000 products,
//! 1 MB of loyalty customers for 5,000 customers and 20 KB of promotions.
//!
//! Record shapes (all records are JSON objects with a string `id`, unique in
//! their module):
//! - `catalog`: `id` (`P000001`), `ean13` (valid, unique), `label`, `brand`,
//!   `family`, `subfamily`, `price_cents`, `vat_rate` (2.1, 5.5, 10.0, 20.0),
//!   `stock`, `unit` (`piece`, `kg`, `l`), `active`.
//! - `customers`: `id` (`C000001`), `loyalty_card` (13 digits, valid EAN-13,
//!   unique), `first_name`, `last_name`, `email`, `phone`, `postcode`, `city`,
//!   `birth_year`, `points`, `tier` (`bronze`, `silver`, `gold`), `opt_in`.
//! - `promotions`: `id` (`PROMO0001`), `label`, `kind` (`percent`: `value` is
//!   the percentage off; `amount`: `value` is cents off; `bundle`: `value` N
//!   means N for the price of N-1), `start` and `end` (RFC 3339 UTC, window
//!   `start <= t < end`), `products` (catalogue ids), `min_basket_cents`,
//!   `loyalty_only`.
//! - `config`: heterogeneous settings, each with `id` and `kind`.

mod catalog;
mod changes;
mod config;
mod customers;
mod ean;
mod identity;
pub mod prng;
mod promotions;
pub mod tills;
mod words;

use std::collections::BTreeMap;

use serde_json::Value;

pub use catalog::PRODUCT_COUNT;
pub use config::{PAYMENT_CODES, TILL_COUNT};
pub use customers::{CUSTOMER_COUNT, GOLD_POINTS, SILVER_POINTS};
pub use ean::{ean13_check_digit, is_valid_ean13};
pub use identity::reference_date;
pub use promotions::PROMOTION_COUNT;

/// The data modules, in the order the seed document lists them.
pub const MODULES: [&str; 4] = ["config", "catalog", "customers", "promotions"];

/// A generated store: records by module name (`config`, `catalog`,
/// `customers`, `promotions`).
#[derive(Debug, Clone, PartialEq)]
pub struct Store {
    pub modules: BTreeMap<String, Vec<Value>>,
}

/// A day's changes: whole new records to insert or replace, and ids to
/// delete, by module name. Only modules with changes have an entry.
#[derive(Debug, Clone, PartialEq)]
pub struct DayChanges {
    pub upserts: BTreeMap<String, Vec<Value>>,
    pub deletes: BTreeMap<String, Vec<String>>,
}

/// The store for `seed`.
pub fn generate_store(seed: u64) -> Store {
    let identity = identity::Identity::new(seed);
    let catalog = catalog::generate(seed);
    let customers = customers::generate(seed, &identity);
    let promotions = promotions::generate(seed, &catalog, identity.reference_date);
    let config = config::generate(seed, &identity, &catalog);
    let mut modules = BTreeMap::new();
    modules.insert("config".to_owned(), config);
    modules.insert("catalog".to_owned(), catalog);
    modules.insert("customers".to_owned(), customers);
    modules.insert("promotions".to_owned(), promotions);
    Store { modules }
}

/// The changes of day `day` (day 0 is [`reference_date`]`(seed)`) to `store`,
/// normally `generate_store(seed)`. Updates refer to ids present in `store`.
pub fn day_changes(store: &Store, seed: u64, day: u32) -> DayChanges {
    changes::generate(store, seed, day)
}

/// JSON Lines: one compact JSON object per line, each line ending in `\n`.
///
/// Object keys are written in sorted order whatever `serde_json`'s map type
/// is (its `preserve_order` feature may be switched on by another crate of
/// the workspace), so the bytes for a given store never change.
pub fn to_ndjson(records: &[Value]) -> String {
    let mut out = String::new();
    for r in records {
        write_canonical(&mut out, r);
        out.push('\n');
    }
    out
}

fn write_canonical(out: &mut String, v: &Value) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // A string's Display is its JSON encoding, escapes included.
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(out, v);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(out, item);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests;
