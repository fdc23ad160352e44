"""The pipeline's config as a run sees it: a named recipe, then one TOML file, then dotted overrides."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

from flux3d.config.pipeline import Config
from flux3d.config.recipes import eval_config, pipeline_recipe, train_config
from flux3d.config.training import KINDS
from flux3d.config.typecheck import build_dataclass


def config_from_dict(data: dict[str, Any]) -> Config:
    """The run's Config; the training and evaluation changes it carries are built into their configs here too, so a
    wrong key or type in `[train.decoder]` fails now, not when the train node starts."""
    cfg = build_dataclass(Config, data, "")
    for kind in KINDS:
        train_config(kind, cfg.train.recipe(kind), cfg.train.changes(kind))
    eval_config(cfg.evaluate.recipe, changes=cfg.evaluate.changes)
    return cfg


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                recipe: str | None = None) -> Config:
    """Load a TOML config file (None = all defaults) over a named recipe (`recipes.pipeline_recipe`), then apply
    dotted overrides like {"storage.root": "/tmp/r"}."""
    # The recipe's whole config as plain data, so the file and the overrides change it field by field.
    data: dict[str, Any] = dataclasses.asdict(pipeline_recipe(recipe)) if recipe else {}
    if path is not None:
        with open(path, "rb") as f:
            for section, values in tomllib.load(f).items():
                if isinstance(values, dict) and isinstance(data.get(section), dict):
                    data[section].update(values)
                else:
                    data[section] = values
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return config_from_dict(data)
