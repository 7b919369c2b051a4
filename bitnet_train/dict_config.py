"""A dataclass config that round-trips through a plain dict (JSON, checkpoints, Hydra) and
rejects keys it does not define, naming them."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import TypeVar

T = TypeVar("T", bound="DictSerializable")


class DictSerializable:
    section = "config"  # how errors name this config ("model", "quant", ...)

    def to_dict(self) -> dict:
        return asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[T], d: dict) -> T:
        unknown = set(d) - {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.section} config keys: {sorted(unknown)}")
        return cls(**d)
