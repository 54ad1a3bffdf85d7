//! `vhost-user-blkd create`: image creation from the command line, with
//! qemu-img's syntax:
//!
//! ```text
//! vhost-user-blkd create [-f qcow2|raw] [-o opt=val,...] [-b backing [-F fmt]] FILE [SIZE]
//! ```
//!
//! qcow2 options: `cluster_size`, `compat` (0.10 / 1.1), `backing_file`,
//! `backing_fmt`, `extended_l2`, `lazy_refcounts`, `preallocation`
//! (off / metadata / falloc / full), `refcount_bits`.
//!
//! qcow2 also takes `encrypt.format=luks`, `encrypt.key-secret` and the
//! luks options below under `encrypt.` (an encrypted image).
//!
//! luks options (qemu-img's): `key-secret` (the id of a `--object
//! secret,id=...,data=|file=,format=raw|base64` given before it, as
//! qemu-img takes them), `cipher-alg` (aes-128 / aes-256), `cipher-mode`
//! (xts / cbc), `ivgen-alg` (plain / plain64 / essiv), `ivgen-hash-alg`,
//! `hash-alg` (sha1 / sha256), `iter-time` (ms).

use crate::config::keyval;
use crate::drivers::file::{self, NewFile};
use crate::drivers::qcow2::{self, CreateOptions};
use crate::opts;

const USAGE: &str = "usage: vhost-user-blkd create [--object secret,id=ID,data=...|file=...] [-f qcow2|raw|luks] [-o opt=val,...] [-b backing_file [-F backing_fmt]] FILE [SIZE]";

/// Why `create` failed (main prints it after `vhost-user-blkd create: `).
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("option {0} needs a value\n{usage}", usage = USAGE)]
    MissingValue(String),
    #[error("unknown option '{0}'\n{usage}", usage = USAGE)]
    UnknownFlag(String),
    #[error("invalid size '{0}'")]
    InvalidSize(String),
    /// No file, or more than a file and a size.
    #[error("{usage}", usage = USAGE)]
    Usage,
    #[error("invalid {what} '{value}' for option '{key}'")]
    InvalidValue {
        what: &'static str,
        value: String,
        key: String,
    },
    #[error("unknown option '{key}' for format '{fmt}'")]
    UnknownOption { key: String, fmt: String },
    #[error("{path}: Backing file specified without backing format; give it with -F (or -o backing_fmt=)")]
    BackingWithoutFormat { path: String },
    #[error("a size is needed\n{usage}", usage = USAGE)]
    NoSize,
    #[error("raw images take no -o options and no backing file")]
    RawOptions,
    #[error("cannot size '{path}': {source}")]
    Resize {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot create images of format '{0}'")]
    UnknownFormat(String),
    /// An `-o` list or value the option parser refused, in its words.
    #[error("{0}")]
    Options(String),
    /// The image layer's failure (probing the backing file, creating the
    /// image), in its words.
    #[error("{0}")]
    Image(String),
}

/// Runs `create` with the arguments after the word `create`.
pub fn run(args: &[String]) -> Result<(), CreateError> {
    let mut fmt = "qcow2".to_string();
    let mut o_opts: Vec<String> = Vec::new();
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut pos = Vec::new();
    let mut secrets: Vec<std::sync::Arc<crate::secret::Secret>> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| CreateError::MissingValue(name.to_string()))
        };
        match a.as_str() {
            "-f" => fmt = val("-f")?,
            "-o" => o_opts.push(val("-o")?),
            "-b" => backing = Some(val("-b")?),
            "-F" => backing_fmt = Some(val("-F")?),
            "--object" => {
                let v = val("--object")?;
                let j = keyval::parse(&v, Some("qom-type"))
                    .map_err(|e| CreateError::Options(e.to_string()))?;
                match serde_json::from_value::<crate::config::ObjectOptions>(j) {
                    Ok(crate::config::ObjectOptions::Secret(o)) => secrets.push(
                        crate::secret::Secret::load(&o)
                            .map_err(CreateError::Options)?
                            .into(),
                    ),
                    Ok(_) => {
                        return Err(CreateError::Options(
                            "create takes only secret objects".into(),
                        ))
                    }
                    Err(e) => return Err(CreateError::Options(format!("--object: {e}"))),
                }
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(CreateError::UnknownFlag(s.to_string()))
            }
            s => pos.push(s.to_string()),
        }
    }
    let (path, size) = match pos.as_slice() {
        [p] => (p.clone(), None),
        [p, s] => (
            p.clone(),
            Some(opts::parse_size(s).ok_or_else(|| CreateError::InvalidSize(s.clone()))?),
        ),
        _ => return Err(CreateError::Usage),
    };
    let mut c = CreateOptions {
        backing_file: backing,
        backing_fmt,
        ..CreateOptions::default()
    };
    if fmt == "luks" {
        return create_luks(&path, size, &o_opts, &secrets);
    }
    let mut size = size;
    let mut encrypt: std::collections::BTreeMap<String, String> = Default::default();
    for o in &o_opts {
        for (k, v) in keyval::split_pairs(o).map_err(CreateError::Options)? {
            let bad = |what: &'static str| CreateError::InvalidValue {
                what,
                value: v.clone(),
                key: k.clone(),
            };
            match k.as_str() {
                "size" => size = Some(opts::parse_size(&v).ok_or_else(|| bad("size"))?),
                "cluster_size" => {
                    c.cluster_size = opts::parse_size(&v).ok_or_else(|| bad("size"))?
                }
                "compat" => {
                    c.version = match v.as_str() {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(bad("compat level")),
                    }
                }
                "backing_file" => c.backing_file = Some(v.clone()),
                "backing_fmt" => c.backing_fmt = Some(v.clone()),
                "extended_l2" => c.extended_l2 = opts::parse_bool(&v).ok_or_else(|| bad("bool"))?,
                "lazy_refcounts" => {
                    c.lazy_refcounts = opts::parse_bool(&v).ok_or_else(|| bad("bool"))?
                }
                "preallocation" => c.preallocation = v.parse().map_err(CreateError::Options)?,
                k if k.starts_with("encrypt.") => {
                    encrypt.insert(k.trim_start_matches("encrypt.").to_string(), v.clone());
                }
                "refcount_bits" => {
                    c.refcount_bits = opts::parse_uint(&v)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad("number"))?
                }
                _ => {
                    return Err(CreateError::UnknownOption {
                        key: k.clone(),
                        fmt: fmt.clone(),
                    })
                }
            }
        }
    }
    if !encrypt.is_empty() {
        c.encrypt = Some(qcow2_encrypt(&encrypt, &secrets)?);
    }
    // As qemu-img (since 6.1): the backing format is given, never probed
    // from the backing file's content, which its guest controls.
    if c.backing_file.is_some() && c.backing_fmt.is_none() {
        return Err(CreateError::BackingWithoutFormat { path });
    }
    if let (Some(b), Some(fmt), None) = (&c.backing_file, &c.backing_fmt, size) {
        let full = if b.starts_with('/') {
            b.clone()
        } else {
            let dir = std::path::Path::new(&path)
                .parent()
                .map(|p| p.to_path_buf())
                .unwrap_or_default();
            dir.join(b).to_string_lossy().into_owned()
        };
        size = Some(qcow2::probe_size(&full, fmt).map_err(CreateError::Image)?);
    }
    let size = size.ok_or(CreateError::NoSize)?;
    match fmt.as_str() {
        "qcow2" => {
            c.size = size;
            qcow2::create(&path, &c).map_err(CreateError::Image)?;
        }
        "raw" => {
            if !o_opts.is_empty() || c.backing_file.is_some() {
                return Err(CreateError::RawOptions);
            }
            // Truncated only once it holds the image's write lock.
            let new = NewFile::open(&path, &file::no_node).map_err(CreateError::Image)?;
            let f = new.file();
            f.set_len(0)
                .and_then(|()| f.set_len(size))
                .map_err(|source| CreateError::Resize {
                    path: path.clone(),
                    source,
                })?;
        }
        other => return Err(CreateError::UnknownFormat(other.to_string())),
    }
    println!("Formatting '{path}', fmt={fmt} size={size}");
    Ok(())
}

/// qcow2's `-o encrypt.format=luks,encrypt.key-secret=ID,encrypt.*`
/// (the luks options under `encrypt.`).
fn qcow2_encrypt(
    kv: &std::collections::BTreeMap<String, String>,
    secrets: &[std::sync::Arc<crate::secret::Secret>],
) -> Result<qcow2::Encrypt, CreateError> {
    for k in kv.keys() {
        if !matches!(
            k.as_str(),
            "format"
                | "key-secret"
                | "cipher-alg"
                | "cipher-mode"
                | "ivgen-alg"
                | "ivgen-hash-alg"
                | "hash-alg"
                | "iter-time"
        ) {
            return Err(CreateError::UnknownOption {
                key: format!("encrypt.{k}"),
                fmt: "qcow2".into(),
            });
        }
    }
    match kv.get("format").map(String::as_str) {
        Some("luks") => {}
        Some(f) => {
            return Err(CreateError::Image(format!(
                "encrypt.format '{f}' is not supported (only luks)"
            )))
        }
        None => {
            return Err(CreateError::Image(
                "encrypt.format is required (luks)".into(),
            ))
        }
    }
    let (spec, secret) = luks_spec(kv, "encrypt.", secrets)?;
    Ok(qcow2::Encrypt { spec, secret })
}

/// The LUKS parameters and the secret of qemu-img's luks options in `kv`
/// (`prefix` names them in errors: "encrypt." for qcow2, "" for luks).
fn luks_spec(
    kv: &std::collections::BTreeMap<String, String>,
    prefix: &str,
    secrets: &[std::sync::Arc<crate::secret::Secret>],
) -> Result<
    (
        crate::drivers::luks::CreateSpec,
        std::sync::Arc<crate::secret::Secret>,
    ),
    CreateError,
> {
    let iter_time = match kv.get("iter-time") {
        Some(v) => Some(
            opts::parse_uint(v).ok_or_else(|| CreateError::InvalidValue {
                what: "number",
                value: v.clone(),
                key: format!("{prefix}iter-time"),
            })?,
        ),
        None => None,
    };
    let spec = crate::drivers::luks::CreateSpec::from_options(
        kv.get("cipher-alg").map(String::as_str),
        kv.get("cipher-mode").map(String::as_str),
        kv.get("ivgen-alg").map(String::as_str),
        kv.get("ivgen-hash-alg").map(String::as_str),
        kv.get("hash-alg").map(String::as_str),
        iter_time,
    )
    .map_err(CreateError::Image)?;
    let id = kv.get("key-secret").ok_or_else(|| {
        CreateError::Image(format!(
            "Parameter '{prefix}key-secret' is required for cipher"
        ))
    })?;
    let secret = secrets
        .iter()
        .rev()
        .find(|s| s.id() == id)
        .cloned()
        .ok_or_else(|| CreateError::Image(format!("No secret with id '{id}'")))?;
    Ok((spec, secret))
}

/// `create -f luks`: qemu-img's luks options; the passphrase from the
/// secret object `key-secret` names.
fn create_luks(
    path: &str,
    size: Option<u64>,
    o_opts: &[String],
    secrets: &[std::sync::Arc<crate::secret::Secret>],
) -> Result<(), CreateError> {
    let mut kv: std::collections::BTreeMap<String, String> = Default::default();
    let mut size = size;
    for o in o_opts {
        for (k, v) in keyval::split_pairs(o).map_err(CreateError::Options)? {
            match k.as_str() {
                "size" => {
                    size = Some(
                        opts::parse_size(&v).ok_or_else(|| CreateError::InvalidValue {
                            what: "size",
                            value: v.clone(),
                            key: k.clone(),
                        })?,
                    )
                }
                "key-secret" | "cipher-alg" | "cipher-mode" | "ivgen-alg" | "ivgen-hash-alg"
                | "hash-alg" | "iter-time" => {
                    kv.insert(k, v);
                }
                _ => {
                    return Err(CreateError::UnknownOption {
                        key: k,
                        fmt: "luks".into(),
                    })
                }
            }
        }
    }
    let size = size.ok_or(CreateError::NoSize)?;
    let (spec, secret) = luks_spec(&kv, "", secrets)?;
    let id = secret.id();
    let new = NewFile::open(path, &file::no_node).map_err(CreateError::Image)?;
    crate::drivers::luks::create_file(new.file(), &spec, secret.bytes(), size)
        .map_err(CreateError::Image)?;
    println!("Formatting '{path}', fmt=luks size={size} key-secret={id}");
    Ok(())
}
