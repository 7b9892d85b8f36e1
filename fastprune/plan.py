"""The Plan: which elements of each group to keep, as validated, serialisable data."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastprune.errors import FastpruneError

PLAN_VERSION = 1


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the model's class and parameter names and shapes."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, p in model.named_parameters():
        h.update(f"{name}:{tuple(p.shape)};".encode())
    return h.hexdigest()[:16]


@dataclass
class Plan:
    """Kept element indices per group, the layers to remove and the settings that chose them.

    Groups missing from ``keep`` stay whole.  ``group_sizes`` records each group's original
    size so a plan can be checked against a model before anything is touched.
    """

    fingerprint: str
    keep: dict[str, list[int]] = field(default_factory=dict)
    remove_layers: list[int] = field(default_factory=list)
    group_sizes: dict[str, int] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    version: int = PLAN_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("version") != PLAN_VERSION:
            raise FastpruneError(f"not a fastprune plan of version {PLAN_VERSION}")
        try:
            return cls(fingerprint=data["fingerprint"],
                       keep={k: [int(i) for i in v] for k, v in data["keep"].items()},
                       remove_layers=[int(i) for i in data["remove_layers"]],
                       group_sizes={k: int(v) for k, v in data["group_sizes"].items()},
                       settings=data.get("settings", {}), version=data["version"])
        except (KeyError, TypeError, ValueError) as exc:
            raise FastpruneError(f"malformed plan: {exc!r}") from exc

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as JSON atomically (temp file, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        return cls.from_json(Path(path).read_text())
