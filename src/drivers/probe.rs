//! Format probing for the short form (`--image` without `--format`), by the
//! magic numbers QEMU's block drivers probe for (block/*.c `*_probe`); the
//! raw driver asks it again before a write to the first sector of a probed
//! raw image (see [`crate::drivers::RawOptions::probed`]).

use std::io::Read;
use std::path::Path;

/// What the first bytes of an image say it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probed {
    /// No known header: raw.
    Raw,
    /// A qcow2 header (magic `QFI\xfb`, version 2 or 3).
    Qcow2,
    /// Another format's header, which this daemon cannot open: its name.
    Other(&'static str),
}

/// Bytes read to probe (every magic above lies within them).
pub const PROBE_LEN: usize = 2048;
/// The first sector: a probed raw image refuses a write that would give it
/// a header here (QEMU's BLOCK_PROBE_BUF_SIZE).
pub const GUARDED_LEN: u64 = 512;

/// Classifies the first bytes of an image.
pub fn probe_bytes(buf: &[u8]) -> Probed {
    let at = |off: usize, magic: &[u8]| buf.get(off..off + magic.len()) == Some(magic);
    if at(0, b"QFI\xfb") {
        let version = buf
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]));
        return match version {
            Some(2) | Some(3) => Probed::Qcow2,
            _ => Probed::Other("qcow"),
        };
    }
    const OTHERS: &[(usize, &[u8], &str)] = &[
        (0, b"QED\0", "qed"),
        (0, b"KDMV", "vmdk"),
        (0, b"COWD", "vmdk"),
        (0, b"# Disk DescriptorFile", "vmdk"),
        (0, b"vhdxfile", "vhdx"),
        (0, b"conectix", "vpc"),
        (0, b"LUKS\xba\xbe", "luks"),
        (0, b"WithoutFreeSpace", "parallels"),
        (0, b"WithouFreSpacExt", "parallels"),
        (0, b"Bochs Virtual HD Image", "bochs"),
        (0, b"#!/bin/sh\n#V2.0 Format\nmodprobe cloop", "cloop"),
        // VDI: the signature 0xbeda107f, little-endian, at 0x40.
        (0x40, b"\x7f\x10\xda\xbe", "vdi"),
    ];
    for (off, magic, name) in OTHERS {
        if at(*off, magic) {
            return Probed::Other(name);
        }
    }
    Probed::Raw
}

/// Reads the start of the image at `path` and classifies it.
pub fn probe_file(path: &Path) -> std::io::Result<Probed> {
    let mut buf = Vec::with_capacity(PROBE_LEN);
    std::fs::File::open(path)?
        .take(PROBE_LEN as u64)
        .read_to_end(&mut buf)?;
    Ok(probe_bytes(&buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magics_are_recognised() {
        let mut q = b"QFI\xfb\0\0\0\x03".to_vec();
        q.resize(512, 0);
        assert_eq!(probe_bytes(&q), Probed::Qcow2);
        q[7] = 1;
        assert_eq!(probe_bytes(&q), Probed::Other("qcow"));
        assert_eq!(probe_bytes(b"QED\0xxxx"), Probed::Other("qed"));
        assert_eq!(probe_bytes(b"conectix"), Probed::Other("vpc"));
        let mut vdi = vec![0u8; 512];
        vdi[0x40..0x44].copy_from_slice(&0xbeda107fu32.to_le_bytes());
        assert_eq!(probe_bytes(&vdi), Probed::Other("vdi"));
        assert_eq!(probe_bytes(&[0u8; 512]), Probed::Raw);
        assert_eq!(probe_bytes(b""), Probed::Raw);
        assert_eq!(probe_bytes(b"QFI"), Probed::Raw);
    }
}
