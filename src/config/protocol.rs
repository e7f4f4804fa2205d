//! `Protocol`: the MQTT version of a listener or of the uplink (4, i.e. 3.1.1, or 5), with the
//! spellings the file accepts.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[default]
    V4,
    /// MQTT 5.
    V5,
}

impl Protocol {
    /// The MQTT protocol level byte: 4 or 5.
    pub fn level(self) -> u8 {
        match self {
            Protocol::V4 => 4,
            Protocol::V5 => 5,
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Protocol::V4 => "3.1.1",
            Protocol::V5 => "5",
        })
    }
}

impl<'de> Deserialize<'de> for Protocol {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Protocol;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an MQTT protocol version: 4 (or \"3.1.1\") or 5")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Protocol, E> {
                match v {
                    4 => Ok(Protocol::V4),
                    5 => Ok(Protocol::V5),
                    other => Err(E::custom(format!(
                        "unsupported MQTT protocol version {other}: use 4 (MQTT 3.1.1) or 5"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Protocol, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(format!(
                        "unsupported MQTT protocol version {v}: use 4 (MQTT 3.1.1) or 5"
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Protocol, E> {
                match v.trim() {
                    "4" | "3.1.1" => Ok(Protocol::V4),
                    "5" => Ok(Protocol::V5),
                    other => Err(E::custom(format!(
                        "unsupported MQTT protocol version `{other}`: use 4 (or \"3.1.1\") or 5"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_accepts_the_usual_spellings_of_3_1_1_and_5() {
        for (yaml, expected) in [
            ("4", Protocol::V4),
            ("\"4\"", Protocol::V4),
            ("3.1.1", Protocol::V4),
            ("\"3.1.1\"", Protocol::V4),
            ("5", Protocol::V5),
            ("\"5\"", Protocol::V5),
        ] {
            let p: Protocol = serde_yaml::from_str(yaml).expect(yaml);
            assert_eq!(p, expected, "{yaml}");
        }
        for yaml in ["3", "\"5.0\"", "v5", "-1", "4.0"] {
            let err = serde_yaml::from_str::<Protocol>(yaml)
                .expect_err(yaml)
                .to_string();
            assert!(err.contains("4") && err.contains("5"), "{yaml}: {err}");
        }
        assert_eq!(Protocol::V5.level(), 5);
        assert_eq!(Protocol::V4.to_string(), "3.1.1");
    }
}
