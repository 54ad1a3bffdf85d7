//! The `luks` format driver (QEMU's block/crypto.c over
//! crypto/block-luks.c): a LUKS1 volume on its `file` child, unlocked with
//! the passphrase of the `key-secret` object.
//!
//! The guest sees the payload: the file minus the header and key slots.
//! Requests are whole 512-byte sectors; each goes through a bounce buffer
//! on the iothread that runs it: a read is decrypted there once the file
//! read completed and then copied to the guest's buffer, a write is
//! copied from the guest's buffer and encrypted there before it is
//! written (guest memory is never encrypted in place). The IV of a sector
//! is its number from the start of the payload, as in QEMU.
//!
//! The master key lives in the cipher's key schedule only; the passphrase
//! and keys never reach an error, a log line or query output (the options
//! name the secret's id, never its value).

pub mod format;

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Deserialize;

use super::{BlockdevRef, DiscardMode};
use crate::block::{BlockError, Child, ChildRole, Graph, GraphError, Node, Perm};
use crate::io::IoVecs;
use crate::opts;

pub use format::{CreateSpec, BAD_PASSWORD};

/// At most this much is encrypted or decrypted per bounce buffer (QEMU's
/// BLOCK_CRYPTO_MAX_IO_SIZE).
const MAX_IO: u64 = 1 << 20;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct LuksOptions {
    #[serde(default)]
    pub node_name: String,
    pub file: BlockdevRef,
    /// The id of the `secret` object holding the passphrase.
    pub key_secret: Option<String>,
    /// A detached header (QEMU's `header`): not supported here.
    #[serde(default)]
    pub header: Option<BlockdevRef>,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    #[serde(default)]
    pub discard: DiscardMode,
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    #[serde(default)]
    pub cache: super::CacheOptions,
}

fn perms(read_only: bool) -> (Perm, Perm) {
    if read_only {
        (Perm::CONSISTENT_READ, Perm::ALL)
    } else {
        (
            Perm::CONSISTENT_READ | Perm::WRITE,
            Perm::CONSISTENT_READ | Perm::WRITE_UNCHANGED,
        )
    }
}

/// An unlocked volume: the payload cipher and where the payload starts.
pub struct Volume {
    pub cipher: format::Cipher,
    pub payload: u64,
    pub spec: format::Spec,
    pub hash: format::Hash,
}

impl Volume {
    /// Reads the header at `base` of `file`, and unlocks it with
    /// `password`, trying every active key slot.
    pub async fn unlock(file: &Node, base: u64, password: &[u8]) -> Result<Volume, String> {
        let read = |off: u64, len: usize| async move {
            let (iov, view) = IoVecs::bounce(len, 4096);
            file.preadv(off, &iov)
                .await
                .map_err(|e| format!("Could not read the LUKS header: {e}"))?;
            Ok::<_, String>(view.with_bytes(&iov, |b| b.to_vec()))
        };
        if file.size() < base + format::HEADER_LEN as u64 {
            return Err("Volume is not in LUKS format".into());
        }
        let h = format::Header::parse(&read(base, 4096.min((file.size() - base) as usize)).await?)?;
        if base + h.payload_bytes() > file.size() {
            return Err(format!(
                "LUKS payload is overlapping with the header (payload offset {} beyond the end of the file)",
                h.payload_bytes()
            ));
        }
        for (i, off) in h.active_slots() {
            let mut m = read(base + off, h.material_len()).await?;
            let mk = h.try_slot(i, password, &m);
            format::wipe(&mut m);
            if let Some(mut mk) = mk {
                let cipher = format::Cipher::new(&h.spec, &mk);
                format::wipe(&mut mk);
                return Ok(Volume {
                    cipher,
                    payload: h.payload_bytes(),
                    spec: h.spec,
                    hash: h.hash,
                });
            }
        }
        Err(BAD_PASSWORD.into())
    }

    /// Reads `iov.len()` bytes at guest offset `offset` (whole sectors)
    /// from `file` at `at`: into a bounce buffer, decrypted there, then
    /// copied to `iov`. `sector` is the first sector's IV number.
    pub async fn read(
        &self,
        file: &Node,
        at: u64,
        sector: u64,
        iov: &IoVecs,
    ) -> Result<(), BlockError> {
        let mut done = 0;
        while done < iov.len() {
            let n = (iov.len() - done).min(MAX_IO);
            let (b, view) = IoVecs::bounce(n as usize, 4096);
            file.preadv(at + done, &b).await?;
            view.with_bytes(&b, |bytes| {
                self.cipher.decrypt(bytes, sector + done / format::SECTOR);
                iov.sub(done, n).copy_from(bytes);
            });
            done += n;
        }
        Ok(())
    }

    /// Writes `iov` (whole sectors) encrypted: copied to a bounce buffer
    /// and encrypted there before it goes to `file` at `at`.
    pub async fn write(
        &self,
        file: &Node,
        at: u64,
        sector: u64,
        iov: &IoVecs,
        fua: bool,
    ) -> Result<(), BlockError> {
        let mut done = 0;
        while done < iov.len() {
            let n = (iov.len() - done).min(MAX_IO);
            let (b, view) = IoVecs::bounce(n as usize, 4096);
            view.with_bytes(&b, |bytes| {
                iov.sub(done, n).copy_to(bytes);
                self.cipher.encrypt(bytes, sector + done / format::SECTOR);
            });
            file.pwritev(at + done, &b, fua).await?;
            done += n;
        }
        Ok(())
    }
}

pub struct LuksDriver {
    file: Child,
    vol: Volume,
    size: AtomicU64,
    name: String,
}

fn unaligned(node: &str, op: &'static str, offset: u64, len: u64) -> BlockError {
    BlockError::Io {
        node: node.to_string(),
        op,
        offset,
        len,
        source: std::io::Error::from_raw_os_error(libc::EINVAL),
    }
}

/// The passphrase of secret `id` (QEMU's error when it does not exist).
pub fn secret_of(
    graph: &Graph,
    id: Option<&str>,
) -> Result<std::sync::Arc<crate::secret::Secret>, String> {
    let id = id.ok_or("Parameter 'key-secret' is required for cipher")?;
    graph
        .secret(id)
        .ok_or_else(|| format!("No secret with id '{id}'"))
}

impl LuksDriver {
    pub fn open(o: &LuksOptions, graph: &mut Graph) -> Result<Self, GraphError> {
        let err = |reason: String| GraphError::Open {
            node: o.node_name.clone(),
            reason,
        };
        if o.header.is_some() {
            return Err(err(
                "a detached LUKS header ('header') is not supported".into()
            ));
        }
        let secret = secret_of(graph, o.key_secret.as_deref()).map_err(err)?;
        let child = super::open_child(graph, &o.node_name, "file", &o.file, o.discard)?;
        let vol =
            futures::executor::block_on(Volume::unlock(&child, 0, secret.bytes())).map_err(err)?;
        let size = child.size().saturating_sub(vol.payload) / format::SECTOR * format::SECTOR;
        let (perm, shared) = perms(o.read_only);
        let file = Child::attach(&o.node_name, ChildRole::File, child, perm, shared)?;
        Ok(LuksDriver {
            file,
            vol,
            size: AtomicU64::new(size),
            name: o.node_name.clone(),
        })
    }

    pub fn file(&self) -> &Child {
        &self.file
    }

    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Relaxed)
    }

    /// Activation: the payload follows the file again.
    pub fn reread_size(&self) {
        let s = self.file.node().size().saturating_sub(self.vol.payload);
        self.size
            .store(s / format::SECTOR * format::SECTOR, Ordering::Relaxed);
    }

    pub fn request_alignment(&self) -> u32 {
        self.file
            .node()
            .request_alignment()
            .max(format::SECTOR as u32)
    }

    pub fn truncate(&self, size: u64) -> Result<(), String> {
        if size % format::SECTOR != 0 {
            return Err(format!(
                "The new size {size} must be a multiple of the encryption sector size {}",
                format::SECTOR
            ));
        }
        let end = self
            .vol
            .payload
            .checked_add(size)
            .ok_or_else(|| format!("size {size} is too large"))?;
        self.file.node().truncate(end)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn aligned(offset: u64, len: u64) -> bool {
        offset % format::SECTOR == 0 && len % format::SECTOR == 0
    }

    pub async fn preadv(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        if !Self::aligned(offset, iov.len()) {
            return Err(unaligned(&self.name, "read", offset, iov.len()));
        }
        let f = self.file.node();
        self.vol
            .read(f, self.vol.payload + offset, offset / format::SECTOR, iov)
            .await
    }

    pub async fn pwritev(&self, offset: u64, iov: &IoVecs, fua: bool) -> Result<(), BlockError> {
        if !Self::aligned(offset, iov.len()) {
            return Err(unaligned(&self.name, "write", offset, iov.len()));
        }
        let f = self.file.node();
        self.vol
            .write(
                f,
                self.vol.payload + offset,
                offset / format::SECTOR,
                iov,
                fua,
            )
            .await
    }

    /// Zeroes are written encrypted, as QEMU's generic fallback does for
    /// the crypto driver (the file's zeroes would decrypt to noise).
    pub async fn pwrite_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), BlockError> {
        if !Self::aligned(offset, len) {
            return Err(unaligned(&self.name, "write", offset, len));
        }
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MAX_IO);
            let (z, _view) = IoVecs::bounce(n as usize, 4096);
            self.pwritev(offset + done, &z, fua).await?;
            done += n;
        }
        Ok(())
    }

    /// Which secret opened the node (for query output: the id only).
    pub fn cipher_description(&self) -> String {
        format!(
            "aes-{}-{}",
            self.vol.spec.aes_key * 8,
            self.vol.spec.mode_string()
        )
    }
}

/// Formats `file` as a LUKS volume of `size` bytes of payload holding
/// `password` in slot 0 (blockdev-create driver=luks, `create -f luks`):
/// writes the header and key material at offset 0 and sizes the file.
pub fn create_file(
    f: &std::fs::File,
    c: &CreateSpec,
    password: &[u8],
    size: u64,
) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    if size % format::SECTOR != 0 {
        return Err(format!(
            "The size {size} must be a multiple of the encryption sector size {}",
            format::SECTOR
        ));
    }
    let v = format::create(c, password)?;
    let end = v
        .payload
        .checked_add(size)
        .ok_or_else(|| format!("size {size} is too large"))?;
    f.set_len(0)
        .and_then(|()| f.set_len(end))
        .map_err(|e| format!("Could not resize the image: {e}"))?;
    f.write_all_at(&v.head, 0)
        .map_err(|e| format!("Could not write the LUKS header: {e}"))?;
    f.sync_all()
        .map_err(|e| format!("Could not flush the image: {e}"))
}
