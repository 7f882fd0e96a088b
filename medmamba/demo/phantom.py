"""Synthetic CT-like phantoms with a lesion label, generated on the fly.

The demo must run on any fresh machine with no data and no download, so it builds its default dataset
from these: an elliptic body of soft tissue in air, two lungs, a spine and a rib ring of bone, organs of
slightly different density, and one or two round lesions (the foreground label) of a density the network
has to tell from the organs. Spacing is anisotropic like clinical CT, so nnU-Net's planner does real work.
"""
from __future__ import annotations

import numpy as np


def _ellipsoid(grid, center, radii):
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grid, center, radii)) <= 1.0


def make_phantom(seed: int, shape=(32, 96, 96), spacing=(3.0, 1.0, 1.0)):
    """One phantom: (image int16 HU, label uint8 {0, 1}, spacing) with arrays in (z, y, x) order.

    Sizes are in millimetres internally, so a different spacing gives the same anatomy.
    """
    rng = np.random.default_rng(seed)
    sz, sy, sx = spacing
    z, y, x = np.meshgrid(*(np.arange(n, dtype=np.float32) * s for n, s in zip(shape, spacing)), indexing="ij")
    depth, height, width = (n * s for n, s in zip(shape, spacing))
    cz, cy, cx = depth / 2, height / 2, width / 2
    grid = (z, y, x)

    image = np.full(shape, -1000.0, dtype=np.float32)  # air
    body = _ellipsoid(grid, (cz, cy, cx), (depth * 0.9, height * 0.36, width * 0.45))
    image[body] = 40.0  # soft tissue
    ribs = body & ~_ellipsoid(grid, (cz, cy, cx), (depth * 0.9, height * 0.32, width * 0.41))
    image[ribs] = 300.0
    for side in (-1, 1):
        lung = _ellipsoid(grid, (cz, cy - height * 0.04, cx + side * width * 0.18),
                          (depth * 0.7, height * 0.2, width * 0.13))
        image[lung & body] = -820.0
    spine = _ellipsoid(grid, (cz, cy + height * 0.24, cx), (depth * 2, height * 0.06, width * 0.05))
    image[spine] = 700.0
    organ = _ellipsoid(grid, (cz, cy + height * 0.05, cx + rng.uniform(-8, 8)), (depth * 0.6, height * 0.12, width * 0.1))
    image[organ & body] = 65.0

    label = np.zeros(shape, dtype=np.uint8)
    for _ in range(rng.integers(1, 3)):
        radius = rng.uniform(5.0, 11.0)
        # lesions sit in soft tissue or lung, away from the edges
        for _ in range(50):
            c = (rng.uniform(depth * 0.25, depth * 0.75), rng.uniform(cy - height * 0.2, cy + height * 0.15),
                 rng.uniform(cx - width * 0.3, cx + width * 0.3))
            if body[tuple(int(v / s) for v, s in zip(c, spacing))]:
                break
        lesion = _ellipsoid(grid, c, (radius * rng.uniform(0.8, 1.2), radius, radius * rng.uniform(0.8, 1.2)))
        lesion &= body
        image[lesion] = 110.0 + rng.uniform(-10, 10)
        label[lesion] = 1

    image += rng.normal(0.0, 12.0, shape).astype(np.float32)  # quantum noise
    return np.clip(image, -1024, 3071).astype(np.int16), label, tuple(float(s) for s in spacing)


def write_nifti(path, array, spacing, origin=(0.0, 0.0, 0.0)):
    """Write a (z, y, x) array as NIfTI with the given (z, y, x) spacing (SimpleITK convention)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(array)
    img.SetSpacing(tuple(float(s) for s in reversed(spacing)))
    img.SetOrigin(tuple(float(o) for o in origin))
    sitk.WriteImage(img, str(path), useCompression=True)
