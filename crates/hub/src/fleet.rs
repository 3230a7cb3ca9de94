//! The fleet as a whole: when each box runs its daily full sync, and the fleet view that
//! shows a technician which boxes need one (docs/FLEET.md).
//!
//! **Full sync slots.** `[fleet] full_sync_window` is a local time window; each store's box
//! gets a slot in it derived from a hash of its store id alone, so the slot is the same after
//! a hub restart, on every replica, and whatever other stores come and go, and a fleet of
//! thousands starts its full syncs spread over the window instead of all at 07:00:00. The hub
//! sends the slot in every full sync answer (docs/PROTOCOL.md).
//!
//! **The fleet view** is assembled at request time from what the hub keeps anyway: each
//! box's report (`store.rs`: contact, cursors, pending activity, errors it reported), the
//! module heads, the PKI's register of issued certificates and the firmware state. It keeps
//! no state of its own; the rules for "needs attention" are plain functions tested here.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use storebox_protocol as proto;

use crate::config::HubConfig;
use crate::store::{rfc3339, BoxReport, HubStore, StoreError};

/// Seconds in a day: slots are seconds after local midnight, below this.
pub const DAY_S: u32 = 86_400;

/// How many pending-activity figures a box report keeps, newest last.
pub const PENDING_SAMPLES: usize = 8;

/// Most module errors kept per box: a box reporting more (a broken or hostile one) cannot
/// grow its report without bound.
pub const MAX_ERRORS: usize = 64;

/// A local time window, possibly spanning midnight.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Seconds after midnight the window opens.
    pub start_s: u32,
    /// Its length in seconds, 1 to a day less one minute.
    pub len_s: u32,
}

impl Window {
    /// Parses "HH:MM-HH:MM" ("23:30-01:00" spans midnight), or "off" for no window.
    pub fn parse(text: &str) -> Result<Option<Window>, String> {
        let text = text.trim();
        if text == "off" {
            return Ok(None);
        }
        let bad = || format!("{text:?} is not a window like \"05:00-07:00\", nor \"off\"");
        let (a, b) = text.split_once('-').ok_or_else(bad)?;
        let start = parse_hhmm(a).ok_or_else(bad)?;
        let end = parse_hhmm(b).ok_or_else(bad)?;
        if start == end {
            return Err(format!("{text:?} is empty: it ends when it starts"));
        }
        Ok(Some(Window {
            start_s: start,
            len_s: (end + DAY_S - start) % DAY_S,
        }))
    }

    /// The slot of `store`'s box: seconds after local midnight, inside the window. Derived
    /// from SHA-256 of the store id (not a process-seeded hash), so it never moves unless
    /// the window does.
    pub fn slot(&self, store: &str) -> u32 {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(b"storehub full sync slot\0");
        ctx.update(store.as_bytes());
        let digest = ctx.finish();
        let mut first = [0u8; 8];
        first.copy_from_slice(&digest.as_ref()[..8]);
        let offset = u64::from_le_bytes(first) % u64::from(self.len_s.max(1));
        (self.start_s + offset as u32) % DAY_S
    }
}

fn parse_hhmm(text: &str) -> Option<u32> {
    let (h, m) = text.trim().split_once(':')?;
    if h.len() != 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60).then_some(h * 3600 + m * 60)
}

/// Seconds after midnight as "HH:MM:SS".
pub fn clock(s: u32) -> String {
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The full sync slot the hub gives `store`'s box, when the fleet has a window. A window
/// that does not parse was refused when the config was loaded; it gives no slot here.
pub fn slot_for(config: &HubConfig, store: &str) -> Option<u32> {
    config
        .full_sync_window()
        .ok()
        .flatten()
        .map(|w| w.slot(store))
}

/// A module error a box reported, and since when it has reported that same error.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenError {
    pub error: String,
    pub since_ms: i64,
}

/// The module errors to keep after a box reported `errors` at `now_ms`: exactly the
/// reported ones (a module not listed is well again), each keeping the time it was first
/// reported while its text stays the same. Invalid module names are dropped, texts cut to
/// [`proto::MAX_ERROR_BYTES`], at most [`MAX_ERRORS`] kept: this is input from a box.
pub fn note_errors(
    previous: &BTreeMap<String, SeenError>,
    errors: &[proto::ModuleError],
    now_ms: i64,
) -> BTreeMap<String, SeenError> {
    let mut out = BTreeMap::new();
    for e in errors {
        if out.len() >= MAX_ERRORS || !proto::is_valid_module_name(&e.module) {
            continue;
        }
        let error = truncate(&e.error, proto::MAX_ERROR_BYTES);
        let since_ms = match previous.get(&e.module) {
            Some(p) if p.error == error => p.since_ms,
            _ => now_ms,
        };
        out.insert(e.module.clone(), SeenError { error, since_ms });
    }
    out
}

/// Adds a pending-activity figure to a report's history, keeping the last
/// [`PENDING_SAMPLES`].
pub fn note_pending(history: &mut Vec<(i64, u64)>, now_ms: i64, pending: u64) {
    history.push((now_ms, pending));
    let excess = history.len().saturating_sub(PENDING_SAMPLES);
    history.drain(..excess);
}

/// Whether pending activity is growing: each of the last three figures the box reported is
/// higher than the one before. One high figure is a busy hour; three rising ones mean the
/// box is not getting its activity to the hub.
pub fn pending_growing(history: &[(i64, u64)]) -> bool {
    let n = history.len();
    n >= 3 && history[n - 3].1 < history[n - 2].1 && history[n - 2].1 < history[n - 1].1
}

/// Cuts `text` to at most `max` bytes on a character boundary.
pub fn truncate(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

/// When a box needs a technician.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Thresholds {
    /// No contact for longer than this.
    pub no_contact_s: u64,
    /// The newest certificate expires within this (or has expired).
    pub cert_within_s: u64,
    /// No completed full sync for longer than this.
    pub full_sync_within_s: u64,
}

impl Thresholds {
    /// The defaults: 6 hours without contact (a box polls every 5 minutes, hourly under a
    /// change watch); a quarter of the certificate lifetime left (a box renews at two
    /// thirds, so a quarter left means renewal is overdue); 26 hours without a full sync
    /// (a daily one missed, with room for its retries).
    pub fn defaults(cert_lifetime: Duration) -> Thresholds {
        Thresholds {
            no_contact_s: 6 * 3600,
            cert_within_s: cert_lifetime.as_secs() / 4,
            full_sync_within_s: 26 * 3600,
        }
    }
}

/// The fleet view: every configured store, seen or not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FleetView {
    pub generated_at: String,
    /// The `[fleet] full_sync_window`, or "off".
    pub full_sync_window: String,
    pub thresholds: Thresholds,
    pub stores: Vec<BoxView>,
}

/// One store's box as the hub knows it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct BoxView {
    pub store: String,
    /// Whether the box ever made a sync call to this hub.
    pub seen: bool,
    pub last_contact: Option<String>,
    pub last_contact_age_s: Option<i64>,
    /// The box software version, from its last acknowledgement.
    pub box_version: Option<String>,
    /// The firmware image it runs, from its last update check.
    pub image_version: Option<String>,
    pub certificate: Option<CertView>,
    pub pending_activity: Option<u64>,
    /// The last figures the box reported, oldest first.
    pub pending_history: Vec<u64>,
    pub last_full_sync: Option<String>,
    pub last_full_sync_age_s: Option<i64>,
    /// The box's full sync slot in the fleet window ("HH:MM:SS" local time).
    pub full_sync_slot: Option<String>,
    pub modules: BTreeMap<String, ModuleView>,
    pub ota: OtaView,
    /// Why a technician should look at the box; empty when all is well.
    pub attention: Vec<Attention>,
}

/// The newest certificate the hub issued to the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertView {
    pub not_after: String,
    /// Negative once expired.
    pub expires_in_s: i64,
    pub revoked: bool,
}

/// One module of a box.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleView {
    /// The hub's change sequence of the module.
    pub head: u64,
    /// The cursor the box last reported.
    pub acknowledged: Option<u64>,
    /// Changes the box is behind the head (`head` − `acknowledged`).
    pub behind: Option<u64>,
    /// When the box last reported a cursor equal to the head then.
    pub last_in_step: Option<String>,
    /// How long the box's copy has been behind: 0 when its cursor is the head, else the time
    /// since it was last in step (`None`: never was).
    pub data_age_s: Option<i64>,
    /// The module's last sync error, as the box reported it.
    pub error: Option<String>,
    pub error_since: Option<String>,
}

/// The box's firmware updates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaView {
    /// The last report's event: downloaded, installed, healthy, failed, rolled_back.
    pub last_event: Option<String>,
    pub last_version: Option<String>,
    pub last_reason: Option<String>,
}

/// One reason a box needs a technician.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attention {
    /// `never_seen`, `no_contact`, `full_sync_overdue`, `cert_expiring`, `cert_expired`,
    /// `cert_revoked`, `no_certificate`, `pending_growing`, `module_error`, `module_behind`,
    /// `ota_failed` or `ota_rolled_back`.
    pub reason: String,
    pub detail: String,
}

/// Which boxes a caller wants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    /// Only boxes with at least one reason for attention.
    pub needs_attention: bool,
    /// Only boxes with this reason.
    pub reason: Option<String>,
    /// Only this store.
    pub store: Option<String>,
}

/// Everything the hub knows of one box, read from its stores, for [`box_view`].
pub struct BoxFacts {
    pub report: BoxReport,
    /// Head of every configured module.
    pub heads: BTreeMap<String, u64>,
    /// The certificates issued to the box, newest first (`None`: no PKI).
    pub certificates: Option<Vec<crate::pki::Issued>>,
    pub ota: crate::store::ota::BoxOta,
}

/// Reads what the hub knows of `store`'s box.
pub fn facts(config: &HubConfig, hub: &HubStore, store: &str) -> Result<BoxFacts, StoreError> {
    let mut heads = BTreeMap::new();
    for module in &config.modules {
        heads.insert(module.name.clone(), hub.module_head(store, &module.name)?);
    }
    Ok(BoxFacts {
        report: hub.box_report(store)?,
        heads,
        certificates: crate::pki::global().map(|pki| {
            pki.certificates(store)
                .1
                .into_iter()
                .map(|(_, issued)| issued)
                .collect()
        }),
        ota: hub.ota_box(store)?,
    })
}

/// The view of one box at `now_ms`, with its reasons for attention.
pub fn box_view(
    store: &str,
    facts: &BoxFacts,
    slot: Option<u32>,
    thresholds: &Thresholds,
    now_ms: i64,
) -> BoxView {
    let report = &facts.report;
    let age = |ms: i64| (now_ms - ms) / 1000;
    let mut view = BoxView {
        store: store.to_owned(),
        seen: report.last_contact_ms.is_some(),
        last_contact: report.last_contact_ms.map(rfc3339),
        last_contact_age_s: report.last_contact_ms.map(age),
        box_version: report.box_version.clone(),
        image_version: facts.ota.last_check.as_ref().map(|c| c.running.clone()),
        pending_activity: report.pending_activity,
        pending_history: report.pending_history.iter().map(|(_, p)| *p).collect(),
        last_full_sync: report.last_full_sync_ms.map(rfc3339),
        last_full_sync_age_s: report.last_full_sync_ms.map(age),
        full_sync_slot: slot.map(clock),
        ..BoxView::default()
    };
    view.certificate = facts
        .certificates
        .as_ref()
        .and_then(|c| c.first())
        .map(|newest| CertView {
            not_after: rfc3339(newest.not_after_ms),
            expires_in_s: (newest.not_after_ms - now_ms) / 1000,
            revoked: newest.revoked_ms.is_some(),
        });
    for (module, head) in &facts.heads {
        let acknowledged = report.cursors.get(module).copied();
        let behind = acknowledged.map(|a| head.saturating_sub(a));
        let in_step = report.in_step_ms.get(module).copied();
        let data_age_s = match behind {
            Some(0) => Some(0),
            _ => in_step.map(age),
        };
        let error = report.module_errors.get(module);
        view.modules.insert(
            module.clone(),
            ModuleView {
                head: *head,
                acknowledged,
                behind,
                last_in_step: in_step.map(rfc3339),
                data_age_s,
                error: error.map(|e| e.error.clone()),
                error_since: error.map(|e| rfc3339(e.since_ms)),
            },
        );
    }
    if let Some(last) = facts.ota.reports.last() {
        view.ota = OtaView {
            last_event: Some(last.event.clone()),
            last_version: Some(last.version.clone()),
            last_reason: last.reason.clone(),
        };
    }
    view.attention = attention(&view, facts, thresholds);
    view
}

/// Why a box needs a technician, from its view.
fn attention(view: &BoxView, facts: &BoxFacts, t: &Thresholds) -> Vec<Attention> {
    let mut out = Vec::new();
    let mut add = |reason: &str, detail: String| {
        out.push(Attention {
            reason: reason.to_owned(),
            detail,
        })
    };
    let Some(contact_age) = view.last_contact_age_s else {
        add(
            "never_seen",
            "the box has never called this hub: install or enroll it".into(),
        );
        return out;
    };
    if contact_age > t.no_contact_s as i64 {
        add(
            "no_contact",
            format!("no contact for {}", human_duration(contact_age)),
        );
    }
    match view.last_full_sync_age_s {
        Some(a) if a > t.full_sync_within_s as i64 => add(
            "full_sync_overdue",
            format!("last full sync {} ago", human_duration(a)),
        ),
        None => add("full_sync_overdue", "no full sync completed yet".into()),
        Some(_) => {}
    }
    match &view.certificate {
        Some(c) if c.revoked => add("cert_revoked", "the box's certificate is revoked".into()),
        Some(c) if c.expires_in_s <= 0 => add(
            "cert_expired",
            format!(
                "its newest certificate expired {} ago",
                human_duration(-c.expires_in_s)
            ),
        ),
        Some(c) if c.expires_in_s < t.cert_within_s as i64 => add(
            "cert_expiring",
            format!(
                "its newest certificate expires in {}",
                human_duration(c.expires_in_s)
            ),
        ),
        Some(_) => {}
        None if facts.certificates.is_some() => add(
            "no_certificate",
            "the hub never issued the box a certificate".into(),
        ),
        None => {}
    }
    if pending_growing(&facts.report.pending_history) {
        add(
            "pending_growing",
            format!(
                "pending activity rising: {}",
                view.pending_history
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" → ")
            ),
        );
    }
    for (module, m) in &view.modules {
        if let Some(error) = &m.error {
            add("module_error", format!("{module}: {error}"));
        } else if m.behind.is_some_and(|b| b > 0)
            && m.data_age_s.is_none_or(|a| a > t.no_contact_s as i64)
        {
            add(
                "module_behind",
                format!(
                    "{module}: {} changes behind{}",
                    m.behind.unwrap_or_default(),
                    m.data_age_s
                        .map(|a| format!(", out of step for {}", human_duration(a)))
                        .unwrap_or_default()
                ),
            );
        }
    }
    match view.ota.last_event.as_deref() {
        Some("failed") => add(
            "ota_failed",
            format!(
                "update to {} failed: {}",
                view.ota.last_version.as_deref().unwrap_or("?"),
                view.ota.last_reason.as_deref().unwrap_or("no reason given")
            ),
        ),
        Some("rolled_back") => add(
            "ota_rolled_back",
            format!(
                "update to {} rolled back: {}",
                view.ota.last_version.as_deref().unwrap_or("?"),
                view.ota.last_reason.as_deref().unwrap_or("no reason given")
            ),
        ),
        _ => {}
    }
    out
}

/// The fleet view of every configured store that passes `filter`.
pub fn view(
    config: &HubConfig,
    hub: &HubStore,
    filter: &Filter,
    thresholds: &Thresholds,
    now_ms: i64,
) -> Result<FleetView, StoreError> {
    let mut stores = Vec::new();
    for store in &config.stores {
        if filter.store.as_ref().is_some_and(|s| *s != store.id) {
            continue;
        }
        let facts = facts(config, hub, &store.id)?;
        let view = box_view(
            &store.id,
            &facts,
            slot_for(config, &store.id),
            thresholds,
            now_ms,
        );
        if filter.needs_attention && view.attention.is_empty() {
            continue;
        }
        if let Some(reason) = &filter.reason {
            if !view.attention.iter().any(|a| a.reason == *reason) {
                continue;
            }
        }
        stores.push(view);
    }
    Ok(FleetView {
        generated_at: rfc3339(now_ms),
        full_sync_window: config.fleet.full_sync_window.clone(),
        thresholds: *thresholds,
        stores,
    })
}

/// A duration for people: "45s", "12m", "7h", "3d".
pub fn human_duration(seconds: i64) -> String {
    let s = seconds.max(0);
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..172_800 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

/// The fleet view as a table for people, one line per box, then each box's reasons.
pub fn render_table(view: &FleetView) -> String {
    let header = [
        "STORE",
        "CONTACT",
        "VERSION",
        "IMAGE",
        "CERT",
        "PENDING",
        "FULL SYNC",
        "SLOT",
        "BEHIND",
        "ATTENTION",
    ];
    let rows: Vec<[String; 10]> = view
        .stores
        .iter()
        .map(|b| {
            let ago = |a: Option<i64>| a.map_or("never".to_owned(), |a| human_duration(a) + " ago");
            let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            let cert = b.certificate.as_ref().map(|c| {
                if c.revoked {
                    "revoked".to_owned()
                } else if c.expires_in_s <= 0 {
                    "expired".to_owned()
                } else {
                    format!("in {}", human_duration(c.expires_in_s))
                }
            });
            let behind: Vec<String> = b
                .modules
                .iter()
                .filter(|(_, m)| m.behind.is_some_and(|n| n > 0))
                .map(|(name, m)| {
                    format!(
                        "{name} +{}{}",
                        m.behind.unwrap_or_default(),
                        m.data_age_s
                            .map(|a| format!(" ({})", human_duration(a)))
                            .unwrap_or_default()
                    )
                })
                .collect();
            let mut reasons: Vec<&str> = b.attention.iter().map(|a| a.reason.as_str()).collect();
            reasons.dedup();
            [
                b.store.clone(),
                ago(b.last_contact_age_s),
                dash(b.box_version.clone()),
                dash(b.image_version.clone()),
                dash(cert),
                dash(b.pending_activity.map(|p| p.to_string())),
                if b.seen {
                    ago(b.last_full_sync_age_s)
                } else {
                    "-".into()
                },
                dash(b.full_sync_slot.clone()),
                if behind.is_empty() {
                    "-".into()
                } else {
                    behind.join(", ")
                },
                if reasons.is_empty() {
                    "-".into()
                } else {
                    reasons.join(",")
                },
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[&str]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                let _ = write!(text, "{cell:<w$}  ");
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header);
    for row in &rows {
        line(&row.each_ref().map(String::as_str));
    }
    let details: Vec<&BoxView> = view
        .stores
        .iter()
        .filter(|b| !b.attention.is_empty())
        .collect();
    if !details.is_empty() {
        out.push('\n');
        for b in details {
            for a in &b.attention {
                let _ = writeln!(out, "{}: {}: {}", b.store, a.reason, a.detail);
            }
        }
    }
    if view.stores.is_empty() {
        out.push_str("(no store matches)\n");
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_and_may_span_midnight() {
        let w = Window::parse("05:00-07:00").unwrap().unwrap();
        assert_eq!((w.start_s, w.len_s), (5 * 3600, 2 * 3600));
        let w = Window::parse("23:30-00:30").unwrap().unwrap();
        assert_eq!((w.start_s, w.len_s), (23 * 3600 + 1800, 3600));
        assert_eq!(Window::parse("off").unwrap(), None);
        assert!(Window::parse("05:00-05:00").is_err());
        assert!(Window::parse("5:00-07:00").is_err());
        assert!(Window::parse("05:00").is_err());
        assert!(Window::parse("05:00-24:00").is_err());
    }

    #[test]
    fn slots_are_stable_inside_the_window_and_spread_over_it() {
        let w = Window::parse("05:00-07:00").unwrap().unwrap();
        // The same store always gets the same slot: a restart does not move it.
        assert_eq!(w.slot("shop-001"), w.slot("shop-001"));
        assert_eq!(
            w.slot("shop-001"),
            Window::parse("05:00-07:00")
                .unwrap()
                .unwrap()
                .slot("shop-001")
        );
        // 2,000 stores: all inside the window, none on its edges more than chance allows,
        // and spread: no minute of the 120 holds more than twice its share.
        let mut per_minute = [0u32; 120];
        let mut seconds = std::collections::BTreeSet::new();
        for i in 0..2000 {
            let s = w.slot(&format!("shop-{i:04}"));
            assert!((5 * 3600..7 * 3600).contains(&s), "{s}");
            per_minute[((s - 5 * 3600) / 60) as usize] += 1;
            seconds.insert(s);
        }
        let share = 2000 / 120;
        assert!(
            per_minute.iter().all(|&n| n <= 2 * share + 4),
            "{per_minute:?}"
        );
        assert!(per_minute.iter().all(|&n| n > 0), "{per_minute:?}");
        // Never a herd in one second.
        assert!(seconds.len() > 1700, "{} distinct seconds", seconds.len());
        // A window over midnight wraps.
        let w = Window::parse("23:00-01:00").unwrap().unwrap();
        for i in 0..200 {
            let s = w.slot(&format!("shop-{i}"));
            assert!(!(3600..23 * 3600).contains(&s), "{s}");
        }
        assert_eq!(clock(5 * 3600 + 61), "05:01:01");
    }

    #[test]
    fn errors_keep_their_first_time_and_clear_when_not_reported() {
        let e = |m: &str, t: &str| proto::ModuleError {
            module: m.into(),
            error: t.into(),
        };
        let first = note_errors(&BTreeMap::new(), &[e("catalog", "boom")], 10);
        assert_eq!(first["catalog"].since_ms, 10);
        let same = note_errors(&first, &[e("catalog", "boom"), e("Bad/Name", "x")], 20);
        assert_eq!(same["catalog"].since_ms, 10);
        assert_eq!(same.len(), 1);
        let other = note_errors(&same, &[e("catalog", "another")], 30);
        assert_eq!(other["catalog"].since_ms, 30);
        assert!(note_errors(&other, &[], 40).is_empty());
        let long = note_errors(&BTreeMap::new(), &[e("m", &"é".repeat(600))], 1);
        assert!(long["m"].error.len() <= proto::MAX_ERROR_BYTES);
    }

    #[test]
    fn pending_is_growing_only_when_it_rises_three_times() {
        let mut h = Vec::new();
        for (i, p) in [5, 0, 3, 7].into_iter().enumerate() {
            note_pending(&mut h, i as i64, p);
        }
        assert!(pending_growing(&h));
        note_pending(&mut h, 9, 7);
        assert!(!pending_growing(&h));
        for i in 0..20 {
            note_pending(&mut h, 10 + i, i as u64);
        }
        assert_eq!(h.len(), PENDING_SAMPLES);
        assert!(!pending_growing(&h[..2]));
    }

    fn facts(now: i64) -> BoxFacts {
        let mut report = BoxReport {
            last_contact_ms: Some(now - 60_000),
            last_full_sync_ms: Some(now - 3_600_000),
            box_version: Some("0.1.0".into()),
            pending_activity: Some(0),
            ..BoxReport::default()
        };
        report.cursors.insert("catalog".into(), 10);
        report.in_step_ms.insert("catalog".into(), now - 60_000);
        BoxFacts {
            report,
            heads: [("catalog".to_owned(), 10)].into_iter().collect(),
            certificates: Some(vec![crate::pki::Issued {
                store: "s".into(),
                serial: "1".into(),
                not_before_ms: now - 3_600_000,
                not_after_ms: now + 20 * 3_600_000,
                revoked_ms: None,
            }]),
            ota: Default::default(),
        }
    }

    #[test]
    fn a_healthy_box_needs_nothing_and_each_fault_is_named() {
        let now = 1_800_000_000_000;
        let t = Thresholds::defaults(Duration::from_secs(86_400));
        let v = box_view("s", &facts(now), Some(5 * 3600), &t, now);
        assert!(v.attention.is_empty(), "{:?}", v.attention);
        assert_eq!(v.modules["catalog"].data_age_s, Some(0));
        assert_eq!(v.full_sync_slot.as_deref(), Some("05:00:00"));

        let reasons = |f: &BoxFacts| -> Vec<String> {
            box_view("s", f, None, &t, now)
                .attention
                .into_iter()
                .map(|a| a.reason)
                .collect()
        };
        let mut f = facts(now);
        f.report = BoxReport::default();
        assert_eq!(reasons(&f), ["never_seen"]);

        let mut f = facts(now);
        f.report.last_contact_ms = Some(now - 7 * 3_600_000);
        f.certificates.as_mut().unwrap()[0].not_after_ms = now + 3_600_000;
        assert_eq!(reasons(&f), ["no_contact", "cert_expiring"]);

        let mut f = facts(now);
        f.certificates.as_mut().unwrap()[0].not_after_ms = now - 1000;
        f.report.last_full_sync_ms = Some(now - 27 * 3_600_000);
        assert_eq!(reasons(&f), ["full_sync_overdue", "cert_expired"]);

        let mut f = facts(now);
        f.heads.insert("catalog".into(), 15);
        f.report
            .in_step_ms
            .insert("catalog".into(), now - 8 * 3_600_000);
        let v = box_view("s", &f, None, &t, now);
        assert_eq!(v.modules["catalog"].behind, Some(5));
        assert_eq!(v.modules["catalog"].data_age_s, Some(8 * 3600));
        assert_eq!(v.attention[0].reason, "module_behind");

        let mut f = facts(now);
        f.report.module_errors.insert(
            "catalog".into(),
            SeenError {
                error: "the hub failed this module".into(),
                since_ms: now,
            },
        );
        f.report.pending_history = vec![(1, 1), (2, 5), (3, 9)];
        f.ota.reports.push(crate::store::ota::StoredReport {
            received_at_ms: now,
            at: 0,
            running: "1.0".into(),
            event: "rolled_back".into(),
            version: "1.1".into(),
            reason: Some("unhealthy".into()),
        });
        assert_eq!(
            reasons(&f),
            ["pending_growing", "module_error", "ota_rolled_back"]
        );
        let table = render_table(&FleetView {
            generated_at: String::new(),
            full_sync_window: "off".into(),
            thresholds: t,
            stores: vec![box_view("s", &f, None, &t, now)],
        });
        assert!(table.starts_with("STORE"), "{table}");
        assert!(
            table.contains("s: ota_rolled_back: update to 1.1 rolled back: unhealthy"),
            "{table}"
        );
    }
}
