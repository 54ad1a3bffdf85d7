//! Deserialisers for option values as QEMU spells them.
//!
//! Command-line (keyval) options arrive as strings; the TOML config file and
//! QMP give native booleans and numbers. These helpers accept both, so one
//! set of serde structs serves every front end.

use serde::de::{self, Deserializer, Visitor};
use std::fmt;

/// A boolean: `true`/`false`, or `on`/`off`, `yes`/`no` as strings.
pub fn bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = bool;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a boolean (on/off)")
        }
        fn visit_bool<E: de::Error>(self, v: bool) -> Result<bool, E> {
            Ok(v)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
            parse_bool(v).ok_or_else(|| E::custom(format!("'{v}' is not on/off")))
        }
    }
    d.deserialize_any(V)
}

pub fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" => Some(true),
        "off" | "false" | "no" => Some(false),
        _ => None,
    }
}

/// A size: a non-negative integer, or a string with an optional suffix
/// k, M, G, T, P, E (powers of 1024), as QEMU's size type.
pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a size in bytes (e.g. 4096, 64k, 1G)")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_size(v).ok_or_else(|| E::custom(format!("'{v}' is not a size")))
        }
    }
    d.deserialize_any(V)
}

/// Like [`size`], for optional fields (use with `#[serde(default)]`).
pub fn opt_size<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    size(d).map(Some)
}

/// Like [`bool`], for optional fields (use with `#[serde(default)]`).
pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    bool(d).map(Some)
}

/// An unsigned integer given as a number or a decimal/hex string.
pub fn uint<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    struct V;
    impl Visitor<'_> for V {
        type Value = u64;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a non-negative integer")
        }
        fn visit_u64<E: de::Error>(self, v: u64) -> Result<u64, E> {
            Ok(v)
        }
        fn visit_i64<E: de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v).map_err(|_| E::custom(format!("{v} is negative")))
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<u64, E> {
            parse_uint(v).ok_or_else(|| E::custom(format!("'{v}' is not a number")))
        }
    }
    d.deserialize_any(V)
}

/// Like [`uint`], for optional fields (use with `#[serde(default)]`).
pub fn opt_uint<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    uint(d).map(Some)
}

pub fn parse_uint(v: &str) -> Option<u64> {
    if let Some(hex) = v.strip_prefix("0x") {
        u64::from_str_radix(hex, 16).ok()
    } else {
        v.parse().ok()
    }
}

pub fn parse_size(v: &str) -> Option<u64> {
    let v = v.trim();
    let (num, shift) = match v.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return None,
            };
            (&v[..i], shift)
        }
        _ => (v, 0),
    };
    let n = parse_uint(num)?;
    n.checked_mul(1u64 << shift)
}

/// An optional list, as JSON's array or keyval's `key.0=...,key.1=...`
/// (a map whose keys are the indices 0..n-1, as QEMU's keyval lists).
pub fn opt_list<'de, D, T>(d: D) -> Result<Option<Vec<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    use serde::de::Error;
    use serde::Deserialize;
    use serde_json::Value;
    let items = match Option::<Value>::deserialize(d)? {
        None => return Ok(None),
        Some(Value::Array(a)) => a,
        Some(Value::Object(m)) => {
            let mut slots: Vec<Option<Value>> = vec![None; m.len()];
            for (k, v) in m {
                match k.parse::<usize>().ok().and_then(|i| slots.get_mut(i)) {
                    Some(slot) => *slot = Some(v),
                    None => {
                        return Err(D::Error::custom(format!(
                            "'{k}': expected a list index below {}",
                            slots.len()
                        )))
                    }
                }
            }
            slots.into_iter().flatten().collect()
        }
        Some(other) => {
            return Err(D::Error::custom(format!(
                "invalid type: {other}, expected a list"
            )))
        }
    };
    items
        .into_iter()
        .map(|v| serde_json::from_value(v).map_err(D::Error::custom))
        .collect::<Result<Vec<T>, _>>()
        .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_with_suffixes_parse() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("0x200"), Some(512));
    }

    #[test]
    fn overflowing_or_garbage_sizes_are_rejected() {
        assert_eq!(parse_size("16E"), None);
        assert_eq!(parse_size("12q"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("-1"), None);
    }
}
