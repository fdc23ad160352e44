"""Asset sources. A source turns a spec string into `AssetRecord`s; it never downloads (the download stage does).

Specs (`flux3d ingest --source SPEC`, repeatable):

    local:DIR                          every 3D file under DIR, recursively
    manifest:FILE                      a CSV/Parquet list of URLs or paths (url, sha256, license, ... columns)
    trellis:FILE                       one of TRELLIS-500K's published lists (ObjaverseXL_github.csv, ABO.csv, ...)
    objaverse:[lvis=CAT,CAT][;limit=N] Objaverse 1.0 through the `objaverse` package
    objaverse-xl:[sources=a,b][;limit=N]  Objaverse-XL through `objaverse.xl` (sketchfab, github, thingiverse, smithsonian)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from flux3d.config.pipeline import Config
from flux3d.records import AssetRecord

# File extensions that are assets (not sidecar buffers/textures), with the format name recorded in the catalog.
ASSET_EXTENSIONS = {
    ".glb": "glb", ".gltf": "gltf", ".obj": "obj", ".fbx": "fbx", ".ply": "ply", ".stl": "stl", ".blend": "blend",
    ".usdz": "usdz", ".usd": "usd", ".usda": "usda", ".usdc": "usdc", ".dae": "dae",
}


@dataclass(frozen=True, slots=True)
class SourceSpec:
    kind: str
    arg: str
    options: dict[str, str]

    @property
    def limit(self) -> int | None:
        return int(self.options["limit"]) if "limit" in self.options else None


def parse_spec(spec: str) -> SourceSpec:
    """`kind:arg` or `kind:key=value;key=value`. Raises ValueError with the accepted forms on anything else."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in ("local", "manifest", "trellis", "objaverse", "objaverse-xl"):
        raise ValueError(f"bad source spec {spec!r}: expected local:DIR, manifest:FILE, trellis:FILE, "
                         "objaverse:[opts] or objaverse-xl:[opts]")
    options: dict[str, str] = {}
    arg = rest
    if kind in ("objaverse", "objaverse-xl"):
        arg = ""
        for part in filter(None, rest.split(";")):
            key, eq, value = part.partition("=")
            if not eq:
                raise ValueError(f"bad option {part!r} in {spec!r}: expected key=value")
            options[key.strip()] = value.strip()
    elif not rest:
        raise ValueError(f"bad source spec {spec!r}: {kind}: needs a path")
    if "limit" in options and not options["limit"].isdigit():
        raise ValueError(f"limit must be a whole number in {spec!r}")
    return SourceSpec(kind, arg, options)


def list_source(spec: SourceSpec, cfg: Config, known: dict[str, tuple[int, int, str]] | None = None
                ) -> Iterator[AssetRecord]:
    """Records of one source. `known` maps a local file identifier to (bytes, mtime_ns, sha256) from the catalog,
    so a re-listing of unchanged local files costs a stat, not a re-hash."""
    if spec.kind == "local":
        from flux3d.sources.local import list_local

        yield from list_local(spec.arg, known or {})
    elif spec.kind == "manifest":
        from flux3d.sources.manifest import list_manifest

        yield from list_manifest(spec.arg)
    elif spec.kind == "trellis":
        from flux3d.sources.trellis import list_trellis

        yield from list_trellis(spec.arg, cfg.sources)
    elif spec.kind == "objaverse":
        from flux3d.sources.objaverse import list_objaverse

        yield from list_objaverse(spec, cfg.sources)
    else:
        from flux3d.sources.objaverse_xl import list_objaverse_xl

        yield from list_objaverse_xl(spec, cfg.sources)
