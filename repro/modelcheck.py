"""Whether a study's models build, remembered so that planning need not import torch.

Checking a (preset, switches) pair means building it on the meta device, which needs torch; `ModelChecks` keeps
the outcomes, in a file when the CLI gives one, for the study and paper loaders.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from repro.config import RunConfig, model_identity, to_dict
from repro.errors import ConfigError
from repro.rundir import atomic_write_text
from repro.yamlio import Where


def data_geometry(cfg: RunConfig) -> dict:
    """The build arguments the run's data implies (what `train.model_spec` sets), less those the config overrides
    itself (the trainer refuses a contradiction)."""
    (channels, size, _), classes = cfg.data.model_input()
    implied = {"in_channels": channels, "input_size": size, "num_classes": classes}
    return {k: v for k, v in implied.items() if k not in cfg.model.overrides}


class ModelChecks:
    """Outcomes of building (preset, switches) on the meta device: the error, or, when it builds, the resolved
    model (`model_identity`) and the switches that differ from the preset (the paper's model).

    Building needs torch, whose import is most of a plan's time (about 1.9 s of 3.2 s for a 10,000-run study on a
    2-core machine). With a `cache` file, outcomes persist keyed by the source of `repro/models` and the torch
    version, so re-planning, or planning a study whose models were checked before, never imports torch.
    """

    def __init__(self, cache: Path | None = None):
        self.cache = cache
        self.fingerprint = self._fingerprint() if cache is not None else ""
        self.known: dict[str, dict] = {}
        self.preset_names: list[str] | None = None
        self.new = False
        if cache is not None and cache.is_file():
            try:
                data = json.loads(cache.read_text())
                if data.get("fingerprint") == self.fingerprint:
                    self.known, self.preset_names = dict(data["checks"]), list(data["presets"])
            except (ValueError, KeyError, TypeError, OSError):
                pass  # a damaged cache is only a slower plan

    def presets(self) -> list[str]:
        """Every preset name of every family."""
        if self.preset_names is None:
            from repro import models

            self.preset_names, self.new = list(models.PRESETS), True
        return self.preset_names

    @staticmethod
    def _fingerprint() -> str:
        from importlib import metadata

        h = hashlib.sha256(b"model-checks v4")
        for f in sorted((Path(__file__).parent / "models").glob("*.py")):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        try:
            h.update(metadata.version("torch").encode())
        except metadata.PackageNotFoundError:
            pass
        return h.hexdigest()[:16]

    def check(self, cfg: RunConfig, where: Where, dotted: str) -> dict:
        """{"model": resolved model, "switches": differing switches}; ConfigError naming `dotted` if it does not
        build."""
        geometry = data_geometry(cfg)
        key = json.dumps([cfg.model.name, to_dict(cfg)["model"]["overrides"], geometry], sort_keys=True)
        if key not in self.known:
            from repro import models

            try:
                # at the data's geometry, as the trainer builds it: a switch that holds at the preset's 32x32
                # latents may not at the run's input (a window that does not divide a stage's map)
                models.build_meta(cfg.model.name, **{**cfg.model.overrides, **geometry})
                self.known[key] = {"error": None, "model": model_identity(cfg),
                                   "switches": _differing(models.PRESETS[cfg.model.name], cfg)}
            except (ValueError, TypeError) as e:
                self.known[key] = {"error": str(e)}
            self.new = True
        if self.known[key]["error"] is not None:
            raise ConfigError(f"{where.at(dotted)}: {self.known[key]['error']}")
        return {"model": self.known[key]["model"], "switches": self.known[key]["switches"]}

    def save(self) -> None:
        if self.cache is not None and self.new:
            atomic_write_text(self.cache, json.dumps({"fingerprint": self.fingerprint, "presets": self.presets(),
                                                      "checks": self.known}))
            self.new = False


_MODEL_CHECKS = ModelChecks()


def model_checks(cache: Path | None = None) -> ModelChecks:
    """This process's ModelChecks; with `cache`, first switch to one remembered in that file (the CLI does, under
    the results root)."""
    global _MODEL_CHECKS
    if cache is not None and _MODEL_CHECKS.cache != cache:
        _MODEL_CHECKS = ModelChecks(cache)
    return _MODEL_CHECKS


def _differing(preset: dict, cfg: RunConfig) -> dict:
    out = {}
    for k, v in cfg.model.overrides.items():
        if preset.get(k) != v and not (isinstance(v, tuple) and tuple(preset.get(k, ())) == v):
            out[k] = list(v) if isinstance(v, tuple) else v
    return out
