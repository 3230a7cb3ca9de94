//! Loyalty customers: 5,000 people living around the store, each with a
//! unique loyalty card number (a valid EAN-13 in the in-store `2x` range).

use serde_json::{json, Value};

use crate::ean::with_check_digit;
use crate::identity::Identity;
use crate::prng::SplitMix64;
use crate::words::{FAR_TOWNS, FIRST_NAMES_BY_GENDER, LAST_NAMES, MAIL_DOMAINS};

/// Number of customers in a generated store.
pub const CUSTOMER_COUNT: usize = 5_000;

/// Loyalty tier thresholds in points (also published in the config module's
/// `loyalty` record so the box and the hub agree on them).
pub const SILVER_POINTS: u64 = 1_000;
pub const GOLD_POINTS: u64 = 3_000;

pub(crate) fn tier(points: u64) -> &'static str {
    if points >= GOLD_POINTS {
        "gold"
    } else if points >= SILVER_POINTS {
        "silver"
    } else {
        "bronze"
    }
}

/// Lower-case ASCII for e-mail local parts: strips French accents and turns
/// spaces and apostrophes into nothing.
pub(crate) fn ascii_fold(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars().flat_map(char::to_lowercase) {
        match c {
            'à' | 'â' | 'ä' => out.push('a'),
            'é' | 'è' | 'ê' | 'ë' => out.push('e'),
            'î' | 'ï' => out.push('i'),
            'ô' | 'ö' => out.push('o'),
            'ù' | 'û' | 'ü' => out.push('u'),
            'ç' => out.push('c'),
            'œ' => out.push_str("oe"),
            'æ' => out.push_str("ae"),
            c if c.is_ascii_alphanumeric() || c == '-' => out.push(c),
            _ => {}
        }
    }
    out
}

/// A customer record. `card_digits` are the 12 digits before the check digit.
fn customer(rng: &mut SplitMix64, id: String, card_digits: String, identity: &Identity) -> Value {
    let first_names = FIRST_NAMES_BY_GENDER[rng.index(2)];
    let first = *rng.pick(first_names);
    let last = *rng.pick(LAST_NAMES);
    let birth_year = rng.range(1940, 2007);
    let (f, l) = (ascii_fold(first), ascii_fold(last));
    let domain = rng.pick(MAIL_DOMAINS);
    let email = match rng.below(4) {
        0 => format!("{f}.{l}@{domain}"),
        1 => format!("{f}.{l}{}@{domain}", rng.range(1, 99)),
        2 => format!("{}.{l}@{domain}", &f[..1]),
        _ => format!("{f}{l}{:02}@{domain}", birth_year % 100),
    };
    // ARCEP reserves 06 39 98 xx xx and 01 99 00 xx xx for fiction, so these
    // numbers can never ring a real phone.
    let phone = if rng.percent(85) {
        format!("06 39 98 {:02} {:02}", rng.below(100), rng.below(100))
    } else {
        format!("01 99 00 {:02} {:02}", rng.below(100), rng.below(100))
    };
    let (postcode, city) = if rng.percent(85) {
        *rng.pick(identity.area.towns)
    } else {
        *rng.pick(FAR_TOWNS)
    };
    // Cubing a uniform draw gives the long tail loyalty balances have: most
    // customers hold a few hundred points, a few hold thousands.
    let u = rng.below(1_000);
    let points = u * u * u / 200_000;
    json!({
        "id": id,
        "loyalty_card": with_check_digit(card_digits),
        "first_name": first,
        "last_name": last,
        "email": email,
        "phone": phone,
        "postcode": postcode,
        "city": city,
        "birth_year": birth_year,
        "points": points,
        "tier": tier(points),
        "opt_in": rng.percent(62),
    })
}

/// The loyalty base of a store, ids `C000001`..`C005000`, cards
/// `29` + store code (3 digits) + customer number (7 digits) + check digit.
pub(crate) fn generate(seed: u64, identity: &Identity) -> Vec<Value> {
    let mut rng = SplitMix64::derive(seed, "customers", 0);
    (1..=CUSTOMER_COUNT)
        .map(|n| {
            let card = format!("29{:03}{n:07}", identity.code);
            customer(&mut rng, format!("C{n:06}"), card, identity)
        })
        .collect()
}

/// A customer enrolled by the day changes; `n` is its number among all such
/// customers, which fixes its id (`C100000`+) and card (`28` + 10 digits, a
/// range base cards never use).
pub(crate) fn new_customer(rng: &mut SplitMix64, n: u64, identity: &Identity) -> Value {
    let mut c = customer(
        rng,
        format!("C{:06}", 100_000 + n),
        format!("28{n:010}"),
        identity,
    );
    // A new member starts with the welcome bonus only.
    c["points"] = json!(50);
    c["tier"] = json!(tier(50));
    c
}
