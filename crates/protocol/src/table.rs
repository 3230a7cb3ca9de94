//! The column layout of a module snapshot.
//!
//! A cold full sync sends thousands of records of the same shape. Laid out record by record,
//! a compressor sees a product's label next to its price and its barcode; laid out column by
//! column it sees every label together, every price together, and finds far more repetition:
//! on the generated seed-scale store this layout under zstd -19 is about three quarters of
//! the same records as JSON Lines under zstd -19.
//!
//! The layout is lossless for canonical records: each record is rebuilt as `{"k":v,...}` from
//! its keys in sorted order and each value's canonical text, which is exactly the canonical
//! form (keys sorted, no spaces). The box checks the result anyway: every rebuilt record goes
//! through validation and the module digest must match the hub's.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Records of one module, column by column.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordTable {
    pub count: u32,
    /// Every top-level key of any record, sorted; one column each.
    pub keys: Vec<String>,
    pub columns: Vec<Column>,
}

/// One key's values, in record order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Column {
    /// Each value's canonical JSON text, one per line; an empty line where the record has no
    /// such key. Canonical JSON never holds a raw newline, and is never empty.
    Text(String),
    /// Strings made of one prefix and a fixed-width number that grows from record to record,
    /// such as ids `P000001`, `P000002`: kept as the differences between the numbers.
    Serial {
        prefix: String,
        width: u8,
        steps: Vec<u64>,
    },
}

/// Why a table cannot be turned back into records.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TableError {
    #[error("a record is not a JSON object")]
    NotAnObject,
    #[error("the table has {keys} keys but {columns} columns")]
    Shape { keys: usize, columns: usize },
    #[error("column {key:?} has {found} values for {count} records")]
    Length {
        key: String,
        found: usize,
        count: usize,
    },
    #[error("a record has no string id")]
    MissingId,
    #[error("a serial column overflows")]
    Overflow,
}

impl RecordTable {
    /// Lays out canonical records (id, JSON text) in columns.
    pub fn from_records(records: &[(String, String)]) -> Result<RecordTable, TableError> {
        let mut parsed = Vec::with_capacity(records.len());
        let mut keys = std::collections::BTreeSet::new();
        for (_, json) in records {
            let Ok(Value::Object(map)) = serde_json::from_str::<Value>(json) else {
                return Err(TableError::NotAnObject);
            };
            keys.extend(map.keys().cloned());
            parsed.push(map);
        }
        let keys: Vec<String> = keys.into_iter().collect();
        let columns = keys
            .iter()
            .map(|key| {
                let values: Vec<Option<&Value>> = parsed.iter().map(|m| m.get(key)).collect();
                serial(&values).unwrap_or_else(|| {
                    let mut text = String::new();
                    for (i, value) in values.iter().enumerate() {
                        if i > 0 {
                            text.push('\n');
                        }
                        if let Some(value) = value {
                            text.push_str(&value.to_string());
                        }
                    }
                    Column::Text(text)
                })
            })
            .collect();
        Ok(RecordTable {
            count: records.len() as u32,
            keys,
            columns,
        })
    }

    /// Rebuilds the records as (id, canonical JSON text), in table order.
    pub fn into_records(self) -> Result<Vec<(String, String)>, TableError> {
        let count = self.count as usize;
        if self.keys.len() != self.columns.len() {
            return Err(TableError::Shape {
                keys: self.keys.len(),
                columns: self.columns.len(),
            });
        }
        // Check every column's length before allocating anything per record: a count that
        // no column backs must not make the box allocate for it.
        if !self.keys.iter().any(|k| k == "id") && count > 0 {
            return Err(TableError::MissingId);
        }
        for (key, column) in self.keys.iter().zip(&self.columns) {
            let found = match column {
                Column::Text(text) if count == 0 && text.is_empty() => 0,
                Column::Text(text) => text.split('\n').count(),
                Column::Serial { steps, .. } => steps.len(),
            };
            if found != count {
                return Err(TableError::Length {
                    key: key.clone(),
                    found,
                    count,
                });
            }
        }
        let mut texts: Vec<String> = vec![String::from("{"); count];
        let mut ids: Vec<Option<String>> = vec![None; count];
        for (key, column) in self.keys.iter().zip(self.columns) {
            let quoted = Value::String(key.clone()).to_string();
            let values: Vec<String> = match column {
                Column::Text(text) => {
                    if count == 0 {
                        Vec::new()
                    } else {
                        text.split('\n').map(str::to_owned).collect()
                    }
                }
                Column::Serial {
                    prefix,
                    width,
                    steps,
                } => {
                    let mut n: u64 = 0;
                    let mut out = Vec::with_capacity(steps.len());
                    for step in steps {
                        n = n.checked_add(step).ok_or(TableError::Overflow)?;
                        let s = format!("{prefix}{n:0width$}", width = width as usize);
                        out.push(Value::String(s).to_string());
                    }
                    out
                }
            };
            if values.len() != count {
                return Err(TableError::Length {
                    key: key.clone(),
                    found: values.len(),
                    count,
                });
            }
            for (i, value) in values.into_iter().enumerate() {
                if value.is_empty() {
                    continue;
                }
                if key == "id" {
                    if let Ok(Value::String(id)) = serde_json::from_str::<Value>(&value) {
                        ids[i] = Some(id);
                    }
                }
                let text = &mut texts[i];
                if text.len() > 1 {
                    text.push(',');
                }
                text.push_str(&quoted);
                text.push(':');
                text.push_str(&value);
            }
        }
        texts
            .into_iter()
            .zip(ids)
            .map(|(mut text, id)| {
                text.push('}');
                Ok((id.ok_or(TableError::MissingId)?, text))
            })
            .collect()
    }
}

/// The serial form of a column, when every value is a string of one prefix and a number of
/// one width, strictly growing.
fn serial(values: &[Option<&Value>]) -> Option<Column> {
    let mut prefix: Option<&str> = None;
    let mut width = 0usize;
    let mut last: Option<u64> = None;
    let mut steps = Vec::with_capacity(values.len());
    for value in values {
        let Some(Value::String(s)) = value else {
            return None;
        };
        let digits = s.bytes().rev().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 19 {
            return None;
        }
        let (p, number) = s.split_at(s.len() - digits);
        match prefix {
            None => {
                prefix = Some(p);
                width = digits;
            }
            Some(q) if q == p && width == digits => {}
            Some(_) => return None,
        }
        let n: u64 = number.parse().ok()?;
        match last {
            Some(l) if n <= l => return None,
            _ => {}
        }
        steps.push(n - last.unwrap_or(0));
        last = Some(n);
    }
    // A value that needs JSON escaping in its prefix would not rebuild byte for byte.
    let prefix = prefix?;
    if Value::String(prefix.to_owned()).to_string().len() != prefix.len() + 2 {
        return None;
    }
    Some(Column::Serial {
        prefix: prefix.to_owned(),
        width: width as u8,
        steps,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::canonical_record_from_text;

    fn records(texts: &[&str]) -> Vec<(String, String)> {
        texts
            .iter()
            .map(|t| {
                let r = canonical_record_from_text(t).unwrap();
                (r.id, r.json)
            })
            .collect()
    }

    #[test]
    fn records_survive_the_column_layout_byte_for_byte() {
        let input = records(&[
            r#"{"id":"P000001","label":"Pain \"tradition\"\nligne 2","price":120,"tags":["a"]}"#,
            r#"{"id":"P000002","label":"Œufs","price":359,"extra":{"b":null,"a":[1,{"z":2}]}}"#,
            r#"{"id":"P000010","label":"","price":1.5}"#,
        ]);
        let table = RecordTable::from_records(&input).unwrap();
        let id = table.keys.iter().position(|k| k == "id").unwrap();
        assert!(
            matches!(&table.columns[id], Column::Serial { prefix, width: 6, .. } if prefix == "P")
        );
        assert_eq!(table.clone().into_records().unwrap(), input);
    }

    #[test]
    fn irregular_ids_stay_text() {
        let input = records(&[
            r#"{"id":"b7","v":1}"#,
            r#"{"id":"a8","v":2}"#,
            r#"{"id":"hours-monday","v":3}"#,
        ]);
        let table = RecordTable::from_records(&input).unwrap();
        assert!(table.columns.iter().all(|c| matches!(c, Column::Text(_))));
        assert_eq!(table.into_records().unwrap(), input);
        let empty = RecordTable::from_records(&[]).unwrap();
        assert_eq!(empty.into_records().unwrap(), vec![]);
    }

    #[test]
    fn a_damaged_table_is_an_error() {
        let input = records(&[r#"{"id":"a","v":1}"#, r#"{"id":"b","v":2}"#]);
        let mut table = RecordTable::from_records(&input).unwrap();
        table.count = 3;
        assert!(matches!(
            table.clone().into_records(),
            Err(TableError::Length { .. })
        ));
        // A count no column backs is refused before anything is allocated for it.
        let mut huge = table.clone();
        huge.count = u32::MAX;
        assert!(matches!(
            huge.into_records(),
            Err(TableError::Length { .. })
        ));
        let no_id = RecordTable {
            count: u32::MAX,
            keys: vec![],
            columns: vec![],
        };
        assert!(matches!(no_id.into_records(), Err(TableError::MissingId)));
        table.columns.pop();
        assert!(matches!(
            table.into_records(),
            Err(TableError::Shape { .. })
        ));
    }
}
