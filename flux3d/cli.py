"""The `flux3d` command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from flux3d.config.load import load_config
from flux3d.config.pipeline import Config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="FLUX3D data and training pipeline.")

RootOpt = Annotated[Optional[str], typer.Option("--root", help="Data root (local path or fsspec URL).")]
ConfigOpt = Annotated[Optional[Path], typer.Option("--config", help="TOML config file.", exists=True)]


def _config(config: Path | None, root: str | None, **overrides: object) -> Config:
    values = {k: v for k, v in overrides.items() if v is not None}
    if root is not None:
        values["storage.root"] = root
    try:
        return load_config(config, values)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e


def _setup_logging(verbose: bool) -> None:
    # force: a library may have configured the root logger already (open_clip's module-level `logging.info`, called
    # when the demo builds its CLIP, runs `basicConfig()`), which would print every later record in its format.
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)


STATE_COLUMNS = ("ok", "skipped", "rejected", "failed")


def _print_counts(title: str, rows: list[tuple[str, dict[str, int], dict[str, int], list[str]]],
                  states: tuple[str, ...], extra: tuple[str, ...] = ()) -> None:
    """One table row per stage (counts per state), then one line per `state:reason` that is not ok."""
    from rich.console import Console
    from rich.table import Table

    table = Table(*("stage", *states, *extra), title=title, title_justify="left")
    for stage, counts, _, extra_values in rows:
        table.add_row(stage, *(str(counts.get(s, 0)) for s in states), *extra_values)
    # Never narrower than the table: rich squeezes a table into the terminal's width, and in a narrow (or
    # mis-reported) one the cells collapse to nothing, leaving a header over empty rows. Too wide wraps, never hides.
    natural = Console(width=10_000).measure(table).maximum
    Console(width=max(Console().width, natural)).print(table)
    for stage, _, reasons, _ in rows:
        for reason, n in reasons.items():
            typer.echo(f"  {stage:<10} {reason:<40} {n}")


def _print_summary(summary) -> None:  # noqa: ANN001 - IngestSummary, imported lazily
    for spec, n in summary.listed.items():
        typer.echo(f"listed {n} new asset(s) from {spec}")
    rows = [(r.stage, r.states, r.reasons, [str(r.processed), f"{r.per_second:.1f}"]) for r in summary.stages]
    _print_counts(f"ingest: this run ({summary.seconds:.1f} s)", rows, STATE_COLUMNS, ("processed", "assets/s"))


@app.command()
def ingest(
    source: Annotated[list[str], typer.Option("--source", help="local:DIR | manifest:FILE | trellis:FILE | "
                                                              "objaverse:[opts] | objaverse-xl:[opts]; repeatable.")],
    root: RootOpt = None,
    config: ConfigOpt = None,
    limit: Annotated[Optional[int], typer.Option(help="At most this many assets per source.")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """List sources into the catalog, then download and inspect everything not yet done."""
    from flux3d.pipeline.ingest import ingest as run_ingest

    _setup_logging(verbose)
    cfg = _config(config, root, **{"ingest.limit": limit})
    try:
        summary = run_ingest(cfg, source)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    _print_summary(summary)


@app.command()
def status(root: RootOpt = None, config: ConfigOpt = None,
           as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """Counts per stage and state, and per reason for everything not ok."""
    from flux3d.catalog import Catalog
    from flux3d.pipeline.reproduction import reproduction_markdown, reproduction_report
    from flux3d.storage import Storage

    cfg = _config(config, root)
    catalog = Catalog(Storage(cfg.storage.root))
    report = catalog.status()
    reproduction = reproduction_report(catalog)
    if reproduction is not None:
        report["reproduction"] = reproduction
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['assets']} assets ({report['unique_sha256']} unique files); by source: "
               + ", ".join(f"{k} {v}" for k, v in report["sources"].items()))
    rows = [(stage, c["states"], c["reasons"], []) for stage, c in report["stages"].items()]
    _print_counts("catalog status", rows, ("ok", "pending", "blocked", *STATE_COLUMNS[1:]))
    if reproduction is not None:
        typer.echo("\nreproducing TRELLIS-500K's lists:\n" + reproduction_markdown(reproduction))


@app.command()
def catalog(out: Annotated[Path, typer.Option("--out", help="Parquet file to write.")],
            root: RootOpt = None, config: ConfigOpt = None) -> None:
    """Write the merged catalog (one row per asset, every stage's columns) to one Parquet file."""
    import pyarrow.parquet as pq

    from flux3d.catalog import Catalog
    from flux3d.storage import Storage

    cfg = _config(config, root)
    table = Catalog(Storage(cfg.storage.root)).table()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, out)
    typer.echo(f"wrote {table.num_rows} rows x {table.num_columns} columns to {out}")


@app.command()
def render(root: RootOpt = None, config: ConfigOpt = None,
           views: Annotated[Optional[str], typer.Option(help="View counts of the main, conditioning and curation "
                                                        "sets, e.g. 150,24,10.")] = None,
           limit: Annotated[Optional[int], typer.Option(help="Render at most this many assets in this run.")] = None,
           verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False) -> None:
    """Render every inspect-ok asset not yet rendered (three view sets, cameras, mesh.ply), resumably."""
    from flux3d.catalog import Catalog
    from flux3d.pipeline.render import run_render
    from flux3d.storage import Storage

    _setup_logging(verbose)
    counts: dict[str, object] = {}
    if views is not None:
        parts = views.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise typer.BadParameter(f"--views takes three counts like 150,24,10, got {views!r}")
        counts = dict(zip(("render.views", "render.cond_views", "render.curation_views"), map(int, parts)))
    cfg = _config(config, root, **counts)
    storage = Storage(cfg.storage.root)
    r = run_render(cfg, storage, Catalog(storage), limit=limit)
    _print_counts(f"render: this run ({r.seconds:.1f} s)", [(r.stage, r.states, r.reasons, [str(r.processed)])],
                  STATE_COLUMNS, ("processed",))


@app.command()
def curate(root: RootOpt = None, config: ConfigOpt = None,
           limit: Annotated[Optional[int], typer.Option(help="Score and decide at most this many assets.")] = None,
           report: Annotated[bool, typer.Option(help="Rewrite reports/curation/ afterwards.")] = True,
           verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False) -> None:
    """Aesthetic + texture scores for every rendered asset, then keep/reject decisions and the curation report."""
    from flux3d.catalog import Catalog
    from flux3d.pipeline.curate import curate as run_curate
    from flux3d.storage import Storage

    _setup_logging(verbose)
    cfg = _config(config, root)
    storage = Storage(cfg.storage.root)
    scored, decided, summary = run_curate(cfg, storage, Catalog(storage), limit=limit, report=report)
    rows = [(r.stage, r.states, r.reasons, [str(r.processed), f"{r.per_second:.1f}"]) for r in (scored, decided)]
    _print_counts(f"curate: this run ({scored.seconds + decided.seconds:.1f} s)", rows, STATE_COLUMNS,
                  ("processed", "assets/s"))
    if summary is not None:
        typer.echo(f"{summary['kept']} of {summary['assets']} assets kept; report: "
                   f"{storage.path('reports', 'curation', 'report.md')}")


@app.command()
def voxelize(root: RootOpt = None, config: ConfigOpt = None,
             limit: Annotated[Optional[int], typer.Option(help="Voxelize at most this many assets.")] = None,
             verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False) -> None:
    """Active 64^3 voxels of every kept asset's normalised mesh (voxels/<sha>.npy), resumably."""
    from flux3d.pipeline.voxelize import run_voxelize

    _run_asset_stage(run_voxelize, config, root, limit, verbose)


@app.command()
def encode(root: RootOpt = None, config: ConfigOpt = None,
           limit: Annotated[Optional[int], typer.Option(help="Encode at most this many assets.")] = None,
           verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False) -> None:
    """FLUX latent feature volumes (DA-SLAT) of every voxelized asset (features/<encoder>/<sha>.npz), resumably."""
    from flux3d.pipeline.encode import run_encode

    _run_asset_stage(run_encode, config, root, limit, verbose)


@app.command()
def shard(root: RootOpt = None, config: ConfigOpt = None,
          verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False) -> None:
    """Webdataset shards of every kept, encoded asset (shards/<version>/), resumably; prints the version."""
    from flux3d.catalog import Catalog
    from flux3d.pipeline.shard import run_shard
    from flux3d.storage import Storage

    _setup_logging(verbose)
    cfg = _config(config, root)
    storage = Storage(cfg.storage.root)
    try:
        r = run_shard(cfg, storage, Catalog(storage))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    s = r.stats
    typer.echo(f"dataset version {r.version}" + (" (already complete, nothing to do)" if r.up_to_date else
                                                  f": wrote {r.written} in {r.seconds:.1f} s"))
    typer.echo(f"  assets {s['assets']}  shards {s['shards']}  failed {s['failed']}  "
               f"{s['bytes'] / 2 ** 20:.1f} MiB ({s['bytes'] / 2 ** 20 / max(sum(s['assets'].values()), 1):.2f} "
               "MiB per asset)")
    for reason, n in r.reasons.items():
        typer.echo(f"  {reason:<40} {n}")
    typer.echo(f"  {r.path}/index.parquet, stats.json")


def _run_asset_stage(run, config: Path | None, root: str | None, limit: int | None,  # noqa: ANN001
                     verbose: bool) -> None:
    """Run one catalog stage over what it still has to do and print its counts."""
    from flux3d.catalog import Catalog
    from flux3d.storage import Storage

    _setup_logging(verbose)
    cfg = _config(config, root)
    storage = Storage(cfg.storage.root)
    r = run(cfg, storage, Catalog(storage), limit=limit)
    _print_counts(f"{r.stage}: this run ({r.seconds:.1f} s)", [(r.stage, r.states, r.reasons, [str(r.processed)])],
                  STATE_COLUMNS, ("processed",))


SourceOpt = Annotated[Optional[list[str]], typer.Option("--source", help="Source spec as for `flux3d ingest`; "
                                                                     "repeatable.")]
RecipeOpt = Annotated[Optional[str], typer.Option(
    "--recipe", help="Named settings under --config: paper | debug | trellis (paper, TRELLIS's render settings).")]
RayOpt = Annotated[Optional[str], typer.Option("--ray-address", help="Ray cluster to use (auto, host:port, "
                                                                   "ray://...); default: start a local Ray.")]


def _run_flow(which: str, root: str | None, source: list[str] | None, config: Path | None, recipe: str | None,
              ray_address: str | None) -> dict:
    """Run a flow (Prefect's ephemeral API unless PREFECT_API_URL names a server) and print what it did."""
    from flux3d.flows.prefect_api import prepare_local_database

    _setup_logging(False)
    cfg = _config(config, root)  # validates the config before anything starts
    prepare_local_database(typer.echo)  # a new Prefect home: migrate here, not inside the server's start-up wait
    from flux3d.flows.data import data_flow
    from flux3d.flows.pipeline import pipeline_flow, retrain_flow

    fn = {"data": data_flow, "pipeline": pipeline_flow, "retrain": retrain_flow}[which]
    state = fn(root=cfg.storage.root, sources=list(source or []), config=str(config) if config else None,
               recipe=recipe, ray_address=ray_address, return_state=True)
    out = state.result()
    data = out if which == "data" else out["data"]
    for spec, n in data["listed"].items():
        typer.echo(f"listed {n} new asset(s) from {spec}")
    rows = [(name, r["states"], r["reasons"], [str(r["processed"]), f"{r['seconds']:.1f}"])
            for name, r in data["stages"].items()]
    _print_counts(f"{which} flow: this run", rows, STATE_COLUMNS, ("processed", "seconds"))
    shards = data["shards"]
    if shards["version"]:
        s = shards["stats"]
        typer.echo(f"dataset version {shards['version']}: {s['assets']['train']} train / {s['assets']['val']} val "
                   f"assets in {s['shards']['train'] + s['shards']['val']} shards at {shards['path']}")
    if which != "data" and "train" in out:
        for kind, r in out["train"].items():
            typer.echo(f"{kind}: step {r['step']}, loss {r['metrics'].get('loss', float('nan')):.4f}, {r['run']}")
        ev = out["evaluate"]
        m = ev["metrics"]
        typer.echo("evaluation: " + ", ".join(f"{k} {m[k]:.3f}" for k in ("recon_psnr", "gen_psnr", "gen_clip",
                                                                         "mv_psnr_mean", "pgen_psnr", "layout_iou")
                                                if k in m)
                   + f"; report {ev['report']}/report.md")
    if "promotion" in out:
        p = out["promotion"]
        typer.echo(f"promotion gate: {'promoted' if p['promoted'] else 'kept the current model'} ({p['reason']})")
    typer.echo(f"prefect flow run {state.state_details.flow_run_id}: `flux3d dashboard` shows it with its artifacts")
    return out


@app.command()
def data(source: SourceOpt = None, root: RootOpt = None, config: ConfigOpt = None, recipe: RecipeOpt = None,
         ray_address: RayOpt = None) -> None:
    """The data flow (Prefect + Ray): list sources, then download ... encode and shard what is not done yet."""
    _run_flow("data", root, source, config, recipe, ray_address)


@app.command()
def pipeline(source: SourceOpt = None, root: RootOpt = None, config: ConfigOpt = None, recipe: RecipeOpt = None,
             ray_address: RayOpt = None) -> None:
    """The whole chain: the data flow, then every model step there is (training, evaluation)."""
    _run_flow("pipeline", root, source, config, recipe, ray_address)


@app.command()
def retrain(source: SourceOpt = None, root: RootOpt = None, config: ConfigOpt = None, recipe: RecipeOpt = None,
            ray_address: RayOpt = None) -> None:
    """What the `retrain` deployment runs on its cron: the pipeline, then the promotion gate (models/promoted.json
    moves only if no gated metric regressed; every decision is appended to models/promotions.jsonl)."""
    _run_flow("retrain", root, source, config, recipe, ray_address)


@app.command()
def dashboard(host: str = "127.0.0.1", port: int = 4200) -> None:
    """Start the Prefect server and UI (every flow run of this machine, with its artifacts) until Ctrl-C."""
    from flux3d.flows.prefect_api import start_server, stop_server

    typer.echo(f"starting the Prefect server on {host}:{port} (a new Prefect home first creates its database: "
               "~20 s on 2 cores)")
    proc, api = start_server(host, port)
    typer.echo(f"Prefect UI: http://{host}:{port}  (API {api}; export PREFECT_API_URL={api} to run flows "
               "against it)")
    try:
        proc.wait()
    except KeyboardInterrupt:
        stop_server(proc)


@app.command()
def deploy(source: SourceOpt = None, root: RootOpt = None, config: ConfigOpt = None, recipe: RecipeOpt = None,
           ray_address: RayOpt = None,
           cron: Annotated[Optional[str], typer.Option(help="Retraining schedule (default: flow.retrain_cron).")]
           = None) -> None:
    """Register the data, pipeline and retrain (cron) deployments with the Prefect server in PREFECT_API_URL and
    serve them from this process until Ctrl-C."""
    from flux3d.flows.deploy import serve
    from flux3d.flows.prefect_api import prefect_env_defaults

    prefect_env_defaults()
    if not os.environ.get("PREFECT_API_URL"):
        raise typer.BadParameter("set PREFECT_API_URL to a Prefect server (e.g. one `flux3d dashboard` started)")
    cfg = _config(config, root, **{"flow.retrain_cron": cron})
    typer.echo(f"serving deployments flux3d-data/data, flux3d-pipeline/pipeline, flux3d-retrain/retrain "
               f"(cron {cfg.flow.retrain_cron!r} {cfg.flow.timezone}) against {os.environ['PREFECT_API_URL']}")
    serve(cfg.storage.root, list(source or []), str(config.resolve()) if config else None, recipe, ray_address,
          cfg.flow.retrain_cron, cfg.flow.timezone)


@app.command()
def demo(root: RootOpt = None) -> None:
    """The main job on procedurally generated assets and tiny models: the whole pipeline, end to end, on CPU."""
    from flux3d.demo import make_demo_assets, write_demo_config

    root = os.path.abspath(os.path.expanduser(root or "data/demo"))
    assets = os.path.join(root, "demo-assets")
    make_demo_assets(assets)
    config = Path(write_demo_config(os.path.join(root, "demo.toml"), os.path.join(root, "demo-models")))
    out = _run_flow("pipeline", root, [f"local:{assets}"], config, None, None)
    version = out["dataset_version"]
    typer.echo(f"where to look: {root}/catalog (flux3d status --root {root}), {root}/renders/*/contact.png, "
               f"{root}/reports/curation/report.md" + (f", {root}/shards/{version}/, {root}/models/{version}/ "
                                                        "(checkpoints, TensorBoard, eval/report.md)" if version
                                                        else ""))


# The model commands live in their own module (training, generation, evaluation); registered here.
from flux3d.cli_models import evaluate, generate, study_app, train_app  # noqa: E402 - after `app` exists

app.add_typer(train_app, name="train")
app.add_typer(study_app, name="study")
app.command()(generate)
app.command()(evaluate)

if __name__ == "__main__":
    app()
