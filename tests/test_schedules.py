"""zoblackbox.schedules: the one implementation of the LR schedules, against the three formulas it
replaced (the Trainer's warm-up cosine, the certify trainers' cosine, the PDE methods' cosine)."""

import math

import pytest
import torch

from zoblackbox.errors import ConfigError
from zoblackbox.schedules import Constant, WarmupCosine, schedule_from


# --------------------------------------------------------------------------- the formulas it replaced
def trainer_warmup_cosine(total_steps, warmup_steps=0, final_fraction=0.0):
    """zoblackbox.train.warmup_cosine as it was."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        t = min(1.0, (step - warmup_steps) / span)
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return factor


def blackbox_cosine(s, total_steps):
    """adapters/blackbox.py's _cosine as it was (the LambdaLR factor)."""
    return 0.5 * (1 + math.cos(math.pi * min(1.0, s / total_steps)))


def phiflow_lr_factor(schedule, t, total, final=0.1):
    """adapters/phiflow.py's _lr_factor as it was (``total`` = the run's steps)."""
    if schedule == "constant" or total <= 1:
        return 1.0
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t / (total - 1)))


# --------------------------------------------------------------------------- equivalence
def test_warmup_cosine_is_the_trainers_formula_bitwise():
    for total in range(41):
        for warmup in range(min(total, 6) + 1):
            for final in (0.0, 0.1, 0.25, 1.0):
                new, old = WarmupCosine(total, warmup, final), trainer_warmup_cosine(total, warmup, final)
                for step in range(total + 4):  # past the end too: it stays at final_fraction
                    assert new(step) == old(step), (total, warmup, final, step)


def test_warmup_cosine_is_the_certify_cosine_bitwise():
    for total in range(1, 301):
        s = WarmupCosine(total_steps=total)
        for step in range(total + 3):
            assert s(step) == blackbox_cosine(step, total), (total, step)


def test_warmup_cosine_is_the_pde_cosine_up_to_rounding():
    """The PDE cosine over a run of ``steps`` is ``WarmupCosine(max(1, steps - 1), final_fraction=0.1)``
    at every step 0..steps-1, but not bitwise: it computed ``cos(pi * t / (n - 1))``, the shared
    schedule (like the other two formulas) ``cos(pi * (t / (n - 1)))``. The roundings differ by at
    most 2.2e-16 (about a fifth of the factors differ); they are equal at the first and the last
    step and for runs of 0, 1 and 2 steps."""
    differ = total = 0
    for steps in range(400):
        s = WarmupCosine(total_steps=max(1, steps - 1), final_fraction=0.1)
        for step in range(steps):
            old, new = phiflow_lr_factor("cosine", step, steps), s(step)
            assert abs(new - old) <= 2.3e-16, (steps, step, old, new)
            differ += new != old
            total += 1
        if steps >= 1:
            assert s(0) == phiflow_lr_factor("cosine", 0, steps) == 1.0
            assert s(steps - 1) == phiflow_lr_factor("cosine", steps - 1, steps)
        if steps <= 2:
            assert [s(t) for t in range(steps)] == [phiflow_lr_factor("cosine", t, steps) for t in range(steps)]
    assert 0 < differ < total / 3


def test_constant_and_schedule_from():
    c = Constant()
    assert all(c(step) == 1.0 for step in range(0, 1000, 7))
    assert c.config() == {"schedule": "Constant"}
    assert isinstance(schedule_from("constant", 10), Constant)
    s = schedule_from("cosine", 10, warmup_steps=2, final_fraction=0.1)
    assert isinstance(s, WarmupCosine) and s.config() == {
        "schedule": "WarmupCosine", "total_steps": 10, "warmup_steps": 2, "final_fraction": 0.1}
    assert [s(t) for t in range(12)] == [trainer_warmup_cosine(10, 2, 0.1)(t) for t in range(12)]
    assert [phiflow_lr_factor("constant", t, 5) for t in range(5)] == [schedule_from("constant", 4)(t) for t in range(5)]


def test_schedule_drives_lambda_lr_like_the_formula():
    """Applied by torch's LambdaLR (as every driver does), the learning rates are the formula's."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(total_steps=7, warmup_steps=2, final_fraction=0.05))
    seen = []
    for _ in range(9):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [0.3 * trainer_warmup_cosine(7, 2, 0.05)(t) for t in range(9)]


# --------------------------------------------------------------------------- bad arguments
@pytest.mark.parametrize("kwargs, match", [
    ({"total_steps": -1}, "total_steps must be an int >= 0, got -1"),
    ({"total_steps": 2.5}, "total_steps must be an int >= 0, got 2.5"),
    ({"total_steps": True}, "total_steps must be an int >= 0, got True"),
    ({"total_steps": "10"}, "total_steps must be an int >= 0, got '10'"),
    ({"total_steps": 10, "warmup_steps": -2}, "warmup_steps must be an int >= 0, got -2"),
    ({"total_steps": 10, "warmup_steps": 1.0}, "warmup_steps must be an int >= 0, got 1.0"),
    ({"total_steps": 10, "final_fraction": 1.5}, r"final_fraction must be a number in \[0, 1\], got 1.5"),
    ({"total_steps": 10, "final_fraction": -0.1}, r"final_fraction must be a number in \[0, 1\], got -0.1"),
    ({"total_steps": 10, "final_fraction": math.nan}, r"final_fraction must be a number in \[0, 1\], got nan"),
    ({"total_steps": 10, "final_fraction": True}, r"final_fraction must be a number in \[0, 1\], got True"),
    ({"total_steps": 10, "final_fraction": "0.1"}, r"final_fraction must be a number in \[0, 1\], got '0.1'"),
])
def test_bad_arguments_name_the_value(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        WarmupCosine(**kwargs)


def test_unknown_schedule_name_is_named():
    with pytest.raises(ConfigError, match="lr schedule must be 'cosine' or 'constant', got 'linear'"):
        schedule_from("linear", 10)
    with pytest.raises(ConfigError, match="total_steps must be an int >= 0, got -3"):
        schedule_from("cosine", -3)
