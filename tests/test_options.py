"""The options schema is the one source of the flags, the --config keys, their defaults and the report's echo."""

from __future__ import annotations

import json
from dataclasses import fields

import pytest
import typer
from test_cli_errors import write_adapter

from sublora_cli.cli.app import PRUNE_CONFIG, app
from sublora_cli.commands.options import EvalOptions, echo, resolve, settings_of
from sublora_cli.commands.prune import PruneOptions
from sublora_cli.commands.sweep import SweepOptions
from sublora_cli.errors import SubloraError
from sublora_cli.pipeline.report import JSON_REPORT

COMMANDS = {"prune": PruneOptions, "sweep": SweepOptions, "eval": EvalOptions}
# Non-default values for every prune setting, as a flag and as a --config value.
PRUNE_VALUES = {
    "budget": ("1", 1),
    "method": ("magnitude", "magnitude"),
    "curvature": ("exact", "exact"),
    "min_rank": ("1", 1),
    "max_rank": ("1", 1),
    "seed": ("3", 3),
    "max_hessian_gb": ("2.5", 2.5),
    "max_batches": ("7", 7),
    "device": ("cpu:0", "cpu:0"),
    "dtype": ("float64", "float64"),
}


def click_params(command: str) -> dict:
    return {p.name: p for p in typer.main.get_command(app).commands[command].params}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_setting_is_a_flag_with_its_default(command):
    params = click_params(command)
    for setting in settings_of(COMMANDS[command]):
        param = params[setting.name]
        assert set(setting.spec.flags[0].split("/")) <= set(param.opts) | set(param.secondary_opts)
        assert param.help == setting.spec.help
        if command == "prune":  # flags not given are None, so that --config can fill them; the help names it
            assert param.default is None or setting.kind is bool
            assert param.show_default == setting.shown_default()
        elif not setting.required:
            assert param.default == setting.flag_default()


def test_every_prune_setting_is_a_config_key_with_the_same_default():
    assert set(PRUNE_CONFIG) == {"adapter", "out", *(f.name for f in fields(PruneOptions))}
    from_defaults = resolve(PruneOptions, {"budget": "1"}, {}, reads_config=True)
    assert from_defaults == PruneOptions(budget="1")
    for setting in settings_of(PruneOptions):
        if not setting.required and setting.name != "budget":
            assert getattr(from_defaults, setting.name) == setting.default


def test_a_required_setting_given_nowhere_is_a_usage_error():
    with pytest.raises(typer.BadParameter, match="in --config"):
        resolve(SweepOptions, {}, {}, reads_config=True)


def test_a_config_value_is_checked_like_its_flag():
    with pytest.raises(SubloraError, match="--config: curvature 'fast' is not one of"):
        resolve(PruneOptions, {"budget": "1"}, {"curvature": "fast"}, reads_config=True)


def test_the_report_echoes_every_option(tmp_path, run_cli):
    adapter = write_adapter(tmp_path / "a")
    result = run_cli("prune", adapter, "--budget", "1", "--seed", "4", "--out", tmp_path / "o")
    assert result.code == 0, result.stderr
    report = json.loads((tmp_path / "o" / JSON_REPORT).read_text())
    assert report["options"] == echo(PruneOptions(budget="1", seed=4))
    assert set(report["options"]) == {f.name for f in fields(PruneOptions)}


def test_a_config_file_and_flags_give_the_same_options(tmp_path, run_cli):
    adapter = write_adapter(tmp_path / "a")
    flags = [arg for key, (text, _) in PRUNE_VALUES.items() for arg in (f"--{key.replace('_', '-')}", text)]
    by_flags = run_cli("prune", adapter, *flags, "--out", tmp_path / "flags")
    assert by_flags.code == 0, by_flags.stderr
    config = tmp_path / "sublora.yaml"
    config.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, (_, value) in PRUNE_VALUES.items()))
    by_config = run_cli("prune", adapter, "--config", config, "--out", tmp_path / "config")
    assert by_config.code == 0, by_config.stderr
    echoed = [json.loads((tmp_path / out / JSON_REPORT).read_text())["options"] for out in ("flags", "config")]
    assert echoed[0] == echoed[1]
    assert {key: echoed[0][key] for key in PRUNE_VALUES} == {key: text for key, (text, _) in PRUNE_VALUES.items()} | {
        "min_rank": 1,
        "max_rank": 1,
        "seed": 3,
        "max_hessian_gb": 2.5,
        "max_batches": 7,
    }
