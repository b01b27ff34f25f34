"""The two data-free objectives side by side on the trained samples: `magnitude` (the smallest Frobenius error of the
whole ΔW) and `balanced` (the smallest worst-module relative error), at the same budgets, with the held-out metrics
of each written adapter (the sample's `evaluate()`).

Run: python bench/objectives.py [--budgets 10% 25% 50%] [--json bench_out/objectives.json]

For each sample × budget × method: the whole-file relative error ‖ΔW − ΔW'‖F / ‖ΔW‖F, the largest per-module one,
the modules dropped entirely (the report's totals and modules), and the calibration loss and metrics of the written
adapter (`sublora eval`'s code path).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from sublora_cli.commands.evaluate import evaluate_adapter
from sublora_cli.commands.options import EvalOptions
from sublora_cli.commands.prune import PruneOptions, prune

SAMPLES = Path(__file__).resolve().parents[1] / "sample_checkpoints"
CASES = {  # name: (adapter, calibration script)
    "llama": (SAMPLES / "llama" / "adapter", SAMPLES / "llama" / "calib.py"),
    "llama-adalora": (SAMPLES / "llama" / "adalora", SAMPLES / "llama" / "calib.py"),
    "sd-kohya": (SAMPLES / "sd" / "lora.safetensors", SAMPLES / "sd" / "calib.py"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", nargs="+", default=["10%", "25%", "50%"])
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for case, (adapter, calib) in CASES.items():
            for budget in args.budgets:
                for method in ("magnitude", "balanced"):
                    out = Path(tmp) / f"{case}-{budget}-{method}"
                    report = prune(adapter, PruneOptions(budget=budget, method=method), out_dir=out).report
                    written = out / adapter.name if adapter.is_file() else out
                    measured = evaluate_adapter(written, EvalOptions(calib=calib))
                    row = {
                        "case": case,
                        "budget": budget,
                        "method": method,
                        "relative_error": report["totals"]["relative_error"],
                        "worst_module_error": report["totals"]["worst_module_error"],
                        "dropped_modules": sum(m["rank_after"] == 0 for m in report["modules"]),
                        "modules": len(report["modules"]),
                        "loss": measured["loss"],
                        "metrics": measured["metrics"],
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
