"""How module names are shown where room is short (terminal tables, plot panels): the prefix every name shares is
said once, a name too long for its column keeps its end, and a module's type (q_proj, attn1_to_q, fc1: what follows
its last layer index) groups the modules of a transformer adapter."""

from __future__ import annotations

import os
import re

_LAYER_INDEX = re.compile(r"[._]\d+[._]")  # a numeric path component: `.0.` (dotted names) or `_0_` (kohya names)


def common_prefix(names: list[str]) -> str:
    """The longest prefix of every name that ends at a separator (`.` in dotted names, else `_`), so each name keeps
    a non-empty rest; empty for fewer than two names (one module keeps its full name)."""
    if len(names) < 2:
        return ""
    separator = "." if any("." in name for name in names) else "_"
    shared = os.path.commonprefix(names)
    return shared[: shared.rfind(separator) + 1]


def tail(name: str, width: int) -> str:
    """`name` cut from the left to `width` characters (`…attn.q_proj`): its end tells modules apart."""
    return name if len(name) <= width else "…" + name[len(name) - width + 1 :]


def module_type(name: str) -> str:
    """What follows a module's last layer index (model.layers.3.self_attn.q_proj → self_attn.q_proj,
    lora_unet_…_blocks_0_attn1_to_q → attn1_to_q); the whole name when it has none (fc1)."""
    return _LAYER_INDEX.split(name)[-1]
