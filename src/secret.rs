//! `secret` objects (QEMU's qom-type=secret): a value given inline
//! (`data=`) or read from a file (`file=`), `format=raw|base64`, looked up
//! by id by drivers that need a password or a key (rbd's `key-secret`).
//!
//! The value never leaves this module in text: [`Secret`]'s and
//! [`SecretOptions`]'s `Debug` print `<hidden>`, errors name the id and
//! the file, not the value, and the bytes are overwritten when dropped.

use std::fmt;

use serde::Deserialize;

/// `format`: how `data` or the file's content is spelled.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SecretFormat {
    #[default]
    Raw,
    Base64,
}

/// The options of `--object secret,...` / object-add qom-type=secret.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct SecretOptions {
    pub id: String,
    #[serde(default)]
    pub data: Option<String>,
    #[serde(default)]
    pub file: Option<String>,
    #[serde(default)]
    pub format: SecretFormat,
    /// QEMU's encrypted secrets (keyid, iv): refused with a clear error.
    #[serde(default)]
    pub keyid: Option<String>,
    #[serde(default)]
    pub iv: Option<String>,
}

impl fmt::Debug for SecretOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SecretOptions")
            .field("id", &self.id)
            .field("data", &self.data.as_ref().map(|_| "<hidden>"))
            .field("file", &self.file)
            .field("format", &self.format)
            .finish()
    }
}

/// A secret's value, as bytes (base64 decoded).
pub struct Secret {
    id: String,
    value: Vec<u8>,
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secret {{ id: {:?}, value: <hidden> }}", self.id)
    }
}

impl Drop for Secret {
    fn drop(&mut self) {
        for b in self.value.iter_mut() {
            // SAFETY: `b` is a valid, aligned, exclusive reference; the
            // volatile store keeps the compiler from dropping the wipe.
            unsafe { std::ptr::write_volatile(b, 0) };
        }
    }
}

impl Secret {
    /// Loads a secret object's value (reads its file now, as QEMU does
    /// when the object is completed).
    pub fn load(o: &SecretOptions) -> Result<Secret, String> {
        if o.id.is_empty() {
            return Err("'id' must not be empty".into());
        }
        if o.keyid.is_some() || o.iv.is_some() {
            return Err(format!(
                "secret '{}': encrypted secrets (keyid, iv) are not supported",
                o.id
            ));
        }
        let raw: Vec<u8> = match (&o.data, &o.file) {
            (Some(_), Some(_)) => {
                return Err("'data' and 'file' are mutually exclusive".into());
            }
            (None, None) => return Err("Either 'data' or 'file' must be provided".into()),
            (Some(d), None) => d.as_bytes().to_vec(),
            (None, Some(path)) => std::fs::read(path).map_err(|e| {
                let t = e.to_string();
                let t = t.split(" (os error").next().unwrap_or_default().to_string();
                format!("Unable to read {path}: {t}")
            })?,
        };
        let value = match o.format {
            SecretFormat::Raw => raw,
            SecretFormat::Base64 => {
                let text = std::str::from_utf8(&raw)
                    .map_err(|_| format!("secret '{}': the data is not valid base64", o.id))?;
                base64_decode(text.trim_end_matches(['\n', '\r']))
                    .ok_or_else(|| format!("secret '{}': the data is not valid base64", o.id))?
            }
        };
        Ok(Secret {
            id: o.id.clone(),
            value,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The value's bytes (a LUKS passphrase). Callers must not print them.
    pub fn bytes(&self) -> &[u8] {
        &self.value
    }

    /// The value as base64 (QEMU's qcrypto_secret_lookup_as_base64).
    pub fn as_base64(&self) -> String {
        base64_encode(&self.value)
    }
}

const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Strict base64 (padding required, no whitespace inside).
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 4 != 0 {
        return None;
    }
    let val = |c: u8| ALPHABET.iter().position(|&a| a == c).map(|p| p as u32);
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, q) in s.chunks(4).enumerate() {
        let last = i + 1 == s.len() / 4;
        let pad = q.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &q[..4 - pad] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pad as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for data in [&b""[..], b"f", b"fo", b"foo", b"foob", b"fooba", b"foobar"] {
            let e = base64_encode(data);
            assert_eq!(base64_decode(&e).as_deref(), Some(data), "{e}");
        }
        assert_eq!(base64_encode(b"foobar"), "Zm9vYmFy");
        assert_eq!(base64_decode("Zm9v!mFy"), None);
        assert_eq!(base64_decode("Zm9=YmFy"), None);
        assert_eq!(base64_decode("Zm9"), None);
    }

    #[test]
    fn values_are_never_printed() {
        let o = SecretOptions {
            id: "s0".into(),
            data: Some("hunter2".into()),
            file: None,
            format: SecretFormat::Raw,
            keyid: None,
            iv: None,
        };
        let s = Secret::load(&o).unwrap();
        assert!(!format!("{o:?}{s:?}").contains("hunter2"));
        assert_eq!(s.as_base64(), base64_encode(b"hunter2"));
        let b = SecretOptions {
            format: SecretFormat::Base64,
            data: Some("aHVudGVyMg==".into()),
            ..o.clone()
        };
        assert_eq!(Secret::load(&b).unwrap().as_base64(), "aHVudGVyMg==");
        let bad = SecretOptions {
            format: SecretFormat::Base64,
            data: Some("hunter2!".into()),
            ..o.clone()
        };
        let e = Secret::load(&bad).unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
        let both = SecretOptions {
            file: Some("/x".into()),
            ..o
        };
        assert_eq!(
            Secret::load(&both).unwrap_err(),
            "'data' and 'file' are mutually exclusive"
        );
    }
}
