"""The recipes live in one module, ``zoblackbox.recipes``; the old paths that remain are the same objects."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from zoblackbox import recipes
from zoblackbox.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]

RECIPE_NAMES = ("DIGITS_CNN_RECIPE", "DEEPZERO_RECIPE", "Recipe", "RECIPES", "DenoisingRecipe", "TrainedPipeline",
                "PIPELINES", "REFERENCE_PIPELINES", "build_pipelines", "CNN_RECIPE", "CNN_BUDGET_SPARSITY")


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_is_importable_from_recipes(name):
    assert getattr(recipes, name) is not None
    assert name in recipes.__all__


def test_module_docstring_names_every_recipe():
    doc = recipes.__doc__
    for name in ("DIGITS_CNN_RECIPE", "DEEPZERO_RECIPE", "RECIPES", "DenoisingRecipe", "build_pipelines",
                 "CNN_RECIPE", "CNN_BUDGET_SPARSITY"):
        assert name in doc, name


def test_old_paths_are_the_same_objects():
    from zoblackbox import cli, cli_pde

    assert cli.DEEPZERO_RECIPE is recipes.DEEPZERO_RECIPE
    assert cli_pde.RECIPES is recipes.RECIPES
    assert cli_pde.Recipe is recipes.Recipe
    assert cli.DEMO_DEFAULTS == {**recipes.DIGITS_CNN_RECIPE, "threads": 1}
    assert list(cli.DEMO_DEFAULTS) == ["epochs", "lr", "batch_size", "mu", "seed", "threads"]


def test_certify_recipe_left_the_adapter():
    """adapters/ sits below the recipes: the certify recipe is no longer there (no re-export either)."""
    from zoblackbox.adapters import blackbox

    for name in ("DenoisingRecipe", "TrainedPipeline", "build_pipelines", "PIPELINES", "REFERENCE_PIPELINES"):
        assert not hasattr(blackbox, name), name


def test_denoising_recipe_scaled_halves_epochs():
    r = recipes.DenoisingRecipe()
    half = r.scaled(0.5)
    epochs = ("classifier_epochs", "mse_epochs", "fo_epochs", "ae_epochs", "zo_ae_epochs", "sparse_epochs")
    for key in epochs:
        assert getattr(half, key) == max(1, round(getattr(r, key) * 0.5)), key
    assert (half.mse_epochs, half.fo_epochs, half.zo_ae_epochs, half.sparse_epochs) == (500, 50, 15, 5)
    others = {f.name for f in dataclasses.fields(r)} - set(epochs)
    assert all(getattr(half, k) == getattr(r, k) for k in others)
    assert r.mse_epochs == 1000  # the original is unchanged
    assert r.scaled(1e-6).zo_ae_epochs == 1  # at least one epoch
    with pytest.raises(ConfigError):
        r.scaled(0)


def test_build_pipelines_rejects_unknown_names_and_fo_without_classifier():
    import torch

    images = torch.rand(4, 1, 8, 8)
    with pytest.raises(ConfigError, match="unknown pipeline"):
        recipes.build_pipelines(["nope"], None, images)
    with pytest.raises(ConfigError, match="fo-stability"):
        recipes.build_pipelines(["fo-stability"], None, images)


def test_train_recipe_deepzero_resolves_to_the_recipe():
    from zoblackbox.cli import TRAIN_DEFAULTS, build_parser, resolve_train_args

    args = resolve_train_args(build_parser().parse_args(
        ["train", "--task", "cifar10", "--data", "unused", "--recipe", "deepzero"]))
    for key, value in recipes.DEEPZERO_RECIPE.items():
        assert getattr(args, key) == value, key
    assert args.model == "resnet20"
    # an explicit option overrides the recipe; options outside it keep the defaults
    args = resolve_train_args(build_parser().parse_args(
        ["train", "--task", "cifar10", "--data", "unused", "--recipe", "deepzero", "--lr", "0.05"]))
    assert args.lr == 0.05 and args.momentum == 0.9
    args = resolve_train_args(build_parser().parse_args(["train"]))
    for key in recipes.DIGITS_CNN_RECIPE:
        assert getattr(args, key) == recipes.DIGITS_CNN_RECIPE[key] == TRAIN_DEFAULTS[key], key


def test_pde_recipe_defaults_come_from_recipes():
    import argparse

    from zoblackbox.cli_pde import recipe_from_args, register

    sub = argparse.ArgumentParser().add_subparsers(dest="command")
    register(sub)
    args = sub.choices["pde"].parse_args(["--scenario", "wake2d"])
    assert recipe_from_args(args) == recipes.RECIPES["wake2d"]


# modules allowed to define recipes at module level: the recipes module and the command line
ALLOWED = {"zoblackbox/recipes.py"}
SCANNED = ("zoblackbox", "adapters", "benchmarks")


def _is_recipe_name(name: str) -> bool:
    return name.endswith(("RECIPE", "RECIPES", "Recipe"))


def _module_level_names(tree: ast.Module):
    """``(name, line)`` of every module-level assignment, class and function (imports excluded)."""
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.lineno
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        yield sub.id, node.lineno
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id, node.lineno


def test_no_recipes_defined_outside_the_recipes_module():
    """Recipes do not creep back: outside recipes.py and cli*.py no module of zoblackbox/, adapters/
    (zoblackbox.adapters) or benchmarks/ defines a module-level name ending in RECIPE, RECIPES or Recipe."""
    found = []
    for top in SCANNED:
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" in rel or rel in ALLOWED or (top == "zoblackbox" and path.name.startswith("cli")):
                continue
            tree = ast.parse(path.read_text(), filename=rel)
            found += [f"{rel}:{line} {name}" for name, line in _module_level_names(tree) if _is_recipe_name(name)]
    assert not found, "recipes defined outside zoblackbox/recipes.py (move them there):\n  " + "\n  ".join(found)


def test_the_static_check_sees_a_recipe():
    tree = ast.parse("FOO_RECIPE = {}\nclass BarRecipe: ...\nx, MY_RECIPES = 1, {}\nimport a as B_RECIPE\n")
    assert [n for n, _ in _module_level_names(tree) if _is_recipe_name(n)] == ["FOO_RECIPE", "BarRecipe",
                                                                                 "MY_RECIPES"]
