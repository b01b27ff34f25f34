"""The rank-allocation report: `sublora_report.json` (the machine contract, docs/design.md §4) and its Markdown twin.

Keys of the JSON report are stable: add freely, rename never.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

from sublora_cli import __version__
from sublora_cli.core.budget import read_budget
from sublora_cli.core.select import Selection
from sublora_cli.core.svd import Spectrum
from sublora_cli.formats import Adapter, PrunedModule

JSON_REPORT = "sublora_report.json"
MD_REPORT = "sublora_report.md"


def strict_json(value: Any) -> str:
    """JSON that strict parsers accept: NaN and ±Infinity (e.g. a metric that diverged) are written as null."""
    return json.dumps(_finite_or_none(value), indent=2, allow_nan=False)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(v) for v in value]
    return value


def non_finite_metric_warnings(metrics: dict[str, float] | None, when: str) -> list[str]:
    """A warning per NaN/Inf metric of evaluate(), which the JSON outputs record as null."""
    return [
        f"evaluate(model) returned {name} = {value} {when}; it is written as null in the JSON output."
        for name, value in (metrics or {}).items()
        if not math.isfinite(value)
    ]


def _totals(pruned: list[PrunedModule], carried: dict) -> dict:
    before = sum(p.module.params for p in pruned)
    after = sum(p.module.params * p.rank_after // p.module.rank for p in pruned)
    return {
        "rank_before": sum(p.module.rank for p in pruned),
        "rank_after": sum(p.rank_after for p in pruned),
        "params_before": before,
        "params_after": after,
        "bytes_before": sum(p.module.params * p.module.element_size for p in pruned),
        "bytes_after": sum(p.module.params * p.rank_after // p.module.rank * p.module.element_size for p in pruned),
        "carried_bytes": sum(t.numel() * t.element_size() for t in carried.values()),  # written whatever is kept
    }


def build_report(
    *,
    adapter: Adapter,
    spectra: list[Spectrum],
    pruned: list[PrunedModule],
    method: str,
    curvature: str | None,
    budget_requested: str,
    budget_resolved: int | float,
    bounds: dict,
    budget_extra: dict | None = None,
    selection: Selection,
    seed: int,
    timings: dict,
    loss: dict | None = None,
    metrics: dict | None = None,
    calibration: dict | None = None,
    quality: dict | None = None,
) -> dict:
    """Assemble the report. `timings` is kept by reference so stages that finish later still land in it."""
    modules = []
    for p, spectrum in zip(pruned, spectra, strict=True):
        sigma = spectrum.sigma
        modules.append(
            {
                "name": p.module.name,
                "kind": p.module.kind,
                "shape": list(p.module.shape),
                "rank_before": p.module.rank,
                "rank_after": p.rank_after,
                "kept": p.kept,
                "sigma": [float(s) for s in p.spectrum.sigma],  # as written (refit values when refit)
                "sigma_before": [float(s) for s in sigma],
                "scale": p.module.scale,
            }
        )
    report = {
        "tool_version": __version__,
        "method": method,
        "curvature": curvature,
        "seed": seed if method == "sublora-random" else None,
        "input": {"path": str(adapter.path), "sha256": adapter.sha256, "format": adapter.format.name},
        "budget": {
            "requested": str(budget_requested),
            "reading": read_budget(budget_requested).reading,
            "resolved": budget_resolved,
            **bounds,
            **(budget_extra or {}),
        },
        "totals": _totals(pruned, adapter.carried),
        "modules": modules,
        "calibration": calibration,
        "loss": loss,
        "metrics": metrics,
        "quality": quality,
        "diagnostics": selection.diagnostics,
        "timings": timings,
    }
    report["digest"] = decision_digest(report)
    return report


def decision_digest(report: dict) -> str:
    """sha256 of what the report decided (input, method, budget, every module's kept components): written into the
    report and, by formats with room for metadata, into the pruned file, so the two can be matched."""
    decision = {
        "input_sha256": report["input"]["sha256"],
        "method": report["method"],
        "curvature": report["curvature"],
        "budget": report["budget"],
        "modules": [[m["name"], m["rank_before"], m["kept"]] for m in report["modules"]],
    }
    return hashlib.sha256(json.dumps(decision, sort_keys=True).encode()).hexdigest()


def provenance(report: dict) -> dict:
    """What a writer may record about how the file was made (the `sublora` metadata entry of single files)."""
    return {
        "tool_version": report["tool_version"],
        "method": report["method"],
        "budget": report["budget"]["requested"],
        "budget_resolved": report["budget"]["resolved"],
        "report_digest": report["digest"],
    }


def round_lines(report: dict) -> list[str]:
    """One line per round of --rounds: the loss after training, after selection and as written, the rank kept."""
    rounds = report.get("rounds") or []
    if not rounds:
        return []
    options = report["options"]
    lines = [f"rounds: {len(rounds)} × {options['train_steps']} steps, --train {options['train']}, --optimizer "
             f"{options['optimizer']} (see training.png)"]  # fmt: skip
    training_free = report["loss"].get("training_free")
    if training_free is not None:
        lines.append(f"  no rounds (a prune of the input adapter to the same budget): written {training_free:.4g}")
    for r in rounds:
        lines.append(
            f"  round {r['round']}: trained {r['loss_after_training']:.4g} → selected {r['loss_after_selection']:.4g} "
            f"→ written {r['loss_after']:.4g}, rank {r['rank']}, {r['seconds']:.1f} s"
        )
    return lines


def refit_lines(report: dict) -> list[str]:
    """The loss with the kept σ as trained, what the refit did, and the loss without the adapter, one line each
    (the terminal summary and the .md report print the same)."""
    loss, refit = report.get("loss"), report.get("refit")
    if not loss:
        return []
    lines = []
    if refit is None:
        lines.append("refit: off (the kept σ are written as trained)")
    elif refit["accepted"]:
        lines.append(
            f"refit: loss {loss['after_selection']:.6g} after selection → {loss['after']:.6g} written "
            f"(measured change {refit['measured_change']:.3g}, predicted {refit['predicted_change']:.3g}; damping "
            f"{refit['damping']:g}, step {refit['step']:g}, {refit['evaluations']} evaluations)"
        )
    else:
        lines.append(
            f"refit: not accepted, no candidate beat the loss after selection {loss['after_selection']:.6g} "
            f"({refit['evaluations']} evaluations); the kept σ are written as trained"
        )
    lines.append(f"loss without the adapter (every σ = 0): {loss['without_adapter']:.6g}")
    if loss["after"] > loss["without_adapter"]:
        lines.append("WARNING: the pruned adapter is worse than no adapter at all")
    return lines


def render_markdown(report: dict) -> str:
    """A human-readable rank-allocation report (the same figures as the JSON)."""
    t = report["totals"]
    lines = [
        "# sublora rank-allocation report",
        "",
        f"- input: `{report['input']['path']}` (sha256 `{report['input']['sha256'][:16]}…`)",
        f"- method: `{report['method']}`" + (f", curvature `{report['curvature']}`" if report["curvature"] else ""),
        f"- budget: {report['budget']['requested']} (read as {reading_phrase(report['budget']['reading'])}) → "
        f"{report['budget']['resolved']:,g} {_unit_words(report['budget'])}",
        f"- rank {t['rank_before']} → {t['rank_after']}, parameters {t['params_before']:,} → {t['params_after']:,}, "
        f"bytes {t['bytes_before']:,} → {t['bytes_after']:,}",
    ]
    if report["calibration"]:
        c = report["calibration"]
        lines.append(f"- calibration: `{c['script']}`, {c['batches']} batches, {c['device']} {c['dtype']}")
        if c.get("curvature_reason"):
            lines.append(f"- curvature `{report['curvature']}` ({c['curvature_strategy']}): {c['curvature_reason']}")
        lines += [f"- note: {note}" for note in c.get("curvature_notes", [])]
    if report["loss"]:
        loss = report["loss"]
        predicted = "n/a" if loss["predicted_increase"] is None else f"{loss['predicted_increase']:.6g}"
        lines.append(
            f"- loss {loss['before']:.6g} → {loss['after']:.6g}: measured increase {loss['increase']:.6g} "
            f"({loss['relative_increase']:.2%}), predicted {predicted}"
        )
        lines += [f"- {line}" for line in refit_lines(report)]
        lines += [f"- {line}" for line in round_lines(report)]
    if report["metrics"]:
        for name, before in report["metrics"]["before"].items():
            lines.append(f"- {name}: {before:.6g} → {report['metrics']['after'].get(name, float('nan')):.6g}")
    if report.get("quality"):
        q = report["quality"]
        lines.append(
            f"- quality gate --max-loss-increase {q['max_loss_increase']}: {'passed' if q['passed'] else 'FAILED'}"
        )
    if report["diagnostics"]:
        d = report["diagnostics"]
        if d["clipped_fraction"] is not None:
            lines.append(
                f"- projection clipped {d['clipped_fraction']:.1%} of off-diagonal entries "
                f"({d['clipped_mass']:.1%} of their mass)"
            )
        lines.append(f"- every gain ≥ 0 when picked (monotone): {d['monotone']}")
    lines += [
        "",
        "| module | shape | rank before | rank after | kept σ (largest first) |",
        "|---|---|---|---|---|",
    ]
    for m in report["modules"]:
        sigma = ", ".join(f"{s:.3g}" for s in m["sigma"][:8]) + (" …" if len(m["sigma"]) > 8 else "")
        lines.append(
            f"| `{m['name']}` | {m['shape'][0]}×{m['shape'][1]} | {m['rank_before']} | {m['rank_after']} | {sigma} |"
        )
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.3f}" for k, v in report["timings"].items()), ""]
    return "\n".join(lines)


def _unit_words(budget: dict) -> str:
    """What `resolved` counts, and for bytes and parameters what was used and carried."""
    unit = budget.get("unit", "rank")
    if unit == "rank":
        return "components"
    return (
        f"{unit} for the components; used {budget['used']:,g} of {budget['capacity']:,g} {unit} "
        f"(carried tensors {budget['carried']:,g}, whole adapter {budget['whole']:,g})"
    )


def write_reports(report: dict, out_dir: Path) -> None:
    (out_dir / JSON_REPORT).write_text(strict_json(report) + "\n")
    (out_dir / MD_REPORT).write_text(render_markdown(report))


def reading_phrase(reading: str) -> str:
    """How a budget was read, in a sentence: "a rank", "a percentage", "a size in bytes", "an auto search"."""
    return {"auto": "an auto search", "bytes": "a size in bytes", "params": "a parameter count"}.get(
        reading, f"a {reading}"
    )
