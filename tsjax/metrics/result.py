"""A small result type so that a metric whose weights are missing is reported, never faked.

``MetricResult.ok(name, value)`` holds a number; ``MetricResult.missing(name, path)`` holds the reason
"not computed: weights missing at PATH" and no number. ``to_json()`` gives ``float`` or that string,
which is what ``metrics.json`` and the HTML report show.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class MetricResult:
    """One metric value, or the reason it was not computed.

    Attributes:
      name: metric name, e.g. ``"clip_score"``.
      value: the number (float) when computed, else None.
      reason: None when computed, else a one-line reason starting with "not computed: ".
    """

    name: str
    value: float | None = None
    reason: str | None = None

    def __post_init__(self):
        if (self.value is None) == (self.reason is None):
            raise ValueError(f"metric {self.name!r}: exactly one of value / reason must be given")

    @property
    def computed(self) -> bool:
        return self.value is not None

    @classmethod
    def ok(cls, name: str, value: float) -> "MetricResult":
        return cls(name, value=float(value))

    @classmethod
    def not_computed(cls, name: str, why: str) -> "MetricResult":
        return cls(name, reason=f"not computed: {why}")

    @classmethod
    def missing(cls, name: str, path: str | Path | None) -> "MetricResult":
        where = "(no path given)" if path is None else str(path)
        return cls(name, reason=f"not computed: weights missing at {where}")

    def to_json(self) -> float | str:
        return self.value if self.value is not None else self.reason

    def __str__(self) -> str:
        return f"{self.value:.4f}" if self.value is not None else str(self.reason)


def weights_available(path: str | Path | None) -> bool:
    """True when ``path`` names an existing file or folder (weights are never downloaded)."""
    return path is not None and Path(path).exists()
