"""Parallel scaling of one ZO step on an opaque, expensive oracle: serial vs process pool vs Dask.

The oracle stands in for a simulator: a numpy time-stepping loop that burns about ``--query-ms``
milliseconds of real CPU per query (no sleeping), behind a plain FunctionOracle. One forward CGE
estimate over ``--dim`` coordinates (dim + 1 queries) is timed with

* ``SerialScheduler`` (the reference),
* ``ProcessPoolScheduler(n_workers=W)``,
* ``DaskScheduler(n_workers=W)`` (a LocalCluster on 127.0.0.1),

each after one warm-up estimate (workers started, oracle shipped), ``--repeats`` times; medians
are compared. Every gradient must be bitwise equal to the serial one.

Claims checked: pool speedup (serial / pool) >= 1.7 with 2 workers on 2 cores, and Dask within
15 % of the pool (dask / pool <= 1.15).

Run:  python benchmarks/parallel_scaling.py            (about a minute on 2 cores)
      python benchmarks/parallel_scaling.py --quick    (smoke run, a few seconds of work)
Writes benchmarks/results/parallel_scaling.json and parallel_scaling.png (override with --out).
"""

from __future__ import annotations

import os

# One BLAS/OpenMP thread in this process too: the serial baseline must not use the second core.
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from zoblackbox import CoordinateEstimator, FunctionOracle
from zoblackbox.schedule import ProcessPoolScheduler, SerialScheduler

RESULTS = Path(__file__).resolve().parent / "results"
POOL_SPEEDUP_TARGET = 1.7
DASK_VS_POOL_TARGET = 1.15


class BusySimulator:
    """A deterministic stand-in for an expensive simulator: ``steps`` nonlinear updates of a state.

    Pure CPU work in numpy (a small matrix-vector product per step), so it holds one core for the
    whole query, like a real solver, and its cost is set by ``steps``.
    """

    def __init__(self, dim: int, steps: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.W = rng.standard_normal((dim, dim)) / np.sqrt(dim)
        self.steps = int(steps)

    def __call__(self, x: np.ndarray) -> float:
        v = np.array(x, dtype=np.float64)
        for _ in range(self.steps):
            v = np.tanh(self.W @ v + x)
        return float(v @ v + 0.5 * x @ x)


def calibrate(dim: int, query_ms: float) -> tuple[int, float]:
    """Steps for a query of about ``query_ms`` milliseconds, and the measured milliseconds."""
    x = np.linspace(-1, 1, dim)
    probe = BusySimulator(dim, 2000)
    probe(x)
    t = time.perf_counter()
    probe(x)
    per_step = (time.perf_counter() - t) / probe.steps
    steps = max(1, round(query_ms / 1e3 / per_step))
    sim = BusySimulator(dim, steps)
    samples = []
    for _ in range(5):
        t = time.perf_counter()
        sim(x)
        samples.append(time.perf_counter() - t)
    return steps, 1e3 * statistics.median(samples)


class CpuMeter:
    """CPU used by *other* processes while a phase runs, in cores (needs psutil; ``None`` without).

    Busy CPU time of the whole machine minus that of this process and its children (the workers):
    anything well above 0 means another program competed for the cores and the phase is suspect.
    """

    def __init__(self):
        try:
            import psutil
        except ImportError:
            psutil = None
        self.psutil = psutil

    def _sample(self):
        ps = self.psutil
        total = ps.cpu_times()
        busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
        me = ps.Process()
        ours = sum(me.cpu_times()[:2])
        for child in me.children(recursive=True):
            try:
                ours += sum(child.cpu_times()[:2])
            except ps.Error:  # exited meanwhile
                continue
        return time.perf_counter(), busy, ours

    def start(self):
        self._start = self._sample() if self.psutil else None

    def others(self) -> float | None:
        if self._start is None:
            return None
        (t0, busy0, ours0), (t1, busy1, ours1) = self._start, self._sample()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0))


def time_estimates(scheduler, oracle, x, repeats: int) -> tuple[float, list[float], list[torch.Tensor], float]:
    """Seconds of the warm-up estimate and of each timed estimate, the gradients, other CPU load."""
    estimator = CoordinateEstimator(mu=1e-3)
    t = time.perf_counter()
    grads = [estimator.estimate(oracle, x, scheduler=scheduler).grad]
    warmup = time.perf_counter() - t
    meter = CpuMeter()
    meter.start()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        grads.append(estimator.estimate(oracle, x, scheduler=scheduler).grad)
        times.append(time.perf_counter() - t)
    return warmup, times, grads, meter.others()


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not on Windows
        return None


def machine_info() -> dict:
    info = {
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
    }
    try:
        import dask
        import distributed

        info["dask"], info["distributed"] = dask.__version__, distributed.__version__
    except ImportError:
        info["dask"] = None
    return info


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in ("serial", "pool", "dask") if result["timings"].get(n)]
    labels = {"serial": "serial", "pool": f"process pool\n({result['workers']} workers)",
              "dask": f"Dask LocalCluster\n({result['workers']} workers)"}
    medians = [result["median_s"][n] for n in names]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bars = ax.bar([labels[n] for n in names], medians, color=["#888888", "#3b75af", "#e0803a"][:len(names)])
    for i, n in enumerate(names):
        ax.scatter([i] * len(result["timings"][n]), result["timings"][n], color="black", s=10, zorder=3)
    for bar, n in zip(bars, names):
        note = f"{result['median_s'][n]:.3f} s"
        if n == "pool":
            note += f"\n{result['pool_speedup']:.2f}x serial"
        if n == "dask":
            note += f"\n{result['dask_vs_pool']:.2f}x pool time"
        top = max(bar.get_height(), *result["timings"][n])
        ax.annotate(note, (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom",
                    fontsize=9, xytext=(0, 4), textcoords="offset points")
    cfg = result["config"]
    ax.set_ylabel("seconds per CGE estimate (median)")
    ax.set_title(f"One CGE step, d={cfg['dim']} ({cfg['queries']} queries of {cfg['query_ms_measured']:.0f} ms), "
                 f"{result['machine']['cpu_count']} CPUs", fontsize=10)
    ax.set_ylim(0, max(max(t) for t in result["timings"].values()) * 1.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", type=int, default=48, help="parameters (queries per step = dim + 1)")
    parser.add_argument("--query-ms", type=float, default=20.0, help="CPU milliseconds per query")
    parser.add_argument("--workers", type=int, default=2, help="worker processes of the pool and of Dask")
    parser.add_argument("--repeats", type=int, default=9, help="timed estimates per scheduler")
    parser.add_argument("--no-dask", action="store_true", help="skip the Dask measurement")
    parser.add_argument("--quick", action="store_true", help="small smoke run (dim 16, 3 repeats)")
    parser.add_argument("--out", type=Path, default=RESULTS / "parallel_scaling.json", help="JSON path")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.repeats = 16, 3
    for name in ("dim", "workers", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if not args.query_ms > 0:
        parser.error(f"--query-ms must be positive, got {args.query_ms}")

    torch.set_num_threads(1)
    load_before = _load_average()
    steps, query_ms = calibrate(args.dim, args.query_ms)
    sim = BusySimulator(args.dim, steps)
    x = torch.linspace(-0.5, 0.5, args.dim, dtype=torch.float64)
    print(f"oracle: {query_ms:.1f} ms per query ({steps} steps), d={args.dim}, {args.dim + 1} queries per step")

    def oracle():
        return FunctionOracle(sim, dim=args.dim, numpy=True, dtype=torch.float64)

    timings, warmups, grads, others = {}, {}, {}, {}

    def measure(name, scheduler):
        warmups[name], timings[name], grads[name], others[name] = time_estimates(scheduler, oracle(), x, args.repeats)
        load = "" if others[name] is None else f", other programs used {others[name]:.2f} cores"
        print(f"{name + ':':7} median {statistics.median(timings[name]):.3f} s "
              f"(first estimate {warmups[name]:.2f} s{load})")

    measure("serial", SerialScheduler())
    with ProcessPoolScheduler(n_workers=args.workers) as pool:
        measure("pool", pool)
    if not args.no_dask:
        from zoblackbox.schedule import DaskScheduler

        with DaskScheduler(n_workers=args.workers) as dask_scheduler:
            measure("dask", dask_scheduler)

    reference = grads["serial"][0]
    identical = all(torch.equal(g, reference) for gs in grads.values() for g in gs)
    median = {k: statistics.median(v) for k, v in timings.items()}
    pool_speedup = median["serial"] / median["pool"]
    dask_vs_pool = median["dask"] / median["pool"] if "dask" in median else None
    result = {
        "benchmark": "parallel_scaling",
        "command": "python benchmarks/parallel_scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "workers": args.workers,
        "pool_speedup": pool_speedup,
        "dask_vs_pool": dask_vs_pool,
        "identical_grads": identical,
        "targets": {"pool_speedup_min": POOL_SPEEDUP_TARGET, "dask_vs_pool_max": DASK_VS_POOL_TARGET,
                    "pool_speedup_met": pool_speedup >= POOL_SPEEDUP_TARGET,
                    "dask_vs_pool_met": None if dask_vs_pool is None else dask_vs_pool <= DASK_VS_POOL_TARGET},
        "config": {"dim": args.dim, "queries": args.dim + 1, "estimator": "CoordinateEstimator(mu=1e-3, forward)",
                   "query_ms_target": args.query_ms, "query_ms_measured": query_ms, "simulator_steps": steps,
                   "repeats": args.repeats, "compute_threads_per_worker": 1},
        "median_s": median,
        "warmup_s": warmups,
        "timings": timings,
        "machine": machine_info(),
        # other programs on the machine skew the timings: cores they used during each timed phase
        "other_load_cores": others,
        "load_average_1m": {"before": load_before, "after": _load_average()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, args.out.with_suffix(".png"))
    print(f"pool speedup {pool_speedup:.2f}x (target >= {POOL_SPEEDUP_TARGET}); "
          + (f"dask/pool {dask_vs_pool:.3f} (target <= {DASK_VS_POOL_TARGET}); " if dask_vs_pool else "")
          + f"identical gradients: {identical}")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
