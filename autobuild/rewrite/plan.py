"""Plans: the contract between the CLI, the search and saved models.

A plan names a baseline, how to build it, and a list of conversions (family + options +
site names). Applying the same plan to the same baseline always yields the same module
structure, so a saved model is a plan plus a safetensors file of weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import yaml

from autobuild.errors import AutobuildError

__all__ = ["PLAN_VERSION", "Conversion", "Plan"]

PLAN_VERSION = 1


@dataclass
class Conversion:
    """Convert ``sites`` (names from ``autobuild sites``) with ``family`` and ``options``."""

    family: str
    options: dict[str, Any] = field(default_factory=dict)
    sites: list[str] = field(default_factory=list)


@dataclass
class Plan:
    model: str
    conversions: list[Conversion] = field(default_factory=list)
    init: str = "scratch"
    num_classes: int | None = None
    input_size: tuple[int, int, int] | None = None
    weights: str | None = None
    #: Class names or qualified names of modules fx keeps opaque (untraceable code).
    leaf_modules: list[str] = field(default_factory=list)
    version: int = PLAN_VERSION

    @property
    def family(self) -> str:
        """The family of a single-family plan ("mixed" otherwise, "" for none)."""
        families = {c.family for c in self.conversions}
        return families.pop() if len(families) == 1 else ("mixed" if families else "")

    @property
    def sites(self) -> list[str]:
        return [s for c in self.conversions for s in c.sites]

    def to_dict(self) -> dict[str, Any]:
        return {
            "autobuild_plan": self.version,
            "model": self.model,
            "num_classes": self.num_classes,
            "input_size": list(self.input_size) if self.input_size else None,
            "weights": self.weights,
            "init": self.init,
            "leaf_modules": list(self.leaf_modules),
            "conversions": [{"family": c.family, "options": dict(c.options),
                             "sites": list(c.sites)} for c in self.conversions],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "plan") -> Plan:
        try:
            if not isinstance(data, dict) or "autobuild_plan" not in data:
                raise ValueError("not an autobuild plan (no 'autobuild_plan' key)")
            if int(data["autobuild_plan"]) > PLAN_VERSION:
                raise ValueError(f"plan version {data['autobuild_plan']} is newer than this "
                                 f"autobuild understands ({PLAN_VERSION})")
            convs = [Conversion(str(c["family"]), dict(c.get("options") or {}),
                                [str(s) for s in c.get("sites") or []])
                     for c in data.get("conversions") or []]
            size = data.get("input_size")
            return cls(model=str(data["model"]), conversions=convs,
                       init=str(data.get("init", "scratch")),
                       num_classes=data.get("num_classes"),
                       input_size=tuple(int(v) for v in size) if size else None,
                       weights=data.get("weights"),
                       leaf_modules=[str(m) for m in data.get("leaf_modules") or []],
                       version=int(data["autobuild_plan"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise AutobuildError(f"corrupt plan {source}: {exc}") from exc

    # ---- files ----------------------------------------------------------------------
    def dumps(self, fmt: str = "yaml") -> str:
        if fmt == "json":
            return json.dumps(self.to_dict(), indent=2) + "\n"
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str) -> None:
        fmt = "json" if path.endswith(".json") else "yaml"
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(self.dumps(fmt))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str) -> Plan:
        if os.path.isdir(path):
            for name in ("plan.yaml", "plan.yml", "plan.json"):
                if os.path.exists(os.path.join(path, name)):
                    path = os.path.join(path, name)
                    break
            else:
                raise AutobuildError(f"{path!r} holds no plan.yaml or plan.json")
        if not os.path.exists(path):
            raise AutobuildError(f"plan file {path!r} does not exist")
        try:
            with open(path) as f:
                text = f.read()
            data = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AutobuildError(f"corrupt plan {path!r}: {first}") from exc
        return cls.from_dict(data, repr(path))
