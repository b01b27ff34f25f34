"""Which rank-1 components to keep: the selection methods of docs/design.md §2–3 on the concatenated σ vector.

Everything here is plain linear algebra on float64 tensors. Keeping a set S prunes its complement P, and
the second-order model of the loss increase is q(P) = −g_Pᵀσ_P + ½ σ_Pᵀ H_PP σ_P. The greedy methods
maximise f(S) = −q(N∖S) one element at a time with the incremental gains

    Δ_k(S) = −g_kσ_k + ½H_kkσ_k² + Σ_{i∈P∖{k}} σ_i H_ik σ_k,

which start at −g_kσ_k − ½H_kkσ_k² + σ_k(Hσ)_k and drop by σ_j H_jk σ_k when j is kept, so a greedy run
costs O(b·R) once H is known (one row of H per step). H is assumed symmetric, as a Hessian is.

What a method needs and predicts is its entry in methods.py; this module runs the entry's gain rule
(START_GAINS) and search (SEARCHES). Selection spends a `Budget` (a cost per component and a capacity): the
searches stop when nothing eligible is affordable, never after a fixed number of steps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from sublora_cli.core.budget import Budget
from sublora_cli.core.methods import Method, lookup
from sublora_cli.core.obs import DAMPING as OBS_DAMPING
from sublora_cli.core.obs import compensated_increase, damped, obs_select
from sublora_cli.core.rank_bounds import RankBounds
from sublora_cli.core.refit import psd_part


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection.

    order: indices in the order they were added (greedy and sorted methods; under a rank budget a prefix is the answer
    for a smaller budget), for exhaustive the kept indices ascending.
    diagnostics: {"clipped_fraction", "clipped_mass", "monotone"} for methods that use curvature, else None.
    gains: the marginal gain of each element of order under the objective the method optimised (Ĥ for the
    sublora methods), so q(P) of every prefix follows by subtraction; None for magnitude/linear/exhaustive.
    """

    kept: torch.Tensor
    order: list[int]
    predicted_increase: float | None
    diagnostics: dict | None
    gains: list[float] | None = None


def _submodular_pass(hessian, sigma, projected=None):
    """One pass over H in row blocks of ~2 MB, written into buffers allocated once (a fresh allocation per
    block would page-fault on every block: measured 50 s instead of 2 s for the first pass at R = 20,000).

    Returns Σ_{i≠k} max(σ_k H_ki σ_i, 0) per row k, the interaction part of the first greedy gains on Ĥ
    (so Ĥ itself is never needed by the greedy), and the clipping statistics; writes Ĥ into `projected`
    when one is given. σ_i H_ij σ_j has the sign of s_i s_j H_ij (s = sign σ, 0 where σ = 0), so with
    σ > 0, the usual case, the work is two clamps of H and a matrix-vector product.
    """
    n = sigma.numel()
    sign, size = torch.sign(sigma), sigma.abs()
    signed = bool((sign != 1).any())
    interactions = sigma.new_zeros(n)
    clipped_count = 0
    clipped_sq = offdiag_sq = 0.0
    step = max(1, min(n, 2**18 // max(n, 1)))
    buffers = [hessian.new_empty(step * n) for _ in range(3 if signed else 2)]
    negative_mask = torch.empty(step * n, dtype=torch.bool, device=hessian.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        rows = stop - start
        block = hessian[start:stop]
        clipped, kept = (buf[: rows * n].view(rows, n) for buf in buffers[:2])
        if signed:
            raw = buffers[2][: rows * n].view(rows, n)
            raw.copy_(block).diagonal(offset=start).zero_()
            offdiag_sq += _squares(raw)
            block = torch.mul(block, sign, out=raw).mul_(sign[start:stop, None])
        torch.clamp(block, max=0, out=clipped).diagonal(offset=start).zero_()
        torch.clamp(block, min=0, out=kept).diagonal(offset=start).zero_()
        mask = torch.lt(clipped, 0, out=negative_mask[: rows * n].view(rows, n))
        if projected is not None:
            projected[start:stop].copy_(hessian[start:stop]).masked_fill_(mask, 0.0)
        clipped_count += int(mask.sum())
        clipped_sq += _squares(clipped)
        if not signed:
            offdiag_sq += _squares(clipped) + _squares(kept)
        interactions[start:stop] = size[start:stop] * (kept @ size)
    clipped_fraction = clipped_count / (n * (n - 1)) if n > 1 else 0.0
    clipped_mass = math.sqrt(clipped_sq / offdiag_sq) if clipped_sq > 0 else 0.0
    return interactions, clipped_fraction, clipped_mass


def _squares(x: torch.Tensor) -> float:
    flat = x.reshape(-1)
    return float(torch.dot(flat, flat))


def project_submodular(hessian: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """The closest matrix (Frobenius) to H with σ_i Ĥ_ij σ_j ≥ 0 off the diagonal, the condition under
    which f is submodular. The constraint is separate per entry, so the projection is elementwise: an
    entry of the wrong sign becomes 0, everything else stays. Also returns the share of off-diagonal
    entries clipped and the Frobenius norm of the clipped part relative to the off-diagonal part, which
    say how far H is from submodular.
    """
    projected = torch.empty_like(hessian)
    _, clipped_fraction, clipped_mass = _submodular_pass(hessian, sigma, projected)
    return projected, clipped_fraction, clipped_mass


def predicted_increase(
    kept_mask: torch.Tensor, sigma: torch.Tensor, gradient: torch.Tensor, hessian: torch.Tensor
) -> float:
    """q(P) = −g_Pᵀσ_P + ½ σ_Pᵀ H_PP σ_P for the pruned set P = ~kept: the modelled loss increase."""
    pruned = torch.where(kept_mask, torch.zeros_like(sigma), sigma)
    return float(-(gradient @ pruned) + 0.5 * (pruned @ (hessian @ pruned)))


def _members(bounds: RankBounds, device: torch.device) -> list[torch.Tensor]:
    """Indices of each module's components, for closing a module in one indexing op."""
    group = bounds.group.to("cpu")
    order = torch.argsort(group, stable=True)
    counts = torch.bincount(group, minlength=bounds.lower.numel()).tolist()
    return [part.to(device) for part in torch.split(order, counts)]


def _per_module(values: torch.Tensor, bounds: RankBounds, reduce: str) -> list[float]:
    """The `reduce` ("amin"/"amax") of `values` within each module (0 for a module without components)."""
    modules = bounds.lower.numel()
    out = torch.zeros(modules, dtype=values.dtype).scatter_reduce_(
        0, bounds.group.cpu(), values.cpu(), reduce, include_self=False
    )
    return out.tolist()


def _reserve(bounds: RankBounds, cheapest: list[float], counts: list[int] | None = None) -> float:
    """What the modules below their lower bound must still spend, at least: each missing component at its
    module's cheapest cost (exact when a module's components cost the same, as they do for every budget unit)."""
    lower = bounds.lower.tolist()
    counts = counts or [0] * len(lower)
    return sum((lo - c) * cost for lo, c, cost in zip(lower, counts, cheapest, strict=True) if c < lo)


def _spendable(budget: Budget, bounds: RankBounds) -> Budget:
    """The budget capped at what the upper bounds let be spent at all (each module's upper bound of its dearest
    components), so that the lower-bound reasoning sees the capacity that can really be used."""
    dearest = _per_module(budget.cost, bounds, "amax")
    most = sum(u * c for u, c in zip(bounds.upper.tolist(), dearest, strict=True))
    return replace(budget, capacity=min(budget.capacity, most))


class _Ledger:
    """Bookkeeping of what is spent and of per-module counts, so that every pick is affordable and leaves the
    lower bounds reachable.

    An element is eligible if its module is below its upper bound and it is affordable: its cost leaves at
    least the reserve (what the modules still below their lower bound must spend), or it belongs to such a
    module (then it reduces the reserve by its module's cheapest cost). `needy` marks those modules' elements.
    """

    def __init__(self, bounds: RankBounds, budget: Budget, gains: torch.Tensor, per_cost: bool = False):
        self.per_cost = per_cost
        self.group = bounds.group.tolist()
        self.lower = bounds.lower.tolist()
        self.upper = bounds.upper.tolist()
        self.counts = [0] * len(self.lower)
        self.cost = budget.cost.to(gains.device)
        self.costs = budget.cost.tolist()
        self.largest_cost = max(self.costs, default=0.0)
        self.cheapest = _per_module(budget.cost, bounds, "amin")
        self.remaining = budget.capacity
        self.reserve = _reserve(bounds, self.cheapest)
        self.members = _members(bounds, gains.device)
        group = bounds.group.to(gains.device)
        self.needy = (bounds.lower.to(gains.device) > 0)[group]
        gains.masked_fill_((bounds.upper.to(gains.device) == 0)[group], -math.inf)

    def forced(self) -> bool:
        """True when some element's cost would eat into the reserve: then not every element is eligible."""
        return self.reserve + self.largest_cost > self.remaining

    def eligible(self) -> torch.Tensor:
        """Mask of the elements that are affordable under the reserve rule (module bounds aside: gains mark those)."""
        return (self.cost <= self.remaining - self.reserve) | (self.needy & (self.cost <= self.remaining))

    def scores(self, gains: torch.Tensor) -> torch.Tensor:
        """What the greedy maximises: the gain of every eligible element (per unit of cost when `per_cost`: the
        density rule of knapsack greedies, design §5), −inf elsewhere. With rank budgets every cost is 1 and the
        gain is the score."""
        scores = gains / self.cost if self.per_cost else gains
        return scores.masked_fill(~self.eligible(), -math.inf) if self.forced() else scores

    def take(self, j: int, gains: torch.Tensor) -> None:
        """Record keeping j; mark j and, when its module is full, the whole module as unavailable."""
        m = self.group[j]
        self.counts[m] += 1
        self.remaining -= self.costs[j]
        if self.counts[m] <= self.lower[m]:
            self.reserve -= self.cheapest[m]
            if self.counts[m] == self.lower[m]:
                self.needy[self.members[m]] = False
        gains[j] = -math.inf
        if self.counts[m] >= self.upper[m]:
            gains[self.members[m]] = -math.inf

    def skip(self, cost: float) -> None:
        """Spend `cost` on nothing (the randomized greedy's dummy element)."""
        self.remaining -= cost


def _greedy(gains, budget, bounds, sigma=None, hessian=None, submodular=False, per_cost=True):
    """The greedy under `budget`. When components cost differently and the method ranks `per_cost`, it is the
    knapsack greedy with the standard fix (design §5): the density greedy (gain per cost), the same greedy
    started from the best single affordable element, and the greedy by gain alone (what a rank budget picks,
    filled up to the capacity) all run, and the one whose kept set has the largest objective (the sum of its
    marginal gains) wins: ½(1 − 1/e) of the optimum for monotone submodular objectives, ½ for modular ones (the
    sorted methods), and never below the gain greedy on the method's own objective."""
    by_gain = _greedy_run(gains, budget, bounds, sigma, hessian, submodular, per_cost=False)
    if not (per_cost and not budget.uniform):
        return by_gain
    density = _greedy_run(gains, budget, bounds, sigma, hessian, submodular, per_cost=True)
    single = _greedy_run(gains, budget, bounds, sigma, hessian, submodular, per_cost=True, first_by_gain=True)
    return max((density, single, by_gain), key=lambda run: math.fsum(run[1]))  # ties: the first listed


def _greedy_run(gains, budget, bounds, sigma, hessian, submodular, per_cost, first_by_gain=False):
    """Add the eligible element with the largest score until nothing eligible is affordable. With a Hessian, each
    step updates the gains with one row of it: −σ_j H_jk σ_k, clamped at 0 for Ĥ (an entry whose term is
    negative is one the projection zeroes), so Ĥ is never formed. Without one the gains never change (the sorted
    methods). The greedy keeps adding when the best gain is negative: the budget is what users ask to keep, and
    `monotone` reports it. Ties go to the lower index (argmax returns the first maximum). Components with
    σ = 0 add nothing to the adapter, so they come last whatever their gain: never kept while a σ ≠ 0 one is
    eligible. `first_by_gain`: the first pick ranks by gain alone, the rest per cost."""
    order, picked = [], []
    if gains.numel() == 0:
        return order, picked
    gains = gains.clone()
    book = _Ledger(bounds, budget, gains, per_cost=per_cost and not first_by_gain)
    dead = sigma == 0
    while True:
        scores = book.scores(gains)
        j = _best_live(scores, dead)
        if scores[j] == -math.inf:
            break
        order.append(j)
        picked.append(float(gains[j]))
        if hessian is not None:
            _drop_interactions(gains, hessian, sigma, j, submodular)
        book.take(j, gains)
        book.per_cost = per_cost
    return order, picked


def _best_live(scores: torch.Tensor, dead: torch.Tensor) -> int:
    """The highest-scoring element with σ ≠ 0; a σ = 0 one (which adds nothing) only when no other is eligible."""
    live = scores.masked_fill(dead, -math.inf)
    j = int(torch.argmax(live))
    return j if live[j] > -math.inf else int(torch.argmax(scores))


def _drop_interactions(gains, hessian, sigma, j, submodular):
    """Keeping j removes it from P: every gain loses its interaction σ_j H_jk σ_k with j."""
    terms = (hessian[j] * sigma).mul_(sigma[j])
    gains.sub_(terms.clamp_(min=0) if submodular else terms)


def _top_members(scores: torch.Tensor, k: int, finite: int) -> torch.Tensor:
    """Indices (ascending) of the k largest of the `finite` finite scores, ties to the lower index: a
    deterministic top-k set."""
    if k == finite:
        return torch.nonzero(torch.isfinite(scores)).flatten()
    threshold = torch.kthvalue(scores, scores.numel() - k + 1).values
    above = torch.nonzero(scores > threshold).flatten()
    tied = torch.nonzero(scores == threshold).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, tied])).values


def _uniform_cost(budget: Budget, method: str) -> float:
    """The one cost every component has; ValueError otherwise. The randomized greedy's guarantee (Buchbinder et
    al. 2014) is for a cardinality constraint: it draws among the k best, k the number of picks, which only a
    budget of equal costs fixes; no extension of it to knapsack constraints keeps a comparable bound, so it
    refuses rather than pretend."""
    if not budget.uniform:
        raise ValueError(
            f"method {method} needs a budget whose components all cost the same (a rank budget); it is defined "
            f"by a number of picks, which a {budget.unit} budget does not fix. Use --method sublora "
            "(the knapsack greedy) or exhaustive"
        )
    return float(budget.cost[0]) if budget.cost.numel() else 1.0


def _max_picks(budget: Budget) -> int:
    """At most how many components the budget affords (the cheapest first)."""
    spent = torch.cumsum(torch.sort(budget.cost).values, 0)
    return int((spent <= budget.capacity + 1e-9 * max(budget.capacity, 1.0)).sum())


def _random_greedy(gains, budget, bounds, sigma, hessian, seed):
    """Randomized greedy of Buchbinder et al. (2014), the 1/e guarantee for non-monotone f: k = the number of
    components the budget affords, and each step, until nothing is affordable, picks uniformly among the k best
    gains padded with zero-gain dummies (a dummy spends one component's cost on nothing), so elements with
    negative gain are never picked unless a lower bound forces it."""
    unit = _uniform_cost(budget, "sublora-random")
    picks = _max_picks(budget)
    gains = gains.clone()
    book = _Ledger(bounds, budget, gains)
    generator = torch.Generator().manual_seed(seed)
    order, picked = [], []
    while book.remaining >= unit:
        draw = int(torch.randint(picks, (1,), generator=generator))
        if book.forced():  # no room for a dummy: pick among the needy modules' best, σ ≠ 0 first
            scores = gains.masked_fill(~book.needy, -math.inf)
            live = scores.masked_fill(sigma == 0, -math.inf)
            scores = live if bool(torch.isfinite(live).any()) else scores
            finite = int(torch.isfinite(scores).sum())
            k = min(picks, finite)
            draw = int(torch.randint(k, (1,), generator=generator))
        else:
            scores = gains.masked_fill(gains <= 0, -math.inf)
            finite = int(torch.isfinite(scores).sum())
            k = min(picks, finite)
            if draw >= k:
                book.skip(unit)  # a dummy
                continue
        j = int(_top_members(scores, k, finite)[draw])
        order.append(j)
        picked.append(float(gains[j]))
        _drop_interactions(gains, hessian, sigma, j, submodular=True)
        book.take(j, gains)
    return order, picked


def _count_subsets(bounds: RankBounds, picks: int, limit: int) -> tuple[int, bool]:
    """Number of kept sets of at most `picks` components within bounds, and whether it is exact. When counting
    exactly would be slow (large R and picks) it stops at the first partial count above limit: a lower bound,
    since every partial set counted extends to at least one feasible set."""
    sizes = torch.bincount(bounds.group.cpu(), minlength=bounds.lower.numel()).tolist()
    lower, upper = bounds.lower.tolist(), bounds.upper.tolist()
    exact = (picks + 1) * (len(sizes) + sum(sizes)) <= 10**6
    rest_lower = sum(lower)
    poly = [1]  # poly[d]: number of partial sets of size d
    for r, lo, hi in zip(sizes, lower, upper, strict=True):
        rest_lower -= lo
        cap = picks - rest_lower
        new = [0] * (min(cap, len(poly) - 1 + hi) + 1)
        total = 0
        for k in range(lo, min(hi, cap) + 1):
            ways = math.comb(r, k)
            for d, count in enumerate(poly):
                if d + k <= cap and count:
                    new[d + k] += count * ways
                    total += count * ways
            if total > limit and not exact:
                return total, False
        poly = new
    return sum(poly), True


def _exhaustive(sigma, gradient, hessian, budget, bounds):
    """Exact optimum of f over all affordable kept sets within bounds (costs honoured exactly: a set is a
    candidate iff its total cost fits). f need not be monotone, so smaller sets
    are candidates too; among equal values the set found first (larger sets first) wins. Uses
    f(S) − f(∅) = Σ_{i∈S} a_i − ½ Σ_{i,j∈S} Q_ij with a = −gσ + σ(Hσ) and Q = diag(σ) H diag(σ).
    Returns the kept indices ascending and whether the set is maximal (nothing eligible was still affordable);
    check_selectable has refused a search over more than the limit of subsets."""
    picks = _max_picks(budget)
    n = sigma.numel()
    linear = -gradient * sigma + sigma * (hessian @ sigma)
    quad = sigma[:, None] * hessian * sigma[None, :]
    linear = torch.cat([linear, linear.new_zeros(1)])  # index n is the padding: contributes nothing
    quad = torch.nn.functional.pad(quad, (0, 1, 0, 1))

    lower, upper = bounds.lower.tolist(), bounds.upper.tolist()
    members = [m.tolist() for m in _members(bounds, torch.device("cpu"))]
    cheapest = _per_module(budget.cost, bounds, "amin")
    costs = budget.cost.tolist()
    reserves = [lo * c for lo, c in zip(lower, cheapest, strict=True)]
    later_reserve = [sum(reserves[m + 1 :]) for m in range(len(lower))]
    spare = budget.capacity - sum(reserves)
    options = [  # each module's allowed kept sets, larger first, with their cost
        [
            (c, cost)
            for k in range(min(hi, _affordable_count(spare + reserve, cheap)), lo - 1, -1)
            for c in itertools.combinations(idx, k)
            if (cost := sum(costs[i] for i in c)) <= spare + reserve
        ]
        for idx, lo, hi, reserve, cheap in zip(members, lower, upper, reserves, cheapest, strict=True)
    ]

    def subsets():
        stack = [(0, 0.0, ())]
        while stack:
            m, spent, chosen = stack.pop()
            if m == len(options):
                yield chosen
                continue
            for c, cost in reversed(options[m]):  # reversed: the stack pops options in their listed order
                if spent + cost + later_reserve[m] <= budget.capacity:
                    stack.append((m + 1, spent + cost, chosen + c))

    width = max(picks, 1)
    chunk = max(1, 2**22 // (width * width))
    best_value, best = -math.inf, ()
    batches = iter(subsets())
    while batch := list(itertools.islice(batches, chunk)):
        idx = torch.tensor([s + (n,) * (width - len(s)) for s in batch], device=sigma.device)
        values = linear[idx].sum(1) - 0.5 * quad[idx[:, :, None], idx[:, None, :]].sum((1, 2))
        i = int(torch.argmax(values))
        if float(values[i]) > best_value:
            best_value, best = float(values[i]), batch[i]
    return sorted(best), not _any_affordable(list(best), budget, bounds)


def _affordable_count(money: float, cheapest: float) -> int:
    """At most how many components costing at least `cheapest` each `money` buys (a module without any: 0)."""
    return int(money // cheapest) if cheapest > 0 else 0


def _any_affordable(kept: list[int], budget: Budget, bounds: RankBounds) -> bool:
    """Whether some component could still be added to `kept`: its module below its upper bound, its cost affordable."""
    counts = torch.bincount(bounds.group[kept], minlength=bounds.lower.numel())
    remaining = budget.capacity - float(budget.cost[kept].sum())
    open_ = (counts < bounds.upper)[bounds.group]
    open_[kept] = False
    return bool((open_ & (budget.cost <= remaining)).any())


def _without_dead(kept: list[int], sigma: torch.Tensor, bounds: RankBounds) -> list[int]:
    """Drop σ = 0 components (they add nothing to f) except where a module's lower bound needs them."""
    counts = torch.bincount(bounds.group[kept], minlength=bounds.lower.numel()).tolist()
    result = []
    for i in kept:
        m = int(bounds.group[i])
        if sigma[i] == 0 and counts[m] > bounds.lower[m]:
            counts[m] -= 1
            continue
        result.append(i)
    return result


@dataclass(frozen=True)
class _Problem:
    """What a gain rule or a search works on (the inputs already checked, on σ's device and dtype)."""

    sigma: torch.Tensor
    budget: Budget
    bounds: RankBounds
    gradient: torch.Tensor | None
    hessian: torch.Tensor | None
    hessian_diag: torch.Tensor | None
    interactions: torch.Tensor | None  # Σ_{i≠k} max(σ_k H_ki σ_i, 0), for the gains on Ĥ
    seed: int
    per_cost: bool = True  # the method's `per_cost` (methods.py)


def _diagonal(p: _Problem) -> torch.Tensor:
    return p.hessian_diag if p.hessian_diag is not None else torch.diagonal(p.hessian)


def _backward_elimination(p: _Problem) -> tuple[list[int], None]:
    """obs (obs.py) on a rank budget: the kept indices ascending, no gains (it removes rather than adds)."""
    _uniform_cost(p.budget, "obs")
    picks = _max_picks(p.budget)
    chosen = obs_select(p.sigma, picks, p.bounds, p.gradient, p.hessian, damping=OBS_DAMPING)
    return torch.nonzero(chosen.kept).flatten().tolist(), None


def _compensated(kept: torch.Tensor, p: _Problem) -> float:
    """q̃ of the pruned set on obs's model (A = H̃ + λI): the increase with the kept σ refit; 0 when nothing is
    pruned, since nothing is refit then (prune.written_outcome)."""
    if bool(kept.all()):
        return 0.0
    return compensated_increase(p.sigma, kept, p.gradient, damped(psd_part(p.hessian), OBS_DAMPING))


START_GAINS: dict[str, Callable[[_Problem], torch.Tensor]] = {  # a method's `gain`: its first greedy gains
    "none": lambda p: torch.zeros_like(p.sigma),  # a search that needs no gains (backward elimination)
    "magnitude": lambda p: p.sigma.clone(),
    "linear": lambda p: (p.gradient * p.sigma).abs(),
    "diag": lambda p: -p.gradient * p.sigma + 0.5 * _diagonal(p) * p.sigma.square(),
    "hessian": lambda p: (
        -p.gradient * p.sigma - 0.5 * torch.diagonal(p.hessian) * p.sigma.square() + p.sigma * (p.hessian @ p.sigma)
    ),
    # on Ĥ, whose diagonal is H's: σ_k(Ĥσ)_k = H_kk σ_k² + the kept interactions
    "submodular": lambda p: -p.gradient * p.sigma + 0.5 * torch.diagonal(p.hessian) * p.sigma.square() + p.interactions,
}
SEARCHES: dict[str, Callable[[torch.Tensor, _Problem], tuple[list[int], list[float]]]] = {  # a method's `search`
    "sorted": lambda start, p: _greedy(start, p.budget, p.bounds, p.sigma, per_cost=p.per_cost),
    "greedy": lambda start, p: _greedy(start, p.budget, p.bounds, p.sigma, p.hessian, per_cost=p.per_cost),
    "submodular-greedy": lambda start, p: _greedy(
        start, p.budget, p.bounds, p.sigma, p.hessian, submodular=True, per_cost=p.per_cost
    ),
    "random-greedy": lambda start, p: _random_greedy(start, p.budget, p.bounds, p.sigma, p.hessian, p.seed),
    "backward-elimination": lambda start, p: _backward_elimination(p),
}
ENUMERATING = frozenset({"random-greedy", "exhaustive"})  # searches that keep everything when everything is affordable
EQUAL_COSTS = frozenset({"random-greedy", "backward-elimination"})  # searches defined by a number of picks
MAX_EXHAUSTIVE = 2_000_000  # subsets the exhaustive search may evaluate


def check_selectable(method: str, budget: Budget, bounds: RankBounds, max_exhaustive: int = MAX_EXHAUSTIVE) -> None:
    """Refuse (ValueError) what `select` would refuse whatever the curvature: a search defined by a number of picks
    under a budget of unequal costs, or an enumeration over `max_exhaustive` subsets. It needs only the budget and
    the bounds, so the pipelines call it before the minutes of curvature."""
    spec = lookup(method)
    budget = _spendable(budget, bounds)
    if spec.search in ENUMERATING and budget.capacity >= float(budget.cost.sum()):
        return  # nothing to choose: everything is kept
    if spec.search in EQUAL_COSTS:
        _uniform_cost(budget, method)
    if spec.search == "exhaustive":
        picks = _max_picks(budget)
        count, exact = _count_subsets(bounds, picks, max_exhaustive)
        if count > max_exhaustive:
            raise ValueError(
                f"exhaustive search would evaluate {'' if exact else 'more than '}{count:,} subsets "
                f"(R={budget.cost.numel()}, budget={picks}), over the limit of {max_exhaustive:,}; "
                "use --method sublora or hessian instead"
            )


def _check_inputs(spec: Method, sigma, budget: Budget, bounds: RankBounds, gradient, hessian, hessian_diag) -> None:
    n = sigma.numel()
    if bounds.group.numel() != n:
        raise ValueError(f"bounds cover {bounds.group.numel()} components but sigma has {n}")
    if budget.cost.numel() != n:
        raise ValueError(f"the budget prices {budget.cost.numel()} components but sigma has {n}")
    if bool((bounds.lower > bounds.upper).any()):
        raise ValueError("a module's minimum rank exceeds its maximum rank")
    floor = _reserve(bounds, _per_module(budget.cost, bounds, "amin"))
    if floor > budget.capacity:
        raise ValueError(
            f"the per-module minimum ranks need {budget.amount(floor)} in total, more than the budget of "
            f"{budget.capacity:g}; lower --min-rank or raise --budget"
        )
    if spec.needs_at_least("gradient") and gradient is None:
        raise ValueError(f"method {spec.name} needs the gradient")
    if spec.needs == "matrix" and hessian is None:
        raise ValueError(f"method {spec.name} needs the full Hessian")
    if spec.needs == "diagonal" and hessian is None and hessian_diag is None:
        raise ValueError(f"method {spec.name} needs the Hessian diagonal")


def _predicted(spec: Method, kept: torch.Tensor, p: _Problem) -> float | None:
    """The loss increase of pruning ~kept under the model the method selected with (methods.py `prediction`)."""
    if spec.prediction == "quadratic":
        return predicted_increase(kept, p.sigma, p.gradient, p.hessian)
    if spec.prediction == "compensated":
        return _compensated(kept, p)
    if spec.prediction == "diagonal":
        pruned = torch.where(kept, torch.zeros_like(p.sigma), p.sigma)
        return float(-(p.gradient @ pruned) + 0.5 * (_diagonal(p) @ pruned.square()))
    return None


def select(
    method: str,
    sigma: torch.Tensor,
    budget: Budget,
    bounds: RankBounds,
    gradient: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    hessian_diag: torch.Tensor | None = None,
    seed: int = 0,
    max_exhaustive: int = MAX_EXHAUSTIVE,
) -> Selection:
    """Choose which components to keep within the budget (for a rank budget: that many in total; fewer only where
    the upper bounds or, for sublora-random and exhaustive, the objective say so), every module within its bounds.

    diagnostics["monotone"]: whether every gain was ≥ 0 when its element was picked (up to rounding);
    False means the budget forced in elements that the model says hurt, or, for exhaustive, that a set
    smaller than the budget was optimal. predicted_increase: from the method's own model of the loss, or None.
    """
    spec = lookup(method)
    _check_inputs(spec, sigma, budget, bounds, gradient, hessian, hessian_diag)
    check_selectable(method, budget, bounds, max_exhaustive)
    budget = _spendable(budget, bounds)
    inputs = {"sigma": sigma, "gradient": gradient, "hessian": hessian, "hessian_diag": hessian_diag}
    inputs = {name: t if t is None else t.to(sigma) for name, t in inputs.items()}  # no copy if already alike
    for name, t in inputs.items():  # a sum is non-finite iff an entry is (barring overflow); no temporaries
        if t is not None and not bool(torch.isfinite(t.sum())):
            raise ValueError(f"{name} has non-finite entries")
    n = sigma.numel()

    diagnostics = interactions = None
    if spec.needs_at_least("diagonal"):
        clipped_fraction = clipped_mass = None
        if inputs["hessian"] is not None:
            interactions, clipped_fraction, clipped_mass = _submodular_pass(inputs["hessian"], sigma)
        diagnostics = {"clipped_fraction": clipped_fraction, "clipped_mass": clipped_mass, "monotone": None}
    problem = _Problem(
        budget=budget, bounds=bounds, interactions=interactions, seed=seed, per_cost=spec.per_cost, **inputs
    )

    gains = None
    if spec.search in ENUMERATING and budget.capacity >= float(budget.cost.sum()):  # nothing to choose
        order = list(range(n))
        if spec.search == "exhaustive":
            diagnostics["monotone"] = True
    elif spec.search == "exhaustive":
        order, full = _exhaustive(sigma, problem.gradient, problem.hessian, budget, bounds)
        order = _without_dead(order, sigma, bounds)
        diagnostics["monotone"] = full
    else:
        start = START_GAINS[spec.gain](problem)
        order, gains = SEARCHES[spec.search](start, problem)
        if diagnostics is not None and gains is not None:
            tolerance = 1e-10 * float(start.abs().max()) if n else 0.0
            diagnostics["monotone"] = all(gain >= -tolerance for gain in gains)
        if spec.prediction == "none":
            gains = None

    kept = torch.zeros(n, dtype=torch.bool, device=sigma.device)
    kept[order] = True
    increase = _predicted(spec, kept, problem)
    return Selection(kept, order, predicted_increase=increase, diagnostics=diagnostics, gains=gains)
