"""Checkpoints: safetensors weights + JSON metadata.  No pickle anywhere.

The blob is a safetensors file whose header metadata holds ``{"fbp": <json>}``;
:func:`save_checkpoint` also writes the same JSON to ``<path>.json``.  The
metadata carries model name, hparams, version, feature info (genre vocab, year
range), data range, metrics, created time, and ``sha256``: the hash of the
weights (every tensor's name, dtype, shape and raw bytes, in name order), so
tampering with the tensor bytes is caught even without an external hash.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from models.base import RatingModel
from models.registry import MODELS, build

FORMAT = 1


from fbp_errors import CheckpointError, ModelRefused

__all__ = ["CheckpointError"]


def weights_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _tensors(model: RatingModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def _meta(model: RatingModel, meta: dict[str, Any] | None, sha: str) -> dict[str, Any]:
    hp = model.hparams()
    out: dict[str, Any] = dict(meta or {})
    out.update(
        format=FORMAT,
        model=model.name,
        hparams=hp,
        version=int(out.get("version", model.version)),
        features={
            "genre_vocab": hp.get("genre_vocab", []),
            "year_min": hp.get("year_min"),
            "year_max": hp.get("year_max"),
            "capacity": hp.get("n_movies"),
        },
        sha256=sha,
    )
    out.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    out.setdefault("metrics", {})
    out.setdefault("data", {})
    return out


def checkpoint_to_bytes(model: RatingModel, meta: dict[str, Any] | None = None) -> bytes:
    tensors = _tensors(model)
    sha = weights_sha256(tensors)
    m = _meta(model, meta, sha)
    return st_save(tensors, metadata={"fbp": json.dumps(m, sort_keys=True)})


def save_checkpoint(model: RatingModel, path: str | Path, meta: dict[str, Any] | None = None) -> str:
    """Write ``path`` (safetensors) and ``<path>.json``; returns the weights sha256."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    blob = checkpoint_to_bytes(model, meta)
    m = _read_meta(blob, str(path))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(blob)
    tmp.replace(path)
    Path(str(path) + ".json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
    return m["sha256"]


def _read_meta(blob: bytes, where: str) -> dict[str, Any]:
    if len(blob) < 8:
        raise CheckpointError(f"{where}: not a safetensors file (only {len(blob)} bytes); re-export it with save_checkpoint")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or n > len(blob) - 8:
        raise CheckpointError(f"{where}: not a safetensors file (bad header length); re-export it with save_checkpoint")
    try:
        header = json.loads(blob[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{where}: not a safetensors file (header is not JSON); re-export it with save_checkpoint") from None
    raw = (header.get("__metadata__") or {}).get("fbp")
    if raw is None:
        raise CheckpointError(f"{where}: safetensors file without feedback-predictor metadata; save it with models.checkpoint.save_checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{where}: metadata is not valid JSON; re-export the checkpoint") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{where}: metadata is a JSON {type(meta).__name__}, not an object; re-export the checkpoint")
    return meta


def checkpoint_from_bytes(
    blob: bytes, expected_sha256: str | None = None, *, where: str = "checkpoint"
) -> tuple[RatingModel, dict[str, Any]]:
    """Verify and build.  ``expected_sha256`` may be the weights hash (the one
    :func:`save_checkpoint` returns, ``meta["sha256"]``) or sha256 of ``blob``."""
    blob = bytes(blob)
    meta = _read_meta(blob, where)
    if expected_sha256 is not None:
        whole = hashlib.sha256(blob).hexdigest()
        if expected_sha256 not in (whole, meta.get("sha256")):
            raise ModelRefused(
                f"{where}: sha256 mismatch (expected {expected_sha256[:12]}…, file has weights "
                f"{str(meta.get('sha256'))[:12]}… / blob {whole[:12]}…); fetch the checkpoint again",
                "sha256_mismatch",
            )
    try:
        tensors = st_load(blob)
    except (SafetensorError, Exception) as exc:  # noqa: BLE001 - safetensors raises several kinds
        raise CheckpointError(f"{where}: not a readable safetensors file ({exc}); re-export it") from None
    sha = weights_sha256(tensors)
    if sha != meta.get("sha256"):
        raise ModelRefused(
            f"{where}: weights sha256 {sha[:12]}… does not match the recorded {str(meta.get('sha256'))[:12]}…; "
            "the file is corrupt or was modified -- re-export or fetch it again", "sha256_mismatch"
        )
    name = meta.get("model")
    if name not in MODELS:
        raise CheckpointError(
            f"{where}: unknown model name {name!r}; this build knows {', '.join(MODELS)} -- upgrade the code or pick another checkpoint"
        )
    hp = meta.get("hparams") or {}
    if not isinstance(hp, dict):
        raise CheckpointError(f"{where}: hparams must be a JSON object, not {type(hp).__name__}; fix the metadata or re-train")
    try:
        model = build(name, **hp)
    except (TypeError, ValueError, RuntimeError) as exc:  # unknown name, bad value, impossible size
        raise CheckpointError(f"{where}: hparams do not fit model {name!r} ({exc}); fix the metadata or re-train") from None
    want = model.state_dict()
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    if missing or extra:
        raise CheckpointError(f"{where}: tensors missing {missing} / unexpected {extra} for {name!r} with these hparams; re-train or fix hparams")
    bad = [f"{k}: file {tuple(tensors[k].shape)} vs hparams {tuple(want[k].shape)}" for k in want if tuple(tensors[k].shape) != tuple(want[k].shape)]
    if bad:
        raise CheckpointError(f"{where}: shape mismatch vs hparams ({'; '.join(bad[:4])}); the metadata does not describe these weights -- re-export the checkpoint")
    try:
        version = int(meta.get("version", 0))
    except (TypeError, ValueError):
        raise CheckpointError(f"{where}: version {meta.get('version')!r} is not an integer; fix the metadata") from None
    model.load_state_dict(tensors)
    model.version = version
    model.eval()
    return model, meta


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[RatingModel, dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train one with `fbp train --out {path}`")
    return checkpoint_from_bytes(path.read_bytes(), expected_sha256, where=str(path))
