"""Checkpoint round trip and every refusal."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save as st_save

from models.checkpoint import (
    CheckpointError,
    checkpoint_from_bytes,
    checkpoint_to_bytes,
    load_checkpoint,
    save_checkpoint,
)
from models.registry import available, build

torch.set_num_threads(1)


@pytest.mark.parametrize("name", available())
def test_round_trip(tmp_path, name):
    torch.manual_seed(0)
    m = build(name, n_movies=20, genre_vocab=["a"])
    m.ensure_capacity(100)
    m.version = 3
    sha = save_checkpoint(m, tmp_path / "model", {"metrics": {"rmse": 0.9}})
    side = json.loads((tmp_path / "model.json").read_text())
    assert side["sha256"] == sha and side["model"] == name and side["metrics"]["rmse"] == 0.9
    m2, meta = load_checkpoint(tmp_path / "model", expected_sha256=sha)
    assert m2.version == 3 and meta["hparams"]["n_movies"] == 128
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    st = m.init_state(2)
    ids = torch.tensor([1, 2, 99])
    assert torch.equal(m.score(st, ids), m2.score(st, ids))


def _blob():
    return checkpoint_to_bytes(build("baseline", n_movies=8), {"version": 1})


def test_tampered_bytes():
    blob = bytearray(_blob())
    blob[-3] ^= 0xFF
    with pytest.raises(CheckpointError, match="sha256"):
        checkpoint_from_bytes(bytes(blob))


def test_expected_hash_mismatch():
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        checkpoint_from_bytes(_blob(), expected_sha256="0" * 64)


def _rewrite(blob, edit):
    from safetensors.torch import load

    n = int.from_bytes(blob[:8], "little")
    meta = json.loads(json.loads(blob[8 : 8 + n])["__metadata__"]["fbp"])
    tensors = load(blob)
    edit(meta, tensors)
    return st_save(tensors, metadata={"fbp": json.dumps(meta)})


def test_unknown_model_name():
    blob = _rewrite(_blob(), lambda m, t: m.update(model="transformer"))
    with pytest.raises(CheckpointError, match="unknown model name"):
        checkpoint_from_bytes(blob)


def test_shape_mismatch():
    blob = _rewrite(_blob(), lambda m, t: m["hparams"].update(n_movies=64))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        checkpoint_from_bytes(blob)


@pytest.mark.parametrize("edit, message", [
    (lambda m, t: m["hparams"].update(n_movies="abc"), "hparams do not fit"),
    (lambda m, t: m.update(hparams=[8]), "hparams must be a JSON object"),
    (lambda m, t: m.update(version="v3"), "version 'v3' is not an integer"),
])
def test_bad_metadata_values_are_refused_with_a_message(edit, message):
    """Malformed metadata is a CheckpointError naming the fix, never a bare
    ValueError/AttributeError (callers catch CheckpointError only)."""
    with pytest.raises(CheckpointError, match=message):
        checkpoint_from_bytes(_rewrite(_blob(), edit))


def test_metadata_that_is_not_an_object_is_refused():
    from safetensors.torch import load

    blob = st_save(load(_blob()), metadata={"fbp": json.dumps([1, 2])})
    with pytest.raises(CheckpointError, match="not an object"):
        checkpoint_from_bytes(blob)


def test_missing_and_not_safetensors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope")
    (tmp_path / "x").write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(CheckpointError, match="not a safetensors"):
        load_checkpoint(tmp_path / "x")


def test_a_checksum_mismatch_is_refused_with_its_reason_not_its_text():
    """The worker labels a refused swap by the error's reason (never by its message)."""
    from fbp_errors import ModelRefused

    with pytest.raises(ModelRefused) as got:
        checkpoint_from_bytes(_blob(), expected_sha256="0" * 64)
    assert got.value.reason == "sha256_mismatch" and isinstance(got.value, CheckpointError)
