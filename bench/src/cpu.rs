//! CPU-time accounting for the backend process (via /proc/PID/stat) and for
//! this process (via getrusage).

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// Clock ticks per second used by /proc/PID/stat.
pub fn clock_ticks_per_sec() -> Result<u64> {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t <= 0 {
        bail!("sysconf(_SC_CLK_TCK) failed");
    }
    Ok(t as u64)
}

/// Parse utime + stime (in clock ticks) out of the contents of /proc/PID/stat.
///
/// The second field (comm) is parenthesised and may contain spaces or
/// parentheses itself, so fields are counted from the last ')'.
pub fn parse_stat_ticks(stat: &str) -> Result<u64> {
    let rest = stat
        .rfind(')')
        .map(|i| &stat[i + 1..])
        .context("malformed /proc/PID/stat: no ')'")?;
    // After comm come field 3 (state) onwards; utime is field 14, stime 15.
    let mut fields = rest.split_ascii_whitespace().skip(14 - 3);
    let utime: u64 = fields
        .next()
        .context("missing utime")?
        .parse()
        .context("bad utime")?;
    let stime: u64 = fields
        .next()
        .context("missing stime")?
        .parse()
        .context("bad stime")?;
    Ok(utime + stime)
}

/// Samples the CPU time consumed by another process (all its threads).
pub struct ProcCpu {
    pid: u32,
    ticks_per_sec: u64,
}

impl ProcCpu {
    pub fn new(pid: u32) -> Result<Self> {
        let s = Self {
            pid,
            ticks_per_sec: clock_ticks_per_sec()?,
        };
        s.sample()?; // fail early if the pid does not exist
        Ok(s)
    }

    /// utime + stime of the process, in seconds.
    pub fn sample(&self) -> Result<f64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(parse_stat_ticks(&stat)? as f64 / self.ticks_per_sec as f64)
    }
}

/// user + system CPU time of this process (all threads), in seconds.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we pass; RUSAGE_SELF is valid.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    (tv(ru.ru_utime) + tv(ru.ru_stime)).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_weird_comm() {
        let stat = "1234 (qemu (x) d) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 \
                    100 1000 10 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        assert_eq!(parse_stat_ticks(stat).unwrap(), 325);
    }

    #[test]
    fn reads_own_stat() {
        let me = ProcCpu::new(std::process::id()).unwrap();
        assert!(me.sample().unwrap() >= 0.0);
    }
}
