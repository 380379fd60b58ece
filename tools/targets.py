#!/usr/bin/env python3
"""targets.py: the performance targets of issues 4 and 5 against a run's JSON (no dependencies).

  python3 tools/targets.py DIR [--gpus N]   # DIR: where scripts/gpu-check.sh's `bench` and `ll`
                                            # stages wrote their JSON (moe_ht_bf16.json,
                                            # moe_ht_fp8.json, alltoall_cuda.json,
                                            # moe_ll_fp8_t128.json); N: GPUs of the machine
  python3 tools/targets.py selftest         # the table from made-up files (ctest)

Prints one line per target: epx's time, the baseline of the same run, the target, and
"met" / "NOT met" — or "WRONG VALUES" when the record counts wrong outputs (or outputs that
differ from the baseline's), "(outputs not checked by the bench)" after the verdict when the
record says checked: false, or "not comparable" when the record is of another shape than the
target's (backend, mode, dispatch dtype, combine dtype, T, H, K, E: named) or the run was not 2 ranks on 2 GPUs
(the targets' setup: ../shared/DEVICE.md's 2 x H200), or "missing" when no file had the case. Times are
the bench's: CUDA events around the call, L2 flushed, median, max over ranks; from a CUDA
graph where the bench captured one (graph_time_us) it is shown too.
"""
import json
import os
import sys
import tempfile

GIB = 1 << 30

# The shapes of the targets (issues 4 and 5): a record of another shape is not comparable.
# High throughput: bf16 tokens (fp8 for its dispatch target), also for the layout and the
# memory, read from the bf16 run. Records from before epx-bench's --combine-dtype have no
# combine_dtype: theirs was bf16.
HT = {"backend": "cuda", "mode": "ht", "dtype": "bf16", "tokens": 4096, "hidden": 7168, "topk": 8, "experts": 256,
      "combine_dtype": "bf16"}
LL = {"backend": "cuda", "mode": "ll", "dtype": "fp8", "tokens": 128, "hidden": 7168, "topk": 8, "experts": 288,
      "combine_dtype": "bf16"}
DEFAULTS = {"combine_dtype": "bf16"}
A2A = {"backend": "cuda"}
# (issue, what, file, op or alltoall bytes, field, target, shape): field "time_us" or the memory
TARGETS = [
    (4, "layout, T=4096, E=256", "moe_ht_bf16.json", "layout", "time_us", 10.0, HT),
    (4, "dispatch bf16, T=4096, 24 SMs", "moe_ht_bf16.json", "dispatch", "time_us", 200.0, HT),
    (4, "dispatch fp8, T=4096, 24 SMs", "moe_ht_fp8.json", "dispatch", "time_us", 120.0, dict(HT, dtype="fp8")),
    (4, "combine bf16, T=4096, 24 SMs", "moe_ht_bf16.json", "combine", "time_us", 210.0, HT),
    (4, "alltoall 1 GiB per rank", "alltoall_cuda.json", GIB, "time_us", 1450.0, A2A),
    (4, "alltoall 1 KiB per rank", "alltoall_cuda.json", 1024, "time_us", 6.0, A2A),
    (4, "device memory per rank (MiB)", "moe_ht_bf16.json", "dispatch", "epx_device_mem_bytes", 1024.0, HT),
    (5, "low-latency dispatch fp8, T=128, E=288", "moe_ll_fp8_t128.json", "dispatch", "time_us", 12.0, LL),
    (5, "low-latency combine bf16, T=128, E=288", "moe_ll_fp8_t128.json", "combine", "time_us", 15.0, LL),
]


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def find(records, key):
    for r in records or []:
        if (isinstance(key, int) and r.get("bytes") == key) or (isinstance(key, str) and r.get("op") == key):
            return r
    return None


def table(d, gpus):
    """The lines of the table for the files in directory d."""
    lines = ["# issue | target case | epx | graph | baseline (same run) | target | verdict"]
    pair = None
    for issue, what, name, key, field, target, shape in TARGETS:
        mem = field == "epx_device_mem_bytes"
        unit = " MiB" if mem else " us"
        r = find(load(os.path.join(d, name)), key)
        if r is None or field not in r:
            lines.append("%d | %s | - | - | - | %g%s | missing (%s)" % (issue, what, target, unit, name))
            continue
        v = r[field] / (1 << 20) if mem else r[field]
        g = r.get("graph_time_us")
        b = r.get("baseline_time_us") if not mem and r.get("baseline", "none") != "none" else None
        ranks, ngpu = r.get("ranks", 0), r.get("gpus", gpus)
        other = ["%s %s" % (k, r.get(k, DEFAULTS.get(k))) for k, want in shape.items()
                 if r.get(k, DEFAULTS.get(k)) != want]
        if r.get("wrong", 0) or r.get("diff_vs_baseline", 0):
            # a time of wrong outputs meets nothing
            verdict = "WRONG VALUES (%s wrong, %s differ from the baseline)" % (
                "%.0f" % r.get("wrong", 0), "%.0f" % r.get("diff_vs_baseline", 0))
        elif other:
            verdict = "not comparable (%s)" % ", ".join(other)
        elif ranks == 2 and ngpu == 2 and gpus >= 2:
            verdict = "met" if v <= target else "NOT met"
        else:
            verdict = "not comparable (%s ranks, %s GPUs)" % (ranks, ngpu)
        if r.get("checked") is False and not mem:
            verdict += " (outputs not checked by the bench)"
        lines.append("%d | %s | %.2f%s | %s | %s | %g%s | %s" % (
            issue, what, v, unit, "%.2f us" % g if g and not mem else "-",
            "%.2f us (%s)" % (b, r.get("baseline")) if b else "-", target, unit, verdict))
        if r.get("pair_graph_time_us") and not other:  # (a pair of another shape says nothing)
            pair = r["pair_graph_time_us"]
    if pair:
        lines.append("# low latency, dispatch + combine in one CUDA graph replayed back to back: %.2f us per pair" % pair)
    return lines


def selftest():
    with tempfile.TemporaryDirectory() as d:
        def put(name, recs):
            with open(os.path.join(d, name), "w") as f:
                json.dump(recs, f)
        base = {"ranks": 2, "gpus": 2, "baseline": "nccl_send_recv"}
        old_ht = {k: v for k, v in HT.items() if k != "combine_dtype"}  # as written before --combine-dtype
        ht, ll = dict(base, **old_ht), dict(base, **LL)
        put("moe_ht_bf16.json", [dict(ht, op="layout", time_us=9.5, baseline_time_us=18.0),
                                 dict(ht, op="dispatch", time_us=210.0, baseline_time_us=340.0,
                                      epx_device_mem_bytes=4 << 20),
                                 dict(ht, op="combine", time_us=200.0, baseline_time_us=280.0)])
        put("moe_ht_fp8.json", [dict(ht, op="dispatch", dtype="fp8", tokens=256, combine_dtype="f16", time_us=50.0)])
        put("moe_ll_fp8_t128.json", [dict(ll, op="dispatch", time_us=11.0, graph_time_us=10.0, checked=False),
                                     dict(ll, op="combine", time_us=16.0, pair_graph_time_us=25.0)])
        put("alltoall_cuda.json", [{"op": "alltoall", "backend": "cuda", "ranks": 2, "bytes": 1024, "time_us": 7.0,
                                    "baseline": "ncclAlltoAll", "baseline_time_us": 12.0},
                                   {"op": "alltoall", "backend": "cuda", "ranks": 2, "bytes": GIB, "time_us": 1000.0,
                                    "wrong": 3, "baseline": "ncclAlltoAll", "baseline_time_us": 1600.0}])
        got = table(d, 2)
        want = {"layout": "met", "dispatch bf16": "NOT met",
                "dispatch fp8": "not comparable (tokens 256, combine_dtype f16)",
                "combine bf16": "met",
                "1 GiB": "WRONG VALUES", "1 KiB": "NOT met", "memory": "met",
                "low-latency dispatch": "met (outputs not checked by the bench)",
                "low-latency combine": "NOT met"}
        bad = [k for k, v in want.items() if not any(k in l and l.split(" | ")[-1].startswith(v) for l in got)]
        if not any("25.00 us per pair" in l for l in got):
            bad.append("pair")
        if not table(d, 1)[1].endswith("not comparable (2 ranks, 2 GPUs)"):
            bad.append("one GPU")
        # another dispatch dtype (its combine in the bench's default, the same) is not comparable
        put("moe_ht_bf16.json", [dict(ht, op="combine", dtype="f32", combine_dtype="f32", time_us=100.0)])
        if not any("combine bf16" in l and l.endswith("not comparable (dtype f32, combine_dtype f32)")
                   for l in table(d, 2)):
            bad.append("dispatch dtype")
        print("\n".join(got))
        print("selftest: %s" % ("FAILED: " + ", ".join(bad) if bad else "passed"))
        return 1 if bad else 0


def main(argv):
    if argv[:1] == ["selftest"]:
        return selftest()
    if not argv or argv[0].startswith("-"):
        print(__doc__.strip())
        return 2
    gpus = int(argv[argv.index("--gpus") + 1]) if "--gpus" in argv else 2
    print("\n".join(table(argv[0], gpus)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
