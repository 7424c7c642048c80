"""Peak memory of the exact nu-step meta-gradient (LeNet, 28x28, 62 classes) for nu = 1, 2, 5, 10.

Each (method, nu) is measured in a fresh subprocess, two ways:
- `peak_alloc_bytes`: the peak of torch's CPU allocations during one meta-gradient, from the
  profiler's memory events (allocations minus frees, in time order) - exact and deterministic;
- `rss_delta_bytes`: growth of the process's peak RSS (ru_maxrss) over the meta-gradient.
`exact` is simfed's recursion (functional.meta_gradient: stored iterates, one step's graph at a
time); `unrolled` is autograd through all nu steps with create_graph=True, for contrast.
Prints JSON with ratios against nu = 1. Usage: python bench/metafl_memory.py [--batch 64]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys


def measure(method: str, nu: int, batch: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from simfed.algorithms.kit import functional as fn
    from simfed.algorithms.kit.models import LeNet, flat_params, init_model

    torch.set_num_threads(1)
    model = init_model(LeNet(1, 62, 28), 0)
    f = fn.loss_fn(model)
    g = torch.Generator().manual_seed(nu)
    data = [(torch.rand(batch, 1, 28, 28, generator=g), torch.randint(0, 62, (batch,), generator=g))
            for _ in range(nu + 1)]
    w = flat_params(model)
    run = {"exact": lambda: fn.meta_gradient(f, w, 0.05, data[:nu], data[nu], mode="exact"),
           "unrolled": lambda: fn.unrolled_meta_gradient(f, w, 0.05, data[:nu], data[nu])}[method]
    # warm up with a nu=1 problem so lazy one-time allocations (kernels, thread pools) are not counted
    fn.meta_gradient(f, w, 0.05, data[:1], data[1], mode="exact")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = run()
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
    # raw allocator events (one per allocation/free, signed bytes), not op-attributed totals
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, b in events:
        live += b
        peak = max(peak, live)
    return {"method": method, "nu": nu, "params": int(w.numel()), "batch": batch,
            "peak_alloc_bytes": int(peak), "rss_delta_bytes": int(rss1 - rss0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--nus", default="1,2,5,10")
    ap.add_argument("--child", nargs=2, metavar=("METHOD", "NU"))
    a = ap.parse_args()
    if a.child:
        print(json.dumps(measure(a.child[0], int(a.child[1]), a.batch)))
        return
    nus = [int(s) for s in a.nus.split(",")]
    rows = []
    for method in ("exact", "unrolled"):
        for nu in nus:
            res = subprocess.run([sys.executable, __file__, "--child", method, str(nu), "--batch", str(a.batch)],
                                 check=True, capture_output=True, text=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    for r in rows:
        base = next(b for b in rows if b["method"] == r["method"] and b["nu"] == nus[0])
        r["peak_ratio_vs_nu1"] = round(r["peak_alloc_bytes"] / base["peak_alloc_bytes"], 3)
        r["peak_MiB"] = round(r["peak_alloc_bytes"] / 2**20, 2)
    exact = [r for r in rows if r["method"] == "exact"]
    # at most linear: peak(nu) / peak(1) <= nu for every nu
    summary = {"at_most_linear": all(r["peak_ratio_vs_nu1"] <= r["nu"] for r in exact),
               "exact_ratio_nu10_vs_nu1": next((r["peak_ratio_vs_nu1"] for r in exact if r["nu"] == 10), None),
               "unrolled_ratio_nu10_vs_nu1": next((r["peak_ratio_vs_nu1"] for r in rows
                                                   if r["method"] == "unrolled" and r["nu"] == 10), None)}
    print(json.dumps({"rows": rows, "summary": summary}, indent=1))


if __name__ == "__main__":
    main()
