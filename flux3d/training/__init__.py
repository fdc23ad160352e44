"""Training: `sparse` (the packed voxel batch type) and `data` (the webdataset shard loader).

Import the submodules directly; this package imports nothing so that `flux3d.training.sparse` does not pull in
webdataset and fsspec.
"""
