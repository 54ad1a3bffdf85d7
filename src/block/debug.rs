//! Debug events (QEMU's BlkdebugEvent): named points in a format driver's
//! work (an L2 table loaded, a cluster allocated, a flush reaching the OS)
//! that a format raises on its `file` child. Only a `blkdebug` node acts
//! on them (drivers/blkdebug.rs); every other driver ignores them, so a
//! raise costs one virtual call that returns at once.

/// Every event QEMU 7.2's BlkdebugEvent has, in its order, under its
/// QAPI names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum DebugEvent {
    L1Update,
    L1GrowAllocTable,
    L1GrowWriteTable,
    L1GrowActivateTable,
    L2Load,
    L2Update,
    L2UpdateCompressed,
    L2AllocCowRead,
    L2AllocWrite,
    ReadAio,
    ReadBackingAio,
    ReadCompressed,
    WriteAio,
    WriteCompressed,
    VmstateLoad,
    VmstateSave,
    CowRead,
    CowWrite,
    ReftableLoad,
    ReftableGrow,
    ReftableUpdate,
    RefblockLoad,
    RefblockUpdate,
    RefblockUpdatePart,
    RefblockAlloc,
    RefblockAllocHookup,
    RefblockAllocWrite,
    RefblockAllocWriteBlocks,
    RefblockAllocWriteTable,
    RefblockAllocSwitchTable,
    ClusterAlloc,
    ClusterAllocBytes,
    ClusterFree,
    FlushToOs,
    FlushToDisk,
    PwritevRmwHead,
    PwritevRmwAfterHead,
    PwritevRmwTail,
    PwritevRmwAfterTail,
    Pwritev,
    PwritevZero,
    PwritevDone,
    EmptyImagePrepare,
    L1ShrinkWriteTable,
    L1ShrinkFreeL2Clusters,
    CorWrite,
    ClusterAllocSpace,
    None,
}

use DebugEvent as E;

impl DebugEvent {
    /// All of them, in QEMU's order (the index is `self as usize`).
    pub const ALL: [DebugEvent; 48] = [
        E::L1Update,
        E::L1GrowAllocTable,
        E::L1GrowWriteTable,
        E::L1GrowActivateTable,
        E::L2Load,
        E::L2Update,
        E::L2UpdateCompressed,
        E::L2AllocCowRead,
        E::L2AllocWrite,
        E::ReadAio,
        E::ReadBackingAio,
        E::ReadCompressed,
        E::WriteAio,
        E::WriteCompressed,
        E::VmstateLoad,
        E::VmstateSave,
        E::CowRead,
        E::CowWrite,
        E::ReftableLoad,
        E::ReftableGrow,
        E::ReftableUpdate,
        E::RefblockLoad,
        E::RefblockUpdate,
        E::RefblockUpdatePart,
        E::RefblockAlloc,
        E::RefblockAllocHookup,
        E::RefblockAllocWrite,
        E::RefblockAllocWriteBlocks,
        E::RefblockAllocWriteTable,
        E::RefblockAllocSwitchTable,
        E::ClusterAlloc,
        E::ClusterAllocBytes,
        E::ClusterFree,
        E::FlushToOs,
        E::FlushToDisk,
        E::PwritevRmwHead,
        E::PwritevRmwAfterHead,
        E::PwritevRmwTail,
        E::PwritevRmwAfterTail,
        E::Pwritev,
        E::PwritevZero,
        E::PwritevDone,
        E::EmptyImagePrepare,
        E::L1ShrinkWriteTable,
        E::L1ShrinkFreeL2Clusters,
        E::CorWrite,
        E::ClusterAllocSpace,
        E::None,
    ];

    /// The QAPI name (`l2_load`, `l1_grow_alloc_table`, ...).
    pub fn name(self) -> &'static str {
        match self {
            E::L1Update => "l1_update",
            E::L1GrowAllocTable => "l1_grow_alloc_table",
            E::L1GrowWriteTable => "l1_grow_write_table",
            E::L1GrowActivateTable => "l1_grow_activate_table",
            E::L2Load => "l2_load",
            E::L2Update => "l2_update",
            E::L2UpdateCompressed => "l2_update_compressed",
            E::L2AllocCowRead => "l2_alloc_cow_read",
            E::L2AllocWrite => "l2_alloc_write",
            E::ReadAio => "read_aio",
            E::ReadBackingAio => "read_backing_aio",
            E::ReadCompressed => "read_compressed",
            E::WriteAio => "write_aio",
            E::WriteCompressed => "write_compressed",
            E::VmstateLoad => "vmstate_load",
            E::VmstateSave => "vmstate_save",
            E::CowRead => "cow_read",
            E::CowWrite => "cow_write",
            E::ReftableLoad => "reftable_load",
            E::ReftableGrow => "reftable_grow",
            E::ReftableUpdate => "reftable_update",
            E::RefblockLoad => "refblock_load",
            E::RefblockUpdate => "refblock_update",
            E::RefblockUpdatePart => "refblock_update_part",
            E::RefblockAlloc => "refblock_alloc",
            E::RefblockAllocHookup => "refblock_alloc_hookup",
            E::RefblockAllocWrite => "refblock_alloc_write",
            E::RefblockAllocWriteBlocks => "refblock_alloc_write_blocks",
            E::RefblockAllocWriteTable => "refblock_alloc_write_table",
            E::RefblockAllocSwitchTable => "refblock_alloc_switch_table",
            E::ClusterAlloc => "cluster_alloc",
            E::ClusterAllocBytes => "cluster_alloc_bytes",
            E::ClusterFree => "cluster_free",
            E::FlushToOs => "flush_to_os",
            E::FlushToDisk => "flush_to_disk",
            E::PwritevRmwHead => "pwritev_rmw_head",
            E::PwritevRmwAfterHead => "pwritev_rmw_after_head",
            E::PwritevRmwTail => "pwritev_rmw_tail",
            E::PwritevRmwAfterTail => "pwritev_rmw_after_tail",
            E::Pwritev => "pwritev",
            E::PwritevZero => "pwritev_zero",
            E::PwritevDone => "pwritev_done",
            E::EmptyImagePrepare => "empty_image_prepare",
            E::L1ShrinkWriteTable => "l1_shrink_write_table",
            E::L1ShrinkFreeL2Clusters => "l1_shrink_free_l2_clusters",
            E::CorWrite => "cor_write",
            E::ClusterAllocSpace => "cluster_alloc_space",
            E::None => "none",
        }
    }

    pub fn from_name(s: &str) -> Option<DebugEvent> {
        DebugEvent::ALL.iter().copied().find(|e| e.name() == s)
    }

    /// Why nothing here ever raises this event, for the ones that have no
    /// point in our drivers (a rule on one of them can never fire).
    pub fn never_raised(self) -> Option<&'static str> {
        Some(match self {
            E::L2UpdateCompressed | E::WriteCompressed | E::ClusterAllocBytes => {
                "qcow2 compressed clusters are read, never written here"
            }
            E::VmstateLoad | E::VmstateSave => "there is no VM state (savevm/loadvm) here",
            E::RefblockUpdate => "QEMU 7.2's qcow2 does not raise it either (refblock_update_part is the refcount block write)",
            E::PwritevRmwHead | E::PwritevRmwAfterHead | E::PwritevRmwTail | E::PwritevRmwAfterTail => {
                "the block layer here never does read-modify-write for unaligned writes (they are refused)"
            }
            E::EmptyImagePrepare => "there is no qcow2 make-empty (qemu-img commit) here",
            E::L1ShrinkWriteTable | E::L1ShrinkFreeL2Clusters => "qcow2 images are never shrunk here",
            _ => return Option::None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_in_qemu_order() {
        for (i, e) in DebugEvent::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
            assert_eq!(DebugEvent::from_name(e.name()), Some(*e));
        }
        assert_eq!(DebugEvent::from_name("l1_grow.alloc_table"), Option::None);
    }
}
