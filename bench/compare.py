#!/usr/bin/env python3
"""Helpers for scripts/bench.sh (standard library only).

  compare.py wrap KEY=VALUE... < vub-bench.json >> results.jsonl
      Wrap one `vub-bench --json` object with run metadata into a JSON line.
      With --error MSG instead of stdin JSON, record a failed run.

  compare.py report results.jsonl
      Print the A/B comparison: per case and placement, median and min-max
      over repeats for each backend, and the ratio ours/theirs.
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
    it = iter(argv)
    for a in it:
        if a == "--error":
            error = next(it)
            continue
        k, _, v = a.partition("=")
        meta[k] = v
    for k in ("repeat", "iodepth", "queues"):
        if k in meta:
            meta[k] = int(meta[k])
    if error is None:
        raw = sys.stdin.read().strip()
        try:
            meta["result"] = json.loads(raw)
        except json.JSONDecodeError as e:
            meta["error"] = f"bad vub-bench output ({e}): {raw[:200]!r}"
    else:
        meta["error"] = error
    print(json.dumps(meta))


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


def ratio(a, b):
    if a is None or b is None or not b[0]:
        return None
    return a[0] / b[0]


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

    ours = next((b for b, role in backends.items() if role == "ours"), None)
    theirs = next((b for b, role in backends.items() if role == "theirs"), None)
    if ours is None:
        # QSD-only run: compare further QSD variants against the reference.
        others = [b for b in backends if b != theirs]
        ours = others[0] if others else None
    failures = 0
    noisy = 0
    stolen = 0

    summary = []
    for (backing, case, placement), rs in cases.items():
        seq = rs[0].get("rw") in ("read", "write")
        metric = "mib_s" if seq else "iops"
        mlabel = "MiB/s" if seq else "IOPS"
        print(f"\n== {backing} | {case} | {placement}")
        hdr = (f"  {'backend':<16} {mlabel + ' median [min-max]':<28} "
               f"{'p50 us':>8} {'p99 us':>8} {'p99.9 us':>9} "
               f"{'IOPS/bCPU-s':>12} {'bCPU%':>6} {'cCPU%':>6} {'oCPU%':>6} {'steal%':>6} {'n':>2}")
        print(hdr)
        per_backend = {}
        for b in backends:
            brs = [r for r in rs if r["backend"] == b]
            if not brs:
                continue
            ok = [r["result"] for r in brs if "result" in r]
            bad = [r for r in brs if "error" in r]
            failures += len(bad)
            s = {
                "metric": stats([x[metric] for x in ok]),
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
            print(f"  {b:<16} {fmt_stat(s['metric'], mlabel):<28} {med('p50'):>8} "
                  f"{med('p99'):>8} {med('p999'):>9} {med('eff'):>12} "
                  f"{med('bcpu'):>6} {med('ccpu'):>6} {med('ocpu'):>6} {med('steal'):>6} {len(ok):>2}")
            for r in bad:
                print(f"  {'':<16} FAILED (repeat {r.get('repeat')}): {r['error']}")
        if ours in per_backend and theirs in per_backend:
            a, b = per_backend[ours], per_backend[theirs]
            rm = ratio(a["metric"], b["metric"])
            re = ratio(a["eff"], b["eff"])
            r50 = ratio(a["p50"], b["p50"])
            r99 = ratio(a["p99"], b["p99"])
            f = lambda v: f"{v:.2f}x" if v is not None else "-"
            print(f"  {'ratio ' + ours + '/' + theirs}: {mlabel} {f(rm)}  "
                  f"p50 {f(r50)}  p99 {f(r99)}  IOPS/bCPU-s {f(re)}")
            summary.append((backing, case, placement, mlabel, a, b, rm, re))

    if summary:
        print(f"\n== summary: {ours} vs {theirs} (medians; ratio > 1 means {ours} "
              "is faster / more CPU-efficient)")
        print(f"  {'backing':<8} {'case':<24} {'placement':<9} {'unit':<5} "
              f"{ours[:12]:>12} {theirs[:12]:>12} {'ratio':>7} {'eff ratio':>9}")
        for backing, case, placement, unit, a, b, rm, re in summary:
            va = fmt_num(a["metric"][0], unit) if a["metric"] else "-"
            vb = fmt_num(b["metric"][0], unit) if b["metric"] else "-"
            f = lambda v: f"{v:.2f}x" if v is not None else "-"
            print(f"  {backing:<8} {case:<24} {placement:<9} {unit:<5} "
                  f"{va:>12} {vb:>12} {f(rm):>7} {f(re):>9}")
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
