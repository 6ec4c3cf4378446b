"""A lab's stain and scanner, and how they turn dye density into an RGB image.

MGG colour differs between labs mostly by the hue and strength of its two dyes
and by the microscope: white balance, uneven illumination, focus and sensor
noise. Each is one field of ``LabStyle`` so a manifest records exactly what a lab
looked like, and a classifier can be trained on some labs and tested on another.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from scipy import ndimage

# Optical density per unit dye in R, G, B: azure absorbs red and green (blue-violet),
# eosin absorbs green and some blue (pink-orange).
AZURE_OD = (0.95, 0.6, 0.18)
EOSIN_OD = (0.06, 0.72, 0.5)


@dataclass(frozen=True)
class LabStyle:
    name: str
    azure_od: tuple[float, float, float]
    eosin_od: tuple[float, float, float]
    azure_strength: float
    eosin_strength: float
    background_rgb: tuple[float, float, float]  # white balance of an empty area
    plasma: float  # faint eosin tint of the smear's plasma film
    vignetting: float  # relative brightness loss at the corners
    gradient: tuple[float, float]  # linear illumination slope across the field (x, y)
    blur_sigma: float  # pixels
    noise_sigma: float  # grey levels
    rbc_density: float  # red cells per 100x100 px
    max_overlap: float  # allowed overlap of nucleated cells, fraction of radius sum

    @classmethod
    def sample(cls, rng: np.random.Generator, name: str) -> LabStyle:
        def tint(od: tuple[float, float, float], amount: float) -> tuple[float, float, float]:
            return tuple(round(float(v * rng.uniform(1 - amount, 1 + amount)), 4) for v in od)  # type: ignore[return-value]

        bg = rng.uniform(228, 250) + rng.normal(0, 6, 3)
        return cls(
            name=name,
            azure_od=tint(AZURE_OD, 0.1),
            eosin_od=tint(EOSIN_OD, 0.1),
            azure_strength=round(float(rng.uniform(0.85, 1.15)), 4),
            eosin_strength=round(float(rng.uniform(0.8, 1.2)), 4),
            background_rgb=tuple(round(float(v), 2) for v in np.clip(bg, 200, 255)),  # type: ignore[arg-type]
            plasma=round(float(rng.uniform(0.0, 0.08)), 4),
            vignetting=round(float(rng.uniform(0.0, 0.15)), 4),
            gradient=(round(float(rng.normal(0, 0.04)), 4), round(float(rng.normal(0, 0.04)), 4)),
            blur_sigma=round(float(rng.uniform(0.3, 1.4)), 4),
            noise_sigma=round(float(rng.uniform(1.0, 4.0)), 4),
            rbc_density=round(float(rng.uniform(0.6, 1.3)), 4),
            max_overlap=round(float(rng.uniform(0.0, 0.15)), 4),
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> LabStyle:
        tuples = ("azure_od", "eosin_od", "background_rgb", "gradient")
        return cls(**{k: tuple(v) if k in tuples else v for k, v in data.items()})


def lab_names(count: int) -> list[str]:
    """``lab-a``, ``lab-b``, ... ``lab-z``, ``lab-aa`` ..."""
    names = []
    for i in range(count):
        label = ""
        n = i
        while True:
            label = chr(ord("a") + n % 26) + label
            n = n // 26 - 1
            if n < 0:
                break
        names.append(f"lab-{label}")
    return names


def to_rgb(dyes: np.ndarray, lab: LabStyle, rng: np.random.Generator) -> np.ndarray:
    """Photograph dye densities (h, w, 2) through the lab's stain and scanner."""
    h, w = dyes.shape[:2]
    od_matrix = np.stack(
        [
            np.asarray(lab.azure_od, dtype=np.float32) * lab.azure_strength,
            np.asarray(lab.eosin_od, dtype=np.float32) * lab.eosin_strength,
        ]
    )
    dens = dyes.copy()
    dens[..., 1] += lab.plasma
    od = dens.reshape(-1, 2) @ od_matrix
    transmitted = np.exp(-od).reshape(h, w, 3)
    if lab.blur_sigma > 0:
        transmitted = ndimage.gaussian_filter(transmitted, (lab.blur_sigma, lab.blur_sigma, 0))
    yy, xx = np.meshgrid(
        np.linspace(-1, 1, h, dtype=np.float32),
        np.linspace(-1, 1, w, dtype=np.float32),
        indexing="ij",
    )
    light = 1.0 - lab.vignetting * (xx**2 + yy**2) / 2 + lab.gradient[0] * xx + lab.gradient[1] * yy
    image = transmitted * light[..., None] * np.asarray(lab.background_rgb, dtype=np.float32)
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(lab.noise_sigma)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)
