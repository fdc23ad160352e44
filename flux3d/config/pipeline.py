"""Typed run configuration, loaded from one TOML file.

Each section is a dataclass; the docstring under a field is its documentation. Defaults run on a laptop. A TOML
file only needs the fields it changes:

    [storage]
    root = "s3://bucket/flux3d"

    [download]
    workers = 32

Unknown sections or keys, wrong types and conflicting options raise ValueError (no silent correction).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from flux3d.config.features import BACKGROUNDS, EncodeConfig, ShardConfig, VoxelizeConfig
from flux3d.config.flow import FlowConfig
from flux3d.config.model_flow import EvaluateSection, TrainSection
from flux3d.config.sources import SourcesConfig


@dataclass(kw_only=True, slots=True)
class StorageConfig:
    root: str = "./data"
    """Data root: a local path or any fsspec URL (s3://bucket/prefix, gs://..., memory://...)."""


@dataclass(kw_only=True, slots=True)
class IngestConfig:
    batch_size: int = 64
    """Results are committed to the catalog in batches of this many assets; a kill loses at most one batch."""
    limit: int | None = None
    """Stop after listing this many assets per source (None = all); for trial runs."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError("ingest.batch_size must be >= 1")


@dataclass(kw_only=True, slots=True)
class DownloadConfig:
    workers: int = 8
    """Concurrent downloads (threads; downloads are I/O bound)."""
    connect_timeout_s: float = 10.0
    """Seconds to establish a connection."""
    read_timeout_s: float = 60.0
    """Seconds without a byte before the transfer is abandoned (a stalled server is a transient error)."""
    max_attempts: int = 5
    """Attempts per file for transient errors (connection, timeout, HTTP 429/5xx). 4xx other than 429 is final."""
    backoff_s: float = 1.0
    """First retry delay; doubles each attempt, with +-50% jitter, capped at `backoff_max_s`."""
    backoff_max_s: float = 60.0
    """Upper bound of one retry delay (a server's Retry-After is honoured up to this too)."""
    max_file_bytes: int = 2 * 1024**3
    """Files larger than this are refused (`failed:too_large`)."""
    accept_modified: bool = False
    """Keep a file whose sha256 differs from the source's (Objaverse-XL 'modified'); default records hash_mismatch."""

    def __post_init__(self) -> None:
        if self.workers < 1 or self.max_attempts < 1:
            raise ValueError("download.workers and download.max_attempts must be >= 1")
        if self.backoff_s > self.backoff_max_s:
            raise ValueError("download.backoff_s must not exceed download.backoff_max_s")


@dataclass(kw_only=True, slots=True)
class ArchiveConfig:
    max_members: int = 100_000
    """Archives with more members are refused (`failed:archive_too_many_members`)."""
    max_total_bytes: int = 8 * 1024**3
    """Uncompressed size cap for one archive (zip-bomb guard)."""
    max_ratio: float = 200.0
    """Largest allowed uncompressed/compressed size ratio of the whole archive (zip-bomb guard)."""


@dataclass(kw_only=True, slots=True)
class InspectConfig:
    workers: int = 2
    """Assets inspected in parallel, each in its own bounded child process."""
    timeout_s: float = 120.0
    """Wall-clock limit per asset; the child's whole process group is killed after it (`failed:timeout`)."""
    memory_mb: int = 8192
    """Address-space limit of the child (`failed:out_of_memory` when exceeded)."""
    reject_untextured: bool = True
    """Reject assets in a material-capable format (glTF, OBJ, FBX, ...) that reference no image texture: they can
    only render flat or vertex colour, the failure mode the paper's texture filter exists for, and inspect is the
    cheapest place to drop them."""
    geometry_only_formats: list[str] = field(default_factory=lambda: ["stl", "ply"])
    """Formats that cannot carry textures: `reject_untextured` does not apply (render + curation decide)."""
    max_faces: int = 20_000_000
    """Assets with more faces are rejected (`rejected:too_many_faces`); they would stall rendering."""


@dataclass(kw_only=True, slots=True)
class RenderConfig:
    views: int = 150
    """Views of the main set (`views150/`): features and decoder supervision."""
    resolution: int = 512
    """Side in pixels of the main set's square images."""
    cond_views: int = 24
    """Views of the conditioning set (`cond24/`)."""
    cond_resolution: int = 1024
    """Side in pixels of the conditioning set."""
    curation_views: int = 10
    """Views of the curation set (`curation10/`): aesthetic score and texture check. 0 renders none (10 fewer
    views per asset): curation then reads 10 views spread over the main set, at the same resolution."""
    curation_resolution: int = 512
    """Side in pixels of the curation set."""
    radius: float = 2.0
    """Camera distance from the origin (the scene is normalised to the unit cube)."""
    fov_deg: float = 40.0
    """Horizontal (= vertical, square images) field of view."""
    samples: int = 128
    """Cycles samples per pixel (TRELLIS: 128)."""
    denoise: bool = True
    """Cycles denoiser (OpenImageDenoise on CPU, OptiX's on OptiX devices)."""
    adaptive_threshold: float = 0.01
    """Cycles' adaptive-sampling noise threshold: a pixel stops sampling once its noise estimate is below it
    (0 = every pixel takes `samples`). 0.01 is Blender's default since 3.0, what TRELLIS rendered with."""
    denoise_prefilter: str = "AUTO"
    """OpenImageDenoise's prefilter of its albedo and normal guides: ACCURATE (Blender's default, TRELLIS), FAST,
    NONE, or AUTO: ACCURATE for an asset with a see-through material (glass, transmission, alpha), whose guides are
    noisy, else NONE. Opaque assets' first-hit guides are clean, so NONE denoises them as well (+-0.1 dB) and saves
    most of the denoiser's time (~1.5 s of ~7.7 s per 512-px view on 2 cores); on glass NONE costs 0.7 dB, FAST
    costs ~1.5 dB on opaque assets (docs/rendering.md)."""
    sampling_pattern: str = "AUTOMATIC"
    """Cycles' sampling pattern: AUTOMATIC (Blender 4.2: blue-noise dithered Sobol for final renders) or
    TABULATED_SOBOL (Blender 3.x-4.1's): ~4 % faster on CPU here, but its noise denoises worse: -0.1 dB at 512 px,
    -0.35 dB at 1024 px against the converged image (docs/rendering.md)."""
    crop_to_object: bool = True
    """Render only the rectangle the asset's vertices project into (+2 px; Blender's render border): outside it a
    view sees the empty, transparent background, which otherwise takes ~25 % of a view's time (each of its
    pixels still takes the adaptive sampler's minimum samples, and the denoiser runs over it). Inside, the same
    samples: without the denoiser the pixels equal the full frame's; the denoiser, seeing a smaller image, differs
    at noise level. Off for TRELLIS's renders, and where an asset has something the vertices do not bound
    (volumes, hair, shader displacement)."""
    light_tree: bool = False
    """Cycles' light tree (on by default since Blender 3.5; TRELLIS's Blender 3.0 had none). With two lights it
    costs ~10 % per sample for no less noise (benchmarks/render_quality.py)."""
    bottom_light: bool = False
    """TRELLIS's third light, a 1000 W area light at z = -10 facing down, away from the object: it adds nothing to
    the image, and without a light tree it would take a third of the light samples."""
    diffuse_bounces: int = 1
    """Cycles diffuse bounces (TRELLIS: 1)."""
    glossy_bounces: int = 1
    """Cycles glossy bounces (TRELLIS: 1)."""
    transparent_bounces: int = 3
    """Cycles transparent bounces (TRELLIS: 3)."""
    transmission_bounces: int = 3
    """Cycles transmission bounces (TRELLIS: 3)."""
    device: str = "auto"
    """auto (OptiX, else CUDA, else CPU) | optix | cuda | cpu."""
    threads: int = 0
    """CPU render threads per asset (0 = Blender's auto: every core)."""
    workers: int = 1
    """Assets rendered in parallel, each in its own child process (one Blender session each)."""
    assets_per_session: int = 100
    """Assets one Blender child renders in turn before a fresh one starts (process start and `bpy` import paid once
    per that many; a hang or crash still fails only its asset, and the next gets a fresh child)."""
    timeout_s: float = 1800.0
    """Wall-clock limit per asset (import + all view sets); the child's process group is killed after it."""
    memory_mb: int | None = 16384
    """Address-space limit of the child (None = none; CUDA/OptiX reserve huge address ranges: use None on GPU)."""
    view_transform: str = "Filmic"
    """Colour management view transform. Filmic is Blender 3.0's default, i.e. what TRELLIS's renders (and its
    strong lights) were tuned with; Standard blows those lights out, Blender 4.2's default AgX shifts hues. The
    missing-texture magenta check passes with Filmic and Standard (tests/test_render.py)."""
    blank_coverage: float = 0.0005
    """A view whose foreground (alpha > 0.5) covers less than this fraction of the image counts as blank."""
    contact_sheet_views: int = 8
    """Main-set views tiled into `contact.png` beside the renders (0 = no sheet)."""
    save_mesh: bool = True
    """Write the normalised, triangulated scene as `mesh.ply` (input of voxelization)."""
    passes: list[str] = field(default_factory=lambda: ["depth"])
    """Extra per-view passes of the main set: `depth` (`NNN_depth.png`, 16-bit camera-axis depth, input of the
    visibility-weighted feature average) and `normal` (`NNN_normal.png`, world-space normals). Main set only."""

    def __post_init__(self) -> None:
        for name in ("views", "cond_views", "samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"render.{name} must be >= 1")
        if self.curation_views < 0:
            raise ValueError("render.curation_views must be >= 0 (0: curation reads 10 main-set views)")
        for name in ("resolution", "cond_resolution", "curation_resolution"):
            value = getattr(self, name)
            if value < 8 or value % 8:
                raise ValueError(f"render.{name} must be a multiple of 8 (>= 8), got {value}")
        if not 0 < self.fov_deg < 180:
            raise ValueError("render.fov_deg must be in (0, 180)")
        if self.radius <= 0:
            raise ValueError("render.radius must be > 0")
        if self.radius <= math.sqrt(3) / 2:
            raise ValueError("render.radius must exceed the unit cube's half diagonal (0.866): cameras inside it")
        if self.device not in ("auto", "optix", "cuda", "cpu"):
            raise ValueError(f"render.device must be auto, optix, cuda or cpu, got {self.device!r}")
        if self.workers < 1 or self.threads < 0 or self.timeout_s <= 0 or self.assets_per_session < 1:
            raise ValueError("render.workers and assets_per_session must be >= 1, render.threads >= 0, "
                             "render.timeout_s > 0")
        if min(self.diffuse_bounces, self.glossy_bounces, self.transparent_bounces, self.transmission_bounces) < 0:
            raise ValueError("render bounces must be >= 0")
        if not 0 <= self.adaptive_threshold < 1:
            raise ValueError("render.adaptive_threshold must be in [0, 1)")
        if self.denoise_prefilter not in ("AUTO", "ACCURATE", "FAST", "NONE"):
            raise ValueError(f"render.denoise_prefilter must be AUTO, ACCURATE, FAST or NONE, got "
                             f"{self.denoise_prefilter!r}")
        if self.sampling_pattern not in ("AUTOMATIC", "TABULATED_SOBOL", "BLUE_NOISE"):
            raise ValueError(f"render.sampling_pattern must be AUTOMATIC, TABULATED_SOBOL or BLUE_NOISE, got "
                             f"{self.sampling_pattern!r}")
        if set(self.passes) - {"depth", "normal"}:
            raise ValueError(f"render.passes may hold depth and normal, got {self.passes}")
        if not 0 <= self.blank_coverage < 1 or self.contact_sheet_views < 0:
            raise ValueError("render.blank_coverage must be in [0, 1) and render.contact_sheet_views >= 0")


@dataclass(kw_only=True, slots=True)
class CurateConfig:
    clip_model: str = "ViT-L-14-quickgelu"
    """open_clip architecture of the aesthetic scorer (the LAION head expects OpenAI ViT-L/14's 768-d embedding;
    OpenAI's weights were trained with QuickGELU, hence the -quickgelu variant)."""
    clip_pretrained: str = "openai"
    """open_clip pretrained tag (downloads when online) or a local checkpoint path (offline clusters)."""
    clip_model_config: str = ""
    """Optional JSON file registering a custom open_clip architecture named `clip_model` (tests: a tiny ViT)."""
    aesthetic_head: str = ("https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/main/"
                           "sac+logos+ava1-l14-linearMSE.pth")
    """The LAION improved-aesthetic-predictor head: a local file or an http(s) URL (fetched once into
    FLUX3D_WEIGHTS_CACHE, default ~/.cache/flux3d); a torch state dict loaded with weights_only."""
    background: str = "white"
    """Background composited under the transparent renders before scoring and judging: white | black | grey."""
    batch_size: int = 64
    """Images per scorer forward pass (10 curation views per asset)."""
    device: str = "auto"
    """auto (cuda if available) | cpu | cuda."""
    magenta_max: float = 0.02
    """Reject when more than this fraction of the object's pixels (all curation views) is missing-texture magenta."""
    flat_max: float = 0.8
    """Reject when more than this fraction of the object's interior pixels is plain untextured paint (see
    curation/heuristic.py for how 0.8 was measured)."""
    use_inspect_flag: bool = True
    """Reject assets whose referenced image files are absent (inspect's `missing_textures`, render's
    `missing_images`)."""
    aesthetic_threshold: float = 4.5
    """Minimum mean aesthetic score for sources not listed in `aesthetic_thresholds` (TRELLIS: 4.5)."""
    aesthetic_thresholds: dict[str, float] = field(
        default_factory=lambda: {"objaverse": 5.5, "objaverse-xl": 5.5, "trellis:ObjaverseXL_sketchfab": 5.5,
                                 "trellis:ObjaverseXL_github": 5.5})
    """Per-source minimum, matched on the source name, then on its prefix before ':' (TRELLIS: 5.5 for all of
    Objaverse-XL, whose Sketchfab part is Objaverse 1.0)."""
    aesthetic_source: str = "scorer"
    """Which aesthetic score decides: `scorer` (ours, the mean over the curation views) or `published` (the score
    the source's list carries, e.g. TRELLIS-500K's aesthetic_score: its own selection, reproduced exactly); under
    `published` an asset whose list has no score is `failed:no_published_score`. Our score is computed either way
    and the curation report compares the two where both exist."""
    texture_rule: str = "auto"
    """How the two texture checks combine: heuristic_or_vlm (either rejects), heuristic_and_vlm (the VLM must confirm
    a heuristic flag), vlm (the heuristic is recorded only), heuristic (no VLM calls); auto = heuristic_or_vlm when
    `vlm.endpoint` is set, else heuristic."""
    report_samples: int = 8
    """Rejected assets shown per reason in the report's contact sheets."""

    def __post_init__(self) -> None:
        if self.background not in BACKGROUNDS:
            raise ValueError(f"curate.background must be one of {BACKGROUNDS}, got {self.background!r}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"curate.device must be auto, cpu or cuda, got {self.device!r}")
        if self.aesthetic_source not in ("scorer", "published"):
            raise ValueError(f"curate.aesthetic_source must be scorer or published, got {self.aesthetic_source!r}")
        if self.texture_rule not in ("auto", "heuristic_or_vlm", "heuristic_and_vlm", "vlm", "heuristic"):
            raise ValueError(f"curate.texture_rule: unknown rule {self.texture_rule!r}")
        if self.batch_size < 1 or not 0 <= self.magenta_max <= 1 or not 0 <= self.flat_max <= 1:
            raise ValueError("curate.batch_size must be >= 1 and magenta_max, flat_max in [0, 1]")


@dataclass(kw_only=True, slots=True)
class VLMConfig:
    endpoint: str = ""
    """OpenAI-compatible API base URL, e.g. http://vlm-host:8000/v1 (vLLM, SGLang, TGI, Ollama); "" = no VLM judge
    (then `curate.texture_rule` must be `heuristic`)."""
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    """Model name sent in each request (what the server serves)."""
    api_key_env: str = "FLUX3D_VLM_API_KEY"
    """Environment variable holding the bearer token, if the server wants one."""
    timeout_s: float = 60.0
    """Per-request read timeout."""
    connect_timeout_s: float = 5.0
    max_attempts: int = 4
    """Attempts per asset on timeouts, connection errors, 429 and 5xx (exponential backoff between them)."""
    parse_attempts: int = 2
    """Requests per asset while answers do not parse; then `failed:vlm_unparseable`."""
    backoff_s: float = 1.0
    concurrency: int = 8
    """Requests in flight (the server batches them)."""
    views: int = 6
    """Curation views tiled into the grid the judge sees."""
    tile: int = 256
    """Side in pixels of one view in the grid."""
    max_tokens: int = 64

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.parse_attempts < 1 or self.concurrency < 1 or self.views < 1:
            raise ValueError("vlm.max_attempts, parse_attempts, concurrency and views must be >= 1")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0 or self.tile < 32:
            raise ValueError("vlm timeouts must be > 0 and vlm.tile >= 32")


@dataclass(kw_only=True, slots=True)
class Config:
    storage: StorageConfig = field(default_factory=StorageConfig)
    ingest: IngestConfig = field(default_factory=IngestConfig)
    download: DownloadConfig = field(default_factory=DownloadConfig)
    archive: ArchiveConfig = field(default_factory=ArchiveConfig)
    inspect: InspectConfig = field(default_factory=InspectConfig)
    sources: SourcesConfig = field(default_factory=SourcesConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    curate: CurateConfig = field(default_factory=CurateConfig)
    vlm: VLMConfig = field(default_factory=VLMConfig)
    voxelize: VoxelizeConfig = field(default_factory=VoxelizeConfig)
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    shard: ShardConfig = field(default_factory=ShardConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    train: TrainSection = field(default_factory=TrainSection)
    evaluate: EvaluateSection = field(default_factory=EvaluateSection)

    def __post_init__(self) -> None:
        if not self.vlm.endpoint and self.curate.texture_rule not in ("auto", "heuristic"):
            # Without this a run would mark every candidate failed:vlm_unreachable instead of saying why up front.
            raise ValueError(f"curate.texture_rule = {self.curate.texture_rule} needs a VLM: set vlm.endpoint, or "
                             "texture_rule = \"heuristic\"")
        if self.shard.cond == "latents" and not self.encode.cond_latents:
            raise ValueError("shard.cond = \"latents\" needs encode.cond_latents = true")


def section_params(section: Any) -> dict[str, Any]:
    """A config section as a plain dict, for params hashes."""
    return dataclasses.asdict(section)
