"""`sweep` resolves every budget exactly as `prune --budget` does (issue 19): ranks, shares, sizes and parameter
counts, per-module bounds and --dtype-out give the same kept sets and measured losses in both commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sublora_cli.core.budget import read_budget_axis
from sublora_cli.errors import SubloraError

SAMPLE = Path(__file__).resolve().parents[1] / "sample_checkpoints" / "elliptic"
ADAPTER, CALIB = SAMPLE / "adapter_k2", SAMPLE / "calib_k2.py"


@pytest.mark.parametrize(
    "budgets, extra",
    [
        ("30%,12", ()),
        ("3KB,6KB", ()),
        ("2k:4k:1k", ()),
        ("40%", ("--budget-unit", "bytes", "--dtype-out", "bf16")),
        ("10,20", ("--min-rank", "2", "--max-rank", "6")),
    ],
)
def test_every_sweep_row_is_what_prune_writes_for_that_budget(tmp_path, run_cli, budgets, extra):
    common = ["--calib", CALIB, "--dtype", "float64", "--curvature", "exact", *extra]
    swept = run_cli("sweep", ADAPTER, "--budgets", budgets, "--methods", "magnitude,diag", "--no-evaluate",
                    "-o", tmp_path / "sweep", *common)  # fmt: skip
    assert swept.code == 0, swept.stderr
    rows = json.loads((tmp_path / "sweep" / "sweep.json").read_text())["rows"]
    written = [b.strip() for b in budgets.split(",")] if ":" not in budgets else None
    for budget in written or []:
        for method in ("magnitude", "diag"):
            out = tmp_path / f"p-{method}-{budget}"
            pruned = run_cli("prune", ADAPTER, "--budget", budget, "--method", method, "-o", out, *common)
            assert pruned.code == 0, pruned.stderr
            report = json.loads((out / "sublora_report.json").read_text())
            rank = sum(m["rank_after"] for m in report["modules"])
            matching = [r for r in rows if r["method"] == method and r["rank_after"] == rank]
            assert matching, (budget, method, rank, [(r["budget"], r["rank_after"]) for r in rows])
            assert any(r["loss_after"] == pytest.approx(report["loss"]["after"], rel=1e-12) for r in matching)
    if written is None:
        assert len({r["budget"] for r in rows}) == 3  # the range 2k, 3k, 4k


def test_the_axis_reads_each_entry_as_budget_does():
    assert [s.value for s in read_budget_axis("100KB:300KB:100KB")] == [100_000, 200_000, 300_000]
    assert [s.reading for s in read_budget_axis("10,25%,0.5")] == ["rank", "percentage", "fraction"]
    for bad in ("10KB,5k", "auto", "10%:50%:10%", "1MB:100KB:100KB", ""):
        with pytest.raises(SubloraError, match="--budgets"):
            read_budget_axis(bad)
