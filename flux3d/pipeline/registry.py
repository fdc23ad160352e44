"""The data DAG's per-asset nodes, in the order they run: for each, the builder of its `Stage`, the hash of the
config that determines its outcome, and its result columns. `flows.data` walks this order; a stage landing later
plugs in here and nowhere else.

A node's `params` and `columns` are what its built `Stage` carries (tests/test_architecture.py holds them equal),
so a reader sees what invalidates a stage's results without building it (no model loaded, no Blender started).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from flux3d.catalog import Catalog
from flux3d.config.pipeline import Config
from flux3d.features.encode import FEATURE_COLUMNS, encode_params
from flux3d.pipeline.curate import (
    CURATE_COLUMNS,
    SCORE_COLUMNS,
    curate_params,
    curate_stage,
    score_params,
    score_stage,
)
from flux3d.pipeline.encode import encode_stage
from flux3d.pipeline.ingest import download_stage, inspect_params, inspect_stage
from flux3d.pipeline.render import render_stage
from flux3d.pipeline.stage import Stage
from flux3d.pipeline.voxelize import voxelize_stage
from flux3d.stages.download import DOWNLOAD_COLUMNS, download_params
from flux3d.stages.inspect import INSPECT_COLUMNS
from flux3d.stages.render import RENDER_COLUMNS, render_params
from flux3d.stages.voxelize import VOXEL_COLUMNS, voxelize_params
from flux3d.storage import Storage


@dataclass(frozen=True, slots=True)
class Node:
    """One per-asset node of the DAG."""

    build: Callable[[Config, Storage, Catalog], Stage]
    params: Callable[[Config], str]
    """Hash of the config that determines the outcome: a re-run skips what is final for it."""
    columns: pa.Schema | None
    """The stage's own result columns in the catalog."""


STAGES: dict[str, Node] = {
    "download": Node(download_stage, download_params, DOWNLOAD_COLUMNS),
    "inspect": Node(inspect_stage, inspect_params, INSPECT_COLUMNS),
    "render": Node(render_stage, lambda cfg: render_params(cfg.render), RENDER_COLUMNS),
    "score": Node(score_stage, score_params, SCORE_COLUMNS),
    "curate": Node(curate_stage, curate_params, CURATE_COLUMNS),
    "voxelize": Node(voxelize_stage, lambda cfg: voxelize_params(cfg.voxelize.resolution), VOXEL_COLUMNS),
    "encode": Node(encode_stage, encode_params, FEATURE_COLUMNS),
}
"""In DAG order; `flux3d shard` (pipeline/shard.py) then packs what all of them kept into a dataset version."""


def build(name: str, cfg: Config) -> tuple[Stage, Catalog]:
    """The named stage over the catalog at `cfg.storage.root`."""
    storage = Storage(cfg.storage.root)
    catalog = Catalog(storage)
    return STAGES[name].build(cfg, storage, catalog), catalog
