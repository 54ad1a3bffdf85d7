//! The request path of one virtqueue, as an iothread runs it: avail ring ->
//! descriptor-chain walk (direct and indirect) -> request parsing ->
//! execution on a null-co node -> status byte -> used ring.
//!
//! Input: a 16-byte header of parameters, then the guest memory image
//! from guest address 0 (the rest of guest memory is zero):
//!
//! ```text
//!   0..2   queue size            2..4   descriptor table address
//!   4..6   avail ring address    6..8   used ring address
//!   8      flags: 1 read-only, 2 4K logical blocks, 4 read-zeroes off
//!   9      seg_max               10     chains to pop (at most 64)
//!   11     max discard/write-zeroes segments
//!   12..16 size_max
//! ```
//!
//! Guest memory is three regions: two adjacent 64 KiB ones at 0 (a buffer
//! may span them) and 4 KiB at 1 MiB.
#![no_main]

use std::sync::{Arc, OnceLock};

use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use vhost_user_blkd::block::{BlockBackend, Graph};
use vhost_user_blkd::drivers::BlockdevOptions;
use vhost_user_blkd::virtio_blk::guest::{self, Rings};
use vhost_user_blkd::virtio_blk::{execute, parse, Limits, Outcome, Parsed, Status};
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};

const CAPACITY: u64 = 1 << 20;

fn backend(read_zeroes: bool) -> &'static BlockBackend {
    static ZEROES: OnceLock<(Graph, BlockBackend)> = OnceLock::new();
    static GARBAGE: OnceLock<(Graph, BlockBackend)> = OnceLock::new();
    let cell = if read_zeroes { &ZEROES } else { &GARBAGE };
    &cell
        .get_or_init(|| {
            let o: BlockdevOptions = serde_json::from_value(serde_json::json!({
                "driver": "null-co", "node-name": "n0", "size": CAPACITY,
                "read-zeroes": read_zeroes,
            }))
            .expect("null-co options");
            let mut g = Graph::new();
            let node = g.add(&o).expect("null-co node");
            let blk = BlockBackend::new("fuzz", Arc::clone(&node), true).expect("backend");
            (g, blk)
        })
        .1
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 16 {
        return;
    }
    let (h, image) = data.split_at(16);
    let queue_size = u16_at(h, 0);
    let table = u64::from(u16_at(h, 2));
    let avail = u64::from(u16_at(h, 4));
    let used = u64::from(u16_at(h, 6));
    let flags = h[8];
    let lbs = if flags & 2 != 0 { 4096 } else { 512 };
    let limits = Limits {
        capacity_bytes: CAPACITY,
        logical_block_size: lbs,
        physical_block_size: lbs,
        num_queues: 1,
        seg_max: u32::from(h[9]),
        size_max: u32::from_le_bytes([h[12], h[13], h[14], h[15]]),
        max_discard_sectors: 2048,
        max_discard_seg: u32::from(h[11]),
        max_write_zeroes_sectors: 2048,
        max_write_zeroes_seg: u32::from(h[11]),
        write_zeroes_may_unmap: true,
        read_only: flags & 1 != 0,
    };
    let chains = u16::from(h[10].min(64));

    let mem: GuestMemoryMmap<()> = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
        (GuestAddress(0x10_0000), 0x1000),
    ])
    .expect("guest memory");
    let n = image.len().min(0x2_0000);
    mem.write_slice(&image[..n], GuestAddress(0))
        .expect("image fits the first two regions");
    let atomic = GuestMemoryAtomic::new(mem);
    let guard = std::rc::Rc::new(atomic.memory());
    let blk = backend(flags & 4 == 0);

    let rings = Rings::map(&guard, avail, used, queue_size);
    let mut used_idx = 0u16;
    for i in 0..chains {
        let head = match &rings {
            Some(r) => r.avail_head(i),
            None => i,
        };
        let (head, status, used_len) = match parse(guard.clone(), table, queue_size, head, &limits)
        {
            Parsed::Request(req) => {
                let st = match block_on(execute(&req, blk, b"fuzz-serial")) {
                    Outcome::Done(s) => s,
                    Outcome::Failed { .. } => Status::IoErr,
                };
                let len = if st == Status::Ok { req.used_len } else { 1 };
                (req.head, Some((req.status, st)), len)
            }
            Parsed::Failed {
                head,
                status,
                error,
                ..
            } => (head, status.map(|a| (a, error.status())), 1),
        };
        if let Some((addr, st)) = status {
            guest::write_byte(&guard, addr, st as u8);
        }
        if let Some(r) = &rings {
            r.put_used(used_idx, head, used_len);
            used_idx = used_idx.wrapping_add(1);
        }
    }
    if let Some(r) = &rings {
        r.publish_used(used_idx);
        let _ = r.needs_event(0, used_idx);
    }
});
