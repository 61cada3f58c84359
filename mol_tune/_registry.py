"""Recipes and configs that mol_tune adds to torchtune's ``tune`` command line.

torchtune 0.6 reads its recipes and configs only from the hard-coded list
``torchtune._recipe_registry._ALL_RECIPES`` and has no plugin entry point. ``mol-tune``
therefore appends mol_tune's entries to that list in its own process, just before it hands
over to torchtune's CLI, so that ``ls``, ``cp``, ``cat`` and ``run`` find them. Nothing is
registered at import time, so other Python programs pay nothing for the plugin.

The entries carry absolute file paths. torchtune joins them onto its own folder with
``pathlib``, and joining an absolute path returns that path unchanged.

Naming:
    - recipe ``mol_finetune``: the file ``mol_tune/recipes/mol_finetune.py``. It is registered
      as distributed, so ``run`` accepts torchrun options such as ``--nproc_per_node`` for it.
    - config ``mol_finetune/<stem>``: every ``mol_tune/configs/<stem>.yaml``, found on disk
      each time, so a new YAML file needs no code change. Every config belongs to ``mol_finetune``
      and is named after it, which keeps the names apart from torchtune's ``<model>/<variant>``.

torchtune is imported inside the functions, never at module import.
"""

from pathlib import Path
from typing import Dict, Iterable, List, Optional

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIGS_DIR = PACKAGE_DIR / "configs"
RECIPES_DIR = PACKAGE_DIR / "recipes"

RECIPE_NAME = "mol_finetune"
CONFIG_PREFIX = RECIPE_NAME + "/"


def config_files(configs_dir: Optional[Path] = None) -> Dict[str, Path]:
    """Find mol_tune's configs on disk.

    Args:
        configs_dir (Optional[Path]): folder to scan for ``*.yaml`` files (subfolders are not
            scanned). Default: ``mol_tune/configs`` of the installed package.

    Returns:
        Dict[str, Path]: config name (``mol_finetune/<stem>``) mapped to the absolute file path,
        sorted by name. Empty if the folder does not exist.
    """
    folder = Path(CONFIGS_DIR if configs_dir is None else configs_dir).resolve()
    if not folder.is_dir():
        return {}
    return {CONFIG_PREFIX + path.stem: path for path in sorted(folder.glob("*.yaml"))}


def plugin_recipes(configs_dir: Optional[Path] = None, recipes_dir: Optional[Path] = None) -> list:
    """Build torchtune registry entries for mol_tune's recipe and configs.

    Args:
        configs_dir (Optional[Path]): folder of the YAML configs. Default: ``mol_tune/configs``.
        recipes_dir (Optional[Path]): folder of the recipe modules. Default: ``mol_tune/recipes``.

    Returns:
        List[torchtune._recipe_registry.Recipe]: one recipe with all configs, absolute paths.
    """
    from torchtune._recipe_registry import Config, Recipe

    recipe_file = Path(RECIPES_DIR if recipes_dir is None else recipes_dir).resolve() / f"{RECIPE_NAME}.py"
    configs = [Config(name=name, file_path=str(path)) for name, path in config_files(configs_dir).items()]
    # NOTE: torchtune reads supports_distributed only to allow torchrun options. Each process
    # runs the recipe file, which must set up the process group itself.
    return [Recipe(name=RECIPE_NAME, file_path=str(recipe_file), configs=configs, supports_distributed=True)]


def _entry_names(recipes: Iterable) -> Dict[str, str]:
    """Map every recipe and config name to the file it points to."""
    names = {}
    for recipe in recipes:
        names[recipe.name] = str(recipe.file_path)
        for config in recipe.configs:
            names[config.name] = str(config.file_path)
    return names


def register(recipes: List) -> None:
    """Append recipes to torchtune's registry in this process, skipping those already there.

    ``tune cp`` and ``tune cat`` look recipe and config names up in one list, so a name may not
    be reused by another file.

    Args:
        recipes (List[torchtune._recipe_registry.Recipe]): entries to add.

    Raises:
        ValueError: if a recipe or config name already exists in the registry for another file.
    """
    from torchtune import _recipe_registry

    registry = _recipe_registry._ALL_RECIPES
    for recipe in recipes:
        if recipe in registry:
            continue
        existing = _entry_names(registry)
        for name, file_path in _entry_names([recipe]).items():
            if name in existing and existing[name] != file_path:
                raise ValueError(
                    f"Name clash in torchtune's recipe registry: {name!r} already points to "
                    f"{existing[name]}, so it cannot also name {file_path}. Rename the file."
                )
        registry.append(recipe)


def registered_recipes() -> list:
    """Return torchtune's registry after adding mol_tune's entries to it."""
    from torchtune._recipe_registry import get_all_recipes

    register(plugin_recipes())
    return get_all_recipes()


def find_config(name: str) -> Optional[Path]:
    """Return the file of a config name (mol_tune's or torchtune's), or None, without registering anything.

    torchtune's own entries hold paths relative to the ``recipes/configs`` folder that its wheel
    installs next to the ``torchtune`` package.
    """
    import torchtune
    from torchtune._recipe_registry import get_all_recipes

    configs_root = Path(torchtune.__file__).resolve().parent.parent / "recipes" / "configs"
    for recipe in [*plugin_recipes(), *get_all_recipes()]:
        for config in recipe.configs:
            if config.name == name:
                return configs_root / config.file_path
    return None
