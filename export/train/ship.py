"""The shipped form of shapes-tiny: an official-layout checkpoint folder with float16 weights.

`config.json`, `model.safetensors` (floating tensors stored as float16 to keep the repository small —
the reference and the export read them back as float32, so the shipped weights *are* the model; aliased
heads stored once), the tokenizer files and `training.json` (steps and minutes per stage).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from visionllm_edge.export.checkpoint import BUNDLED_MODEL, CheckpointError
from visionllm_edge.export.config import data_path, tokenizer_dir
from visionllm_edge.export.model import VisionLLMv2

#: Where the bundled model lives inside the package.
BUNDLED = "shapes_tiny"
#: Environment variable that points the bundled model at another folder of the same layout (tests use it
#: with a random-weights stand-in; a retrained model can be tried without reinstalling).
BUNDLED_ENV = "VLE_SHAPES_TINY"
#: The files a shipped folder must hold (the tokenizer files are checked when it is loaded).
SHIPPED_FILES = ("config.json", "model.safetensors")


def bundled_path() -> Path:
    """The folder of the bundled shapes-tiny checkpoint: `$VLE_SHAPES_TINY` when set, else the package's.

    This is the one place that decides where the bundled model is; it does not check that it is there
    (`require_bundled` does).
    """
    override = os.environ.get(BUNDLED_ENV, "").strip()
    return Path(override).expanduser() if override else data_path(BUNDLED)


def require_bundled() -> Path:
    """`bundled_path()`, checked to hold a shipped checkpoint.

    Raises:
        CheckpointError: the folder or one of its files is absent; the message names the path, says whether
            `$VLE_SHAPES_TINY` chose it, and how to get the weights.
    """
    path = bundled_path()
    missing = [name for name in SHIPPED_FILES if not (path / name).is_file()]
    if missing:
        where = f"${BUNDLED_ENV} points at {path}" if os.environ.get(BUNDLED_ENV, "").strip() else str(path)
        what = "the folder does not exist" if not path.is_dir() else f"{', '.join(missing)} missing"
        raise CheckpointError(
            f"the bundled {BUNDLED_MODEL} model is not available ({where}: {what}); reinstall "
            f"visionllm-edge, train it (export/train/README.md), or set ${BUNDLED_ENV} to a shipped "
            "checkpoint folder"
        )
    return path


def save_shipped(model: VisionLLMv2, dest: str | Path, report: dict | None = None) -> Path:
    from safetensors.torch import save_file

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        seen: set[int] = set()
        tensors = {}
        for key, value in model.state_dict().items():
            ptr = value.untyped_storage().data_ptr() + value.storage_offset() * value.element_size()
            if value.numel() and ptr in seen:
                continue  # an alias of a tensor already stored
            seen.add(ptr)
            value = value.detach().contiguous()
            tensors[key] = value.to(torch.float16) if value.is_floating_point() else value
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
        tok = tokenizer_dir(model.config)
        for f in sorted(tok.iterdir()):
            shutil.copy(f, tmp / f.name)
        (tmp / "training.json").write_text(json.dumps(report or {}, indent=2) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest
