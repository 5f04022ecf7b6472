"""Helpers shared by the benchmark scripts: machine info, timing, the naive reference loop,
JSON results and plots (matplotlib with the Agg backend, no display needed)."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.func import functional_call

from zoblackbox.schedule.vectorized import module_batch

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    """Where a benchmark ran: CPU, cores, torch threads, load, accelerator, versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return info


def warn_if_busy() -> None:
    """Say so when other processes load the machine: timings of a shared CPU are then unreliable."""
    if hasattr(os, "getloadavg"):
        load, cores = os.getloadavg()[0], os.cpu_count() or 1
        if load > cores:
            print(f"note: 1-minute load average {load:.2f} on {cores} cores -- other processes are running, "
                  "timings will be slower and noisier than on an idle machine", file=sys.stderr)


def set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            raise SystemExit(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall-clock seconds of one call of ``fn`` (CUDA work included) and its result."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def interleaved_medians(methods: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict:
    """Median seconds per call of every method, run side by side (one round of all methods per
    repeat, so a load spike on a shared machine hits all of them alike).

    Returns ``{name: {"median_s", "times_s", "result"}}`` (the result of the last call).
    """
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, object] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            seconds, results[name] = timed(fn)
            times[name].append(seconds)
    return {name: {"median_s": statistics.median(ts), "times_s": ts, "result": results[name]}
            for name, ts in times.items()}


def naive_cge_losses(oracle, x: torch.Tensor, coords: torch.Tensor, mu: float) -> tuple[float, torch.Tensor]:
    """The fair serial reference: the base loss and, per coordinate, one ordinary forward with an
    out-of-place copy of the one perturbed tensor (``functional_call``, no autograd, the oracle's
    query mode for BatchNorm/dropout).

    Returns ``(f0, losses)`` with ``losses[j]`` the loss at ``x + step_j e_{coords[j]}``, where
    ``step_j = (x_j + mu) - x_j`` is the realized step (as in ``CoordinateEstimator``).
    """
    inputs, targets = module_batch(oracle)
    layout = oracle.layout
    params = layout.unflatten(x)
    names = [layout.names[t] for t in layout.block_index(coords).tolist()]
    starts = layout.offsets
    index = {n: i for i, n in enumerate(layout.names)}
    out = torch.empty(coords.shape[0], dtype=torch.float64)
    with torch.no_grad(), oracle.query_mode():
        f0 = float(oracle.loss_fn(functional_call(oracle.model, params, (inputs,)), targets))
        for j, (c, name) in enumerate(zip(coords.tolist(), names)):
            p = params[name].clone()
            p.view(-1)[c - starts[index[name]]] += mu
            out[j] = float(oracle.loss_fn(functional_call(oracle.model, {**params, name: p}, (inputs,)), targets))
    return f0, out


def realized_steps(x: torch.Tensor, coords: torch.Tensor, mu: float) -> torch.Tensor:
    xc = x[coords]
    return ((xc + mu) - xc).to(torch.float64)


def digits_validation_split():
    """The bundled digits' training images cut into train / validation (25%, stratified,
    random_state 1), for choosing settings; the test images are left unused."""
    from sklearn.model_selection import train_test_split

    from zoblackbox.data import Split, load_digits_split

    split = load_digits_split(seed=0)
    x_tr, x_va, y_tr, y_va = train_test_split(split.x_train.numpy(), split.y_train.numpy(), test_size=0.25,
                                              random_state=1, stratify=split.y_train.numpy())
    return Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr), torch.from_numpy(x_va), torch.from_numpy(y_va),
                 split.num_classes, f"validation split of the digits training images: {len(y_tr)} train / "
                                    f"{len(y_va)} validation (stratified, random_state=1); test images unused")


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.to(torch.float64).cpu(), b.to(torch.float64).cpu()
    return float((a - b).norm() / b.norm())


def write_json(name: str, data: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return path


def new_figure(ncols: int = 1, width: float = 6.0, height: float = 4.0):
    """A matplotlib figure and axes on the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height))
    return fig, axes


def save_figure(fig, name: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def bar_chart(ax, labels: list[str], values: list[float], ylabel: str, title: str, fmt: str = "{:.0f}") -> None:
    bars = ax.bar(labels, values, color=["#999999", "#4c72b0", "#55a868", "#c44e52", "#8172b2"][:len(labels)])
    for bar, v in zip(bars, values):
        ax.annotate(fmt.format(v), (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center", va="bottom", fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
