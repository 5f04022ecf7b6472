"""The ``zoblackbox`` command: ``zoblackbox demo`` and ``zoblackbox train``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import __version__
from .errors import ZOError

__all__ = ["main", "build_parser"]

DEMO_DEFAULTS = {"epochs": 12, "lr": 0.02, "batch_size": 128, "mu": 5e-3, "seed": 0}


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {value}")
    return value


def _add_training_args(p: argparse.ArgumentParser, defaults: dict) -> None:
    p.add_argument("--epochs", type=_positive_int, default=defaults["epochs"], help="training epochs")
    p.add_argument("--lr", type=_positive_float, default=defaults["lr"], help="peak learning rate")
    p.add_argument("--batch-size", type=_positive_int, default=defaults["batch_size"], help="mini-batch size")
    p.add_argument("--mu", type=_positive_float, default=defaults["mu"], help="finite-difference step")
    p.add_argument("--seed", type=int, default=defaults["seed"], help="seed of model init, data order, estimator")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zoblackbox", description="Zeroth-order optimization of black boxes.")
    parser.add_argument("--version", action="version", version=f"zoblackbox {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="ZO (CGE) training of a small CNN on the bundled digits, vs first-order")
    _add_training_args(demo, DEMO_DEFAULTS)
    demo.add_argument("--no-fo", action="store_true", help="skip the first-order comparison")
    demo.add_argument("--out", type=Path, default=None, help="directory for metrics.jsonl and checkpoints")

    train = sub.add_parser("train", help="train a model with ZO (or FO) gradients")
    train.add_argument("--task", choices=["digits"], default="digits", help="dataset")
    train.add_argument("--model", choices=["cnn", "mlp"], default="cnn", help="model architecture")
    train.add_argument("--method", choices=["zo", "fo"], default="zo", help="zeroth-order or autograd")
    train.add_argument("--estimator", choices=["cge", "rge"], default="cge", help="gradient estimator")
    train.add_argument("--scheme", choices=["forward", "central"], default="forward", help="CGE differences")
    train.add_argument("--q", type=_positive_int, default=20, help="RGE directions per step")
    train.add_argument("--directions", choices=["gaussian", "sphere", "rademacher"], default="gaussian")
    train.add_argument("--antithetic", action="store_true", help="RGE antithetic pairs")
    train.add_argument("--optimizer", choices=["sgd", "adam", "adamw", "signsgd"], default="adam")
    train.add_argument("--momentum", type=float, default=0.0, help="SGD momentum")
    train.add_argument("--weight-decay", type=float, default=0.0)
    train.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine")
    train.add_argument("--warmup-steps", type=int, default=0)
    train.add_argument("--budget", type=_positive_int, default=None, help="maximum ZO queries")
    train.add_argument("--bn-policy", choices=["batch", "eval"], default="batch")
    train.add_argument("--out", type=Path, default=Path("runs/train"), help="output directory")
    train.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    _add_training_args(train, DEMO_DEFAULTS)
    return parser


def _estimator(args):
    from .estimators import CoordinateEstimator, RandomEstimator

    if getattr(args, "estimator", "cge") == "rge":
        return RandomEstimator(mu=args.mu, q=args.q, directions=args.directions, antithetic=args.antithetic,
                               seed=args.seed)
    return CoordinateEstimator(mu=args.mu, scheme=getattr(args, "scheme", "forward"))


def _run_training(args, method: str, *, optimizer="adam", optimizer_kwargs=None, output_dir=None,
                  model_name="cnn", budget=None, resume=False, extra=None) -> dict:
    from .data import load_digits_split, make_loader
    from .models import MODELS, count_params
    from .train import Trainer

    split = load_digits_split(seed=0)
    torch.manual_seed(args.seed)
    model = MODELS[model_name]()
    train_loader = make_loader(split.x_train, split.y_train, args.batch_size, shuffle=True, seed=args.seed)
    test_loader = make_loader(split.x_test, split.y_test, 512, shuffle=False)
    trainer = Trainer(model, train_loader, test_loader, method=method,
                      estimator=_estimator(args) if method == "zo" else None, optimizer=optimizer, lr=args.lr,
                      optimizer_kwargs=optimizer_kwargs, epochs=args.epochs, budget=budget, device=args.device,
                      output_dir=output_dir, progress=not args.no_progress, **(extra or {}))
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
          f"Adam lr={args.lr}, cosine; batch {args.batch_size}; {args.epochs} epochs; seed {args.seed}")
    print("\n[1/2] ZO training (coordinate-wise gradient estimation, the model queried as a black box)")
    zo = _run_training(args, "zo", output_dir=args.out)
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
               "split": zo["split"], "lr": args.lr, "batch_size": args.batch_size, "mu": args.mu, "seed": args.seed}
    _write_json(args.json, summary)
    return 0


def cmd_train(args) -> int:
    opt_kwargs = {}
    if args.momentum:
        if args.optimizer != "sgd":
            raise SystemExit(f"--momentum applies to --optimizer sgd, not {args.optimizer}")
        opt_kwargs["momentum"] = args.momentum
    if args.weight_decay:
        opt_kwargs["weight_decay"] = args.weight_decay
    t0 = time.perf_counter()
    result = _run_training(args, args.method, optimizer=args.optimizer, optimizer_kwargs=opt_kwargs,
                           output_dir=args.out, model_name=args.model, budget=args.budget, resume=args.resume,
                           extra={"lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps,
                                  "bn_policy": args.bn_policy})
    print(f"test acc {result['test_acc']:.4f}  queries {result['queries']:,}  steps {result['steps']}  "
          f"wall {time.perf_counter() - t0:.1f}s  ({result['stop_reason']}); metrics in {args.out / 'metrics.jsonl'}")
    summary = {k: v for k, v in result.items() if k != "history"}
    _write_json(args.json, summary)
    return 0


def _write_json(path: Path | None, data: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"summary written to {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return {"demo": cmd_demo, "train": cmd_train}[args.command](args)
    except ZOError as exc:
        print(f"zoblackbox: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
