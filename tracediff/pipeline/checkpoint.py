"""Load a side's weights from local safetensors or the local Hugging Face cache.

Nothing is ever downloaded: a parity run must be reproducible offline, and a
missing file is an error that says exactly where tracediff looked.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tracediff.errors import SpecError


def find_safetensors(location: str | Path, *, field: str, base: Path | None = None) -> list[Path]:
    """The ``.safetensors`` files of a file or folder, sorted (shards in order).

    Relative locations are looked up under ``base`` (the spec's folder); errors
    show the location as written and the absolute path that was tried.
    """
    path = Path(location).expanduser()
    if base is not None and not path.is_absolute():
        path = base / path
    if path.is_file():
        if path.suffix != ".safetensors":
            raise SpecError(f"{field}={str(location)!r} is not a .safetensors file")
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors")) or sorted(path.glob("**/*.safetensors"))
        if not files:
            raise SpecError(f"{field}={str(location)!r}: no .safetensors files in that folder")
        return files
    raise SpecError(f"{field}={str(location)!r}: no such file or folder (looked at {path.resolve()})")


def resolve_hf(repo_id: str, revision: str | None, *, field: str) -> Path:
    """The local snapshot folder of a Hugging Face model id, from the cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        rev = f" at revision {revision!r}" if revision else ""
        raise SpecError(
            f"{field}={repo_id!r}{rev} is not in the local Hugging Face cache (looked in "
            f"{os.environ.get('HF_HUB_CACHE', HF_HUB_CACHE)}); tracediff never downloads — "
            "fetch it first with `huggingface-cli download`, or give a local weights path"
        ) from None
    except HFValidationError as exc:
        raise SpecError(f"{field}={repo_id!r} is not a valid Hugging Face model id ({exc})") from None
    return Path(folder)


def load_state_dict(files: list[Path]) -> dict[str, torch.Tensor]:
    """Read (possibly sharded) safetensors into one state dict on the CPU."""
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file), device="cpu"))
        except Exception as exc:
            raise SpecError(f"{file}: cannot read safetensors ({exc})") from None
    return state


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], *, strict: bool, field: str) -> None:
    """``load_state_dict`` with a one-line error naming missing and unexpected keys."""
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SpecError(f"{field}: weights do not fit the model: {'; '.join(parts)}; "
                        "set convert = 'module:function' to rename them, or strict = false")
