#!/usr/bin/env python3
"""Helpers for scripts/bench.sh (standard library only).

  compare.py wrap KEY=VALUE... < vub-bench.json >> results.jsonl
      Wrap one `vub-bench --json` object with run metadata into a JSON line.
      With --error MSG instead of stdin JSON, record a failed run. With --fio,
      stdin is `fio --output-format=json` output (one job), converted into the
      same result fields (iops, mib_s, lat percentiles; CPU of fio as the
      backend's).

  compare.py report results.jsonl
      Print the A/B comparison: per case and placement, median and min-max
      over repeats for each backend, and the ratios ours/theirs; then the
      summary blocks: one per variant of ours vs the reference, latency at
      QD1, queue scaling (qN / q1) and the host fio baseline.
"""

import json
import statistics
import sys
from collections import OrderedDict

# A run whose machine had more than this much CPU (% of one CPU) busy outside
# client and backend is flagged as disturbed.
NOISY_OTHER_CPU_PCT = 10
# Hypervisor steal time (% of one CPU) above which a run is flagged.
STEAL_PCT = 10


def wrap(argv):
    meta = OrderedDict()
    error = None
    fio = False
    it = iter(argv)
    for a in it:
        if a == "--error":
            error = next(it)
            continue
        if a == "--fio":
            fio = True
            continue
        k, _, v = a.partition("=")
        meta[k] = v
    for k in ("repeat", "iodepth", "queues"):
        if k in meta:
            meta[k] = int(meta[k])
    if error is None:
        raw = sys.stdin.read().strip()
        tool = "fio" if fio else "vub-bench"
        try:
            if fio:
                # fio may print notes before the JSON object.
                meta["result"] = fio_result(json.loads(raw[raw.find("{"):]), meta.get("rw", ""))
            else:
                meta["result"] = json.loads(raw)
        except (json.JSONDecodeError, KeyError, IndexError, TypeError, ValueError) as e:
            meta["error"] = f"bad {tool} output ({type(e).__name__}: {e}): {raw[:200]!r}"
    else:
        meta["error"] = error
    print(json.dumps(meta))


def fio_result(d, rw):
    """The vub-bench result fields from one fio job (latency: fio's clat, from
    submission to completion; fio does not report percentiles of its total lat
    by default, and the submission part is small with io_uring)."""
    job = d["jobs"][0]
    if job.get("error"):
        raise ValueError(f"fio job error {job['error']}")
    side = job["read"] if "read" in rw else job["write"]
    lat = side.get("lat_ns", {}) if "percentile" in side.get("lat_ns", {}) else side["clat_ns"]
    pct = lat["percentile"]
    us = lambda ns: ns / 1000.0
    cpu = job.get("usr_cpu", 0.0) + job.get("sys_cpu", 0.0)
    return OrderedDict([
        ("tool", "fio"),
        ("version", d.get("fio version")),
        ("runtime_s", job.get("job_runtime", 0) / 1000.0),
        ("ios", side["total_ios"]),
        ("bytes", side["io_bytes"]),
        ("iops", side["iops"]),
        ("mib_s", side["bw_bytes"] / 2**20),
        ("mb_s", side["bw_bytes"] / 1e6),
        ("lat", OrderedDict([
            ("min_us", us(lat["min"])), ("mean_us", us(lat["mean"])),
            ("p50_us", us(pct["50.000000"])), ("p90_us", us(pct["90.000000"])),
            ("p99_us", us(pct["99.000000"])), ("p99_9_us", us(pct["99.900000"])),
            ("max_us", us(lat["max"])),
        ])),
        ("lat_source", "lat_ns" if lat is side.get("lat_ns") else "clat_ns"),
        # fio is client and "backend" in one process: its CPU goes in bCPU%.
        ("backend_cpu_pct", cpu),
        ("client_cpu_pct", None),
        ("iops_per_backend_cpu_s", None),
        ("other_cpu_pct", None),
        ("steal_pct", None),
        ("fio", OrderedDict([(k, job.get(k)) for k in ("usr_cpu", "sys_cpu", "ctx", "majf", "minf")])),
    ])


def stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return (statistics.median(values), min(values), max(values))


def fmt_num(v, unit=""):
    """Compact number; MiB/s values are printed as plain integers."""
    if v is None:
        return "-"
    if unit == "MiB/s":
        return f"{v:.0f}"
    a = abs(v)
    if a >= 1e6:
        return f"{v / 1e6:.2f}M"
    if a >= 1e4:
        return f"{v / 1e3:.0f}k"
    if a >= 1e3:
        return f"{v / 1e3:.1f}k"
    if a >= 100:
        return f"{v:.0f}"
    return f"{v:.1f}"


def fmt_stat(s, unit=""):
    if s is None:
        return "-"
    med, lo, hi = s
    if lo == hi:
        return fmt_num(med, unit)
    return f"{fmt_num(med, unit)} [{fmt_num(lo, unit)}-{fmt_num(hi, unit)}]"


def spread(s):
    """max / min - 1 of a cell's repeats, in percent: how stable it was."""
    if s is None or not s[1]:
        return "-"
    return f"{(s[2] / s[1] - 1) * 100:.0f}%"


def ratio(a, b):
    if a is None or b is None or not b[0]:
        return None
    return a[0] / b[0]


def fmt_ratio(v):
    return f"{v:.2f}x" if v is not None else "-"


def report(path):
    runs = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                runs.append(json.loads(line))
    if not runs:
        print("no results")
        return 1

    # Preserve first-seen order of cases, placements and backends.
    cases = OrderedDict()
    backends = OrderedDict()
    for r in runs:
        key = (r["backing"], r["case"], r["placement"])
        cases.setdefault(key, []).append(r)
        backends.setdefault(r["backend"], r.get("role", ""))

    theirs = next((b for b, role in backends.items() if role == "theirs"), None)
    # Ours: every variant of our daemon (vub, vub-poll), compared with the reference.
    ours_list = [b for b, role in backends.items() if role == "ours"]
    if not ours_list:
        # QSD-only run: compare further QSD variants against the reference.
        ours_list = [b for b, role in backends.items() if role == "other"]
    # The host baseline (fio straight on the image), if any.
    baseline = next((b for b, role in backends.items() if role == "baseline"), None)
    failures = 0
    noisy = 0
    stolen = 0

    # (backing, case, placement) -> (first run's metadata, unit, {backend: stats})
    results = OrderedDict()
    width = max([16] + [len(b) for b in backends])
    for (backing, case, placement), rs in cases.items():
        seq = rs[0].get("rw") in ("read", "write")
        metric = "mib_s" if seq else "iops"
        mlabel = "MiB/s" if seq else "IOPS"
        print(f"\n== {backing} | {case} | {placement}")
        hdr = (f"  {'backend':<{width}} {mlabel + ' median [min-max]':<28} "
               f"{'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
               f"{'IOPS/bCPU-s':>12} {'bCPU%':>6} {'cCPU%':>6} {'oCPU%':>6} {'steal%':>6} {'n':>2} {'spread':>7}")
        print(hdr)
        per_backend = OrderedDict()
        for b in backends:
            brs = [r for r in rs if r["backend"] == b]
            if not brs:
                continue
            ok = [r["result"] for r in brs if "result" in r]
            bad = [r for r in brs if "error" in r]
            failures += len(bad)
            s = {
                "metric": stats([x[metric] for x in ok]),
                "iops": stats([x["iops"] for x in ok]),
                "p50": stats([x["lat"]["p50_us"] for x in ok]),
                "p99": stats([x["lat"]["p99_us"] for x in ok]),
                "p999": stats([x["lat"]["p99_9_us"] for x in ok]),
                "eff": stats([x.get("iops_per_backend_cpu_s") for x in ok]),
                "bcpu": stats([x.get("backend_cpu_pct") for x in ok]),
                "ccpu": stats([x.get("client_cpu_pct") for x in ok]),
                "ocpu": stats([x.get("other_cpu_pct") for x in ok]),
                "steal": stats([x.get("steal_pct") for x in ok]),
            }
            stolen += sum(1 for x in ok if (x.get("steal_pct") or 0) > STEAL_PCT)
            noisy += sum(1 for x in ok if (x.get("other_cpu_pct") or 0) > NOISY_OTHER_CPU_PCT)
            per_backend[b] = s
            med = lambda k: fmt_num(s[k][0]) if s[k] else "-"
            print(f"  {b:<{width}} {fmt_stat(s['metric'], mlabel):<28} {med('p50'):>8} "
                  f"{med('p99'):>8} {med('p999'):>9} {med('eff'):>12} "
                  f"{med('bcpu'):>6} {med('ccpu'):>6} {med('ocpu'):>6} {med('steal'):>6} {len(ok):>2} "
                  f"{spread(s['metric']):>7}")
            for r in bad:
                print(f"  {'':<{width}} FAILED (repeat {r.get('repeat')}): {r['error']}")
        results[(backing, case, placement)] = (rs[0], mlabel, per_backend)
        for ours in ours_list:
            if ours in per_backend and theirs in per_backend:
                a, b = per_backend[ours], per_backend[theirs]
                print(f"  {'ratio ' + ours + '/' + theirs}: {mlabel} "
                      f"{fmt_ratio(ratio(a['metric'], b['metric']))}  "
                      f"p50 {fmt_ratio(ratio(a['p50'], b['p50']))}  "
                      f"p99 {fmt_ratio(ratio(a['p99'], b['p99']))}  "
                      f"IOPS/bCPU-s {fmt_ratio(ratio(a['eff'], b['eff']))}")
        if baseline in per_backend:
            parts = [f"{b} {fmt_ratio(ratio(per_backend[b]['metric'], per_backend[baseline]['metric']))}"
                     for b in per_backend if b != baseline]
            if parts:
                print(f"  ratio to {baseline} ({mlabel}): " + "  ".join(parts))

    def cell(s, key, unit=""):
        return fmt_num(s[key][0], unit) if s.get(key) else "-"

    # One summary block per variant of ours.
    for ours in ours_list:
        rows = [(k, unit, pb[ours], pb[theirs]) for k, (_, unit, pb) in results.items()
                if ours in pb and theirs in pb]
        if not rows:
            continue
        print(f"\n== summary: {ours} vs {theirs} (medians; ratio > 1 means {ours} "
              "is faster / more CPU-efficient)")
        print(f"  {'backing':<8} {'case':<24} {'placement':<9} {'unit':<5} "
              f"{ours[:12]:>12} {theirs[:12]:>12} {'ratio':>7} {'eff ratio':>9}")
        for (backing, case, placement), unit, a, b in rows:
            print(f"  {backing:<8} {case:<24} {placement:<9} {unit:<5} "
                  f"{cell(a, 'metric', unit):>12} {cell(b, 'metric', unit):>12} "
                  f"{fmt_ratio(ratio(a['metric'], b['metric'])):>7} "
                  f"{fmt_ratio(ratio(a['eff'], b['eff'])):>9}")

    # Latency at QD1, where it is not just queueing.
    lat_rows = []
    for (backing, case, placement), (meta, _, pb) in results.items():
        if int(meta.get("iodepth", 0)) != 1 or theirs not in pb:
            continue
        for ours in ours_list:
            if ours in pb:
                lat_rows.append((backing, case, placement, ours, pb[ours], pb[theirs]))
    if lat_rows:
        print(f"\n== latency at QD1 vs {theirs} (median p50/p99 in us; ratio = backend / {theirs}, "
              "< 1 means the backend's is lower = better)")
        print(f"  {'backing':<8} {'case':<24} {'placement':<9} {'backend':<12} "
              f"{'p50':>7} {'ref p50':>7} {'ratio':>7} {'p99':>7} {'ref p99':>7} {'ratio':>7}")
        for backing, case, placement, ours, a, b in lat_rows:
            print(f"  {backing:<8} {case:<24} {placement:<9} {ours[:12]:<12} "
                  f"{cell(a, 'p50'):>7} {cell(b, 'p50'):>7} {fmt_ratio(ratio(a['p50'], b['p50'])):>7} "
                  f"{cell(a, 'p99'):>7} {cell(b, 'p99'):>7} {fmt_ratio(ratio(a['p99'], b['p99'])):>7}")

    # Queue scaling: IOPS of the qN case / the q1 case of the same rw, bs, iodepth.
    groups = OrderedDict()  # (backing, placement, rw, bs, iodepth) -> {queues: per_backend}
    for (backing, case, placement), (meta, _, pb) in results.items():
        try:
            key = (backing, placement, meta["rw"], meta["bs"], int(meta["iodepth"]))
            q = int(meta["queues"])
        except (KeyError, ValueError):
            continue
        groups.setdefault(key, {})[q] = pb
    groups = OrderedDict((k, v) for k, v in groups.items() if 1 in v and len(v) > 1)
    if groups:
        qs = sorted({q for v in groups.values() for q in v if q != 1})
        print("\n== queue scaling (median IOPS of the qN case / the q1 case with the same rw, bs "
              "and iodepth per queue;")
        print("   vub runs one iothread per queue, qsd-iothread serves all queues in one iothread)")
        print(f"  {'backing':<8} {'placement':<9} {'case (q1)':<24} {'backend':<{width}} "
              f"{'q1 IOPS':>8} " + " ".join(f"{'q' + str(q):>6}" for q in qs))
        for (backing, placement, rw, bs, qd), byq in groups.items():
            base = byq[1]
            for b in backends:
                if b == baseline or b not in base or not base[b]["iops"]:
                    continue
                cols = []
                for q in qs:
                    s = byq.get(q, {}).get(b)
                    cols.append(fmt_ratio(ratio(s["iops"], base[b]["iops"])) if s else "-")
                print(f"  {backing:<8} {placement:<9} {f'{rw}-{bs}-qd{qd}-q1':<24} {b:<{width}} "
                      f"{cell(base[b], 'iops'):>8} " + " ".join(f"{c:>6}" for c in cols))

    # Host baseline: the daemons against fio on the same image.
    base_rows = [(k, pb) for k, (_, _, pb) in results.items() if baseline in pb]
    if base_rows:
        print(f"\n== host baseline: MiB/s / {baseline} (fio with io_uring and O_DIRECT straight on "
              "the image file, same bs/iodepth/rw, 1 job; medians)")
        print(f"  {'backing':<8} {'case':<24} {'placement':<9} {'backend':<{width}} "
              f"{'MiB/s':>7} {baseline[:8]:>8} {'ratio':>7}")
        for (backing, case, placement), pb in base_rows:
            for b, s in pb.items():
                if b == baseline:
                    continue
                print(f"  {backing:<8} {case:<24} {placement:<9} {b:<{width}} "
                      f"{cell(s, 'metric', 'MiB/s'):>7} {cell(pb[baseline], 'metric', 'MiB/s'):>8} "
                      f"{fmt_ratio(ratio(s['metric'], pb[baseline]['metric'])):>7}")

    if noisy:
        print(f"\nWARNING: {noisy} run(s) saw more than {NOISY_OTHER_CPU_PCT}% CPU used by "
              "other processes (oCPU%); their numbers are disturbed")
    if stolen:
        print(f"\nWARNING: {stolen} run(s) lost more than {STEAL_PCT}% of a CPU to hypervisor "
              "steal (steal%): the host did not run this VM's vCPUs when they were ready")
    if failures:
        print(f"\n{failures} run(s) FAILED")
    return 1 if failures else 0


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "wrap":
        wrap(args)
        return 0
    if cmd == "report" and len(args) == 1:
        return report(args[0])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
