//! Sync decisions as plain functions over state, free of I/O so they can be tested alone:
//! which full sync times are in force (the box's own or the hub's slot), when the next full
//! sync is due, how long to back off, what a delta pull asks for.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{Days, NaiveDateTime, NaiveTime};
use storebox_protocol::{DeltaRequest, ModuleCursor};

use crate::config::TimeOfDay;
use crate::storage::ModuleState;

/// Most changes per module the box asks for in one delta answer.
pub const DELTA_LIMIT: u32 = 5_000;

/// Seconds in a day: the hub's full sync slot is seconds after local midnight, below this.
pub const DAY_S: u32 = 86_400;

/// The full sync time of a box that has neither its own times nor a slot from the hub.
pub const DEFAULT_FULL_SYNC: TimeOfDay = TimeOfDay {
    hour: 7,
    minute: 0,
    second: 0,
};

/// Where the daily full sync times come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FullSyncAt {
    /// `[sync] full_sync_at` set in the box's config (a technician's choice, or the image's):
    /// these times, whatever the hub says. An empty list: no daily full sync.
    Local(Vec<TimeOfDay>),
    /// `[sync] full_sync_at` not set (or `["hub"]`): the slot the hub gives the box in its
    /// fleet window, else [`DEFAULT_FULL_SYNC`].
    Hub,
}

/// The full sync times in force and their source ("config", "hub" or "default"): a time
/// set in the box's config wins over the hub's slot, so a technician can move one shop's
/// sync; without one the hub spreads the fleet over its window; a box that has not heard
/// of a slot yet (a hub with none, or before its first full sync) keeps the old default.
pub fn full_sync_schedule(
    setting: &FullSyncAt,
    hub_slot: Option<u32>,
) -> (Vec<TimeOfDay>, &'static str) {
    match (setting, hub_slot) {
        (FullSyncAt::Local(times), _) => (times.clone(), "config"),
        (FullSyncAt::Hub, Some(s)) if s < DAY_S => (
            vec![TimeOfDay {
                hour: s / 3600,
                minute: s / 60 % 60,
                second: s % 60,
            }],
            "hub",
        ),
        (FullSyncAt::Hub, _) => (vec![DEFAULT_FULL_SYNC], "default"),
    }
}

/// Seconds after midnight as "HH:MM:SS".
pub fn clock(s: u32) -> String {
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// The next local time at or after `now` + 1 minute matching one of `times`.
///
/// Starting one minute ahead keeps a full sync that finished within its own minute from
/// being scheduled again for that same minute.
pub fn next_full_sync(now: NaiveDateTime, times: &[TimeOfDay]) -> Option<NaiveDateTime> {
    let from = now + chrono::Duration::minutes(1);
    let mut best: Option<NaiveDateTime> = None;
    for t in times {
        let time = NaiveTime::from_hms_opt(t.hour, t.minute, t.second)?;
        let mut candidate = from.date().and_time(time);
        if candidate < from {
            candidate = from.date().checked_add_days(Days::new(1))?.and_time(time);
        }
        best = Some(best.map_or(candidate, |b| b.min(candidate)));
    }
    best
}

/// Backoff after `failures` consecutive failures: 2 s doubling, capped at `max`, with up to
/// 25% taken off by `jitter` (0.0 to 1.0) so a fleet of boxes does not retry in step.
pub fn backoff(failures: u32, max: Duration, jitter: f64) -> Duration {
    let base = Duration::from_secs(2).saturating_mul(1u32 << failures.min(16));
    let capped = base.min(max);
    capped.mul_f64(1.0 - 0.25 * jitter.clamp(0.0, 1.0))
}

/// The delta request for the modules the box knows, skipping those still backing off.
pub fn delta_request(
    modules: &BTreeMap<String, ModuleState>,
    backing_off: &[String],
) -> DeltaRequest {
    DeltaRequest {
        cursors: modules
            .iter()
            .map(|(module, state)| ModuleCursor {
                module: module.clone(),
                cursor: state.cursor,
            })
            .collect(),
        skip: backing_off.to_vec(),
        limit: DELTA_LIMIT,
    }
}

/// Whether the box must full-sync before anything else: it has never completed one for some
/// module, or has no module at all (a new box).
pub fn needs_initial_full(modules: &BTreeMap<String, ModuleState>) -> bool {
    modules.is_empty() || modules.values().any(|m| m.last_full_ok_ms.is_none())
}

/// A number in [0, 1) that differs between calls and between boxes, for jitter.
pub fn jitter() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use chrono::NaiveDate;

    fn at(h: u32, m: u32) -> NaiveDateTime {
        NaiveDate::from_ymd_opt(2026, 3, 10)
            .unwrap()
            .and_hms_opt(h, m, 0)
            .unwrap()
    }

    #[test]
    fn the_next_full_sync_is_the_nearest_configured_time() {
        let times = [
            TimeOfDay {
                hour: 7,
                minute: 0,
                second: 0,
            },
            TimeOfDay {
                hour: 22,
                minute: 30,
                second: 0,
            },
        ];
        assert_eq!(next_full_sync(at(6, 0), &times), Some(at(7, 0)));
        assert_eq!(next_full_sync(at(7, 0), &times), Some(at(22, 30)));
        let next = next_full_sync(at(23, 0), &times).unwrap();
        assert_eq!(next.date(), NaiveDate::from_ymd_opt(2026, 3, 11).unwrap());
        assert_eq!(next.time(), NaiveTime::from_hms_opt(7, 0, 0).unwrap());
        assert_eq!(next_full_sync(at(6, 0), &[]), None);
    }

    #[test]
    fn a_local_time_wins_over_the_hubs_slot_which_wins_over_the_default() {
        let seven_thirty = TimeOfDay {
            hour: 7,
            minute: 30,
            second: 0,
        };
        let local = FullSyncAt::Local(vec![seven_thirty]);
        assert_eq!(
            full_sync_schedule(&local, Some(5 * 3600)),
            (vec![seven_thirty], "config")
        );
        let slot = 5 * 3600 + 43 * 60 + 12;
        let (times, source) = full_sync_schedule(&FullSyncAt::Hub, Some(slot));
        assert_eq!(source, "hub");
        assert_eq!(
            (times[0].hour, times[0].minute, times[0].second),
            (5, 43, 12)
        );
        // To the second: a fleet's slots are spread over seconds, not minutes.
        assert_eq!(
            next_full_sync(at(5, 0), &times).unwrap().time(),
            NaiveTime::from_hms_opt(5, 43, 12).unwrap()
        );
        assert_eq!(
            full_sync_schedule(&FullSyncAt::Hub, None),
            (vec![DEFAULT_FULL_SYNC], "default")
        );
        assert_eq!(
            full_sync_schedule(&FullSyncAt::Hub, Some(DAY_S)).1,
            "default"
        );
        assert_eq!(
            full_sync_schedule(&FullSyncAt::Local(vec![]), Some(1)).0,
            []
        );
        assert_eq!(clock(slot), "05:43:12");
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_jitter_only_shortens() {
        let max = Duration::from_secs(60);
        assert_eq!(backoff(0, max, 0.0), Duration::from_secs(2));
        assert_eq!(backoff(3, max, 0.0), Duration::from_secs(16));
        assert_eq!(backoff(30, max, 0.0), max);
        assert_eq!(backoff(30, max, 1.0), Duration::from_secs(45));
        let j = jitter();
        assert!((0.0..1.0).contains(&j));
    }

    #[test]
    fn a_new_box_needs_a_full_sync() {
        let mut modules = BTreeMap::new();
        assert!(needs_initial_full(&modules));
        modules.insert(
            "catalog".to_owned(),
            ModuleState {
                last_full_ok_ms: Some(1),
                cursor: 4,
                ..Default::default()
            },
        );
        assert!(!needs_initial_full(&modules));
        let req = delta_request(&modules, &["customers".to_owned()]);
        assert_eq!(req.cursors[0].cursor, 4);
        assert_eq!(req.skip, ["customers"]);
    }
}
