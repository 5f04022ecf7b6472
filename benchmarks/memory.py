"""Peak memory and seconds per step: batched RGE vs seed-replay RGE vs first-order training.

A plain MLP of about 50M float32 parameters (201 MB) on the CPU, batch 32. Each method runs in a
fresh subprocess so that peaks do not mix; the peak resident set (Linux ``VmHWM``) is reset with
``/proc/self/clear_refs`` once the model and the engine are built, so ``step_peak_mb`` is the peak
of the training steps alone (``process_peak_mb`` keeps the whole process, construction included).

* ``batched``: ``RandomEstimator(q)`` (Gaussian) + the engine's SGD rule: a ``(q, d)`` direction
  matrix, dense points and a dense gradient;
* ``replay``: ``SeedReplayEstimator(q)`` + ``SeedReplaySGD``: seeds, one scratch buffer, the
  update from the seeds; the model's parameters are made views of the engine's iterate, so the
  weights exist once (plus the engine's copy of ``x0`` for its exact ``state_dict``);
* ``first_order``: autograd + ``torch.optim.SGD`` on the same model and batch.

Usage::

    python benchmarks/memory.py            (50M parameters, q = 16: about 4 minutes)
    python benchmarks/memory.py --quick    (5M parameters, q = 16: under a minute)
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_info, new_figure, save_figure, set_threads, warn_if_busy, write_json
from torch import nn

from zoblackbox import AskTell, RandomEstimator, SeedReplayEstimator, SeedReplaySGD
from zoblackbox.adapters import ModuleOracle

METHODS = ("first_order", "replay", "batched")


def build_model(width: int, in_features: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, width), nn.ReLU(), nn.Linear(width, in_features), nn.ReLU(),
                         nn.Linear(in_features, 10))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def child(method: str, width: int, in_features: int, q: int, steps: int, batch: int) -> dict:
    model = build_model(width, in_features)
    n_params = sum(p.numel() for p in model.parameters())
    inputs, targets = torch.randn(batch, in_features), torch.randint(0, 10, (batch,))
    if method == "first_order":
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(inputs), targets).backward()
            opt.step()
    else:
        oracle = ModuleOracle(model, F.cross_entropy, batch=(inputs, targets))
        if method == "replay":
            engine = AskTell(oracle.get_params(), estimator=SeedReplayEstimator(mu=1e-3, q=q, seed=0),
                             optimizer=SeedReplaySGD(lr=1e-4), evaluate_final=False)
            with torch.no_grad():  # the module's weights become views of the iterate: one copy of them
                for p, view in zip(model.parameters(), oracle.layout.unflatten(engine.rule.x).values()):
                    p.data = view
        else:
            engine = AskTell(oracle.get_params(), estimator=RandomEstimator(mu=1e-3, q=q, seed=0), optimizer="sgd",
                             lr=1e-4, evaluate_final=False)

        def step():
            engine.step(oracle)
    build_peak = _status_kb("VmHWM")
    _reset_peak()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"method": method, "n_params": n_params, "param_mb": n_params * 4 / 2**20,
            "step_peak_mb": _status_kb("VmHWM") / 1024, "build_peak_mb": build_peak / 1024,
            "rss_after_mb": _status_kb("VmRSS") / 1024,
            "s_per_step": statistics.median(times[1:] if len(times) > 1 else times), "times": times}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 5M-parameter model (under a minute)")
    ap.add_argument("--q", type=int, default=16, help="directions per estimate (default 16)")
    ap.add_argument("--steps", type=int, default=3, help="steps per method (the first is not timed)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--name", default="memory")
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--width", type=int, default=4096, help=argparse.SUPPRESS)
    ap.add_argument("--in-features", type=int, default=2048, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = build_parser().parse_args()
    set_threads(args.threads)
    if args.quick:
        args.width, args.in_features = 1280, 640
    if args.child:
        print(json.dumps(child(args.child, args.width, args.in_features, args.q, args.steps, 32)))
        return
    warn_if_busy()
    rows = {}
    for method in METHODS:
        cmd = [sys.executable, __file__, "--child", method, "--q", str(args.q), "--steps", str(args.steps),
               "--width", str(args.width), "--in-features", str(args.in_features)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        rows[method] = json.loads(out)
        r = rows[method]
        print(f"{method:12s} step peak {r['step_peak_mb']:8.0f} MB  build peak {r['build_peak_mb']:7.0f} MB  "
              f"{r['s_per_step']:7.2f} s/step", flush=True)
    param_mb = rows["replay"]["param_mb"]
    # activations of the batch: the first-order step's peak above its weights and gradient is an upper bound
    baseline = rows["first_order"]["build_peak_mb"]  # interpreter + torch + model + data, before any step
    replay_over = rows["replay"]["step_peak_mb"]
    result = {
        "benchmark": "memory", "quick": args.quick, "q": args.q, "batch": 32, "n_params": rows["replay"]["n_params"],
        "param_mb": param_mb, "rows": rows,
        "replay_peak_over_param_bytes": replay_over / param_mb,
        "replay_peak_minus_runtime_over_param_bytes": (replay_over - (baseline - param_mb)) / param_mb,
        "replay_over_batched": replay_over / rows["batched"]["step_peak_mb"],
        "targets": {"replay <= 2.5x params (+ activations)": None, "replay <= batched / 4": None},
        "machine": machine_info(),
    }
    result["targets"]["replay <= batched / 4"] = result["replay_over_batched"] <= 0.25
    result["targets"]["replay <= 2.5x params (+ activations)"] = \
        result["replay_peak_minus_runtime_over_param_bytes"] <= 2.5
    path = write_json(args.name, result)
    fig, axes = new_figure(2, width=5.0)
    labels = list(METHODS)
    axes[0].bar(labels, [rows[m]["step_peak_mb"] for m in labels], color=["#999999", "#55a868", "#c44e52"])
    axes[0].axhline(param_mb, color="k", ls="--", lw=1, label="parameter bytes")
    axes[0].axhline(2.5 * param_mb, color="k", ls=":", lw=1, label="2.5x parameter bytes")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("peak resident MB during steps")
    axes[0].legend()
    axes[1].bar(labels, [rows[m]["s_per_step"] for m in labels], color=["#999999", "#55a868", "#c44e52"])
    axes[1].set_ylabel("seconds per step")
    fig.suptitle(f"{rows['replay']['n_params'] / 1e6:.1f}M parameters, q={args.q}, batch 32, CPU")
    save_figure(fig, args.name)
    print(f"replay/batched peak {result['replay_over_batched']:.3f}; replay peak / param bytes "
          f"{result['replay_peak_over_param_bytes']:.2f} (minus the runtime: "
          f"{result['replay_peak_minus_runtime_over_param_bytes']:.2f}); {path}")


if __name__ == "__main__":
    main()
