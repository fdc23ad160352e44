"""Curation parts on their own: the pure policy, the answer parser, the pixel heuristic, the VLM client against a
real local server, the real LAION head and the open_clip scorer at a tiny size."""

from __future__ import annotations

import base64
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flux3d.config.load import load_config
from flux3d.config.pipeline import CurateConfig, VLMConfig
from flux3d.curation.heuristic import texture_fractions
from flux3d.curation.policy import Evidence, aesthetic_threshold, decide, effective_rule, needs_vlm
from flux3d.curation.vlm import PROMPT, VLMError, VLMJudge, parse_answer, view_grid
from tests.conftest import WEIGHTS
from tests.vlm_server import serve_vlm

HEAD = WEIGHTS / "sac+logos+ava1-l14-linearMSE.pth"
TINY_CLIP = Path(__file__).resolve().parent / "fixtures" / "tiny_clip.json"
CFG = CurateConfig()
GOOD = dict(source="local", aesthetic=6.0, magenta_fraction=0.0, flat_fraction=0.2)


# -- policy -----------------------------------------------------------------------------------------------------
def test_thresholds_per_source():
    assert aesthetic_threshold("objaverse", CFG) == 5.5
    assert aesthetic_threshold("objaverse-xl:github", CFG) == 5.5  # by prefix
    assert aesthetic_threshold("local", CFG) == aesthetic_threshold("manifest:abo", CFG) == 4.5
    cfg = CurateConfig(aesthetic_thresholds={"manifest:abo": 3.0, "manifest": 4.0})
    assert aesthetic_threshold("manifest:abo", cfg) == 3.0 and aesthetic_threshold("manifest:hssd", cfg) == 4.0


def test_policy_order_and_reasons():
    rule = "heuristic"
    assert decide(Evidence(**GOOD), CFG, rule).decision == "keep"
    cases = {
        "missing_textures_flag": dict(missing_textures_flag=True, magenta_fraction=0.5),
        "magenta_texture": dict(magenta_fraction=0.03, flat_fraction=0.95, aesthetic=1.0),
        "flat_untextured": dict(flat_fraction=0.9, aesthetic=1.0),
        "low_aesthetic": dict(aesthetic=4.4),
    }
    for reason, change in cases.items():
        d = decide(Evidence(**{**GOOD, **change}), CFG, rule)
        assert (d.decision, d.reason, d.keep) == (f"reject:{reason}", reason, False)
    d = decide(Evidence(**{**GOOD, "source": "objaverse-xl:github", "aesthetic": 5.0}), CFG, rule)
    assert d.decision == "reject:low_aesthetic" and d.threshold == 5.5
    # Equal to the threshold passes (TRELLIS keeps score >= threshold).
    assert decide(Evidence(**{**GOOD, "aesthetic": 4.5}), CFG, rule).keep


def test_texture_rules_and_when_the_vlm_is_asked():
    flagged = Evidence(**{**GOOD, "flat_fraction": 0.95})
    clean = Evidence(**GOOD)
    ugly = Evidence(**{**GOOD, "aesthetic": 1.0})
    # Only where the answer can change the decision.
    table = {
        "heuristic": (False, False, False),
        "heuristic_or_vlm": (False, True, False),
        "heuristic_and_vlm": (True, False, False),
        "vlm": (True, True, False),  # the heuristic flag is only recorded: the VLM decides
    }
    for rule, expected in table.items():
        assert tuple(needs_vlm(ev, CFG, rule) for ev in (flagged, clean, ugly)) == expected, rule
    with pytest.raises(ValueError, match="needs a VLM verdict"):
        decide(clean, CFG, "heuristic_or_vlm")
    def yes(ev: Evidence) -> Evidence:
        return dataclasses.replace(ev, vlm_missing=True)

    def no(ev: Evidence) -> Evidence:
        return dataclasses.replace(ev, vlm_missing=False)

    assert decide(yes(clean), CFG, "heuristic_or_vlm").decision == "reject:vlm_missing_texture"
    assert decide(no(clean), CFG, "heuristic_or_vlm").keep
    assert decide(no(flagged), CFG, "heuristic_and_vlm").keep  # the VLM overrules an unconfirmed flag
    assert decide(yes(flagged), CFG, "heuristic_and_vlm").decision == "reject:vlm_missing_texture"
    d = decide(no(flagged), CFG, "vlm")
    assert d.keep and d.heuristic_flag == "flat_untextured"  # recorded, not acted on
    # The file-level flag is a fact: it rejects under every rule, and no VLM call is spent on it.
    missing = Evidence(**{**GOOD, "missing_textures_flag": True})
    for rule in table:
        assert not needs_vlm(missing, CFG, rule) and decide(missing, CFG, rule).reason == "missing_textures_flag"


def test_rule_needs_an_endpoint():
    assert effective_rule(CFG, "") == "heuristic" and effective_rule(CFG, "http://x/v1") == "heuristic_or_vlm"
    with pytest.raises(ValueError, match="needs a VLM"):
        load_config(None, {"curate.texture_rule": "heuristic_and_vlm"})
    with pytest.raises(ValueError):
        load_config(None, {"curate.aesthetic_thresholds": {"local": "high"}})


# -- answer parsing and the pixel heuristic -------------------------------------------------------------------
def test_parse_answer_is_strict():
    assert parse_answer("yes: the body renders magenta").missing
    v = parse_answer("  No - textured wood grain and labels.  ")
    assert (v.missing, v.reason) == (False, "textured wood grain and labels")
    assert parse_answer("`YES: plain white`").reason == "plain white"
    for bad in ("", "yes", "maybe: unsure", "yes: fine\nno: wait", '{"answer": "no"}', "The answer is no: x"):
        with pytest.raises(ValueError):
            parse_answer(bad)


def _sphere(texture: np.ndarray | None, colour=(200, 200, 200), size=96) -> np.ndarray:
    """A Lambert-shaded sphere, plain or multiplied by a texture, as RGBA uint8."""
    yy, xx = (np.mgrid[:size, :size] + 0.5) / size * 2 - 1
    r2 = xx ** 2 + yy ** 2
    shade = np.clip(np.sqrt(np.clip(1 - r2, 0, 1)) * 0.8 + 0.2, 0, 1)
    rgb = shade[..., None] * np.array(colour, dtype=np.float64)
    if texture is not None:
        rgb = rgb * texture
    alpha = np.where(r2 < 0.8, 255, 0)
    return np.dstack([np.clip(rgb, 0, 255), alpha]).astype(np.uint8)


def test_heuristic_fractions_on_synthetic_views():
    size = 96
    rng = np.random.default_rng(0)
    checker = ((np.indices((size, size)) // 6).sum(axis=0) % 2)[..., None] * 0.6 + 0.4
    noise = rng.uniform(0.5, 1.0, (size, size, 1))
    plain, red = _sphere(None), _sphere(None, colour=(220, 40, 30))
    magenta = _sphere(None, colour=(255, 0, 255))
    m, f = texture_fractions([plain, red])
    assert m == 0 and f > 0.95
    assert texture_fractions([_sphere(checker)])[1] < 0.85
    assert texture_fractions([_sphere(noise)])[1] < 0.2
    m, _ = texture_fractions([magenta, plain])
    assert 0.45 < m < 0.55  # half the object pixels
    assert texture_fractions([np.zeros((8, 8, 4), np.uint8)]) == (0.0, 0.0)  # nothing in frame


# -- the VLM client against a real local server ---------------------------------------------------------------
def _grid(magenta: bool) -> bytes:
    views = [_sphere(None, colour=(255, 0, 255) if magenta else (90, 160, 60)) for _ in range(4)]
    return view_grid(views, 64, "white")


def _judge(url: str, **kw) -> VLMJudge:
    cfg = VLMConfig(endpoint=url, timeout_s=0.5, connect_timeout_s=0.5, backoff_s=0.0, **kw)
    return VLMJudge(cfg, sleep=lambda s: None)


def test_vlm_client_answers_and_request_shape(monkeypatch):
    monkeypatch.setenv("FLUX3D_VLM_API_KEY", "sk-test")
    with serve_vlm() as server:
        judge = _judge(server.url, model="judge-model")
        assert judge.judge(_grid(True)).missing and not judge.judge(_grid(False)).missing
        req = server.requests[0]
        assert req["path"] == "/v1/chat/completions" and req["headers"]["Authorization"] == "Bearer sk-test"
        body = req["body"]
        assert body["model"] == "judge-model" and body["temperature"] == 0.0
        text, image = body["messages"][0]["content"]
        assert text == {"type": "text", "text": PROMPT}
        jpeg = base64.b64decode(image["image_url"]["url"].removeprefix("data:image/jpeg;base64,"))
        assert Image.open(io.BytesIO(jpeg)).size == (3 * 64, 2 * 64)  # 4 views in rows of 3


def test_vlm_client_retries_5xx_and_429_then_succeeds():
    with serve_vlm(["503", "429", "500"]) as server:
        assert _judge(server.url).judge(_grid(True)).missing
        assert len(server.requests) == 4
    with serve_vlm(["503"] * 4) as server:
        with pytest.raises(VLMError) as e:
            _judge(server.url, max_attempts=4).judge(_grid(True))
        assert e.value.reason == "vlm_http_503" and len(server.requests) == 4


def test_vlm_client_timeouts_and_unreachable():
    with serve_vlm(["slow", "slow"]) as server:
        assert not _judge(server.url, max_attempts=3).judge(_grid(False)).missing  # third attempt answers
    with serve_vlm(["slow"] * 2) as server:
        with pytest.raises(VLMError) as e:
            _judge(server.url, max_attempts=2).judge(_grid(False))
        assert e.value.reason == "vlm_timeout"
    with serve_vlm() as server:
        dead = server.url
    with pytest.raises(VLMError) as e:
        _judge(dead, max_attempts=2).judge(_grid(False))
    assert e.value.reason == "vlm_unreachable"


def test_vlm_client_malformed_answers_and_client_errors():
    with serve_vlm(["garbage"]) as server:
        assert _judge(server.url, parse_attempts=2).judge(_grid(True)).missing
    with serve_vlm(["garbage"] * 3) as server:
        with pytest.raises(VLMError) as e:
            _judge(server.url, parse_attempts=3).judge(_grid(True))
        assert e.value.reason == "vlm_unparseable" and "might be fine" in e.value.message
        assert len(server.requests) == 3
    with serve_vlm(["400"]) as server:
        with pytest.raises(VLMError) as e:
            _judge(server.url).judge(_grid(True))
        assert e.value.reason == "vlm_http_400" and len(server.requests) == 1  # not retried
    with serve_vlm(["not_json"]) as server:
        with pytest.raises(VLMError) as e:
            _judge(server.url).judge(_grid(True))
        assert e.value.reason == "vlm_bad_response"


# -- the aesthetic scorer ---------------------------------------------------------------------------------------
@pytest.mark.shared_assets
def test_real_aesthetic_head_is_the_documented_affine_map():
    """Weights NOTES: with dropout off the head is score = w . e + b, |w| = 17.996, b = 5.2366."""
    if not HEAD.is_file():
        pytest.skip(f"{HEAD} absent")
    import torch

    from flux3d.curation.aesthetic import load_head

    head = load_head(str(HEAD))
    with torch.no_grad():
        b = head(torch.zeros(1, 768)).item()
        w = head(torch.eye(768)).squeeze(-1) - b
        unit = w / w.norm()
        assert b == pytest.approx(5.2366, abs=1e-3) and w.norm().item() == pytest.approx(17.996, abs=1e-2)
        assert head(unit[None]).item() == pytest.approx(b + 17.996, abs=1e-2)
        assert head(-unit[None]).item() == pytest.approx(b - 17.996, abs=1e-2)
        x = torch.nn.functional.normalize(torch.randn(16, 768), dim=-1)
        assert torch.allclose(head(x).squeeze(-1), x @ w + b, atol=1e-3)  # affine (eval mode: no dropout)


def tiny_scorer_config(tmp_path: Path, head: Path = HEAD) -> CurateConfig:
    """A tiny random open_clip model of the ViT family saved as a local checkpoint, loaded by the real code path."""
    import open_clip
    import torch

    open_clip.add_model_config(TINY_CLIP)
    torch.manual_seed(0)
    ckpt = tmp_path / "tiny_clip.pt"
    torch.save(open_clip.create_model("tiny_clip", pretrained=None).state_dict(), ckpt)
    return CurateConfig(clip_model="tiny_clip", clip_pretrained=str(ckpt), clip_model_config=str(TINY_CLIP),
                        aesthetic_head=str(head), batch_size=8)


@pytest.mark.shared_assets
def test_tiny_scorer_matches_embedding_then_head(tmp_path):
    if not HEAD.is_file():
        pytest.skip(f"{HEAD} absent")
    import torch

    from flux3d.curation.aesthetic import AestheticScorer, composite

    scorer = AestheticScorer.load(tiny_scorer_config(tmp_path))
    rng = np.random.default_rng(1)
    views = [Image.fromarray(_sphere(rng.uniform(0.3, 1, (96, 96, 3))), "RGBA") for _ in range(11)]
    scores = scorer.score(views)
    assert scores.shape == (11,) and np.isfinite(scores).all() and scores.std() > 0
    # The same numbers by hand: preprocess, encode, L2-normalise, head; batching (8 + 3) changes nothing.
    with torch.no_grad():
        batch = torch.stack([scorer.preprocess(composite(v, "white")) for v in views])
        emb = torch.nn.functional.normalize(scorer.model.encode_image(batch), dim=-1)
        manual = scorer.head(emb).squeeze(-1).numpy()
    assert np.allclose(scores, manual, atol=1e-4)
    emb_np = scorer.embed(views[:2])
    assert np.allclose(np.linalg.norm(emb_np, axis=1), 1, atol=1e-5)
    assert np.allclose(scorer.head_scores(emb_np), scores[:2], atol=1e-4)
    # The background under the transparent film is part of the input.
    scorer.background = "black"
    assert not np.allclose(scorer.score(views[:2]), scores[:2])


def test_scorer_on_cuda_runs_fp16_and_agrees_with_cpu(tmp_path):
    """On a GPU the scorer loads in fp16 (open_clip keeps its embeddings and norms in fp32): the batch must take the
    patch convolution's precision, and the scores match the fp32 CPU ones."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from flux3d.curation.aesthetic import AestheticScorer, head_module

    head = tmp_path / "head.pth"
    torch.manual_seed(0)
    torch.save(head_module().state_dict(), head)
    cfg = tiny_scorer_config(tmp_path, head)
    rng = np.random.default_rng(1)
    views = [Image.fromarray(_sphere(rng.uniform(0.3, 1, (96, 96, 3))), "RGBA") for _ in range(5)]
    cpu = AestheticScorer.load(dataclasses.replace(cfg, device="cpu")).score(views)
    gpu = AestheticScorer.load(dataclasses.replace(cfg, device="cuda")).score(views)
    assert np.isfinite(gpu).all() and np.allclose(gpu, cpu, atol=2e-2 * max(1.0, float(np.abs(cpu).max())))
