"""Model registry: ``build(name, **hparams)``.

A family is one line here -- its name and ``module.Class`` -- and one file in
``models/`` with a :class:`models.base.RatingModel` subclass.  Classes are
imported when first built, so a broken family fails where it is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from fbp_errors import ConfigError
from models.base import RatingModel

#: name (as stored in checkpoints and state blobs) -> "module.Class"
MODELS: dict[str, str] = {
    "lstm": "models.lstm.LSTMModel",
    "online": "models.online_model.OnlineModel",
    "cnn": "models.cnn.CNNModel",
    "mf": "models.mf.MFModel",
    "baseline": "models.baseline.BaselineModel",
    "toy": "models.toy.ToyModel",
}
DEFAULT_MODEL = "lstm"


class UnknownModel(ConfigError, KeyError):
    """A model family name that is not in :data:`MODELS`."""


def available() -> list[str]:
    """Every registered family, in registration order."""
    return list(MODELS)


def model_class(name: str) -> type[RatingModel]:
    """The class registered as ``name``."""
    try:
        path = MODELS[name]
    except KeyError:
        raise UnknownModel(f"unknown model {name!r}; choose one of {', '.join(MODELS)}") from None
    module, _, cls_name = path.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    if not (isinstance(cls, type) and issubclass(cls, RatingModel) and cls.name == name):
        raise TypeError(f"registry entry {name!r} -> {path} is not a RatingModel named {name!r}")
    return cls


def build(name: str, **hparams: Any) -> RatingModel:
    """A fresh model ``name`` with ``hparams`` (see each class's ``__init__``)."""
    return model_class(name)(**hparams)
