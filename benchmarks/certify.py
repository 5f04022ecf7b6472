"""Certified defense of a black-box digits classifier: denoised smoothing trained with ZO, certified.

The black box ``f`` is an MLP 64-256-256-10 trained on the bundled digits split
(``load_digits_split()``: 1,437 train / 360 test 8x8 images in [0, 1]) and then only queried
through :class:`~zoblackbox.adapters.blackbox.BlackBoxClassifier`. In front of it a denoiser
``D`` (MLP 64-256-256-64) is trained in six ways (:func:`~zoblackbox.recipes.build_pipelines`,
settings in :class:`~zoblackbox.recipes.DenoisingRecipe`):

* ``none`` -- no denoiser;
* ``mse`` -- denoising loss only, no query of ``f``;
* ``fo-stability`` -- stability loss ``CE(f(D(x + delta)), f(x))`` with autograd through ``f``
  (white box: the reference / upper bound, not a black-box method);
* ``zo-ae-ds-cge`` -- ZO-AE-DS: D + encoder by backprop, central CGE in a 16-d latent space through
  the frozen decoder and ``f`` (32 queries per image and step);
* ``zo-ae-ds-rge`` -- the same with RGE, q = 31 Gaussian directions (q + 1 = 32: equal queries);
* ``zo-sparse-cge`` -- DeepZero: sparse CGE over D's own 99k parameters (ZO-GraSP layer ratios,
  99% sparsity, masks redrawn every 10 steps).

Every pipeline but ``none`` starts from the same MSE denoiser. ``ae-init`` (reported beside the
table, not part of it) is the ZO-AE-DS architecture after its query-free MSE pre-training: the
difference between it and the ZO-AE-DS rows is what the ZO steps contributed.

Each pipeline ``f(D(.))`` is certified with randomized smoothing (Cohen et al. 2019) on the test
images in a seeded order (default all 360): sigma 0.5, n0 = 100 selection draws, n = 10,000 fresh
estimation draws, alpha = 0.001. Certified accuracy at r = 0, 0.25, 0.5, 0.75, the maximum
certifiable radius for that n and alpha, training queries of ``f`` and wall times are reported.

Targets (issue): the best ZO pipeline within 2 points of ``fo-stability`` at r = 0.25 and 0.5, and
at least 10 points above ``mse`` at r = 0.25. The settings were chosen on a held-out 20% of the
training split (``--tune``), never on the test images.

Run:  python benchmarks/certify.py            (611 s on 2 shared cores under load, 1 torch thread)
      python benchmarks/certify.py --quick    (about 1.5 minutes: 100 images, n = 1,000, epochs / 10)
      python benchmarks/certify.py --tune     (the held-out selection grid, 926 s here)
Writes benchmarks/results/certify.json and certify.png (``--out-dir``/``--name`` to change).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from _common import RESULTS, machine_info, new_figure, set_threads, warn_if_busy

from zoblackbox.adapters.blackbox import (
    BlackBoxClassifier,
    DenoisedClassifier,
    mlp_classifier,
    mlp_denoiser,
    train_classifier,
    train_mse_denoiser,
)
from zoblackbox.data import load_digits_split
from zoblackbox.recipes import PIPELINES, DenoisingRecipe, TrainedPipeline, build_pipelines
from zoblackbox.smoothing import ABSTAIN, Smooth, max_certifiable_radius

RADII = (0.0, 0.25, 0.5, 0.75)
ZO_PIPELINES = ("zo-ae-ds-cge", "zo-ae-ds-rge", "zo-sparse-cge")
REFERENCES = ("ae-init", "mse-short")  # certified beside the table, not part of it
TARGET_GAP_TO_FO = 0.02  # best ZO within 2 points of fo-stability at r = 0.25 and 0.5
TARGET_OVER_MSE = 0.10  # best ZO at least 10 points above mse at r = 0.25
PAPER_IMAGENET10 = {"FO-DS": [89.3, 81.7, 68.9, 49.8], "ZO-AE-DS": [63.6, 52.8, 43.1, 32.7],
                    "DeepZero": [86.0, 76.6, 61.8, 43.1]}
LABELS = {"none": "no denoiser", "mse": "MSE denoiser", "fo-stability": "FO stability (white box)",
          "zo-ae-ds-cge": "ZO-AE-DS, CGE", "zo-ae-ds-rge": "ZO-AE-DS, RGE (equal queries)",
          "zo-sparse-cge": "DeepZero sparse CGE", "ae-init": "AE-DS init (no ZO step)",
          "mse-short": "MSE denoiser, 10x fewer epochs"}
# --tune: one knob at a time around the defaults, on the held-out 20% of the training split
TUNE_GRID = {"mse_epochs": [100, 300, 1000], "fo_epochs": [30, 100], "zo_mu": [0.01, 0.05],
             "zo_ae_epochs": [30, 100], "sparsity": [0.9, 0.99]}


def digits_blackbox(x: torch.Tensor, y: torch.Tensor, recipe: DenoisingRecipe, seed: int):
    """The classifier's owner trains it; afterwards everything goes through the query-only wrapper."""
    torch.manual_seed(seed)
    model = mlp_classifier(tuple(x.shape[1:]), recipe.classifier_hidden, 10)
    train_classifier(model, x, y, epochs=recipe.classifier_epochs, seed=seed)
    return model, BlackBoxClassifier(model, num_classes=10, input_shape=x.shape[1:])


def certify_all(trained: dict, images, labels, args, log=print) -> dict:
    rows = {}
    for name, item in trained.items():
        smooth = Smooth(item.pipeline, 10, args.sigma, input_shape=images.shape[1:], batch_size=args.noise_batch,
                        seed=args.seed + 100)
        cert = smooth.certify_dataset(images, labels, args.n0, args.n, args.alpha)
        acc = cert.certified_accuracy(RADII)
        hits = {str(r): [int(p == y and p != ABSTAIN and rad >= r) for p, rad, y in
                         zip(cert.predictions, cert.radii, cert.labels)] for r in RADII}
        rows[name] = {"certified_accuracy": {str(r): a for r, a in acc.items()}, "_hits": hits,
                      "queries": item.report.queries, "oracle_queries": item.report.oracle_queries,
                      "train_wall_s": item.report.wall_s, "train_steps": item.report.steps,
                      "certify_queries": cert.samples, "certify_wall_s": cert.seconds,
                      "abstain_rate": cert.abstain_rate, "failures": item.report.failures,
                      "info": {k: v for k, v in item.report.info.items() if k != "ratios"},
                      "ratios": item.report.info.get("ratios")}
        log(f"  {name:<14}" + "".join(f"{a:>8.3f}" for a in acc.values()) +
            f"{item.report.queries:>14,}{item.report.wall_s:>9.1f}s{cert.seconds:>8.1f}s")
    return rows


def table_header() -> str:
    return f"  {'pipeline':<14}" + "".join(f"{'r=' + str(r):>8}" for r in RADII) + \
        f"{'queries':>14}{'train':>10}{'certify':>8}"


def paired_ci(a: list, b: list, n_boot: int = 4000, seed: int = 0) -> list[float]:
    """95% paired-bootstrap interval of ``mean(a) - mean(b)`` over images (same images, resampled)."""
    d = torch.tensor(a, dtype=torch.float64) - torch.tensor(b, dtype=torch.float64)
    idx = torch.randint(0, d.numel(), (n_boot, d.numel()), generator=torch.Generator().manual_seed(seed))
    means = d[idx].mean(1)
    return [float(torch.quantile(means, 0.025)), float(torch.quantile(means, 0.975))]


def check_targets(acc: dict, hits: dict | None = None) -> dict:
    """Target checks on certified accuracy ``acc[method]["0.25"]`` etc. (``hits``: per-image
    certified-correct indicators, for paired-bootstrap intervals of the differences)."""
    zo = [m for m in ZO_PIPELINES if m in acc]
    if not zo or "fo-stability" not in acc or "mse" not in acc:
        return {}
    best = max(zo, key=lambda m: (acc[m]["0.25"] + acc[m]["0.5"], acc[m]["0.25"]))
    fo, mse = acc["fo-stability"], acc["mse"]
    gap = {r: fo[r] - acc[best][r] for r in ("0.25", "0.5")}
    over = acc[best]["0.25"] - mse["0.25"]
    out = {"best_zo": best, "fo_minus_best_zo": gap, "best_zo_minus_mse_at_0.25": over,
           "fo_minus_mse_at_0.25": fo["0.25"] - mse["0.25"],
           "within_2pt_of_fo": all(g <= TARGET_GAP_TO_FO + 1e-9 for g in gap.values()),
           "at_least_10pt_over_mse": over >= TARGET_OVER_MSE - 1e-9}
    if hits:
        out["ci95"] = {"fo_minus_best_zo": {r: paired_ci(hits["fo-stability"][r], hits[best][r]) for r in gap},
                       "best_zo_minus_mse_at_0.25": paired_ci(hits[best]["0.25"], hits["mse"]["0.25"]),
                       "fo_minus_mse_at_0.25": paired_ci(hits["fo-stability"]["0.25"], hits["mse"]["0.25"]),
                       "method": "paired bootstrap over the certified images, 4,000 resamples"}
    return out


# --------------------------------------------------------------------------- plot
def plot(result: dict, name: str, out_dir: Path) -> Path:
    fig, axes = new_figure(ncols=3, width=5.0, height=4.3)
    ax, dx, bx = axes
    colors = {"none": "#999999", "mse": "#8172b2", "fo-stability": "#333333", "zo-ae-ds-cge": "#4c72b0",
              "zo-ae-ds-rge": "#c44e52", "zo-sparse-cge": "#55a868", "ae-init": "#bbbbbb", "mse-short": "#ccb974"}
    acc = dict(result["certified_accuracy"])
    for m in REFERENCES:
        if m in result.get("reference", {}):
            acc[m] = result["reference"][m]["certified_accuracy"]
    for m in [*PIPELINES, *REFERENCES]:
        if m in acc:
            ax.plot(RADII, [100 * acc[m][str(r)] for r in RADII], marker="o", color=colors[m],
                    ls="--" if m in ("fo-stability", *REFERENCES) else "-", label=LABELS[m])
    ax.set_xlabel("L2 radius r")
    ax.set_ylabel("certified accuracy (%)")
    ax.set_xticks(RADII)
    ax.set_title(f"digits, sigma {result['sigma']}, n = {result['n']:,}, alpha = {result['alpha']}\n"
                 f"{result['num_images']} test images; max certifiable radius {result['max_radius']:.2f}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    # differences to the MSE denoiser, in points
    others = [m for m in ("fo-stability", *ZO_PIPELINES, *REFERENCES) if m in acc]
    width = 0.8 / len(others)
    for i, m in enumerate(others):
        xs = [j + (i - (len(others) - 1) / 2) * width for j in range(len(RADII))]
        dx.bar(xs, [100 * (acc[m][str(r)] - acc["mse"][str(r)]) for r in RADII], width, color=colors[m],
               label=LABELS[m])
    dx.axhline(100 * TARGET_OVER_MSE, color="#777777", ls=":", lw=1, label="target at r=0.25: +10 points")
    dx.axhline(0, color="#333333", lw=0.8)
    dx.set_xticks(range(len(RADII)), [f"r={r}" for r in RADII])
    dx.set_ylabel("certified accuracy minus MSE denoiser (points)")
    se = result.get("targets", {}).get("max_standard_error_of_one_accuracy")
    dx.set_title("gain over the MSE denoiser" + (f"\n(one accuracy's s.e. <= {100 * se:.1f} points)" if se else ""),
                 fontsize=10)
    dx.legend(fontsize=6)
    dx.grid(alpha=0.3, axis="y")
    zo = [m for m in PIPELINES if result["queries"].get(m)]
    vals = [result["queries"][m] for m in zo]
    bars = bx.bar(range(len(zo)), vals, color=[colors[m] for m in zo])
    for bar, v in zip(bars, vals):
        bx.annotate(f"{v / 1e6:.2f}M", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom", fontsize=8)
    bx.set_yscale("log")
    bx.set_xticks(range(len(zo)), [LABELS[m].replace(", ", "\n").replace(" (", "\n(") for m in zo], fontsize=7)
    bx.set_ylabel("training queries of f (images classified)")
    bx.set_title("query cost of training (FO: white-box passes)", fontsize=10)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


# --------------------------------------------------------------------------- tuning on held-out training images
def tune(args, split, recipe: DenoisingRecipe) -> dict:
    """One knob at a time around the defaults, certified on a held-out 20% of the training split."""
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(split.x_train.shape[0], generator=g)
    n_val = split.x_train.shape[0] // 5
    x_fit, y_fit = split.x_train[perm[n_val:]], split.y_train[perm[n_val:]]
    x_val, y_val = split.x_train[perm[:n_val]], split.y_train[perm[:n_val]]
    model, bb = digits_blackbox(x_fit, y_fit, recipe, args.seed)
    print(f"tuning: {x_fit.shape[0]} fit / {x_val.shape[0]} held-out training images; n = {args.n}")
    runs = []
    for knob, values in TUNE_GRID.items():
        names = {"mse_epochs": ["mse"], "fo_epochs": ["fo-stability"], "zo_mu": ["zo-ae-ds-cge"],
                 "zo_ae_epochs": ["zo-ae-ds-cge"], "sparsity": ["zo-sparse-cge"]}[knob]
        for v in values:
            r = replace(recipe, **{knob: v})
            if knob == "sparsity" and v < 0.95:  # equal queries: fewer steps at lower sparsity
                r = replace(r, sparse_epochs=max(1, round(recipe.sparse_epochs * (1 - recipe.sparsity) / (1 - v))))
            print(f"{knob} = {v}")
            trained = build_pipelines(names, bb, x_fit, r, classifier=model)
            print(table_header())
            rows = certify_all(trained, x_val, y_val, args)
            runs.append({"knob": knob, "value": v, "pipelines": names,
                         "certified_accuracy": {m: rows[m]["certified_accuracy"] for m in names},
                         "queries": {m: rows[m]["queries"] for m in names}})
    return {"fit_images": int(x_fit.shape[0]), "held_out_images": int(x_val.shape[0]), "grid": TUNE_GRID,
            "runs": runs}


# --------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sigma", type=float, default=0.5)
    ap.add_argument("--n", type=int, default=10_000, help="estimation draws per image (default 10,000)")
    ap.add_argument("--n0", type=int, default=100, help="selection draws per image")
    ap.add_argument("--alpha", type=float, default=0.001)
    ap.add_argument("--num-images", type=int, default=360, help="test images certified, seeded order (default all 360)")
    ap.add_argument("--noise-batch", type=int, default=2000, help="noisy copies per classifier call")
    ap.add_argument("--epochs-factor", type=float, default=1.0, help="scale every training stage")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="100 images, n = 1,000, epochs / 10 (smoke test)")
    ap.add_argument("--tune", action="store_true", help="run the held-out selection grid instead")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    ap.add_argument("--name", default="certify")
    ap.add_argument("--plot-only", action="store_true", help="redraw the PNG from the JSON")
    args = ap.parse_args(argv)
    if args.plot_only:
        result = json.loads((args.out_dir / f"{args.name}.json").read_text())
        print(f"wrote {plot(result, args.name, args.out_dir)}")
        return result
    if args.quick:
        args.num_images, args.n, args.epochs_factor = min(args.num_images, 100), min(args.n, 1000), 0.1
        args.name = args.name if args.name != "certify" else "certify_quick"
    set_threads(args.threads)
    torch.set_flush_denormal(True)  # certifying ZO/MSE-trained denoisers ran 10-30x slower without it
    warn_if_busy()
    t_start = time.perf_counter()
    split = load_digits_split()
    recipe = DenoisingRecipe(sigma=args.sigma, seed=args.seed).scaled(args.epochs_factor)
    if args.tune:
        args.n = min(args.n, 1000)
        out = {"benchmark": "certify-tune", "recipe": asdict(recipe), "sigma": args.sigma, "n": args.n,
               "n0": args.n0, "alpha": args.alpha, **tune(args, split, recipe),
               "wall_s": time.perf_counter() - t_start, "machine": machine_info()}
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"{args.name}_tune.json"
        path.write_text(json.dumps(out, indent=2) + "\n")
        print(f"total {out['wall_s']:.0f} s; wrote {path}")
        return out

    model, bb = digits_blackbox(split.x_train, split.y_train, recipe, args.seed)
    with torch.no_grad():
        test_acc = float((bb.predict(split.x_test) == split.y_test).float().mean())
    bb.reset_queries()
    print(f"black box: MLP 64-{'-'.join(map(str, recipe.classifier_hidden))}-10, clean test accuracy {test_acc:.4f}")
    t_train = time.perf_counter()
    trained = build_pipelines(list(PIPELINES) + ["ae-init"], bb, split.x_train, recipe, classifier=model, log=print)
    short_epochs = max(1, recipe.mse_epochs // 10)
    print(f"reference: MSE denoiser trained {short_epochs} epochs (10x shorter)")
    torch.manual_seed(recipe.seed)
    short = mlp_denoiser(tuple(split.x_train.shape[1:]), recipe.denoiser_hidden)
    report = train_mse_denoiser(short, split.x_train, sigma=recipe.sigma, epochs=short_epochs,
                                batch_size=recipe.batch_size, lr=recipe.lr, seed=recipe.seed)
    trained["mse-short"] = TrainedPipeline("mse-short", DenoisedClassifier(bb, short), report)
    t_train = time.perf_counter() - t_train
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(split.x_test.shape[0], generator=g)[:args.num_images]
    images, labels = split.x_test[order], split.y_test[order]
    max_radius = max_certifiable_radius(args.sigma, args.n, args.alpha)
    print(f"\ncertified accuracy, {images.shape[0]} test images, sigma {args.sigma}, n0 {args.n0}, n {args.n:,}, "
          f"alpha {args.alpha}; max certifiable radius {max_radius:.3f}")
    print(table_header())
    t_cert = time.perf_counter()
    rows = certify_all(trained, images, labels, args)
    t_cert = time.perf_counter() - t_cert
    acc = {m: rows[m]["certified_accuracy"] for m in PIPELINES}
    targets = check_targets(acc, {m: rows[m]["_hits"] for m in PIPELINES})
    short_gap = {r: acc[targets["best_zo"]][r] - rows["mse-short"]["certified_accuracy"][r]
                 for r in ("0.25", "0.5")} if targets else None
    se = math.sqrt(0.25 / images.shape[0])
    runtime = time.perf_counter() - t_start
    result = {
        "benchmark": "certify",
        "command": " ".join(["python benchmarks/certify.py", *(argv if argv is not None else sys.argv[1:])]),
        "sigma": args.sigma, "n": args.n, "n0": args.n0, "alpha": args.alpha, "max_radius": max_radius,
        "num_images": int(images.shape[0]),
        "certified_accuracy": acc,
        "queries": {m: rows[m]["queries"] for m in PIPELINES},
        "details": {m: {k: v for k, v in rows[m].items() if k not in ("certified_accuracy", "_hits")}
                    for m in PIPELINES},
        "reference": {**{m: {k: v for k, v in rows[m].items() if k != "_hits"} for m in REFERENCES},
                      "best_zo_minus_mse_short": short_gap,
                      "paper_imagenet10_pct_at_0_0.25_0.5_0.75": PAPER_IMAGENET10},
        "targets": {**targets, "gap_to_fo_target": TARGET_GAP_TO_FO, "over_mse_target": TARGET_OVER_MSE,
                    "max_standard_error_of_one_accuracy": se},
        "blackbox": {"architecture": "MLP 64-256-256-10", "clean_test_accuracy": test_acc},
        "recipe": asdict(recipe),
        "data": {"split": str(split), "certified_images": f"first {images.shape[0]} of a seeded permutation "
                                                          f"(seed {args.seed}) of the test split"},
        "runtime_s": {"train": t_train, "certify": t_cert, "total": runtime},
        "machine": machine_info(),
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    png = plot(result, args.name, args.out_dir)
    if targets:
        gap = targets["fo_minus_best_zo"]
        print(f"\nbest ZO pipeline: {targets['best_zo']}; FO minus it: {gap['0.25']:+.3f} at r=0.25, "
              f"{gap['0.5']:+.3f} at r=0.5 -> within 2 points: {'met' if targets['within_2pt_of_fo'] else 'NOT met'}")
        print(f"best ZO minus MSE at r=0.25: {targets['best_zo_minus_mse_at_0.25']:+.3f} -> >= 10 points: "
              f"{'met' if targets['at_least_10pt_over_mse'] else 'NOT met'} (FO minus MSE: "
              f"{targets['fo_minus_mse_at_0.25']:+.3f}); one accuracy's standard error <= {se:.3f}")
        ci = targets["ci95"]
        fmt = "[{:+.3f}, {:+.3f}]".format
        print(f"95% paired-bootstrap intervals: FO - best ZO {fmt(*ci['fo_minus_best_zo']['0.25'])} at r=0.25, "
              f"{fmt(*ci['fo_minus_best_zo']['0.5'])} at r=0.5; best ZO - MSE "
              f"{fmt(*ci['best_zo_minus_mse_at_0.25'])} at r=0.25")
        print(f"reference: best ZO minus the 10x-shorter MSE denoiser: {short_gap['0.25']:+.3f} at r=0.25, "
              f"{short_gap['0.5']:+.3f} at r=0.5")
    print(f"training {t_train:.0f} s, certification {t_cert:.0f} s, total {runtime:.0f} s; wrote {path} and {png}")
    return result


if __name__ == "__main__":
    main()
