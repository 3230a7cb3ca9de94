//! The box-hub wire decoder: a zstd frame holding a postcard message, as either side receives
//! it. Must never panic, and never decompress past the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use storebox_protocol as proto;

fuzz_target!(|data: &[u8]| {
    // Small limit: the fuzzer should find bound violations, not spend time inflating.
    if let Ok(raw) = proto::decompress(data, 1 << 20) {
        assert!(raw.len() <= 1 << 20, "decompressed past the limit");
    }
    let _ = proto::decode::<proto::DeltaRequest>(data, "fuzz");
    let _ = proto::decode::<proto::ModulesAnswer>(data, "fuzz");
    let _ = proto::decode::<proto::ActivityBatch>(data, "fuzz");
    // Module payloads are plain postcard inside an answer.
    let _ = proto::decode_plain::<proto::ModuleDelta>(data, "fuzz");
    let _ = proto::decode_plain::<proto::ModuleSnapshot>(data, "fuzz");
});
