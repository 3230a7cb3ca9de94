//! The till API's activity parser, in the order `POST /v1/activity` applies it: the
//! depth-limited JSON parse, then the canonical record.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let depth = storebox_http::json_depth(data);
    match storebox_http::parse_json::<serde_json::Value>(data) {
        Ok(value) => {
            assert!(depth <= storebox_http::MAX_JSON_DEPTH);
            let _ = storebox_protocol::canonical_record(&value);
        }
        Err(_) => {}
    }
});
