"""Every typed setting of flux3d: the pipeline's `Config` and its TOML loader (`pipeline`), its sections by owner
(`sources`, `features`, `flow`, `model_flow`), the training and evaluation configs, and the named recipes.
Import the submodules directly.
"""
