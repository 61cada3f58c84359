"""Tests for the ``mol-tune`` command line and the registration of mol_tune's recipes and configs.

Most tests point the registry at a temporary folder with a toy recipe and toy configs, so they
do not depend on the shipped ones, and give torchtune's registry list a fresh copy per test.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from mol_tune import _registry, cli

TOY_CONFIG = """\
# A tiny LoRA Llama for command line tests.
output_dir: /tmp/mol_tune_cli_test
model:
  _component_: torchtune.models.llama3_2.lora_llama3_2
  lora_attn_modules: [q_proj, v_proj]
  vocab_size: 100
  num_layers: 2
  num_heads: 4
  num_kv_heads: 2
  embed_dim: 64
  max_seq_len: 128
  intermediate_dim: 128
  lora_rank: 4
  lora_alpha: 8
"""

# Writes what it received to $TOY_RECIPE_OUT.<rank>.json instead of training.
TOY_RECIPE = """\
import json
import os
import sys

from omegaconf import OmegaConf
from torchtune import config


@config.parse
def recipe_main(cfg):
    out = os.environ["TOY_RECIPE_OUT"] + "." + os.environ.get("RANK", "single") + ".json"
    with open(out, "w") as f:
        json.dump({"argv": sys.argv, "cfg": OmegaConf.to_container(cfg)}, f)


if __name__ == "__main__":
    recipe_main()
"""

VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """Point the registry at toy files, isolate torchtune's registry list, and work in an empty folder."""
    from torchtune import _recipe_registry

    configs = tmp_path / "configs"
    recipes = tmp_path / "recipes"
    work = tmp_path / "work"
    for folder in (configs, recipes, work):
        folder.mkdir()
    (configs / "toy.yaml").write_text(TOY_CONFIG)
    (configs / "toy_b.yaml").write_text(TOY_CONFIG.replace("lora_rank: 4", "lora_rank: 2"))
    (configs / "notes.txt").write_text("not a config")
    (recipes / f"{_registry.RECIPE_NAME}.py").write_text(TOY_RECIPE)

    monkeypatch.setattr(_registry, "CONFIGS_DIR", configs)
    monkeypatch.setattr(_registry, "RECIPES_DIR", recipes)
    monkeypatch.setattr(_recipe_registry, "_ALL_RECIPES", list(_recipe_registry._ALL_RECIPES))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("TOY_RECIPE_OUT", str(tmp_path / "out"))
    monkeypatch.chdir(work)
    return tmp_path


def _run_recipe(argv: list) -> None:
    """Run ``mol-tune run ...`` in this process; torchtune's ``config.parse`` ends with ``sys.exit``."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", *argv])
    assert exit_info.value.code in (None, 0)


def _recipe_output(root: Path, rank: str = "single") -> dict:
    return json.loads((root / f"out.{rank}.json").read_text())


def test_config_files_from_disk(tmp_path):
    (tmp_path / "a.yaml").write_text("x: 1\n")
    (tmp_path / "b.yml").write_text("x: 1\n")
    assert _registry.config_files(tmp_path) == {"mol_finetune/a": (tmp_path / "a.yaml").resolve()}

    (tmp_path / "c.yaml").write_text("x: 2\n")
    assert list(_registry.config_files(tmp_path)) == ["mol_finetune/a", "mol_finetune/c"]


def test_config_files_missing_folder(tmp_path):
    assert _registry.config_files(tmp_path / "absent") == {}


def test_register_is_idempotent(plugin):
    from torchtune._recipe_registry import get_all_recipes

    before = len(get_all_recipes())
    _registry.register(_registry.plugin_recipes())
    _registry.register(_registry.plugin_recipes())
    assert len(get_all_recipes()) == before + 1


def test_register_name_clash(plugin):
    from torchtune._recipe_registry import Recipe

    clash = Recipe(name="lora_finetune_single_device", file_path="/elsewhere.py", configs=[], supports_distributed=False)
    with pytest.raises(ValueError, match="lora_finetune_single_device"):
        _registry.register([clash])


def test_ls_lists_plugin_entries(plugin, capsys):
    cli.main(["ls"])
    lines = capsys.readouterr().out.splitlines()
    recipe_line = next(line for line in lines if line.split()[:1] == ["mol_finetune"])
    recipe_index = lines.index(recipe_line)
    assert recipe_line.split() == ["mol_finetune", "mol_finetune/toy"]
    assert lines[recipe_index + 1].split() == ["mol_finetune/toy_b"]
    assert any(line.split()[:1] == ["lora_finetune_single_device"] for line in lines)


def test_cp_copies_config(plugin):
    cli.main(["cp", "mol_finetune/toy", "copy.yaml"])
    assert Path("copy.yaml").read_bytes() == (plugin / "configs" / "toy.yaml").read_bytes()


def test_cp_copies_recipe(plugin):
    cli.main(["cp", "mol_finetune", "."])
    assert Path("mol_finetune.py").read_text() == TOY_RECIPE


def test_cp_adds_suffix(plugin):
    cli.main(["cp", "mol_finetune/toy", "copy"])
    assert Path("copy.yaml").read_text() == TOY_CONFIG


def test_cp_rejects_existing_file(plugin, capsys):
    Path("copy.yaml").write_text("keep me\n")
    for destination in ("copy.yaml", "copy", "."):
        if destination == ".":
            Path("toy.yaml").write_text("keep me\n")
        with pytest.raises(SystemExit) as error:
            cli.main(["cp", "mol_finetune/toy", destination])
        assert error.value.code == 2
        assert "--force" in capsys.readouterr().err
    assert Path("copy.yaml").read_text() == "keep me\n"
    assert Path("toy.yaml").read_text() == "keep me\n"


def test_cp_force_overwrites(plugin):
    Path("copy.yaml").write_text("old\n")
    cli.main(["cp", "mol_finetune/toy", "copy.yaml", "--force"])
    assert Path("copy.yaml").read_text() == TOY_CONFIG


def test_tune_cp_overwrites(plugin, monkeypatch):
    # torchtune 0.6.1 overwrites without asking, which is why mol-tune cp needs --force.
    from torchtune._cli.tune import main as tune_main

    _registry.register(_registry.plugin_recipes())
    Path("copy.yaml").write_text("old\n")
    monkeypatch.setattr(sys, "argv", ["tune", "cp", "mol_finetune/toy", "copy.yaml"])
    tune_main()
    assert Path("copy.yaml").read_text() == TOY_CONFIG


def test_cp_unknown_name(plugin, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["cp", "mol_finetune/absent", "copy.yaml"])
    assert error.value.code == 2
    message = capsys.readouterr().err
    assert "mol_finetune/absent" in message
    assert "mol_finetune/toy, mol_finetune/toy_b" in message
    assert not Path("copy.yaml").exists()


def test_cat_prints_config(plugin, capsys):
    cli.main(["cat", "mol_finetune/toy"])
    assert yaml.safe_load(capsys.readouterr().out) == yaml.safe_load(TOY_CONFIG)


def test_cat_unknown_name(plugin, capsys):
    with pytest.raises(SystemExit):
        cli.main(["cat", "mol_finetune/absent"])
    assert "mol_finetune/toy" in capsys.readouterr().err


def test_validate_by_name(plugin, capsys):
    cli.main(["validate", "mol_finetune/toy"])
    assert "well-formed" in capsys.readouterr().out


def test_validate_bad_config(plugin, capsys):
    Path("bad.yaml").write_text(TOY_CONFIG.replace("lora_rank: 4", "lora_rank: 4\n  lora_rnak: 4"))
    with pytest.raises(SystemExit):
        cli.main(["validate", "bad.yaml"])
    assert "lora_rnak" in capsys.readouterr().err


def test_run_by_name(plugin):
    _run_recipe(["mol_finetune", "--config", "mol_finetune/toy", "output_dir=/tmp/elsewhere"])
    result = _recipe_output(plugin)
    assert result["argv"][0] == str((plugin / "recipes" / "mol_finetune.py").resolve())
    assert result["argv"][2] == str((plugin / "configs" / "toy.yaml").resolve())
    assert result["cfg"]["output_dir"] == "/tmp/elsewhere"
    assert result["cfg"]["model"]["lora_rank"] == 4


def test_run_by_absolute_path(plugin):
    recipe = plugin / "recipes" / "mol_finetune.py"
    Path("local.yaml").write_text(TOY_CONFIG)
    _run_recipe([str(recipe), "--config", "local.yaml"])
    result = _recipe_output(plugin)
    assert result["argv"][0] == str(recipe)
    assert result["cfg"]["model"]["lora_alpha"] == 8


def test_run_by_module_path(plugin, monkeypatch):
    # A recipe given as pkg/recipes/name runs as the module pkg.recipes.name, as in `tune run`.
    package = plugin / "site" / "toy_pkg" / "recipes"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "toy_recipe.py").write_text(TOY_RECIPE)
    monkeypatch.syspath_prepend(str(plugin / "site"))
    _run_recipe(["toy_pkg/recipes/toy_recipe", "--config", "mol_finetune/toy_b"])
    assert _recipe_output(plugin)["cfg"]["model"]["lora_rank"] == 2


def test_run_unknown_recipe(plugin, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["run", "mol_finetuen", "--config", "mol_finetune/toy"])
    assert error.value.code == 2
    assert "mol_finetune" in capsys.readouterr().err
    assert not (plugin / "out.single.json").exists()


def test_run_unknown_config(plugin, capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["run", "mol_finetune", "--config", "mol_finetune/absent"])
    assert error.value.code == 2
    assert "mol_finetune/toy" in capsys.readouterr().err
    assert not (plugin / "out.single.json").exists()


def test_run_distributed(plugin):
    cli.main(["run", "--nproc_per_node", "2", "mol_finetune", "--config", "mol_finetune/toy", "output_dir=/tmp/two"])
    for rank in ("0", "1"):
        assert _recipe_output(plugin, rank)["cfg"]["output_dir"] == "/tmp/two"


def test_tool_command_passes_arguments(tmp_path, monkeypatch):
    (tmp_path / "toy_tool.py").write_text(
        textwrap.dedent(
            """\
            import json, os, sys

            def main(argv=None):
                with open(os.environ["TOY_TOOL_OUT"], "w") as f:
                    json.dump({"argv": argv, "prog": sys.argv[0]}, f)
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("TOY_TOOL_OUT", str(tmp_path / "tool.json"))
    monkeypatch.setitem(cli.TOOL_COMMANDS, "prepare-model", ("toy_tool", "toy"))
    cli.main(["prepare-model", "--cache-dir", "x"])
    result = json.loads((tmp_path / "tool.json").read_text())
    assert result["argv"] == ["--cache-dir", "x"]
    assert result["prog"] == "mol-tune prepare-model"


def test_tool_command_missing_module(monkeypatch, capsys):
    monkeypatch.setitem(cli.TOOL_COMMANDS, "prepare-digits", ("mol_tune.absent_tool", "toy"))
    with pytest.raises(SystemExit) as error:
        cli.main(["prepare-digits"])
    assert error.value.code == 2
    assert "mol_tune.absent_tool" in capsys.readouterr().err


def test_unknown_subcommand(capsys):
    with pytest.raises(SystemExit) as error:
        cli.main(["lss"])
    assert error.value.code == 2
    assert "'ls'" in capsys.readouterr().err


def test_help_lists_subcommands():
    result = subprocess.run([str(VENV_BIN / "mol-tune"), "--help"], capture_output=True, text=True, check=True)
    listed = {line.split()[0] for line in result.stdout.splitlines() if line.startswith("    ")}
    assert set(cli.TUNE_COMMANDS) | set(cli.TOOL_COMMANDS) <= listed


def test_installed_ls_shows_shipped_configs():
    # The console script reads the package's real configs folder.
    result = subprocess.run([str(VENV_BIN / "mol-tune"), "ls"], capture_output=True, text=True, check=True)
    listed = {word for line in result.stdout.splitlines() for word in line.split()}
    shipped = {"mol_finetune/" + path.stem for path in (Path(cli.__file__).parent / "configs").glob("*.yaml")}
    assert "mol_finetune" in listed
    assert shipped <= listed


@pytest.mark.parametrize("statement", ["import json", "import mol_tune", "import mol_tune.cli, mol_tune._registry"])
def test_import_skips_torchtune(statement):
    code = f"{statement}; import sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchtune'))"
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert result.stdout.strip() == "[]"


def test_shipped_recipe_importable(tmp_path):
    # `tune run mol_tune/recipes/mol_finetune` turns the path into this module name.
    recipe_file = _registry.plugin_recipes()[0].file_path
    code = "import importlib.util; print(importlib.util.find_spec('mol_tune.recipes.mol_finetune').origin)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert Path(recipe_file).is_file()
    assert Path(result.stdout.strip()).resolve() == Path(recipe_file)


@pytest.mark.parametrize("name", sorted(_registry.config_files()))
def test_shipped_config_loads(name, capsys):
    # `cat` parses with PyYAML and recipes with OmegaConf, so both must accept every shipped config.
    from omegaconf import OmegaConf

    path = _registry.config_files()[name]
    assert isinstance(yaml.safe_load(path.read_text()), dict)
    OmegaConf.to_container(OmegaConf.load(path))
