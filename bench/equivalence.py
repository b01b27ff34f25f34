"""Refactoring guard: prune the 9 shipped PINN adapters and the Llama sample with every method at several budgets
(plus one `--rounds 1` cell per family) and record what a user can observe — kept sets, the written safetensors
and config, the report less its timings.

Run before and after a refactor that must not change behaviour, then compare:

    python bench/equivalence.py --out before.json
    ... refactor ...
    python bench/equivalence.py --out after.json --compare before.json

It drives the command line in-process (the flags are the stable interface), so it survives internal moves.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
import time
from pathlib import Path

from sublora_cli.cli.app import main as cli_main

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_checkpoints"
METHODS = ("magnitude", "linear", "diag", "hessian", "sublora", "sublora-random", "obs")
BUDGETS = (10, 30, 50, 70)
VOLATILE = ("timings", "seconds")  # keys whose values differ run to run


def adapters() -> list[tuple[Path, Path]]:
    """(adapter directory, its calibration script) for every shipped PINN adapter."""
    pairs = []
    for family in sorted(p for p in SAMPLES.iterdir() if p.is_dir()):
        for adapter in sorted(family.glob("adapter_*")):
            pairs.append((adapter, family / f"calib_{adapter.name.removeprefix('adapter_')}.py"))
    pairs.append((SAMPLES / "llama" / "adapter", SAMPLES / "llama" / "calib.py"))
    return pairs


def cells() -> list[tuple[Path, Path, str, int, tuple[str, ...]]]:
    """(adapter, calibration script, method, budget, extra flags): every method × budget, and one training cell
    (`--rounds 1`, sublora at 50) for the first adapter of each family."""
    grid, families = [], set()
    for adapter, calib in adapters():
        grid += [(adapter, calib, method, budget, ()) for method in METHODS for budget in BUDGETS]
        if adapter.parent.name not in families:
            families.add(adapter.parent.name)
            grid.append((adapter, calib, "sublora", 50, ("--rounds", "1", "--train-steps", "20")))
    return grid


def run_cli(args: list[str]) -> int:
    argv, sys.argv = sys.argv, ["sublora", *args]
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli_main()
    except SystemExit as e:
        return int(e.code or 0)
    finally:
        sys.argv = argv
    return 0


def strip_volatile(value):
    if isinstance(value, dict):
        return {k: strip_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [strip_volatile(v) for v in value]
    return value


def observe(adapter: Path, calib: Path, method: str, budget: int, extra: tuple[str, ...], work: Path) -> dict:
    out = work / f"{adapter.parent.name}-{adapter.name}-{method}-{budget}{''.join(extra)}"
    args = ["prune", str(adapter), "--budget", str(budget), "--method", method, "--out", str(out), *extra]
    if method != "magnitude":
        args += ["--calib", str(calib)]
    code = run_cli(args)
    if code != 0:
        return {"exit_code": code}
    report = json.loads((out / "sublora_report.json").read_text())
    report["input"].pop("path", None)  # the same file, possibly reached by another path
    return {
        "exit_code": code,
        "kept": {m["name"]: m["kept"] for m in report["modules"]},
        "safetensors_sha256": hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest(),
        "config": json.loads((out / "adapter_config.json").read_text()),
        "report": strip_volatile(report),
    }


def differences(before, after, path: str = "") -> list[str]:
    """Paths where two observations differ (first few levels named)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = []
        for key in sorted(set(before) | set(after)):
            if key not in before or key not in after:
                found.append(f"{path}/{key}: only {'after' if key in after else 'before'}")
            else:
                found += differences(before[key], after[key], f"{path}/{key}")
        return found
    return [] if before == after else [f"{path}: {str(before)[:80]} != {str(after)[:80]}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the observations (JSON)")
    parser.add_argument("--compare", type=Path, help="observations of an earlier run to compare with")
    parser.add_argument("--only", default="", help="only keys containing this, e.g. elliptic/adapter_k2")
    args = parser.parse_args()
    observations = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for adapter, calib, method, budget, extra in cells():
            key = "/".join([adapter.parent.name, adapter.name, method, str(budget), *extra])
            if args.only not in key:
                continue
            observations[key] = observe(adapter, calib, method, budget, extra, Path(tmp))
            print(f"{key}: exit {observations[key]['exit_code']}", flush=True)
    args.out.write_text(json.dumps(observations, indent=1, sort_keys=True) + "\n")
    print(f"{len(observations)} runs in {time.perf_counter() - start:.0f} s -> {args.out}")
    if args.compare:
        before = {k: v for k, v in json.loads(args.compare.read_text()).items() if args.only in k}
        found = differences(before, observations)
        print(f"compared with {args.compare}: {len(found)} difference(s)")
        for line in found[:50]:
            print("  " + line)
        sys.exit(1 if found else 0)


if __name__ == "__main__":
    main()
