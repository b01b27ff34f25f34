"""Per-module --min-rank/--max-rank by glob pattern on module names."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli_errors import PREFIX, assert_refused, assert_usage_error, write_adapter

from sublora_cli.core.rank_bounds import per_module, read_rank_bound
from sublora_cli.errors import SubloraError

NAMES = ["model.layers.0.mlp.up_proj", "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]


def test_patterns_match_dotted_tails_and_the_first_match_wins():
    assert per_module(NAMES, "q_proj=4,*=0", "--min-rank", 0) == [0, 4, 4]
    assert per_module(NAMES, "mlp.*=32", "--max-rank", None) == [32, None, None]
    assert per_module(NAMES, "layers.1.*=1,q_proj=2", "--max-rank", None) == [None, 2, 1]
    assert per_module(NAMES, 3, "--min-rank", 0) == [3, 3, 3]


def test_a_pattern_that_matches_nothing_lists_the_modules():
    with pytest.raises(SubloraError, match="'v_proj' matches no module; the modules are: model.layers.0.mlp.up_proj"):
        per_module(NAMES, "q_proj=1,v_proj=2", "--max-rank", None)


@pytest.mark.parametrize("text", ["x=a", "=3", "q=-1", "four", "-2"])
def test_malformed_bounds(text):
    with pytest.raises(SubloraError):
        read_rank_bound(text)


def two_modules(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        f"{PREFIX}attn.q_proj.lora_A.weight": torch.randn(3, 4, generator=g),
        f"{PREFIX}attn.q_proj.lora_B.weight": torch.randn(4, 3, generator=g),
        f"{PREFIX}mlp.up_proj.lora_A.weight": torch.randn(3, 4, generator=g),
        f"{PREFIX}mlp.up_proj.lora_B.weight": torch.randn(6, 3, generator=g),
    }
    return write_adapter(tmp_path / "a", tensors, {"r": 3, "target_modules": ["q_proj", "up_proj"]})


def test_prune_honours_bounds_by_pattern(tmp_path, run_cli):
    path = two_modules(tmp_path)
    result = run_cli("prune", path, "-b", "3", "--min-rank", "q_proj=2", "--max-rank", "mlp.*=1", "-o", tmp_path / "o")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "o" / "sublora_report.json").read_text())
    ranks = {m["name"]: m["rank_after"] for m in report["modules"]}
    assert ranks == {"attn.q_proj": 2, "mlp.up_proj": 1}
    assert report["options"]["min_rank"] == "q_proj=2"
    unmatched = run_cli("prune", path, "-b", "3", "--max-rank", "v_proj=1", "-o", tmp_path / "p")
    assert_refused(unmatched, "'v_proj' matches no module", "attn.q_proj, mlp.up_proj", out=tmp_path / "p")
    assert_usage_error(run_cli("prune", path, "-b", "3", "--min-rank", "q_proj=x"), "--min-rank", "pattern=number")
