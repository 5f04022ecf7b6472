"""Fault scenarios end to end: failure policies under load, worker loss, SIGKILL and exact resume.

Every scenario is a training run on the bundled digits, with real faults:

1. **policies** -- the black box (the loss behind ``ModuleOracle``) raises on 5% of queries,
   returns NaN/inf on 5% and hangs for 60 s on 1%. RGE (q=20) training of a digits MLP through a
   2-worker ``ProcessPoolScheduler`` with a per-query timeout, once under each of the ``retry``,
   ``inf`` and ``skip`` policies. The black box appends a line to a log file for every fault it
   injects (in whichever process evaluates the query); the trainer's failure records say how many
   failed attempts it handled.
2. **raise** -- the same black box (raising only) under the default policy: the run must stop
   with an ``OracleError`` naming the query, after exactly one injected fault.
3. **worker loss** -- CGE training; a worker process of the pool, then of a Dask LocalCluster, is
   SIGKILLed (``os.kill``) in the middle of a step, ``--kills`` times; the final parameters must be
   bitwise those of a fault-free run.
4. **resume** -- ``zoblackbox train ... --checkpoint-every-steps 1`` in a subprocess is SIGKILLed
   at a random moment after a random step, ``--resume-trials`` times, and resumed with
   ``--resume``; the final parameters must be bitwise those of an uninterrupted run.

Writes benchmarks/results/faults.json with ``queries``, ``failures_injected``,
``failures_handled``, ``runs_completed`` (and ``runs_expected``), ``resume_identical`` and
``all_match`` (injected == handled, every run completed, every resume and worker-loss run
identical, the raise run stopped naming the query), per-scenario details, the command and the
machine; and faults.png. The default run takes about 2-3 minutes on 2 cores.

Run:  python benchmarks/faults.py            (all scenarios)
      python benchmarks/faults.py --quick    (smaller runs, 1 resume trial, no Dask)
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import argparse
import collections
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import torch
from _common import bar_chart, machine_info, new_figure, save_figure, set_threads, warn_if_busy, write_json

from zoblackbox.testing import FAULT_KINDS, Beacon, FaultyLoss, WorkerKiller, injected_counts

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------- runs
def make_trainer(split, *, n, epochs, hidden, estimator, out=None, **kw):
    from zoblackbox import Trainer
    from zoblackbox.data import make_loader
    from zoblackbox.models import digits_mlp

    torch.manual_seed(0)
    model = digits_mlp(hidden=hidden)
    train = make_loader(split.x_train[:n], split.y_train[:n], 64, shuffle=True, seed=1)
    test = make_loader(split.x_test, split.y_test, 512, shuffle=False)
    return Trainer(model, train, test, estimator=estimator, epochs=epochs, output_dir=out, progress=False, **kw)


def same_params(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def policy_runs(split, work: Path, args) -> list[dict]:
    from zoblackbox import RandomEstimator
    from zoblackbox.schedule import ProcessPoolScheduler

    rows = []
    config = {"n": args.policy_images, "epochs": args.epochs, "hidden": 16, "lr": 0.1, "lr_schedule": "constant"}
    fault_free = make_trainer(split, estimator=RandomEstimator(q=20, seed=0), **config)
    fault_free_summary = fault_free.fit()
    print(f"  fault-free reference: test acc {fault_free_summary['test_acc']:.3f}")
    with ProcessPoolScheduler(n_workers=args.workers, timeout=args.timeout) as pool:
        for policy in ("retry", "inf", "skip"):
            out = work / f"policy-{policy}"
            t = make_trainer(split, out=out, estimator=RandomEstimator(q=20, seed=0), scheduler=pool,
                             oracle_kwargs={"on_failure": policy}, **config)
            t.zo.oracle.loss_fn = FaultyLoss(out / "injected.txt")
            started = time.perf_counter()
            summary = t.fit()
            wall = time.perf_counter() - started
            inj = injected_counts(out / "injected.txt")
            failures = t.zo.oracle.failures
            handled = collections.Counter()
            for f in failures:
                handled[f.kind] += f.attempts - int(f.resolved)  # failed attempts of this query
            logged = len((out / "failures.jsonl").read_text().splitlines()) if (out / "failures.jsonl").exists() else 0
            rows.append({
                "scenario": f"policy {policy}", "policy": policy, "queries": summary["queries"],
                "steps": summary["steps"], "completed": summary["stop_reason"] == "completed",
                "test_acc": summary["test_acc"], "fault_free_test_acc": fault_free_summary["test_acc"],
                # expected with retry when every failure was resolved: the same losses as without faults
                "params_identical_to_fault_free": same_params(t, fault_free), "wall_s": round(wall, 2),
                "injected": dict(inj), "injected_total": sum(inj.values()),
                # with retries, a query's record keeps the kind of its first failure only
                "handled_first_kind": dict(handled), "handled_total": sum(handled.values()),
                "failure_records": len(failures), "failures_jsonl_lines": logged,
                "resolved_by_retry": summary["failures"]["resolved_by_retry"],
            })
            print(f"  policy {policy:5s}: {summary['steps']} steps, {summary['queries']:,} queries, injected "
                  f"{dict(inj)}, handled {sum(handled.values())} failed attempts in {len(failures)} records, "
                  f"test acc {summary['test_acc']:.3f} (params identical to the fault-free run: "
                  f"{same_params(t, fault_free)}), {wall:.1f} s")
    return rows


def raise_run(split, work: Path) -> dict:
    from zoblackbox import OracleError, RandomEstimator
    from zoblackbox.schedule import SerialScheduler

    out = work / "raise"
    t = make_trainer(split, n=512, epochs=1, hidden=16, out=out, estimator=RandomEstimator(q=20, seed=0),
                     scheduler=SerialScheduler())
    t.zo.oracle.loss_fn = FaultyLoss(out / "injected.txt", nonfinite_p=0.0, hang_p=0.0)
    try:
        t.fit()
        message, index = None, None
    except OracleError as exc:
        message, index = str(exc), exc.query_index
    inj = injected_counts(out / "injected.txt")
    names = message is not None and message.startswith(f"query #{index} raised InjectedFault")
    print(f"  raise: stopped with {message!r}")
    return {"scenario": "policy raise (default)", "queries": t.queries, "stopped_with_error": message is not None,
            "error": message, "query_index": index, "error_names_the_query": names,
            "injected_total": sum(inj.values()), "handled_total": len(t.zo.oracle.failures),
            "failures_jsonl_lines": len((out / "failures.jsonl").read_text().splitlines())
            if (out / "failures.jsonl").exists() else 0}


def worker_loss_run(split, work: Path, name: str, scheduler, kills: int) -> dict:
    from zoblackbox import CoordinateEstimator

    reference = make_trainer(split, n=512, epochs=1, hidden=8, estimator=CoordinateEstimator())
    reference.fit()
    beacons = work / f"beacons-{name}"
    beacons.mkdir()
    t = make_trainer(split, n=512, epochs=1, hidden=8, estimator=CoordinateEstimator(), scheduler=scheduler)
    t.zo.oracle.loss_fn = Beacon(beacons)
    killer = WorkerKiller(t, beacons, n=kills)
    killer.start()
    started = time.perf_counter()
    try:
        summary = t.fit()
    finally:
        killer.finished.set()
        killer.join()
    wall = time.perf_counter() - started
    identical = same_params(t, reference) and t.queries == reference.queries and not t.zo.oracle.failures
    print(f"  worker loss ({name}): {len(killer.kills)} workers killed at steps "
          f"{[k.step + 1 for k in killer.kills]}, {len(killer.pids)} worker processes did work, identical: "
          f"{identical}, {wall:.1f} s")
    return {"scenario": f"worker loss {name}", "queries": summary["queries"], "steps": summary["steps"],
            "completed": summary["stop_reason"] == "completed", "kills": [{"step": k.step + 1, "pid": k.pid, "mid_step": k.mid_step} for k in killer.kills],
            "worker_processes_seen": len(killer.pids), "identical_to_fault_free": identical,
            "failed_queries": len(t.zo.oracle.failures), "wall_s": round(wall, 2)}


CLI_RUN = ["train", "--model", "mlp", "--epochs", "2", "--batch-size", "256", "--lr", "0.02", "--sparsity", "0.5",
           "--ratios", "uniform", "--mask-interval", "1", "--warmup-epochs", "0.5", "--checkpoint-every-steps", "1",
           "--threads", "1", "--no-progress"]
CLI_STEPS = 12


def latest_step(directory: Path):
    from zoblackbox.checkpoint import latest_checkpoint

    for _ in range(100):
        try:
            meta = latest_checkpoint(directory)
            return None if meta is None else json.loads(meta.read_text())["step"]
        except FileNotFoundError:
            continue
    raise RuntimeError(f"cannot read the latest checkpoint of {directory}")


def resume_runs(work: Path, trials: int, seed: int) -> list[dict]:
    from zoblackbox.checkpoint import load_checkpoint

    reference = work / "resume-reference"
    subprocess.run([sys.executable, "-m", "zoblackbox.cli", *CLI_RUN, "--out", str(reference)], cwd=REPO,
                   check=True, stdout=subprocess.DEVNULL)
    expected, ref_meta = load_checkpoint(reference / "checkpoints")
    rng = random.Random(seed)
    rows = []
    for trial in range(trials):
        run = work / f"resume-{trial}"
        after, delay = rng.randint(1, CLI_STEPS - 5), rng.uniform(0.0, 0.15)
        proc = subprocess.Popen([sys.executable, "-m", "zoblackbox.cli", *CLI_RUN, "--out", str(run)], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while (latest_step(run / "checkpoints") or 0) < after and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        killed = proc.returncode == -signal.SIGKILL
        killed_at = latest_step(run / "checkpoints")
        resumed = subprocess.run([sys.executable, "-m", "zoblackbox.cli", *CLI_RUN, "--out", str(run), "--resume"],
                                 cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        done, meta = load_checkpoint(run / "checkpoints")
        identical = (resumed.returncode == 0 and meta["step"] == ref_meta["step"]
                     and all(torch.equal(done["model"][k], expected["model"][k]) for k in expected["model"])
                     and done["oracle"]["nfev"] == expected["oracle"]["nfev"])
        print(f"  resume trial {trial}: SIGKILL {delay:.3f} s after checkpoint {after} (killed: {killed}, last "
              f"checkpoint: step {killed_at} of {CLI_STEPS}); resumed, identical: {identical}")
        rows.append({"scenario": f"resume trial {trial}", "kill_after_checkpoint": after, "delay_s": round(delay, 3),
                     "killed_by_sigkill": killed, "last_checkpoint_step": killed_at, "steps": CLI_STEPS,
                     "completed": resumed.returncode == 0, "queries": int(done["oracle"]["nfev"]),
                     "identical": identical})
    return rows


# ---------------------------------------------------------------------------------------------- report
def summarize(policies, raised, losses, resumes) -> dict:
    inj = collections.Counter()
    for r in policies:
        inj.update(r["injected"])
    inj_total = sum(r["injected_total"] for r in policies) + raised["injected_total"]
    handled_total = sum(r["handled_total"] for r in policies) + raised["handled_total"]
    kills = sum(len(r["kills"]) for r in losses)
    kills_handled = sum(len(r["kills"]) for r in losses if r["completed"] and r["identical_to_fault_free"])
    runs = policies + losses + resumes
    totals = {
        "queries": sum(r["queries"] for r in policies + losses + resumes) + raised["queries"],
        "failures_injected": inj_total + kills,
        "failures_handled": handled_total + kills_handled,
        "failures_injected_by_kind": {**dict(inj), "raise-policy": raised["injected_total"], "worker killed": kills},
        "runs_completed": sum(bool(r["completed"]) for r in runs),
        "runs_expected": len(runs),
        "resume_identical": bool(resumes) and all(r["identical"] and r["killed_by_sigkill"] for r in resumes),
        "worker_loss_identical": all(r["identical_to_fault_free"] for r in losses),
        "raise_policy_stopped_naming_the_query": raised["error_names_the_query"] and raised["injected_total"] == 1,
    }
    totals["all_match"] = (totals["failures_injected"] == totals["failures_handled"]
                           and totals["runs_completed"] == totals["runs_expected"] and totals["resume_identical"]
                           and totals["worker_loss_identical"] and totals["raise_policy_stopped_naming_the_query"])
    return totals


def plot(policies, raised, losses, resumes, totals, name: str) -> Path:
    import numpy as np

    fig, (ax1, ax2) = new_figure(ncols=2, width=5.5, height=3.8)
    labels = [r["policy"] for r in policies] + ["raise"]
    injected_rows = [r["injected"] for r in policies] + [{"exception": raised["injected_total"]}]
    handled_rows = [r["handled_first_kind"] for r in policies] + [{"exception": raised["handled_total"]}]
    xs = np.arange(len(labels))
    colors = {"exception": "#c44e52", "nonfinite": "#dd8452", "timeout": "#8172b2"}
    for offset, rows, hatch in ((-0.2, injected_rows, ""), (0.2, handled_rows, "//")):
        bottom = np.zeros(len(labels))
        for kind in FAULT_KINDS:
            heights = np.array([row.get(kind, 0) for row in rows], dtype=float)
            ax1.bar(xs + offset, heights, 0.38, bottom=bottom, color=colors[kind], hatch=hatch, edgecolor="white",
                    label=kind if offset < 0 else None)
            bottom += heights
    for x, a, b in zip(xs, injected_rows, handled_rows):
        top = max(sum(a.values()), sum(b.values()))
        ax1.annotate(f"{sum(a.values())} / {sum(b.values())}", (x, top), ha="center", va="bottom", fontsize=8)
    ax1.set_xticks(xs, labels)
    ax1.set_ylabel("faulty query attempts: injected (left) / handled (right, hatched)", fontsize=8)
    ax1.set_title("5% raise, 5% NaN/inf, 1% hang (per-query timeout)", fontsize=9)
    ax1.set_ylim(0, 1.3 * max(max(sum(r.values()) for r in injected_rows), 1))
    ax1.legend(fontsize=7, loc="upper right", ncol=3, title="kind (first failure of a query)", title_fontsize=7)
    names = [r["scenario"].replace("worker loss ", "kill ") for r in losses] + [f"resume {i}" for i in
                                                                                range(len(resumes))]
    ok = [int(r["identical_to_fault_free"]) for r in losses] + [int(r["identical"]) for r in resumes]
    bar_chart(ax2, names, ok, "bitwise identical to the fault-free run (1 = yes)",
              f"worker loss and SIGKILL + resume; all match: {totals['all_match']}")
    ax2.set_ylim(0, 1.3)
    ax2.tick_params(axis="x", labelsize=7)
    return save_figure(fig, name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="worker processes of the pool and of Dask")
    ap.add_argument("--timeout", type=float, default=0.5, help="per-query timeout of the pool, seconds")
    ap.add_argument("--epochs", type=int, default=3, help="epochs of the policy runs")
    ap.add_argument("--policy-images", type=int, default=1024, help="training images of the policy runs")
    ap.add_argument("--kills", type=int, default=3, help="worker processes killed per worker-loss run")
    ap.add_argument("--resume-trials", type=int, default=3, help="SIGKILL + resume trials")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill points of the resume trials")
    ap.add_argument("--no-dask", action="store_true", help="skip the Dask worker-loss run")
    ap.add_argument("--quick", action="store_true", help="1 epoch of 512 images, 2 kills, 1 resume trial, no Dask")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    ap.add_argument("--name", default="faults", help="results/<name>.json and .png")
    ap.add_argument("--out-dir", type=Path, default=_common.RESULTS, help="where the JSON and PNG go")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.policy_images, args.kills, args.resume_trials, args.no_dask = 1, 512, 2, 1, True
    set_threads(args.threads)
    warn_if_busy()
    _common.RESULTS = args.out_dir

    from zoblackbox.data import load_digits_split
    from zoblackbox.schedule import ProcessPoolScheduler

    split = load_digits_split(seed=0)
    work = Path(tempfile.mkdtemp(prefix="zoblackbox-faults-"))
    started = time.perf_counter()
    try:
        print("[1/4] failure policies under load (process pool, per-query timeout)")
        policies = policy_runs(split, work, args)
        print("[2/4] default policy")
        raised = raise_run(split, work)
        print("[3/4] worker loss")
        losses = []
        with ProcessPoolScheduler(n_workers=args.workers) as pool:
            losses.append(worker_loss_run(split, work, "pool", pool, args.kills))
        if not args.no_dask:
            from zoblackbox.schedule.dask_cluster import DaskScheduler

            with DaskScheduler(n_workers=args.workers) as scheduler:
                losses.append(worker_loss_run(split, work, "dask", scheduler, args.kills))
        print("[4/4] SIGKILL and resume")
        resumes = resume_runs(work, args.resume_trials, args.seed)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    totals = summarize(policies, raised, losses, resumes)
    wall = time.perf_counter() - started
    data = {**totals, "wall_s": round(wall, 1),
            "definitions": {
                "queries": "oracle queries of every run (retries included; resume trials: the final count of "
                           "the resumed run)",
                "failures_injected": "faulty query attempts logged by the black box itself (raise, NaN/inf, hang), "
                                     "plus worker processes killed",
                "failures_handled": "failed attempts in the oracles' failure records (each a counted query, a line "
                                    "of failures.jsonl), plus killed workers after which the run completed bitwise "
                                    "identical to the fault-free run",
                "runs_completed": "policy, worker-loss and resumed runs that completed (runs_expected of them)",
                "resume_identical": "every SIGKILLed-then-resumed run ended bitwise equal to the uninterrupted one",
            },
            "policies": policies, "raise": raised, "worker_loss": losses, "resume": resumes,
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "command": "python benchmarks/faults.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": machine_info()}
    path = write_json(args.name, data)
    png = plot(policies, raised, losses, resumes, totals, args.name)
    print(f"\nqueries {totals['queries']:,}  failures injected {totals['failures_injected']}  handled "
          f"{totals['failures_handled']}  runs completed {totals['runs_completed']}/{totals['runs_expected']}  "
          f"resume identical {totals['resume_identical']}  worker loss identical {totals['worker_loss_identical']}  "
          f"raise stopped naming the query {totals['raise_policy_stopped_naming_the_query']}")
    print(f"all match: {totals['all_match']}  ({wall:.0f} s)\nwrote {path} and {png}")
    return 0 if totals["all_match"] else 1


if __name__ == "__main__":
    sys.exit(main())
