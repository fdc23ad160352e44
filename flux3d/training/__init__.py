"""Training: the loop (trainer), one step per model (step, smdit_step), the shard loader (data), losses,
checkpoints, telemetry, config and recipes. Model code lives in `flux3d.models`.

Import the submodules directly; this package imports nothing so that importing one piece does not pull in
webdataset, fsspec or Ray.
"""
