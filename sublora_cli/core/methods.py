"""The selection methods and the curvature kinds: one entry each, declaring what a method needs and how it models
the loss, and what a curvature kind provides — with the one compatibility rule between the two (`check_pair`).

Everything that depends on the method reads this table: the curvature `auto` computes (curvature.py), the
flag checks (prune.py), which methods a sweep can run on a given curvature (sweep.py), the CLI's choices and
help (cli.py), and select.py, which runs the entry's gain rule and search. Adding a method is one entry here;
a method with a new gain rule or search also adds that routine to select.py's tables (`START_GAINS`, `SEARCHES`).

Plain data, no torch and no imports from the package, so any module can read it without an import cycle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Need = Literal["none", "gradient", "diagonal", "matrix"]  # ordered: each includes the ones before it
Prediction = Literal["none", "diagonal", "quadratic", "compensated"]
NEEDS: tuple[Need, ...] = ("none", "gradient", "diagonal", "matrix")


@dataclass(frozen=True)
class Method:
    """A selection method.

    needs: the curvature it selects with — none (data-free), the gradient, the Hessian's diagonal or the matrix.
    prediction: the model of the loss increase it has for its kept set — none, the diagonal quadratic
    −g_Pᵀσ_P + ½ Σ H_kk σ_k², the full quadratic q(P) = −g_Pᵀσ_P + ½ σ_Pᵀ H_PP σ_P, or the compensated q̃(P): q
    minimised over the kept σ (obs.py); a prediction is reported only from that model, so what is printed is what
    the method optimised.
    gain: select.py's rule for the first gains (START_GAINS); search: its search routine (SEARCHES).
    compensates: whether it chooses the kept set counting on the kept σ being refit (obs); the refit itself is the
    pipeline's guarded refit (refit.py), which runs after every calibrated selection unless --no-refit.
    per_cost: whether, under a budget whose components cost differently (bytes, parameters), it ranks by gain per
    cost (the knapsack greedy, design §5) rather than by gain.
    in_default_sweep: whether `sweep` runs it when --methods is not given (exhaustive enumerates: only on request).
    """

    name: str
    needs: Need
    prediction: Prediction
    gain: str
    search: str
    summary: str
    compensates: bool = False
    per_cost: bool = True
    in_default_sweep: bool = True

    @property
    def needs_calibration(self) -> bool:
        """Whether it cannot select without a calibration script (a data-free one may still be given one, to
        measure the loss before and after)."""
        return self.needs != "none"

    def needs_at_least(self, need: Need) -> bool:
        return NEEDS.index(self.needs) >= NEEDS.index(need)


REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("magnitude", "none", "none", gain="magnitude", search="sorted", summary="largest σ first, data-free"),
        Method("linear", "gradient", "none", gain="linear", search="sorted", summary="largest |g σ| first"),
        Method("diag", "diagonal", "diagonal", gain="diag", search="sorted", summary="the diagonal quadratic model"),
        Method("hessian", "matrix", "quadratic", gain="hessian", search="greedy", summary="greedy on the full q"),
        Method(
            "sublora", "matrix", "quadratic", gain="submodular", search="submodular-greedy",
            summary="greedy on the submodular projection of q",
        ),  # fmt: skip
        Method(
            "sublora-random", "matrix", "quadratic", gain="submodular", search="random-greedy",
            summary="randomized greedy on the projection (non-monotone guarantee)",
        ),  # fmt: skip
        Method(
            "exhaustive", "matrix", "quadratic", gain="none", search="exhaustive",
            summary="exact optimum of q by enumeration (small problems)", in_default_sweep=False,
        ),  # fmt: skip
        Method(
            "obs", "matrix", "compensated", gain="none", search="backward-elimination", compensates=True,
            summary="backward elimination on the compensated model (the kept σ are refit)",
        ),  # fmt: skip
    )
}
METHODS: tuple[str, ...] = tuple(REGISTRY)


def lookup(name: str) -> Method:
    """The entry for `name`; ValueError naming the choices for an unknown one."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def most_demanding(names: list[str]) -> Need:
    """The largest need among the methods: what one curvature computation must provide for all of them."""
    return max((lookup(n).needs for n in names), key=NEEDS.index, default="none")


@dataclass(frozen=True)
class CurvatureKind:
    """A curvature the pipeline can compute (model/curvature.py; docs/curvature.md).

    provides: what it gives the selection — the Hessian's diagonal or a full R×R matrix.
    second_order: whether it differentiates the loss twice (Hessian-vector products: R per batch, and a model that
    supports double backward); the Fisher is built from first derivatives alone, one pass per batch.
    drops_gradient: whether the methods that use it select with a zero gradient (the Fisher: next to F the true g
    is on the wrong scale, so the stationarity the paper assumes is imposed; curvature.selection_inputs).
    """

    name: str
    provides: Need
    second_order: bool
    drops_gradient: bool
    summary: str

    @property
    def matrix(self) -> bool:
        return self.provides == "matrix"


CURVATURES: dict[str, CurvatureKind] = {
    k.name: k
    for k in (
        CurvatureKind("exact", "matrix", True, False, "the exact Hessian, R Hessian-vector products per batch"),
        CurvatureKind("diag", "diagonal", True, False, "the exact Hessian's diagonal, from the same products"),
        CurvatureKind("fisher", "matrix", False, True, "the empirical Fisher, one forward+backward pass per batch"),
    )
}


def check_pair(method: str, kind: str) -> None:
    """The one method × curvature rule: the curvature must provide what the method selects with. ValueError with
    the fix when it does not (prune, sweep and auto all ask here)."""
    if kind not in CURVATURES:  # auto: resolved to a kind that fits (model/curvature.resolve_kind)
        return
    need, curvature = lookup(method).needs, CURVATURES[kind]
    if NEEDS.index(curvature.provides) < NEEDS.index(need):
        full = [k for k, c in CURVATURES.items() if NEEDS.index(c.provides) >= NEEDS.index(need)]
        raise ValueError(
            f"--method {method} needs the full Hessian but --curvature {kind} computes only its {curvature.provides}; "
            f"use --curvature {' or '.join(full)}, or a method that needs less (diag, linear)"
        )
