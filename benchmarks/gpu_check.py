"""GPU check: feature reuse against DeepZero's plain loop on one device, TF32 on and off.

ResNet-20 at ``--batch`` (default 256) random 32x32 images, float32, BatchNorm with per-query batch
statistics. The coordinates are a random 10% subset of the weights (90% sparsity, as ZO-GraSP /
sparse CGE estimate them: ``zoblackbox.sparsity.CoordinateSampler`` with uniform ratios, biases and
BatchNorm dense) -- about 27k coordinates. Timed on the same device:

* ``plain_loop``: DeepZero's plain scheme -- perturb one weight in place, one full forward, restore
  (``no_grad``). It is slow, so it is timed on the first ``--loop-coords`` coordinates only and its
  queries/s extrapolated (the JSON says so);
* ``reuse``: ``FeatureReuseScheduler`` over all the coordinates (one CGE step).

Both with TF32 off and on (``torch.backends.cuda.matmul.allow_tf32`` and
``torch.backends.cudnn.allow_tf32``; ``"n/a"`` on a CPU). The float32 gradients (reuse and plain
loop, TF32 off and on) are compared with a float64 reference (the scheduler on a float64 copy of
the model) on the loop's coordinates. CUDA is synchronized around every timing.

Target: reuse >= 10x the plain loop's queries/s on a GPU (``target_met``; ``null`` on a CPU).

Run:  python benchmarks/gpu_check.py                      (cuda if available; a few minutes)
      python benchmarks/gpu_check.py --device cpu --tiny  (seconds; what the test suite runs)
Writes benchmarks/results/gpu_check.json (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from _common import RESULTS, rel_l2

from zoblackbox import CoordinateEstimator
from zoblackbox.resnet import resnet20
from zoblackbox.schedule import FeatureReuseScheduler
from zoblackbox.schedule.vectorized import module_batch
from zoblackbox.sparsity import CoordinateSampler, uniform_ratios
from zoblackbox.staged import StagedOracle

SPEEDUP_TARGET = 10.0
MU = 5e-3


def synchronized(device: torch.device, fn: Callable[[], Any]) -> tuple[float, Any]:
    """Seconds of ``fn()`` with the device's queued work included (CUDA synchronized before and after)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, out


def set_tf32(device: torch.device, on: bool) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = on
        torch.backends.cudnn.allow_tf32 = on


def plain_loop_grad(oracle: StagedOracle, x: torch.Tensor, coords: torch.Tensor, mu: float) -> torch.Tensor:
    """DeepZero's plain CGE loop: per coordinate perturb the weight in place, one full forward, restore.

    Returns the forward-difference gradient at ``coords`` (float64, on the CPU).
    """
    model, layout = oracle.model, oracle.layout
    inputs, targets = module_batch(oracle)
    named = dict(model.named_parameters())
    tensor = layout.block_index(coords.cpu()).tolist()
    losses = torch.empty(coords.shape[0], dtype=torch.float64, device=x.device)
    with torch.no_grad(), oracle.query_mode():
        for name, value in layout.unflatten(x).items():
            named[name].copy_(value)
        f0 = oracle.loss_fn(model(inputs), targets).to(torch.float64)
        for j, (c, t) in enumerate(zip(coords.tolist(), tensor)):
            flat = named[layout.names[t]].view(-1)
            i = c - layout.offsets[t]
            saved = flat[i].clone()
            flat[i] += mu
            losses[j] = oracle.loss_fn(model(inputs), targets)  # stays on the device: no sync per query
            flat[i] = saved
    xc = x[coords]
    steps = ((xc + mu) - xc).to(torch.float64)
    return ((losses - f0) / steps).cpu()


def reuse_grad(oracle: StagedOracle, x: torch.Tensor, coords: torch.Tensor, mu: float,
               scheduler: FeatureReuseScheduler) -> torch.Tensor:
    grad = CoordinateEstimator(mu=mu).estimate(oracle, x, coords=coords, scheduler=scheduler).grad
    return grad[coords].to("cpu", torch.float64)


def make_oracle(batch: int, image: int, device: torch.device, dtype: torch.dtype, seed: int) -> StagedOracle:
    torch.manual_seed(seed)
    model = resnet20().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    inputs = torch.randn(batch, 3, image, image, generator=g).to(device=device, dtype=dtype)
    targets = torch.randint(0, 10, (batch,), generator=g).to(device)
    return StagedOracle(model, F.cross_entropy, batch=(inputs, targets))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default 256, tiny 4)")
    ap.add_argument("--sparsity", type=float, default=0.9, help="fraction of the weights left out (default 0.9)")
    ap.add_argument("--loop-coords", type=int, default=None,
                    help="coordinates the plain loop is timed on (default 512, tiny 8)")
    ap.add_argument("--ref-coords", type=int, default=None,
                    help="coordinates of the float64 check, a prefix of the loop's (default 256, tiny 8)")
    ap.add_argument("--max-coords", type=int, default=None,
                    help="keep at most this many of the sampled coordinates, at random (default all, tiny 64)")
    ap.add_argument("--tiny", action="store_true",
                    help="a 4-image batch of 8x8 images, 99%% sparsity, at most 64 coordinates: seconds")
    ap.add_argument("--memory-gib", type=float, default=None,
                    help="the reuse scheduler's memory_budget in GiB (default 8 on CUDA, the library's 0.5 elsewhere)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "gpu_check.json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    batch = args.batch or (4 if args.tiny else 256)
    image = 8 if args.tiny else 32
    sparsity = 0.99 if args.tiny and args.sparsity == 0.9 else args.sparsity
    loop_n = args.loop_coords or (8 if args.tiny else 512)
    ref_n = min(args.ref_coords or (8 if args.tiny else 256), loop_n)
    began = time.perf_counter()

    oracle = make_oracle(batch, image, device, torch.float32, args.seed)
    x = oracle.get_params()
    sampler = CoordinateSampler(oracle.layout, uniform_ratios(oracle.layout, sparsity), seed=args.seed)
    coords = sampler.sample()
    g = torch.Generator().manual_seed(args.seed + 1)
    max_coords = args.max_coords or (64 if args.tiny else None)
    if max_coords is not None and coords.numel() > max_coords:
        coords = coords[torch.randperm(coords.numel(), generator=g)[:max_coords]].sort().values
    coords = coords.to(device)
    loop_coords = coords[torch.randperm(coords.numel(), generator=g)[:loop_n].to(device).sort().values]
    ref_coords = loop_coords[:ref_n]
    gib = args.memory_gib if args.memory_gib is not None else (8.0 if device.type == "cuda" else 0.5)
    scheduler = FeatureReuseScheduler(memory_budget=int(gib * 2**30))  # larger chunks on a GPU

    tf32_modes: list[bool | None] = [False, True] if device.type == "cuda" else [None]
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    runs: dict[str, Any] = {}
    try:
        for mode in tf32_modes:  # None: a CPU, no TF32
            if mode is not None:
                set_tf32(device, mode)
            reuse_grad(oracle, x, loop_coords, MU, scheduler)  # warm-up (and the chunk sizes)
            plain_loop_grad(oracle, x, loop_coords[:2], MU)
            loop_s, loop_g = synchronized(device, lambda: plain_loop_grad(oracle, x, loop_coords, MU))
            reuse_s, reuse_all = synchronized(device, lambda: CoordinateEstimator(mu=MU).estimate(
                oracle, x, coords=coords, scheduler=scheduler).grad)
            reuse_loop = reuse_grad(oracle, x, loop_coords, MU, scheduler)
            loop_qps, reuse_qps = loop_coords.numel() / loop_s, (coords.numel() + 1) / reuse_s
            runs["n/a" if mode is None else ("on" if mode else "off")] = {
                "plain_loop": {"queries_per_second": loop_qps, "timed_coords": int(loop_coords.numel()),
                               "seconds": loop_s},
                "reuse": {"queries_per_second": reuse_qps, "coords": int(coords.numel()), "seconds": reuse_s},
                "speedup": reuse_qps / loop_qps,
                "grads": {"reuse": reuse_loop, "plain_loop": loop_g},
                "reuse_grad_finite": bool(torch.isfinite(reuse_all).all()),
            }
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved

    # the float64 reference: the same model, batch and coordinates in float64, on the same device
    oracle64 = make_oracle(batch, image, device, torch.float64, args.seed)
    x64 = x.to(torch.float64)
    ref = reuse_grad(oracle64, x64, ref_coords, MU, FeatureReuseScheduler())
    ref_loop = plain_loop_grad(oracle64, x64, ref_coords, MU)
    for run in runs.values():
        grads = run.pop("grads")
        run["rel_l2_vs_float64"] = {name: rel_l2(g_[:ref_n], ref) for name, g_ in grads.items()}
        run["rel_l2_reuse_vs_plain_loop"] = rel_l2(grads["reuse"], grads["plain_loop"])

    speedups = [r["speedup"] for r in runs.values()]
    result = {
        "benchmark": "gpu_check",
        "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "model": f"resnet20 ({oracle.dim} parameters)",
        "batch": batch,
        "image": f"3x{image}x{image}",
        "dtype": "float32",
        "sparsity": sparsity,
        "reuse_memory_budget_gib": gib,
        "coords": int(coords.numel()),
        "coords_note": "a random (1 - sparsity) share of every weight tensor (CoordinateSampler, uniform ratios); "
                       "biases and BatchNorm dense" + (f"; then {max_coords} of them at random" if max_coords else ""),
        "plain_loop_note": f"the plain loop is timed on {loop_coords.numel()} of the coordinates; "
                           "its queries/s is that subset's rate",
        "tf32": runs,
        "float64_reference": {"coords": int(ref_n), "method": "FeatureReuseScheduler on a float64 copy",
                              "plain_loop_float64_vs_reference": rel_l2(ref_loop, ref)},
        "speedup_target": SPEEDUP_TARGET,
        "target_met": (min(speedups) >= SPEEDUP_TARGET) if device.type == "cuda" else None,
        "seconds_total": time.perf_counter() - began,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for label, run in runs.items():
        print(f"TF32 {label}: plain loop {run['plain_loop']['queries_per_second']:.1f} q/s, reuse "
              f"{run['reuse']['queries_per_second']:.1f} q/s ({run['speedup']:.1f}x); gradient vs float64 "
              + ", ".join(f"{k} {v:.2e}" for k, v in run["rel_l2_vs_float64"].items()))
    print(f"target {SPEEDUP_TARGET:.0f}x: {result['target_met']}; wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
