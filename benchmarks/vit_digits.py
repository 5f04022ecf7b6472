"""A transformer as a ZO-training workload: the digits ViT with CGE, sparse CGE and first-order training.

``zoblackbox.models.digits_vit()`` (5,018 parameters: 4x4 patches of the 8x8 digits plus a class
token, width 16, two pre-norm blocks of two heads, written as an ordinary ``nn.Module``) is trained
on the bundled digits split (1,437 train / 360 test images) by ``Trainer`` -- the code behind
``zoblackbox train --model vit`` -- with

* ``fo``: first-order training (autograd);
* ``cge``: dense forward-difference CGE (mu 5e-3; every coordinate, 5,019 queries per step);
* ``sparse-cge``: sparse CGE at ``--sparsity`` (default 0.9) with ZO-GraSP layer-wise ratios, masks
  redrawn every epoch (DeepZero's Algorithm 1);

all from the same initialization per seed, with the same data order, optimizer (Adam), learning rate,
cosine schedule, batch size and epochs. ZO queries are evaluated by ``FeatureReuseScheduler``.

The learning rate is chosen on a validation split (25% of the training images, stratified) by
first-order training, from ``--lr-grid``; the test split is only used for the reported accuracies
(``tuning`` in the JSON).

The reuse speed-up is the time of one dense CGE step on a training batch with
``FeatureReuseScheduler`` (the ViT staged automatically from its ``torch.fx`` graph) against
``VectorizedScheduler`` (no reuse: every query runs the whole model, chunks of queries in one
``vmap``) and against the naive loop (one ordinary forward per query), run side by side (median of
``--repeats`` interleaved rounds), with the gradients compared. ``--speedup-only`` re-measures it
alone into an existing JSON (the accuracies do not depend on the scheduler).

Target (issue 17): dense CGE's mean test accuracy within 0.02 of first-order training's.

Run:  python benchmarks/vit_digits.py            (3 seeds, 12 epochs: about 30 minutes on 2 cores)
      python benchmarks/vit_digits.py --quick    (1 seed, 2 epochs: about 3 minutes)
Writes benchmarks/results/vit_digits.json and vit_digits.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from _common import (
    digits_validation_split,
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
from zoblackbox.cli import balanced_indices
from zoblackbox.data import Split, load_digits_split, make_loader
from zoblackbox.models import count_params, digits_vit
from zoblackbox.params import ParamLayout
from zoblackbox.schedule import FeatureReuseScheduler, VectorizedScheduler
from zoblackbox.sparsity import CoordinateSampler, SparseSchedule, zo_grasp
from zoblackbox.train import Trainer

ACC_GAP_TARGET = 0.02
METHODS = ("fo", "cge", "sparse-cge")
MU = 5e-3


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 epochs, a 2-value LR grid")
    ap.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; quick 1)")
    ap.add_argument("--epochs", type=int, default=None, help="training epochs (default 12; quick 2)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--lr-grid", type=float, nargs="+", default=None,
                    help="Adam learning rates tried on the validation split (default 1e-3 3e-3 1e-2)")
    ap.add_argument("--repeats", type=int, default=None, help="timed rounds of the step-time comparison (5; quick 3)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--speedup-only", action="store_true",
                    help="re-measure only the reuse speed-up and update it in the existing JSON (the accuracies do "
                         "not depend on the scheduler: its gradients equal the serial ones)")
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--name", default=None, help="results file stem (default vit_digits, quick vit_digits_quick)")
    args = ap.parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.epochs = args.epochs or (2 if args.quick else 12)
    args.lr_grid = args.lr_grid or ([3e-3, 1e-2] if args.quick else [1e-3, 3e-3, 1e-2])
    args.repeats = args.repeats or (3 if args.quick else 5)
    args.name = args.name or ("vit_digits_quick" if args.quick else "vit_digits")
    return args


def sparse_schedule(model, split: Split, sparsity: float, seed: int) -> SparseSchedule:
    """ZO-GraSP ratios from the initialization (25 images per class), a fresh random mask every epoch."""
    layout = ParamLayout.from_tensors([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    idx = balanced_indices(split.y_train, per_class=25, seed=seed)
    oracle = ModuleOracle(model, F.cross_entropy, batch=(split.x_train[idx], split.y_train[idx]))
    ratios = zo_grasp(oracle, oracle.get_params(), layout, sparsity, seed=seed, scheduler=VectorizedScheduler())
    return SparseSchedule(CoordinateSampler(layout, ratios, seed=seed), interval=1, unit="epoch")


def train(method: str, split: Split, seed: int, lr: float, args) -> dict:
    torch.manual_seed(seed)
    model = digits_vit()
    train_loader = make_loader(split.x_train, split.y_train, args.batch_size, shuffle=True, seed=seed)
    test_loader = make_loader(split.x_test, split.y_test, 512, shuffle=False)
    zo = method != "fo"
    sparse = sparse_schedule(model, split, args.sparsity, seed) if method == "sparse-cge" else None
    trainer = Trainer(model, train_loader, test_loader, method="zo" if zo else "fo",
                      estimator=CoordinateEstimator(mu=MU) if zo else None,
                      scheduler=FeatureReuseScheduler() if zo else None, optimizer="adam", lr=lr,
                      lr_schedule="cosine", epochs=args.epochs, progress=False, sparse=sparse)
    result = trainer.fit()
    return {"acc": result["test_acc"], "train_acc": result["train_acc"], "queries": result["queries"],
            "steps": result["steps"], "wall_s": result["wall_s"],
            "curve": [round(h["test_acc"], 4) for h in result["history"] if "test_acc" in h]}


def tune_lr(args) -> dict:
    """First-order training on the validation split, seed 0, for every learning rate of the grid."""
    split = digits_validation_split()
    scores = {lr: train("fo", split, 0, lr, args)["acc"] for lr in args.lr_grid}
    best = max(scores, key=lambda lr: (scores[lr], -lr))
    return {"chosen_lr": best, "validation_acc": {str(lr): acc for lr, acc in scores.items()},
            "how": "first-order training on 75% of the training split, accuracy on the other 25% (stratified, "
                   "random_state 1), seed 0; the same learning rate is then used by every method"}


def reuse_speedup(args) -> dict:
    """One dense CGE step on a training batch: FeatureReuseScheduler (the model staged automatically)
    vs VectorizedScheduler (no reuse, queries batched by vmap) vs the naive loop (no reuse: one
    ordinary forward per query)."""
    from zoblackbox.staged import staging_of

    split = load_digits_split(seed=0)
    torch.manual_seed(0)
    model = digits_vit()
    batch = (split.x_train[:args.batch_size], split.y_train[:args.batch_size])
    oracle = ModuleOracle(model, F.cross_entropy, batch=batch)
    x = oracle.get_params()
    coords = torch.arange(oracle.dim)
    steps = realized_steps(x, coords, MU)
    cge = CoordinateEstimator(mu=MU)

    def naive():
        f0, losses = naive_cge_losses(oracle, x, coords, MU)
        return ((losses - f0) / steps).to(x.dtype)

    runs = interleaved_medians({
        "reuse": lambda: cge.estimate(oracle, x, scheduler=FeatureReuseScheduler()).grad,
        "vectorized": lambda: cge.estimate(oracle, x, scheduler=VectorizedScheduler()).grad,
        "naive": naive,
    }, repeats=args.repeats)
    reuse, vec, plain = runs["reuse"], runs["vectorized"], runs["naive"]
    staging = staging_of(oracle)
    return {"queries_per_step": count_params(model) + 1, "batch": args.batch_size,
            "reuse_s": reuse["median_s"], "vectorized_s": vec["median_s"], "naive_s": plain["median_s"],
            "speedup": vec["median_s"] / reuse["median_s"], "speedup_vs_naive": plain["median_s"] / reuse["median_s"],
            "stages": staging.num_stages if staging is not None else None,
            "grad_rel_l2": rel_l2(reuse["result"], vec["result"]),
            "grad_rel_l2_vs_naive": rel_l2(reuse["result"], plain["result"]),
            "times_s": {k: v["times_s"] for k, v in runs.items()}}


def update_speedup(args) -> dict:
    """``--speedup-only``: a new ``reuse_speedup`` in the existing results file, its command recorded."""
    import json

    from _common import RESULTS

    path = RESULTS / f"{args.name}.json"
    result = json.loads(path.read_text())
    speed = reuse_speedup(args)
    speed["command"] = "python benchmarks/vit_digits.py --speedup-only" + (" --quick" if args.quick else "")
    speed["machine"] = machine_info()
    result["reuse_speedup"] = speed
    write_json(args.name, result)
    if not args.no_plot:
        plot(result, args.name)
    print(f"CGE step: reuse {speed['reuse_s']:.3f}s, vectorized {speed['vectorized_s']:.3f}s, naive "
          f"{speed['naive_s']:.3f}s -> {speed['speedup']:.2f}x vectorized, {speed['speedup_vs_naive']:.2f}x naive; "
          f"{speed['stages']} stages (gradients rel. L2 {speed['grad_rel_l2']:.1e}, {speed['grad_rel_l2_vs_naive']:.1e})")
    return result


def summarize(runs: list[dict]) -> dict:
    accs = [r["acc"] for r in runs]
    return {"acc": statistics.fmean(accs), "acc_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
            "acc_per_seed": accs, "queries": statistics.fmean(r["queries"] for r in runs),
            "queries_per_step": statistics.fmean(r["queries"] / r["steps"] for r in runs),
            "wall_s": statistics.fmean(r["wall_s"] for r in runs), "curves": [r["curve"] for r in runs]}


def plot(result: dict, name: str) -> None:
    fig, (ax_acc, ax_curve) = new_figure(ncols=2, width=5.4, height=4.0)
    colors = {"fo": "#55a868", "cge": "#4c72b0", "sparse-cge": "#dd8452"}
    for i, method in enumerate(METHODS):
        row = result["methods"][method]
        ax_acc.bar(i, row["acc"], yerr=row["acc_std"], color=colors[method], capsize=4)
        ax_acc.scatter([i] * len(row["acc_per_seed"]), row["acc_per_seed"], color="k", s=10, zorder=3)
        q = "autograd" if method == "fo" else f"{row['queries_per_step']:,.0f} q/step"
        ax_acc.annotate(f"{row['acc']:.3f}\n{q}", (i, row["acc"]), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
        for curve in row["curves"]:
            ax_curve.plot(range(1, len(curve) + 1), curve, color=colors[method], alpha=0.7,
                          label=method if curve is row["curves"][0] else None)
    fo = result["methods"]["fo"]["acc"]
    ax_acc.axhspan(fo - ACC_GAP_TARGET, fo, color="k", alpha=0.08, label="within 0.02 of first order")
    ax_acc.set_xticks(range(len(METHODS)), list(METHODS))
    ax_acc.set_ylim(max(0.0, min(r["acc"] for r in result["methods"].values()) - 0.15), 1.0)
    ax_acc.set_ylabel("test accuracy (mean over seeds, ±1 sd)")
    ax_acc.set_title(f"digits ViT ({result['params']:,} params), {result['epochs']} epochs, lr {result['lr']:g}",
                     fontsize=10)
    ax_acc.legend(fontsize=8, loc="lower right")
    ax_curve.set_xlabel("epoch")
    ax_curve.set_ylabel("test accuracy")
    sp = result["reuse_speedup"]
    title = f"reuse per CGE step: {sp['speedup']:.2f}x vectorized"
    if "speedup_vs_naive" in sp:
        title += f", {sp['speedup_vs_naive']:.1f}x naive loop"
    ax_curve.set_title(title, fontsize=10)
    ax_curve.grid(alpha=0.3)
    ax_curve.legend(fontsize=8)
    save_figure(fig, name)


def main(argv=None) -> dict:
    args = parse_args(argv)
    set_threads(args.threads)
    warn_if_busy()
    if args.speedup_only:
        return update_speedup(args)
    t0 = time.perf_counter()
    tuning = tune_lr(args)
    lr = tuning["chosen_lr"]
    print(f"lr {lr:g} chosen on validation: {tuning['validation_acc']}", flush=True)
    split = load_digits_split(seed=0)
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for seed in range(args.seeds):
        for method in METHODS:
            r = train(method, split, seed, lr, args)
            runs[method].append(r)
            print(f"seed {seed} {method:<11} test acc {r['acc']:.4f}  queries {r['queries']:,}  "
                  f"wall {r['wall_s']:.1f}s", flush=True)
    speed = reuse_speedup(args)
    print(f"CGE step: reuse {speed['reuse_s']:.3f}s, vectorized {speed['vectorized_s']:.3f}s "
          f"-> {speed['speedup']:.2f}x (gradients rel. L2 {speed['grad_rel_l2']:.1e})", flush=True)
    methods = {m: summarize(rs) for m, rs in runs.items()}
    gap = methods["fo"]["acc"] - methods["cge"]["acc"]
    result = {
        "benchmark": "vit_digits", "machine": machine_info(), "quick": args.quick,
        "model": "digits_vit() (patch 4, dim 16, depth 2, heads 2, mlp 32)", "params": count_params(digits_vit()),
        "split": str(split), "epochs": args.epochs, "batch_size": args.batch_size, "lr": lr, "mu": MU,
        "optimizer": "adam, cosine, no warm-up", "sparsity": args.sparsity, "seeds": list(range(args.seeds)),
        "tuning": tuning, "methods": methods, "reuse_speedup": speed,
        "targets": {"cge_acc_gap_to_fo": {"value": gap, "target": f"<= {ACC_GAP_TARGET}",
                                          "met": gap <= ACC_GAP_TARGET}},
        "wall_s": time.perf_counter() - t0,
        "command": "python benchmarks/vit_digits.py" + (" --quick" if args.quick else ""),
    }
    write_json(args.name, result)
    if not args.no_plot:
        plot(result, args.name)
    for m in METHODS:
        row = methods[m]
        print(f"{m:<11} acc {row['acc']:.4f} ± {row['acc_std']:.4f}  queries/step {row['queries_per_step']:,.0f}")
    print(f"CGE gap to FO {gap:+.4f} (target <= {ACC_GAP_TARGET}); total {result['wall_s']:.0f}s")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
