//! The `null-co` protocol driver: no storage; writes vanish, reads return
//! zeroes with `read-zeroes=on` and leave the buffer untouched otherwise.
//! For benchmarks of the request path itself.

use std::sync::atomic::{AtomicBool, Ordering};

use serde::Deserialize;

use crate::block::{BlockError, GraphError};
use crate::io::IoVecs;
use crate::opts;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct NullOptions {
    #[serde(default)]
    pub node_name: String,
    /// Size in bytes; QEMU's default is 1 GiB.
    #[serde(default = "default_size", deserialize_with = "opts::size")]
    pub size: u64,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_zeroes: bool,
    #[serde(default, deserialize_with = "opts::bool")]
    pub read_only: bool,
    /// Common options (QEMU's BlockdevOptions base): see [`super::CommonOptions`].
    #[serde(default, deserialize_with = "opts::bool")]
    pub auto_read_only: bool,
    #[serde(default)]
    pub detect_zeroes: super::DetectZeroes,
    #[serde(default, deserialize_with = "opts::bool")]
    pub force_share: bool,
    /// QEMU 10's `active`: off opens the node inactive (no write lock,
    /// no write); absent means on, or inactive under an inactive parent.
    #[serde(default, deserialize_with = "opts::opt_bool")]
    pub active: Option<bool>,
    /// Accepted on every node as QEMU does; only `file`/`host_device`
    /// nodes act on it (a child opened in place does not inherit it).
    #[serde(default)]
    pub cache: super::CacheOptions,
}

fn default_size() -> u64 {
    1 << 30
}

pub struct NullDriver {
    size: u64,
    read_zeroes: AtomicBool,
}

impl NullDriver {
    pub fn open(o: &NullOptions) -> Result<Self, GraphError> {
        Ok(NullDriver {
            size: o.size,
            read_zeroes: AtomicBool::new(o.read_zeroes),
        })
    }

    pub fn reads_zeroes(&self) -> bool {
        self.read_zeroes.load(Ordering::Relaxed)
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// Checks a blockdev-reopen: only `read-only` and `read-zeroes` may change.
    pub fn check_reopen(&self, o: &NullOptions) -> Result<(), String> {
        if o.size != self.size {
            return Err(format!(
                "node '{}': 'size' cannot be changed by reopen",
                o.node_name
            ));
        }
        Ok(())
    }

    pub fn commit_reopen(&self, o: &NullOptions) {
        self.read_zeroes.store(o.read_zeroes, Ordering::Relaxed);
    }

    pub fn preadv(&self, iov: &IoVecs) -> Result<(), BlockError> {
        if self.read_zeroes.load(Ordering::Relaxed) {
            iov.fill_zero();
        }
        Ok(())
    }
}
