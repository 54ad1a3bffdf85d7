//! What a range of a node reads as (QEMU's bdrv_block_status).

/// What a range of a node reads as, and where in the chain that was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Allocation {
    Data,
    Zero,
    /// Not allocated anywhere in the chain (reads as zeroes).
    Unallocated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    pub kind: Allocation,
    pub len: u64,
    /// 0: this node; 1: its backing node; ...
    pub depth: u32,
}
