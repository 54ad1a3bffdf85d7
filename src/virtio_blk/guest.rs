//! Direct access to guest memory for the request path.
//!
//! vm-memory's generic accessors walk a slice iterator over regions for
//! every access; callgrind put them at ~1,500 instructions per null-co
//! request (a third of the total). Here an access that lies in one region
//! -- nearly all of them -- is one binary search over the regions plus a
//! bounds check; anything else falls back to vm-memory.
//!
//! The descriptor walk follows virtio 1.2, 2.7.5 (split virtqueues) with the
//! same rules and limits as virtio-queue's `DescriptorChain`, which it
//! replaces on this path: at most `queue size` descriptors (so a loop ends),
//! one level of indirection, an indirect table whose length is a multiple of
//! 16, and at most 4 GiB of buffers. A chain that breaks a rule ends where
//! it broke, and the request parser judges what is left.
//!
//! [`Rings`] reads avail entries and writes used entries the same way; a
//! batch of completions is published with one store of the used index.

use std::sync::atomic::{fence, AtomicU16, Ordering};

use vm_memory::{
    Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryLoadGuard, GuestMemoryMmap,
    GuestMemoryRegion, MemoryRegionAddress,
};

/// Guest memory as the vhost-user adapter maps it.
pub type GuestMem = GuestMemoryMmap<()>;
/// A snapshot of guest memory that stays mapped while it is held. Shared
/// within one iothread through an `Rc`: each request holds the snapshot
/// (its parse, its buffers), and an atomic reference count moved two or
/// three times per request cost more than the rest of its accounting (each
/// locked instruction waits for the thread's pending stores).
pub type MemGuard = std::rc::Rc<GuestMemoryLoadGuard<GuestMem>>;

/// A run of guest memory named by one descriptor (or part of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub addr: GuestAddress,
    pub len: u64,
}

const DESC_SIZE: u64 = 16;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

/// Copies `buf.len()` bytes of guest memory at `p` into `buf`, volatile
/// (the guest may change them under us).
///
/// # Safety
/// `p..p + buf.len()` must be mapped guest memory that stays mapped for the
/// call.
unsafe fn load(p: *const u8, buf: &mut [u8]) {
    for (i, b) in buf.iter_mut().enumerate() {
        // SAFETY: inside the range the caller vouches for.
        *b = unsafe { p.add(i).read_volatile() };
    }
}

/// The host address of `len` guest bytes at `addr`, if they lie in one
/// region. `len` 0 is allowed (any address in a region).
pub fn host_range(mem: &GuestMem, addr: GuestAddress, len: u64) -> Option<*mut u8> {
    let region = mem.find_region(addr)?;
    let offset = addr.0 - region.start_addr().0;
    if len > region.len() - offset {
        return None;
    }
    region.get_host_address(MemoryRegionAddress(offset)).ok()
}

/// Copies guest bytes at `addr` into `buf`; false if they are not all in
/// guest memory.
pub fn read(mem: &GuestMem, addr: GuestAddress, buf: &mut [u8]) -> bool {
    match host_range(mem, addr, buf.len() as u64) {
        Some(p) => {
            // SAFETY: `p..p + buf.len()` is mapped guest memory (checked by
            // host_range), kept mapped by the caller's memory guard.
            unsafe { load(p, buf) };
            true
        }
        None => mem.read_slice(buf, addr).is_ok(),
    }
}

/// Writes one byte (a status) into guest memory; false if it is not there.
pub fn write_byte(mem: &GuestMem, addr: GuestAddress, value: u8) -> bool {
    match host_range(mem, addr, 1) {
        // SAFETY: one mapped byte of guest memory, checked by host_range.
        Some(p) => unsafe {
            p.write_volatile(value);
            true
        },
        None => false,
    }
}

struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

/// A descriptor table: its guest address, its size, and its host address
/// when the whole table lies in one region.
struct Table {
    addr: u64,
    size: u16,
    host: Option<*const u8>,
}

impl Table {
    fn new(mem: &GuestMem, addr: u64, size: u16) -> Self {
        let host = host_range(mem, GuestAddress(addr), u64::from(size) * DESC_SIZE)
            .map(|p| p as *const u8);
        Table { addr, size, host }
    }

    fn read(&self, mem: &GuestMem, index: u16) -> Option<Desc> {
        let mut raw = [0u8; DESC_SIZE as usize];
        let at = u64::from(index) * DESC_SIZE;
        match self.host {
            // SAFETY: index < size, so the 16 bytes lie in the table, which
            // host_range found mapped in one region.
            Some(p) => unsafe { load(p.add(at as usize), &mut raw) },
            None => {
                let addr = GuestAddress(self.addr.checked_add(at)?);
                mem.read_slice(&mut raw, addr).ok()?;
            }
        }
        Some(Desc {
            addr: u64::from_le_bytes(raw[0..8].try_into().expect("8 bytes")),
            len: u32::from_le_bytes(raw[8..12].try_into().expect("4 bytes")),
            flags: u16::from_le_bytes(raw[12..14].try_into().expect("2 bytes")),
            next: u16::from_le_bytes(raw[14..16].try_into().expect("2 bytes")),
        })
    }
}

/// Calls `f(segment, device_writable)` for each buffer of the chain at
/// `head` in the descriptor table at `table` of a queue of `queue_size`.
pub fn walk_chain(
    mem: &GuestMem,
    table: u64,
    queue_size: u16,
    head: u16,
    mut f: impl FnMut(Segment, bool),
) {
    let mut table = Table::new(mem, table, queue_size);
    let mut next = head;
    let mut ttl = queue_size;
    let mut indirect = false;
    let mut bytes = 0u32;
    while ttl > 0 && next < table.size {
        let Some(d) = table.read(mem, next) else {
            return;
        };
        if d.flags & F_INDIRECT != 0 {
            if indirect || u64::from(d.len) % DESC_SIZE != 0 {
                return;
            }
            let Ok(size) = u16::try_from(u64::from(d.len) / DESC_SIZE) else {
                return;
            };
            table = Table::new(mem, d.addr, size);
            next = 0;
            ttl = size;
            indirect = true;
            continue;
        }
        let Some(b) = bytes.checked_add(d.len) else {
            return;
        };
        bytes = b;
        f(
            Segment {
                addr: GuestAddress(d.addr),
                len: u64::from(d.len),
            },
            d.flags & F_WRITE != 0,
        );
        if d.flags & F_NEXT != 0 {
            next = d.next;
            ttl -= 1;
        } else {
            ttl = 0;
        }
    }
}

/// The avail and used rings of a split virtqueue, mapped for direct access
/// (virtio 1.2, 2.7.6 and 2.7.8). Valid while the memory snapshot they were
/// mapped from is held: whoever copies them holds that snapshot too.
#[derive(Clone, Copy)]
pub struct Rings {
    avail: *const u8,
    used: *mut u8,
    size: u16,
}

impl Rings {
    /// Maps the rings of a queue of `size`; None unless each lies in one
    /// region with the alignment the spec requires (then the caller uses
    /// virtio-queue's accessors).
    pub fn map(mem: &GuestMem, avail: u64, used: u64, size: u16) -> Option<Rings> {
        if size == 0 || avail % 2 != 0 || used % 4 != 0 {
            return None;
        }
        let n = u64::from(size);
        // flags, idx, ring[size], used_event / avail_event
        let avail = host_range(mem, GuestAddress(avail), 4 + 2 * n + 2)?;
        let used = host_range(mem, GuestAddress(used), 4 + 8 * n + 2)?;
        Some(Rings { avail, used, size })
    }

    /// The driver's avail index (acquire: the ring entries and descriptors
    /// it published before it are visible after this read).
    pub fn avail_idx(&self) -> u16 {
        // SAFETY: the avail ring is 2-aligned (checked by map), so its idx
        // field at offset 2 is an aligned u16 inside the mapping; the
        // driver writes it with single stores.
        let idx = unsafe { AtomicU16::from_ptr(self.avail.add(2).cast_mut().cast::<u16>()) };
        u16::from_le(idx.load(Ordering::Acquire))
    }

    /// The head the driver published at avail index `idx`.
    pub fn avail_head(&self, idx: u16) -> u16 {
        let at = 4 + 2 * usize::from(idx % self.size);
        let mut b = [0u8; 2];
        // SAFETY: `at + 1 < 4 + 2 * size`, inside the mapped avail ring.
        unsafe { load(self.avail.add(at), &mut b) };
        u16::from_le_bytes(b)
    }

    /// Writes used element `idx` (not yet visible to the driver).
    pub fn put_used(&self, idx: u16, head: u16, len: u32) {
        let at = 4 + 8 * usize::from(idx % self.size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        for (i, v) in elem.iter().enumerate() {
            // SAFETY: `at + 7 < 4 + 8 * size`, inside the mapped used ring.
            unsafe { self.used.add(at + i).write_volatile(*v) };
        }
    }

    /// Makes the used elements before `idx` visible to the driver.
    pub fn publish_used(&self, idx: u16) {
        // SAFETY: the used ring is 4-aligned (checked by map), so its idx
        // field at offset 2 is an aligned u16 inside the mapping; the driver
        // only reads it.
        let idx_field = unsafe { AtomicU16::from_ptr(self.used.add(2).cast::<u16>()) };
        idx_field.store(idx.to_le(), Ordering::Release);
    }

    /// Whether the driver asked to be notified now that the used index
    /// moved from `old` to `new` (EVENT_IDX: virtio 1.2, 2.7.7.2; the same
    /// test as Linux's vring_need_event).
    pub fn needs_event(&self, old: u16, new: u16) -> bool {
        // The used index must be visible before used_event is read.
        fence(Ordering::SeqCst);
        let at = 4 + 2 * usize::from(self.size);
        let mut b = [0u8; 2];
        // SAFETY: used_event is the last field of the mapped avail ring.
        unsafe { load(self.avail.add(at), &mut b) };
        let event = u16::from_le_bytes(b);
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}
