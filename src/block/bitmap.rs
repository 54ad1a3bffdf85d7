//! Dirty bitmaps: which parts of a node were written since a point in time
//! (QEMU's BdrvDirtyBitmap), one bit per `granularity` bytes.
//!
//! Every write, write-zeroes and discard through the node marks the bits
//! it touches, from whichever iothread it runs on: bits are atomic words,
//! so queues share no lock (two writes to the same 64 granules contend on
//! one word, nothing else). The node's list of bitmaps is a [`Swap`]: a
//! request reads it with one load; management replaces the list.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use sha2::{Digest, Sha256};

pub struct DirtyBitmap {
    name: String,
    granularity: u64,
    shift: u32,
    /// Bytes covered (the node's size when it was made or last resized).
    size: u64,
    bits: Vec<AtomicU64>,
    enabled: AtomicBool,
    persistent: bool,
    /// In use by a job (a backup's bitmap): commands must not change it.
    busy: AtomicBool,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("name", &self.name)
            .field("granularity", &self.granularity)
            .field("count", &self.count())
            .finish()
    }
}

impl DirtyBitmap {
    /// A clear bitmap over `size` bytes. `granularity` must be a power of
    /// two from 512 B to 2 GiB.
    pub fn new(
        name: &str,
        size: u64,
        granularity: u64,
        enabled: bool,
        persistent: bool,
    ) -> Result<DirtyBitmap, String> {
        if !granularity.is_power_of_two() || !(512..=1 << 31).contains(&granularity) {
            return Err(format!(
                "granularity {granularity} must be a power of two between 512 and 2147483648"
            ));
        }
        let shift = granularity.trailing_zeros();
        let granules = size.div_ceil(granularity);
        let words = granules.div_ceil(64) as usize;
        Ok(DirtyBitmap {
            name: name.to_string(),
            granularity,
            shift,
            size,
            bits: (0..words).map(|_| AtomicU64::new(0)).collect(),
            enabled: AtomicBool::new(enabled),
            persistent,
            busy: AtomicBool::new(false),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn granularity(&self) -> u64 {
        self.granularity
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Relaxed);
    }

    pub fn is_persistent(&self) -> bool {
        self.persistent
    }

    pub fn is_busy(&self) -> bool {
        self.busy.load(Ordering::Acquire)
    }

    pub fn set_busy(&self, busy: bool) {
        self.busy.store(busy, Ordering::Release);
    }

    /// Marks `[offset, offset + len)` dirty (if recording).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || !self.is_enabled() || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        self.set_range(offset >> self.shift, (end - 1) >> self.shift);
    }

    fn set_range(&self, first: u64, last: u64) {
        let mut g = first;
        while g <= last {
            let w = (g / 64) as usize;
            let lo = g % 64;
            let hi = (last - g + lo).min(63);
            let mask = if hi - lo == 63 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo + 1)) - 1) << lo
            };
            if let Some(word) = self.bits.get(w) {
                // Skip the shared write when the bits are set already.
                if word.load(Ordering::Relaxed) & mask != mask {
                    word.fetch_or(mask, Ordering::Relaxed);
                }
            }
            g += hi - lo + 1;
        }
    }

    /// Dirty bytes (granules set, times the granularity, clipped to size).
    pub fn count(&self) -> u64 {
        let mut n = 0u64;
        for (i, w) in self.bits.iter().enumerate() {
            let v = w.load(Ordering::Relaxed);
            if v == 0 {
                continue;
            }
            for b in 0..64 {
                if v & (1 << b) != 0 {
                    let start = ((i as u64 * 64) + b) << self.shift;
                    n += self.granularity.min(self.size.saturating_sub(start));
                }
            }
        }
        n
    }

    pub fn clear(&self) {
        for w in &self.bits {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// The bits, for undo and for merge.
    pub fn snapshot(&self) -> Vec<u64> {
        self.bits
            .iter()
            .map(|w| w.load(Ordering::Relaxed))
            .collect()
    }

    pub fn restore(&self, words: &[u64]) {
        self.restore_at(0, words);
    }

    /// Sets the words from index `first` on to `words` (what lies beyond
    /// the bitmap is ignored).
    pub fn restore_at(&self, first: usize, words: &[u64]) {
        for (w, v) in self.bits.iter().skip(first).zip(words) {
            w.store(*v, Ordering::Relaxed);
        }
    }

    /// ORs `other` into this bitmap (granularities may differ).
    pub fn merge_from(&self, other: &DirtyBitmap) {
        if other.granularity == self.granularity {
            for (w, o) in self.bits.iter().zip(other.bits.iter()) {
                let v = o.load(Ordering::Relaxed);
                if v != 0 {
                    w.fetch_or(v, Ordering::Relaxed);
                }
            }
            return;
        }
        for (i, o) in other.bits.iter().enumerate() {
            let v = o.load(Ordering::Relaxed);
            for b in 0..64 {
                if v & (1 << b) != 0 {
                    let start = ((i as u64 * 64) + b) << other.shift;
                    if start < self.size {
                        let end = (start + other.granularity).min(self.size);
                        self.set_range(start >> self.shift, (end - 1) >> self.shift);
                    }
                }
            }
        }
    }

    /// A copy over `size` bytes (block_resize), with the same bits.
    pub fn resized(&self, size: u64) -> DirtyBitmap {
        let mut b = DirtyBitmap::new(
            &self.name,
            size,
            self.granularity,
            self.is_enabled(),
            self.persistent,
        )
        .expect("granularity was valid");
        let words = self.snapshot();
        b.restore(&words);
        // Bits past a smaller size go.
        let granules = size.div_ceil(self.granularity);
        if let Some(last) = b.bits.get_mut((granules / 64) as usize) {
            if granules % 64 != 0 {
                *last.get_mut() &= (1u64 << (granules % 64)) - 1;
            }
        }
        b
    }

    /// Marks `[offset, offset + len)` dirty whether or not recording is on
    /// (a job's own bookkeeping).
    pub fn set(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        self.set_range(offset >> self.shift, (end - 1) >> self.shift);
    }

    /// Clears the granules `[offset, offset + len)` covers entirely or in
    /// part (callers pass granule-aligned ranges).
    pub fn clear_range(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.size {
            return;
        }
        let end = (offset + len).min(self.size);
        let (first, last) = (offset >> self.shift, (end - 1) >> self.shift);
        for g in first..=last {
            if let Some(w) = self.bits.get((g / 64) as usize) {
                let bit = 1u64 << (g % 64);
                if w.load(Ordering::Relaxed) & bit != 0 {
                    w.fetch_and(!bit, Ordering::Relaxed);
                }
            }
        }
    }

    /// The offset of the first dirty granule at or after `from`.
    pub fn next_dirty(&self, from: u64) -> Option<u64> {
        let mut g = from >> self.shift;
        let granules = self.size.div_ceil(self.granularity);
        while g < granules {
            let w = self.bits.get((g / 64) as usize)?.load(Ordering::Relaxed) >> (g % 64);
            if w == 0 {
                g = (g / 64 + 1) * 64;
                continue;
            }
            let at = g + u64::from(w.trailing_zeros());
            return (at < granules).then_some(at << self.shift);
        }
        None
    }

    /// How many bytes from `offset` (a dirty granule's start) are dirty
    /// without a break, at most `max` (rounded up to whole granules, and
    /// clipped to the size).
    pub fn dirty_run(&self, offset: u64, max: u64) -> u64 {
        let mut end = offset;
        while end < self.size && end - offset < max && self.is_dirty(end) {
            end += self.granularity;
        }
        end.min(self.size) - offset
    }

    /// Whether the granule holding `offset` is dirty.
    pub fn is_dirty(&self, offset: u64) -> bool {
        let g = offset >> self.shift;
        self.bits
            .get((g / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Relaxed) & (1 << (g % 64)) != 0)
    }

    /// SHA-256 of the bits as 64-bit little-endian words, one bit per
    /// granule from the start (x-debug-block-dirty-bitmap-sha256).
    pub fn sha256(&self) -> String {
        let mut buf = Vec::with_capacity(self.bits.len() * 8);
        for w in &self.bits {
            buf.extend_from_slice(&w.load(Ordering::Relaxed).to_le_bytes());
        }
        let d = Sha256::digest(&buf);
        d.iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The bitmaps of one node.
pub type BitmapList = Arc<Vec<Arc<DirtyBitmap>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_ranges_and_counts_bytes() {
        let b = DirtyBitmap::new("b", 1 << 20, 4096, true, false).unwrap();
        b.mark(0, 1);
        b.mark(4095, 2);
        b.mark(65536, 65536 * 3);
        assert_eq!(b.count(), 2 * 4096 + 3 * 65536);
        assert!(b.is_dirty(4096) && !b.is_dirty(8192));
        b.set_enabled(false);
        b.mark(8192, 1);
        assert!(!b.is_dirty(8192));
        let c = DirtyBitmap::new("c", 1 << 20, 65536, true, false).unwrap();
        c.merge_from(&b);
        assert_eq!(c.count(), 4 * 65536);
        b.clear();
        assert_eq!(b.count(), 0);
        // The tail granule is clipped to the size.
        let t = DirtyBitmap::new("t", 1000 * 512, 65536, true, false).unwrap();
        t.mark(500_000, 1);
        assert_eq!(t.count(), 1000 * 512 - 458752);
        assert!(DirtyBitmap::new("x", 1, 1000, true, false).is_err());
    }

    #[test]
    fn dirty_runs_are_found_and_cleared() {
        let b = DirtyBitmap::new("b", 1 << 20, 4096, false, false).unwrap();
        assert_eq!(b.next_dirty(0), None);
        b.set(8192, 8192);
        b.set(200 * 4096, 1);
        assert_eq!(b.next_dirty(0), Some(8192));
        assert_eq!(b.dirty_run(8192, 1 << 20), 8192);
        assert_eq!(b.dirty_run(8192, 4096), 4096);
        b.clear_range(8192, 8192);
        assert_eq!(b.next_dirty(0), Some(200 * 4096));
        assert_eq!(b.next_dirty(201 * 4096), None);
        // A tail shorter than a granule is clipped.
        let t = DirtyBitmap::new("t", 5000, 4096, true, false).unwrap();
        t.set(4096, 10);
        assert_eq!(t.dirty_run(4096, 1 << 20), 904);
    }
}
