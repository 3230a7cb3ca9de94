//! Configuration and settings records (about 100 KB): the store's identity,
//! opening hours and closures, tills and their devices, payment methods, tax
//! rates, currencies, departments, roles and users, receipt templates, reason
//! codes, loyalty and sync settings, and the tills' quick-key layouts.
//!
//! Every record carries a `kind` next to its `id` because the module mixes
//! record types; ids are prefixed by kind (`till-01`, `payment-card`,
//! `user-0042`…) so they stay unique across kinds.

use chrono::{Datelike, Days, NaiveDate};
use serde_json::{json, Value};

use crate::customers::{ascii_fold, GOLD_POINTS, SILVER_POINTS};
use crate::identity::Identity;
use crate::prng::{mix64, SplitMix64};
use crate::words::{FAMILIES, FIRST_NAMES_BY_GENDER, LAST_NAMES};

/// Number of tills in a generated store (`till-01`..`till-08`).
pub const TILL_COUNT: u32 = 8;

/// Number of staff accounts (`user-0001`..).
const USER_COUNT: u32 = 110;

/// Payment method codes, as used in the `payment` field of sales.
pub const PAYMENT_CODES: &[&str] = &[
    "card",
    "contactless",
    "cash",
    "cheque",
    "meal-voucher",
    "gift-card",
    "loyalty-points",
    "mobile",
    "store-credit",
];

fn hex(rng: &mut SplitMix64, bytes: usize) -> String {
    let mut s = String::with_capacity(bytes * 2);
    while s.len() < bytes * 2 {
        s.push_str(&format!("{:016x}", rng.next_u64()));
    }
    s.truncate(bytes * 2);
    s
}

fn store(identity: &Identity, rng: &mut SplitMix64) -> Value {
    let (postcode, city) = identity.area.store_town;
    let siren = 300_000_000 + mix64(identity.code) % 600_000_000;
    json!({
        "id": "store",
        "kind": "store",
        "code": format!("S{:04}", identity.code),
        "name": format!("Marché Frais {city}"),
        "legal_name": format!("SAS Marché Frais {city}"),
        "siret": format!("{siren:09}{:05}", rng.range(10, 99_999)),
        "vat_number": format!("FR{:02}{siren:09}", (12 + 3 * (siren % 97)) % 97),
        "address": {
            "street": identity.area.street,
            "postcode": postcode,
            "city": city,
            "country": "FR",
        },
        "phone": format!("04 65 71 {:02} {:02}", rng.below(100), rng.below(100)),
        "email": format!("magasin.{}@marchefrais.example", identity.code),
        "timezone": "Europe/Paris",
        "locale": "fr-FR",
        "currency": "EUR",
        "sales_area_m2": rng.range(400, 1_200),
        "group": "Marché Frais",
        "region": format!("Région {}", &postcode[..2]),
        "reference_date": identity.reference_date.format("%Y-%m-%d").to_string(),
    })
}

fn opening_hours() -> Vec<Value> {
    let days = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    days.iter()
        .enumerate()
        .map(|(i, day)| {
            let (open, close) = match i {
                5 => ("08:00", "20:30"),
                6 => ("09:00", "12:45"),
                _ => ("08:30", "20:00"),
            };
            json!({
                "id": format!("hours-{day}"),
                "kind": "opening-hours",
                "day": day,
                "open": open,
                "close": close,
                "closed": false,
                // Deliveries come in before opening; the full sync runs at
                // 07:00, out of hours, as the seed document recommends.
                "deliveries_from": "06:00",
                "last_till_open": close,
            })
        })
        .collect()
}

fn closures(reference: NaiveDate) -> Vec<Value> {
    let holidays = [
        (1, 1, "Jour de l'an"),
        (5, 1, "Fête du Travail"),
        (5, 8, "Victoire 1945"),
        (7, 14, "Fête nationale"),
        (8, 15, "Assomption"),
        (11, 1, "Toussaint"),
        (11, 11, "Armistice 1918"),
        (12, 25, "Noël"),
    ];
    holidays
        .iter()
        .filter_map(|&(m, d, label)| {
            NaiveDate::from_ymd_opt(reference.year(), m, d).map(|date| (date, label))
        })
        .map(|(date, label)| {
            // The store closes on 1 January, 1 May and 25 December and opens
            // in the morning on the other public holidays.
            let closed = matches!((date.month(), date.day()), (1, 1) | (5, 1) | (12, 25));
            json!({
                "id": format!("closure-{}", date.format("%Y-%m-%d")),
                "kind": "special-hours",
                "date": date.format("%Y-%m-%d").to_string(),
                "label": label,
                "closed": closed,
                "open": if closed { Value::Null } else { json!("09:00") },
                "close": if closed { Value::Null } else { json!("13:00") },
            })
        })
        .collect()
}

fn tills_and_devices(rng: &mut SplitMix64) -> Vec<Value> {
    let mut out = Vec::new();
    for n in 1..=TILL_COUNT {
        let (kind, label, max_items, payments): (&str, String, Value, &[&str]) = match n {
            1 => ("service-desk", "Accueil".into(), Value::Null, PAYMENT_CODES),
            7 | 8 => (
                "self-checkout",
                format!("Caisse automatique {}", n - 6),
                json!(40),
                &["card", "contactless", "mobile", "gift-card"],
            ),
            6 => (
                "express",
                "Caisse express".into(),
                json!(10),
                &["card", "contactless", "cash", "mobile"],
            ),
            _ => (
                "standard",
                format!("Caisse {n}"),
                Value::Null,
                &PAYMENT_CODES[..8],
            ),
        };
        out.push(json!({
            "id": format!("till-{n:02}"),
            "kind": "till",
            "number": n,
            "type": kind,
            "label": label,
            "max_items": max_items,
            "payments": payments,
            "printer": format!("printer-{n:02}"),
            "payment_terminal": format!("tpe-{n:02}"),
            "scale": if kind == "standard" { json!(format!("scale-{n:02}")) } else { Value::Null },
            "cash_drawer": kind != "self-checkout",
            "customer_display": true,
            "keyboard": match kind {
                "self-checkout" => "keyboard-self",
                "express" => "keyboard-express",
                _ => "keyboard-standard",
            },
            "address": format!("192.168.20.{}", 100 + n),
            "hostname": format!("caisse-{n:02}.magasin.lan"),
        }));
        out.push(json!({
            "id": format!("tpe-{n:02}"),
            "kind": "payment-terminal",
            "till": format!("till-{n:02}"),
            "model": "TPE Android 4G",
            "protocol": "nexo",
            "terminal_id": format!("{:08}", rng.below(100_000_000)),
            "contactless_limit_cents": 5_000,
        }));
        out.push(json!({
            "id": format!("printer-{n:02}"),
            "kind": "printer",
            "till": format!("till-{n:02}"),
            "model": "Imprimante thermique 80 mm",
            "paper_width_mm": 80,
            "columns": 48,
            "logo": "logo-receipt",
            "cut": "partial",
        }));
        if kind == "standard" {
            out.push(json!({
                "id": format!("scale-{n:02}"),
                "kind": "scale",
                "till": format!("till-{n:02}"),
                "model": "Balance caisse 15 kg",
                "max_grams": 15_000,
                "resolution_grams": 2,
                "legal_seal": format!("{}", rng.range(100_000, 999_999)),
            }));
        }
    }
    for (id, label, model) in [
        ("printer-office", "Imprimante bureau", "Laser A4"),
        (
            "printer-labels",
            "Imprimante étiquettes",
            "Étiquettes 58 mm",
        ),
        (
            "printer-shelf",
            "Imprimante étiquettes de gondole",
            "Transfert thermique",
        ),
    ] {
        out.push(json!({
            "id": id,
            "kind": "printer",
            "label": label,
            "model": model,
            "till": Value::Null,
        }));
    }
    out
}

fn payment_methods() -> Vec<Value> {
    let rows: [(&str, &str, u64, u64, bool, bool); 9] = [
        ("card", "Carte bancaire", 1, 1_000_000, false, true),
        ("contactless", "Sans contact", 1, 5_000, false, true),
        ("cash", "Espèces", 1, 100_000, true, false),
        ("cheque", "Chèque", 1_500, 150_000, false, false),
        ("meal-voucher", "Titre-restaurant", 1, 2_500, false, false),
        ("gift-card", "Carte cadeau", 1, 50_000, false, false),
        (
            "loyalty-points",
            "Points fidélité",
            100,
            5_000,
            false,
            false,
        ),
        ("mobile", "Paiement mobile", 1, 1_000_000, false, true),
        ("store-credit", "Avoir magasin", 1, 50_000, false, false),
    ];
    rows.iter()
        .map(|&(code, label, min, max, change, terminal)| {
            json!({
                "id": format!("payment-{code}"),
                "kind": "payment-method",
                "code": code,
                "label": label,
                "min_cents": min,
                "max_cents": max,
                "gives_change": change,
                "opens_drawer": change || code == "cheque",
                "requires_terminal": terminal,
                // Meal vouchers only pay for food: the till checks the VAT
                // rate of each line against this list.
                "eligible_vat_rates":
                    if code == "meal-voucher" { json!([5.5, 10.0]) } else { Value::Null },
            })
        })
        .collect()
}

fn tax_rates() -> Vec<Value> {
    [
        ("021", 2.1, "A", "Presse"),
        ("055", 5.5, "B", "Alimentation"),
        ("100", 10.0, "C", "Restauration, vente à emporter"),
        ("200", 20.0, "D", "Taux normal"),
    ]
    .iter()
    .map(|&(id, rate, letter, label)| {
        json!({
            "id": format!("tax-{id}"),
            "kind": "tax-rate",
            "country": "FR",
            "rate": rate,
            "receipt_letter": letter,
            "label": format!("TVA {} % - {label}", format!("{rate}").replace('.', ",")),
        })
    })
    .collect()
}

fn currencies() -> Vec<Value> {
    vec![
        json!({
            "id": "currency-eur",
            "kind": "currency",
            "code": "EUR",
            "symbol": "€",
            "default": true,
            "rate": 1.0,
            "accepted": true,
            "coins_cents": [1, 2, 5, 10, 20, 50, 100, 200],
            "notes_cents": [500, 1_000, 2_000, 5_000, 10_000, 20_000],
            // Rounding of cash totals is not used in France (unlike CH).
            "cash_rounding_cents": 1,
        }),
        json!({
            "id": "currency-chf",
            "kind": "currency",
            "code": "CHF",
            "symbol": "CHF",
            "default": false,
            "rate": 0.94,
            "accepted": false,
            "coins_cents": [],
            "notes_cents": [],
            "cash_rounding_cents": 5,
        }),
        json!({
            "id": "currency-gbp",
            "kind": "currency",
            "code": "GBP",
            "symbol": "£",
            "default": false,
            "rate": 1.17,
            "accepted": false,
            "coins_cents": [],
            "notes_cents": [],
            "cash_rounding_cents": 1,
        }),
    ]
}

fn departments() -> Vec<Value> {
    FAMILIES
        .iter()
        .enumerate()
        .map(|(i, family)| {
            let subs: Vec<Value> = family
                .subs
                .iter()
                .enumerate()
                .map(|(j, sub)| {
                    json!({ "code": format!("{:02}{:02}", i + 1, j + 1), "label": sub.name })
                })
                .collect();
            json!({
                "id": format!("dept-{:02}", i + 1),
                "kind": "department",
                "code": format!("{:02}", i + 1),
                "label": family.name,
                "vat_rate": family.vat,
                "subfamilies": subs,
                // Alcohol needs an age check at the till (Code de la santé
                // publique, L3342-1).
                "age_restricted": family.name == "Cave",
                "minimum_age": if family.name == "Cave" { json!(18) } else { Value::Null },
                "weighable": family.subs.iter().any(|s| s.formats.contains(&crate::words::BY_KG)),
            })
        })
        .collect()
}

const ROLES: &[(&str, &str, &[&str])] = &[
    (
        "cashier",
        "Hôte(sse) de caisse",
        &[
            "sale",
            "return-with-receipt",
            "open-drawer",
            "identify-customer",
            "print-duplicate",
        ],
    ),
    (
        "supervisor",
        "Responsable de caisse",
        &[
            "sale",
            "return-with-receipt",
            "return-without-receipt",
            "open-drawer",
            "identify-customer",
            "print-duplicate",
            "void-line",
            "void-sale",
            "manual-discount",
            "price-override",
            "cash-in",
            "cash-out",
            "x-report",
        ],
    ),
    (
        "manager",
        "Directeur / directrice",
        &[
            "sale",
            "return-with-receipt",
            "return-without-receipt",
            "open-drawer",
            "identify-customer",
            "print-duplicate",
            "void-line",
            "void-sale",
            "manual-discount",
            "price-override",
            "cash-in",
            "cash-out",
            "x-report",
            "z-report",
            "edit-users",
            "edit-prices",
            "view-reports",
            "adjust-loyalty",
        ],
    ),
    (
        "stocker",
        "Employé(e) de rayon",
        &[
            "stock-count",
            "print-shelf-labels",
            "receive-delivery",
            "view-stock",
        ],
    ),
    (
        "admin",
        "Administrateur technique",
        &[
            "edit-settings",
            "edit-users",
            "view-logs",
            "update-firmware",
            "pair-devices",
        ],
    ),
];

fn roles() -> Vec<Value> {
    ROLES
        .iter()
        .map(|&(code, label, perms)| {
            json!({
                "id": format!("role-{code}"),
                "kind": "role",
                "code": code,
                "label": label,
                "permissions": perms,
            })
        })
        .collect()
}

fn users(rng: &mut SplitMix64, reference: NaiveDate) -> Vec<Value> {
    let mut logins = std::collections::BTreeSet::new();
    (1..=USER_COUNT)
        .map(|n| user(rng, n, reference, &mut logins))
        .collect()
}

/// One staff account. `logins` holds the logins already taken; a numeric
/// suffix disambiguates namesakes, as directories do.
pub(crate) fn user(
    rng: &mut SplitMix64,
    n: u32,
    reference: NaiveDate,
    logins: &mut std::collections::BTreeSet<String>,
) -> Value {
    let first_names = FIRST_NAMES_BY_GENDER[rng.index(2)];
    let first = *rng.pick(first_names);
    let last = *rng.pick(LAST_NAMES);
    let base = format!("{}{}", &ascii_fold(first)[..1], ascii_fold(last));
    let mut login = base.clone();
    let mut k = 2;
    while !logins.insert(login.clone()) {
        login = format!("{base}{k}");
        k += 1;
    }
    let role = match n {
        1 => "manager",
        2 => "admin",
        _ => match rng.below(100) {
            0..=59 => "cashier",
            60..=74 => "supervisor",
            75..=96 => "stocker",
            _ => "manager",
        },
    };
    let (contract, hours) = match rng.below(10) {
        0..=5 => ("CDI", *rng.pick(&[35u64, 35, 30, 24])),
        6..=7 => ("CDD", *rng.pick(&[35u64, 24, 20])),
        8 => ("étudiant", *rng.pick(&[10u64, 12, 15])),
        _ => ("alternance", 35),
    };
    let hired = reference - Days::new(rng.range(30, 20 * 365));
    let last_initial = last.chars().next().unwrap_or('X');
    json!({
        "id": format!("user-{n:04}"),
        "kind": "user",
        "login": login,
        "first_name": first,
        "last_name": last,
        "display_name": format!("{first} {last_initial}."),
        "role": format!("role-{role}"),
        "badge": format!("B{:05}", 10_000 + n),
        // Not a real hash of anything: the simulator has no PINs. Shaped like
        // a salted SHA-256 so record sizes match production data.
        "pin_salt": hex(rng, 8),
        "pin_hash": hex(rng, 32),
        "tills": if role == "stocker" { json!([]) } else { json!("all") },
        "max_discount_percent": match role {
            "cashier" | "stocker" => 0,
            "supervisor" => 20,
            _ => 50,
        },
        "contract": contract,
        "weekly_hours": hours,
        "hired": hired.format("%Y-%m-%d").to_string(),
        "email": format!("{login}@marchefrais.example"),
        "language": "fr",
        "active": rng.percent(94),
    })
}

/// Receipt templates; placeholders in braces are filled in by the till.
pub(crate) fn receipt_footer(message: &str) -> Value {
    json!({
        "id": "receipt-footer",
        "kind": "receipt-template",
        "lines": [
            "Merci de votre visite et à bientôt !",
            "{loyalty_line}",
            message,
            "Échange ou remboursement sous 30 jours sur présentation du ticket.",
            "Ticket n° {receipt_number} - Caisse {till} - {cashier}",
            "{date} {time}",
            "Conservez ce ticket : il vous sera demandé pour tout échange.",
        ],
        "align": "center",
        "qr_code": "{receipt_url}",
    })
}

fn receipts(identity: &Identity) -> Vec<Value> {
    let (postcode, city) = identity.area.store_town;
    vec![
        json!({
            "id": "receipt-header",
            "kind": "receipt-template",
            "lines": [
                "{logo}",
                format!("MARCHÉ FRAIS {}", city.to_uppercase()),
                identity.area.street,
                format!("{postcode} {city}"),
                "Tél. {store_phone}",
                "Ouvert du lundi au samedi 8h30-20h, dimanche 9h-12h45",
                "SIRET {siret} - TVA {vat_number}",
            ],
            "align": "center",
        }),
        receipt_footer("Retrouvez nos promotions chaque semaine en magasin."),
        json!({
            "id": "receipt-return",
            "kind": "receipt-template",
            "lines": [
                "AVOIR / RETOUR",
                "Motif : {reason}",
                "Ticket d'origine : {original_receipt}",
                "Validé par : {supervisor}",
                "Avoir valable 1 an, non remboursable.",
            ],
            "align": "left",
        }),
        json!({
            "id": "receipt-gift",
            "kind": "receipt-template",
            "lines": [
                "TICKET CADEAU",
                "Prix non indiqués",
                "Échange possible sous 60 jours avec ce ticket.",
                "Joyeuses fêtes de la part de toute l'équipe !",
            ],
            "align": "center",
        }),
        json!({
            "id": "receipt-loyalty",
            "kind": "receipt-template",
            "lines": [
                "Carte fidélité : {card}",
                "Points gagnés : {points_earned}",
                "Nouveau solde : {points_balance} points",
                "Statut : {tier}",
                "{next_tier_message}",
            ],
            "align": "left",
        }),
        json!({
            "id": "receipt-z-report",
            "kind": "receipt-template",
            "lines": [
                "RAPPORT Z - CLÔTURE",
                "Caisse {till} - {date}",
                "Nombre de tickets : {count}",
                "Total TTC : {total}",
                "{vat_breakdown}",
                "{payment_breakdown}",
                "Écart de caisse : {cash_difference}",
                "Signature : {manager}",
            ],
            "align": "left",
        }),
    ]
}

fn reason_codes() -> Vec<Value> {
    let rows: &[(&str, &str, &str, bool)] = &[
        ("return-defective", "return", "Produit défectueux", false),
        ("return-expired", "return", "Date limite dépassée", false),
        ("return-wrong-item", "return", "Erreur d'article", false),
        ("return-unwanted", "return", "Ne convient pas", true),
        (
            "return-damaged-packaging",
            "return",
            "Emballage abîmé",
            false,
        ),
        ("return-gift", "return", "Cadeau en double", true),
        ("void-scan-error", "void", "Erreur de scan", false),
        (
            "void-customer-changed-mind",
            "void",
            "Client a changé d'avis",
            false,
        ),
        ("void-price-dispute", "void", "Contestation de prix", true),
        ("void-insufficient-funds", "void", "Paiement refusé", false),
        ("void-training", "void", "Formation", true),
        ("discount-damaged", "discount", "Article abîmé", true),
        ("discount-short-date", "discount", "Date courte", false),
        ("discount-staff", "discount", "Remise personnel", true),
        ("discount-goodwill", "discount", "Geste commercial", true),
        (
            "discount-price-match",
            "discount",
            "Alignement de prix",
            true,
        ),
        (
            "price-override-shelf",
            "price-override",
            "Prix rayon différent",
            true,
        ),
        (
            "price-override-missing",
            "price-override",
            "Prix manquant",
            true,
        ),
        ("cash-in-float", "cash-in", "Fond de caisse", false),
        ("cash-in-change", "cash-in", "Apport de monnaie", false),
        ("cash-out-safe", "cash-out", "Dépôt coffre", true),
        (
            "cash-out-supplier",
            "cash-out",
            "Paiement fournisseur",
            true,
        ),
        ("cash-out-refund", "cash-out", "Remboursement client", true),
        ("no-sale-change", "no-sale", "Faire la monnaie", false),
        ("no-sale-check", "no-sale", "Vérification tiroir", true),
        (
            "stock-loss-theft",
            "stock",
            "Démarque inconnue (vol)",
            false,
        ),
        ("stock-loss-breakage", "stock", "Casse", false),
        ("stock-loss-expired", "stock", "Périmé", false),
        ("stock-recount", "stock", "Recomptage inventaire", true),
        (
            "loyalty-adjustment",
            "loyalty",
            "Correction de points",
            true,
        ),
    ];
    rows.iter()
        .map(|&(code, group, label, needs_supervisor)| {
            json!({
                "id": format!("reason-{code}"),
                "kind": "reason-code",
                "group": group,
                "label": label,
                "requires_supervisor": needs_supervisor,
                "requires_comment": code.ends_with("goodwill") || code.starts_with("loyalty"),
            })
        })
        .collect()
}

fn settings() -> Vec<Value> {
    vec![
        json!({
            "id": "loyalty", "kind": "loyalty-program", "name": "Carte Marché Frais",
            "points_per_euro": 1, "welcome_points": 50, "point_value_cents": 1,
            "min_redeem_points": 100,
            "tiers": [
                {"code": "bronze", "min_points": 0, "bonus_percent": 0},
                {"code": "silver", "min_points": SILVER_POINTS, "bonus_percent": 5},
                {"code": "gold", "min_points": GOLD_POINTS, "bonus_percent": 10},
            ],
            "card_prefixes": ["29", "28"],
            "points_expire_after_months": 24,
        }),
        json!({
            "id": "sync", "kind": "sync-settings",
            // The seed document: full sync once a day at 07:00, out of hours.
            "full_sync_at": ["07:00"],
            "changes_interval_secs": 300,
            "activity_push": "as-it-happens",
            "max_upload_kbps": 256,
            "changes_enabled": true,
            "activity_enabled": true,
            "modules": ["config", "catalog", "customers", "promotions"],
        }),
        json!({
            "id": "security", "kind": "security-settings",
            "session_timeout_secs": 900, "pin_length": 4, "max_pin_attempts": 5,
            "lockout_secs": 300, "supervisor_badge_required": true,
        }),
        json!({
            "id": "customer-display", "kind": "display-settings",
            "idle_messages": [
                "Bienvenue chez Marché Frais !",
                "Pensez à votre carte fidélité",
                "Nouveau : rayon vrac en libre-service",
                "Les fruits et légumes de saison au meilleur prix",
            ],
            "show_savings": true, "language": "fr",
        }),
        json!({
            "id": "receipts", "kind": "receipt-settings",
            "default": "print", "email_receipts": true, "paperless_prompt": true,
            // Since August 2023 receipts are printed only on request
            // (loi AGEC), so the till asks.
            "print_on_request_only": true,
            "columns": 48,
        }),
        json!({
            "id": "cash", "kind": "cash-settings",
            "float_cents": 15_000, "max_drawer_cents": 80_000, "safe_drop_threshold_cents": 60_000,
            "blind_count": true, "count_denominations": true,
        }),
    ]
}

/// Quick keys for articles without a barcode or too slow to look up: loose
/// fruit and vegetables, bread and pastries, snacks.
fn keyboards(catalog: &[Value]) -> Vec<Value> {
    let layouts: [(&str, &str, &[&str], usize); 5] = [
        (
            "keyboard-standard",
            "Clavier caisse",
            &["Fruits", "Légumes", "Pain", "Viennoiseries"],
            48,
        ),
        (
            "keyboard-express",
            "Clavier express",
            &["Sandwichs", "Salades composées", "Viennoiseries", "Pain"],
            24,
        ),
        (
            "keyboard-self",
            "Écran caisse automatique",
            &["Fruits", "Légumes", "Pain"],
            32,
        ),
        (
            "keyboard-bakery",
            "Clavier boulangerie",
            &["Pain", "Viennoiseries", "Pâtisseries"],
            48,
        ),
        (
            "keyboard-service-desk",
            "Clavier accueil",
            &["Quotidiens", "Magazines"],
            24,
        ),
    ];
    let palette = [
        "#F5D142", "#7BC950", "#E8743B", "#C8A27A", "#5DA5DA", "#F17CB0",
    ];
    layouts
        .iter()
        .map(|&(id, label, subs, size)| {
            let keys: Vec<Value> = catalog
                .iter()
                .filter(|p| p["active"] == json!(true))
                .filter(|p| p["subfamily"].as_str().is_some_and(|s| subs.contains(&s)))
                .take(size)
                .enumerate()
                .map(|(i, p)| {
                    let sub = p["subfamily"].as_str().unwrap_or_default();
                    let colour = subs.iter().position(|s| *s == sub).unwrap_or(0) % palette.len();
                    // Key caps fit about 22 characters.
                    let label = p["label"].as_str().unwrap_or_default();
                    let text: String = label.chars().take(22).collect();
                    json!({
                        "pos": i + 1,
                        "text": text,
                        "product": p["id"],
                        "colour": palette[colour],
                    })
                })
                .collect();
            json!({ "id": id, "kind": "keyboard", "label": label, "columns": 6, "keys": keys })
        })
        .collect()
}

/// How the tills decode in-store barcodes (GS1 France restricted
/// circulation numbers): weighed items print the price or weight in the
/// code itself.
fn barcode_rules() -> Vec<Value> {
    let rows: &[(&str, &str, &str, &str)] = &[
        (
            "20",
            "article",
            "Article interne, code magasin",
            "2PPPPPPPPPPPC",
        ),
        (
            "21",
            "price",
            "Article pesé, prix en centimes",
            "21AAAAAPPPPPC",
        ),
        (
            "22",
            "price",
            "Article pesé rayon traditionnel, prix",
            "22AAAAAPPPPPC",
        ),
        (
            "23",
            "weight",
            "Article pesé, poids en grammes",
            "23AAAAAWWWWWC",
        ),
        (
            "24",
            "price",
            "Article à prix réduit (date courte)",
            "24AAAAAPPPPPC",
        ),
        ("25", "coupon", "Bon de réduction magasin", "25RRRRRVVVVVC"),
        (
            "28",
            "loyalty",
            "Carte fidélité (adhésions récentes)",
            "28NNNNNNNNNNC",
        ),
        ("29", "loyalty", "Carte fidélité", "29SSSNNNNNNNC"),
    ];
    rows.iter()
        .map(|&(prefix, decode, label, pattern)| {
            json!({
                "id": format!("barcode-{prefix}"),
                "kind": "barcode-rule",
                "prefix": prefix,
                "decode": decode,
                "label": label,
                "pattern": pattern,
                "check_digit": "ean13",
            })
        })
        .collect()
}

/// Containers the scales subtract from weighed items.
fn tares() -> Vec<Value> {
    const TARES: &[(&str, &str, u64)] = &[
        ("sachet-papier", "Sachet papier", 4),
        ("sachet-kraft", "Sac kraft", 12),
        ("barquette-carton", "Barquette carton", 18),
        ("barquette-pla", "Barquette PLA", 9),
        ("bocal-verre", "Bocal verre client", 310),
        ("boite-inox", "Boîte inox client", 180),
        ("filet-coton", "Filet coton", 22),
        ("bouteille-1l", "Bouteille verre 1 l", 450),
    ];
    TARES
        .iter()
        .map(|&(code, label, grams)| {
            json!({
                "id": format!("tare-{code}"),
                "kind": "tare",
                "label": label,
                "grams": grams,
                "allowed_on": ["scale", "self-checkout"],
            })
        })
        .collect()
}

/// Vouchers loyalty members can buy with points at the till.
fn rewards() -> Vec<Value> {
    let rows: &[(&str, u64, u64, &str)] = &[
        ("bon-5", 500, 500, "Bon d'achat de 5 €"),
        ("bon-10", 950, 1_000, "Bon d'achat de 10 €"),
        ("bon-20", 1_800, 2_000, "Bon d'achat de 20 €"),
        ("bon-50", 4_250, 5_000, "Bon d'achat de 50 €"),
        ("cafe", 150, 120, "Un café offert au corner snacking"),
        ("baguette", 100, 110, "Une baguette tradition offerte"),
        ("sac", 200, 250, "Un sac cabas réutilisable"),
        ("livraison", 600, 690, "Une livraison à domicile offerte"),
        ("fleurs", 900, 990, "Un bouquet de saison"),
        ("don", 500, 500, "Don de 5 € à la banque alimentaire"),
    ];
    rows.iter()
        .map(|&(code, points, value_cents, label)| {
            json!({
                "id": format!("reward-{code}"),
                "kind": "loyalty-reward",
                "label": label,
                "points": points,
                "value_cents": value_cents,
                "min_tier": if points >= 4_000 { "silver" } else { "bronze" },
                "one_per_sale": true,
                "receipt_line": format!("Avantage fidélité : {}", label.to_lowercase()),
            })
        })
        .collect()
}

/// Notices shown to cashiers when they log in.
fn staff_messages(reference: NaiveDate) -> Vec<Value> {
    let rows = [
        "Pensez à proposer la carte fidélité à chaque client.",
        "Contrôle de l'âge obligatoire pour l'alcool : demander une pièce d'identité.",
        "Billets de 200 € et 500 € : vérifier au détecteur avant d'accepter.",
        "Inventaire tournant du rayon crèmerie cette semaine : signaler les écarts.",
        "Nouvelle procédure de retour sans ticket : validation du responsable obligatoire.",
        "Les titres-restaurant ne paient que les produits alimentaires.",
        "Rappel : fermeture des caisses 10 minutes avant l'heure de fermeture.",
        "Caisses automatiques : vérifier les sacs avant de valider une alerte de poids.",
        "Opération dons banque alimentaire samedi : accueil des bénévoles à l'entrée.",
        "Sauvegarde des caisses : ne pas éteindre les caisses pendant la nuit.",
    ];
    rows.iter()
        .enumerate()
        .map(|(i, text)| {
            let from = reference - Days::new(3 * i as u64);
            json!({
                "id": format!("message-{:02}", i + 1),
                "kind": "staff-message",
                "text": text,
                "from": from.format("%Y-%m-%d").to_string(),
                "until": (from + Days::new(30)).format("%Y-%m-%d").to_string(),
                "roles": ["role-cashier", "role-supervisor"],
                "acknowledge": i % 3 == 0,
            })
        })
        .collect()
}

/// All configuration records of a store.
pub(crate) fn generate(seed: u64, identity: &Identity, catalog: &[Value]) -> Vec<Value> {
    let mut rng = SplitMix64::derive(seed, "config", 0);
    let mut out = vec![store(identity, &mut rng)];
    out.extend(opening_hours());
    out.extend(closures(identity.reference_date));
    out.extend(tills_and_devices(&mut rng));
    out.extend(payment_methods());
    out.extend(tax_rates());
    out.extend(currencies());
    out.extend(departments());
    out.extend(roles());
    out.extend(users(&mut rng, identity.reference_date));
    out.extend(receipts(identity));
    out.extend(reason_codes());
    out.extend(settings());
    out.extend(keyboards(catalog));
    out.extend(barcode_rules());
    out.extend(tares());
    out.extend(rewards());
    out.extend(staff_messages(identity.reference_date));
    out
}
