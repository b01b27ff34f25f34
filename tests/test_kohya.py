"""Single-file safetensors LoRAs (issue 11 parts 1-3, 7): kohya SD-1.5 / SDXL files with LoCon conv layers,
the diffusers / ComfyUI key families, LyCORIS types refused by name, and calibration through kohya's names.

Every file is built in code. For each: inspect, prune at full budget (ΔW unchanged), prune at a cut (ΔW is the
truncated SVD), the dtype and alpha / rank kept, the metadata as kohya's resize writes it.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save, save_file

from sublora_cli.core.svd import factor_svd
from sublora_cli.errors import SubloraError
from sublora_cli.formats import read_adapter
from sublora_cli.formats.kohya import KOHYA, resolve_model_module

# name → (out, in, rank, kernel or None); kernel 3: a LoCon 3×3 conv, kernel 1: a 1×1 conv (SD-1.5 proj_in)
SD15 = {
    "lora_unet_down_blocks_0_attentions_0_proj_in": (32, 32, 8, 1),
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32, 8, None),
    "lora_unet_down_blocks_0_resnets_0_conv1": (16, 8, 8, 3),
    "lora_te_text_model_encoder_layers_0_mlp_fc1": (64, 16, 8, None),
}
SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k": (40, 24, 8, None),
    "lora_unet_output_blocks_2_0_in_layers_2": (24, 16, 4, 3),
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj": (24, 24, 8, None),
    "lora_te2_text_model_encoder_layers_0_mlp_fc2": (32, 48, 4, None),
}
KOHYA_METADATA = {
    "ss_network_module": "networks.lora",
    "ss_network_dim": "8",
    "ss_network_alpha": "4",
    "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4"}),
    "ss_training_comment": "trained on cats",
    "modelspec.title": "cats",
    "sshs_model_hash": "0" * 64,
    "sshs_legacy_hash": "00000000",
}
# (down suffix, up suffix) of the diffusers / ComfyUI families, one module each
DIFFUSERS = {
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (".lora_A.weight", ".lora_B.weight"),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k": ("_lora.down.weight", "_lora.up.weight"),
    "unet.mid_block.attentions.0.proj_out": (".lora.down.weight", ".lora.up.weight"),
    "text_encoder.text_model.encoder.layers.0.mlp.fc1": (
        ".lora_linear_layer.down.weight",
        ".lora_linear_layer.up.weight",
    ),
}


def factors(out: int, inp: int, rank: int, kernel: int | None, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(down, up) with a decaying spectrum, in kohya's layout (LoCon: down (r, in, k, k), up (out, r, 1, 1))."""
    decay = torch.logspace(0, -1.5, rank)
    down = torch.randn(rank, inp * (kernel or 1) ** 2, generator=g) * decay[:, None]
    up = torch.randn(out, rank, generator=g) * 0.1
    if kernel is not None:
        return down.reshape(rank, inp, kernel, kernel), up.reshape(out, rank, 1, 1)
    return down, up


def kohya_file(path: Path, shapes: dict, dtype=torch.float16, alpha_ratio=0.5, metadata=None, extra=None) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, (out, inp, rank, kernel) in shapes.items():
        down, up = factors(out, inp, rank, kernel, g)
        tensors[f"{name}.lora_down.weight"] = down.to(dtype)
        tensors[f"{name}.lora_up.weight"] = up.to(dtype)
        tensors[f"{name}.alpha"] = torch.tensor(rank * alpha_ratio, dtype=dtype)
    tensors.update(extra or {})
    save_file(tensors, str(path), metadata=KOHYA_METADATA if metadata is None else metadata)
    return path


def diffusers_file(path: Path, metadata: dict | None = None) -> Path:
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for name, (down_suffix, up_suffix) in DIFFUSERS.items():
        down, up = factors(24, 16, 4, None, g)
        tensors[name + down_suffix], tensors[name + up_suffix] = down, up
    save_file(tensors, str(path), metadata=metadata)
    return path


def deltas(path: Path) -> dict[str, torch.Tensor]:
    """ΔW = scale · up · down per module, in float64, as the file defines it."""
    return {m.name: m.scale * m.B.double() @ m.A.double() for m in read_adapter(path).modules}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def tensors_and_metadata(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def prune(run_cli, path: Path, out: Path, *args) -> dict:
    result = run_cli("prune", path, "--out", out, "--json", *args)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


FILES = {
    "sd15": lambda p: kohya_file(p / "sd15.safetensors", SD15),
    "sdxl": lambda p: kohya_file(p / "sdxl.safetensors", SDXL, alpha_ratio=1.0),
    "sd15-fp32": lambda p: kohya_file(p / "sd15.safetensors", SD15, dtype=torch.float32),
    "diffusers": lambda p: diffusers_file(p / "pytorch_lora_weights.safetensors"),
}


@pytest.mark.parametrize("kind", FILES)
def test_inspect_reads_every_module(kind, tmp_path, run_cli):
    path = FILES[kind](tmp_path)
    result = run_cli("inspect", path, "--json")
    assert result.code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["input"]["format"] == "kohya"
    expected = {"sd15": SD15, "sd15-fp32": SD15, "sdxl": SDXL, "diffusers": DIFFUSERS}[kind]
    assert sorted(m["name"] for m in info["modules"]) == sorted(expected)
    kinds = {m["name"]: m["kind"] for m in info["modules"]}
    if kind.startswith("sd15"):
        assert kinds["lora_unet_down_blocks_0_resnets_0_conv1"] == "conv"
        assert {m["name"]: m["shape"] for m in info["modules"]}["lora_unet_down_blocks_0_resnets_0_conv1"] == [16, 72]


@pytest.mark.parametrize("kind", FILES)
def test_full_budget_keeps_every_update(kind, tmp_path, run_cli):
    path = FILES[kind](tmp_path)
    total = read_adapter(path).total_rank
    prune(run_cli, path, tmp_path / "out", "--budget", total)
    before, after = deltas(path), deltas(tmp_path / "out" / path.name)
    assert before.keys() == after.keys()
    for name in before:
        assert relative_error(after[name], before[name]) <= 1e-5, name


@pytest.mark.parametrize("kind", FILES)
def test_a_cut_writes_the_truncated_svd_in_the_input_dtype_and_scale(kind, tmp_path, run_cli):
    path = FILES[kind](tmp_path)
    original = read_adapter(path)
    report = prune(run_cli, path, tmp_path / "out", "--budget", original.total_rank // 2, "--min-rank", 1)
    written_path = tmp_path / "out" / path.name
    written = {m.name: m for m in read_adapter(written_path).modules}
    tensors_in, _ = tensors_and_metadata(path)
    tensors_out, _ = tensors_and_metadata(written_path)
    assert {k.rsplit(".", 2)[0] for k in tensors_out} <= {k.rsplit(".", 2)[0] for k in tensors_in}
    tolerance = 1e-5 if original.modules[0].A.dtype == torch.float32 else 2e-3  # fp16 storage rounding
    for module, entry in zip(original.modules, report["modules"], strict=True):
        kept = entry["kept"]
        pruned = written[module.name]
        expected = factor_svd(module.B, module.A, module.scale).dense(kept)
        assert relative_error(pruned.scale * pruned.B.double() @ pruned.A.double(), expected) <= tolerance
        assert pruned.rank == len(kept) and pruned.kind == module.kind
        assert pruned.A.dtype == module.A.dtype and pruned.B.dtype == module.B.dtype
        assert pruned.scale == pytest.approx(module.scale, rel=1e-12)  # alpha / rank unchanged
        assert pruned.a_shape[1:] == module.a_shape[1:] and pruned.b_shape[2:] == module.b_shape[2:]


def test_an_fp16_file_halves_when_the_rank_halves(tmp_path, run_cli):
    shapes = {name: (out, inp, 8, kernel) for name, (out, inp, _, kernel) in SD15.items()}
    path = kohya_file(tmp_path / "sd15.safetensors", shapes)
    prune(run_cli, path, tmp_path / "out", "--budget", "50%", "--max-rank", 4)
    tensors_in, _ = tensors_and_metadata(path)
    tensors_out, _ = tensors_and_metadata(tmp_path / "out" / path.name)
    bytes_in = sum(t.numel() * t.element_size() for k, t in tensors_in.items() if not k.endswith(".alpha"))
    bytes_out = sum(t.numel() * t.element_size() for k, t in tensors_out.items() if not k.endswith(".alpha"))
    assert bytes_out * 2 == bytes_in
    assert all(t.dtype == torch.float16 for t in tensors_out.values())
    assert all(float(tensors_out[k]) == 2.0 for k in tensors_out if k.endswith(".alpha"))  # alpha 4 at rank 8


def test_metadata_is_updated_as_kohya_resize_does_and_carried_otherwise(tmp_path, run_cli):
    path = kohya_file(tmp_path / "sd15.safetensors", SD15)
    report = prune(run_cli, path, tmp_path / "out", "--budget", 13)
    tensors, metadata = tensors_and_metadata(tmp_path / "out" / path.name)
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert metadata["ss_training_comment"].startswith("pruned by sublora from total rank 32 to 13 (magnitude")
    assert metadata["ss_training_comment"].endswith("; trained on cats")
    for key in ("ss_network_module", "ss_network_args", "modelspec.title"):
        assert metadata[key] == KOHYA_METADATA[key]
    sublora = json.loads(metadata["sublora"])
    assert sublora["method"] == "magnitude" and sublora["budget"] == "13" and sublora["budget_resolved"] == 13
    assert sublora["report_digest"] == report["digest"]
    # kohya's precalculate_safetensors_hashes: the file with only ss_* metadata; sha256 after the header, and
    # the first 8 hex digits of the sha256 of 64 KiB at 1 MiB (the file is smaller: the hash of nothing)
    blob = save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_end = 8 + int.from_bytes(blob[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(blob[header_end:]).hexdigest()
    assert metadata["sshs_legacy_hash"] == hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8]


def test_uniform_ranks_give_numeric_dim_and_alpha(tmp_path, run_cli):
    shapes = {name: (out, inp, 8, kernel) for name, (out, inp, _, kernel) in SD15.items()}
    path = kohya_file(tmp_path / "sd15.safetensors", shapes)
    prune(run_cli, path, tmp_path / "out", "--budget", 12, "--min-rank", 3, "--max-rank", 3)
    _, metadata = tensors_and_metadata(tmp_path / "out" / path.name)
    assert (metadata["ss_network_dim"], metadata["ss_network_alpha"]) == ("3", "1.5")


def test_a_file_without_alpha_uses_alpha_equal_to_rank_and_gets_none(tmp_path, run_cli):
    path = kohya_file(tmp_path / "a.safetensors", SD15, metadata={})
    tensors, _ = tensors_and_metadata(path)
    save_file({k: v for k, v in tensors.items() if not k.endswith(".alpha")}, str(path))
    assert {m.scale for m in read_adapter(path).modules} == {1.0}
    prune(run_cli, path, tmp_path / "out", "--budget", 10)
    out_tensors, metadata = tensors_and_metadata(tmp_path / "out" / path.name)
    assert not any(k.endswith(".alpha") for k in out_tensors)
    assert "ss_network_dim" not in metadata and "sshs_model_hash" not in metadata and "sublora" in metadata


def test_diffusers_metadata_sets_the_scale_and_is_rewritten_to_the_new_ranks(tmp_path, run_cli):
    config = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q"], "text_encoder.r": 4}
    path = diffusers_file(tmp_path / "d.safetensors", {"lora_adapter_metadata": json.dumps(config)})
    scales = {m.name: m.scale for m in read_adapter(path).modules}
    assert scales["unet.mid_block.attentions.0.proj_out"] == 2.0
    assert scales["text_encoder.text_model.encoder.layers.0.mlp.fc1"] == 2.0  # peft's default lora_alpha 8, r 4
    report = prune(run_cli, path, tmp_path / "out", "--budget", 7, "--min-rank", 1)
    _, metadata = tensors_and_metadata(tmp_path / "out" / path.name)
    written = json.loads(metadata["lora_adapter_metadata"])
    assert written["unet.r"] == 4 and written["unet.lora_alpha"] == 8 and written["unet.target_modules"] == ["to_q"]
    ranks = {m["name"]: m["rank_after"] for m in report["modules"]}
    name = "unet.mid_block.attentions.0.proj_out"
    key = "mid_block\\.attentions\\.0\\.proj_out"
    assert written["unet.rank_pattern"][key] == ranks[name]
    assert written["unet.alpha_pattern"][key] == 2.0 * ranks[name]
    te = "text_model\\.encoder\\.layers\\.0\\.mlp\\.fc1"
    assert written["text_encoder.alpha_pattern"][te] == 2.0 * ranks["text_encoder.text_model.encoder.layers.0.mlp.fc1"]
    after = deltas(tmp_path / "out" / path.name)  # re-read with the rewritten metadata: same scales
    for module, entry in zip(read_adapter(path).modules, report["modules"], strict=True):
        expected = factor_svd(module.B, module.A, module.scale).dense(entry["kept"])
        assert relative_error(after[module.name], expected) <= 1e-5


def test_flux_fused_qkv_with_block_sparse_up_is_one_low_rank_module(tmp_path, run_cli):
    """kohya's split_qkv saves q/k/v as one pair: down stacks the three downs, up is block-diagonal, alpha is
    stored for the stacked rank. That is a plain low-rank product of the fused weight: pruned as one module."""
    g = torch.Generator().manual_seed(2)
    downs = [torch.randn(4, 24, generator=g) for _ in range(3)]
    ups = [torch.randn(24, 4, generator=g) * 0.1 for _ in range(3)]
    name = "lora_unet_double_blocks_0_img_attn_qkv"
    tensors = {
        f"{name}.lora_down.weight": torch.cat(downs),
        f"{name}.lora_up.weight": torch.block_diag(*ups),
        f"{name}.alpha": torch.tensor(3 * 2.0),  # alpha 2 per projection of rank 4
    }
    path = tmp_path / "flux.safetensors"
    save_file(tensors, str(path))
    (module,) = read_adapter(path).modules
    fused = torch.cat([u.double() @ d.double() for u, d in zip(ups, downs, strict=True)]) * 0.5
    assert relative_error(module.scale * module.B.double() @ module.A.double(), fused) <= 1e-12
    report = prune(run_cli, path, tmp_path / "out", "--budget", 5)
    (pruned,) = read_adapter(tmp_path / "out" / path.name).modules
    expected = factor_svd(module.B, module.A, module.scale).dense(report["modules"][0]["kept"])
    assert relative_error(pruned.scale * pruned.B.double() @ pruned.A.double(), expected) <= 1e-5


def test_carried_tensors_pass_through_unchanged(tmp_path, run_cli):
    extra = {"lora_unet_time_embed_0.diff_b": torch.arange(4.0).half()}
    path = kohya_file(tmp_path / "a.safetensors", SD15, extra=extra)
    prune(run_cli, path, tmp_path / "out", "--budget", 9)
    tensors, _ = tensors_and_metadata(tmp_path / "out" / path.name)
    assert torch.equal(tensors["lora_unet_time_embed_0.diff_b"], extra["lora_unet_time_embed_0.diff_b"])


def test_the_default_output_directory_is_named_after_the_file(tmp_path, run_cli):
    path = kohya_file(tmp_path / "cats.safetensors", SD15)
    result = run_cli("prune", path, "--budget", 9)
    assert result.code == 0, result.stderr
    assert (tmp_path / "cats-pruned-magnitude-9" / "cats.safetensors").is_file()


# ---- refused variants ---------------------------------------------------------------------------------------------

LYCORIS = {
    "LoHa": {"hada_w1_a": (4, 4), "hada_w1_b": (4, 8), "hada_w2_a": (4, 4), "hada_w2_b": (4, 8)},
    "LoKr": {"lokr_w1": (2, 2), "lokr_w2": (4, 4)},
    "Tucker": {"lora_down.weight": (4, 8, 1, 1), "lora_mid.weight": (4, 4, 3, 3), "lora_up.weight": (8, 4, 1, 1)},
    "DoRA": {"lora_down.weight": (4, 8), "lora_up.weight": (8, 4), "dora_scale": (1, 8)},
}


@pytest.mark.parametrize("kind", LYCORIS)
def test_lycoris_types_are_refused_by_name_with_the_modules(kind, tmp_path, run_cli):
    names = ["lora_unet_mid_block_resnets_0_conv1", "lora_unet_up_blocks_1_resnets_2_conv2"]
    tensors = {f"{n}.{suffix}": torch.randn(shape) for n in names for suffix, shape in LYCORIS[kind].items()}
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    result = run_cli("inspect", path)
    assert result.code == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert kind in message and all(n in message for n in names)


@pytest.mark.parametrize(
    ("down", "up", "expected"),
    [
        ((4, 8), (8, 3), "disagree on the rank"),
        ((4, 8, 3, 3), (8, 4, 3, 3), "1×1 convolution"),
        ((4, 8, 3, 3), (8, 4), "1×1 convolution"),
    ],
)
def test_mismatched_shapes_are_refused(down, up, expected, tmp_path, run_cli):
    name = "lora_unet_conv_in"
    tensors = {f"{name}.lora_down.weight": torch.randn(down), f"{name}.lora_up.weight": torch.randn(up)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    result = run_cli("inspect", tmp_path / "x.safetensors")
    assert result.code == 1 and expected in " ".join(result.stderr.split())


@pytest.mark.parametrize(
    ("tensors", "expected"),
    [
        ({"a.lora_up.weight": torch.ones(4, 2)}, "up factors without down factors"),
        ({"a.lora_down.weight": torch.ones(2, 4)}, "no matching a.lora_up.weight"),
        ({"a.lora_down.weight": torch.full((2, 4), float("nan")), "a.lora_up.weight": torch.ones(4, 2)}, "NaN"),
        (
            {"a.lora_down.weight": torch.ones(2, 4), "a.lora_up.weight": torch.ones(4, 2), "a.alpha": torch.ones(2)},
            "one",
        ),
        ({"model.weight": torch.ones(2)}, "no LoRA pairs"),
    ],
)
def test_damaged_files_are_refused(tensors, expected, tmp_path, run_cli):
    save_file(tensors, str(tmp_path / "x.safetensors"))
    result = run_cli("inspect", tmp_path / "x.safetensors")
    assert result.code == 1 and expected in " ".join(result.stderr.split())


@pytest.mark.parametrize("suffix", [".bin", ".ckpt", ".pt", ".pth"])
def test_pickle_files_are_refused_with_a_conversion_hint(suffix, tmp_path, run_cli):
    path = tmp_path / f"lora{suffix}"
    path.write_bytes(b"not unpickled")
    result = run_cli("inspect", path)
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "pickle" in message and "safetensors.torch as st" in message


def test_diffusers_metadata_that_is_not_json_or_uses_rslora_is_refused(tmp_path, run_cli):
    for metadata, expected in (("{", "not valid JSON"), (json.dumps({"r": 4, "use_rslora": True}), "rsLoRA")):
        path = diffusers_file(tmp_path / "d.safetensors", {"lora_adapter_metadata": metadata})
        result = run_cli("inspect", path)
        assert result.code == 1 and expected in " ".join(result.stderr.split())


# ---- calibration: kohya's module names mapped onto the model's ----------------------------------------------------

MODEL_NAMES = ["", "down_blocks", "down_blocks.0", "down_blocks.0.attentions.0.proj_in", "down_blocks.0.proj_out"]


def test_kohya_names_resolve_to_the_models_dotted_names():
    resolve = resolve_model_module
    assert resolve("lora_unet_down_blocks_0_attentions_0_proj_in", MODEL_NAMES) == "down_blocks.0.attentions.0.proj_in"
    wrapped = ["unet." + n if n else "" for n in MODEL_NAMES]
    assert resolve("lora_unet_down_blocks_0_attentions_0_proj_in", wrapped) == "unet.down_blocks.0.attentions.0.proj_in"
    assert resolve("unet.down_blocks.0.proj_out", MODEL_NAMES) == "down_blocks.0.proj_out"
    assert resolve("down_blocks.0.proj_out", MODEL_NAMES) == "down_blocks.0.proj_out"


def test_missing_and_ambiguous_names_are_errors_listing_candidates():
    with pytest.raises(SubloraError, match="Closest names: down_blocks.0.attentions.0.proj_in"):
        resolve_model_module("lora_unet_down_blocks_0_attentions_1_proj_in", MODEL_NAMES)
    both = ["a.down_blocks.0.proj_out", "b.down_blocks.0.proj_out"]
    with pytest.raises(SubloraError, match="a.down_blocks.0.proj_out, b.down_blocks.0.proj_out"):
        resolve_model_module("lora_unet_down_blocks_0_proj_out", both)


CALIB = """
import torch

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Linear(6, 8)
        self.conv1 = torch.nn.Conv2d(2, 2, 3, padding=1)
        self.proj_out = torch.nn.Linear(8, 1)

    def forward(self, x):
        h = torch.tanh(self.proj_in(x))
        h = torch.tanh(self.conv1(h.reshape(-1, 2, 2, 2))).flatten(1)
        return self.proj_out(h)

class UNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.down_blocks = torch.nn.ModuleList([Block()])

    def forward(self, x):
        return self.down_blocks[0](x)

def load_model():
    torch.manual_seed(0)
    return UNet()

def batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 6, generator=g) for _ in range(2)]

def loss(model, batch):
    return (model(batch) - torch.sin(batch.sum(-1, keepdim=True))).pow(2).mean()
"""


def test_calibration_maps_kohya_names_and_measures_the_written_file(tmp_path, run_cli):
    shapes = {"lora_unet_down_blocks_0_proj_in": (8, 6, 3, None), "lora_unet_down_blocks_0_conv1": (2, 2, 2, 3)}
    path = kohya_file(tmp_path / "k.safetensors", shapes, dtype=torch.float32)
    calib = tmp_path / "calib.py"
    calib.write_text(textwrap.dedent(CALIB))
    result = run_cli("prune", path, "--calib", calib, "--budget", 3, "--out", tmp_path / "out", "--json")
    assert result.code == 0, result.stderr
    loss = json.loads(result.stdout)["loss"]
    assert loss["after"] != loss["before"]
    for adapter, expected in ((tmp_path / "out" / path.name, loss["after"]), (path, loss["before"])):
        measured = run_cli("eval", adapter, "--calib", calib, "--json")
        assert measured.code == 0, measured.stderr
        assert json.loads(measured.stdout)["loss"] == pytest.approx(expected, rel=1e-6)


def test_calibration_with_an_unknown_module_lists_the_closest_names(tmp_path, run_cli):
    shapes = {"lora_unet_down_blocks_0_proj_inn": (8, 6, 3, None)}
    path = kohya_file(tmp_path / "k.safetensors", shapes, dtype=torch.float32)
    calib = tmp_path / "calib.py"
    calib.write_text(textwrap.dedent(CALIB))
    result = run_cli("eval", path, "--calib", calib)
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "Closest names: down_blocks.0.proj_in" in message


def test_the_format_is_registered_after_peft():
    from sublora_cli import formats

    assert formats.FORMATS.index(KOHYA) > [f.name for f in formats.FORMATS].index("peft")


def test_calibration_refuses_tensors_it_cannot_apply(tmp_path, run_cli):
    shapes = {"lora_unet_down_blocks_0_proj_in": (8, 6, 3, None)}
    extra = {"lora_unet_down_blocks_0_proj_in.diff_b": torch.zeros(8)}
    path = kohya_file(tmp_path / "k.safetensors", shapes, dtype=torch.float32, extra=extra)
    calib = tmp_path / "calib.py"
    calib.write_text(textwrap.dedent(CALIB))
    result = run_cli("eval", path, "--calib", calib)
    message = " ".join(result.stderr.split())
    assert result.code == 1 and "lora_unet_down_blocks_0_proj_in.diff_b" in message and "without --calib" in message


def test_an_alpha_half_precision_cannot_hold_is_written_in_float32(tmp_path, run_cli):
    shapes = {"lora_unet_conv_in": (16, 8, 3, None)}
    path = kohya_file(tmp_path / "a.safetensors", shapes, alpha_ratio=1 / 3)  # alpha 1 at rank 3
    prune(run_cli, path, tmp_path / "out", "--budget", 2)
    tensors, _ = tensors_and_metadata(tmp_path / "out" / path.name)
    alpha = tensors["lora_unet_conv_in.alpha"]
    assert alpha.dtype == torch.float32 and float(alpha) / 2 == pytest.approx(1 / 3, rel=1e-7)
    assert tensors["lora_unet_conv_in.lora_down.weight"].dtype == torch.float16
