"""The keep/reject policy: a pure function of one asset's measurements and the `[curate]` config.

Inputs are what earlier stages measured (the `score` stage's aesthetic mean and pixel fractions, the inspect
flag, a VLM verdict when there is one); nothing here reads files or calls models, so re-deciding a million assets
under new thresholds costs a Parquet scan, never a score.

Order of the checks, cheapest evidence first, and the reason each records:

    texture files absent (inspect or Blender import)  reject:missing_textures_flag
    heuristic: magenta fraction > magenta_max         reject:magenta_texture
    heuristic: flat white/grey fraction > flat_max    reject:flat_untextured
    mean aesthetic score < the source's threshold     reject:low_aesthetic
    VLM says textures are missing                     reject:vlm_missing_texture

`texture_rule` decides how the heuristic and the VLM combine (see config/pipeline.py); the VLM is only asked where its
answer can change the decision (`needs_vlm`), which is what keeps a 500K-asset run's VLM bill down.
"""

from __future__ import annotations

from dataclasses import dataclass

from flux3d.config.pipeline import CurateConfig

KEEP = "keep"


@dataclass(frozen=True, slots=True)
class Evidence:
    """What is known about one asset when deciding."""

    source: str
    aesthetic: float
    magenta_fraction: float
    flat_fraction: float
    missing_textures_flag: bool = False
    vlm_missing: bool | None = None  # None = no verdict (not asked, or the call failed)


@dataclass(frozen=True, slots=True)
class Decision:
    decision: str  # "keep" or "reject:<reason>"
    threshold: float
    heuristic_flag: str  # "" or the heuristic's reason (recorded whatever the rule)

    @property
    def keep(self) -> bool:
        return self.decision == KEEP

    @property
    def reason(self) -> str:
        return self.decision.removeprefix("reject:") if not self.keep else ""


def effective_rule(cfg: CurateConfig, vlm_endpoint: str) -> str:
    if cfg.texture_rule == "auto":
        return "heuristic_or_vlm" if vlm_endpoint else "heuristic"
    return cfg.texture_rule


def aesthetic_threshold(source: str, cfg: CurateConfig) -> float:
    """The source's threshold: an exact entry, else the entry for its prefix before ':', else the default."""
    table = cfg.aesthetic_thresholds
    if source in table:
        return table[source]
    return table.get(source.split(":", 1)[0], cfg.aesthetic_threshold)


def heuristic_flag(ev: Evidence, cfg: CurateConfig) -> str:
    if cfg.use_inspect_flag and ev.missing_textures_flag:
        return "missing_textures_flag"
    if ev.magenta_fraction > cfg.magenta_max:
        return "magenta_texture"
    if ev.flat_fraction > cfg.flat_max:
        return "flat_untextured"
    return ""


def _pre_vlm(ev: Evidence, cfg: CurateConfig, rule: str) -> tuple[str, float, str]:
    """(reason or "", threshold, heuristic flag) from everything but the VLM."""
    threshold = aesthetic_threshold(ev.source, cfg)
    flag = heuristic_flag(ev, cfg)
    # The inspect flag is a fact about the files, not a guess: it rejects under every rule.
    if flag == "missing_textures_flag" or (flag and rule in ("heuristic", "heuristic_or_vlm")):
        return flag, threshold, flag
    if ev.aesthetic < threshold:
        return "low_aesthetic", threshold, flag
    return "", threshold, flag


def needs_vlm(ev: Evidence, cfg: CurateConfig, rule: str) -> bool:
    """Whether a VLM verdict could change this asset's decision under `rule`."""
    if rule == "heuristic":
        return False
    reason, _, flag = _pre_vlm(ev, cfg, rule)
    if reason:
        return False
    return bool(flag) if rule == "heuristic_and_vlm" else True


def decide(ev: Evidence, cfg: CurateConfig, rule: str) -> Decision:
    """The decision; ValueError when the rule needs a verdict `ev` does not have (ask `needs_vlm` first)."""
    reason, threshold, flag = _pre_vlm(ev, cfg, rule)
    if reason:
        return Decision(f"reject:{reason}", threshold, flag)
    if needs_vlm(ev, cfg, rule):
        if ev.vlm_missing is None:
            raise ValueError("this decision needs a VLM verdict")
        if ev.vlm_missing:
            return Decision("reject:vlm_missing_texture", threshold, flag)
    return Decision(KEEP, threshold, flag)
