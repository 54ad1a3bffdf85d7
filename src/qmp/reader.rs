//! Splits a QMP byte stream into JSON values, with limits.
//!
//! QMP has no framing beyond JSON itself, so the reader scans for the end of
//! each top-level value (tracking strings, escapes and nesting), then hands
//! the bytes to serde_json. A value larger than [`MAX_VALUE`] bytes or nested
//! deeper than [`MAX_DEPTH`] is a flood: the connection is closed. Bytes that
//! cannot start a value are reported once per run of garbage.

use std::io::{self, Read};

use serde_json::Value;

/// Largest accepted JSON value.
pub const MAX_VALUE: usize = 1 << 20;
/// Deepest accepted nesting.
pub const MAX_DEPTH: usize = 64;

/// QEMU's json-parser.c refuses an object with a key twice.
const DUPLICATE_KEY: &str = "duplicate key";

/// A JSON value in which no object has a key twice (serde_json's own Value
/// keeps the last: `{"execute": "query-version", "execute": "quit"}` would
/// quit).
struct Strict(Value);

impl<'de> serde::Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StrictVisitor).map(Strict)
    }
}

struct StrictVisitor;

impl<'de> serde::de::Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Strict(e)) = seq.next_element()? {
            v.push(e);
        }
        Ok(Value::Array(v))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut m = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            if m.contains_key(&k) {
                return Err(serde::de::Error::custom(DUPLICATE_KEY));
            }
            let Strict(v) = map.next_value()?;
            m.insert(k, v);
        }
        Ok(Value::Object(m))
    }
}

#[derive(Debug)]
pub enum ReadError {
    /// Not JSON (or not UTF-8); the connection goes on.
    Parse(String),
    /// Too large or too deep; the connection is closed.
    Flood(String),
    Io(io::Error),
}

pub struct JsonReader<R> {
    inner: R,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl<R: Read> JsonReader<R> {
    pub fn new(inner: R) -> Self {
        JsonReader {
            inner,
            buf: Vec::new(),
            pos: 0,
            eof: false,
        }
    }

    fn fill(&mut self) -> io::Result<bool> {
        if self.eof {
            return Ok(false);
        }
        let mut chunk = [0u8; 8192];
        loop {
            match self.inner.read(&mut chunk) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn compact(&mut self) {
        if self.pos > 0 {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
    }

    /// The next value; Ok(None) at end of stream.
    pub fn next_value(&mut self) -> Result<Option<Value>, ReadError> {
        loop {
            // Skip whitespace between values.
            while self.pos < self.buf.len() && self.buf[self.pos].is_ascii_whitespace() {
                self.pos += 1;
            }
            if self.pos == self.buf.len() {
                self.compact();
                if !self.fill().map_err(ReadError::Io)? {
                    return Ok(None);
                }
                continue;
            }
            let c = self.buf[self.pos];
            if c != b'{' && c != b'[' {
                return Err(self.skip_garbage()?);
            }
            return self.read_value();
        }
    }

    /// Skips a run of bytes that cannot start a value.
    fn skip_garbage(&mut self) -> Result<ReadError, ReadError> {
        let start = self.pos;
        loop {
            while self.pos < self.buf.len() {
                let c = self.buf[self.pos];
                if c.is_ascii_whitespace() || c == b'{' || c == b'[' {
                    let s = String::from_utf8_lossy(&self.buf[start..self.pos]).into_owned();
                    return Ok(ReadError::Parse(format!(
                        "JSON parse error, invalid token '{}'",
                        s.chars().take(32).collect::<String>()
                    )));
                }
                self.pos += 1;
                if self.pos - start > MAX_VALUE {
                    return Err(ReadError::Flood("input too large".into()));
                }
            }
            if !self.fill().map_err(ReadError::Io)? {
                return Ok(ReadError::Parse("JSON parse error, invalid token".into()));
            }
        }
    }

    fn read_value(&mut self) -> Result<Option<Value>, ReadError> {
        self.compact();
        let mut i = 0;
        let mut depth = 0usize;
        let mut in_string = false;
        let mut escape = false;
        loop {
            while i < self.buf.len() {
                let c = self.buf[i];
                i += 1;
                if in_string {
                    if escape {
                        escape = false;
                    } else if c == b'\\' {
                        escape = true;
                    } else if c == b'"' {
                        in_string = false;
                    }
                    continue;
                }
                match c {
                    b'"' => in_string = true,
                    b'{' | b'[' => {
                        depth += 1;
                        if depth > MAX_DEPTH {
                            return Err(ReadError::Flood(format!(
                                "JSON nested deeper than {MAX_DEPTH} levels"
                            )));
                        }
                    }
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            let bytes = &self.buf[..i];
                            let parsed = serde_json::from_slice::<Strict>(bytes);
                            self.pos = i;
                            return match parsed {
                                Ok(Strict(v)) => Ok(Some(v)),
                                // QEMU's words, without serde's position.
                                Err(e) if e.to_string().starts_with(DUPLICATE_KEY) => Err(
                                    ReadError::Parse(format!("JSON parse error, {DUPLICATE_KEY}")),
                                ),
                                Err(e) => Err(ReadError::Parse(format!("JSON parse error, {e}"))),
                            };
                        }
                    }
                    _ => {}
                }
            }
            if i > MAX_VALUE {
                return Err(ReadError::Flood(format!(
                    "JSON value larger than {MAX_VALUE} bytes"
                )));
            }
            if !self.fill().map_err(ReadError::Io)? {
                return Ok(None);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(s: &[u8]) -> JsonReader<&[u8]> {
        JsonReader::new(s)
    }

    #[test]
    fn values_split_across_a_stream() {
        let mut r = reader(b" {\"a\": \"}{\\\"\"} [1,2]\n{\"b\":{}}");
        assert_eq!(r.next_value().unwrap().unwrap()["a"], "}{\"");
        assert_eq!(r.next_value().unwrap().unwrap()[1], 2);
        assert!(r.next_value().unwrap().unwrap()["b"].is_object());
        assert!(r.next_value().unwrap().is_none());
    }

    #[test]
    fn garbage_is_reported_then_skipped() {
        let mut r = reader(b"hello {\"execute\":\"x\"}");
        assert!(matches!(r.next_value(), Err(ReadError::Parse(_))));
        assert_eq!(r.next_value().unwrap().unwrap()["execute"], "x");
    }

    #[test]
    fn invalid_utf8_and_bad_json_are_parse_errors() {
        let mut r = reader(b"{\"a\": \"\xff\xfe\"} {\"a\" 1} {\"ok\":1}");
        assert!(matches!(r.next_value(), Err(ReadError::Parse(_))));
        assert!(matches!(r.next_value(), Err(ReadError::Parse(_))));
        assert_eq!(r.next_value().unwrap().unwrap()["ok"], 1);
    }

    #[test]
    fn duplicate_keys_are_parse_errors_at_any_depth() {
        let mut r = reader(
            br#"{"a": 1, "a": 1} {"a": {"b": [{"c": 1, "c": 2}]}} {"a": {"b": 1}, "b": {"b": 2}, "n": -1.5}"#,
        );
        for _ in 0..2 {
            match r.next_value() {
                Err(ReadError::Parse(d)) => assert_eq!(d, "JSON parse error, duplicate key"),
                other => panic!("{other:?}"),
            }
        }
        let v = r.next_value().unwrap().unwrap();
        assert_eq!(v["b"]["b"], 2);
        assert_eq!(v["n"], -1.5);
    }

    #[test]
    fn deep_nesting_and_huge_values_are_floods() {
        let deep = "[".repeat(MAX_DEPTH + 1);
        assert!(matches!(
            reader(deep.as_bytes()).next_value(),
            Err(ReadError::Flood(_))
        ));
        let mut huge = b"{\"a\":\"".to_vec();
        huge.extend(std::iter::repeat_n(b'x', MAX_VALUE + 10));
        assert!(matches!(
            reader(&huge).next_value(),
            Err(ReadError::Flood(_))
        ));
    }
}
