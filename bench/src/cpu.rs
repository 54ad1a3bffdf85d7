//! CPU-time accounting for the backend process (via /proc/PID/stat) and for
//! this process (via getrusage).

use anyhow::{bail, ensure, Context, Result};
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

    /// False once the process has exited (gone, zombie or dead).
    pub fn alive(&self) -> bool {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", self.pid)) else {
            return false;
        };
        let state = stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_ascii_whitespace().next());
        !matches!(state, None | Some("Z") | Some("X") | Some("x"))
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// utime + stime of the process, in seconds.
    pub fn sample(&self) -> Result<f64> {
        let path = format!("/proc/{}/stat", self.pid);
        let stat = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Ok(parse_stat_ticks(&stat)? as f64 / self.ticks_per_sec as f64)
    }
}

/// Machine-wide CPU time from the aggregate "cpu" line of /proc/stat, in
/// seconds summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SystemCpu {
    /// user + nice + system: time charged to processes.
    pub busy_s: f64,
    /// irq + softirq (not charged to any process's utime/stime when the
    /// kernel does IRQ time accounting; cross-CPU wakeups show up here).
    pub irq_s: f64,
    /// Time the hypervisor ran something else while a vCPU wanted to run.
    pub steal_s: f64,
}

impl std::ops::Sub for SystemCpu {
    type Output = SystemCpu;
    fn sub(self, o: SystemCpu) -> SystemCpu {
        SystemCpu {
            busy_s: self.busy_s - o.busy_s,
            irq_s: self.irq_s - o.irq_s,
            steal_s: self.steal_s - o.steal_s,
        }
    }
}

/// Parse the aggregate "cpu" line of /proc/stat (values in clock ticks).
pub fn parse_proc_stat(stat: &str, ticks_per_sec: u64) -> Result<SystemCpu> {
    let line = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .context("no aggregate cpu line in /proc/stat")?;
    let v: Vec<u64> = line
        .split_ascii_whitespace()
        .skip(1)
        .map(|f| f.parse().context("bad /proc/stat field"))
        .collect::<Result<_>>()?;
    ensure!(v.len() >= 8, "short cpu line in /proc/stat");
    // user nice system idle iowait irq softirq steal [guest guest_nice]
    let t = ticks_per_sec as f64;
    Ok(SystemCpu {
        busy_s: (v[0] + v[1] + v[2]) as f64 / t,
        irq_s: (v[5] + v[6]) as f64 / t,
        steal_s: v[7] as f64 / t,
    })
}

/// Current machine-wide CPU counters.
pub fn system_cpu() -> Result<SystemCpu> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    parse_proc_stat(&stat, clock_ticks_per_sec()?)
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
    fn parses_proc_stat() {
        let stat = "cpu  100 5 50 1000 20 3 2 7 0 0\ncpu0 50 2 25 500 10 1 1 3 0 0\n";
        let c = parse_proc_stat(stat, 100).unwrap();
        assert_eq!(c.busy_s, 1.55);
        assert_eq!(c.irq_s, 0.05);
        assert_eq!(c.steal_s, 0.07);
        assert!(system_cpu().unwrap().busy_s > 0.0);
    }

    #[test]
    fn reads_own_stat() {
        let me = ProcCpu::new(std::process::id()).unwrap();
        assert!(me.sample().unwrap() >= 0.0);
        assert!(me.alive());
        assert_eq!(me.pid(), std::process::id());
    }
}
