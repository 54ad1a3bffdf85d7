//! The device configuration space (struct virtio_blk_config).
//!
//! Only `writeback` is writable by the driver (with CONFIG_WCE); it returns
//! to the export's default on device reset.

/// Bytes in a virtio-blk sector.
pub const SECTOR: u64 = 512;

/// Bytes of struct virtio_blk_config up to and including the secure-erase
/// fields (virtio 1.2); later fields read as zero.
pub const CONFIG_SIZE: usize = 72;
/// Offset of the `writeback` byte.
pub const WRITEBACK_OFFSET: usize = 32;

/// Everything the config space is computed from.
#[derive(Clone, Debug)]
pub struct DeviceParams {
    pub capacity_bytes: u64,
    pub logical_block_size: u32,
    pub physical_block_size: u32,
    pub num_queues: u16,
    pub seg_max: u32,
    pub size_max: u32,
    pub max_discard_sectors: u32,
    pub max_discard_seg: u32,
    pub max_write_zeroes_sectors: u32,
    pub max_write_zeroes_seg: u32,
    pub write_zeroes_may_unmap: bool,
    pub read_only: bool,
}

/// The config space of one device: parameters plus the driver's write-cache
/// choice.
#[derive(Clone, Debug)]
pub struct DeviceConfig {
    pub params: DeviceParams,
    pub writeback: bool,
}

impl DeviceConfig {
    /// The config space, little-endian, as the driver reads it.
    pub fn to_bytes(&self) -> [u8; CONFIG_SIZE] {
        let p = &self.params;
        let mut b = [0u8; CONFIG_SIZE];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(0, &(p.capacity_bytes / SECTOR).to_le_bytes());
        put(8, &p.size_max.to_le_bytes());
        put(12, &p.seg_max.to_le_bytes());
        // geometry (16..20) left zero: no GEOMETRY feature.
        put(20, &p.logical_block_size.to_le_bytes());
        // topology: log2(physical / logical), alignment offset, min and
        // optimal I/O size in logical blocks.
        let ratio = (p.physical_block_size / p.logical_block_size.max(1)).max(1);
        put(24, &[ratio.trailing_zeros() as u8, 0]);
        put(26, &1u16.to_le_bytes());
        put(28, &0u32.to_le_bytes());
        put(32, &[u8::from(self.writeback), 0]);
        put(34, &p.num_queues.to_le_bytes());
        put(36, &p.max_discard_sectors.to_le_bytes());
        put(40, &p.max_discard_seg.to_le_bytes());
        put(
            44,
            &(u64::from(p.logical_block_size) / SECTOR)
                .max(1)
                .to_le_bytes()[..4],
        );
        put(48, &p.max_write_zeroes_sectors.to_le_bytes());
        put(52, &p.max_write_zeroes_seg.to_le_bytes());
        put(56, &[u8::from(p.write_zeroes_may_unmap), 0, 0, 0]);
        // secure erase (60..72) left zero: no SECURE_ERASE feature.
        b
    }

    /// `size` bytes from `offset`, zero-filled past the struct (frontends may
    /// ask for a newer, larger struct). None if the range overflows or is
    /// larger than a vhost-user config message allows.
    pub fn read(&self, offset: u32, size: u32) -> Option<Vec<u8>> {
        const MAX: u64 = 256;
        let end = u64::from(offset) + u64::from(size);
        if end > MAX {
            return None;
        }
        let bytes = self.to_bytes();
        let out = (offset as usize..end as usize)
            .map(|i| bytes.get(i).copied().unwrap_or(0))
            .collect();
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> DeviceParams {
        DeviceParams {
            capacity_bytes: 1 << 30,
            logical_block_size: 4096,
            physical_block_size: 4096,
            num_queues: 4,
            seg_max: 254,
            size_max: 1 << 20,
            max_discard_sectors: 1 << 21,
            max_discard_seg: 32,
            max_write_zeroes_sectors: 1 << 21,
            max_write_zeroes_seg: 32,
            write_zeroes_may_unmap: true,
            read_only: false,
        }
    }

    #[test]
    fn config_layout_matches_virtio_blk_config() {
        let c = DeviceConfig {
            params: params(),
            writeback: true,
        };
        let b = c.to_bytes();
        assert_eq!(
            u64::from_le_bytes(b[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(b[12..16].try_into().unwrap()), 254);
        assert_eq!(u32::from_le_bytes(b[20..24].try_into().unwrap()), 4096);
        assert_eq!(b[WRITEBACK_OFFSET], 1);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 4);
        assert_eq!(u32::from_le_bytes(b[44..48].try_into().unwrap()), 8);
        assert_eq!(b[56], 1);
    }

    #[test]
    fn reads_past_the_struct_are_zero_padded_and_oversized_reads_refused() {
        let c = DeviceConfig {
            params: params(),
            writeback: false,
        };
        let v = c.read(0, 96).unwrap();
        assert_eq!(v.len(), 96);
        assert!(v[CONFIG_SIZE..].iter().all(|&x| x == 0));
        assert!(c.read(200, 100).is_none());
        assert!(c.read(u32::MAX, 16).is_none());
    }
}
