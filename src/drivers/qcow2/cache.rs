//! The write-back LRU cache of metadata clusters that the L2 tables and
//! the refcount blocks share. Eviction and writing back differ between
//! them (an L2 table waits for refcounts), so the caller does those.

use std::collections::HashMap;

struct Slot<T> {
    data: T,
    dirty: bool,
    used: u64,
}

/// Tables by their offset in the image file, at most `cap` of them.
pub struct Cache<T> {
    map: HashMap<u64, Slot<T>>,
    cap: usize,
    tick: u64,
}

impl<T> Cache<T> {
    pub fn new(cap: usize) -> Self {
        Cache {
            map: HashMap::new(),
            cap,
            tick: 0,
        }
    }

    fn next(&mut self) -> u64 {
        self.tick += 1;
        self.tick
    }

    /// Marks the table at `off` used; false if it is not cached.
    pub fn touch(&mut self, off: u64) -> bool {
        let t = self.next();
        match self.map.get_mut(&off) {
            Some(s) => {
                s.used = t;
                true
            }
            None => false,
        }
    }

    /// A cached table (the caller loaded it).
    pub fn get(&self, off: u64) -> &T {
        &self.map[&off].data
    }

    /// A cached table, to change: marked dirty and used.
    pub fn get_mut(&mut self, off: u64) -> &mut T {
        let t = self.next();
        let s = self.map.get_mut(&off).expect("table loaded by the caller");
        s.dirty = true;
        s.used = t;
        &mut s.data
    }

    pub fn insert(&mut self, off: u64, data: T, dirty: bool) {
        let used = self.next();
        self.map.insert(off, Slot { data, dirty, used });
    }

    /// When the cache is full: the least recently used table, and whether
    /// it must be written before it goes.
    pub fn victim(&self) -> Option<(u64, bool)> {
        if self.map.len() < self.cap {
            return None;
        }
        self.map
            .iter()
            .min_by_key(|(_, s)| s.used)
            .map(|(&off, s)| (off, s.dirty))
    }

    pub fn remove(&mut self, off: u64) {
        self.map.remove(&off);
    }

    /// Offsets of the dirty tables, in file order.
    pub fn dirty(&self) -> Vec<u64> {
        let mut v: Vec<u64> = self
            .map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&o, _)| o)
            .collect();
        v.sort_unstable();
        v
    }

    pub fn mark_clean(&mut self, off: u64) {
        if let Some(s) = self.map.get_mut(&off) {
            s.dirty = false;
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}
