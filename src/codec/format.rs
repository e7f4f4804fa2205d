//! One frame → one reading. Which format a port speaks is configured (`serial.ports[].format`).
//!
//! - `raw`: the bytes, unchanged (published as they came),
//! - `value`: one number (`21.4`) → `{"value":21.4}` (plus the port's `unit`),
//! - `json`: a JSON object, optionally reduced to selected fields,
//! - `kv`: `T=21.5 H=40` (separated by spaces, `,` or `;`) → `{"T":21.5,"H":40}`,
//! - `csv`: `21.5,40` with configured column names → `{"temp":21.5,"hum":40}`,
//! - `nmea`: see [`super::nmea`].
//!
//! Numbers become JSON numbers (integers stay integers); anything else stays a string.

use serde_json::{Map, Value};

use super::nmea::{self, NmeaError};

/// A parsed frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// `raw`: publish the bytes as they are.
    Raw(Vec<u8>),
    /// Every structured format: fields of the JSON reading (the timestamp is added on publish).
    Fields(Map<String, Value>),
}

/// How a frame is read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Format {
    Raw,
    Value,
    /// Keep only these fields (all when empty).
    Json {
        fields: Vec<String>,
    },
    Kv,
    Csv {
        columns: Vec<String>,
    },
    Nmea,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("not UTF-8")]
    NotUtf8,
    #[error("not a number: `{0}`")]
    NotANumber(String),
    #[error("not JSON: {0}")]
    Json(String),
    #[error("JSON, but not an object")]
    NotAnObject,
    #[error("none of the selected fields is present")]
    NoSelectedField,
    #[error("`{0}` is not key=value")]
    Kv(String),
    #[error("{got} columns, expected {expected}")]
    Columns { expected: usize, got: usize },
    #[error(transparent)]
    Nmea(#[from] NmeaError),
}

impl ParseError {
    /// A short stable name for per-reason counters.
    pub fn reason(&self) -> &'static str {
        match self {
            ParseError::NotUtf8 => "not_utf8",
            ParseError::NotANumber(_) => "not_a_number",
            ParseError::Json(_) | ParseError::NotAnObject | ParseError::NoSelectedField => {
                "bad_json"
            }
            ParseError::Kv(_) => "bad_kv",
            ParseError::Columns { .. } => "bad_csv",
            ParseError::Nmea(e) => e.reason(),
        }
    }
}

/// Longest text quoted back in an error (errors are logged; frames may be long).
const QUOTE_MAX: usize = 40;

fn quote(s: &str) -> String {
    s.chars().take(QUOTE_MAX).collect()
}

/// Parses one frame (delimiter already removed).
pub fn decode(format: &Format, frame: &[u8]) -> Result<Decoded, ParseError> {
    if let Format::Raw = format {
        return Ok(Decoded::Raw(frame.to_vec()));
    }
    let text = std::str::from_utf8(frame).map_err(|_| ParseError::NotUtf8)?;
    let text = text.trim();
    let fields = match format {
        Format::Raw => unreachable!("handled above"),
        Format::Value => {
            let v = scalar(text);
            if !v.is_number() {
                return Err(ParseError::NotANumber(quote(text)));
            }
            let mut m = Map::new();
            m.insert("value".into(), v);
            m
        }
        Format::Json { fields } => json(text, fields)?,
        Format::Kv => kv(text)?,
        Format::Csv { columns } => csv(text, columns)?,
        Format::Nmea => nmea::parse(text)?,
    };
    Ok(Decoded::Fields(fields))
}

/// A number when the text is one (integers stay integers), else the text as a string.
pub fn scalar(s: &str) -> Value {
    if let Ok(i) = s.parse::<i64>() {
        return Value::from(i);
    }
    // `inf`, `nan` and friends parse as f64 but are not JSON numbers: they stay strings.
    if s.bytes().any(|b| b.is_ascii_digit())
        && !s
            .bytes()
            .any(|b| b.is_ascii_alphabetic() && b != b'e' && b != b'E')
    {
        if let Some(n) = s.parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return Value::Number(n);
        }
    }
    Value::String(s.to_string())
}

fn json(text: &str, select: &[String]) -> Result<Map<String, Value>, ParseError> {
    let v: Value = serde_json::from_str(text).map_err(|e| ParseError::Json(e.to_string()))?;
    let Value::Object(mut obj) = v else {
        return Err(ParseError::NotAnObject);
    };
    if select.is_empty() {
        return Ok(obj);
    }
    let mut out = Map::new();
    for f in select {
        if let Some(v) = obj.remove(f) {
            out.insert(f.clone(), v);
        }
    }
    if out.is_empty() {
        return Err(ParseError::NoSelectedField);
    }
    Ok(out)
}

fn kv(text: &str) -> Result<Map<String, Value>, ParseError> {
    let mut out = Map::new();
    for pair in text
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair
            .split_once('=')
            .or_else(|| pair.split_once(':'))
            .filter(|(k, v)| !k.is_empty() && !v.is_empty())
            .ok_or_else(|| ParseError::Kv(quote(pair)))?;
        out.insert(k.to_string(), scalar(v));
    }
    if out.is_empty() {
        return Err(ParseError::Kv(String::new()));
    }
    Ok(out)
}

fn csv(text: &str, columns: &[String]) -> Result<Map<String, Value>, ParseError> {
    let values: Vec<&str> = text.split(',').map(str::trim).collect();
    if values.len() != columns.len() {
        return Err(ParseError::Columns {
            expected: columns.len(),
            got: values.len(),
        });
    }
    Ok(columns
        .iter()
        .zip(values)
        // An empty cell is a missing reading, not the string "".
        .filter(|(_, v)| !v.is_empty())
        .map(|(c, v)| (c.clone(), scalar(v)))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn fields(format: &Format, s: &str) -> Map<String, Value> {
        match decode(format, s.as_bytes()) {
            Ok(Decoded::Fields(f)) => f,
            other => panic!("{s}: {other:?}"),
        }
    }

    #[test]
    fn kv_lines_become_numbers_and_strings() {
        let f = fields(&Format::Kv, "T=21.5 H=40 status=ok");
        assert_eq!(
            Value::Object(f),
            serde_json::json!({"T":21.5,"H":40,"status":"ok"})
        );
        assert_eq!(
            decode(&Format::Kv, b"T=21.5 junk").map_err(|e| e.reason()),
            Err("bad_kv")
        );
    }

    #[test]
    fn csv_columns_are_named_and_counted() {
        let cols = Format::Csv {
            columns: vec!["temp".into(), "hum".into()],
        };
        assert_eq!(
            Value::Object(fields(&cols, "21.5, 40")),
            serde_json::json!({"temp":21.5,"hum":40})
        );
        assert_eq!(
            decode(&cols, b"1,2,3"),
            Err(ParseError::Columns {
                expected: 2,
                got: 3
            })
        );
    }

    #[test]
    fn json_objects_can_be_reduced_to_selected_fields() {
        let sel = Format::Json {
            fields: vec!["t".into()],
        };
        assert_eq!(
            Value::Object(fields(&sel, r#"{"t":1,"x":2}"#)),
            serde_json::json!({"t":1})
        );
        assert_eq!(decode(&sel, b"[1]"), Err(ParseError::NotAnObject));
        assert_eq!(
            decode(&sel, br#"{"x":2}"#),
            Err(ParseError::NoSelectedField)
        );
    }

    #[test]
    fn values_must_be_numbers_and_text_must_be_utf8() {
        assert_eq!(
            Value::Object(fields(&Format::Value, " 21.4 ")),
            serde_json::json!({"value":21.4})
        );
        assert_eq!(
            decode(&Format::Value, b"nan").map_err(|e| e.reason()),
            Err("not_a_number")
        );
        assert_eq!(
            decode(&Format::Value, b"inf").map_err(|e| e.reason()),
            Err("not_a_number")
        );
        assert_eq!(
            decode(&Format::Kv, b"T=\xff").map_err(|e| e.reason()),
            Err("not_utf8")
        );
        assert_eq!(
            decode(&Format::Raw, b"\xff\x00"),
            Ok(Decoded::Raw(vec![0xff, 0]))
        );
    }

    fn all_formats() -> Vec<Format> {
        vec![
            Format::Raw,
            Format::Value,
            Format::Json { fields: vec![] },
            Format::Json {
                fields: vec!["a".into()],
            },
            Format::Kv,
            Format::Csv {
                columns: vec!["a".into(), "b".into()],
            },
            Format::Nmea,
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic_any_format(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            for f in all_formats() {
                let _ = decode(&f, &bytes);
            }
        }

        #[test]
        fn kv_round_trips(pairs in prop::collection::btree_map("[A-Za-z_][A-Za-z0-9_]{0,8}", -1e9f64..1e9, 1..8)) {
            let line: Vec<String> = pairs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            let got = fields(&Format::Kv, &line.join(" "));
            prop_assert_eq!(got.len(), pairs.len());
            for (k, v) in &pairs {
                prop_assert_eq!(got[k].as_f64(), Some(*v));
            }
        }

        #[test]
        fn csv_round_trips(values in prop::collection::vec(-1_000_000i64..1_000_000, 1..8)) {
            let columns: Vec<String> = (0..values.len()).map(|i| format!("c{i}")).collect();
            let line: Vec<String> = values.iter().map(i64::to_string).collect();
            let got = fields(&Format::Csv { columns: columns.clone() }, &line.join(","));
            for (c, v) in columns.iter().zip(&values) {
                prop_assert_eq!(got[c].as_i64(), Some(*v));
            }
        }

        #[test]
        fn json_objects_round_trip(obj in prop::collection::btree_map("[a-z]{1,6}", any::<i32>(), 1..8)) {
            let text = serde_json::to_string(&obj).expect("a map of ints serializes");
            let got = fields(&Format::Json { fields: vec![] }, &text);
            let want: Map<String, Value> = obj.iter().map(|(k, v)| (k.clone(), Value::from(*v))).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn values_round_trip(v in -1e12f64..1e12) {
            let got = fields(&Format::Value, &v.to_string());
            prop_assert_eq!(got["value"].as_f64(), Some(v));
        }
    }
}
