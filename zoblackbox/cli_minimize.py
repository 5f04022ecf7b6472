"""``zoblackbox minimize``: minimize an external program that speaks the JSON-lines protocol.

The program reads ``{"id": N, "x": [...]}`` lines on stdin and answers ``{"id": N, "loss": L}``
lines on stdout (:mod:`zoblackbox.adapters.process`). This command runs :func:`zoblackbox.minimize`
on it, optionally with ``--workers`` copies of the program in parallel and a ``--checkpoint``
directory, so that a run killed after hours continues where it was::

    zoblackbox minimize --program "python sim.py --mesh fine" --dim 12 --budget 5000 \\
        --workers 4 --checkpoint runs/sim --log runs/sim.jsonl --json runs/sim-result.json
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path

from .cli_args import bound_float, fail_nonfinite, finite_float, positive_float, positive_int, seed_int, thread_count
from .errors import ConfigError

__all__ = ["cmd_minimize", "register"]

ESTIMATORS = ("auto", "cge", "central", "rge")
OPTIMIZERS = ("auto", "adam", "adamw", "sgd", "signsgd", "lbfgs")


def register(sub) -> None:
    """Add the ``minimize`` sub-command to ``zoblackbox``'s parser."""
    p = sub.add_parser("minimize", help="minimize an external program (JSON lines over stdin/stdout)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--program", required=True,
                   help="the command to run, as one string split like a shell would (no shell is used)")
    p.add_argument("--dim", type=positive_int, required=True, help="length of the parameter vector")
    p.add_argument("--budget", type=positive_int, default=None, help="most queries of the program")
    p.add_argument("--maxiter", type=positive_int, default=None, help="most iterations")
    p.add_argument("--x0", type=finite_float, nargs="+", default=None, metavar="X",
                   help="starting point (dim numbers; default all zeros)")
    p.add_argument("--x0-file", type=Path, default=None, metavar="PATH", help="starting point as a JSON list")
    p.add_argument("--estimator", choices=ESTIMATORS, default="auto", help="gradient estimator")
    p.add_argument("--mu", type=positive_float, default=None, help="finite-difference step (default per estimator)")
    p.add_argument("--q", type=positive_int, default=20, help="RGE directions per estimate")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="auto",
                   help="update rule; auto (default): the zero-configuration strategy of zoblackbox.minimize, or adam "
                        "when --estimator, --mu or --lr is given")
    p.add_argument("--lr", type=positive_float, default=None, help="learning rate (default 1e-2; 1 for lbfgs)")
    p.add_argument("--bounds", type=bound_float, nargs=2, default=None, metavar=("LOWER", "UPPER"),
                   help="box for every coordinate (LOWER < UPPER; -inf/inf allowed)")
    p.add_argument("--workers", type=positive_int, default=1, help="copies of the program evaluating in parallel")
    p.add_argument("--timeout", type=positive_float, default=60.0, help="seconds one query may take")
    p.add_argument("--on-failure", choices=("raise", "inf", "skip", "retry"), default="raise",
                   help="what a failed query does (default: stop with an error naming it)")
    p.add_argument("--checkpoint", type=Path, default=None, metavar="DIR",
                   help="checkpoint directory: a run killed and started again with it continues")
    p.add_argument("--checkpoint-every", type=positive_int, default=1, help="iterations between checkpoints")
    p.add_argument("--log", type=Path, default=None, metavar="PATH", help="one JSON line per iteration")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the result as JSON")
    p.add_argument("--seed", type=seed_int, default=0, help="seed of the random directions (0 <= seed < 2**63)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--threads", type=thread_count, default=None, help="torch intra-op threads")
    p.set_defaults(handler=cmd_minimize)


def _x0(args) -> list[float]:
    if args.x0 is not None and args.x0_file is not None:
        raise ConfigError("give --x0 or --x0-file, not both")
    if args.x0_file is not None:
        try:
            x0 = json.loads(args.x0_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"--x0-file {str(args.x0_file)!r} is not a readable JSON list: {exc}") from exc
    elif args.x0 is not None:
        x0 = args.x0
    else:
        return [0.0] * args.dim
    if not isinstance(x0, list) or len(x0) != args.dim or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in x0):
        raise ConfigError(f"the starting point must be {args.dim} numbers (--dim), got {str(x0)[:80]}")
    try:
        values = [float(v) for v in x0]
    except OverflowError:
        values = [math.inf]
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"the starting point must be finite numbers, got {str(x0)[:80]}")
    return values


def _estimator(args):
    from .estimators import CoordinateEstimator, RandomEstimator

    if args.estimator == "auto":
        if args.mu is not None:
            raise ConfigError("--mu needs an explicit --estimator (cge, central or rge)")
        return "auto"
    kw = {} if args.mu is None else {"mu": args.mu}
    if args.estimator == "rge":
        return RandomEstimator(q=args.q, seed=args.seed, **kw)
    return CoordinateEstimator(scheme="central" if args.estimator == "central" else "forward", **kw)


def cmd_minimize(args) -> int:
    import numpy as np

    from .adapters.process import ProcessOracle
    from .optim import minimize
    from .schedule import ProcessPoolScheduler

    try:
        command = shlex.split(args.program)
    except ValueError as exc:
        raise ConfigError(f"--program {args.program!r} cannot be split into words: {exc}") from exc
    if not command:
        raise ConfigError("--program is empty")
    if args.budget is None and args.maxiter is None:
        raise ConfigError("give --budget (queries) or --maxiter (iterations), or both")
    if args.bounds is not None and not args.bounds[0] < args.bounds[1]:
        raise ConfigError(f"--bounds needs LOWER < UPPER, got {args.bounds[0]} {args.bounds[1]}")
    x0 = np.asarray(_x0(args), dtype=np.float64)
    estimator = _estimator(args)  # its errors come before the program starts
    oracle = ProcessOracle(command, args.dim, timeout=args.timeout, on_failure=args.on_failure)
    scheduler = ProcessPoolScheduler(args.workers, timeout=args.timeout) if args.workers > 1 else None
    try:
        res = minimize(oracle, x0, estimator=estimator, optimizer=args.optimizer, lr=args.lr,
                       budget=args.budget, maxiter=args.maxiter, scheduler=scheduler, seed=args.seed,
                       bounds=None if args.bounds is None else tuple(args.bounds), progress=not args.no_progress,
                       log=args.log, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every)
    finally:
        if scheduler is not None:
            scheduler.close()
        close = getattr(oracle, "close", None)
        if callable(close):
            close()
    print(res)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"x": res.x.tolist(), "fun": res.fun, "nfev": res.nfev, "nit": res.nit,
                                         "success": res.success, "message": res.message,
                                         "failures": res.failures,
                                         **({"strategy": res.strategy} if getattr(res, "strategy", None) else {})},
                                        indent=2))
    if fail_nonfinite({"fun": res.fun}, "the program returned non-finite losses (see --on-failure) or the steps "
                      "diverged (try a smaller --lr)"):
        return 1
    return 0 if res.success else 1


if __name__ == "__main__":  # pragma: no cover
    parser = argparse.ArgumentParser(prog="zoblackbox")
    register(parser.add_subparsers(dest="command", required=True))
    parsed = parser.parse_args()
    sys.exit(parsed.handler(parsed))
