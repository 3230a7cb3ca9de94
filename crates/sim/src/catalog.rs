//! The product catalogue: 5,000 products drawn from the French word lists in
//! [`crate::words`], each with a unique, valid EAN-13.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::ean::with_check_digit;
use crate::prng::{mix64, SplitMix64};
use crate::words::{Family, Sub, BY_KG, BY_LITRE, FAMILIES, STORE_BRAND, STORE_BRAND_BIO};

/// Number of products in a generated store.
pub const PRODUCT_COUNT: usize = 5_000;

/// GS1 company prefixes we hand out to brands: 7 digits in 3000000..3780000
/// (France's 300-379 range, minus 378-379). `379` is kept for products created
/// by [`crate::day_changes`], so their codes can never collide with these.
const PREFIX_BASE: u64 = 3_000_000;
const PREFIX_SPAN: u64 = 780_000;

/// Hands out EAN-13 codes: one company prefix per brand (in order of first
/// use) and sequential-looking item references within it.
struct EanAllocator {
    offset: u64,
    brands: BTreeMap<&'static str, (u64, u64)>,
}

impl EanAllocator {
    fn new(seed: u64) -> Self {
        Self {
            offset: mix64(seed ^ 0xEA13) % PREFIX_SPAN,
            brands: BTreeMap::new(),
        }
    }

    fn next(&mut self, brand: &'static str) -> String {
        let index = self.brands.len() as u64;
        let offset = self.offset;
        let (prefix, used) = self.brands.entry(brand).or_insert_with(|| {
            // 7919 is prime and coprime with PREFIX_SPAN, so distinct brand
            // indices map to distinct prefixes.
            let prefix = PREFIX_BASE + (index * 7_919 + offset) % PREFIX_SPAN;
            (prefix, 0)
        });
        // 37 is coprime with 100,000: item references stay distinct for the
        // first 100,000 products of a brand, and do not look like a counter.
        let item = (mix64(*prefix) + *used * 37) % 100_000;
        *used += 1;
        with_check_digit(format!("{prefix:07}{item:05}"))
    }
}

/// The EAN-13 of the `n`-th product created by the day changes (prefix 379).
pub(crate) fn new_product_ean(n: u64) -> String {
    with_check_digit(format!("379{n:09}"))
}

/// Subfamilies with their drawing weight: the number of distinct labels they
/// can produce (capped), so tiny subfamilies such as newspapers do not end up
/// with hundreds of identical products.
fn weighted_subs() -> Vec<(&'static Family, &'static Sub, u64)> {
    let mut out = Vec::new();
    for family in FAMILIES {
        for sub in family.subs {
            let combos = (sub.nouns.len() * (sub.variants.len() + 1) * sub.formats.len()) as u64;
            out.push((family, sub, combos.min(300)));
        }
    }
    out
}

fn pick_sub(
    rng: &mut SplitMix64,
    subs: &[(&'static Family, &'static Sub, u64)],
) -> (&'static Family, &'static Sub) {
    let total: u64 = subs.iter().map(|s| s.2).sum();
    let mut x = rng.below(total);
    for (family, sub, weight) in subs {
        if x < *weight {
            return (family, sub);
        }
        x -= weight;
    }
    let (family, sub, _) = subs[subs.len() - 1];
    (family, sub)
}

/// Rounds a price the way shelf prices look in France: ending in 5 or 9 cents.
pub(crate) fn shelf_price(rng: &mut SplitMix64, cents: u64) -> u64 {
    let tens = (cents / 10).max(1) * 10;
    tens + if rng.percent(70) { 9 } else { 5 }
}

/// Everything about a product except its id and EAN.
struct Draft {
    family: &'static Family,
    sub: &'static Sub,
    label: String,
    brand: &'static str,
    price_cents: u64,
    unit: &'static str,
    stock: u64,
    active: bool,
}

fn draft(rng: &mut SplitMix64, subs: &[(&'static Family, &'static Sub, u64)]) -> Draft {
    let (family, sub) = pick_sub(rng, subs);
    let noun = rng.pick(sub.nouns);
    let variant = if rng.percent(80) {
        Some(*rng.pick(sub.variants))
    } else {
        None
    };
    let format_index = rng.index(sub.formats.len());
    let format = sub.formats[format_index];
    let (unit, suffix) = match format {
        BY_KG => ("kg", "au kg"),
        BY_LITRE => ("l", "vrac au litre"),
        other => ("piece", other),
    };
    let label = match variant {
        Some(v) => format!("{noun} {v} {suffix}"),
        None => format!("{noun} {suffix}"),
    };
    let brand = if family.food && rng.percent(25) {
        if variant == Some("bio") {
            STORE_BRAND_BIO
        } else {
            STORE_BRAND
        }
    } else {
        *rng.pick(family.brands)
    };
    let base = rng.range(sub.price.0, sub.price.1);
    // Bigger formats cost more: +30% per step up the (ordered) format list.
    let scaled = if unit == "piece" {
        base * (100 + 30 * format_index as u64) / 100
    } else {
        base
    };
    let price_cents = shelf_price(rng, scaled);
    let stock = if rng.percent(5) {
        0
    } else if unit == "piece" {
        rng.range(1, 240)
    } else {
        rng.range(1, 80)
    };
    Draft {
        family,
        sub,
        label,
        brand,
        price_cents,
        unit,
        stock,
        active: rng.percent(97),
    }
}

fn record(id: String, ean13: String, d: Draft) -> Value {
    json!({
        "id": id,
        "ean13": ean13,
        "label": d.label,
        "brand": d.brand,
        "family": d.family.name,
        "subfamily": d.sub.name,
        "price_cents": d.price_cents,
        "vat_rate": d.family.vat,
        "stock": d.stock,
        "unit": d.unit,
        "active": d.active,
    })
}

/// The catalogue of a store, ids `P000001`..`P005000`.
pub(crate) fn generate(seed: u64) -> Vec<Value> {
    let mut rng = SplitMix64::derive(seed, "catalog", 0);
    let mut eans = EanAllocator::new(seed);
    let subs = weighted_subs();
    (1..=PRODUCT_COUNT)
        .map(|n| {
            let d = draft(&mut rng, &subs);
            let ean = eans.next(d.brand);
            record(format!("P{n:06}"), ean, d)
        })
        .collect()
}

/// A product listed by the day changes: `n` is its number among all products
/// ever created by day changes, which fixes its id and EAN.
pub(crate) fn new_product(rng: &mut SplitMix64, n: u64) -> Value {
    let subs = weighted_subs();
    let mut d = draft(rng, &subs);
    d.active = true;
    d.stock = rng.range(12, 120);
    record(format!("P{:06}", 100_000 + n), new_product_ean(n), d)
}
