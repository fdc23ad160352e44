"""Typed configuration of the asset sources (the `[sources]` section): caches, hosts, and the folders where a user
unpacked the datasets that cannot be fetched on demand."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True, slots=True)
class SourcesConfig:
    objaverse_dir: str = "~/.objaverse"
    """Cache folder of the `objaverse` package (annotations, object paths, downloaded glbs)."""
    objaverse_xl_dir: str = "~/.objaverse"
    """Download folder for `objaverse.xl` annotations."""
    objaverse_base_url: str = "https://huggingface.co/datasets/allenai/objaverse/resolve/main"
    """Where Objaverse 1.0 glbs live (the path after it comes from object-paths.json.gz)."""
    github_archive_url: str = "https://codeload.github.com/{org}/{repo}/tar.gz/{commit}"
    """Template of a GitHub repository archive at a commit (Objaverse-XL github objects). GitHub's
    https://github.com/{org}/{repo}/archive/{commit}.zip serves the same tree with the same top folder."""
    abo_dir: str = ""
    """Folder where abo-3dmodels.tar was unpacked (holds 3dmodels/original/); "" = not downloaded. Read by the
    `trellis:` source for ABO.csv."""
    future3d_dir: str = ""
    """Folder where 3D-FUTURE-model.zip was unpacked (holds 3D-FUTURE-model/); "" = not downloaded."""
    hssd_dir: str = ""
    """Local copy of the Hugging Face dataset hssd/hssd-models (holds objects/); "" = not downloaded."""
    toys4k_dir: str = ""
    """Folder where toys4k_blend_files.zip was unpacked (holds toys4k_blend_files/); "" = not downloaded."""
