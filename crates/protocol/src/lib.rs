//! The wire protocol between a storebox and storehub, version 3 (and the messages of version
//! 2 a hub still serves, in [`v2`]).
//!
//! This crate owns the message types, their encoding (postcard, then zstd) and the rules both
//! sides share: the paths, the names a module or record may have, the canonical form of a
//! record. It knows nothing about sockets, HTTP libraries or storage: both binaries wrap it.
//! The reasoning behind each choice is in `docs/PROTOCOL.md`.
//!
//! Two rules shape the types:
//! - **Modules are independent.** Every answer that carries data for several modules carries
//!   each module in its own [`ModuleFrame`], encoded separately, so that a payload one side
//!   cannot decode spoils that module only.
//! - **Records are opaque JSON text** on the wire, in canonical form (sorted keys, no spaces),
//!   so a record that fails validation on the box is quarantined alone and the hub never has
//!   to know the shape of a shop's data.

use std::io::Read;

pub mod ota;
pub mod patch;
pub mod table;
pub mod v2;

pub use table::{Column, RecordTable, TableError};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version spoken by this crate. Sent by the box in [`HEADER_PROTOCOL`].
///
/// Version 3 changed two messages, the full sync's and the acknowledgement's, so those two
/// calls have new paths; every other call is the same message at the same path as in
/// version 2. A hub serves both versions (docs/PROTOCOL.md, "Versioning").
pub const PROTOCOL_VERSION: u16 = 3;

/// Header carrying [`PROTOCOL_VERSION`] on every request, so the hub can refuse or adapt.
pub const HEADER_PROTOCOL: &str = "storebox-protocol";

/// Media type of every sync request and answer body: a zstd frame holding a postcard message.
/// It names the encoding, which has not changed since version 2.
pub const CONTENT_TYPE: &str = "application/vnd.storebox.v2+postcard";

/// Path of the delta pull: the box sends its cursors, the hub answers with what changed.
pub const PATH_DELTA: &str = "/sync/v2/delta";
/// Path of the full sync: the box sends its digests and status, the hub answers a
/// [`FullAnswer`] with a snapshot of every requested module.
pub const PATH_FULL: &str = "/sync/v3/full";
/// Path of the repair step of a full sync: the box lists what it holds in the buckets whose
/// hashes differ, the hub answers with the records to put and delete.
pub const PATH_REPAIR: &str = "/sync/v2/repair";
/// Path of the change watch: held open by the hub until a module changes.
pub const PATH_WATCH: &str = "/sync/v2/watch";
/// Path of the activity push: the box sends events recorded in the shop.
pub const PATH_ACTIVITY: &str = "/sync/v2/activity";
/// Path of the acknowledgement: the box tells the hub which cursors it has applied, and its
/// status.
pub const PATH_ACK: &str = "/sync/v3/ack";

/// zstd level of module payloads: these are small (a delta) or cached by the hub (a
/// snapshot), so the slowest level costs little time and saves the shop's link.
pub const PAYLOAD_ZSTD_LEVEL: i32 = 19;

/// Largest decoded module payload either side accepts.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024 * 1024;

/// Largest decoded message either side accepts, a guard against decompression bombs.
pub const MAX_DECODED_BYTES: usize = 256 * 1024 * 1024;

/// Largest record id, in bytes.
pub const MAX_ID_BYTES: usize = 256;

/// Errors of encoding and decoding a message.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("could not encode the message: {0}")]
    Encode(#[source] postcard::Error),
    #[error("could not compress the message: {0}")]
    Compress(#[source] std::io::Error),
    #[error("the body is not a valid zstd frame: {0}")]
    Decompress(#[source] std::io::Error),
    #[error("the body decompresses to more than {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the message does not decode as {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: postcard::Error,
    },
}

/// What the box asks in a delta pull: its cursor for every module it knows.
///
/// The hub answers every module of the store except those in `skip`; modules the box does
/// not list are answered from cursor 0, which is how a module added on the hub reaches the
/// box without a full sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeltaRequest {
    pub cursors: Vec<ModuleCursor>,
    /// Modules the box is backing off from after a failure.
    pub skip: Vec<String>,
    /// Most changes per module in one answer; the hub may send fewer and set `more`.
    pub limit: u32,
}

/// A module's cursor: the change sequence number up to which the box has applied changes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleCursor {
    pub module: String,
    pub cursor: u64,
}

/// What the box asks in a full sync (version 3: [`v2::FullRequest`] plus `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullRequest {
    /// Modules to snapshot; empty means every module of the store.
    pub modules: Vec<String>,
    /// What the box holds of each module it has, computed over the bytes it actually
    /// stores. A module whose digest and cursor match the hub's is answered `Unchanged`:
    /// a full sync that finds nothing to do costs a few hundred bytes, not the whole store.
    pub digests: Vec<ModuleDigest>,
    /// Modules the box wants as whole record sets whatever it holds: the last resort when
    /// reconciliation did not make them equal.
    pub records: Vec<String>,
    /// What the box would acknowledge: when every module turns out unchanged, the hub records
    /// it (with the cursors of `digests`) as the box's acknowledgement, and a full sync that
    /// finds nothing to do costs one round trip.
    pub status: BoxStatus,
}

/// A box's own state, for the hub's fleet view.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BoxStatus {
    /// Activity events the box holds that the hub has not acknowledged yet.
    pub pending_activity: u64,
    /// The box software version.
    pub box_version: String,
    /// Every module whose last sync failed, with the error (at most [`MAX_ERROR_BYTES`]).
    pub errors: Vec<ModuleError>,
}

/// Longest error text a box reports for one module; longer ones are cut.
pub const MAX_ERROR_BYTES: usize = 512;

/// A module's last sync error, as the box saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleError {
    pub module: String,
    pub error: String,
}

/// The hub's answer to a full sync (version 3): the modules' frames, as in a
/// [`ModulesAnswer`], and what the hub tells the box about its schedule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FullAnswer {
    /// The hub's clock when it built the answer, in milliseconds since the Unix epoch.
    pub hub_time_ms: i64,
    pub frames: Vec<ModuleFrame>,
    /// Every module was unchanged and the hub recorded the request's status as the box's
    /// acknowledgement: the box need not send one.
    pub acknowledged: bool,
    /// When the box's daily full sync should start, in seconds after local midnight (below
    /// 86,400): the box's slot in the hub's fleet window. `None`: the hub sets no slot.
    pub full_sync_at_s: Option<u32>,
}

/// The repair step of a full sync, after a [`ModuleSnapshot::Buckets`] answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepairRequest {
    pub module: String,
    /// The number of buckets of the hub's answer.
    pub bucket_count: u32,
    /// Buckets whose hashes differ between box and hub.
    pub buckets: Vec<u32>,
    /// Every record the box holds in those buckets: its id and [`record_hash`].
    pub held: Vec<(String, u64)>,
}

/// Waits for a change: the hub answers when a module moves past the box's cursor, or after
/// `wait_ms` with nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub cursors: Vec<ModuleCursor>,
    pub wait_ms: u64,
}

/// The modules that moved past the box's cursors; empty when the wait ran out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchAnswer {
    pub changed: Vec<String>,
}

/// A module's content in a few bytes: its cursor and the [`Digest`] of its records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleDigest {
    pub module: String,
    pub cursor: u64,
    pub digest: Digest,
}

/// An order-independent digest of a set of records: their count, and the wrapping sum and
/// the XOR of a 64-bit hash of each (id, canonical JSON). Equal sets give equal digests
/// whatever the order they are read in; a changed, missing or extra record changes it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    pub count: u64,
    pub sum: u64,
    pub xor: u64,
}

impl Digest {
    /// Adds one record.
    pub fn add(&mut self, id: &str, json: &str) {
        self.add_hash(record_hash(id, json));
    }

    /// Adds one record by its [`record_hash`].
    pub fn add_hash(&mut self, h: u64) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(h);
        self.xor ^= h;
    }

    /// The digest folded into one word, for bucket hashes.
    pub fn fold(&self) -> u64 {
        self.xor ^ self.sum.rotate_left(29) ^ self.count.wrapping_mul(0x9E37_79B9_7F4A_7C15)
    }
}

/// How many buckets the hub cuts a module of `count` records into for reconciliation: about
/// 64 records per bucket, so one damaged record costs the box a list of some 64 ids, and the
/// bucket hashes of a 5,000-record module fit in 1 KiB.
pub fn bucket_count_for(count: u64) -> u32 {
    (count / 64).clamp(1, 1024).next_power_of_two() as u32
}

/// The bucket of a record: from its id alone, so a changed record stays in its bucket.
pub fn bucket_of(id: &str, bucket_count: u32) -> u32 {
    (record_hash(id, "") % u64::from(bucket_count.max(1))) as u32
}

/// The folded digest of every bucket of a set of records, given as (id, record hash).
pub fn bucket_hashes<'a>(
    records: impl IntoIterator<Item = (&'a str, u64)>,
    bucket_count: u32,
) -> Vec<u64> {
    let mut digests = vec![Digest::default(); bucket_count.max(1) as usize];
    for (id, hash) in records {
        digests[bucket_of(id, bucket_count) as usize].add_hash(hash);
    }
    digests.iter().map(Digest::fold).collect()
}

/// The 64-bit hash of a record: the first 8 bytes of SHA-256 over its id, a zero byte, and
/// its canonical JSON.
pub fn record_hash(id: &str, json: &str) -> u64 {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(id.as_bytes());
    ctx.update(&[0]);
    ctx.update(json.as_bytes());
    let digest = ctx.finish();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.as_ref()[..8]);
    u64::from_le_bytes(first)
}

/// An answer carrying one frame per module. Used by both delta pull and full sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModulesAnswer {
    /// The hub's clock when it built the answer, in milliseconds since the Unix epoch.
    pub hub_time_ms: i64,
    pub frames: Vec<ModuleFrame>,
}

/// One module's part of an answer. `payload` is a [`ModuleDelta`] (delta pull) or a
/// [`ModuleSnapshot`] (full sync), encoded by [`encode`] on its own, kept as bytes so that one
/// module the box cannot decode does not stop the others, and so its size on the wire is
/// known module by module.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleFrame {
    pub module: String,
    /// Record fields the box indexes for lookups, e.g. `ean13` for the catalog.
    pub indexes: Vec<String>,
    pub payload: Vec<u8>,
}

/// A module's changes since the box's cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleDelta {
    /// Changes in sequence order; applying them moves the box's cursor to `cursor`.
    Changes {
        changes: Vec<Change>,
        cursor: u64,
        /// More changes wait beyond `cursor`: ask again at once.
        more: bool,
        /// The hub's digest of the module at `cursor`, when `more` is false: the box checks
        /// that applying the changes gave it exactly the hub's records.
        digest: Option<Digest>,
    },
    /// The box's cursor is older than the oldest deletion the hub still remembers: only a
    /// full sync of this module can make it exact.
    ResetNeeded,
    /// The hub could not serve this module; the others are unaffected.
    Failed { error: String },
}

/// One change of one record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub id: String,
    pub body: ChangeBody,
}

/// What became of a record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeBody {
    /// The record's whole canonical JSON text.
    Put(String),
    /// A JSON merge patch (RFC 7386) against the version the box holds at its cursor: the
    /// hub sends one only when it knows that version, and the module digest checks it.
    Patch(String),
    Delete,
}

/// A module's whole content at one cursor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModuleSnapshot {
    /// Every live record, in id order, laid out in columns.
    Records {
        table: RecordTable,
        /// The module's change sequence at the time of the snapshot.
        cursor: u64,
        digest: Digest,
    },
    /// The box's digest and cursor match the hub's: nothing to send.
    Unchanged {
        cursor: u64,
    },
    /// The box's cursor is one the hub can still serve changes from: these changes, then
    /// the digest check, make the module exact for the price of a delta.
    Changes {
        changes: Vec<Change>,
        cursor: u64,
        digest: Digest,
    },
    /// The box's records differ from the hub's in ways a delta cannot tell: the hub's hash
    /// of each bucket, for the box to find which differ and ask by [`RepairRequest`].
    Buckets {
        cursor: u64,
        digest: Digest,
        buckets: Vec<u64>,
    },
    Failed {
        error: String,
    },
}

/// Activity events pushed by the box, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityBatch {
    pub events: Vec<PushedEvent>,
}

/// One event as recorded by the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushedEvent {
    /// The till's idempotency key: the hub stores each id once per store.
    pub id: String,
    /// When the box received it, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// The event as the till sent it, canonical JSON text.
    pub event: String,
}

/// The hub's answer to an activity push. The events are durable at the hub when it is sent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActivityAck {
    /// Events stored for the first time.
    pub accepted: u32,
    /// Events whose id the hub already had.
    pub duplicates: u32,
}

/// The cursors a box has applied, sent after a full sync so the hub's view of the box is true
/// even when delta pulls are switched off (version 3: [`v2::Ack`] plus `errors`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    pub cursors: Vec<ModuleCursor>,
    /// Activity events the box holds that the hub has not acknowledged yet.
    pub pending_activity: u64,
    /// The box software version, for the fleet view.
    pub box_version: String,
    /// Every module whose last sync failed, for the fleet view; empty when all are well.
    pub errors: Vec<ModuleError>,
}

impl Ack {
    /// The acknowledgement a box's status and cursors make.
    pub fn new(cursors: Vec<ModuleCursor>, status: BoxStatus) -> Ack {
        Ack {
            cursors,
            pending_activity: status.pending_activity,
            box_version: status.box_version,
            errors: status.errors,
        }
    }
}

/// Encodes a message as postcard, then compresses it as one zstd frame at `level`.
pub fn encode<T: Serialize>(message: &T, level: i32) -> Result<Vec<u8>, WireError> {
    let raw = postcard::to_stdvec(message).map_err(WireError::Encode)?;
    // One-shot, with the input's size known: zstd then sizes its window and tables to the
    // input. A streaming compressor at a high level sets up tens of megabytes and a tenth of
    // a second of work for any input, even a few bytes (measured under fleet load).
    zstd::bulk::compress(&raw, level).map_err(WireError::Compress)
}

/// Decompresses one zstd frame, refusing to produce more than `limit` bytes.
pub fn decompress(body: &[u8], limit: usize) -> Result<Vec<u8>, WireError> {
    let decoder = zstd::stream::read::Decoder::new(body).map_err(WireError::Decompress)?;
    let mut out = Vec::new();
    decoder
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(WireError::Decompress)?;
    if out.len() > limit {
        return Err(WireError::TooLarge { limit });
    }
    Ok(out)
}

/// Decodes a body made by [`encode`].
pub fn decode<T: DeserializeOwned>(body: &[u8], what: &'static str) -> Result<T, WireError> {
    let raw = decompress(body, MAX_DECODED_BYTES)?;
    decode_plain(&raw, what)
}

/// Decodes a module payload made by [`encode`], bounded by [`MAX_PAYLOAD_BYTES`].
pub fn decode_payload<T: DeserializeOwned>(
    payload: &[u8],
    what: &'static str,
) -> Result<T, WireError> {
    let raw = decompress(payload, MAX_PAYLOAD_BYTES)?;
    decode_plain(&raw, what)
}

/// Encodes without compression: an answer whose frames are compressed one by one.
pub fn encode_plain<T: Serialize>(message: &T) -> Result<Vec<u8>, WireError> {
    postcard::to_stdvec(message).map_err(WireError::Encode)
}

/// Decodes a message made by [`encode_plain`].
pub fn decode_plain<T: DeserializeOwned>(raw: &[u8], what: &'static str) -> Result<T, WireError> {
    postcard::from_bytes(raw).map_err(|source| WireError::Decode { what, source })
}

/// Whether `name` can name a module: 1 to 64 of `a-z`, `0-9`, `_` and `-`.
///
/// Module names appear in URL paths and storage keys on both sides, so they are kept plain.
pub fn is_valid_module_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Why a JSON value cannot be stored as a record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("not valid JSON: {0}")]
    Json(String),
    #[error("a record must be a JSON object")]
    NotAnObject,
    #[error("a record needs a string \"id\"")]
    MissingId,
    #[error("the id must be 1 to {MAX_ID_BYTES} bytes without control characters")]
    BadId,
}

/// A record checked and put in canonical form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CanonicalRecord {
    pub id: String,
    /// Canonical JSON: keys sorted, no insignificant white space.
    pub json: String,
}

/// Checks that `value` is an object with a valid string `id` and returns its canonical form.
///
/// Canonical form makes "unchanged" a byte comparison on both sides, which is what lets the
/// hub skip writes and the box skip re-applying identical records.
pub fn canonical_record(value: &serde_json::Value) -> Result<CanonicalRecord, RecordError> {
    let object = value.as_object().ok_or(RecordError::NotAnObject)?;
    let id = object
        .get("id")
        .and_then(|id| id.as_str())
        .ok_or(RecordError::MissingId)?;
    if !is_valid_id(id) {
        return Err(RecordError::BadId);
    }
    // serde_json's map is a BTreeMap (the `preserve_order` feature is not enabled anywhere in
    // the workspace), so serialising sorts keys at every depth.
    let json = serde_json::to_string(value).map_err(|e| RecordError::Json(e.to_string()))?;
    Ok(CanonicalRecord {
        id: id.to_owned(),
        json,
    })
}

/// Parses JSON text and returns the record's canonical form.
pub fn canonical_record_from_text(text: &str) -> Result<CanonicalRecord, RecordError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| RecordError::Json(e.to_string()))?;
    canonical_record(&value)
}

/// Whether `id` can identify a record or an activity event.
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && !id.chars().any(char::is_control)
}

/// Parses a duration as both config files write it: "30d", "12h", "5m", "30s", or a plain
/// number of seconds.
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} does not start with a number"))?;
    let factor = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (use s, m, h or d)"
            ))
        }
    };
    n.checked_mul(factor)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{text:?} is too long"))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_through_encode_and_decode() {
        let delta = ModuleDelta::Changes {
            changes: vec![
                Change {
                    id: "P1".into(),
                    body: ChangeBody::Put(r#"{"id":"P1"}"#.into()),
                },
                Change {
                    id: "P2".into(),
                    body: ChangeBody::Patch(r#"{"p":2}"#.into()),
                },
                Change {
                    id: "P3".into(),
                    body: ChangeBody::Delete,
                },
            ],
            cursor: 8,
            more: false,
            digest: Some(Digest::default()),
        };
        let answer = ModulesAnswer {
            hub_time_ms: 1,
            frames: vec![ModuleFrame {
                module: "catalog".into(),
                indexes: vec!["ean13".into()],
                payload: encode(&delta, PAYLOAD_ZSTD_LEVEL).unwrap(),
            }],
        };
        let body = encode_plain(&answer).unwrap();
        let back: ModulesAnswer = decode_plain(&body, "answer").unwrap();
        assert_eq!(back, answer);
        let inner: ModuleDelta = decode_payload(&back.frames[0].payload, "delta").unwrap();
        assert_eq!(inner, delta);
    }

    #[test]
    fn buckets_follow_ids_and_see_a_changed_record() {
        assert_eq!(bucket_count_for(0), 1);
        assert_eq!(bucket_count_for(5_000), 128);
        assert_eq!(bucket_count_for(10_000_000), 1024);
        let records: Vec<(String, u64)> = (0..500)
            .map(|i| (format!("P{i:06}"), record_hash(&format!("P{i:06}"), "{}")))
            .collect();
        let n = bucket_count_for(records.len() as u64);
        let hashes = bucket_hashes(records.iter().map(|(id, h)| (id.as_str(), *h)), n);
        let mut changed = records.clone();
        changed[42].1 ^= 1;
        let other = bucket_hashes(changed.iter().map(|(id, h)| (id.as_str(), *h)), n);
        let differing: Vec<usize> = (0..n as usize).filter(|&b| hashes[b] != other[b]).collect();
        assert_eq!(differing, vec![bucket_of("P000042", n) as usize]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(matches!(
            decode::<ModulesAnswer>(b"not zstd", "answer"),
            Err(WireError::Decompress(_))
        ));
        let body = zstd::encode_all(&[0xff_u8; 16][..], 1).unwrap();
        assert!(matches!(
            decode::<ModulesAnswer>(&body, "answer"),
            Err(WireError::Decode { .. })
        ));
    }

    #[test]
    fn decompression_is_bounded() {
        let body = zstd::encode_all(&vec![0_u8; 10_000][..], 1).unwrap();
        assert!(matches!(
            decompress(&body, 1000),
            Err(WireError::TooLarge { limit: 1000 })
        ));
        assert_eq!(decompress(&body, 10_000).unwrap().len(), 10_000);
    }

    #[test]
    fn canonical_form_sorts_keys_and_checks_the_id() {
        let r = canonical_record_from_text(r#"{ "b": 1, "id": "x", "a": {"z":1,"y":2} }"#).unwrap();
        assert_eq!(r.id, "x");
        assert_eq!(r.json, r#"{"a":{"y":2,"z":1},"b":1,"id":"x"}"#);
        assert_eq!(
            canonical_record_from_text("[1]"),
            Err(RecordError::NotAnObject)
        );
        assert_eq!(
            canonical_record_from_text(r#"{"id":3}"#),
            Err(RecordError::MissingId)
        );
        assert_eq!(
            canonical_record_from_text(r#"{"id":""}"#),
            Err(RecordError::BadId)
        );
        assert!(matches!(
            canonical_record_from_text("{"),
            Err(RecordError::Json(_))
        ));
    }

    #[test]
    fn digests_ignore_order_and_see_any_change() {
        let mut a = Digest::default();
        a.add("1", r#"{"id":"1"}"#);
        a.add("2", r#"{"id":"2","p":1}"#);
        let mut b = Digest::default();
        b.add("2", r#"{"id":"2","p":1}"#);
        b.add("1", r#"{"id":"1"}"#);
        assert_eq!(a, b);
        let mut c = Digest::default();
        c.add("1", r#"{"id":"1"}"#);
        c.add("2", r#"{"id":"2","p":2}"#);
        assert_ne!(a, c);
        let mut d = a;
        d.add("3", r#"{"id":"3"}"#);
        assert_ne!(a, d);
    }

    #[test]
    fn durations_parse_with_units() {
        assert_eq!(parse_duration("5m").unwrap().as_secs(), 300);
        assert_eq!(parse_duration("45").unwrap().as_secs(), 45);
        assert_eq!(parse_duration("30s").unwrap().as_secs(), 30);
        assert_eq!(parse_duration("2d").unwrap().as_secs(), 172_800);
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("m").is_err());
    }

    #[test]
    fn module_names_are_plain() {
        assert!(is_valid_module_name("catalog"));
        assert!(is_valid_module_name("stock_levels-2"));
        assert!(!is_valid_module_name(""));
        assert!(!is_valid_module_name("Catalog"));
        assert!(!is_valid_module_name("a/b"));
        assert!(!is_valid_module_name(&"a".repeat(65)));
    }
}
