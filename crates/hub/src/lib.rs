//! storehub: the platform side of the storebox sync protocol.
//!
//! A hub holds, per store and per module, the records boxes must mirror, with a change
//! sequence that delta pulls follow; it receives and deduplicates the activity boxes push; and
//! it offers an admin API to the back office. Code map:
//!
//! - [`config`]: `hub.toml`, read and checked.
//! - [`store`]: the embedded redb database (records, change log, tombstones, activity).
//! - [`sync_api`]: the HTTPS listener boxes talk to.
//! - [`admin_api`]: the back-office HTTP listener, bearer-token protected.
//! - [`init`]: `storehub init`, a ready-to-run setup with its private CA.
//! - [`pki`]: boxes' identities: enrollment tokens, short-lived client certificates,
//!   revocation, the per-request certificate check.
//! - [`enroll`]: the `/pki/v1/` calls boxes make to enroll and renew.
//! - [`ota`]: firmware updates: bundle files, targets, the admin and sync calls for them.
//! - [`fleet`]: the boxes' full sync slots and the fleet view (admin API and CLI).

pub mod admin_api;
pub mod config;
pub mod enroll;
pub mod fleet;
pub mod init;
pub mod ota;
pub mod pki;
pub mod store;
pub mod sync_api;

/// Milliseconds since the Unix epoch, as the protocol counts time.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Hex encoding of the SHA-256 of `data`: how the hub keeps store credentials and tokens.
pub fn sha256_hex(data: &[u8]) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, data);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// Constant-time comparison of two secrets, so a wrong token's timing reveals nothing.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
