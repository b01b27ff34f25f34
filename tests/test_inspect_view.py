"""`sublora inspect` read by a person: the table fits 80 and 120 columns with q/k/v/o of a layer told apart and
shapes whole, and `--plot` draws the spectra (the figure is read back from the matplotlib object saved)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sublora_cli.cli import render
from sublora_cli.pipeline.names import common_prefix, module_type, tail

LLAMA = Path(__file__).parent.parent / "sample_checkpoints" / "llama" / "adapter"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize("columns", [80, 120])
def test_inspect_fits_the_terminal_and_tells_modules_apart(run_cli, monkeypatch, columns):
    monkeypatch.setattr(render.out, "width", columns)
    result = run_cli("inspect", LLAMA)
    assert result.code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert max(len(line.rstrip()) for line in lines) <= columns
    assert "names below follow model.layers." in result.stdout and "scale 2 in every module" in result.stdout
    rows = [line.split() for line in lines if line[:1].isdigit() and "×" in line]
    assert len(rows) == 28
    names = [row[0] for row in rows]
    assert len(set(names)) == 28 and "…" not in "".join(names)  # every module named in full after the prefix
    for layer in range(4):
        for projection in PROJECTIONS:
            part = "self_attn" if projection[0] in "qkvo" else "mlp"
            assert f"{layer}.{part}.{projection}" in names
    shapes = {row[1] for row in rows}
    assert shapes == {"128×128", "128×344", "344×128"}  # never cut


def test_names_are_cut_from_the_left_and_typed_by_what_follows_the_layer():
    kohya = ["lora_unet_down_blocks_0_attentions_0_proj_in", "lora_unet_down_blocks_0_attentions_1_proj_in"]
    assert common_prefix(kohya) == "lora_unet_down_blocks_0_attentions_"
    assert common_prefix(["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]) == "model.layers."
    assert common_prefix(["fc1", "fc2"]) == "" and common_prefix(["only.one.module"]) == ""
    assert tail("transformer_blocks_0_attn1_to_q", 12) == "…_attn1_to_q" and tail("fc1", 12) == "fc1"
    assert module_type("model.layers.3.self_attn.q_proj") == "self_attn.q_proj"
    assert module_type("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q") == "attn1_to_q"
    assert module_type("fc1") == "fc1"


def test_inspect_plot_draws_one_panel_per_module_type(tmp_path, run_cli, saved_figures):
    result = run_cli("inspect", LLAMA, "--plot", tmp_path / "spectra.png", "--json")
    assert result.code == 0, result.stderr
    assert (tmp_path / "spectra.png").stat().st_size > 0 and f"wrote {tmp_path / 'spectra.png'}" in result.stderr
    ((figure, _),) = saved_figures
    panels = [ax for ax in figure.axes if ax.get_visible()]
    titles = {ax.get_title() for ax in panels}
    assert titles == {f"{'self_attn' if p[0] in 'qkvo' else 'mlp'}.{p} (4 modules)" for p in PROJECTIONS}
    for ax in panels:
        assert len(ax.get_lines()) == 4 and ax.get_yscale() == "log"
        assert [t.get_text() for t in ax.get_legend().get_texts()][0].startswith("0.")
    assert panels[0].get_ylabel() == "σ_k of ΔW (scale included)"
    assert "singular values of ΔW" in figure.get_suptitle()


def test_inspect_plot_into_a_missing_folder_is_refused(tmp_path, run_cli):
    result = run_cli("inspect", LLAMA, "--plot", tmp_path / "nope" / "spectra.png")
    assert result.code == 1 and "does not exist" in result.stderr and "Traceback" not in result.stderr
