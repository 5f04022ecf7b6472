"""Feature reuse on ResNet-20: a CGE step over sampled coordinates with and without reuse.

ResNet-20 (269,722 parameters, 11 stages: stem, 9 basic blocks, head) on ``--batch`` random
32x32 images with random labels, float32, BatchNorm with per-query batch statistics. ``--coords``
coordinates are sampled uniformly over all parameters -- the mix a dense CGE step has, mostly in
the wide last blocks -- with at least ``--min-per-stage`` from every stage, so all stages are
represented. The same forward-CGE step over them is timed for

* ``naive`` (no reuse): every query is one ordinary forward of the whole model with an
  out-of-place copy of the perturbed tensor (``_common.naive_cge_losses``);
* ``vectorized``: ``VectorizedScheduler`` (vmap; layers before the perturbed one run once per
  chunk, nothing is kept across chunks);
* ``reuse``: ``FeatureReuseScheduler`` (stage inputs cached once per step, every query restarts
  at its stage).

``stage_costs`` is the forward time of every stage on the batch (ms, median); from it follows the
speedup that reuse can reach at most for these coordinates and for a dense CGE step
(``predicted_*``: total forward cost over the cost from each query's stage on).

Claim: ``resnet20_reuse_speedup`` = naive / reuse step time >= 3.

Automatic staging (``traced_models`` in the JSON): models written as ordinary ``nn.Module`` s --
a ResNet-18-style CIFAR network (``benchmarks/fx_models.py``, widths 16-32-64-128, 701,466
parameters, batch ``--traced-batch`` random 32x32 images; shortcut added out of place, because
``VectorizedScheduler`` fails on torchvision's ``out += shortcut(x)`` under vmap) and ``zoblackbox.models.digits_vit``
(5,018 parameters, 128 digits training images) -- staged from their ``torch.fx`` graph by
``StagedOracle``; the same three methods over sampled coordinates (``--traced-coords``; at least
one per stage). Claim: ``resnet18_plain_reuse_speedup`` and ``digits_vit_reuse_speedup`` (naive /
reuse) >= 2; ``reuse_vs_vectorized`` is reported alongside.

Run:  python benchmarks/feature_reuse.py            (a few minutes on 2 cores)
      python benchmarks/feature_reuse.py --quick    (about a minute)
Writes benchmarks/results/feature_reuse.json and feature_reuse.png.
"""

from __future__ import annotations

import argparse
import statistics
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
    timed,
    warn_if_busy,
    write_json,
)
from fx_models import ResNet18

from zoblackbox import CoordinateEstimator
from zoblackbox.data import load_digits_split
from zoblackbox.models import digits_vit
from zoblackbox.resnet import resnet20
from zoblackbox.schedule import FeatureReuseScheduler, VectorizedScheduler
from zoblackbox.schedule.vectorized import module_batch
from zoblackbox.staged import StagedOracle

SPEEDUP_TARGET = 3.0
MU = 5e-3


def sample_coords(oracle: StagedOracle, n: int, min_per_stage: int, seed: int) -> torch.Tensor:
    """``n`` distinct coordinates, uniform over all parameters, at least ``min_per_stage`` per stage."""
    g = torch.Generator().manual_seed(seed)
    stage = oracle.staging.stage_of(torch.arange(oracle.dim))
    chosen = []
    for s in range(oracle.staging.num_stages):
        members = (stage == s).nonzero().flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:min_per_stage]])
    picked = torch.cat(chosen)
    rest = torch.ones(oracle.dim, dtype=torch.bool)
    rest[picked] = False
    pool = rest.nonzero().flatten()
    extra = pool[torch.randperm(pool.numel(), generator=g)[:max(0, n - picked.numel())]]
    return torch.cat([picked, extra]).sort().values


def stage_costs(oracle: StagedOracle, x: torch.Tensor, repeats: int) -> list[float]:
    """Median forward time (ms) of every stage on the oracle's batch, at the point ``x``."""
    staging = oracle.staging
    base = oracle.layout.unflatten(x)
    h = module_batch(oracle)[0]
    costs = []
    with torch.no_grad(), oracle.query_mode():
        for stage in staging.stages:
            def run(h=h, stage=stage):  # a stage boundary is never inside a residual block: no skips
                return staging.run(h, base, stage.units[0], stage.units[-1] + 1)

            run()
            times = []
            for _ in range(repeats):
                seconds, out = timed(run)
                times.append(seconds)
            costs.append(1e3 * statistics.median(times))
            h = out
    return costs


def predicted_speedup(costs: list[float], queries_per_stage: list[int]) -> float:
    """Forward cost of every query from scratch over the cost from its own stage on."""
    total = sum(costs)
    from_stage = [sum(costs[s:]) for s in range(len(costs))]
    work = sum(n * c for n, c in zip(queries_per_stage, from_stage))
    return sum(queries_per_stage) * total / work


# ---------------------------------------------------------------------------- automatic (torch.fx) staging
TRACED_SPEEDUP_TARGET = 2.0


def traced_problems(batch: int, seed: int, device: str) -> dict:
    """The two ordinary-module models as StagedOracles (staged from their fx graph at construction)."""
    torch.manual_seed(seed)
    resnet = ResNet18(widths=(16, 32, 64, 128), inplace_add=False).to(device)  # vmap (vectorized) needs it
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    split = load_digits_split()
    vit = digits_vit().to(device)
    return {  # name: (oracle, data, sampled coordinates (quick, full))
        "resnet18_plain": (StagedOracle(resnet, F.cross_entropy, batch=(images, labels)),
                           f"random 3x32x32 images, batch {batch}, random labels", (64, 160)),
        "digits_vit": (StagedOracle(vit, F.cross_entropy, batch=(split.x_train[:128], split.y_train[:128])),
                       "128 digits training images", (256, 512)),
    }


def traced_models(args, repeats: int) -> dict:
    """Naive vs vectorized vs feature reuse on the automatically staged models (the JSON's
    ``traced_models`` and ``*_reuse_speedup`` keys)."""
    out: dict = {"traced_models": {}}
    for name, (oracle, data, sizes) in traced_problems(args.traced_batch, args.seed, args.device).items():
        staging = oracle.staging
        n_coords = args.traced_coords or sizes[0 if args.quick else 1]
        x = oracle.get_params()
        coords = sample_coords(oracle, n_coords, 1, args.seed).to(x.device)
        steps = realized_steps(x, coords, MU).cpu()

        def naive(oracle=oracle, x=x, coords=coords, steps=steps):
            f0, losses = naive_cge_losses(oracle, x, coords, MU)
            return (losses - f0) / steps

        def scheduled(scheduler, oracle=oracle, x=x, coords=coords):
            grad = CoordinateEstimator(mu=MU).estimate(oracle, x, coords=coords, scheduler=scheduler).grad
            return grad[coords].to("cpu", torch.float64)

        methods = {"naive": naive, "vectorized": lambda s=scheduled: s(VectorizedScheduler()),
                   "reuse": lambda s=scheduled: s(FeatureReuseScheduler())}
        timing = interleaved_medians(methods, repeats)
        seconds = {m: t["median_s"] for m, t in timing.items()}
        kinds: dict[str, int] = {}
        for unit in staging.units:
            kinds[unit.kind] = kinds.get(unit.kind, 0) + 1
        out["traced_models"][name] = {
            "model": f"{name} ({oracle.dim} parameters, {staging.num_stages} stages, {len(staging.units)} units)",
            "staged": staging.traced and not staging.reason,
            "unit_kinds": kinds,
            "data": data,
            "coords": int(coords.numel()),
            "step_seconds": {m: {"median": t["median_s"], "all": t["times_s"]} for m, t in timing.items()},
            "reuse_speedup": seconds["naive"] / seconds["reuse"],
            "reuse_vs_vectorized": seconds["vectorized"] / seconds["reuse"],
            "vectorized_speedup_vs_naive": seconds["naive"] / seconds["vectorized"],
            "rel_grad_diff_vs_naive": {m: rel_l2(t["result"], timing["naive"]["result"])
                                       for m, t in timing.items() if m != "naive"},
        }
        out[f"{name}_reuse_speedup"] = seconds["naive"] / seconds["reuse"]
        print(f"{name} (automatic staging, {staging.num_stages} stages, {coords.numel()} coordinates): naive "
              f"{seconds['naive']:.2f} s | vectorized {seconds['vectorized']:.2f} s | reuse {seconds['reuse']:.2f} s "
              f"-> {out[f'{name}_reuse_speedup']:.2f}x naive, {seconds['vectorized'] / seconds['reuse']:.2f}x vectorized")
    out["traced_speedup_target"] = TRACED_SPEEDUP_TARGET
    out["traced_target_met"] = all(out[f"{n}_reuse_speedup"] >= TRACED_SPEEDUP_TARGET for n in out["traced_models"])
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer coordinates and repeats (about a minute)")
    ap.add_argument("--batch", type=int, default=32, help="images per batch (default 32)")
    ap.add_argument("--coords", type=int, default=None, help="sampled coordinates (default 192, quick 96)")
    ap.add_argument("--min-per-stage", type=int, default=2, help="coordinates at least from every stage")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds (default 3, quick 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--traced-coords", type=int, default=None,
                    help="sampled coordinates of the automatically staged models (default: ResNet-18 160, "
                         "ViT 512; quick 64 and 256)")
    ap.add_argument("--traced-batch", type=int, default=16, help="images per batch of the ResNet-18 (default 16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    warn_if_busy()
    n_coords = args.coords or (96 if args.quick else 192)
    repeats = args.repeats or (2 if args.quick else 3)

    torch.manual_seed(args.seed)
    model = resnet20().to(args.device)
    inputs = torch.randn(args.batch, 3, 32, 32)
    targets = torch.randint(0, 10, (args.batch,))
    oracle = StagedOracle(model, F.cross_entropy, batch=(inputs, targets))
    x = oracle.get_params()
    coords = sample_coords(oracle, n_coords, args.min_per_stage, args.seed).to(x.device)
    per_stage = torch.bincount(oracle.staging.stage_of(coords).cpu(), minlength=oracle.staging.num_stages)
    steps = realized_steps(x, coords, MU).cpu()

    def naive():
        f0, losses = naive_cge_losses(oracle, x, coords, MU)
        return (losses - f0) / steps

    def scheduled(scheduler):
        grad = CoordinateEstimator(mu=MU).estimate(oracle, x, coords=coords, scheduler=scheduler).grad
        return grad[coords].to("cpu", torch.float64)

    vectorized, reuse = VectorizedScheduler(), FeatureReuseScheduler()
    methods = {"naive": naive, "vectorized": lambda: scheduled(vectorized), "reuse": lambda: scheduled(reuse)}
    timing = interleaved_medians(methods, repeats)
    seconds = {name: t["median_s"] for name, t in timing.items()}
    ref = timing["naive"]["result"]
    costs = stage_costs(oracle, x, repeats=5 if args.quick else 11)
    names = [s.name for s in oracle.staging.stages]
    stage_numel = [s.numel for s in oracle.staging.stages]

    result = {
        "benchmark": "feature_reuse",
        "command": " ".join(["python benchmarks/feature_reuse.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": f"resnet20 ({oracle.dim} parameters, {len(names)} stages)",
        "batch": args.batch,
        "input": "random 3x32x32 images, random labels",
        "dtype": "float32",
        "device": args.device,
        "bn_policy": oracle.bn_policy,
        "coords": int(coords.numel()),
        "coords_per_stage": dict(zip(names, per_stage.tolist())),
        "repeats": repeats,
        "step_seconds": {name: {"median": t["median_s"], "all": t["times_s"]} for name, t in timing.items()},
        "resnet20_reuse_speedup": seconds["naive"] / seconds["reuse"],
        "reuse_vs_vectorized": seconds["vectorized"] / seconds["reuse"],
        "vectorized_speedup_vs_naive": seconds["naive"] / seconds["vectorized"],
        "speedup_target": SPEEDUP_TARGET,
        "target_met": seconds["naive"] / seconds["reuse"] >= SPEEDUP_TARGET,
        "stage_costs": dict(zip(names, costs)),
        "stage_costs_unit": "ms per forward of the stage on the batch (median)",
        "stage_params": dict(zip(names, stage_numel)),
        "predicted_reuse_speedup_sampled": predicted_speedup(costs, per_stage.tolist()),
        "predicted_reuse_speedup_dense_cge": predicted_speedup(costs, stage_numel),
        "rel_grad_diff_vs_naive": {name: rel_l2(t["result"], ref) for name, t in timing.items() if name != "naive"},
        "machine": machine_info(),
    }
    result.update(traced_models(args, repeats))
    path = write_json("feature_reuse", result)

    fig, (ax_stage, ax_time) = new_figure(ncols=2, width=6.5)
    bar_chart(ax_stage, [n.replace("layer", "L") for n in names], costs, "ms per stage forward",
              f"ResNet-20 stage costs, batch {args.batch}", fmt="{:.1f}")
    ax_stage.tick_params(axis="x", labelrotation=60)
    bar_chart(ax_time, ["naive (no reuse)", "vectorized", "feature reuse"],
              [seconds["naive"], seconds["vectorized"], seconds["reuse"]], "seconds per CGE step",
              f"{coords.numel()} sampled coordinates: reuse {result['resnet20_reuse_speedup']:.1f}x naive",
              fmt="{:.2f}")
    save_figure(fig, "feature_reuse")

    print(f"step time: naive {seconds['naive']:.2f} s | vectorized {seconds['vectorized']:.2f} s | "
          f"reuse {seconds['reuse']:.2f} s")
    print(f"resnet20_reuse_speedup = {result['resnet20_reuse_speedup']:.2f}x (target >= {SPEEDUP_TARGET:.0f}x: "
          f"{'met' if result['target_met'] else 'NOT met'}); predicted from stage costs "
          f"{result['predicted_reuse_speedup_sampled']:.2f}x (dense CGE {result['predicted_reuse_speedup_dense_cge']:.2f}x)")
    print("stage costs (ms): " + ", ".join(f"{n} {c:.1f}" for n, c in zip(names, costs)))
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
