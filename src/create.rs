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

use crate::config::keyval;
use crate::drivers::file::{self, NewFile};
use crate::drivers::qcow2::{self, CreateOptions};
use crate::opts;

const USAGE: &str = "usage: vhost-user-blkd create [-f qcow2|raw] [-o opt=val,...] [-b backing_file [-F backing_fmt]] FILE [SIZE]";

/// Runs `create` with the arguments after the word `create`.
pub fn run(args: &[String]) -> Result<(), String> {
    let mut fmt = "qcow2".to_string();
    let mut o_opts: Vec<String> = Vec::new();
    let mut backing: Option<String> = None;
    let mut backing_fmt: Option<String> = None;
    let mut pos = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = |name: &str| {
            it.next()
                .cloned()
                .ok_or_else(|| format!("option {name} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "-f" => fmt = val("-f")?,
            "-o" => o_opts.push(val("-o")?),
            "-b" => backing = Some(val("-b")?),
            "-F" => backing_fmt = Some(val("-F")?),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            s if s.starts_with('-') && s.len() > 1 => {
                return Err(format!("unknown option '{s}'\n{USAGE}"))
            }
            s => pos.push(s.to_string()),
        }
    }
    let (path, size) = match pos.as_slice() {
        [p] => (p.clone(), None),
        [p, s] => (
            p.clone(),
            Some(opts::parse_size(s).ok_or_else(|| format!("invalid size '{s}'"))?),
        ),
        _ => return Err(USAGE.to_string()),
    };
    let mut c = CreateOptions {
        backing_file: backing,
        backing_fmt,
        ..CreateOptions::default()
    };
    let mut size = size;
    for o in &o_opts {
        for (k, v) in keyval::split_pairs(o)? {
            let bad = |what: &str| format!("invalid {what} '{v}' for option '{k}'");
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
                "preallocation" => c.preallocation = v.parse()?,
                "refcount_bits" => {
                    c.refcount_bits = opts::parse_uint(&v)
                        .and_then(|n| u32::try_from(n).ok())
                        .ok_or_else(|| bad("number"))?
                }
                _ => return Err(format!("unknown option '{k}' for format '{fmt}'")),
            }
        }
    }
    // As qemu-img (since 6.1): the backing format is given, never probed
    // from the backing file's content, which its guest controls.
    if c.backing_file.is_some() && c.backing_fmt.is_none() {
        return Err(format!(
            "{path}: Backing file specified without backing format; give it with -F (or -o backing_fmt=)"
        ));
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
        size = Some(qcow2::probe_size(&full, fmt)?);
    }
    let size = size.ok_or_else(|| format!("a size is needed\n{USAGE}"))?;
    match fmt.as_str() {
        "qcow2" => {
            c.size = size;
            qcow2::create(&path, &c)?;
        }
        "raw" => {
            if !o_opts.is_empty() || c.backing_file.is_some() {
                return Err("raw images take no -o options and no backing file".into());
            }
            // Truncated only once it holds the image's write lock.
            let new = NewFile::open(&path, &file::no_node)?;
            let f = new.file();
            f.set_len(0)
                .and_then(|()| f.set_len(size))
                .map_err(|e| format!("cannot size '{path}': {e}"))?;
        }
        other => return Err(format!("cannot create images of format '{other}'")),
    }
    println!("Formatting '{path}', fmt={fmt} size={size}");
    Ok(())
}
