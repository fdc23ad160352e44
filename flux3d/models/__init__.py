"""Model code: building blocks (sparse, attention, rope, layers, gaussians, rasterizer), the two models (decoder,
smdit), flow matching and inference. Nothing here imports training, Prefect or Ray; import the submodules directly.
"""
