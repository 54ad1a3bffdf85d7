//! vub-bench: a libblkio-based load generator for vhost-user-blk backends.

mod cli;
mod cpu;
mod hist;
mod report;
mod worker;

use anyhow::{bail, ensure, Context, Result};
use blkio::Blkio;
use clap::Parser;
use cli::Cli;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use worker::{Pattern, WorkerConfig, WorkerResult};

const DRIVER: &str = "virtio-blk-vhost-user";

/// Descriptors used by one virtio-blk request besides its data segments:
/// the request header and the status byte. libblkio's virtio driver does not
/// use indirect descriptors, so every descriptor occupies a ring slot.
const RING_SLOTS_OVERHEAD: u64 = 2;

/// Properties read from the device after connecting.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DeviceInfo {
    pub capacity: u64,
    pub max_queues: i32,
    pub request_alignment: i32,
    pub max_segment_len: i32,
    pub max_segments: i32,
    pub max_transfer: i32,
    pub mem_region_alignment: u64,
    /// Data segments each request is split into (1 unless bs > max_segment_len).
    pub segments_per_request: u64,
    /// Virtqueue descriptors (ring slots) one request occupies.
    pub ring_slots_per_request: u64,
}

fn bkerr(what: &'static str) -> impl FnOnce(blkio::Error) -> anyhow::Error {
    move |e| anyhow::anyhow!("{what}: {e} (errno {})", e.errno().raw_os_error())
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("vub-bench: error: {e:#}");
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    let mut b = Blkio::new(DRIVER).map_err(bkerr("creating libblkio instance"))?;
    let path = cli
        .socket
        .to_str()
        .context("socket path is not valid UTF-8")?;
    b.set_str("path", path).map_err(bkerr("setting path"))?;
    if cli.rw.read_pct(cli.rwmixread) == 100 {
        // Lets read-only workloads run against writable=off exports too.
        b.set_bool("read-only", true)
            .map_err(bkerr("setting read-only"))?;
    }
    b.connect()
        .map_err(bkerr("connecting"))
        .with_context(|| format!("vhost-user socket {}", cli.socket.display()))?;

    let dev = probe_device(&b, cli)?;
    let size = working_set(cli, &dev)?;

    let nq = cli.queues as i32;
    let (qprop, other) = if cli.poll {
        ("num-poll-queues", "num-queues")
    } else {
        ("num-queues", "num-poll-queues")
    };
    b.set_i32("queue-size", cli.queue_size as i32)
        .map_err(bkerr("setting queue-size"))?;
    b.set_i32(other, 0).map_err(bkerr("setting queue count"))?;
    b.set_i32(qprop, nq).map_err(bkerr("setting queue count"))?;
    let outcome = b.start().map_err(bkerr("starting device"))?;
    let queues = if cli.poll {
        outcome.poll_queues
    } else {
        outcome.queues
    };
    ensure!(
        queues.len() == cli.queues as usize,
        "libblkio returned {} queues, wanted {}",
        queues.len(),
        cli.queues
    );

    // One buffer of bs bytes per in-flight request, all in one region that
    // the backend has mapped (libblkio's vhost-user driver can only use
    // memory from mapped regions).
    let per_queue = cli.bs as usize * cli.iodepth as usize;
    let align = (dev.mem_region_alignment as usize).max(page_size());
    let len = (per_queue * cli.queues as usize).div_ceil(align) * align;
    let region = b
        .alloc_mem_region(len)
        .map_err(bkerr("allocating memory region"))?;
    b.map_mem_region(&region)
        .map_err(bkerr("mapping memory region"))?;
    // SAFETY: the region is `len` bytes of freshly mmapped, writable memory
    // owned by `b`, which outlives every use below.
    unsafe { std::ptr::write_bytes(region.addr as *mut u8, 0xa5, len) };

    let backend = cli.backend_pid.map(cpu::ProcCpu::new).transpose()?;
    let read_pct = cli.rw.read_pct(cli.rwmixread);
    let abort = AtomicBool::new(false);

    let t0 = Instant::now();
    let ramp_end = t0 + Duration::from_secs_f64(cli.ramp);
    let end = ramp_end + Duration::from_secs_f64(cli.runtime);

    let seq_range = (size / cli.bs / cli.queues as u64) * cli.bs;
    let configs: Vec<WorkerConfig> = (0..cli.queues as usize)
        .map(|i| WorkerConfig {
            queue_index: i,
            pattern: if cli.rw.is_random() {
                Pattern::Random { size }
            } else {
                Pattern::Sequential {
                    start: i as u64 * seq_range,
                    end: (i as u64 + 1) * seq_range,
                }
            },
            read_pct,
            bs: cli.bs,
            iodepth: cli.iodepth as usize,
            poll: cli.poll,
            segments: dev.segments_per_request as usize,
            buf_base: region.addr + i * per_queue,
            seed: cli.seed.wrapping_add(i as u64),
            ramp_end,
            end,
        })
        .collect();

    let (results, window) = std::thread::scope(|s| -> Result<_> {
        let handles: Vec<_> = queues
            .into_iter()
            .zip(configs)
            .map(|(q, cfg)| {
                let abort = &abort;
                std::thread::Builder::new()
                    .name(format!("vub-q{}", cfg.queue_index))
                    .spawn_scoped(s, move || {
                        let r = worker::run(q, cfg, abort);
                        if r.is_err() {
                            abort.store(true, Ordering::Relaxed);
                        }
                        r
                    })
                    .expect("spawning worker thread")
            })
            .collect();

        let window = sample_window(ramp_end, end, backend.as_ref(), &abort).and_then(|w| {
            // Keep watching the backend while the workers drain.
            while !handles.iter().all(|h| h.is_finished()) {
                check_backend(backend.as_ref(), &abort)?;
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(w)
        });

        let mut results = Vec::with_capacity(handles.len());
        let mut first_err = None;
        for h in handles {
            match h.join().expect("worker thread panicked") {
                Ok(r) => results.push(r),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok((results, window?))
    })?;

    let rep = report::build(cli, &dev, size, &results, &window);
    let mut out = std::io::stdout().lock();
    if cli.json {
        serde_json::to_writer(&mut out, &rep)?;
        writeln!(out)?;
    } else {
        report::print_table(&mut out, &rep)?;
    }
    out.flush()?;
    Ok(())
}

fn page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

fn probe_device(b: &Blkio, cli: &Cli) -> Result<DeviceInfo> {
    let get_i32 = |n: &'static str| b.get_i32(n).map_err(bkerr(n));
    let capacity = b.get_u64("capacity").map_err(bkerr("capacity"))?;
    let max_queues = get_i32("max-queues")?;
    let request_alignment = get_i32("request-alignment")?;
    let max_segment_len = get_i32("max-segment-len")?;
    let max_segments = get_i32("max-segments")?;
    let max_transfer = get_i32("max-transfer")?;
    let mem_region_alignment = b
        .get_u64("mem-region-alignment")
        .map_err(bkerr("mem-region-alignment"))?;
    let max_queue_size = get_i32("max-queue-size")?;

    ensure!(
        cli.queues as i32 <= max_queues,
        "--queues {} exceeds the device's max-queues {max_queues} \
         (raise num-queues on the export)",
        cli.queues
    );
    ensure!(
        cli.queue_size.is_power_of_two() && cli.queue_size as i32 <= max_queue_size,
        "--queue-size {} must be a power of two <= {max_queue_size}",
        cli.queue_size
    );
    let ra = request_alignment.max(1) as u64;
    ensure!(
        cli.bs.is_multiple_of(ra),
        "--bs {} is not a multiple of the device's request-alignment {ra}",
        cli.bs
    );
    if max_transfer > 0 && cli.bs > max_transfer as u64 {
        bail!(
            "--bs {} exceeds the device's max-transfer {max_transfer}",
            cli.bs
        );
    }
    let seg_limit = match (max_segment_len, cli.split_segments) {
        (m, Some(s)) if m > 0 => s.min(m as u64),
        (_, Some(s)) => s,
        (m, None) if m > 0 => m as u64,
        _ => u64::MAX,
    };
    let segments = cli.bs.div_ceil(seg_limit);
    if segments > 1 && max_segments > 0 && segments > max_segments as u64 {
        bail!(
            "--bs {} needs {segments} segments of at most {max_segment_len} bytes, \
             but the device allows {max_segments}",
            cli.bs
        );
    }
    let slots = RING_SLOTS_OVERHEAD + segments;
    let need = u64::from(cli.iodepth) * slots;
    if need > u64::from(cli.queue_size) {
        bail!(
            "--iodepth {} does not fit the virtqueue: each request takes {slots} ring slots \
             (libblkio's virtio-blk driver uses no indirect descriptors), so it needs {need} \
             slots but --queue-size is {}; use --iodepth <= {} or a larger --queue-size",
            cli.iodepth,
            cli.queue_size,
            u64::from(cli.queue_size) / slots
        );
    }
    Ok(DeviceInfo {
        capacity,
        max_queues,
        request_alignment,
        max_segment_len,
        max_segments,
        max_transfer,
        mem_region_alignment,
        segments_per_request: segments,
        ring_slots_per_request: slots,
    })
}

fn working_set(cli: &Cli, dev: &DeviceInfo) -> Result<u64> {
    let size = cli.size.unwrap_or(dev.capacity);
    ensure!(
        size <= dev.capacity,
        "--size {size} exceeds the device capacity {}",
        dev.capacity
    );
    let size = size / cli.bs * cli.bs;
    let per_queue = if cli.rw.is_random() {
        size
    } else {
        size / cli.queues as u64
    };
    ensure!(
        per_queue >= cli.bs,
        "working set of {size} bytes is too small for --bs {} (x{} queues for sequential)",
        cli.bs,
        cli.queues
    );
    Ok(size)
}

/// CPU samples taken at the start and the end of the measured window.
pub struct Window {
    pub wall_s: f64,
    pub client_cpu_s: f64,
    pub backend_cpu_s: Option<f64>,
    /// Machine-wide CPU use over the window (all processes, all CPUs).
    pub system: cpu::SystemCpu,
}

/// Fails (and tells the workers to stop) once the backend has exited:
/// libblkio itself does not notice, its requests just never complete.
fn check_backend(backend: Option<&cpu::ProcCpu>, abort: &AtomicBool) -> Result<()> {
    match backend {
        Some(b) if !b.alive() => {
            abort.store(true, Ordering::Relaxed);
            bail!("backend process {} exited during the run", b.pid())
        }
        _ => Ok(()),
    }
}

/// Sleeps until `t` (or until a worker aborts), watching the backend.
fn sleep_until(t: Instant, backend: Option<&cpu::ProcCpu>, abort: &AtomicBool) -> Result<()> {
    while !abort.load(Ordering::Relaxed) {
        check_backend(backend, abort)?;
        let now = Instant::now();
        if now >= t {
            break;
        }
        std::thread::sleep((t - now).min(Duration::from_millis(50)));
    }
    Ok(())
}

fn sample_window(
    ramp_end: Instant,
    end: Instant,
    backend: Option<&cpu::ProcCpu>,
    abort: &AtomicBool,
) -> Result<Window> {
    sleep_until(ramp_end, backend, abort)?;
    let w0 = Instant::now();
    let c0 = cpu::self_cpu_seconds();
    let s0 = cpu::system_cpu()?;
    let b0 = backend.map(|b| b.sample()).transpose()?;
    sleep_until(end, backend, abort)?;
    let w1 = Instant::now();
    let c1 = cpu::self_cpu_seconds();
    let s1 = cpu::system_cpu()?;
    let b1 = backend
        .map(|b| b.sample())
        .transpose()
        .context("backend process went away during the run")?;
    Ok(Window {
        wall_s: (w1 - w0).as_secs_f64(),
        client_cpu_s: c1 - c0,
        backend_cpu_s: b0.zip(b1).map(|(a, b)| b - a),
        system: s1 - s0,
    })
}

/// Merge per-queue results (kept here so report.rs only formats).
pub fn merge(results: &[WorkerResult]) -> WorkerResult {
    let mut total = WorkerResult::default();
    for r in results {
        total.read.merge(&r.read);
        total.write.merge(&r.write);
        total.do_io_calls += r.do_io_calls;
        total.do_io_completions += r.do_io_completions;
    }
    total
}
