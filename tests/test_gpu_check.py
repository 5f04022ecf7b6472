"""benchmarks/gpu_check.py in its --tiny CPU mode: the JSON's structure and the gradients' agreement."""

import json
import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # appended: benchmarks/mujoco.py must not shadow the mujoco package
import gpu_check


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    returned = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    written = json.loads(out.read_text())
    return returned, written


def test_the_json_has_every_field(report):
    returned, written = report
    assert written["benchmark"] == "gpu_check" and written["device"] == "cpu" and written["device_name"] == "cpu"
    assert written["torch"] and written["dtype"] == "float32" and written["batch"] == 4
    assert written["speedup_target"] == 10.0 and written["target_met"] is None  # no GPU: not judged
    assert list(written["tf32"]) == ["n/a"]  # TF32 is a CUDA setting
    run = written["tf32"]["n/a"]
    assert run["plain_loop"]["timed_coords"] == 8 and run["reuse"]["coords"] == written["coords"] == 64
    for method in ("plain_loop", "reuse"):
        assert run[method]["queries_per_second"] > 0 and run[method]["seconds"] > 0
    assert run["speedup"] == pytest.approx(run["reuse"]["queries_per_second"] / run["plain_loop"]["queries_per_second"])
    assert run["reuse_grad_finite"] is True
    assert written["tf32"]["n/a"]["rel_l2_vs_float64"] == returned["tf32"]["n/a"]["rel_l2_vs_float64"]


def test_the_gradients_agree(report):
    _, written = report
    # float64: the plain loop and the scheduler's reference agree to rounding
    assert written["float64_reference"]["plain_loop_float64_vs_reference"] <= 1e-10
    # float32: forward differences of float32 losses (mu = 5e-3) are off by rounding only (about 1e-3 here)
    run = written["tf32"]["n/a"]
    assert max(run["rel_l2_vs_float64"].values()) <= 2e-2
    assert run["rel_l2_reuse_vs_plain_loop"] <= 2e-2
