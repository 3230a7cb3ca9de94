//! The admin API's NDJSON import parser: every line a record with a string id, canonicalised.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(records) = storehub::admin_api::parse_ndjson(data) {
        for record in records {
            // Canonical form is a fixed point: parsing it again changes nothing.
            let again = storebox_protocol::canonical_record_from_text(&record.json)
                .expect("a canonical record parses again");
            assert_eq!(again.json, record.json);
            assert_eq!(again.id, record.id);
        }
    }
});
