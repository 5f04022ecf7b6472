"""The ``zoblackbox`` command: ``demo``, ``train``, ``certify``, ``pde`` and ``minimize``."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import __version__
from .cli_args import (
    check_device,
    check_input_dir,
    check_input_file,
    check_output_dir,
    check_output_file,
    fail_nonfinite,
    momentum_float,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
    radii_list,
    seed_int,
    thread_count,
)
from .errors import ConfigError, ZOError
from .recipes import DEEPZERO_RECIPE, DIGITS_CNN_RECIPE
from .sparsity import check_sparsity

# the argument types live in cli_args (cli_pde needs them without importing cli); they stay importable from here
__all__ = ["build_parser", "main", "positive_float", "positive_int", "probability", "radii_list"]

# the recipes live in zoblackbox.recipes; DEEPZERO_RECIPE stays importable from here
DEMO_DEFAULTS = {**DIGITS_CNN_RECIPE, "threads": 1}
SCHEDULERS = ("reuse", "vectorized", "serial", "oracle")


def _add_training_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--epochs", type=positive_int, default=defaults["epochs"], help="training epochs")
    p.add_argument("--lr", type=positive_float, default=defaults["lr"], help="peak learning rate")
    p.add_argument("--batch-size", type=positive_int, default=defaults["batch_size"], help="mini-batch size")
    p.add_argument("--mu", type=positive_float, default=defaults["mu"], help="finite-difference step")
    p.add_argument("--seed", type=seed_int, default=defaults["seed"],
                   help="seed of model init, data order, estimator (0 <= seed < 2**63)")
    p.add_argument("--device", default="cpu",
                   help="torch device (cpu, cuda, cuda:1, ...); checked before any work")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--threads", type=thread_count, default=defaults.get("threads"),
                   help="torch intra-op threads (default: the demo uses 1 -- its kernels are small, and one thread "
                        "measured 4.8x faster than two on a 2-core machine with another busy process; train "
                        "uses torch's default)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="zoblackbox", description="Zeroth-order optimization of black boxes.",
        epilog="Exit codes: 0 success; 1 the run failed (non-finite final metrics, minimize did not converge, or an "
               "unexpected internal error such as running out of memory); 2 bad input or an error (one line "
               "'zoblackbox: error: ...' on stderr); 130 interrupted. "
               "Give --debug (or set ZOBLACKBOX_DEBUG=1) to see the Python traceback of an error.")
    parser.add_argument("--version", action="version", version=f"zoblackbox {__version__}")
    parser.add_argument("--debug", action="store_true", default=False,
                        help="show the full Python traceback of an error instead of one line (also: environment "
                             "variable ZOBLACKBOX_DEBUG=1); accepted after the sub-command too")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="ZO (CGE) training of a small CNN on the bundled digits, vs first-order")
    _add_training_args(demo, DEMO_DEFAULTS)
    demo.add_argument("--no-fo", action="store_true", help="skip the first-order comparison")
    demo.add_argument("--out", type=Path, default=None, help="directory for metrics.jsonl and checkpoints")
    demo.add_argument("--scheduler", choices=SCHEDULERS, default="reuse",
                      help="how queries are evaluated (reuse = feature reuse, the fastest)")

    train = sub.add_parser("train", help="train a model with ZO (or FO) gradients")
    train.add_argument("--task", choices=["digits", "cifar10"], default="digits", help="dataset")
    train.add_argument("--data", type=Path, default=None,
                       help="CIFAR-10 directory in the standard python format (never downloaded)")
    train.add_argument("--model", choices=["cnn", "mlp", "vit", "resnet20"], default=None,
                       help="architecture (default: cnn for digits, resnet20 for cifar10)")
    train.add_argument("--recipe", choices=["deepzero"], default=None,
                       help="DeepZero's CIFAR-10 recipe: SGD lr 0.1, momentum 0.9, wd 5e-4, cosine with 3 warm-up "
                            "epochs, batch 256, mu 5e-3, sparsity 0.9 with ZO-GraSP ratios, masks redrawn every 5 "
                            "epochs, 50 epochs (explicit options override it)")
    train.add_argument("--method", choices=["zo", "fo"], default="zo", help="zeroth-order or autograd")
    train.add_argument("--estimator", choices=["cge", "rge"], default="cge", help="gradient estimator")
    train.add_argument("--scheme", choices=["forward", "central"], default="forward", help="CGE differences")
    train.add_argument("--q", type=positive_int, default=20, help="RGE directions per step")
    train.add_argument("--directions", choices=["gaussian", "sphere", "rademacher"], default="gaussian")
    train.add_argument("--antithetic", action="store_true", help="RGE antithetic pairs")
    train.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "signsgd"], default=None,
                       help="update rule (default adam)")
    train.add_argument("--momentum", type=momentum_float, default=None, help="SGD momentum, in [0, 1)")
    train.add_argument("--weight-decay", type=non_negative_float, default=None, help="weight decay (>= 0)")
    train.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    train.add_argument("--warmup-epochs", type=non_negative_float, default=None,
                       help="linear LR warm-up length in epochs (>= 0)")
    train.add_argument("--budget", type=positive_int, default=None, help="maximum ZO queries")
    train.add_argument("--bn-policy", choices=["batch", "eval"], default="batch")
    train.add_argument("--sparsity", type=float, default=None,
                       help="fraction of each step's coordinates left out (0 <= s < 1); the model stays dense")
    train.add_argument("--ratios", default=None,
                       help="layer-wise pruning ratios: zo-grasp (default), uniform, or a JSON file {layer: ratio}")
    train.add_argument("--mask-interval", type=positive_int, default=None,
                       help="redraw the coordinate mask every K epochs (default 5)")
    train.add_argument("--freeze-inactive", action="store_true",
                       help="keep momentum and weight decay off the coordinates outside the mask")
    train.add_argument("--sparse-biases", action="store_true",
                       help="give each bias its layer's ratio (default: biases are estimated at every step)")
    train.add_argument("--scheduler", choices=SCHEDULERS, default="reuse",
                       help="how queries are evaluated (reuse = feature reuse, the fastest for torch models)")
    train.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    train.add_argument("--checkpoint-every-steps", type=positive_int, default=None, metavar="N",
                       help="also checkpoint every N steps, mid-epoch (default: at epoch ends only); --resume "
                            "continues from the last one bitwise exactly")
    _add_training_args(train, {k: None for k in DEMO_DEFAULTS})
    train.set_defaults(threads=None)
    _add_certify_parser(sub)
    from .cli_minimize import register as register_minimize
    from .cli_pde import register as register_pde

    register_pde(sub)  # zoblackbox pde: its parser sets args.handler
    register_minimize(sub)  # zoblackbox minimize --program: an external program through the engine
    for p in sub.choices.values():  # --debug also after the sub-command; SUPPRESS keeps the top-level value
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks of errors")
    return parser


TRAIN_DEFAULTS = {**{k: v for k, v in DEMO_DEFAULTS.items() if k != "threads"}, "optimizer": "adam", "momentum": 0.0, "weight_decay": 0.0, "warmup_epochs": 0.0,
                  "sparsity": None, "ratios": "zo-grasp", "mask_interval": 5}


def resolve_train_args(args) -> argparse.Namespace:
    """Fill unset options: explicit value > ``--recipe`` > the defaults."""
    recipe = DEEPZERO_RECIPE if args.recipe == "deepzero" else {}
    for key, default in TRAIN_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, recipe.get(key, default))
    if args.model is None:
        args.model = "resnet20" if args.task == "cifar10" else "cnn"
    if args.task == "cifar10" and args.model != "resnet20":
        raise ConfigError(f"--task cifar10 supports --model resnet20, got {args.model!r}")
    if args.task == "cifar10" and args.data is None:
        raise ConfigError("--task cifar10 needs --data PATH (the cifar-10-batches-py directory; never downloaded)")
    if args.momentum and args.optimizer != "sgd":
        raise ConfigError(f"--momentum applies to --optimizer sgd, not {args.optimizer!r}")
    if args.sparsity is not None:
        check_sparsity(args.sparsity)
    return args


def _estimator(args):
    from .estimators import CoordinateEstimator, RandomEstimator

    if getattr(args, "estimator", "cge") == "rge":
        return RandomEstimator(mu=args.mu, q=args.q, directions=args.directions, antithetic=args.antithetic,
                               seed=args.seed)
    return CoordinateEstimator(mu=args.mu, scheme=getattr(args, "scheme", "forward"))


def make_scheduler(name: str):
    """A query scheduler by CLI name (``oracle``: the oracle's own chunked evaluation)."""
    from . import schedule

    factories: dict[str, Callable[[], object]] = {
        "reuse": schedule.FeatureReuseScheduler, "vectorized": schedule.VectorizedScheduler,
        "serial": schedule.SerialScheduler, "oracle": lambda: None}
    return factories[name]()


def _load_task(task: str, data: Path | None):
    from .data import load_cifar10, load_digits_split

    if task == "cifar10":
        if data is None:  # resolve_train_args refuses this first
            raise ConfigError("--task cifar10 needs --data PATH (the cifar-10-batches-py directory; never downloaded)")
        return load_cifar10(data)
    return load_digits_split(seed=0)


def _make_model(name: str, split):
    from .models import MODELS
    from .resnet import resnet20

    if name == "resnet20":
        return resnet20(num_classes=split.num_classes, in_channels=split.x_train.shape[1])
    if split.x_train.shape[1:] != (1, 8, 8):
        raise ConfigError(f"--model {name} is built for 8x8 digits, not images of shape {tuple(split.x_train.shape[1:])}")
    return MODELS[name]()


def _sparse_schedule(args, model, split):
    """ZO-GraSP (on 25 images per class), uniform or file ratios -> a SparseSchedule."""
    import torch.nn.functional as F

    from .params import ParamLayout
    from .sparsity import CoordinateSampler, PruningRatios, SparseSchedule, uniform_ratios, zo_grasp

    layout = ParamLayout.from_tensors([(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if args.ratios == "uniform":
        ratios = uniform_ratios(layout, args.sparsity)
    elif args.ratios == "zo-grasp":
        from .torch_module import ModuleOracle

        idx = balanced_indices(split.y_train, per_class=25, seed=args.seed)
        oracle = ModuleOracle(model, F.cross_entropy, batch=(split.x_train[idx], split.y_train[idx]))
        ratios = zo_grasp(oracle, oracle.get_params(), layout, args.sparsity, seed=args.seed,
                          scheduler=make_scheduler("vectorized"))
    else:
        ratios = PruningRatios.from_json(args.ratios, layout)
    print(ratios)
    sampler = CoordinateSampler(layout, ratios, seed=args.seed,
                                biases="layer" if getattr(args, "sparse_biases", False) else "dense")
    print(f"sparse CGE: {sampler.n_active:,} of {layout.dim:,} coordinates per step, mask redrawn every "
          f"{args.mask_interval} epochs")
    return SparseSchedule(sampler, interval=args.mask_interval, unit="epoch", freeze_inactive=args.freeze_inactive)


def balanced_indices(labels: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    """``per_class`` random indices of every class (fewer where a class is smaller)."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for c in torch.unique(labels):
        idx = (labels == c).nonzero().flatten()
        parts.append(idx[torch.randperm(len(idx), generator=g)[:per_class]])
    return torch.cat(parts)


def _run_training(args, method: str, *, optimizer="adam", optimizer_kwargs=None, output_dir=None,
                  model_name="cnn", budget=None, resume=False, task="digits", data=None, scheduler="reuse",
                  sparse=False, warmup_epochs=0.0, extra=None) -> dict:
    from .data import make_loader
    from .models import count_params
    from .train import Trainer

    split = _load_task(task, data)
    torch.manual_seed(args.seed)
    model = _make_model(model_name, split)
    train_loader = make_loader(split.x_train, split.y_train, args.batch_size, shuffle=True, seed=args.seed)
    test_loader = make_loader(split.x_test, split.y_test, 512, shuffle=False)
    schedule = _sparse_schedule(args, model, split) if sparse else None
    trainer = Trainer(model, train_loader, test_loader, method=method,
                      estimator=_estimator(args) if method == "zo" else None, optimizer=optimizer, lr=args.lr,
                      optimizer_kwargs=optimizer_kwargs, epochs=args.epochs, budget=budget, device=args.device,
                      output_dir=output_dir, progress=not args.no_progress, sparse=schedule,
                      scheduler=make_scheduler(scheduler) if method == "zo" else None,
                      warmup_steps=round(warmup_epochs * len(train_loader)), **(extra or {}))
    result = trainer.fit(resume=resume)
    result["params"] = count_params(model)
    result["split"] = str(split)
    return result


def cmd_demo(args) -> int:
    from .data import load_digits_split
    from .models import count_params, digits_cnn

    split = load_digits_split(seed=0)
    print(f"zoblackbox {__version__} demo: zeroth-order training of a CNN on scikit-learn's digits")
    print(f"data : {split}")
    print(f"model: digits_cnn, {count_params(digits_cnn()):,} parameters; CGE forward differences, mu={args.mu}; "
          f"Adam lr={args.lr}, cosine; batch {args.batch_size}; {args.epochs} epochs; seed {args.seed}; "
          f"queries evaluated by the {args.scheduler} scheduler")
    print("\n[1/2] ZO training (coordinate-wise gradient estimation, the model queried as a black box)")
    zo = _run_training(args, "zo", output_dir=args.out, scheduler=args.scheduler)
    fo = None
    if not args.no_fo:
        print("\n[2/2] first-order reference (autograd), same model, data order and schedule")
        fo = _run_training(args, "fo")
    print("\nresult")
    print(f"  {'method':<26}{'test acc':>10}{'queries':>14}{'wall':>10}")
    print(f"  {'ZO (CGE, black box)':<26}{zo['test_acc']:>10.4f}{zo['queries']:>14,}{zo['wall_s']:>9.1f}s")
    if fo is not None:
        print(f"  {'first-order (autograd)':<26}{fo['test_acc']:>10.4f}{'-':>14}{fo['wall_s']:>9.1f}s")
    summary = {"test_acc": zo["test_acc"], "fo_test_acc": fo["test_acc"] if fo else None, "queries": zo["queries"],
               "wall_s": zo["wall_s"], "params": zo["params"], "epochs": zo["epochs"], "steps": zo["steps"],
               "split": zo["split"], "lr": args.lr, "batch_size": args.batch_size, "mu": args.mu, "seed": args.seed,
               "scheduler": args.scheduler}
    _write_json(args.json, summary)
    metrics = {"ZO test_loss": zo.get("test_loss"), "ZO test_acc": zo["test_acc"]}
    if fo is not None:
        metrics.update({"first-order test_loss": fo.get("test_loss"), "first-order test_acc": fo["test_acc"]})
    return fail_nonfinite(metrics, TRAINING_CAUSE)


TRAINING_CAUSE = "the learning rate (--lr) is likely too large for this model, or --mu too small"


def cmd_train(args) -> int:
    args = resolve_train_args(args)
    opt_kwargs = {}
    if args.momentum:
        opt_kwargs["momentum"] = args.momentum
    if args.weight_decay:
        opt_kwargs["weight_decay"] = args.weight_decay
    t0 = time.perf_counter()
    result = _run_training(args, args.method, optimizer=args.optimizer, optimizer_kwargs=opt_kwargs,
                           output_dir=args.out, model_name=args.model, budget=args.budget, resume=args.resume,
                           task=args.task, data=args.data, scheduler=args.scheduler,
                           sparse=args.sparsity is not None and args.sparsity > 0, warmup_epochs=args.warmup_epochs,
                           extra={"lr_schedule": args.lr_schedule, "bn_policy": args.bn_policy,
                                  "checkpoint_every_steps": args.checkpoint_every_steps})
    print(f"test acc {result['test_acc']:.4f}  queries {result['queries']:,}  steps {result['steps']}  "
          f"wall {time.perf_counter() - t0:.1f}s  ({result['stop_reason']}); metrics in {args.out / 'metrics.jsonl'}")
    summary = {k: v for k, v in result.items() if k != "history"}
    _write_json(args.json, summary)
    cause = "the learning rate (--lr) is likely too large for this model"
    cause += (", or --mu too small" if args.method == "zo" else "") + (
        ", or --momentum too close to 1" if args.momentum else "")
    return fail_nonfinite({"test_loss": result.get("test_loss"), "test_acc": result.get("test_acc")}, cause)


CERTIFY_RADII = "0,0.25,0.5,0.75"


def _add_certify_parser(sub) -> None:
    from .recipes import PIPELINES, REFERENCE_PIPELINES

    p = sub.add_parser("certify", help="denoised smoothing of a query-only digits classifier: train, then certify",
                       description="Trains an MLP on the digits split and wraps it as a query-only black box, trains "
                                   "the chosen denoiser pipelines in front of it, and certifies each with randomized "
                                   "smoothing (Cohen et al. 2019) on a seeded subset of the test images.")
    p.add_argument("--pipeline", nargs="+", choices=PIPELINES + REFERENCE_PIPELINES, default=["zo-ae-ds-cge"],
                   help="pipelines to train and certify (fo-stability is the white-box reference)")
    p.add_argument("--sigma", type=positive_float, default=0.5, help="smoothing noise (input units; images in [0, 1])")
    p.add_argument("--n0", type=positive_int, default=100, help="selection draws per image")
    p.add_argument("--n", type=positive_int, default=2000, help="estimation draws per image (fresh noise)")
    p.add_argument("--alpha", type=probability, default=0.001, help="failure probability of each certificate")
    p.add_argument("--radii", type=radii_list, default=radii_list(CERTIFY_RADII),
                   help=f"radii of the certified-accuracy table (default {CERTIFY_RADII})")
    p.add_argument("--num-images", type=positive_int, default=100,
                   help="test images certified (a seeded random subset of the 360; default 100)")
    p.add_argument("--noise-batch", type=positive_int, default=1000, help="noisy copies per classifier call")
    p.add_argument("--epochs-factor", type=positive_float, default=1.0,
                   help="multiply every training stage's epochs (e.g. 0.1 for a quick look)")
    p.add_argument("--seed", type=seed_int, default=0,
                   help="seed of models, training noise, subset and certification (0 <= seed < 2**63)")
    p.add_argument("--threads", type=thread_count, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the results as JSON")


def cmd_certify(args) -> int:
    # denoiser outputs near zero are denormal floats: 10-30x slower without flushing them. The flag is
    # process-wide, so it is reset afterwards (torch's default is off) for code that runs after us.
    torch.set_flush_denormal(True)
    try:
        return _certify(args)
    finally:
        torch.set_flush_denormal(False)


def _certify(args) -> int:
    from .adapters.blackbox import BlackBoxClassifier, mlp_classifier, train_classifier
    from .data import load_digits_split
    from .recipes import DenoisingRecipe, build_pipelines
    from .smoothing import Smooth, max_certifiable_radius

    t0 = time.perf_counter()
    split = load_digits_split(seed=0)
    recipe = DenoisingRecipe(sigma=args.sigma, seed=args.seed).scaled(args.epochs_factor)
    torch.manual_seed(args.seed)
    classifier = mlp_classifier(tuple(split.x_train.shape[1:]), recipe.classifier_hidden, split.num_classes)
    train_acc = train_classifier(classifier, split.x_train, split.y_train, epochs=recipe.classifier_epochs,
                                 seed=args.seed)
    blackbox = BlackBoxClassifier(classifier, num_classes=split.num_classes, input_shape=split.x_train.shape[1:])
    print(f"black box: MLP {recipe.classifier_hidden}, train accuracy {train_acc:.3f}; sigma {args.sigma}, "
          f"n0 {args.n0}, n {args.n}, alpha {args.alpha}")
    trained = build_pipelines(args.pipeline, blackbox, split.x_train, recipe,
                              classifier=classifier if "fo-stability" in args.pipeline else None, log=print)
    g = torch.Generator().manual_seed(args.seed)
    subset = torch.randperm(split.x_test.shape[0], generator=g)[:args.num_images]
    images, labels = split.x_test[subset], split.y_test[subset]
    max_radius = max_certifiable_radius(args.sigma, args.n, args.alpha)
    result = {"sigma": args.sigma, "n": args.n, "n0": args.n0, "alpha": args.alpha, "max_radius": max_radius,
              "num_images": int(images.shape[0]), "radii": args.radii, "certified_accuracy": {}, "queries": {},
              "certify_queries": {}, "train_wall_s": {}, "certify_wall_s": {}}
    for name, item in trained.items():
        smooth = Smooth(item.pipeline, split.num_classes, args.sigma, input_shape=images.shape[1:],
                        batch_size=args.noise_batch, seed=args.seed)
        cert = smooth.certify_dataset(images, labels, args.n0, args.n, args.alpha)
        result["certified_accuracy"][name] = {str(r): a for r, a in cert.certified_accuracy(args.radii).items()}
        result["queries"][name] = item.report.queries
        result["certify_queries"][name] = cert.samples
        result["train_wall_s"][name] = item.report.wall_s
        result["certify_wall_s"][name] = cert.seconds
    print(f"\ncertified accuracy on {images.shape[0]} test images (max certifiable radius {max_radius:.3f} "
          f"at n={args.n}, alpha={args.alpha})")
    print(f"  {'pipeline':<16}" + "".join(f"{'r=' + str(r):>9}" for r in args.radii) + f"{'train queries':>15}")
    for name, accs in result["certified_accuracy"].items():
        print(f"  {name:<16}" + "".join(f"{a:>9.3f}" for a in accs.values()) + f"{result['queries'][name]:>15,}")
    result["wall_s"] = time.perf_counter() - t0
    print(f"total {result['wall_s']:.1f} s")
    _write_json(args.json, result)
    return 0


def _write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"summary written to {path}")


def preflight(args) -> None:
    """Check the device and every input and output path of ``args`` before any work (ConfigError if bad)."""
    if args.command == "train":
        resolve_train_args(args)
        check_input_dir("--data", args.data)
        if args.ratios not in (None, "zo-grasp", "uniform"):
            check_input_file("--ratios", Path(args.ratios))
    if args.command in ("demo", "train"):
        check_output_dir("--out", args.out)
    if args.command == "minimize":
        check_input_file("--x0-file", args.x0_file)
        check_output_dir("--checkpoint", args.checkpoint)
        check_output_file("--log", args.log)
    check_output_file("--json", getattr(args, "json", None))
    if getattr(args, "device", None) is not None:
        check_device(args.device)


def _one_line(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).splitlines() if line.strip()) or repr(exc)
    return text if isinstance(exc, ZOError) else f"{type(exc).__name__}: {text}"


def debug_requested(args=None) -> bool:
    """``--debug`` given, or ``ZOBLACKBOX_DEBUG`` set to anything but empty/0/false/no."""
    env = os.environ.get("ZOBLACKBOX_DEBUG", "").strip().lower() not in ("", "0", "false", "no")
    return env or bool(getattr(args, "debug", False))


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (0 ok, 1 run failed, 2 bad input / error, 130 interrupted).

    Argument errors exit 2 through argparse (``SystemExit``). Any other error prints one line
    ``zoblackbox: error: ...`` on stderr, or its traceback under ``--debug`` / ``ZOBLACKBOX_DEBUG=1``.
    """
    args = build_parser().parse_args(argv)
    debug = debug_requested(args)
    try:
        preflight(args)
        if args.threads:
            torch.set_num_threads(args.threads)
        return (getattr(args, "handler", None)
                or {"demo": cmd_demo, "train": cmd_train, "certify": cmd_certify}[args.command])(args)
    except KeyboardInterrupt:
        print("zoblackbox: interrupted", file=sys.stderr)
        return 130
    except (ZOError, ValueError, TypeError, OSError) as exc:
        if debug:
            raise
        print(f"zoblackbox: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:
        if debug:
            raise
        print(f"zoblackbox: error: unexpected {_one_line(exc)} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
