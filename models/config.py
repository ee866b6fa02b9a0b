"""One way to write a model's settings to, and read them from, the JSON a
checkpoint's hparams carry: a frozen dataclass inheriting :class:`DictConfig`."""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

C = TypeVar("C", bound="DictConfig")


class DictConfig:
    """``to_dict``/``from_dict`` for a frozen dataclass whose fields all have
    defaults: unknown keys are ignored (an older or newer checkpoint), and
    numbers are coerced to the type of the field's default (JSON writes 10.0
    for a float that is whole)."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[C], d: dict[str, Any] | None) -> C:
        kinds = {f.name: type(f.default) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        return cls(**{k: kinds[k](v) if kinds[k] in (bool, int, float) else v
                      for k, v in (d or {}).items() if k in kinds})
