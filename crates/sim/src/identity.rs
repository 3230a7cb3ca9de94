//! What a seed fixes about the store itself: its number, its town and
//! catchment area, and the reference date the promotions are laid out around.

use chrono::{Days, NaiveDate};

use crate::prng::mix64;
use crate::words::{Area, AREAS};

pub(crate) struct Identity {
    /// Store number, 100..=999 (printed as `S0xyz`, and part of card numbers).
    pub code: u64,
    pub area: &'static Area,
    pub reference_date: NaiveDate,
}

impl Identity {
    pub(crate) fn new(seed: u64) -> Self {
        let h = mix64(seed ^ 0x5707_E1D0);
        Self {
            code: 100 + h % 900,
            area: &AREAS[((h >> 16) % AREAS.len() as u64) as usize],
            reference_date: reference_date(seed),
        }
    }
}

/// The "today" of a generated store: a day in 2026 fixed by the seed. The
/// promotions' windows are past, current or future relative to this date
/// (never relative to the wall clock, so output does not change with time),
/// and day `d` of [`crate::day_changes`] is this date plus `d` days.
pub fn reference_date(seed: u64) -> NaiveDate {
    let start = NaiveDate::from_ymd_opt(2026, 1, 1).expect("2026-01-01 is a valid date");
    start + Days::new(mix64(seed ^ 0xDA7E) % 365)
}

/// RFC 3339 UTC midnight of `date`, e.g. `2026-11-20T00:00:00Z`.
pub(crate) fn midnight_utc(date: NaiveDate) -> String {
    format!("{}T00:00:00Z", date.format("%Y-%m-%d"))
}
