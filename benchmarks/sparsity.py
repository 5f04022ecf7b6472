"""Sparse CGE training on the digits CNN: ZO-GraSP ratios vs uniform ratios vs first-order sparse gradients.

DeepZero (Chen et al., ICLR 2024, Algorithm 1) keeps the model dense but estimates only a random
subset of coordinates at each step. The fraction of each layer left out comes from ZO-GraSP
(GraSP scores ``-theta * Hg`` from two RGE estimates with common directions, q = 192, mu = 5e-3,
25 training images per class, at the model's initialization); the mask is redrawn every ``K``
epochs, and each bias is sampled with its layer's ratio (``--biases layer``, the default: the whole
model, not only its weights, is at the target sparsity). This script trains ``digits_cnn()`` (3,658 parameters) on the
bundled digits split (1,437 train / 360 test images) with, at every sparsity in
``--sparsities`` (default 0.8, 0.9, 0.95, 0.99):

* ``zo-grasp``: sparse CGE, random masks with the ZO-GraSP layer-wise ratios;
* ``uniform``: sparse CGE, random masks with the same ratio in every layer;
* ``fo-sparse-grad``: first-order training (autograd) whose gradient is masked by the *same*
  random masks as ``zo-grasp`` (same ZO-GraSP ratios, same sampler seed) -- DeepZero's
  "FO with sparse gradients" reference;

plus two dense references: dense CGE (3,659 queries per step) and dense first-order training.
With ``--biases dense`` (biases estimated at every step, 66 coordinates) sparsity 0.9 of the weights
gives 3,659 / 426 = 8.6x fewer queries; with ``--biases layer`` it gives 3,659 / ~367 = ~10x.
Every run of a seed starts from the same initialization, sees the same data order and uses the
same optimizer and schedule (Adam, cosine decay, no warm-up; forward-difference CGE, mu = 5e-3,
queries evaluated by the ``FeatureReuseScheduler``). Test accuracy (fraction of the 360 test
images) is averaged over ``--seeds``; queries per step are ``active coordinates + 1``.

Also reported: ``ratio_spearman_zo_vs_fo``, the Spearman rank correlation between the ZO-GraSP
and the first-order (autograd) GraSP layer-wise ratios at sparsity 0.9 on the same batch and
initialization (seed ``--spearman-seed``, default 0; all seeds are listed too).

Targets: at sparsity 0.9, ZO-GraSP sparse CGE spends >= 9x fewer queries per step than dense CGE
with a mean test accuracy within 0.01 of dense CGE; ZO-GraSP ratios reach a mean accuracy >=
uniform ratios at sparsity 0.95 and 0.99.

Defaults (chosen on a validation split of the training images, ``--validation``; see
docs/benchmarks.md, section Sparsity): Adam lr 0.02, batch 128, 40 epochs, masks redrawn every epoch
(``K = 1``: DeepZero's K = 5 is for ~50-epoch runs), ``freeze_inactive`` off, 10 seeds (per-seed
standard deviations are ~0.01, so 5 seeds leave a ~0.005 standard error on a 0.01 target).

Run:  python benchmarks/sparsity.py            (10 seeds, 40 epochs: about 15 minutes on 2 shared cores)
      python benchmarks/sparsity.py --quick    (1 seed: about 2 minutes)
Writes benchmarks/results/sparsity.json and sparsity.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import _common
import torch
import torch.nn.functional as F
from _common import machine_info, new_figure, save_figure, set_threads, warn_if_busy, write_json
from scipy.stats import spearmanr

from zoblackbox import CoordinateEstimator
from zoblackbox.adapters import ModuleOracle
from zoblackbox.cli import balanced_indices, positive_float, positive_int
from zoblackbox.cli_args import checked_number
from zoblackbox.data import Split, load_digits_split, make_loader
from zoblackbox.models import count_params, digits_cnn
from zoblackbox.params import ParamLayout
from zoblackbox.schedule import FeatureReuseScheduler
from zoblackbox.sparsity import (
    BIAS_MODES,
    CoordinateSampler,
    PruningRatios,
    SparseSchedule,
    fo_grasp_scores,
    prunable_names,
    ratios_from_scores,
    uniform_ratios,
    zo_grasp_scores,
)
from zoblackbox.train import Trainer

METHODS = ("zo-grasp", "uniform", "fo-sparse-grad")
SPEARMAN_SPARSITY = 0.9
TARGET_SPARSITY = 0.9
TARGET_REDUCTION = 9.0
TARGET_ACC_GAP = 0.01
TARGET_GRASP_VS_UNIFORM = (0.95, 0.99)


def _sparsity(text: str) -> float:
    return checked_number(text, float, lambda v: 0 < v < 1, "a sparsity in (0, 1)")




def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 seed instead of 5 (about two minutes)")
    ap.add_argument("--seeds", type=positive_int, default=None,
                    help="number of seeds: model init, data order, masks, ZO-GraSP directions (default 10, quick 1)")
    ap.add_argument("--first-seed", type=int, default=0, help="seeds are first-seed .. first-seed + seeds - 1")
    ap.add_argument("--epochs", type=positive_int, default=40, help="training epochs (default 40)")
    ap.add_argument("--sparsities", type=_sparsity, nargs="+", default=[0.8, 0.9, 0.95, 0.99],
                    help="sparsities (default 0.8 0.9 0.95 0.99)")
    ap.add_argument("--biases", choices=BIAS_MODES, default="layer",
                    help="layer (default): each bias is sampled with its layer's ratio; dense: every bias is "
                         "estimated at every step (queries 8.6x instead of ~10x below dense CGE at 0.9)")
    ap.add_argument("--validation", action="store_true",
                    help="train on 75%% of the training split and evaluate on the other 25%% (stratified, "
                         "random_state 1) instead of the test split: for choosing a configuration")
    ap.add_argument("--lr", type=positive_float, default=0.02, help="peak Adam learning rate (cosine decay)")
    ap.add_argument("--batch-size", type=positive_int, default=128)
    ap.add_argument("--mu", type=positive_float, default=5e-3, help="CGE finite-difference step")
    ap.add_argument("--mask-interval", type=positive_int, default=1,
                    help="redraw the masks every K epochs (default 1; DeepZero uses 5 over ~50 epochs)")
    ap.add_argument("--mask-unit", choices=["epoch", "step"], default="epoch",
                    help="unit of --mask-interval (default epoch)")
    ap.add_argument("--freeze-inactive", action="store_true",
                    help="leave the coordinates outside the mask unchanged by each optimizer step (default: they "
                         "get a zero gradient and Adam's momentum still moves them)")
    ap.add_argument("--grasp-q", type=positive_int, default=192, help="RGE directions of ZO-GraSP")
    ap.add_argument("--grasp-per-class", type=positive_int, default=25, help="ZO-GraSP images per class")
    ap.add_argument("--spearman-seed", type=int, default=0, help="seed whose Spearman is ratio_spearman_zo_vs_fo")
    ap.add_argument("--threads", type=positive_int, default=1,
                    help="torch threads (default 1: the small per-query work does not gain from more, and "
                         "oversubscribed threads on a shared machine are far slower)")
    ap.add_argument("--no-plot", action="store_true", help="skip the PNG")
    ap.add_argument("--name", default="sparsity", help="results file stem (default: sparsity)")
    ap.add_argument("--out-dir", type=Path, default=_common.RESULTS,
                    help="directory of the JSON and PNG (default benchmarks/results)")
    return ap


# --------------------------------------------------------------------------- data and ratios
def load_split(validation: bool) -> Split:
    """The bundled digits split, or (``validation``) its training part cut into train / validation."""
    return _common.digits_validation_split() if validation else load_digits_split(seed=0)

def init_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return digits_cnn()


def grasp_ratios(split, seed: int, sparsities, *, q: int, mu: float, per_class: int) -> dict:
    """ZO-GraSP and autograd GraSP ratios at every sparsity, from the seed's initialization.

    The ZO scores are computed once (``2 (q + 1)`` queries) and cut at every sparsity.
    """
    model = init_model(seed)
    idx = balanced_indices(split.y_train, per_class=per_class, seed=seed)
    xb, yb = split.x_train[idx], split.y_train[idx]
    oracle = ModuleOracle(copy.deepcopy(model), F.cross_entropy, batch=(xb, yb))
    layout = oracle.layout
    zo_scores, queries = zo_grasp_scores(oracle, oracle.get_params(), q=q, mu=mu, seed=seed,
                                         scheduler=FeatureReuseScheduler())
    fo_scores = fo_grasp_scores(model, F.cross_entropy, xb, yb, layout.names)
    out = {"layout": layout, "queries": queries, "zo": {}, "fo": {}}
    for s in sparsities:
        zo = ratios_from_scores(zo_scores, layout, s, method="zo-grasp")
        zo.info.update(queries=queries, q=q, mu=mu, seed=seed, images=len(idx))
        out["zo"][s] = zo
        out["fo"][s] = ratios_from_scores(fo_scores, layout, s, method="fo-grasp")
    return out


def spearman(a: PruningRatios, b: PruningRatios) -> float:
    return float(spearmanr(list(a.ratios.values()), [b.ratios[n] for n in a.ratios]).statistic)


# --------------------------------------------------------------------------- training
def train(split, seed: int, args, *, method: str, ratios: PruningRatios | None = None) -> dict:
    """One training run; ``ratios`` None: dense. Returns accuracy, queries per step, wall time."""
    model = init_model(seed)
    train_loader = make_loader(split.x_train, split.y_train, args.batch_size, shuffle=True, seed=seed)
    test_loader = make_loader(split.x_test, split.y_test, 512, shuffle=False)
    sparse = None
    if ratios is not None:
        layout = ParamLayout.from_tensors([(n, p) for n, p in model.named_parameters() if p.requires_grad])
        sampler = CoordinateSampler(layout, ratios, seed=seed, biases=args.biases)
        sparse = SparseSchedule(sampler, interval=args.mask_interval, unit=args.mask_unit,
                                freeze_inactive=args.freeze_inactive)
    zo = method == "zo"
    trainer = Trainer(model, train_loader, test_loader, method=method,
                      estimator=CoordinateEstimator(mu=args.mu) if zo else None,
                      scheduler=FeatureReuseScheduler() if zo else None, optimizer="adam", lr=args.lr,
                      lr_schedule="cosine", epochs=args.epochs, progress=False, sparse=sparse)
    result = trainer.fit()
    qps = trainer.step_cost if zo else None
    if zo and result["queries"] != qps * result["steps"]:
        raise RuntimeError(f"queries {result['queries']} != {qps} per step x {result['steps']} steps")
    return {"acc": result["test_acc"], "train_acc": result["train_acc"], "queries_per_step": qps,
            "active_coords": sparse.sampler.n_active if sparse is not None else count_params(model),
            "steps": result["steps"], "wall_s": result["wall_s"]}


def _mean(values):
    return statistics.fmean(values) if values else None


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(runs: list[dict]) -> dict:
    accs = [r["acc"] for r in runs]
    qps = [r["queries_per_step"] for r in runs]
    return {"acc": _mean(accs), "acc_std": _std(accs), "acc_per_seed": accs,
            "queries_per_step": _mean(qps) if None not in qps else None, "queries_per_step_per_seed": qps,
            "active_coords_per_seed": [r["active_coords"] for r in runs],
            "train_acc": _mean([r["train_acc"] for r in runs]), "wall_s": sum(r["wall_s"] for r in runs)}


# --------------------------------------------------------------------------- report
def check_targets(result: dict) -> dict:
    rows = {(r["sparsity"], r["ratios"]): r for r in result["rows"]}
    dense = result["dense"]
    out = {}
    at = rows.get((TARGET_SPARSITY, "zo-grasp"))
    if at is not None:
        reduction = dense["queries_per_step"] / at["queries_per_step"]
        gap = dense["acc"] - at["acc"]
        out["reduction_at_0.9"] = {"value": reduction, "target": f">= {TARGET_REDUCTION}",
                                   "met": reduction >= TARGET_REDUCTION}
        out["acc_gap_to_dense_cge_at_0.9"] = {"value": gap, "target": f"<= {TARGET_ACC_GAP}",
                                              "met": gap <= TARGET_ACC_GAP + 1e-12}
    for s in sorted(r["sparsity"] for r in result["rows"] if r["ratios"] == "zo-grasp"):
        if TARGET_SPARSITY < s < TARGET_GRASP_VS_UNIFORM[0]:  # supplementary: e.g. 0.91, the first >= 9x
            r = rows[(s, "zo-grasp")]
            reduction, gap = dense["queries_per_step"] / r["queries_per_step"], dense["acc"] - r["acc"]
            out[f"supplementary_at_{s:g}"] = {
                "value": gap, "target": "not a stated target: accuracy gap to dense CGE <= 0.01 with >= 9x",
                "reduction": reduction, "met": reduction >= TARGET_REDUCTION and gap <= TARGET_ACC_GAP + 1e-12}
    for s in TARGET_GRASP_VS_UNIFORM:
        g, u = rows.get((s, "zo-grasp")), rows.get((s, "uniform"))
        if g is not None and u is not None:
            diff = g["acc"] - u["acc"]
            out[f"grasp_minus_uniform_at_{s}"] = {"value": diff, "target": ">= 0", "met": diff >= -1e-12}
    return out


STYLES = {"zo-grasp": ("#4c72b0", "o"), "uniform": ("#dd8452", "s"), "fo-sparse-grad": ("#55a868", "^")}


def _accuracy_panel(ax, result: dict, sparsities: list[float], zoom: bool) -> None:
    """Mean accuracy (±1 sd, seeds as dots) per method and sparsity, dense references as lines."""
    for i, method in enumerate(METHODS):
        rows = sorted((r for r in result["rows"] if r["ratios"] == method), key=lambda r: r["sparsity"])
        color, marker = STYLES[method]
        pos = [sparsities.index(r["sparsity"]) + (i - 1) * 0.07 for r in rows]
        ax.errorbar(pos, [r["acc"] for r in rows], yerr=[r["acc_std"] for r in rows], color=color, marker=marker,
                    capsize=3, label=method)
        for p, r in zip(pos, rows):
            ax.scatter([p] * len(r["acc_per_seed"]), r["acc_per_seed"], color=color, s=8, alpha=0.35)
    dense = result["dense"]["acc"]
    ax.axhline(dense, color="k", ls="--", lw=1, label=f"dense CGE ({dense:.3f})")
    ax.axhline(result["dense_fo_acc"], color="#55a868", ls=":", lw=1.2, label=f"dense FO ({result['dense_fo_acc']:.3f})")
    ax.set_xticks(range(len(sparsities)), [f"{s:g}" for s in sparsities])
    ax.set_xlabel("sparsity (fraction of each layer left out of each step)")
    ax.grid(alpha=0.3)
    set_name = "test" if result["eval_set"] == "test" else "validation"
    if zoom:
        ax.axhspan(dense - TARGET_ACC_GAP, dense, color="k", alpha=0.08, label="within 0.01 of dense CGE")
        ax.set_ylim(dense - 0.06, min(1.0, dense + 0.02))
        shown = max(1, sum(s <= max(TARGET_GRASP_VS_UNIFORM[0], sparsities[0]) for s in sparsities))
        ax.set_xlim(-0.4, shown - 0.6)
        ax.set_title("zoom: the 0.01 band under dense CGE", fontsize=10)
        ax.legend(fontsize=7, loc="lower left")
    else:
        ax.set_ylabel(f"{set_name} accuracy (mean over seeds, ±1 sd)")
        ax.set_title(f"digits CNN, {result['epochs']} epochs, {len(result['seeds'])} seed(s), masks every "
                     f"{result['config']['mask_interval']} {result['config']['mask_unit']}(s)", fontsize=10)
        ax.legend(fontsize=8, loc="lower left")


def plot(result: dict, name: str) -> None:
    fig, (ax_acc, ax_zoom, ax_q) = new_figure(ncols=3, width=5.2, height=4.2)
    sparsities = sorted({r["sparsity"] for r in result["rows"]})
    _accuracy_panel(ax_acc, result, sparsities, zoom=False)
    _accuracy_panel(ax_zoom, result, sparsities, zoom=True)
    rows = sorted((r for r in result["rows"] if r["ratios"] == "zo-grasp"), key=lambda r: r["sparsity"])
    dense_q = result["dense"]["queries_per_step"]
    xs = range(len(rows))
    ax_q.plot(xs, [r["queries_per_step"] for r in rows], color="#4c72b0", marker="o",
              label="sparse CGE (ZO-GraSP and uniform alike)")
    for x, r in zip(xs, rows):
        ax_q.annotate(f"{r['queries_per_step']:,.0f} ({dense_q / r['queries_per_step']:.1f}x)",
                      (x, r["queries_per_step"]), textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax_q.axhline(dense_q, color="k", ls="--", lw=1, label=f"dense CGE ({dense_q:,.0f})")
    ax_q.axhline(dense_q / TARGET_REDUCTION, color="#c44e52", ls=":", lw=1.2,
                 label=f"dense / {TARGET_REDUCTION:g} ({dense_q / TARGET_REDUCTION:,.0f})")
    ax_q.set_yscale("log")
    ax_q.set_xticks(list(xs), [f"{r['sparsity']:g}" for r in rows])
    ax_q.set_xlabel("sparsity")
    ax_q.set_ylabel("ZO queries per step")
    ax_q.set_title(f"queries per CGE step (biases: {result['config']['biases']})", fontsize=10)
    ax_q.legend(fontsize=8, loc="lower left")
    ax_q.grid(alpha=0.3, which="both")
    save_figure(fig, name)


def print_table(result: dict) -> None:
    dense = result["dense"]
    label = "val acc" if result["eval_set"] != "test" else "test acc"
    print(f"\n{'method':<16}{'sparsity':>9}{label:>10}{'sd':>8}{'queries/step':>14}{'reduction':>11}")
    print(f"{'dense CGE':<16}{0:>9}{dense['acc']:>10.4f}{dense['acc_std']:>8.4f}{dense['queries_per_step']:>14,.0f}"
          f"{1:>10.1f}x")
    print(f"{'dense FO':<16}{0:>9}{result['dense_fo_acc']:>10.4f}{result['dense_fo']['acc_std']:>8.4f}{'-':>14}"
          f"{'-':>11}")
    for r in result["rows"]:
        q = r["queries_per_step"]
        qs = f"{q:,.0f}" if q is not None else f"({r['active_coords']:,.0f} coords)"
        red = f"{dense['queries_per_step'] / q:.1f}x" if q is not None else "-"
        print(f"{r['ratios']:<16}{r['sparsity']:>9g}{r['acc']:>10.4f}{r['acc_std']:>8.4f}{qs:>14}{red:>11}")
    print(f"\nratio_spearman_zo_vs_fo (sparsity {SPEARMAN_SPARSITY}, seed {result['spearman_seed']}) = "
          f"{result['ratio_spearman_zo_vs_fo']:.3f}; all seeds: "
          + ", ".join(f"{v:.2f}" for v in result["ratio_spearman_per_seed"].values()))
    for key, t in result["targets"].items():
        print(f"target {key}: {t['value']:+.4f} ({t['target']}) -> {'met' if t['met'] else 'NOT met'}")


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    args.seeds = args.seeds or (1 if args.quick else 10)
    _common.RESULTS = args.out_dir
    sparsities = sorted(set(args.sparsities))
    set_threads(args.threads)
    warn_if_busy()
    t0 = time.perf_counter()
    split = load_split(args.validation)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"digits_cnn ({count_params(digits_cnn()):,} params) on {split}")
    print(f"Adam lr {args.lr}, cosine, batch {args.batch_size}, {args.epochs} epochs, CGE mu {args.mu}, masks every "
          f"{args.mask_interval} epoch(s), biases {args.biases}, freeze_inactive={args.freeze_inactive}, seeds {seeds}, "
          f"{args.threads} torch thread(s)")

    runs: dict = {"dense": [], "dense_fo": [], **{(s, m): [] for s in sparsities for m in METHODS}}
    found = {"zo-grasp": {}, "fo-grasp": {}}
    spear, grasp_queries, layout = {}, None, None
    for seed in seeds:
        g = grasp_ratios(split, seed, sorted({*sparsities, SPEARMAN_SPARSITY}), q=args.grasp_q, mu=args.mu, per_class=args.grasp_per_class)
        layout, grasp_queries = g["layout"], g["queries"]
        found["zo-grasp"][seed] = {f"{s:g}": r.ratios for s, r in g["zo"].items()}
        found["fo-grasp"][seed] = {f"{s:g}": r.ratios for s, r in g["fo"].items()}
        spear[seed] = spearman(g["zo"][SPEARMAN_SPARSITY], g["fo"][SPEARMAN_SPARSITY])
        print(f"\n[seed {seed}] ratios at {SPEARMAN_SPARSITY} (ZO-GraSP: {grasp_queries} queries): "
              + "; ".join(f"{n} zo {g['zo'][SPEARMAN_SPARSITY].ratios[n]:.3f} / fo {r:.3f}"
                          for n, r in g["fo"][SPEARMAN_SPARSITY].ratios.items())
              + f"; Spearman {spear[seed]:.2f}")

        def log(label, r, seed=seed):
            q = f"{r['queries_per_step']:>5} q/step" if r["queries_per_step"] is not None else "  (autograd)"
            print(f"  seed {seed} {label:<26} acc {r['acc']:.4f}  {q}  {r['wall_s']:5.1f}s", flush=True)

        r = train(split, seed, args, method="zo")
        runs["dense"].append(r)
        log("dense CGE", r)
        r = train(split, seed, args, method="fo")
        runs["dense_fo"].append(r)
        log("dense FO", r)
        for s in sparsities:
            for m, method, ratios in (("zo-grasp", "zo", g["zo"][s]), ("uniform", "zo", uniform_ratios(layout, s)),
                                      ("fo-sparse-grad", "fo", g["zo"][s])):
                r = train(split, seed, args, method=method, ratios=ratios)
                runs[(s, m)].append(r)
                log(f"{m} @ {s:g}", r)

    dense, dense_fo = summarize(runs["dense"]), summarize(runs["dense_fo"])
    rows = []
    for s in sparsities:
        for m in METHODS:
            summ = summarize(runs[(s, m)])
            rows.append({"sparsity": s, "ratios": m, "acc": summ["acc"], "queries_per_step": summ["queries_per_step"],
                         "acc_std": summ["acc_std"], "acc_per_seed": summ["acc_per_seed"],
                         "queries_per_step_per_seed": summ["queries_per_step_per_seed"],
                         "active_coords": _mean(summ["active_coords_per_seed"]),
                         "query_reduction_vs_dense_cge": (dense["queries_per_step"] / summ["queries_per_step"]
                                                          if summ["queries_per_step"] else None),
                         "mask_ratios": "zo-grasp" if m == "fo-sparse-grad" else m,
                         "train_acc": summ["train_acc"], "wall_s": summ["wall_s"]})
    spearman_seed = args.spearman_seed if args.spearman_seed in spear else seeds[0]
    result = {
        "benchmark": "sparsity",
        "command": " ".join(["python benchmarks/sparsity.py", *(argv if argv is not None else sys.argv[1:])]),
        "model": f"digits_cnn ({layout.dim} parameters; prunable weights: "
                 + ", ".join(f"{n} {layout.numels[layout.names.index(n)]}" for n in prunable_names(layout)) + ")",
        "data": str(split),
        "eval_set": "validation (25% of the training split)" if args.validation else "test",
        "dense": {"acc": dense["acc"], "queries_per_step": dense["queries_per_step"], "acc_std": dense["acc_std"],
                  "acc_per_seed": dense["acc_per_seed"], "train_acc": dense["train_acc"]},
        "dense_fo_acc": dense_fo["acc"],
        "dense_fo": {"acc_std": dense_fo["acc_std"], "acc_per_seed": dense_fo["acc_per_seed"],
                     "train_acc": dense_fo["train_acc"]},
        "rows": rows,
        "ratio_spearman_zo_vs_fo": spear[spearman_seed],
        "spearman_seed": spearman_seed,
        "spearman_sparsity": SPEARMAN_SPARSITY,
        "ratio_spearman_per_seed": {str(k): v for k, v in spear.items()},
        "ratios_found": {k: {str(seed): v for seed, v in d.items()} for k, d in found.items()},
        "uniform_ratio": "every weight tensor at the sparsity itself; biases as --biases says",
        "seeds": seeds,
        "epochs": args.epochs,
        "config": {"optimizer": "adam", "lr": args.lr, "lr_schedule": "cosine, no warm-up",
                   "batch_size": args.batch_size, "estimator": f"CGE forward differences, mu={args.mu}",
                   "scheduler": "FeatureReuseScheduler()", "mask_interval": args.mask_interval,
                   "mask_unit": args.mask_unit, "mask_kind": "random", "biases": args.biases, "freeze_inactive": args.freeze_inactive,
                   "fo_sparse_grad_masks": "ZO-GraSP ratios, same sampler seed as the zo-grasp rows",
                   "grasp": {"q": args.grasp_q, "mu": args.mu, "images_per_class": args.grasp_per_class,
                             "queries": grasp_queries, "point": "the seed's initialization",
                             "batch": "zoblackbox.cli.balanced_indices(y_train, per_class, seed)"},
                   "sparsities": sparsities, "threads": args.threads},
        "queries_per_step_note": "ZO queries per CGE step = active coordinates + 1 (the base point); "
                                 "null for first-order rows (autograd, no queries)",
        "wall_s": time.perf_counter() - t0,
        "machine": machine_info(),
    }
    result["targets"] = check_targets(result)
    path = write_json(args.name, result)
    if not args.no_plot:
        plot(result, args.name)
    print_table(result)
    print(f"\nwrote {path} ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
