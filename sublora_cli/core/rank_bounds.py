"""Per-module rank bounds: `RankBounds`, the lower/upper kept count of every module that the selection obeys, and
the flags' syntax users write them in: one number for every module (`4`), or patterns (`q_proj=4,*=0`,
`mlp.*=32`) matched as globs against module names, so a bound can single out a projection or a block.

A pattern matches a module whose full name it matches (`model.layers.0.mlp.up_proj`) or any dotted tail of it
(`up_proj`, `mlp.*`); the first pattern that matches a module wins, and a module no pattern matches keeps the
flag's default. A pattern that matches no module is an error that lists the module names.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from sublora_cli.errors import SubloraError

LARGEST = 2**31 - 1  # above any module's rank (torch indexes ranks as int64; a bound this large is a typo)
FORMS = "give a whole number for every module (4) or pattern=number pairs, comma-separated (q_proj=4,mlp.*=32,*=0)"


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


def read_rank_bound(value: str | int) -> int | str:
    """A bound's syntax: an int stays an int; patterns are returned as normalised text (`a=1,b=2`)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return _count(str(value), str(value))
    text = str(value).strip()
    if "=" not in text:
        return _count(text, text)
    pairs = [_pair(item.strip(), text) for item in text.split(",") if item.strip()]
    return ",".join(f"{pattern}={count}" for pattern, count in pairs)


def _count(number: str, raw: str) -> int:
    try:
        count = int(number)
    except ValueError:
        raise SubloraError(f"{raw!r} is not a rank bound: {FORMS}.") from None
    if count < 0:
        raise SubloraError(f"{raw}: must be 0 or more.")
    if count > LARGEST:
        raise SubloraError(
            f"{raw}: larger than any module's rank can be (at most {LARGEST}); for no upper bound "
            "leave --max-rank out."
        )
    return count


def _pair(item: str, raw: str) -> tuple[str, int]:
    pattern, _, number = item.partition("=")
    if not pattern.strip():
        raise SubloraError(f"{raw!r}: {item!r} has no pattern; {FORMS}.")
    return pattern.strip(), _count(number.strip(), raw)


def matches(pattern: str, name: str) -> bool:
    """Whether `pattern` matches the module `name` or one of its dotted tails."""
    parts = name.split(".")
    return any(fnmatchcase(".".join(parts[i:]), pattern) for i in range(len(parts)))


def per_module(names: list[str], bound: int | str | None, flag: str, default: int | None) -> list[int | None]:
    """The bound of every module: one number for all, or the first matching pattern's (else `default`)."""
    if bound is None or isinstance(bound, int):
        return [default if bound is None else bound] * len(names)
    pairs = [_pair(item, bound) for item in str(bound).split(",")]
    unmatched = [pattern for pattern, _ in pairs if not any(matches(pattern, name) for name in names)]
    if unmatched:
        raise SubloraError(
            f"{flag} pattern {', '.join(map(repr, unmatched))} matches no module; the modules are: "
            f"{', '.join(names)}."
        )
    return [next((count for pattern, count in pairs if matches(pattern, name)), default) for name in names]
