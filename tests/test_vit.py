"""The digits ViT: shapes, parameter count, bad sizes, and ZO training through the normal CLI."""

import json

import pytest
import torch
import torch.nn.functional as F

from zoblackbox import CoordinateEstimator
from zoblackbox.adapters import ModuleOracle
from zoblackbox.cli import main
from zoblackbox.errors import ConfigError
from zoblackbox.models import MODELS, ViT, count_params, digits_vit
from zoblackbox.schedule import SerialScheduler, VectorizedScheduler


def test_default_digits_vit_shape_and_size():
    torch.manual_seed(0)
    model = digits_vit()
    assert count_params(model) == 5018
    assert model(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert MODELS["vit"] is digits_vit


@pytest.mark.parametrize("patch, tokens", [(2, 17), (4, 5), (8, 2)])
def test_patch_sizes_give_the_token_count(patch, tokens):
    model = ViT(8, patch, dim=8, depth=1, heads=2, mlp=8)
    assert model.pos.shape == (1, tokens, 8)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def test_attention_is_permutation_equivariant_without_positions():
    """Self-attention without the positional embedding: permuting tokens permutes the output."""
    torch.manual_seed(0)
    block = digits_vit().blocks[0]
    x = torch.randn(2, 5, 16)
    perm = torch.tensor([3, 0, 4, 1, 2])
    assert torch.allclose(block(x)[:, perm], block(x[:, perm]), atol=1e-6)


@pytest.mark.parametrize("kwargs, needle", [
    ({"patch": 3}, "patch 3 does not divide"),
    ({"dim": 10, "heads": 4}, "dim 10 is not divisible by heads 4"),
    ({"depth": 0}, "'depth': 0"),
    ({"mlp": 2.5}, "'mlp': 2.5"),
    ({"heads": True}, "'heads': True"),
])
def test_bad_sizes_are_refused(kwargs, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(")):
        ViT(8, **{"patch": 4, "dim": 16, "depth": 1, "heads": 2, "mlp": 8, **kwargs})


def test_cge_gradient_matches_autograd_in_float64():
    torch.manual_seed(0)
    model = digits_vit(dim=8, heads=2, mlp=8, depth=1).double()
    x, y = torch.randn(16, 1, 8, 8, dtype=torch.float64), torch.randint(0, 10, (16,))
    oracle = ModuleOracle(model, F.cross_entropy, batch=(x, y))
    grad = CoordinateEstimator(mu=1e-6, scheme="central").estimate(oracle, oracle.get_params(),
                                                                   scheduler=VectorizedScheduler()).grad
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    exact = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert float((grad - exact).norm() / exact.norm()) < 1e-6
    # at the tables' step (rounding of the loss divided by mu stays far below 1e-10 of the gradient)
    fast, serial = (CoordinateEstimator(mu=5e-3).estimate(oracle, oracle.get_params(), scheduler=s).grad
                    for s in (VectorizedScheduler(), SerialScheduler()))
    assert float((fast - serial).norm() / serial.norm()) < 1e-10


def test_cli_trains_the_vit_with_zo(tmp_path):
    out = tmp_path / "vit"
    rc = main(["train", "--model", "vit", "--epochs", "1", "--batch-size", "512", "--lr", "0.003", "--out", str(out),
               "--json", str(tmp_path / "r.json"), "--no-progress", "--sparsity", "0.9", "--ratios", "uniform"])
    assert rc == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["params"] == 5018
    assert result["steps"] == 3 and result["queries"] > 0
    assert result["queries"] < 3 * 5019 / 5  # sparse: far fewer than dense CGE's 5,019 per step
