"""flux3d: a production pipeline for FLUX3D (DA-SLAT + SMDiT) image-to-3D Gaussian data and training."""

__version__ = "0.1.0"
