"""Query throughput of a full CGE step on the digits CNN: naive loop vs vectorized vs feature reuse.

The model is ``digits_cnn()`` (3,658 parameters), the loss cross-entropy on ``--batch`` digits
training images, float32 on the CPU (or the GPU when there is one). One forward CGE step
(3,659 queries, mu = 5e-3) is timed for

* ``naive``: the fair serial reference -- per coordinate, an out-of-place copy of the one
  perturbed tensor and one ordinary forward of the whole batch with ``functional_call``, no
  autograd (``_common.naive_cge_losses``);
* ``vectorized``: ``VectorizedScheduler`` (one ``vmap`` per chunk, only the perturbed tensor batched);
* ``reuse``: ``FeatureReuseScheduler`` (cached stage inputs, explicit deltas);
* ``reuse_no_deltas``: ``FeatureReuseScheduler(explicit_deltas=False)`` (plain reuse + vmap).

All methods run side by side, one round per repeat, after a warm-up; medians are reported.
Correctness: the gradients of all methods are compared with the naive one (float32: forward
differences amplify rounding by 1/mu, see ``float32_noise``) and, in float64, every scheduler
must match the naive loop to 1e-10.

Claim: ``speedup_vs_naive`` = reuse q/s / naive q/s >= 15.

Run:  python benchmarks/throughput.py            (about two minutes on 2 cores)
      python benchmarks/throughput.py --quick    (under 90 s)
Writes benchmarks/results/throughput.json and throughput.png.
"""

from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F
from _common import (
    bar_chart,
    interleaved_medians,
    machine_info,
    naive_cge_losses,
    new_figure,
    realized_steps,
    rel_l2,
    save_figure,
    set_threads,
    warn_if_busy,
    write_json,
)

from zoblackbox import CoordinateEstimator
from zoblackbox.adapters import ModuleOracle
from zoblackbox.data import load_digits_split
from zoblackbox.models import count_params, digits_cnn
from zoblackbox.schedule import FeatureReuseScheduler, VectorizedScheduler

SPEEDUP_TARGET = 15.0
MU = 5e-3


def make_oracle(batch: int, dtype: torch.dtype, device: str, seed: int) -> ModuleOracle:
    torch.manual_seed(seed)
    split = load_digits_split()
    model = digits_cnn().to(device=device, dtype=dtype)
    x, y = split.x_train[:batch].to(dtype), split.y_train[:batch]
    return ModuleOracle(model, F.cross_entropy, batch=(x, y))


def naive_grad(oracle: ModuleOracle, x: torch.Tensor) -> torch.Tensor:
    coords = torch.arange(oracle.dim, device=x.device)
    f0, losses = naive_cge_losses(oracle, x, coords, MU)
    return (losses - f0) / realized_steps(x, coords, MU).cpu()


def scheduler_grad(oracle: ModuleOracle, x: torch.Tensor, scheduler) -> torch.Tensor:
    return CoordinateEstimator(mu=MU).estimate(oracle, x, scheduler=scheduler).grad.to("cpu", torch.float64)


def schedulers() -> dict:
    return {
        "vectorized": VectorizedScheduler(),
        "reuse": FeatureReuseScheduler(),
        "reuse_no_deltas": FeatureReuseScheduler(explicit_deltas=False),
    }


def float64_check(batch: int, device: str, seed: int) -> dict:
    """Relative L2 difference of every scheduler's gradient from the naive loop's, in float64."""
    oracle = make_oracle(batch, torch.float64, device, seed)
    x = oracle.get_params()
    ref = naive_grad(oracle, x)
    return {name: rel_l2(scheduler_grad(oracle, x, s), ref) for name, s in schedulers().items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (under 90 s)")
    ap.add_argument("--batch", type=int, default=128, help="digits images per batch (default 128)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 7, quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    warn_if_busy()
    repeats = args.repeats or (3 if args.quick else 7)

    oracle = make_oracle(args.batch, torch.float32, args.device, args.seed)
    x = oracle.get_params()
    dim = oracle.dim
    methods = {"naive": lambda: naive_grad(oracle, x)}
    for name, sched in schedulers().items():
        methods[name] = lambda s=sched: scheduler_grad(oracle, x, s)
    timing = interleaved_medians(methods, repeats)
    qps = {name: (dim + 1) / t["median_s"] for name, t in timing.items()}
    ref = timing["naive"]["result"]
    grad_diff = {name: rel_l2(t["result"], ref) for name, t in timing.items() if name != "naive"}

    # How much of that difference is float32 rounding: every method against the float64 gradient.
    truth_oracle = make_oracle(args.batch, torch.float64, args.device, args.seed)
    truth = scheduler_grad(truth_oracle, truth_oracle.get_params(), FeatureReuseScheduler())
    noise = {name: rel_l2(t["result"], truth) for name, t in timing.items()}
    f64 = float64_check(args.batch, args.device, args.seed)

    result = {
        "benchmark": "throughput",
        "command": " ".join(["python benchmarks/throughput.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": f"digits_cnn ({count_params(oracle.model)} parameters)",
        "batch": args.batch,
        "dtype": "float32",
        "device": args.device,
        "queries_per_step": dim + 1,
        "repeats": repeats,
        "naive_qps": qps["naive"],
        "vectorized_qps": qps["vectorized"],
        "reuse_qps": qps["reuse"],
        "reuse_no_deltas_qps": qps["reuse_no_deltas"],
        "speedup_vs_naive": qps["reuse"] / qps["naive"],
        "vectorized_speedup_vs_naive": qps["vectorized"] / qps["naive"],
        "reuse_no_deltas_speedup_vs_naive": qps["reuse_no_deltas"] / qps["naive"],
        "speedup_target": SPEEDUP_TARGET,
        "target_met": qps["reuse"] / qps["naive"] >= SPEEDUP_TARGET,
        "max_rel_grad_diff": max(grad_diff.values()),
        "rel_grad_diff_vs_naive": grad_diff,
        "float32_noise": {
            "note": "relative L2 error of each float32 gradient against the float64 gradient; the naive "
                    "loop's own error is the scale of max_rel_grad_diff (forward differences divide "
                    "float32 rounding of the loss by mu)",
            **noise,
        },
        "float64_rel_grad_diff_vs_naive": f64,
        "step_seconds": {name: {"median": t["median_s"], "all": t["times_s"]} for name, t in timing.items()},
        "machine": machine_info(),
    }
    path = write_json("throughput", result)

    fig, ax = new_figure(width=7)
    labels = ["naive loop", "vectorized", "reuse\n(no deltas)", "reuse"]
    values = [qps["naive"], qps["vectorized"], qps["reuse_no_deltas"], qps["reuse"]]
    bar_chart(ax, labels, values, "queries / second",
              f"Full CGE step, digits CNN ({dim} params), batch {args.batch}, {result['machine']['cpu']}\n"
              f"reuse = {result['speedup_vs_naive']:.1f}x naive (median of {repeats})")
    save_figure(fig, "throughput")

    print(f"naive {qps['naive']:,.0f} q/s | vectorized {qps['vectorized']:,.0f} q/s | reuse (no deltas) "
          f"{qps['reuse_no_deltas']:,.0f} q/s | reuse {qps['reuse']:,.0f} q/s")
    print(f"speedup_vs_naive = {result['speedup_vs_naive']:.1f}x (target >= {SPEEDUP_TARGET:.0f}x: "
          f"{'met' if result['target_met'] else 'NOT met'}); max_rel_grad_diff (float32) = "
          f"{result['max_rel_grad_diff']:.2e}; float64 diffs = {max(f64.values()):.1e}")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
