//! Changing an image's place in a chain (external snapshots, block jobs,
//! change-backing-file): its backing edge and the backing file name and
//! format its header records.

use std::os::unix::fs::FileExt;

use super::{header, Qcow2Driver};
use crate::block::Child;

impl Qcow2Driver {
    /// Gives an image without a backing node one (blockdev-snapshot). The
    /// caller holds the node's users in a drained section.
    pub fn set_backing(&self, child: Child) -> Result<(), String> {
        if self.backing().is_some() {
            return Err(format!("node '{}' already has a backing node", self.name));
        }
        self.backing.replace(Some(child));
        Ok(())
    }

    /// The backing file name the header records.
    pub fn backing_file_name(&self) -> Option<String> {
        self.backing_name
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// change-backing-file: rewrites the backing file name in the header
    /// (in place, after the header extensions, which stay as they are).
    /// The image may be a read-only backing image: the header is written
    /// through a descriptor of its own; nothing else of it changes.
    pub fn change_backing_file(&self, name: &str) -> Result<(), String> {
        use std::os::unix::fs::FileExt;
        if name.len() > header::MAX_BACKING_NAME as usize {
            return Err("the backing file name is too long".into());
        }
        // No header field update of ours may interleave.
        let mut meta_guard = futures::executor::block_on(self.meta.lock());
        meta_guard.backing_name_bytes = (!name.is_empty()).then(|| name.as_bytes().to_vec());
        let (file, hdr) = self.header_cluster()?;
        // Where the extensions end: the name goes right after them.
        let off = self.extension_end(&hdr);
        if name.is_empty() {
            let mut f = [0u8; 12];
            f[..8].copy_from_slice(&0u64.to_be_bytes());
            file.write_all_at(&f, 8).map_err(|e| e.to_string())?;
        } else {
            if off + name.len() > hdr.len() {
                return Err("the backing file name does not fit in the header cluster".into());
            }
            file.write_all_at(name.as_bytes(), off as u64)
                .map_err(|e| e.to_string())?;
            file.sync_data().map_err(|e| e.to_string())?;
            let mut f = Vec::with_capacity(12);
            f.extend_from_slice(&(off as u64).to_be_bytes());
            f.extend_from_slice(&(name.len() as u32).to_be_bytes());
            file.write_all_at(&f, 8).map_err(|e| e.to_string())?;
        }
        file.sync_data().map_err(|e| e.to_string())?;
        *self.backing_name.lock().unwrap_or_else(|e| e.into_inner()) =
            (!name.is_empty()).then(|| name.to_string());
        Ok(())
    }

    /// Points the backing edge at another node (or none). The old edge
    /// gives up its permissions at once. The caller holds the node's
    /// users in a drained section.
    pub fn replace_backing(&self, new: Option<Child>) {
        let old = self.backing();
        self.backing.replace(new);
        if let Some(o) = old {
            o.release();
        }
    }

    /// Rewrites the backing file name and, when the header has a backing
    /// format extension, the format it names (its padded room of eight
    /// bytes holds "qcow2" and "raw" alike). An empty name removes the
    /// backing file.
    pub fn change_backing_file_and_format(
        &self,
        name: &str,
        format: Option<&str>,
    ) -> Result<(), String> {
        if let Some(fmt) = format.filter(|_| !name.is_empty()) {
            self.set_backing_format(fmt)?;
        }
        self.change_backing_file(name)
    }

    /// The image file opened for writing, and its first cluster (at most
    /// 64 KiB): the header and its extensions.
    pub(super) fn header_cluster(&self) -> Result<(std::fs::File, Vec<u8>), String> {
        let path = super::super::file_name_of(self.f())
            .ok_or_else(|| format!("node '{}' has no image file", self.name))?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open '{path}' for writing: {e}"))?;
        let mut hdr = vec![0u8; self.g.cs.min(1 << 16) as usize];
        let n = file.read_at(&mut hdr, 0).map_err(|e| e.to_string())?;
        hdr.truncate(n);
        Ok((file, hdr))
    }

    /// The header extensions: (offset of the extension's header, type,
    /// length), up to the end marker.
    fn extensions(&self, hdr: &[u8]) -> Vec<(usize, u32, usize)> {
        let be32 =
            |b: &[u8], o: usize| u32::from_be_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let mut out = Vec::new();
        let mut off = self.header().header_length as usize;
        while off + 8 <= hdr.len() {
            let ty = be32(hdr, off);
            let len = be32(hdr, off + 4) as usize;
            out.push((off, ty, len));
            if ty == header::EXT_END {
                break;
            }
            off += 8 + len.div_ceil(8) * 8;
        }
        out
    }

    /// Where the extensions end (after the end marker).
    pub(super) fn extension_end(&self, hdr: &[u8]) -> usize {
        match self.extensions(hdr).last() {
            Some((off, header::EXT_END, _)) => off + 8,
            Some((off, _, len)) => off + 8 + len.div_ceil(8) * 8,
            None => self.header().header_length as usize,
        }
    }

    fn set_backing_format(&self, fmt: &str) -> Result<(), String> {
        let _meta = futures::executor::block_on(self.meta.lock());
        let (file, hdr) = self.header_cluster()?;
        let Some(&(off, _, len)) = self
            .extensions(&hdr)
            .iter()
            .find(|e| e.1 == header::EXT_BACKING_FORMAT)
        else {
            return Ok(()); // no format recorded: readers probe
        };
        let room = len.div_ceil(8) * 8;
        if fmt.len() > room || off + 8 + room > hdr.len() {
            return Err("the backing format does not fit in the header".into());
        }
        let mut data = vec![0u8; room];
        data[..fmt.len()].copy_from_slice(fmt.as_bytes());
        file.write_all_at(&data, (off + 8) as u64)
            .map_err(|e| e.to_string())?;
        file.write_all_at(&(fmt.len() as u32).to_be_bytes(), (off + 4) as u64)
            .map_err(|e| e.to_string())?;
        file.sync_data().map_err(|e| e.to_string())
    }
}
