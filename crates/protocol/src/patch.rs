//! JSON merge patches (RFC 7386) between two versions of a record.
//!
//! A day's change to a product is usually one field: its price. Sending the whole record
//! again costs ten times what the change carries; a merge patch against the version the box
//! already holds costs the field alone. Both sides hold canonical JSON, so applying a patch to
//! the exact base and canonicalising gives the exact new record, byte for byte.

use serde_json::{Map, Value};

/// The merge patch that turns `old` into `new`, or `None` when a merge patch cannot say it
/// (a value that becomes `null`: in a merge patch `null` means "remove") or when the records
/// are not objects. The caller then sends the whole record.
pub fn diff(old: &Value, new: &Value) -> Option<Value> {
    let (Value::Object(old), Value::Object(new)) = (old, new) else {
        return None;
    };
    diff_objects(old, new).map(Value::Object)
}

fn diff_objects(old: &Map<String, Value>, new: &Map<String, Value>) -> Option<Map<String, Value>> {
    let mut patch = Map::new();
    for key in old.keys() {
        if !new.contains_key(key) {
            patch.insert(key.clone(), Value::Null);
        }
    }
    for (key, after) in new {
        match old.get(key) {
            Some(before) if before == after => {}
            Some(Value::Object(b)) if after.is_object() => {
                let Value::Object(a) = after else { return None };
                patch.insert(key.clone(), Value::Object(diff_objects(b, a)?));
            }
            _ => {
                if contains_null(after) {
                    return None;
                }
                patch.insert(key.clone(), after.clone());
            }
        }
    }
    Some(patch)
}

/// Whether `value` holds a `null` a merge patch would read as a removal. Nulls inside arrays
/// are fine: arrays are replaced whole.
fn contains_null(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::Object(map) => map.values().any(contains_null),
        _ => false,
    }
}

/// Applies a merge patch to `target` (RFC 7386, section 2).
pub fn apply(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(map) = target {
        for (key, value) in patch {
            if value.is_null() {
                map.remove(key);
            } else {
                apply(map.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn round_trip(old: Value, new: Value) -> Option<Value> {
        let patch = diff(&old, &new)?;
        let mut patched = old.clone();
        apply(&mut patched, &patch);
        assert_eq!(patched, new, "patch {patch} of {old} must give {new}");
        Some(patch)
    }

    #[test]
    fn a_price_change_is_the_price_alone() {
        let patch = round_trip(
            json!({"id":"P1","label":"Pain","price_cents":120,"stock":3}),
            json!({"id":"P1","label":"Pain","price_cents":135,"stock":3}),
        )
        .unwrap();
        assert_eq!(patch.to_string(), r#"{"price_cents":135}"#);
    }

    #[test]
    fn removed_added_and_nested_fields() {
        let patch = round_trip(
            json!({"id":"s","a":{"x":1,"y":2},"gone":true,"list":[1,2]}),
            json!({"id":"s","a":{"x":1,"z":3},"new":"n","list":[2]}),
        )
        .unwrap();
        assert_eq!(
            patch,
            json!({"a":{"y":null,"z":3},"gone":null,"new":"n","list":[2]})
        );
        round_trip(json!({"id":"s","a":1}), json!({"id":"s","a":{"b":[null]}})).unwrap();
    }

    #[test]
    fn a_new_null_value_cannot_be_a_patch() {
        assert!(diff(&json!({"id":"a","v":1}), &json!({"id":"a","v":null})).is_none());
        assert!(diff(&json!({"id":"a"}), &json!({"id":"a","o":{"k":null}})).is_none());
        assert!(diff(&json!([1]), &json!({"id":"a"})).is_none());
    }

    #[test]
    fn identical_records_give_an_empty_patch() {
        assert_eq!(
            round_trip(json!({"id":"a","v":[1]}), json!({"id":"a","v":[1]})).unwrap(),
            json!({})
        );
    }
}
