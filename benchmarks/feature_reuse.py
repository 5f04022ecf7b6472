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
* ``block_loop``: DeepZero's scheme of feature reuse, one query at a time -- every block's input
  (the stages of the ``StagedModel``) cached at the base point; per query the weight is perturbed
  in place under ``no_grad``, the model runs from the perturbed block on, and the weight is
  restored exactly (``block_reuse_cge_losses``);
* ``reuse``: ``FeatureReuseScheduler`` (every unit's input cached once per step, every query
  restarts at its layer, explicit deltas carried as one-channel bands; default chunk calibration).

``stage_costs`` is the forward time of every stage on the batch (ms, median); from it follows the
speedup that reuse can reach at most for these coordinates and for a dense CGE step
(``predicted_*``: total forward cost over the cost from each query's stage on). ``macs_per_query``
counts the convolution and linear multiply-adds per query (mean over the coordinates) of a full
forward (``naive``), of the forward from the perturbed block (``block_loop``), of the FLOP floor of
recomputing everything after the perturbed layer (``layer_floor``), and of what the reuse
scheduler computes (``reuse``: the layers after the one that absorbs the band, plus that layer's
one-input-channel update).

Claims: ``resnet20_reuse_speedup`` = naive / reuse step time >= 3 (batch 32); reuse >= 1.3x the
block loop's queries/s at every ``--batch`` (``resnet20_batches[B]["reuse_vs_block_loop"]``).

Automatic staging (``traced_models`` in the JSON): models written as ordinary ``nn.Module`` s --
a ResNet-18-style CIFAR network (``benchmarks/fx_models.py``, widths 16-32-64-128, 701,466
parameters, batch ``--traced-batch`` random 32x32 images; shortcut added out of place, because
``VectorizedScheduler`` fails on torchvision's ``out += shortcut(x)`` under vmap) and ``zoblackbox.models.digits_vit``
(5,018 parameters, 128 digits training images) -- staged from their ``torch.fx`` graph by
``StagedOracle``; the same three methods over sampled coordinates (``--traced-coords``; at least
one per stage). Claim: ``resnet18_plain_reuse_speedup`` and ``digits_vit_reuse_speedup`` (naive /
reuse) >= 2; ``reuse_vs_vectorized`` is reported alongside.

Run:  python benchmarks/feature_reuse.py            (both batch sizes, 32 and 128; several minutes)
      python benchmarks/feature_reuse.py --quick    (fewer coordinates and repeats)
      python benchmarks/feature_reuse.py --batch 32
Writes benchmarks/results/feature_reuse.json and feature_reuse.png. The top-level keys are those
of the first ``--batch``; ``resnet20_batches`` holds every batch size's run.
"""

from __future__ import annotations

import argparse
import math
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
from zoblackbox.schedule.reuse import _StepCache
from zoblackbox.schedule.vectorized import module_batch
from zoblackbox.staged import StagedOracle

SPEEDUP_TARGET = 3.0
BLOCK_LOOP_TARGET = 1.3
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


def block_reuse_cge_losses(oracle: StagedOracle, x: torch.Tensor, coords: torch.Tensor,
                           mu: float) -> tuple[float, torch.Tensor]:
    """DeepZero's per-query block reuse: ``(f0, losses)`` as ``naive_cge_losses`` returns them.

    The model's own parameters are set to ``x``; every stage's input is computed once; per
    coordinate the weight is perturbed in place (``+= mu``, under ``no_grad``), the stages from the
    perturbed one on run on the cached input, and the saved value is written back (exactly).
    """
    model, layout = oracle.model, oracle.layout
    inputs, targets = module_batch(oracle)
    named = dict(model.named_parameters())
    blocks = list(model.children())  # a StagedModel: its children are the stages, in order
    tensor = layout.block_index(coords.cpu()).tolist()
    stage = oracle.staging.stage_of(coords.cpu()).tolist()
    out = torch.empty(coords.shape[0], dtype=torch.float64)
    with torch.no_grad(), oracle.query_mode():
        for name, value in layout.unflatten(x).items():
            named[name].copy_(value)
        cache = [inputs]
        for block in blocks:
            cache.append(block(cache[-1]))
        f0 = float(oracle.loss_fn(cache[-1], targets))
        for j, (c, t, s) in enumerate(zip(coords.tolist(), tensor, stage)):
            flat = named[layout.names[t]].view(-1)
            i = c - layout.offsets[t]
            saved = flat[i].clone()
            flat[i] += mu
            h = cache[s]
            for block in blocks[s:]:
                h = block(h)
            out[j] = float(oracle.loss_fn(h, targets))
            flat[i] = saved
    return f0, out


def macs_per_query(oracle: StagedOracle, x: torch.Tensor, coords: torch.Tensor) -> dict[str, float]:
    """Mean convolution/linear multiply-adds per query (see the module docstring)."""
    staging = oracle.staging
    inputs, targets = module_batch(oracle)
    base = oracle.layout.unflatten(x)
    with torch.no_grad(), oracle.query_mode():
        step = _StepCache(staging, oracle, base, inputs, targets)
        macs = []
        for u, unit in enumerate(staging.units):
            a, y = step.acts[u], step.acts[u + 1]
            if unit.kind == "conv":
                m = unit.module
                macs.append(y.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size))
            elif unit.kind == "linear":
                macs.append(y.numel() * a.shape[-1])
            else:
                macs.append(0)
        total = sum(macs)
        after = [sum(macs[u:]) for u in range(len(macs) + 1)]
        rows: dict[str, list[float]] = {"naive": [], "block_loop": [], "layer_floor": [], "reuse": []}
        for c, t in zip(coords.tolist(), oracle.layout.block_index(coords.cpu()).tolist()):
            name = oracle.layout.names[t]
            u = staging.tensor_unit[t]
            rows["naive"].append(total)
            rows["block_loop"].append(after[staging.stages[staging.units[u].stage].units[0]])
            rows["layer_floor"].append(after[u + 1])
            route = step.route(u, name)
            if route is None:
                rows["reuse"].append(after[u])
            elif route[-1][0] == "receive":
                v = route[-1][1]
                width = step.acts[v].shape[1] if staging.units[v].kind == "conv" else step.acts[v].shape[-1]
                rows["reuse"].append(macs[v] / width + after[v + 1])
            else:
                rows["reuse"].append(after[route[-1][1]])
    return {k: statistics.fmean(v) for k, v in rows.items()}


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


def run_resnet20(batch: int, n_coords: int, min_per_stage: int, repeats: int, seed: int, device: str,
                 quick: bool) -> dict:
    """One ResNet-20 run at ``batch`` images: every method timed side by side, gradients, costs."""
    torch.manual_seed(seed)
    model = resnet20().to(device)
    inputs = torch.randn(batch, 3, 32, 32)
    targets = torch.randint(0, 10, (batch,))
    oracle = StagedOracle(model, F.cross_entropy, batch=(inputs, targets))
    x = oracle.get_params()
    coords = sample_coords(oracle, n_coords, min_per_stage, seed).to(x.device)
    per_stage = torch.bincount(oracle.staging.stage_of(coords).cpu(), minlength=oracle.staging.num_stages)
    steps = realized_steps(x, coords, MU).cpu()

    def loop(losses_of):
        f0, losses = losses_of(oracle, x, coords, MU)
        return (losses - f0) / steps

    def scheduled(scheduler):
        grad = CoordinateEstimator(mu=MU).estimate(oracle, x, coords=coords, scheduler=scheduler).grad
        return grad[coords].to("cpu", torch.float64)

    vectorized, reuse = VectorizedScheduler(), FeatureReuseScheduler()
    calibration = timed(lambda: scheduled(reuse))[0]  # the first step also calibrates the chunk sizes
    methods = {"naive": lambda: loop(naive_cge_losses), "vectorized": lambda: scheduled(vectorized),
               "block_loop": lambda: loop(block_reuse_cge_losses), "reuse": lambda: scheduled(reuse)}
    timing = interleaved_medians(methods, repeats)
    seconds = {name: t["median_s"] for name, t in timing.items()}
    ref = timing["naive"]["result"]
    costs = stage_costs(oracle, x, repeats=5 if quick else 11)
    names = [s.name for s in oracle.staging.stages]
    stage_numel = [s.numel for s in oracle.staging.stages]
    macs = macs_per_query(oracle, x, coords)
    n = int(coords.numel())
    return {
        "model": f"resnet20 ({oracle.dim} parameters, {len(names)} stages)",
        "batch": batch,
        "input": "random 3x32x32 images, random labels",
        "dtype": "float32",
        "device": device,
        "bn_policy": oracle.bn_policy,
        "coords": n,
        "coords_per_stage": dict(zip(names, per_stage.tolist())),
        "repeats": repeats,
        "step_seconds": {name: {"median": t["median_s"], "all": t["times_s"]} for name, t in timing.items()},
        "queries_per_second": {name: n / t for name, t in seconds.items()},
        "first_reuse_step_seconds_with_calibration": calibration,
        "resnet20_reuse_speedup": seconds["naive"] / seconds["reuse"],
        "reuse_vs_vectorized": seconds["vectorized"] / seconds["reuse"],
        "vectorized_speedup_vs_naive": seconds["naive"] / seconds["vectorized"],
        "block_loop_speedup_vs_naive": seconds["naive"] / seconds["block_loop"],
        "reuse_vs_block_loop": seconds["block_loop"] / seconds["reuse"],
        "speedup_target": SPEEDUP_TARGET,
        "target_met": seconds["naive"] / seconds["reuse"] >= SPEEDUP_TARGET,
        "block_loop_target": BLOCK_LOOP_TARGET,
        "block_loop_target_met": seconds["block_loop"] / seconds["reuse"] >= BLOCK_LOOP_TARGET,
        "macs_per_query": macs,
        "macs_per_query_unit": "conv + linear multiply-adds per query, mean over the sampled coordinates",
        "predicted_from_macs": {"block_loop_vs_naive": macs["naive"] / macs["block_loop"],
                                "layer_floor_vs_block_loop": macs["block_loop"] / macs["layer_floor"],
                                "reuse_vs_block_loop": macs["block_loop"] / macs["reuse"]},
        "stage_costs": dict(zip(names, costs)),
        "stage_costs_unit": "ms per forward of the stage on the batch (median)",
        "stage_params": dict(zip(names, stage_numel)),
        "predicted_reuse_speedup_sampled": predicted_speedup(costs, per_stage.tolist()),
        "predicted_reuse_speedup_dense_cge": predicted_speedup(costs, stage_numel),
        "rel_grad_diff_vs_naive": {name: rel_l2(t["result"], ref) for name, t in timing.items() if name != "naive"},
        "rel_grad_diff_reuse_vs_block_loop": rel_l2(timing["reuse"]["result"], timing["block_loop"]["result"]),
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer coordinates and repeats")
    ap.add_argument("--batch", type=int, nargs="+", default=[32, 128], help="images per batch (default 32 128)")
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

    runs = {}
    for batch in args.batch:
        runs[str(batch)] = run_resnet20(batch, n_coords, args.min_per_stage, repeats, args.seed, args.device,
                                        args.quick)
        r = runs[str(batch)]
        q = r["queries_per_second"]
        print(f"batch {batch}: queries/s naive {q['naive']:.1f} | vectorized {q['vectorized']:.1f} | "
              f"block loop {q['block_loop']:.1f} | reuse {q['reuse']:.1f}; reuse vs block loop "
              f"{r['reuse_vs_block_loop']:.2f}x (target {BLOCK_LOOP_TARGET}x: "
              f"{'met' if r['block_loop_target_met'] else 'NOT met'}), vs naive {r['resnet20_reuse_speedup']:.2f}x; "
              f"MACs per query (M): " + ", ".join(f"{k} {v / 1e6:.1f}" for k, v in r["macs_per_query"].items()),
              flush=True)
    first = runs[str(args.batch[0])]
    result = {
        "benchmark": "feature_reuse",
        "command": " ".join(["python benchmarks/feature_reuse.py", *(argv if argv is not None else sys.argv[1:])]),
        **first,
        "resnet20_batches": runs,
        "machine": machine_info(),
    }
    result.update(traced_models(args, repeats))
    path = write_json("feature_reuse", result)

    names = list(first["stage_costs"])
    seconds = {name: t["median"] for name, t in first["step_seconds"].items()}
    fig, (ax_stage, ax_time) = new_figure(ncols=2, width=6.5)
    bar_chart(ax_stage, [n.replace("layer", "L") for n in names], list(first["stage_costs"].values()),
              "ms per stage forward", f"ResNet-20 stage costs, batch {first['batch']}", fmt="{:.1f}")
    ax_stage.tick_params(axis="x", labelrotation=60)
    bar_chart(ax_time, ["naive (no reuse)", "vectorized", "block loop", "feature reuse"],
              [seconds["naive"], seconds["vectorized"], seconds["block_loop"], seconds["reuse"]],
              "seconds per CGE step",
              f"{first['coords']} coordinates, batch {first['batch']}: reuse {first['resnet20_reuse_speedup']:.1f}x "
              f"naive, {first['reuse_vs_block_loop']:.2f}x block loop", fmt="{:.2f}")
    save_figure(fig, "feature_reuse")
    print(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
