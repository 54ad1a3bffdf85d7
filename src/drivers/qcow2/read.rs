//! Guest reads and what they share with writes (QEMU's qcow2-cluster.c
//! mapping and qcow2_co_preadv_part): guest offsets mapped to extents
//! under the metadata lock, each extent read from the file child, as
//! zeroes, from the backing child or inflated; block status; flush; and
//! marking the image corrupt when metadata is found wrong.

use std::sync::atomic::Ordering;

use super::meta::{self, Meta, Sc};
use super::{header, Allocation, BlockStatus, Qcow2Driver};
use crate::block::{BlockError, DebugEvent as Ev, Node};
use crate::io::IoVecs;

/// The encryption sector of encrypted images.
const SECTOR: u64 = crate::drivers::luks::format::SECTOR;

impl Qcow2Driver {
    pub(super) async fn corrupt(&self, m: &mut Meta, node: &Node, reason: String) -> BlockError {
        if !m.corrupt {
            m.corrupt = true;
            log::error!(
                "node {}: image is corrupt: {reason}; no more writes",
                self.name
            );
            node.set_read_only(true);
            crate::events::global().emit(
                "BLOCK_IMAGE_CORRUPTED",
                serde_json::json!({
                    "device": "",
                    "node-name": self.name,
                    "msg": reason,
                    "fatal": true,
                }),
            );
            // Mark the image corrupt on disk, best effort.
            if self.header().version >= 3 {
                let f = self.f();
                let incompat =
                    (self.header().incompatible | header::INCOMPAT_CORRUPT).to_be_bytes();
                if m.write_header_field(f, header::OFF_INCOMPAT, &incompat)
                    .await
                    .is_ok()
                {
                    let _ = f.flush().await;
                }
            }
        }
        m.corrupt_err(reason)
    }

    /// The extent at guest offset `pos`: what it reads as, and how many
    /// bytes (at most `want`) read the same way from consecutive places.
    async fn map(&self, m: &mut Meta, pos: u64, want: u64) -> Result<(Sc, u64), BlockError> {
        let g = self.g;
        let gc = pos >> g.cluster_bits;
        let (e, b, _) = m.entry(self.f(), gc).await?;
        let in_c = pos & (g.cs - 1);
        let i = in_c >> g.sc_bits;
        let st = meta::sc_state(&g, e, b, i).map_err(|r| m.corrupt_err(r))?;
        let mut n = ((i + 1) << g.sc_bits) - in_c;
        if let Sc::Compressed(_) = st {
            return Ok((st, (g.cs - in_c).min(want)));
        }
        // Extend over the following subclusters while they read the same
        // way (contiguous on the host for data), within this L2 table.
        let mut next = pos + n;
        while n < want {
            let ngc = next >> g.cluster_bits;
            if ngc >> g.l2_bits != gc >> g.l2_bits {
                break;
            }
            let (ne, nb) = if ngc == gc {
                (e, b)
            } else {
                let (ne, nb, _) = m.entry(self.f(), ngc).await?;
                (ne, nb)
            };
            let ni = (next & (g.cs - 1)) >> g.sc_bits;
            let nst = meta::sc_state(&g, ne, nb, ni).map_err(|r| m.corrupt_err(r))?;
            let same = match (st, nst) {
                (Sc::Data(h), Sc::Data(nh)) => nh == h + n,
                (Sc::Zero, Sc::Zero) | (Sc::Unallocated, Sc::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n += g.sc_size();
            next += g.sc_size();
        }
        Ok((st, n.min(want)))
    }

    /// Reads `part` (guest bytes at `pos`) as the extent state `st` says.
    pub(super) async fn read_extent(
        &self,
        st: Sc,
        pos: u64,
        part: &IoVecs,
    ) -> Result<(), BlockError> {
        match st {
            Sc::Data(h) => {
                let in_sc = pos & (self.g.sc_size() - 1);
                self.f().debug_event(Ev::ReadAio);
                self.read_data(h + in_sc, pos, part).await
            }
            Sc::Zero => {
                part.fill_zero();
                Ok(())
            }
            Sc::Unallocated => self.read_backing(pos, part).await,
            Sc::Compressed(entry) => self.read_compressed(entry, pos, part).await,
        }
    }

    /// Data cluster bytes at `host` (guest offset `pos`) into `part`:
    /// decrypted in a bounce buffer first when the image is encrypted. The
    /// IV is the host sector number: QEMU sets crypt_physical_offset for
    /// LUKS in qcow2 (the guest offset is the legacy AES method's).
    pub(super) async fn read_data(
        &self,
        host: u64,
        pos: u64,
        part: &IoVecs,
    ) -> Result<(), BlockError> {
        match &self.crypto {
            None => self.f().preadv(host, part).await,
            Some(v) => {
                self.check_crypt_aligned("read", pos, part.len())?;
                v.read(self.f(), host, host / SECTOR, part).await
            }
        }
    }

    /// `part` (guest offset `pos`) into the data cluster bytes at `host`:
    /// encrypted in a bounce buffer when the image is encrypted.
    pub(super) async fn write_data(
        &self,
        host: u64,
        pos: u64,
        part: &IoVecs,
        fua: bool,
    ) -> Result<(), BlockError> {
        match &self.crypto {
            None => self.f().pwritev(host, part, fua).await,
            Some(v) => {
                self.check_crypt_aligned("write", pos, part.len())?;
                v.write(self.f(), host, host / SECTOR, part, fua).await
            }
        }
    }

    fn check_crypt_aligned(&self, op: &'static str, pos: u64, len: u64) -> Result<(), BlockError> {
        // Host and guest offsets agree modulo the cluster size.
        if pos % SECTOR == 0 && len % SECTOR == 0 {
            return Ok(());
        }
        Err(BlockError::Io {
            node: self.name.clone(),
            op,
            offset: pos,
            len,
            source: std::io::Error::from_raw_os_error(libc::EINVAL),
        })
    }

    async fn read_backing(&self, pos: u64, part: &IoVecs) -> Result<(), BlockError> {
        let Some(b) = self.backing() else {
            part.fill_zero();
            return Ok(());
        };
        self.f().debug_event(Ev::ReadBackingAio);
        let bsize = b.node().size();
        if pos >= bsize {
            part.fill_zero();
            return Ok(());
        }
        let n = part.len().min(bsize - pos);
        if n == part.len() {
            return b.node().preadv(pos, part).await;
        }
        b.node().preadv(pos, &part.head(n)).await?;
        part.tail(n).fill_zero();
        Ok(())
    }

    async fn read_compressed(&self, entry: u64, pos: u64, part: &IoVecs) -> Result<(), BlockError> {
        let g = self.g;
        let (off, len) = g.compressed(entry);
        let a = u64::from(self.f().request_alignment()).max(512);
        let start = off / a * a;
        let end = (off + len).div_ceil(a) * a;
        self.f().debug_event(Ev::ReadCompressed);
        let raw = meta::read_buf(self.f(), start, (end - start) as usize).await?;
        let input = &raw[(off - start) as usize..(off - start + len) as usize];
        let mut out = vec![0u8; g.cs as usize];
        let mut z = flate2::Decompress::new(false);
        let r = z.decompress(input, &mut out, flate2::FlushDecompress::Finish);
        let ok = matches!(
            r,
            Ok(flate2::Status::StreamEnd) | Ok(flate2::Status::Ok) | Ok(flate2::Status::BufError)
        );
        if !ok || z.total_out() != g.cs {
            return Err(BlockError::Corrupt {
                node: self.name.clone(),
                reason: format!("compressed cluster at {off:#x} does not inflate to a cluster"),
            });
        }
        let in_c = (pos & (g.cs - 1)) as usize;
        part.copy_from(&out[in_c..in_c + part.len() as usize]);
        Ok(())
    }

    pub async fn preadv(&self, offset: u64, iov: &IoVecs) -> Result<(), BlockError> {
        let len = iov.len();
        let mut done = 0;
        while done < len {
            let pos = offset + done;
            let (st, n) = {
                let mut m = self.meta.lock().await;
                let r = self.map(&mut m, pos, len - done).await?;
                if matches!(r.0, Sc::Data(_) | Sc::Compressed(_)) {
                    self.data_inflight.fetch_add(1, Ordering::AcqRel);
                }
                r
            };
            let uses_host = matches!(st, Sc::Data(_) | Sc::Compressed(_));
            let part = if done == 0 && n == len {
                iov.clone()
            } else {
                iov.sub(done, n)
            };
            let r = self.read_extent(st, pos, &part).await;
            if uses_host {
                self.io_done();
            }
            r?;
            done += n;
        }
        Ok(())
    }

    /// Writes dirty metadata under the lock, then syncs the file without
    /// it, so that guest I/O on other queues goes on during the fsync.
    pub async fn flush(&self) -> Result<(), BlockError> {
        // QEMU's bdrv_co_flush raises these on the file child around the
        // format's flush_to_os (its caches written) and before the file's
        // flush.
        self.f().debug_event(Ev::FlushToOs);
        let covered = self.meta.lock().await.write_tables(self.f()).await?;
        self.f().debug_event(Ev::FlushToDisk);
        self.f().flush().await?;
        let mut m = self.meta.lock().await;
        m.unrefs_durable(covered);
        let no_io = self.no_io();
        m.apply_unrefs(self.f(), no_io).await
    }

    /// Block status of guest `[offset, offset + len)` from its start: what
    /// the first extent is, how long, at which depth of the chain.
    pub async fn block_status(&self, offset: u64, len: u64) -> Result<BlockStatus, BlockError> {
        let (st, n) = {
            let mut m = self.meta.lock().await;
            self.map(&mut m, offset, len).await?
        };
        Ok(match st {
            Sc::Data(_) | Sc::Compressed(_) => BlockStatus {
                kind: Allocation::Data,
                len: n,
                depth: 0,
            },
            Sc::Zero => BlockStatus {
                kind: Allocation::Zero,
                len: n,
                depth: 0,
            },
            Sc::Unallocated => match self.backing() {
                None => BlockStatus {
                    kind: Allocation::Unallocated,
                    len: n,
                    depth: 0,
                },
                Some(b) => {
                    let bsize = b.node().size();
                    if offset >= bsize {
                        BlockStatus {
                            kind: Allocation::Unallocated,
                            len: n,
                            depth: 0,
                        }
                    } else {
                        let mut s = b.node().block_status(offset, n.min(bsize - offset)).await?;
                        s.depth += 1;
                        s
                    }
                }
            },
        })
    }
}
