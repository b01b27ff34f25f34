"""ranks.png: a layers × module type heat map for transformer adapters, bars otherwise, read back from the figure."""

from __future__ import annotations

import json

import pytest
from conftest import save_adapter
from test_kohya import SD15, kohya_file

from sublora_cli.pipeline import rank_plot
from sublora_cli.pipeline.rank_plot import rank_figure, split_layer

pytest.importorskip("matplotlib")


@pytest.mark.parametrize(
    "name, layer, kind",
    [
        ("model.layers.3.self_attn.q_proj", "model.layers.3", "self_attn.q_proj"),
        ("transformer.h.10.attn.c_attn", "transformer.h.10", "attn.c_attn"),
        ("lora_te1_text_model_encoder_layers_11_mlp_fc1", "lora_te1_text_model_encoder_layers_11", "mlp_fc1"),
        (  # the index inside the type (to_out_0) stays in the type
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_out_0",
            "lora_unet_input_blocks_4_1_transformer_blocks_0",
            "attn1_to_out_0",
        ),
        ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_input_blocks_4_1", "proj_in"),
        (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2",
            "unet.down_blocks.0.attentions.0.transformer_blocks.0",
            "ff.net.2",
        ),
    ],
)
def test_module_names_split_into_layer_and_type(name, layer, kind):
    assert split_layer(name) == (layer, kind)


@pytest.mark.parametrize("name", ["fc1", "model.layers.3", "conv"])
def test_names_without_a_layer_index_and_a_type_have_none(name):
    assert split_layer(name) is None


def module(name: str, before: int, after: int) -> dict:
    return {"name": name, "rank_before": before, "rank_after": after}


def labels(ticks) -> list[str]:
    return [t.get_text() for t in ticks]


def test_a_transformer_adapter_is_a_heat_map_of_layers_by_type():
    modules = [
        module(f"model.layers.{layer}.{kind}", 16, after)
        for layer, after in ((10, 1), (2, 5), (0, 9))
        for kind in ("self_attn.q_proj", "mlp.up_proj")
    ]
    fig = rank_figure(modules, "adapter: magnitude")
    ax = fig.axes[0]
    assert labels(ax.get_yticklabels()) == ["0", "2", "10"]  # layers in numeric order, the common prefix left out
    assert ax.get_ylabel() == "layer (model.layers.N)"
    assert labels(ax.get_xticklabels()) == ["mlp.up_proj", "self_attn.q_proj"]  # types in alphabetical order
    assert ax.get_title() == "rank after (rank before: 16 in every module)"
    assert [t.get_text() for t in ax.texts] == ["9", "9", "5", "5", "1", "1"]  # row by row, as the cells
    assert fig.axes[-1].get_ylabel() == "rank (kept components)"  # the colour bar
    assert fig.get_suptitle() == "adapter: magnitude"


def test_ranks_that_differ_before_get_a_panel_of_their_own():
    modules = [module(f"h.{i}.attn", 8 * (i + 1), i) for i in range(2)] + [module("h.0.mlp", 4, 4)]
    fig = rank_figure(modules, "t")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["rank before", "rank after"]
    assert [t.get_text() for t in fig.axes[0].texts] == ["8", "4", "16"]  # h.1 has no mlp: an empty cell
    assert [t.get_text() for t in fig.axes[1].texts] == ["0", "4", "1"]


def test_other_adapters_are_bars_of_the_rank_before_and_after():
    fig = rank_figure([module("net.fc1", 50, 17), module("net.fc2", 50, 33)], "pinn")
    ax = fig.axes[0]
    before, after = ax.containers
    assert [bar.get_width() for bar in before] == [50, 50]
    assert [bar.get_width() for bar in after] == [17, 33]
    assert labels(ax.get_yticklabels()) == ["fc1", "fc2"]
    assert ax.get_ylabel() == "module (net.…)"
    assert ax.get_xlabel() == "rank (kept components)"
    assert labels(ax.get_legend().get_texts()) == ["rank before", "rank after"]


def test_prune_writes_ranks_png_of_the_written_ranks(tmp_path, run_cli, monkeypatch):
    shown = {}
    real = rank_plot.rank_figure
    monkeypatch.setattr(rank_plot, "rank_figure", lambda modules, title: shown.setdefault("fig", real(modules, title)))
    path = kohya_file(tmp_path / "sd15.safetensors", SD15)
    result = run_cli("prune", path, "--budget", "12", "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    assert (tmp_path / "out" / "ranks.png").stat().st_size > 0
    report = json.loads(result.stdout)
    ax = shown["fig"].axes[0]  # SD-1.5 names without a repeated type: bars
    assert [bar.get_width() for bar in ax.containers[1]] == [m["rank_after"] for m in report["modules"]]
    assert shown["fig"].axes[0].get_title() == "sd15.safetensors: magnitude, --budget 12, total rank 32 → 12"


def test_without_matplotlib_prune_warns_and_writes_the_rest(tmp_path, run_cli, monkeypatch):
    monkeypatch.setattr(rank_plot, "pyplot", lambda: None)
    result = run_cli("prune", save_adapter("conv", tmp_path / "a"), "--budget", "4", "--out", tmp_path / "out")
    assert result.code == 0, result.stderr
    assert "no ranks.png" in result.stderr and "sublora[plots]" in result.stderr
    assert not (tmp_path / "out" / "ranks.png").exists() and (tmp_path / "out" / "sublora_report.json").exists()
