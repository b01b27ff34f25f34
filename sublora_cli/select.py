"""Which rank-1 components to keep: the selection methods of DESIGN.md §1 on the concatenated σ vector.

Everything here is plain linear algebra on float64 tensors. Keeping a set S prunes its complement P, and
the second-order model of the loss increase is q(P) = −g_Pᵀσ_P + ½ σ_Pᵀ H_PP σ_P. The greedy methods
maximise f(S) = −q(N∖S) one element at a time with the incremental gains

    Δ_k(S) = −g_kσ_k + ½H_kkσ_k² + Σ_{i∈P∖{k}} σ_i H_ik σ_k,

which start at −g_kσ_k − ½H_kkσ_k² + σ_k(Hσ)_k and drop by σ_j H_jk σ_k when j is kept, so a greedy run
costs O(b·R) once H is known (one row of H per step). H is assumed symmetric, as a Hessian is.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

METHODS: tuple[str, ...] = (
    "magnitude",
    "linear",
    "diag",
    "hessian",
    "sublora",
    "sublora-random",
    "exhaustive",
)
NEEDS_CALIBRATION: frozenset[str] = frozenset(METHODS) - {"magnitude"}
NEEDS_FULL_HESSIAN: frozenset[str] = frozenset({"hessian", "sublora", "sublora-random", "exhaustive"})


@dataclass(frozen=True)
class RankBounds:
    """Per-module limits on how many components are kept; group maps each component to its module."""

    group: torch.Tensor  # long, length R
    lower: torch.Tensor  # long, per module: minimum kept (already clipped to the module's rank)
    upper: torch.Tensor  # long, per module: maximum kept

    @staticmethod
    def from_ranks(ranks: list[int], min_rank: int = 0, max_rank: int | None = None) -> RankBounds:
        """Bounds for modules of the given ranks, in the order their σ are concatenated."""
        if min_rank < 0:
            raise ValueError(f"min_rank {min_rank}: must be 0 or more")
        if max_rank is not None and max_rank < min_rank:
            raise ValueError(f"max_rank {max_rank} is below min_rank {min_rank}")
        sizes = torch.tensor(ranks, dtype=torch.long)
        group = torch.repeat_interleave(torch.arange(len(ranks)), sizes)
        lower = sizes.clamp(max=min_rank)
        upper = sizes if max_rank is None else sizes.clamp(max=max_rank)
        return RankBounds(group=group, lower=lower, upper=upper)


@dataclass(frozen=True)
class Selection:
    """The outcome of one selection.

    order: indices in the order they were added (greedy and sorted methods; a prefix of it is the answer
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


class _Budget:
    """Bookkeeping of per-module counts so that every pick leaves the lower bounds reachable.

    An element is eligible if its module is below its upper bound and taking it leaves enough of the
    budget for the remaining lower-bound deficits; once the deficit equals what is left, only modules
    still below their lower bound may grow (taking one of those reduces the deficit by one).
    """

    def __init__(self, bounds: RankBounds, gains: torch.Tensor):
        self.group = bounds.group.tolist()
        self.lower = bounds.lower.tolist()
        self.upper = bounds.upper.tolist()
        self.counts = [0] * len(self.lower)
        self.deficit = sum(self.lower)
        self.members = _members(bounds, gains.device)
        group = bounds.group.to(gains.device)
        self.needy = (bounds.lower.to(gains.device) > 0)[group]
        gains.masked_fill_((bounds.upper.to(gains.device) == 0)[group], -math.inf)

    def forced(self, steps_left: int) -> bool:
        """True when every remaining step must go to a module below its lower bound."""
        return self.deficit >= steps_left

    def take(self, j: int, gains: torch.Tensor) -> None:
        """Record keeping j; mark j and, when its module is full, the whole module as unavailable."""
        m = self.group[j]
        self.counts[m] += 1
        if self.counts[m] <= self.lower[m]:
            self.deficit -= 1
            if self.counts[m] == self.lower[m]:
                self.needy[self.members[m]] = False
        gains[j] = -math.inf
        if self.counts[m] >= self.upper[m]:
            gains[self.members[m]] = -math.inf


def _greedy(gains, budget, bounds, sigma=None, hessian=None, submodular=False):
    """Add the eligible element with the largest gain, budget times. With a Hessian, each step updates the
    gains with one row of it: −σ_j H_jk σ_k, clamped at 0 for Ĥ (an entry whose term is negative is one the
    projection zeroes), so Ĥ is never formed. Without one the gains never change (the sorted methods).
    The greedy keeps adding when the best gain is negative: the budget is a count users ask for, and
    `monotone` reports it. Ties go to the lower index (argmax returns the first maximum). Components with
    σ = 0 add nothing to the adapter, so they come last whatever their gain: never kept while a σ ≠ 0 one is
    eligible."""
    gains = gains.clone()
    book = _Budget(bounds, gains)
    dead = sigma == 0
    order, picked = [], []
    for step in range(budget):
        scores = gains.masked_fill(~book.needy, -math.inf) if book.forced(budget - step) else gains
        j = _best_live(scores, dead)
        order.append(j)
        picked.append(float(gains[j]))
        if hessian is not None:
            _drop_interactions(gains, hessian, sigma, j, submodular)
        book.take(j, gains)
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


def _random_greedy(gains, budget, bounds, sigma, hessian, seed):
    """Randomized greedy of Buchbinder et al. (2014), the 1/e guarantee for non-monotone f: budget steps,
    each picking uniformly among the `budget` best gains padded with zero-gain dummies (a dummy adds
    nothing that step), so elements with negative gain are never picked unless a lower bound forces it."""
    gains = gains.clone()
    book = _Budget(bounds, gains)
    generator = torch.Generator().manual_seed(seed)
    order, picked = [], []
    for step in range(budget):
        draw = int(torch.randint(budget, (1,), generator=generator))
        if book.forced(budget - step):  # no room for a dummy: pick among the needy modules' best, σ ≠ 0 first
            scores = gains.masked_fill(~book.needy, -math.inf)
            live = scores.masked_fill(sigma == 0, -math.inf)
            scores = live if bool(torch.isfinite(live).any()) else scores
            finite = int(torch.isfinite(scores).sum())
            k = min(budget, finite)
            draw = int(torch.randint(k, (1,), generator=generator))
        else:
            scores = gains.masked_fill(gains <= 0, -math.inf)
            finite = int(torch.isfinite(scores).sum())
            k = min(budget, finite)
            if draw >= k:
                continue  # a dummy
        j = int(_top_members(scores, k, finite)[draw])
        order.append(j)
        picked.append(float(gains[j]))
        _drop_interactions(gains, hessian, sigma, j, submodular=True)
        book.take(j, gains)
    return order, picked


def _count_subsets(bounds: RankBounds, budget: int, limit: int) -> tuple[int, bool]:
    """Number of kept sets with |S| ≤ budget within bounds, and whether it is exact. When counting exactly
    would be slow (large R and budget) it stops at the first partial count above limit: a lower bound,
    since every partial set counted extends to at least one feasible set."""
    sizes = torch.bincount(bounds.group.cpu(), minlength=bounds.lower.numel()).tolist()
    lower, upper = bounds.lower.tolist(), bounds.upper.tolist()
    exact = (budget + 1) * (len(sizes) + sum(sizes)) <= 10**6
    rest_lower = sum(lower)
    poly = [1]  # poly[d]: number of partial sets of size d
    for r, lo, hi in zip(sizes, lower, upper, strict=True):
        rest_lower -= lo
        cap = budget - rest_lower
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


def _exhaustive(sigma, gradient, hessian, budget, bounds, max_exhaustive):
    """Exact optimum of f over all kept sets with |S| ≤ budget within bounds. f need not be monotone, so
    smaller sets are candidates too; among equal values the set found first (larger sets first) wins.
    Uses f(S) − f(∅) = Σ_{i∈S} a_i − ½ Σ_{i,j∈S} Q_ij with a = −gσ + σ(Hσ) and Q = diag(σ) H diag(σ)."""
    count, exact = _count_subsets(bounds, budget, max_exhaustive)
    if count > max_exhaustive:
        raise ValueError(
            f"exhaustive search would evaluate {'' if exact else 'more than '}{count:,} subsets "
            f"(R={sigma.numel()}, budget={budget}), over the limit of {max_exhaustive:,}; "
            "use --method sublora or hessian instead"
        )
    n = sigma.numel()
    linear = -gradient * sigma + sigma * (hessian @ sigma)
    quad = sigma[:, None] * hessian * sigma[None, :]
    linear = torch.cat([linear, linear.new_zeros(1)])  # index n is the padding: contributes nothing
    quad = torch.nn.functional.pad(quad, (0, 1, 0, 1))

    lower, upper = bounds.lower.tolist(), bounds.upper.tolist()
    members = [m.tolist() for m in _members(bounds, torch.device("cpu"))]
    later_lower = [sum(lower[m + 1 :]) for m in range(len(lower))]
    spare = budget - sum(lower)
    options = [  # each module's allowed kept sets, larger first
        [c for k in range(min(hi, spare + lo), lo - 1, -1) for c in itertools.combinations(idx, k)]
        for idx, lo, hi in zip(members, lower, upper, strict=True)
    ]

    def subsets():
        stack = [(0, 0, ())]
        while stack:
            m, size, chosen = stack.pop()
            if m == len(options):
                yield chosen
                continue
            for c in reversed(options[m]):  # reversed: the stack pops options in their listed order
                if size + len(c) + later_lower[m] <= budget:
                    stack.append((m + 1, size + len(c), chosen + c))

    width = max(budget, 1)
    chunk = max(1, 2**22 // (width * width))
    best_value, best = -math.inf, ()
    batches = iter(subsets())
    while batch := list(itertools.islice(batches, chunk)):
        idx = torch.tensor([s + (n,) * (width - len(s)) for s in batch], device=sigma.device)
        values = linear[idx].sum(1) - 0.5 * quad[idx[:, :, None], idx[:, None, :]].sum((1, 2))
        i = int(torch.argmax(values))
        if float(values[i]) > best_value:
            best_value, best = float(values[i]), batch[i]
    return sorted(best), len(best) == budget


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


def select(
    method: str,
    sigma: torch.Tensor,
    budget: int,
    bounds: RankBounds,
    gradient: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    hessian_diag: torch.Tensor | None = None,
    seed: int = 0,
    max_exhaustive: int = 2_000_000,
) -> Selection:
    """Choose which components to keep: `budget` of them in total (fewer only where the upper bounds or,
    for sublora-random and exhaustive, the objective say so), every module within its bounds.

    diagnostics["monotone"]: whether every gain was ≥ 0 when its element was picked (up to rounding);
    False means the budget forced in elements that the model says hurt, or, for exhaustive, that a set
    smaller than the budget was optimal.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = sigma.numel()
    if bounds.group.numel() != n:
        raise ValueError(f"bounds cover {bounds.group.numel()} components but sigma has {n}")
    if budget < 0:
        raise ValueError(f"budget {budget}: must be 0 or more")
    if bool((bounds.lower > bounds.upper).any()):
        raise ValueError("a module's minimum rank exceeds its maximum rank")
    floor = int(bounds.lower.sum())
    if floor > budget:
        raise ValueError(
            f"the per-module minimum ranks need {floor} components in total, more than the budget of "
            f"{budget}; lower --min-rank or raise --budget"
        )
    budget = min(budget, n, int(bounds.upper.sum()))
    if method in NEEDS_CALIBRATION and gradient is None:
        raise ValueError(f"method {method} needs the gradient")
    if method in NEEDS_FULL_HESSIAN and hessian is None:
        raise ValueError(f"method {method} needs the full Hessian")
    if method == "diag" and hessian is None and hessian_diag is None:
        raise ValueError("method diag needs the Hessian diagonal")
    inputs = {"sigma": sigma, "gradient": gradient, "hessian": hessian, "hessian_diag": hessian_diag}
    inputs = {name: t if t is None else t.to(sigma) for name, t in inputs.items()}  # no copy if already alike
    gradient, hessian, hessian_diag = inputs["gradient"], inputs["hessian"], inputs["hessian_diag"]
    for name, t in inputs.items():  # a sum is non-finite iff an entry is (barring overflow); no temporaries
        if t is not None and not bool(torch.isfinite(t.sum())):
            raise ValueError(f"{name} has non-finite entries")

    diagnostics = None
    gains = None
    if hessian is not None and method not in ("magnitude", "linear"):
        interactions, clipped_fraction, clipped_mass = _submodular_pass(hessian, sigma)
        diagnostics = {"clipped_fraction": clipped_fraction, "clipped_mass": clipped_mass, "monotone": None}
    elif method == "diag":
        diagnostics = {"clipped_fraction": None, "clipped_mass": None, "monotone": None}

    if budget == n and method in ("sublora-random", "exhaustive"):  # nothing to choose
        order = list(range(n))
        if method == "exhaustive":
            diagnostics["monotone"] = True
    elif method == "exhaustive":
        order, full = _exhaustive(sigma, gradient, hessian, budget, bounds, max_exhaustive)
        order = _without_dead(order, sigma, bounds)
        diagnostics["monotone"] = full
    else:
        if method == "magnitude":
            start = sigma.clone()
        elif method == "linear":
            start = (gradient * sigma).abs()
        elif method == "diag":
            diag = hessian_diag if hessian_diag is not None else torch.diagonal(hessian)
            start = -gradient * sigma + 0.5 * diag * sigma.square()
        elif method == "hessian":
            diag = torch.diagonal(hessian)
            start = -gradient * sigma - 0.5 * diag * sigma.square() + sigma * (hessian @ sigma)
        else:  # on Ĥ, whose diagonal is H's: σ_k(Ĥσ)_k = H_kk σ_k² + the kept interactions
            start = -gradient * sigma + 0.5 * torch.diagonal(hessian) * sigma.square() + interactions
        if method == "sublora-random":
            order, gains = _random_greedy(start, budget, bounds, sigma, hessian, seed)
        elif method in ("hessian", "sublora"):
            order, gains = _greedy(start, budget, bounds, sigma, hessian, submodular=method == "sublora")
        else:
            order, gains = _greedy(start, budget, bounds, sigma)
        if diagnostics is not None:
            tolerance = 1e-10 * float(start.abs().max()) if n else 0.0
            diagnostics["monotone"] = all(gain >= -tolerance for gain in gains)
        if method in ("magnitude", "linear"):
            gains = None

    kept = torch.zeros(n, dtype=torch.bool, device=sigma.device)
    kept[order] = True
    increase = None
    if gradient is not None and hessian is not None:
        increase = predicted_increase(kept, sigma, gradient, hessian)
    elif gradient is not None and hessian_diag is not None:
        pruned = torch.where(kept, torch.zeros_like(sigma), sigma)
        increase = float(-(gradient @ pruned) + 0.5 * (hessian_diag @ pruned.square()))
    return Selection(kept, order, predicted_increase=increase, diagnostics=diagnostics, gains=gains)
