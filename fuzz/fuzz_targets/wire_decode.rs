//! The box-hub wire decoder, as either side receives it: requests (a zstd frame holding a
//! postcard message), answers (plain postcard whose module payloads are zstd frames each),
//! and what a box rebuilds from a snapshot's column table or applies as a merge patch. Must
//! never panic, and never decompress past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storebox_protocol as proto;

fuzz_target!(|data: &[u8]| {
    // Small limit: the fuzzer should find bound violations, not spend time inflating.
    if let Ok(raw) = proto::decompress(data, 1 << 20) {
        assert!(raw.len() <= 1 << 20, "decompressed past the limit");
    }
    let _ = proto::decode::<proto::DeltaRequest>(data, "fuzz");
    let _ = proto::decode::<proto::FullRequest>(data, "fuzz");
    let _ = proto::decode::<proto::RepairRequest>(data, "fuzz");
    let _ = proto::decode::<proto::WatchRequest>(data, "fuzz");
    let _ = proto::decode::<proto::ActivityBatch>(data, "fuzz");
    let _ = proto::decode_plain::<proto::ModulesAnswer>(data, "fuzz");
    let _ = proto::decode_plain::<proto::ModuleDelta>(data, "fuzz");
    // A snapshot's table is rebuilt into records on the box: any table must give records or
    // an error, never a panic.
    if let Ok(proto::ModuleSnapshot::Records { table, .. }) =
        proto::decode_plain::<proto::ModuleSnapshot>(data, "fuzz")
    {
        let _ = table.into_records();
    }
    // Merge patches from the hub applied to a record.
    if let Ok(patch) = serde_json::from_slice::<serde_json::Value>(data) {
        let mut record = serde_json::json!({"id": "x", "price": 1, "nested": {"a": [1]}});
        proto::patch::apply(&mut record, &patch);
        let _ = proto::patch::diff(&serde_json::json!({"id": "x"}), &record);
    }
});
