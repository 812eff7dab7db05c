"""Checkpoint format, shared by training (writer) and the app (reader).

A checkpoint holds only plain Python types and tensors, so it loads with
``torch.load(..., weights_only=True)`` and a file carrying pickled code is
refused without running it. Writes are atomic: a run killed at any moment
leaves the previous file intact.

Weights may be stored as fp32, fp16 or int8 with one fp32 scale per output
channel (convolution and linear weights only; biases and batch-norm
statistics stay fp32); they are always loaded back as fp32.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from .models import create_model, get_spec
from .preprocess import PreprocessConfig

FORMAT = "ctapp.model"
FORMAT_VERSION = 1
STORAGES = ("fp32", "fp16", "int8")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (message says why)."""


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # once, at import: os.umask can only be read by setting it, which threads would race


@contextmanager
def _atomic_file(path: str | Path, mode: str) -> Iterator[IO]:
    """A temporary file beside ``path``; on success it is fsynced and renamed over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp's 0600 would hide models from other users
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save that leaves either the old or the new file, never a partial one."""
    with _atomic_file(path, "wb") as f:
        torch.save(obj, f)


def atomic_write_text(text: str, path: str | Path) -> None:
    with _atomic_file(path, "w") as f:
        f.write(text)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_load(path: str | Path) -> Any:
    """torch.load restricted to tensors and plain types; pickled code is refused unexecuted."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        detail = str(exc)
        if "global" in detail.lower() or "reduce" in detail.lower():
            # torch words it "Unsupported global: GLOBAL x" or "unsupported GLOBAL x whose module is blocked".
            found = re.search(r"GLOBAL ([\w.]+)", detail)
            raise CheckpointError(
                f"{path}: refused: the file asks to load Python code or objects"
                f"{f' ({found.group(1)})' if found else ''}, not just tensors and plain data; "
                "only checkpoints written by this project's training are loaded"
            ) from None
        # A pickle protocol newer than torch.save's default uses instructions a weights-only load does not read.
        operand = re.search(r"Unsupported operand \d+", detail)
        raise CheckpointError(f"{path}: not a readable checkpoint (corrupt, or not written by torch.save with its "
                              f"default settings{': ' + operand.group(0) if operand else ''})") from None
    except Exception as exc:
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(exc).__name__}: {exc})") from None


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack_state(state: dict[str, torch.Tensor], storage: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Compress a float state dict; returns (tensors, per-channel scales for int8 tensors)."""
    if storage not in STORAGES:
        raise ValueError(f"weight storage must be one of {STORAGES}, got {storage!r}")
    packed, scales = {}, {}
    for name, tensor in state.items():
        tensor = tensor.detach().cpu()
        if not tensor.is_floating_point():
            packed[name] = tensor.clone()
        elif storage == "fp16" and tensor.ndim >= 2:
            packed[name] = tensor.half()
        elif storage == "int8" and tensor.ndim >= 2:
            flat = tensor.float().reshape(tensor.shape[0], -1)
            scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            packed[name] = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8).reshape(tensor.shape)
            scales[name] = scale
        else:  # fp32 storage, and under the others biases and batch-norm statistics (small): full precision
            packed[name] = tensor.float().clone()
    return packed, scales


def unpack_state(packed: dict[str, torch.Tensor], scales: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in packed.items():
        if name in scales:
            shape = (-1,) + (1,) * (tensor.ndim - 1)
            state[name] = tensor.float() * scales[name].float().view(shape)
        elif tensor.dtype == torch.float16:
            state[name] = tensor.float()
        else:
            state[name] = tensor
    return state


def save_model_file(path: str | Path, model: nn.Module, meta: dict, storage: str = "fp32") -> None:
    """Write a model checkpoint: ``meta`` (plain types) plus the packed weights.

    ``meta`` must hold ``arch``, ``class_names`` and ``preprocess``.
    """
    for key in ("arch", "class_names", "preprocess"):
        if key not in meta:
            raise ValueError(f"checkpoint metadata needs {key!r}")
    model = model.module if hasattr(model, "module") else model
    state = {k: v for k, v in model.state_dict().items()}
    packed, scales = pack_state(state, storage)
    atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION, **meta, "weight_storage": storage,
                 "state_dict": packed, "quant_scales": scales}, path)


def load_model_file(path: str | Path, *, arch: str | None = None, num_classes: int | None = None,
                    expected_sha256: str | None = None) -> tuple[nn.Module, dict]:
    """Load a model checkpoint as an fp32 model in eval mode plus its metadata.

    ``arch``/``num_classes``, when given, must match the checkpoint;
    ``expected_sha256`` must match the file (model cards record it).
    """
    path = Path(path)
    if expected_sha256 is not None:
        actual = sha256_file(path) if path.is_file() else None
        if actual != expected_sha256:
            raise CheckpointError(
                f"{path}: refused: its SHA-256 ({actual}) does not match the model card ({expected_sha256}); "
                "the weights were changed or corrupted"
            )
    payload = safe_load(path)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a model checkpoint of this project (no '{FORMAT}' header)")
    missing = [key for key in ("arch", "class_names", "preprocess", "state_dict") if key not in payload]
    if missing:
        raise CheckpointError(f"{path}: an incomplete model checkpoint (no {', '.join(map(repr, missing))})")
    try:
        model = _build_model(path, payload, arch, num_classes)
    except CheckpointError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError, RuntimeError, IndexError) as exc:
        # Damaged metadata or tensors must not escape as arbitrary errors.
        raise CheckpointError(f"{path}: a damaged model checkpoint ({type(exc).__name__}: {exc})") from None
    model.eval()
    meta = {k: v for k, v in payload.items() if k not in ("state_dict", "quant_scales")}
    return model, meta


def _build_model(path: Path, payload: dict, arch: str | None, num_classes: int | None) -> nn.Module:
    if payload.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path}: written by a newer version of this project (format {payload['format_version']})")
    saved_arch, names = payload["arch"], list(payload["class_names"])
    if arch is not None and arch != saved_arch:
        raise CheckpointError(f"{path}: this checkpoint is a {saved_arch} model, not {arch}")
    if num_classes is not None and num_classes != len(names):
        raise CheckpointError(f"{path}: this checkpoint has {len(names)} classes, not {num_classes}")
    try:
        get_spec(saved_arch)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    PreprocessConfig.from_dict(payload["preprocess"])  # raises on a malformed config
    model = create_model(saved_arch, len(names), weights="none")
    state = unpack_state(payload["state_dict"], payload.get("quant_scales", {}))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0:3]
        raise CheckpointError(f"{path}: the weights do not fit a {saved_arch} with {len(names)} classes: {' '.join(first)}") from None
    return model
