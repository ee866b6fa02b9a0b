"""Model registry: ``build(name, **hparams)``."""

from __future__ import annotations

from typing import Any

from fbp_errors import ConfigError
from models.base import RatingModel
from models.baseline import BaselineModel
from models.cnn import CNNModel
from models.lstm import LSTMModel
from models.mf import MFModel

MODELS: dict[str, type[RatingModel]] = {
    "lstm": LSTMModel,
    "cnn": CNNModel,
    "mf": MFModel,
    "baseline": BaselineModel,
}
DEFAULT_MODEL = "lstm"


class UnknownModel(ConfigError, KeyError):
    """A model family name that is not in :data:`MODELS`."""


def available() -> list[str]:
    return list(MODELS)


def build(name: str, **hparams: Any) -> RatingModel:
    """A fresh model ``name`` with ``hparams`` (see each class's ``__init__``)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    return cls(**hparams)
