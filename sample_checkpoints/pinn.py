"""The PINN samples' shared code: the MLP, three PDE families with closed-form solutions, and the
calibration protocol (load_model / batches / loss / evaluate) that `sublora prune --calib` expects.

Each `calib_*.py` next to an adapter is two lines on top of `calibration(...)` below; make_pinn.py trains
the shipped checkpoints with the very same `batches` and `loss`, so the adapters are converged for the
loss the tool differentiates.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file

HIDDEN = ["fc1", "fc2"]  # the two hidden-to-hidden layers: LoRA's target_modules
N_BATCHES, N_RES, N_BC = 4, 256, 64  # calibration set: 4 batches of 256 residual + 64 boundary points
SEED = 1234  # collocation points (fixed: the calibration set must be deterministic)
HELDOUT_SEED, N_HELDOUT = 4321, 2  # held-out collocation points: measured by the tool, never fitted


class MLP(nn.Module):
    """tanh MLP with three hidden layers (the paper's architecture at a smaller width)."""

    def __init__(self, d_in: int, width: int):
        super().__init__()
        self.fc_in = nn.Linear(d_in, width)
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.fc_out = nn.Linear(width, 1)

    def forward(self, x):
        h = torch.tanh(self.fc_in(x))
        h = torch.tanh(self.fc1(h))
        h = torch.tanh(self.fc2(h))
        return self.fc_out(h)


def grad(u, x):
    """du/dx for every point (rows are independent), kept in the graph so the loss stays differentiable."""
    return torch.autograd.grad(u.sum(), x, create_graph=True)[0]


# -----------------------------------------------------------------------------
# PDE families. Each: a box domain (lo, hi per input), the faces carrying Dirichlet/initial data, the exact
# solution, the closed-form right-hand side f, and the differential operator applied to a model.


class Elliptic:
    """-div(a grad u) = f on (0,1)^2, u = 0 on the boundary, a = 1 + eps sin(pi x) sin(pi y),
    u = sin(k pi x) sin(k pi y). k sets the solution's frequency, eps the coefficient's variation."""

    d_in, lo, hi = 2, (0.0, 0.0), (1.0, 1.0)
    faces = [(0, 0.0), (0, 1.0), (1, 0.0), (1, 1.0)]  # (input index, value): all four sides

    def __init__(self, k: float, eps: float = 0.5):
        self.k, self.eps = k, eps
        self.scale = (k * math.pi) ** 2  # residuals are divided by this so losses compare across k

    def coef(self, x):
        return 1 + self.eps * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])

    def exact(self, x):
        w = self.k * math.pi
        return torch.sin(w * x[:, 0]) * torch.sin(w * x[:, 1])

    def source(self, x):
        w, p = self.k * math.pi, math.pi
        sx, sy = torch.sin(w * x[:, 0]), torch.sin(w * x[:, 1])
        cx, cy = torch.cos(w * x[:, 0]), torch.cos(w * x[:, 1])
        ax = self.eps * p * torch.cos(p * x[:, 0]) * torch.sin(p * x[:, 1])  # da/dx
        ay = self.eps * p * torch.sin(p * x[:, 0]) * torch.cos(p * x[:, 1])  # da/dy
        return self.coef(x) * 2 * w**2 * sx * sy - w * (ax * cx * sy + ay * sx * cy)

    def operator(self, u, x):
        flux = self.coef(x)[:, None] * grad(u, x)
        return -(grad(flux[:, 0], x)[:, 0] + grad(flux[:, 1], x)[:, 1])


class AllenCahn:
    """u_t - eps^2 u_xx + u^3 - u = f on x in (-1,1), t in (0,1); u = tanh((x - v t) / (sqrt(2) eps)).
    The kink is the exact stationary Allen-Cahn interface of width ~eps; f = -v/(sqrt(2) eps) (1 - u^2)
    is the forcing that moves it at speed v. Data at t = 0 and x = +-1."""

    d_in, lo, hi = 2, (-1.0, 0.0), (1.0, 1.0)  # inputs (x, t)
    faces = [(1, 0.0), (0, -1.0), (0, 1.0)]
    v = 0.5

    def __init__(self, eps: float):
        self.eps = eps
        self.scale = 1.0

    def exact(self, x):
        return torch.tanh((x[:, 0] - self.v * x[:, 1]) / (math.sqrt(2) * self.eps))

    def source(self, x):
        return -self.v / (math.sqrt(2) * self.eps) * (1 - self.exact(x) ** 2)

    def operator(self, u, x):
        du = grad(u, x)
        u_xx = grad(du[:, 0], x)[:, 0]
        u = u[:, 0]
        return du[:, 1] - self.eps**2 * u_xx + u**3 - u


class Advection:
    """u_t + beta u_x = 0 on x in (-1,1), t in (0,1); u = sin(pi (x - beta t)). Data at t = 0 and x = +-1
    (the outflow side too: the exact solution is consistent there, and it pins the periodic wave)."""

    d_in, lo, hi = 2, (-1.0, 0.0), (1.0, 1.0)  # inputs (x, t)
    faces = [(1, 0.0), (0, -1.0), (0, 1.0)]

    def __init__(self, beta: float):
        self.beta = beta
        self.scale = math.pi * max(1.0, beta)

    def exact(self, x):
        return torch.sin(math.pi * (x[:, 0] - self.beta * x[:, 1]))

    def source(self, x):
        return torch.zeros(x.shape[0])

    def operator(self, u, x):
        du = grad(u, x)
        return du[:, 1] + self.beta * du[:, 0]


FAMILIES = {"elliptic": Elliptic, "allen_cahn": AllenCahn, "hyperbolic": Advection}


# -----------------------------------------------------------------------------
# data and loss


def sample(problem, n_res: int, n_bc: int, g: torch.Generator) -> dict:
    """Uniform interior points with their f, and points spread evenly over the data faces with exact u."""
    lo, hi = torch.tensor(problem.lo), torch.tensor(problem.hi)
    x_res = lo + (hi - lo) * torch.rand(n_res, problem.d_in, generator=g)
    x_bc = lo + (hi - lo) * torch.rand(n_bc, problem.d_in, generator=g)
    face = torch.arange(n_bc) % len(problem.faces)
    for i, (dim, value) in enumerate(problem.faces):
        x_bc[face == i, dim] = value
    return {"x_res": x_res, "f": problem.source(x_res), "x_bc": x_bc, "u_bc": problem.exact(x_bc)}


def in_model_dtype(model, batch: dict) -> dict:
    """The batch in the model's dtype, so the loss follows a model cast to float64 (`--dtype float64`)."""
    dtype = next(model.parameters(), batch["x_res"]).dtype
    return {key: value.to(dtype) for key, value in batch.items()}


def pinn_loss(problem, model, batch) -> torch.Tensor:
    """Mean squared (scaled) PDE residual + mean squared boundary/initial misfit (paper eq. 14, weights 1)."""
    batch = in_model_dtype(model, batch)
    x = batch["x_res"].clone().requires_grad_(True)
    r = (problem.operator(model(x), x) - batch["f"]) / problem.scale
    b = model(batch["x_bc"])[:, 0] - batch["u_bc"]
    return (r**2).mean() + (b**2).mean()


def pinn_per_sample_loss(problem, model, batch) -> torch.Tensor:
    """pinn_loss as one loss per point, for `--curvature fisher` (docs/curvature.md): one model call on the
    residual and boundary points together (samples along dim 0), ℓ = (N/n_res)·r² for a residual point and
    (N/n_bc)·b² for a boundary point, so that the mean of ℓ is pinn_loss."""
    batch = in_model_dtype(model, batch)
    n_res, n_bc = batch["x_res"].shape[0], batch["x_bc"].shape[0]
    x = torch.cat([batch["x_res"], batch["x_bc"]]).clone().requires_grad_(True)
    u = model(x)
    r = (problem.operator(u, x)[:n_res] - batch["f"]) / problem.scale
    b = u[n_res:, 0] - batch["u_bc"]
    n = n_res + n_bc
    return torch.cat([r**2 * (n / n_res), b**2 * (n / n_bc)])


def test_grid(problem, n: int = 101) -> torch.Tensor:
    axes = [torch.linspace(lo, hi, n) for lo, hi in zip(problem.lo, problem.hi, strict=True)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, problem.d_in)


def rel_l2(problem, model) -> float:
    x = test_grid(problem)
    with torch.no_grad():
        u = problem.exact(x).double()
        pred = model(x.to(next(model.parameters(), x).dtype))[:, 0].double().cpu()  # the model may run on a GPU
    return ((pred - u).norm() / u.norm()).item()


def load_base(path: Path, d_in: int = 2) -> MLP:
    state = load_file(str(path))
    model = MLP(d_in, state["fc1.weight"].shape[0])
    model.load_state_dict(state)
    return model


def calibration(family: str, directory: Path, **params):
    """The six functions of the calibration protocol for one family and parameter value, plus the exact
    solution (for tests and plots). `directory` holds base.safetensors (the family directory)."""
    problem = FAMILIES[family](**params)

    def load_model():
        return load_base(Path(directory) / "base.safetensors", problem.d_in)

    def batches():
        g = torch.Generator().manual_seed(SEED)
        return [sample(problem, N_RES, N_BC, g) for _ in range(N_BATCHES)]

    def heldout_batches():
        g = torch.Generator().manual_seed(HELDOUT_SEED)
        return [sample(problem, N_RES, N_BC, g) for _ in range(N_HELDOUT)]

    def loss(model, batch):
        return pinn_loss(problem, model, batch)

    def per_sample_loss(model, batch):
        return pinn_per_sample_loss(problem, model, batch)

    def evaluate(model):
        return {"rel_l2": rel_l2(problem, model)}

    return load_model, batches, heldout_batches, loss, per_sample_loss, evaluate, problem.exact
