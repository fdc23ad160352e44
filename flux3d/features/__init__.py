"""FLUX VAE features for DA-SLAT: image encoders (FLUX.1 AutoencoderKL, TAEF1) and, later, voxel projection."""
