//! Result aggregation and output (table or JSON).

use crate::cli::Cli;
use crate::hist::{Histogram, LatencySummary};
use crate::worker::{DirResult, WorkerResult};
use crate::{merge, DeviceInfo, Window};
use serde::Serialize;
use std::io::{self, Write};

const MIB: f64 = 1024.0 * 1024.0;

#[derive(Serialize)]
pub struct DirStats {
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub lat: LatencySummary,
}

#[derive(Serialize)]
pub struct QueueStats {
    pub queue: usize,
    pub ios: u64,
    pub iops: f64,
}

/// Everything vub-bench reports; serialised as one JSON object with --json.
#[derive(Serialize)]
pub struct Report {
    pub tool: &'static str,
    pub version: &'static str,
    pub params: Cli,
    pub mode: &'static str,
    /// Working-set size actually used (bytes, multiple of bs).
    pub size: u64,
    pub device: DeviceInfo,
    /// Length of the measured window (s); IOPS are ios / runtime_s.
    pub runtime_s: f64,
    pub ios: u64,
    pub bytes: u64,
    pub iops: f64,
    pub mib_s: f64,
    pub mb_s: f64,
    /// Latency over all requests (reads and writes).
    pub lat: LatencySummary,
    pub read: DirStats,
    pub write: DirStats,
    pub per_queue: Vec<QueueStats>,
    /// Average completions returned per do_io() call in the window (event
    /// mode: batching; poll mode: includes empty polls, so usually < 1).
    pub completions_per_do_io: f64,
    pub client_cpu_s: f64,
    /// Client CPU time / wall time * 100 (all threads; may exceed 100).
    pub client_cpu_pct: f64,
    pub backend_pid: Option<u32>,
    pub backend_cpu_s: Option<f64>,
    pub backend_cpu_pct: Option<f64>,
    pub iops_per_backend_cpu_s: Option<f64>,
    /// Busy CPU time of the whole machine in the window (process time plus
    /// interrupts), as % of one CPU (so up to nproc * 100).
    pub system_cpu_pct: f64,
    /// Process CPU time of the machine minus client and backend: other load.
    /// More than a few % means the numbers are disturbed.
    pub other_cpu_pct: f64,
    /// Hard and soft interrupt time of the machine (includes the IPIs of
    /// cross-CPU wakeups caused by the benchmark itself).
    pub irq_pct: f64,
    /// Hypervisor steal time in the window, as % of one CPU.
    pub steal_pct: f64,
}

fn dir_stats(d: &DirResult, secs: f64) -> DirStats {
    DirStats {
        ios: d.ios,
        bytes: d.bytes,
        iops: d.ios as f64 / secs,
        mib_s: d.bytes as f64 / MIB / secs,
        lat: d.hist.summary(),
    }
}

pub fn build(
    cli: &Cli,
    dev: &DeviceInfo,
    size: u64,
    results: &[WorkerResult],
    window: &Window,
) -> Report {
    let secs = cli.runtime;
    let total = merge(results);
    let mut all = Histogram::new();
    all.merge(&total.read.hist);
    all.merge(&total.write.hist);
    let ios = total.read.ios + total.write.ios;
    let bytes = total.read.bytes + total.write.bytes;
    let pct = |cpu: f64| {
        if window.wall_s > 0.0 {
            cpu / window.wall_s * 100.0
        } else {
            0.0
        }
    };
    let backend_cpu_pct = window.backend_cpu_s.map(pct);
    let iops_per_backend_cpu_s = window
        .backend_cpu_s
        .filter(|&c| c > 0.0)
        .map(|c| ios as f64 / c);
    Report {
        tool: "vub-bench",
        version: env!("CARGO_PKG_VERSION"),
        params: cli.clone(),
        mode: if cli.poll { "poll" } else { "event" },
        size,
        device: dev.clone(),
        runtime_s: secs,
        ios,
        bytes,
        iops: ios as f64 / secs,
        mib_s: bytes as f64 / MIB / secs,
        mb_s: bytes as f64 / 1e6 / secs,
        lat: all.summary(),
        read: dir_stats(&total.read, secs),
        write: dir_stats(&total.write, secs),
        per_queue: results
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let n = r.read.ios + r.write.ios;
                QueueStats {
                    queue: i,
                    ios: n,
                    iops: n as f64 / secs,
                }
            })
            .collect(),
        completions_per_do_io: if total.do_io_calls > 0 {
            total.do_io_completions as f64 / total.do_io_calls as f64
        } else {
            0.0
        },
        client_cpu_s: window.client_cpu_s,
        client_cpu_pct: pct(window.client_cpu_s),
        backend_pid: cli.backend_pid,
        backend_cpu_s: window.backend_cpu_s,
        backend_cpu_pct,
        iops_per_backend_cpu_s,
        system_cpu_pct: pct(window.system.busy_s + window.system.irq_s),
        irq_pct: pct(window.system.irq_s),
        other_cpu_pct: pct((window.system.busy_s
            - window.client_cpu_s
            - window.backend_cpu_s.unwrap_or(0.0))
        .max(0.0)),
        steal_pct: pct(window.system.steal_s),
    }
}

fn opt(v: Option<f64>, prec: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.prec$}"))
}

pub fn print_table(out: &mut impl Write, r: &Report) -> io::Result<()> {
    let p = &r.params;
    writeln!(
        out,
        "vub-bench {}: {} rw={} bs={} iodepth={} queues={} mode={} queue-size={} \
         size={} ramp={}s runtime={}s",
        r.version,
        p.socket.display(),
        p.rw.name(),
        p.bs,
        p.iodepth,
        p.queues,
        r.mode,
        p.queue_size,
        r.size,
        p.ramp,
        p.runtime,
    )?;
    writeln!(
        out,
        "{:<6} {:>12} {:>10} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "", "IOPS", "MiB/s", "mean(us)", "p50(us)", "p99(us)", "p99.9(us)", "max(us)"
    )?;
    let mut row = |name: &str, iops: f64, mib: f64, l: &LatencySummary| {
        writeln!(
            out,
            "{name:<6} {iops:>12.0} {mib:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
            l.mean_us, l.p50_us, l.p99_us, l.p99_9_us, l.max_us
        )
    };
    if r.read.ios > 0 {
        row("read", r.read.iops, r.read.mib_s, &r.read.lat)?;
    }
    if r.write.ios > 0 {
        row("write", r.write.iops, r.write.mib_s, &r.write.lat)?;
    }
    row("total", r.iops, r.mib_s, &r.lat)?;
    if r.per_queue.len() > 1 {
        let qs: Vec<String> = r
            .per_queue
            .iter()
            .map(|q| format!("q{}={:.0}", q.queue, q.iops))
            .collect();
        writeln!(out, "per-queue IOPS: {}", qs.join(" "))?;
    }
    writeln!(
        out,
        "client CPU: {:.1}% ({:.2} s)   completions/do_io: {:.2}",
        r.client_cpu_pct, r.client_cpu_s, r.completions_per_do_io
    )?;
    if let Some(pid) = r.backend_pid {
        writeln!(
            out,
            "backend pid {pid} CPU: {}% ({} s)   IOPS per backend CPU-second: {}",
            opt(r.backend_cpu_pct, 1),
            opt(r.backend_cpu_s, 2),
            opt(r.iops_per_backend_cpu_s, 0),
        )?;
    }
    writeln!(
        out,
        "machine CPU: {:.1}% busy, {:.1}% irq, {:.1}% other processes than client{}, {:.1}% steal",
        r.system_cpu_pct,
        r.irq_pct,
        r.other_cpu_pct,
        if r.backend_pid.is_some() {
            " and backend"
        } else {
            " (backend unknown)"
        },
        r.steal_pct
    )?;
    Ok(())
}
