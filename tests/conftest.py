"""Shared fixtures: deterministic seeds and small float64 problems with known gradients."""

import pytest
import torch

# One intra-op thread: the suite's timings stay stable when the machine is shared (two OpenMP
# threads competing with another process for two cores measured 10-60x slower here), and worker
# processes of the pool/Dask tests do not oversubscribe the cores.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def quadratic():
    """f(x) = 0.5 x^T A x + b^T x in float64, with its analytic gradient."""
    g = torch.Generator().manual_seed(1)
    d = 12
    M = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = M @ M.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)

    def f(x):
        x = torch.as_tensor(x, dtype=torch.float64)
        return float(0.5 * x @ A @ x + b @ x)

    def grad(x):
        return A @ torch.as_tensor(x, dtype=torch.float64) + b

    return f, grad, d, A, b
