"""Prepare the default data set: captioned handwritten digits as text + image-code shards.

Writes into the output folder::

    train.parquet, validation.parquet   shards (format in mol_tune.data.shards), one sample per image:
                                        a text segment (the caption) then an image segment (16 codes)
    image_tokenizer/                    the fitted PatchVQTokenizer
    dataset.json                        settings, split sizes, token counts, fingerprints

Run it as ``python -m mol_tune.data.prepare_digits [--tokenizer-dir D] [--output-dir O]``. The
defaults are the base model's folder ``<cache>/models/SmolLM2-135M-Instruct`` and
``<cache>/data/digits``, where ``<cache>`` is ``$MOL_TUNE_CACHE`` or ``~/.cache/mol_tune``. A second
run with the same settings and text tokenizer finds ``dataset.json`` and the files intact and
does nothing.
"""

import argparse
import hashlib
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from mol_tune.cache import default_cache_dir
from mol_tune.data.digits import DATASET_NAME, load_captioned_digits
from mol_tune.data.image_vq import PatchVQTokenizer
from mol_tune.data.shards import FORMAT_VERSION, CodebookInfo, ShardInfo, ShardReader, ShardWriter
from mol_tune.vocab import TEXT

IMAGE = "image"
SPLITS = ("train", "validation")
SUMMARY_FILE = "dataset.json"
IMAGE_TOKENIZER_DIR = "image_tokenizer"


def file_sha256(path: str) -> str:
    """Return the sha256 hex digest of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_text_tokenizer(tokenizer_dir: str) -> Tuple[Tokenizer, str, str]:
    """Load ``tokenizer.json`` from a Hugging Face tokenizer folder.

    Returns:
        Tuple[Tokenizer, str, str]: the ``tokenizers.Tokenizer``, its name (``name_or_path`` of ``tokenizer_config.json``,
        else the folder name) and the sha256 of ``tokenizer.json``.

    Raises:
        FileNotFoundError: if the folder has no ``tokenizer.json``.
    """
    path = os.path.join(tokenizer_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Text tokenizer not found: {path}. Run `mol-tune prepare-model` for the default base model, "
            "or pass --tokenizer-dir, a Hugging Face tokenizer folder that contains tokenizer.json."
        )
    name = os.path.basename(os.path.normpath(tokenizer_dir))
    config_path = os.path.join(tokenizer_dir, "tokenizer_config.json")
    if os.path.isfile(config_path):
        with open(config_path) as file:
            name_or_path = json.load(file).get("name_or_path")
        if name_or_path:
            name = os.path.basename(os.path.normpath(name_or_path))
    return Tokenizer.from_file(path), name, file_sha256(path)


def _settings(seed: int, num_codes: int, patch_size: int, validation_fraction: float, tokenizer_sha256: str) -> Dict:
    return {
        "format_version": FORMAT_VERSION,
        "dataset": DATASET_NAME,
        "seed": seed,
        "num_codes": num_codes,
        "patch_size": patch_size,
        "validation_fraction": validation_fraction,
        "text_tokenizer_sha256": tokenizer_sha256,
    }


def _existing_summary(output_dir: str, settings: Dict) -> Optional[Dict[str, Any]]:
    """Return the summary of a finished preparation with ``settings`` in ``output_dir``, else None."""
    path = os.path.join(output_dir, SUMMARY_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as file:
            summary = json.load(file)
        if summary.get("settings") != settings:
            return None
        image_tokenizer = PatchVQTokenizer.load(os.path.join(output_dir, IMAGE_TOKENIZER_DIR))
        for split in SPLITS:
            reader = ShardReader(os.path.join(output_dir, summary["splits"][split]["file"]))
            if reader.info.modalities[IMAGE].codebook_fingerprint != image_tokenizer.fingerprint:
                return None
            if reader.num_rows != summary["splits"][split]["num_samples"]:
                return None
        if image_tokenizer.fingerprint != summary["modalities"][IMAGE]["codebook_fingerprint"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return summary


def _reconstruction_errors(image_tokenizer: PatchVQTokenizer, train: np.ndarray, validation: np.ndarray) -> Dict:
    reconstructed = image_tokenizer.decode(image_tokenizer.encode(validation))
    return {
        "vq_mse": float(np.mean((reconstructed - validation) ** 2)),
        "mean_image_mse": float(np.mean((train.mean(axis=0) - validation) ** 2)),
    }


def prepare_digits(
    tokenizer_dir: str,
    output_dir: str,
    seed: int = 0,
    num_codes: int = 128,
    patch_size: int = 2,
    validation_fraction: float = 0.1,
    force: bool = False,
) -> Dict[str, Any]:
    """Fit the image tokenizer on the training digits and write the train and validation shards.

    Args:
        tokenizer_dir (str): Hugging Face tokenizer folder of the base model (with ``tokenizer.json``).
        output_dir (str): folder to write into, created if needed.
        seed (int): seed of captions, split and k-means. Default: 0.
        num_codes (int): image codebook size. Default: 128.
        patch_size (int): side of an image patch in pixels. Default: 2.
        validation_fraction (float): share of images in the validation split. Default: 0.1.
        force (bool): prepare again even if ``output_dir`` is up to date. Default: False.

    Returns:
        Dict[str, Any]: the content of ``dataset.json``.

    Raises:
        FileNotFoundError: if the tokenizer folder has no ``tokenizer.json``.
        ShardError: if a tokenized sample is invalid (for example a caption with no tokens).
    """
    text_tokenizer, tokenizer_name, tokenizer_sha256 = load_text_tokenizer(tokenizer_dir)
    settings = _settings(seed, num_codes, patch_size, validation_fraction, tokenizer_sha256)
    summary = None if force else _existing_summary(output_dir, settings)
    if summary is not None:
        print(f"Digits data in {output_dir} is up to date, so nothing is rewritten.")
        _print_summary(summary, output_dir)
        return summary

    # Without dataset.json, a run that fails half-way is never taken for a finished one.
    if os.path.exists(os.path.join(output_dir, SUMMARY_FILE)):
        os.remove(os.path.join(output_dir, SUMMARY_FILE))
    splits = load_captioned_digits(seed=seed, validation_fraction=validation_fraction)
    image_size = splits["train"].images.shape[-1]
    image_tokenizer = PatchVQTokenizer(num_codes=num_codes, patch_size=patch_size, image_size=image_size, seed=seed)
    print(f"Fitting {num_codes} image codes on {len(splits['train'])} training images ...")
    image_tokenizer.fit(splits["train"].images)
    image_tokenizer.save(os.path.join(output_dir, IMAGE_TOKENIZER_DIR))

    info = ShardInfo(
        dataset=DATASET_NAME,
        text_tokenizer=tokenizer_name,
        text_tokenizer_sha256=tokenizer_sha256,
        modalities={IMAGE: CodebookInfo(num_codes, image_tokenizer.codebook_dim, image_tokenizer.fingerprint)},
    )
    split_summaries = {}
    for split in SPLITS:
        data = splits[split]
        codes = image_tokenizer.encode(data.images)
        captions = [encoding.ids for encoding in text_tokenizer.encode_batch(data.captions, add_special_tokens=False)]
        file_name = f"{split}.parquet"
        with ShardWriter(os.path.join(output_dir, file_name), info) as writer:
            for sample_id, caption, image_codes in tqdm(
                zip(data.sample_ids, captions, codes), total=len(data), desc=f"Writing {file_name}", unit="sample"
            ):
                writer.write(int(sample_id), [(TEXT, caption), (IMAGE, image_codes.tolist())])
        split_summaries[split] = {
            "file": file_name,
            "num_samples": len(data),
            "num_text_tokens": sum(len(c) for c in captions),
            "num_image_codes": int(codes.size),
        }

    summary = {
        "settings": settings,
        "dataset": DATASET_NAME,
        "text_tokenizer": {"name": tokenizer_name, "sha256": tokenizer_sha256},
        "modalities": {
            IMAGE: {
                "num_codes": num_codes,
                "codebook_dim": image_tokenizer.codebook_dim,
                "codebook_fingerprint": image_tokenizer.fingerprint,
                "tokenizer_dir": IMAGE_TOKENIZER_DIR,
                "codes_per_image": image_tokenizer.num_patches,
            }
        },
        "splits": split_summaries,
        "reconstruction": _reconstruction_errors(image_tokenizer, splits["train"].images, splits["validation"].images),
    }
    # dataset.json is written last, so its presence marks a complete preparation.
    tmp_path = os.path.join(output_dir, f"{SUMMARY_FILE}.tmp")
    with open(tmp_path, "w") as file:
        json.dump(summary, file, indent=2)
    os.replace(tmp_path, os.path.join(output_dir, SUMMARY_FILE))
    _print_summary(summary, output_dir)
    return summary


def _print_summary(summary: Dict[str, Any], output_dir: str) -> None:
    image = summary["modalities"][IMAGE]
    print(f"Dataset {summary['dataset']} in {output_dir}")
    for split, values in summary["splits"].items():
        print(
            f"  {split}: {values['num_samples']} samples, {values['num_text_tokens']} text tokens, "
            f"{values['num_image_codes']} image codes ({values['file']})"
        )
    print(
        f"  image codebook: {image['num_codes']} codes of dimension {image['codebook_dim']}, "
        f"fingerprint {image['codebook_fingerprint'][:16]}"
    )
    errors = summary["reconstruction"]
    print(
        f"  validation reconstruction MSE: {errors['vq_mse']:.5f} (mean-image baseline "
        f"{errors['mean_image_mse']:.5f}), pixels in [0, 1]"
    )
    print(f"  text tokenizer: {summary['text_tokenizer']['name']}")


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the captioned digits data set as Parquet shards.")
    cache_dir = default_cache_dir()
    parser.add_argument(
        "--tokenizer-dir",
        default=os.path.join(cache_dir, "models", "SmolLM2-135M-Instruct"),
        help="Hugging Face tokenizer folder with tokenizer.json (default: %(default)s).",
    )
    parser.add_argument(
        "--output-dir",
        default=os.path.join(cache_dir, "data", "digits"),
        help="Folder for the shards, image tokenizer and dataset.json (default: %(default)s).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of captions, split and k-means (default: 0).")
    parser.add_argument("--num-codes", type=int, default=128, help="Image codebook size (default: 128).")
    parser.add_argument("--patch-size", type=int, default=2, help="Side of an image patch in pixels (default: 2).")
    parser.add_argument(
        "--validation-fraction", type=float, default=0.1, help="Share of images for validation (default: 0.1)."
    )
    parser.add_argument("--force", action="store_true", help="Prepare again even if the output is up to date.")
    args = parser.parse_args(argv)
    prepare_digits(
        args.tokenizer_dir,
        args.output_dir,
        seed=args.seed,
        num_codes=args.num_codes,
        patch_size=args.patch_size,
        validation_fraction=args.validation_fraction,
        force=args.force,
    )


if __name__ == "__main__":
    main()
