//! A split virtqueue driven by the test, as a guest driver would.

use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = 2;
pub const F_INDIRECT: u16 = 4;

/// One descriptor of a chain.
#[derive(Clone, Copy, Debug)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub flags: u16,
}

impl Desc {
    /// Device-readable.
    pub fn r(a: GuestAddress, len: u32) -> Desc {
        Desc {
            addr: a.0,
            len,
            flags: 0,
        }
    }
    /// Device-writable.
    pub fn w(a: GuestAddress, len: u32) -> Desc {
        Desc {
            addr: a.0,
            len,
            flags: F_WRITE,
        }
    }
    /// An indirect table at `a` holding `n` descriptors.
    pub fn indirect(a: GuestAddress, n: u32) -> Desc {
        Desc {
            addr: a.0,
            len: n * 16,
            flags: F_INDIRECT,
        }
    }
}

/// A used-ring element.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Used {
    pub id: u32,
    pub len: u32,
}

pub struct VirtQueue {
    pub size: u16,
    pub desc: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
    pub event_idx: bool,
    pub kick: EventFd,
    pub call: EventFd,
    pub avail_idx: u16,
    pub last_used: u16,
    next_desc: u16,
}

impl VirtQueue {
    pub fn new(
        size: u16,
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
        event_idx: bool,
    ) -> Self {
        VirtQueue {
            size,
            desc,
            avail,
            used,
            event_idx,
            kick: EventFd::new(EFD_NONBLOCK).unwrap(),
            call: EventFd::new(EFD_NONBLOCK).unwrap(),
            avail_idx: 0,
            last_used: 0,
            next_desc: 0,
        }
    }

    pub fn init(&self, mem: &GuestMemoryMmap<()>) {
        let zero = vec![0u8; 0x1_0000];
        mem.write_slice(&zero[..16 * self.size as usize], self.desc)
            .unwrap();
        mem.write_slice(&zero[..6 + 2 * self.size as usize], self.avail)
            .unwrap();
        mem.write_slice(&zero[..6 + 8 * self.size as usize], self.used)
            .unwrap();
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn write_desc_at(
        mem: &GuestMemoryMmap<()>,
        table: GuestAddress,
        i: u16,
        d: Desc,
        next: Option<u16>,
    ) {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&d.addr.to_le_bytes());
        b[8..12].copy_from_slice(&d.len.to_le_bytes());
        let flags = d.flags | if next.is_some() { F_NEXT } else { 0 };
        b[12..14].copy_from_slice(&flags.to_le_bytes());
        b[14..16].copy_from_slice(&next.unwrap_or(0).to_le_bytes());
        mem.write_slice(&b, GuestAddress(table.0 + 16 * u64::from(i)))
            .unwrap();
    }

    pub fn write_desc(&self, mem: &GuestMemoryMmap<()>, i: u16, d: Desc, next: Option<u16>) {
        Self::write_desc_at(mem, self.desc, i, d, next)
    }

    /// Writes a chain into consecutive free descriptors (wrapping) and makes
    /// it available; returns its head.
    pub fn add_chain(&mut self, mem: &GuestMemoryMmap<()>, descs: &[Desc]) -> u16 {
        assert!(!descs.is_empty() && descs.len() <= self.size as usize);
        let head = self.next_desc;
        let mut idx = head;
        for (n, d) in descs.iter().enumerate() {
            let next = (idx + 1) % self.size;
            let has_next = n + 1 < descs.len();
            self.write_desc(mem, idx, *d, has_next.then_some(next));
            idx = next;
        }
        self.next_desc = idx;
        self.push_avail(mem, head);
        head
    }

    /// Puts `head` in the avail ring and publishes the new index.
    pub fn push_avail(&mut self, mem: &GuestMemoryMmap<()>, head: u16) {
        let slot = self.avail_idx % self.size;
        mem.write_obj(
            head.to_le(),
            GuestAddress(self.avail.0 + 4 + 2 * u64::from(slot)),
        )
        .unwrap();
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx.to_le(), GuestAddress(self.avail.0 + 2))
            .unwrap();
        fence(Ordering::SeqCst);
    }

    /// Sets used_event (EVENT_IDX): "notify me once used idx passes this".
    pub fn set_used_event(&self, mem: &GuestMemoryMmap<()>, v: u16) {
        mem.write_obj(
            v.to_le(),
            GuestAddress(self.avail.0 + 4 + 2 * u64::from(self.size)),
        )
        .unwrap();
        fence(Ordering::SeqCst);
    }

    /// Sets VRING_AVAIL_F_NO_INTERRUPT (without EVENT_IDX).
    pub fn set_avail_flags(&self, mem: &GuestMemoryMmap<()>, flags: u16) {
        mem.write_obj(flags.to_le(), self.avail).unwrap();
    }

    pub fn kick(&self) {
        self.kick.write(1).unwrap();
    }

    pub fn used_idx(&self, mem: &GuestMemoryMmap<()>) -> u16 {
        fence(Ordering::SeqCst);
        u16::from_le(mem.read_obj(GuestAddress(self.used.0 + 2)).unwrap())
    }

    /// Collects used elements until `n` have arrived or `timeout` passes.
    pub fn wait_used(
        &mut self,
        mem: &GuestMemoryMmap<()>,
        n: usize,
        timeout: Duration,
    ) -> Vec<Used> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        loop {
            let idx = self.used_idx(mem);
            while self.last_used != idx {
                let slot = self.last_used % self.size;
                let a = GuestAddress(self.used.0 + 4 + 8 * u64::from(slot));
                let id: u32 = mem.read_obj(a).unwrap();
                let len: u32 = mem.read_obj(GuestAddress(a.0 + 4)).unwrap();
                out.push(Used { id, len });
                self.last_used = self.last_used.wrapping_add(1);
            }
            if out.len() >= n || Instant::now() > deadline {
                return out;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Whether the device signalled the call eventfd since the last check.
    pub fn take_call(&self) -> bool {
        self.call.read().is_ok()
    }
}
