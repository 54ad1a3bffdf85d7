//! blockdev-create (qapi/block-core.json): image creation as a job.
//!
//! ```text
//!   driver=file   filename, size[, preallocation=off|falloc|full]
//!                 -> the file created (or truncated) at that size
//!   driver=qcow2  file=<node-name>, size[, version, cluster-size,
//!                 preallocation, lazy-refcounts, refcount-bits,
//!                 extended-l2, backing-file, backing-fmt]
//!                 -> the node's file formatted as qcow2
//!   driver=raw    file=<node-name>, size (our addition; QEMU has no raw
//!                 create) -> the node's file truncated to that size
//!   driver=luks   file=<node-name>, size, key-secret[, cipher-alg,
//!                 cipher-mode, ivgen-alg, ivgen-hash-alg, hash-alg,
//!                 iter-time] -> a LUKS1 volume with `size` bytes of payload
//! ```
//!
//! As in QEMU, a qcow2 image is created on a node that already exists
//! (usually one made with blockdev-add after a file create); the node must
//! be a file node and must have no parents.

use std::os::unix::fs::FileExt;

use serde::Deserialize;

use std::sync::Arc;

use crate::block::{Graph, Node};
use crate::drivers::file::{self, NewFile};
use crate::drivers::qcow2::{CreateOptions, Preallocation};
use crate::qapi::QmpError;
use crate::state::State;

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct CreateArgs {
    pub job_id: String,
    pub options: serde_json::Value,
}

#[derive(Deserialize)]
#[serde(tag = "driver", rename_all = "kebab-case")]
enum Options {
    File(FileCreate),
    Luks(LuksCreate),
    Qcow2(Qcow2Create),
    Raw(RawCreate),
    Rbd(crate::drivers::rbd::RbdCreate),
}

#[derive(Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum Prealloc {
    #[default]
    Off,
    Metadata,
    Falloc,
    Full,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct FileCreate {
    filename: String,
    size: u64,
    #[serde(default)]
    preallocation: Prealloc,
    /// Accepted for compatibility; copy-on-write flags are the
    /// filesystem's business here.
    #[serde(default)]
    #[allow(dead_code)]
    nocow: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Qcow2Create {
    file: String,
    size: u64,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    cluster_size: Option<u64>,
    #[serde(default)]
    preallocation: Prealloc,
    #[serde(default)]
    lazy_refcounts: Option<bool>,
    #[serde(default)]
    refcount_bits: Option<u32>,
    #[serde(default)]
    extended_l2: Option<bool>,
    #[serde(default)]
    backing_file: Option<String>,
    #[serde(default)]
    backing_fmt: Option<String>,
    /// QEMU's QCryptoBlockCreateOptions: `format` (luks) and the luks
    /// options.
    #[serde(default)]
    encrypt: Option<Qcow2EncryptCreate>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct Qcow2EncryptCreate {
    format: String,
    key_secret: Option<String>,
    #[serde(default)]
    cipher_alg: Option<String>,
    #[serde(default)]
    cipher_mode: Option<String>,
    #[serde(default)]
    ivgen_alg: Option<String>,
    #[serde(default)]
    ivgen_hash_alg: Option<String>,
    #[serde(default)]
    hash_alg: Option<String>,
    #[serde(default)]
    iter_time: Option<u64>,
}

#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct RawCreate {
    file: String,
    size: u64,
}

/// QEMU's BlockdevCreateOptionsLUKS.
#[derive(Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
struct LuksCreate {
    file: String,
    size: u64,
    key_secret: Option<String>,
    #[serde(default)]
    cipher_alg: Option<String>,
    #[serde(default)]
    cipher_mode: Option<String>,
    #[serde(default)]
    ivgen_alg: Option<String>,
    #[serde(default)]
    ivgen_hash_alg: Option<String>,
    #[serde(default)]
    hash_alg: Option<String>,
    #[serde(default)]
    iter_time: Option<u64>,
    /// Only `off` (QEMU's default).
    #[serde(default)]
    preallocation: Prealloc,
}

/// The work of one create job, checked up front so that bad options are a
/// QMP error, not a failed job.
pub enum Work {
    File {
        filename: String,
        size: u64,
        prealloc: Prealloc,
    },
    Qcow2 {
        node: Arc<Node>,
        filename: String,
        opts: CreateOptions,
    },
    Raw {
        node: Arc<Node>,
        size: u64,
    },
    Rbd(crate::drivers::rbd::Creation),
    Luks {
        node: Arc<Node>,
        filename: String,
        spec: crate::drivers::luks::CreateSpec,
        secret: Arc<crate::secret::Secret>,
        size: u64,
    },
}

/// The filename of file node `name`, which must have no parents (nothing
/// may be using what is about to be overwritten).
fn unused_file_node(graph: &Graph, name: &str) -> Result<(Arc<Node>, String), QmpError> {
    let node = graph
        .get(name)
        .map_err(|e| QmpError::generic(e.to_string()))?;
    if !node.parents().is_empty() {
        return Err(QmpError::generic(format!(
            "Node '{name}' is in use (it has parents); create on an unused node"
        )));
    }
    match node.protocol_file() {
        Some(f) => Ok((node.clone(), f.filename().to_string())),
        None => Err(QmpError::generic(format!(
            "Node '{name}' is not a file node; blockdev-create formats a file node"
        ))),
    }
}

impl Work {
    pub fn parse(options: serde_json::Value, graph: &Graph) -> Result<Work, QmpError> {
        let o: Options = serde_path_to_error::deserialize(options).map_err(|e| {
            QmpError::generic(format!("Invalid options for 'blockdev-create': {e}"))
        })?;
        match o {
            Options::File(f) => {
                if f.preallocation == Prealloc::Metadata {
                    return Err(QmpError::generic(
                        "Unsupported preallocation mode 'metadata' for driver 'file'",
                    ));
                }
                Ok(Work::File {
                    filename: f.filename,
                    size: f.size,
                    prealloc: f.preallocation,
                })
            }
            Options::Rbd(r) => crate::drivers::rbd::prepare_create(&r, graph)
                .map(Work::Rbd)
                .map_err(QmpError::generic),
            Options::Luks(l) => {
                if l.preallocation != Prealloc::Off {
                    return Err(QmpError::generic(
                        "driver 'luks': only preallocation 'off' is supported",
                    ));
                }
                let (node, filename) = unused_file_node(graph, &l.file)?;
                let spec = crate::drivers::luks::CreateSpec::from_options(
                    l.cipher_alg.as_deref(),
                    l.cipher_mode.as_deref(),
                    l.ivgen_alg.as_deref(),
                    l.ivgen_hash_alg.as_deref(),
                    l.hash_alg.as_deref(),
                    l.iter_time,
                )
                .map_err(QmpError::generic)?;
                let secret = crate::drivers::luks::secret_of(graph, l.key_secret.as_deref())
                    .map_err(QmpError::generic)?;
                Ok(Work::Luks {
                    node,
                    filename,
                    spec,
                    secret,
                    size: l.size,
                })
            }
            Options::Raw(r) => Ok(Work::Raw {
                node: unused_file_node(graph, &r.file)?.0,
                size: r.size,
            }),
            Options::Qcow2(q) => {
                let encrypt = match &q.encrypt {
                    None => None,
                    Some(e) => {
                        if e.format != "luks" {
                            return Err(QmpError::generic(format!(
                                "encrypt.format '{}' is not supported (only luks)",
                                e.format
                            )));
                        }
                        let spec = crate::drivers::luks::CreateSpec::from_options(
                            e.cipher_alg.as_deref(),
                            e.cipher_mode.as_deref(),
                            e.ivgen_alg.as_deref(),
                            e.ivgen_hash_alg.as_deref(),
                            e.hash_alg.as_deref(),
                            e.iter_time,
                        )
                        .map_err(QmpError::generic)?;
                        let secret =
                            crate::drivers::luks::secret_of(graph, e.key_secret.as_deref())
                                .map_err(QmpError::generic)?;
                        Some(crate::drivers::qcow2::Encrypt { spec, secret })
                    }
                };
                let (node, filename) = unused_file_node(graph, &q.file)?;
                let mut opts = CreateOptions {
                    size: q.size,
                    ..CreateOptions::default()
                };
                match q.version.as_deref() {
                    None | Some("v3") => opts.version = 3,
                    Some("v2") => opts.version = 2,
                    Some(v) => {
                        return Err(QmpError::generic(format!(
                            "Invalid qcow2 version '{v}' (v2 or v3)"
                        )))
                    }
                }
                if let Some(c) = q.cluster_size {
                    opts.cluster_size = c;
                }
                if let Some(b) = q.refcount_bits {
                    opts.refcount_bits = b;
                }
                opts.lazy_refcounts = q.lazy_refcounts.unwrap_or(false);
                opts.extended_l2 = q.extended_l2.unwrap_or(false);
                opts.encrypt = encrypt;
                opts.backing_file = q.backing_file;
                opts.backing_fmt = q.backing_fmt;
                opts.preallocation = match q.preallocation {
                    Prealloc::Off => Preallocation::Off,
                    Prealloc::Metadata => Preallocation::Metadata,
                    Prealloc::Falloc => Preallocation::Falloc,
                    Prealloc::Full => Preallocation::Full,
                };
                Ok(Work::Qcow2 {
                    node,
                    filename,
                    opts,
                })
            }
        }
    }

    /// Does the creation (on the job's thread). Every file is truncated
    /// or written only once this job holds its write lock and no other
    /// node of `state` has it open (see [`NewFile`]), as QEMU ends the job
    /// with 'Failed to get "write" lock'.
    pub fn run(self, job: &super::Job, state: &State) -> Result<(), QmpError> {
        match self {
            Work::File {
                filename,
                size,
                prealloc,
            } => {
                let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, None);
                let new = NewFile::open(&filename, &in_use).map_err(QmpError::generic)?;
                let f = new.file();
                f.set_len(0).and_then(|()| f.set_len(size)).map_err(|e| {
                    QmpError::generic(format!("Could not resize '{filename}': {e}"))
                })?;
                match prealloc {
                    Prealloc::Off | Prealloc::Metadata => {}
                    Prealloc::Falloc => {
                        use std::os::fd::AsRawFd;
                        // SAFETY: plain syscall on an fd we own.
                        let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, size as i64) };
                        if r != 0 {
                            return Err(QmpError::generic(format!(
                                "Could not preallocate '{filename}': {}",
                                std::io::Error::last_os_error()
                            )));
                        }
                    }
                    Prealloc::Full => {
                        let zeroes = vec![0u8; 1 << 20];
                        let mut at = 0u64;
                        while at < size {
                            if !job.pause_point() {
                                return Err(QmpError::generic("Operation canceled"));
                            }
                            let n = (size - at).min(zeroes.len() as u64) as usize;
                            f.write_all_at(&zeroes[..n], at).map_err(|e| {
                                QmpError::generic(format!("Could not write '{filename}': {e}"))
                            })?;
                            at += n as u64;
                            job.progress(at, size);
                        }
                    }
                }
                f.sync_all()
                    .map_err(|e| QmpError::generic(format!("Could not flush '{filename}': {e}")))?;
                job.progress(size, size);
                Ok(())
            }
            Work::Rbd(creation) => {
                job.progress(0, 1);
                creation.run().map_err(QmpError::generic)?;
                job.progress(1, 1);
                Ok(())
            }
            Work::Luks {
                node,
                filename,
                spec,
                secret,
                size,
            } => {
                job.progress(0, 1);
                let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, Some(&node));
                let new = NewFile::open(&filename, &in_use).map_err(QmpError::generic)?;
                crate::drivers::luks::create_file(new.file(), &spec, secret.bytes(), size)
                    .map_err(QmpError::generic)?;
                drop(new);
                if let Some(f) = node.protocol_file() {
                    f.refresh_size().map_err(|e| {
                        QmpError::generic(format!("Could not read the size of '{filename}': {e}"))
                    })?;
                }
                job.progress(1, 1);
                Ok(())
            }
            Work::Raw { node, size } => {
                let Some(f) = node.protocol_file() else {
                    return Err(QmpError::generic("not a file node"));
                };
                // The node's own descriptor takes no lock (it has no
                // parents); another node or process may hold the file.
                let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, Some(&node));
                let lock = NewFile::open(f.filename(), &in_use).map_err(QmpError::generic)?;
                f.set_len(&node, size)
                    .map_err(|e| QmpError::generic(e.to_string()))?;
                drop(lock);
                job.progress(1, 1);
                Ok(())
            }
            Work::Qcow2 {
                node,
                filename,
                opts,
            } => {
                job.progress(0, 1);
                let in_use = |dev, ino| file::node_using(&state.graph(), dev, ino, Some(&node));
                crate::drivers::qcow2::create_in(&filename, &opts, &in_use)
                    .map_err(QmpError::generic)?;
                if let Some(f) = node.protocol_file() {
                    f.refresh_size().map_err(|e| {
                        QmpError::generic(format!("Could not read the size of '{filename}': {e}"))
                    })?;
                }
                job.progress(1, 1);
                Ok(())
            }
        }
    }
}
