//! Human-friendly units in the configuration: durations (`250ms`, `30s`, `5m`, `2h`, `7d`) and sizes
//! (`512`, `64KiB`, `256MiB`, `1GiB`, `10MB`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(s: u64) -> Self {
        HumanDuration(Duration::from_secs(s))
    }
    pub const fn from_millis(ms: u64) -> Self {
        HumanDuration(Duration::from_millis(ms))
    }
    pub fn get(self) -> Duration {
        self.0
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if !ms.is_multiple_of(1000) || ms == 0 {
            write!(f, "{ms}ms")
        } else {
            write!(f, "{}s", ms / 1000)
        }
    }
}

impl FromStr for HumanDuration {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a duration (examples: 250ms, 30s, 5m, 2h, 7d)"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" | "" => 1.0,
            "m" | "min" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "unknown duration unit `{other}` in `{s}` (use ms, s, m, h or d)"
                ))
            }
        };
        let secs = value * scale;
        if !secs.is_finite() || !(0.0..=1e10).contains(&secs) {
            return Err(format!("duration `{s}` is out of range"));
        }
        Ok(HumanDuration(Duration::from_secs_f64(secs)))
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = HumanDuration;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 250ms, 30s, 5m, 2h or 7d")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(HumanDuration::from_secs(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(HumanDuration::from_secs)
                    .map_err(|_| E::custom("a duration cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 >= 1 << 30 {
            write!(f, "{:.1} GiB", b / (1u64 << 30) as f64)
        } else if self.0 >= 1 << 20 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else if self.0 >= 1 << 10 {
            write!(f, "{:.1} KiB", b / (1u64 << 10) as f64)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl FromStr for ByteSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let value: f64 = num
            .parse()
            .map_err(|_| format!("`{s}` is not a size (examples: 512, 64KiB, 256MiB, 1GiB)"))?;
        let scale: f64 = match unit.trim() {
            "" | "B" => 1.0,
            "KiB" | "K" => 1024.0,
            "MiB" | "M" => 1024.0 * 1024.0,
            "GiB" | "G" => 1024.0 * 1024.0 * 1024.0,
            "TiB" | "T" => 1024.0f64.powi(4),
            "kB" | "KB" => 1e3,
            "MB" => 1e6,
            "GB" => 1e9,
            "TB" => 1e12,
            other => {
                return Err(format!(
                    "unknown size unit `{other}` in `{s}` (use B, KiB, MiB, GiB, kB, MB, GB)"
                ))
            }
        };
        let bytes = value * scale;
        if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 / 2.0 {
            return Err(format!("size `{s}` is out of range"));
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 512, 64KiB, 256MiB or 1GiB")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_people_write_them() {
        assert_eq!(
            "250ms".parse::<HumanDuration>(),
            Ok(HumanDuration::from_millis(250))
        );
        assert_eq!(
            "30s".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(30))
        );
        assert_eq!(
            "5m".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(300))
        );
        assert_eq!(
            "2h".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(7200))
        );
        assert_eq!(
            "7d".parse::<HumanDuration>(),
            Ok(HumanDuration::from_secs(7 * 86400))
        );
        assert!("5 parsecs".parse::<HumanDuration>().is_err());
        assert!("-3s".parse::<HumanDuration>().is_err());
    }

    #[test]
    fn sizes_read_like_people_write_them() {
        assert_eq!("256MiB".parse::<ByteSize>(), Ok(ByteSize(256 << 20)));
        assert_eq!("64KiB".parse::<ByteSize>(), Ok(ByteSize(64 << 10)));
        assert_eq!("10MB".parse::<ByteSize>(), Ok(ByteSize(10_000_000)));
        assert_eq!("512".parse::<ByteSize>(), Ok(ByteSize(512)));
        assert!("12 furlongs".parse::<ByteSize>().is_err());
    }
}
