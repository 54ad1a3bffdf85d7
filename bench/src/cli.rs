//! Command-line options.

use clap::{Parser, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    Read,
    Write,
    Randread,
    Randwrite,
    Randrw,
}

impl Rw {
    /// The name used on the command line (and in JSON).
    pub fn name(self) -> &'static str {
        match self {
            Rw::Read => "read",
            Rw::Write => "write",
            Rw::Randread => "randread",
            Rw::Randwrite => "randwrite",
            Rw::Randrw => "randrw",
        }
    }

    pub fn is_random(self) -> bool {
        matches!(self, Rw::Randread | Rw::Randwrite | Rw::Randrw)
    }

    /// Percentage of requests that are reads.
    pub fn read_pct(self, rwmixread: u32) -> u32 {
        match self {
            Rw::Read | Rw::Randread => 100,
            Rw::Write | Rw::Randwrite => 0,
            Rw::Randrw => rwmixread,
        }
    }
}

/// libblkio-based load generator for vhost-user-blk sockets.
///
/// Connects to a vhost-user-blk backend as the "guest", keeps --iodepth
/// requests in flight on each of --queues virtqueues (one thread per queue)
/// and reports IOPS, throughput, latency percentiles and, with --backend-pid,
/// the backend's CPU cost.
#[derive(Clone, Debug, Parser, Serialize)]
#[command(version)]
pub struct Cli {
    /// vhost-user-blk UNIX socket to connect to.
    #[arg(long)]
    pub socket: PathBuf,

    /// I/O pattern. Sequential modes walk a private range per queue.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: Rw,

    /// Percentage of reads for --rw randrw.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub rwmixread: u32,

    /// Request size, e.g. 4096, 4k, 128k, 1M.
    #[arg(long, default_value = "4k", value_parser = parse_size)]
    pub bs: u64,

    /// Requests kept in flight per queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub iodepth: u32,

    /// Number of virtqueues (one thread each).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub queues: u32,

    /// Use poll queues and busy-poll for completions instead of waiting on
    /// the completion eventfd.
    #[arg(long)]
    pub poll: bool,

    /// Measured duration in seconds (after --ramp).
    #[arg(long, default_value_t = 10.0, value_parser = parse_secs)]
    pub runtime: f64,

    /// Warm-up seconds run before the measured window (not counted).
    #[arg(long, default_value_t = 1.0, value_parser = parse_nonneg_secs)]
    pub ramp: f64,

    /// Working-set size in bytes (e.g. 1G); default: device capacity.
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// Virtqueue size (power of two). One request takes 3 descriptors, so
    /// iodepth * 3 must not exceed it.
    #[arg(long, default_value_t = 1024)]
    pub queue_size: u32,

    /// PID of the backend daemon, to report its CPU usage in the window.
    #[arg(long)]
    pub backend_pid: Option<u32>,

    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,

    /// Testing aid: split each request's buffer into segments of at most
    /// this many bytes (readv/writev), as if the device had this max-segment-len.
    #[arg(long, hide = true, value_parser = parse_size)]
    pub split_segments: Option<u64>,

    /// Seed for random offsets (per queue: seed + queue index).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
}

/// Parse a byte size: plain number or with a binary suffix k/m/g/t
/// (optionally followed by "i", "b" or "ib", any case).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let stripped = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .or_else(|| lower.strip_suffix('i'))
        .unwrap_or(&lower);
    let (num, mult) = match stripped.chars().last() {
        Some('k') => (&stripped[..stripped.len() - 1], 1u64 << 10),
        Some('m') => (&stripped[..stripped.len() - 1], 1 << 20),
        Some('g') => (&stripped[..stripped.len() - 1], 1 << 30),
        Some('t') => (&stripped[..stripped.len() - 1], 1 << 40),
        _ => (stripped, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("invalid size {s:?} (expected e.g. 4096, 4k, 128k, 1G)"))?;
    n.checked_mul(mult)
        .filter(|&v| v > 0)
        .ok_or_else(|| format!("size {s:?} out of range"))
}

fn parse_nonneg_secs(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .trim_end_matches('s')
        .parse()
        .map_err(|_| format!("invalid duration {s:?} (seconds)"))?;
    if (0.0..1e6).contains(&v) {
        Ok(v)
    } else {
        Err(format!("duration {s:?} out of range"))
    }
}

fn parse_secs(s: &str) -> Result<f64, String> {
    let v = parse_nonneg_secs(s)?;
    if v > 0.0 {
        Ok(v)
    } else {
        Err("duration must be > 0".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("128k"), Ok(131072));
        assert_eq!(parse_size("128KiB"), Ok(131072));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("2m"), Ok(2 << 20));
        assert!(parse_size("0").is_err());
        assert!(parse_size("abc").is_err());
        assert!(parse_size("4x").is_err());
    }

    #[test]
    fn cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
        let c = Cli::try_parse_from([
            "vub-bench",
            "--socket",
            "/tmp/s",
            "--rw",
            "randrw",
            "--rwmixread",
            "70",
            "--bs",
            "128k",
            "--runtime",
            "2",
        ])
        .unwrap();
        assert_eq!(c.bs, 131072);
        assert_eq!(c.rw.read_pct(c.rwmixread), 70);
        assert!(Cli::try_parse_from(["vub-bench", "--socket", "s", "--iodepth", "0"]).is_err());
    }
}
