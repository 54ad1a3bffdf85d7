//! QEMU's keyval syntax: `key=value,a.b=value` into a JSON object.
//!
//! - `,,` in a value stands for a literal comma;
//! - dotted keys build nested objects (`addr.type=unix` is `{"addr":{"type":"unix"}}`);
//! - with an implied key, a first element without `=` is that key's value
//!   (`--export vhost-user-blk,...` means `type=vhost-user-blk`);
//! - an argument starting with `{` is JSON, as qemu-storage-daemon accepts.
//!
//! Values stay strings; the option structs' deserialisers convert them.

use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyvalError {
    #[error("expected 'key=value' but found '{0}'")]
    MissingEquals(String),
    #[error("empty key in '{0}'")]
    EmptyKey(String),
    #[error("key '{0}' is given twice")]
    Duplicate(String),
    #[error("key '{0}' is used both as a value and as a group of options")]
    Conflict(String),
    #[error("invalid JSON: {0}")]
    Json(String),
}

/// Parses `s`, with `implied` naming the key of a leading bare value.
pub fn parse(s: &str, implied: Option<&str>) -> Result<Value, KeyvalError> {
    if s.trim_start().starts_with('{') {
        return serde_json::from_str(s).map_err(|e| KeyvalError::Json(e.to_string()));
    }
    let mut root = Map::new();
    for (i, item) in split(s).into_iter().enumerate() {
        if item.is_empty() {
            continue;
        }
        let (key, value) = match find_equals(&item) {
            Some(pos) => (item[..pos].to_string(), item[pos + 1..].to_string()),
            None => match (i, implied) {
                (0, Some(k)) => (k.to_string(), item.clone()),
                _ => return Err(KeyvalError::MissingEquals(item)),
            },
        };
        insert(&mut root, &key, value)?;
    }
    Ok(Value::Object(root))
}

/// `key=value` pairs of a flat option string (qemu-img's `-o`), in order.
pub fn split_pairs(s: &str) -> Result<Vec<(String, String)>, String> {
    split(s)
        .into_iter()
        .filter(|i| !i.is_empty())
        .map(|item| match find_equals(&item) {
            Some(pos) => Ok((item[..pos].to_string(), item[pos + 1..].to_string())),
            None => Err(KeyvalError::MissingEquals(item).to_string()),
        })
        .collect()
}

/// Splits on single commas; `,,` becomes a literal comma.
fn split(s: &str) -> Vec<String> {
    let mut items = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                items.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    items.push(cur);
    items
}

fn find_equals(item: &str) -> Option<usize> {
    item.find('=')
}

fn insert(root: &mut Map<String, Value>, key: &str, value: String) -> Result<(), KeyvalError> {
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(KeyvalError::EmptyKey(key.to_string()));
    }
    let mut map = root;
    for (depth, part) in parts.iter().enumerate() {
        let last = depth == parts.len() - 1;
        if last {
            if map.contains_key(*part) {
                return Err(KeyvalError::Duplicate(key.to_string()));
            }
            map.insert(part.to_string(), Value::String(value));
            return Ok(());
        }
        let entry = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        map = match entry {
            Value::Object(m) => m,
            _ => return Err(KeyvalError::Conflict(parts[..=depth].join("."))),
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn dotted_keys_nest() {
        let v = parse(
            "type=vhost-user-blk,addr.type=unix,addr.path=/tmp/a.sock",
            None,
        )
        .unwrap();
        assert_eq!(
            v,
            json!({"type": "vhost-user-blk", "addr": {"type": "unix", "path": "/tmp/a.sock"}})
        );
    }

    #[test]
    fn double_comma_is_a_literal_comma() {
        let v = parse("driver=file,filename=a,,b.img", None).unwrap();
        assert_eq!(v["filename"], "a,b.img");
    }

    #[test]
    fn implied_key_takes_a_leading_bare_value() {
        let v = parse("vhost-user-blk,id=e0", Some("type")).unwrap();
        assert_eq!(v["type"], "vhost-user-blk");
        assert_eq!(
            parse("vhost-user-blk,id", Some("type")),
            Err(KeyvalError::MissingEquals("id".into()))
        );
    }

    #[test]
    fn duplicates_and_conflicts_are_errors() {
        assert_eq!(
            parse("a=1,a=2", None),
            Err(KeyvalError::Duplicate("a".into()))
        );
        assert_eq!(
            parse("a=1,a.b=2", None),
            Err(KeyvalError::Conflict("a".into()))
        );
        assert_eq!(parse("=1", None), Err(KeyvalError::EmptyKey("".into())));
    }

    #[test]
    fn json_is_accepted() {
        let v = parse(r#"{"driver":"null-co","node-name":"n0"}"#, None).unwrap();
        assert_eq!(v["driver"], "null-co");
    }
}
