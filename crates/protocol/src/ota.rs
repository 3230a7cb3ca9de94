//! Firmware updates delivered by the hub: what a box asks, what the hub offers, what the box
//! reports back. The bundle itself is a signed RAUC bundle the hub serves as opaque bytes;
//! the box verifies it (signature, payload, `compatible`, version) before installing, so the
//! hub is trusted with availability only, never with what runs on the box.
//!
//! Calls, all on the sync listener under the box's client certificate:
//! - `POST` [`PATH_OTA`] with an [`OtaCheck`] (encoded like every sync message): the hub
//!   answers an [`OtaOffer`]. The box asks at its configured interval, a few hundred bytes.
//! - `GET` [`PATH_OTA_BUNDLE`]`/{version}`: the bundle, `application/octet-stream`. A
//!   `Range: bytes=N-` header resumes a cut download (`206` with `Content-Range`).
//! - `POST` [`PATH_OTA_REPORT`] with an [`OtaReport`]: the hub answers `204`.

use serde::{Deserialize, Serialize};

/// The box asks whether the hub wants it to run another version.
pub const PATH_OTA: &str = "/sync/v2/ota";
/// Prefix of a bundle's download path; the version follows after a `/`.
pub const PATH_OTA_BUNDLE: &str = "/sync/v2/ota/bundle";
/// The box reports an update's progress, success, failure or rollback.
pub const PATH_OTA_REPORT: &str = "/sync/v2/ota/report";

/// Largest version string either side accepts.
pub const MAX_VERSION_BYTES: usize = 64;

/// What the box runs, sent with every check so the hub's fleet view stays true.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaCheck {
    /// Version of the running image (`/usr/lib/storebox/image-version`), empty when the box
    /// does not run from an image (a development machine).
    pub running: String,
    /// The board's RAUC `compatible` string, empty when unknown.
    pub compatible: String,
    /// The booted slot (`A` or `B`), empty when unknown.
    pub slot: String,
}

/// The hub's answer to an [`OtaCheck`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaOffer {
    /// The version the hub wants this box to run, with its bundle; `None` when no target is
    /// set for the store (nor for the fleet), or when the box already runs it.
    pub target: Option<OtaTarget>,
}

/// A bundle the hub serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaTarget {
    pub version: String,
    /// Size of the bundle in bytes.
    pub size: u64,
    /// SHA-256 of the whole bundle: the box checks a resumed download against it before
    /// handing the file to RAUC.
    pub sha256: [u8; 32],
}

/// What happened to an update on a box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OtaEvent {
    /// The bundle is downloaded and verified; installation waits for the maintenance window.
    Downloaded { version: String },
    /// The bundle is installed in the other slot; the box reboots into it at a safe moment.
    Installed { version: String },
    /// The new slot booted and passed its health check: it is marked good.
    Healthy { version: String },
    /// The box refused or failed to install `version`; the running slot is unchanged.
    Failed { version: String, reason: String },
    /// The box booted into `version` but came back on the previous slot.
    RolledBack { version: String, reason: String },
}

/// One report from the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OtaReport {
    /// The version the box runs while reporting.
    pub running: String,
    pub event: OtaEvent,
    /// When it happened, Unix seconds by the box's clock.
    pub at: i64,
}

/// Whether `v` can be a version: 1 to [`MAX_VERSION_BYTES`] of ASCII letters, digits, `.`,
/// `-`, `+` and `_`, starting with a letter or digit. Versions appear in URL paths and file
/// names on both sides, where `.` or `..` would be a path step.
pub fn is_valid_version(v: &str) -> bool {
    v.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
        && v.len() <= MAX_VERSION_BYTES
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+' | b'_'))
}

/// Orders two versions the way a technician reads them: dot-separated parts compared in
/// natural order (runs of digits as numbers, the rest as text) (`1.10.0` > `1.9.2`; `2026.11.1` >
/// `2026.2.0`). A pre-release suffix after `-` sorts before the release (`1.2.0-rc1` <
/// `1.2.0`). Build metadata after `+` is ignored.
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    fn split(v: &str) -> (&str, Option<&str>) {
        let v = v.split('+').next().unwrap_or(v);
        match v.split_once('-') {
            Some((main, pre)) => (main, Some(pre)),
            None => (v, None),
        }
    }
    fn parts(a: &str, b: &str) -> Ordering {
        let mut x = a.split('.');
        let mut y = b.split('.');
        loop {
            match (x.next(), y.next()) {
                (None, None) => return Ordering::Equal,
                (None, Some(_)) => return Ordering::Less,
                (Some(_), None) => return Ordering::Greater,
                (Some(p), Some(q)) => {
                    let o = natural(p, q);
                    if o != Ordering::Equal {
                        return o;
                    }
                }
            }
        }
    }
    // Runs of digits compare as numbers, other runs as text: `rc2` < `rc10`.
    fn natural(p: &str, q: &str) -> Ordering {
        fn runs(s: &str) -> Vec<&str> {
            let mut out = Vec::new();
            let mut start = 0;
            let bytes = s.as_bytes();
            for i in 1..=bytes.len() {
                if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[i - 1].is_ascii_digit() {
                    out.push(&s[start..i]);
                    start = i;
                }
            }
            out
        }
        let (x, y) = (runs(p), runs(q));
        for (r, t) in x.iter().zip(y.iter()) {
            let o = match (r.parse::<u64>(), t.parse::<u64>()) {
                (Ok(m), Ok(n)) => m.cmp(&n),
                _ => r.cmp(t),
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        x.len().cmp(&y.len())
    }
    let (am, ap) = split(a);
    let (bm, bp) = split(b);
    match parts(am, bm) {
        Ordering::Equal => match (ap, bp) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Greater,
            (Some(_), None) => Ordering::Less,
            (Some(p), Some(q)) => parts(p, q),
        },
        o => o,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::cmp::Ordering::*;

    #[test]
    fn versions_compare_by_number_then_text() {
        assert_eq!(compare_versions("1.10.0", "1.9.2"), Greater);
        assert_eq!(compare_versions("1.2", "1.2.0"), Less);
        assert_eq!(compare_versions("1.2.0", "1.2.0+build7"), Equal);
        assert_eq!(compare_versions("1.2.0-rc1", "1.2.0"), Less);
        assert_eq!(compare_versions("1.2.0-rc2", "1.2.0-rc10"), Less);
        assert_eq!(compare_versions("2026.11.1", "2026.2.0"), Greater);
        assert_eq!(compare_versions("ci-b", "ci-a"), Greater);
    }

    #[test]
    fn versions_are_plain() {
        assert!(is_valid_version("2026.11.1-rc1+g1234"));
        assert!(!is_valid_version(""));
        assert!(!is_valid_version("../etc"));
        assert!(!is_valid_version(".."));
        assert!(!is_valid_version("-1"));
        assert!(!is_valid_version("1 2"));
        assert!(!is_valid_version(&"1".repeat(MAX_VERSION_BYTES + 1)));
    }

    #[test]
    fn messages_round_trip() {
        let report = OtaReport {
            running: "1.0.0".into(),
            event: OtaEvent::RolledBack {
                version: "1.1.0".into(),
                reason: "health check: the LAN API did not answer".into(),
            },
            at: 1_790_000_000,
        };
        let body = crate::encode(&report, 3).unwrap();
        assert_eq!(
            crate::decode::<OtaReport>(&body, "ota report").unwrap(),
            report
        );
    }
}
