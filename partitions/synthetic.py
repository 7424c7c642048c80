"""Synthetic FEMNIST-shaped federated dataset with per-writer handwriting style.

Shape of the data (matches LEAF FEMNIST's statistics): 3,597 writers by default, 62 classes
("0".."9", "A".."Z", "a".."z"), 28x28 grey uint8, per-writer counts lognormal (mean ~227, sigma
0.45, clipped to [12, 1200]), so ~818k samples in total. Digits are drawn 4x as often as each
letter (FEMNIST is digit-heavy). Unlike LEAF's white background, ink is bright on black (MNIST
convention); a CNN does not care and it keeps zero padding meaning "no ink".

How images are made (vectorized, never a Python loop per image):
1. A seeded bank of glyph *distance fields* (28x28, distance to the nearest stroke point): 62
   canonical glyphs plus 32 extra allographs, each 2-3 quadratic Bezier strokes normalized to
   ~60% of the canvas. Built once (94 small loops).
2. Each writer has a style: slant (shear), rotation, scale and aspect, offset, stroke thickness,
   ink intensity, pixel-noise level, and a label distribution. ``style_strength`` (s) multiplies
   the spread of all writer effects (s=0: every writer identical, labels from the global prior).
3. Each sample composes its writer's affine with a small per-sample jitter and samples the glyph's
   distance field with torch's ``grid_sample`` (one call per chunk of writers; C++ and threaded,
   far faster than numpy gathers). Intensity = ink * sigmoid((thickness - distance) / 0.035):
   warping a distance field and thresholding it gives thickness control for free. Then Gaussian
   pixel noise and round(255 * clip(v, 0, 1)).
4. Conflicting allographs (reconstructed, so that purely local models can win): with probability
   p_alt = clip(0.6 * (s - 1), 0, 0.9) per (writer, class), the writer draws that class with a
   glyph taken from a pool shared across classes (the canonical glyphs of the writer's other
   swapped classes plus the extras), injective within the writer. At s >= 2 most classes of a
   writer look like *another* class's canonical glyph, so a global model is confused where a
   local one is not. The per-writer label distribution is Dirichlet(124 / s^2 * prior): mild at
   s=1, strongly skewed at s>=2.

Writers are generated and written in chunks of 128, straight into the store's Arrow writer, so
peak memory is bounded by one chunk (~30k images) plus torch itself.
"""

from __future__ import annotations

import string

import numpy as np

from simfed.core import validate
from simfed.partitions import schemes
from simfed.partitions.progress import progress_bar
from simfed.core.safeio import check_output
from simfed.partitions.writer import StoreWriter

CLASSES = list(string.digits + string.ascii_uppercase + string.ascii_lowercase)
RES = 28
EXTRA_GLYPHS = 32
MEAN_COUNT = 229.0  # the [12, 1200] clip trims the mean: lands ~818k at 3,597 writers
COUNT_SIGMA = 0.45
CHUNK_WRITERS = 128
SOFTNESS = 0.035
# Bounds of the arguments: per-writer tables are O(writers x classes), and past s ~ 3 every
# writer effect is already at its clip (NaN would render all-zero images).
MAX_WRITERS = 100_000
MAX_STYLE = 10.0


def _pixel_centers(res: int = RES) -> np.ndarray:
    """Normalized [-1, 1] pixel centers, grid_sample's align_corners=False convention."""
    c = (2 * np.arange(res) + 1) / res - 1
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return np.stack([xx.ravel(), yy.ravel()], axis=1)


def glyph_bank(seed: int, n: int = len(CLASSES) + EXTRA_GLYPHS) -> np.ndarray:
    """(n, RES, RES) float32 distance fields of random stroke glyphs (same for a given seed)."""
    rng = np.random.default_rng([seed, 0x61F])
    t = np.linspace(0.0, 1.0, 40)[:, None]
    px = _pixel_centers()
    bank = np.empty((n, RES, RES), dtype=np.float32)
    for g in range(n):
        pts = []
        start = rng.uniform(-1, 1, 2)
        for _ in range(rng.integers(2, 4)):
            # Strokes often start where the previous one ended, like pen-connected handwriting.
            p0 = start if rng.random() < 0.6 else rng.uniform(-1, 1, 2)
            p1, p2 = rng.uniform(-1, 1, 2) * 1.3, rng.uniform(-1, 1, 2)
            pts.append((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2)
            start = p2
        pts = np.concatenate(pts)
        lo, hi = pts.min(0), pts.max(0)
        pts = (pts - (lo + hi) / 2) * (1.2 / max((hi - lo).max(), 1e-6))
        d = np.sqrt(((px[:, None, :] - pts[None]) ** 2).sum(-1)).min(1)
        bank[g] = d.reshape(RES, RES)
    return bank


def writer_counts(clients: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0xC0])
    mu = np.log(MEAN_COUNT) - COUNT_SIGMA ** 2 / 2
    return np.clip(np.round(rng.lognormal(mu, COUNT_SIGMA, clients)), 12, 1200).astype(np.int64)


def writer_styles(clients: int, seed: int, s: float) -> dict[str, np.ndarray]:
    """Per-writer style parameters; ``s`` scales every spread."""
    rng = np.random.default_rng([seed, 0x57])
    n = lambda sd, lim: np.clip(rng.normal(0, sd * s, clients), -lim, lim)  # noqa: E731
    prior = np.array([4.0] * 10 + [1.0] * 52)
    prior /= prior.sum()
    if s > 0:
        probs = rng.dirichlet(prior * 124.0 / s ** 2, clients)
        probs = np.maximum(probs, 1e-12)
        probs /= probs.sum(1, keepdims=True)
    else:
        probs = np.tile(prior, (clients, 1))
    p_alt = float(np.clip(0.6 * (s - 1), 0.0, 0.9))
    C, G = len(CLASSES), len(CLASSES) + EXTRA_GLYPHS
    glyph = np.tile(np.arange(C), (clients, 1))
    if p_alt > 0:
        swap = rng.random((clients, C)) < p_alt
        for w in range(clients):  # one loop per writer (not per image): injective allographs
            cls = np.flatnonzero(swap[w])
            pool = np.concatenate([cls, np.arange(C, G)])
            glyph[w, cls] = rng.permutation(pool)[:len(cls)]
    return {
        "shear": n(0.2, 0.6), "rot": n(0.08, 0.35), "logscale": n(0.1, 0.4),
        "aspect": n(0.06, 0.25), "dx": n(0.06, 0.25), "dy": n(0.06, 0.25),
        "thick": np.clip(0.11 * np.exp(n(0.25, 0.8)), 0.05, 0.25),
        "ink": np.clip(1 - np.abs(n(0.15, 0.5)), 0.5, 1.0),
        "noise": 0.02 + 0.05 * s * rng.random(clients),
        "probs": probs, "glyph": glyph,
    }


def render_chunk(bank, style, writers: np.ndarray, counts: np.ndarray, rng):
    """Images (n, 1, RES, RES) uint8 and labels for the given writers (samples grouped by writer)."""
    import torch
    import torch.nn.functional as F

    w_of = np.repeat(writers, counts[writers])
    n = len(w_of)
    cum = np.cumsum(style["probs"][w_of], axis=1)
    y = (rng.random((n, 1)) * cum[:, -1:] > cum).sum(1).clip(0, len(CLASSES) - 1)
    g = style["glyph"][w_of, y]
    j = lambda sd: rng.normal(0, sd, n)  # noqa: E731  per-sample jitter, independent of s
    shear = style["shear"][w_of] + j(0.1)
    rot = style["rot"][w_of] + j(0.1)
    ls = style["logscale"][w_of] + j(0.08)
    asp = style["aspect"][w_of]
    sx, sy = np.exp(ls + asp), np.exp(ls - asp)
    dx, dy = style["dx"][w_of] + j(0.06), style["dy"][w_of] + j(0.06)
    cos, sin = np.cos(rot), np.sin(rot)
    # Sampling matrix (output -> glyph coords) = scale^-1 @ shear^-1 @ rot^-1.
    a11, a12 = cos / sx, (sin - shear * cos) / sx
    a21, a22 = -sin / sy, (cos + shear * sin) / sy
    theta = np.empty((n, 2, 3), dtype=np.float32)
    theta[:, 0, 0], theta[:, 0, 1] = a11, a12
    theta[:, 1, 0], theta[:, 1, 1] = a21, a22
    theta[:, 0, 2] = -(a11 * dx + a12 * dy)
    theta[:, 1, 2] = -(a21 * dx + a22 * dy)
    with torch.no_grad():
        src = torch.from_numpy(bank)[torch.from_numpy(g)].unsqueeze(1)
        grid = F.affine_grid(torch.from_numpy(theta), [n, 1, RES, RES], align_corners=False)
        d = F.grid_sample(src, grid, mode="bilinear", padding_mode="border", align_corners=False)
        del grid, src
        thick = torch.from_numpy((style["thick"][w_of] * np.exp(j(0.15))).astype(np.float32))
        ink = torch.from_numpy(style["ink"][w_of].astype(np.float32))
        v = torch.sigmoid((thick.view(n, 1, 1, 1) - d).div_(SOFTNESS)).mul_(ink.view(n, 1, 1, 1))
        del d
        noise = torch.from_numpy(rng.standard_normal((n, 1, RES, RES), dtype=np.float32))
        sig = torch.from_numpy(style["noise"][w_of].astype(np.float32)).view(n, 1, 1, 1)
        v.add_(noise.mul_(sig)).clamp_(0, 1).mul_(255).add_(0.5)
        x = v.to(torch.uint8).numpy()
    return x, y.astype(np.int64), w_of


def check_args(*, clients: int, seed: int, style_strength: float, unseen_fraction: float) -> None:
    """The generator's numeric arguments (shared with [data] generate in experiment files)."""
    validate.integer("--clients", clients, 1, MAX_WRITERS)
    validate.seed("--seed", seed)
    validate.number("--style-strength", style_strength, 0.0, MAX_STYLE)
    validate.fraction("--unseen-fraction", unseen_fraction)


def make_synthetic_femnist(out: str, *, clients: int = 3597, seed: int = 0,
                           unseen_fraction: float = 0.1, style_strength: float = 1.0,
                           val_fraction: float = schemes.DEFAULT_VAL_FRACTION,
                           test_fraction: float = schemes.DEFAULT_TEST_FRACTION,
                           overwrite: bool = False, progress: bool = False) -> str:
    """Build the synthetic store at OUT (atomic) and return its path."""
    check_args(clients=clients, seed=seed, style_strength=style_strength,
               unseen_fraction=unseen_fraction)
    schemes.check_fractions(val_fraction, test_fraction)
    check_output(out, overwrite)
    bank = glyph_bank(seed)
    counts = writer_counts(clients, seed)
    style = writer_styles(clients, seed, style_strength)
    source = {"generator": "synthetic-femnist", "clients": clients, "seed": seed,
              "style_strength": style_strength, "val_fraction": val_fraction,
              "test_fraction": test_fraction}
    names = {w: f"w{w:05d}" for w in range(clients)}
    with StoreWriter(out, classes=CLASSES, sample_shape=(1, RES, RES), overwrite=overwrite,
                     source=source) as writer:
        with progress_bar(progress, "generating writers", clients) as advance:
            for ci, lo in enumerate(range(0, clients, CHUNK_WRITERS)):
                ws = np.arange(lo, min(lo + CHUNK_WRITERS, clients))
                rng = np.random.default_rng([seed, 0xDA7A, ci])
                x, y, w_of = render_chunk(bank, style, ws, counts, rng)
                split = schemes.split_within_clients(w_of, y, seed * 1_000_003 + ci,
                                                     val_fraction, test_fraction)
                writer.add(x, y, w_of, split, names)
                advance(len(ws))
        return writer.finish(unseen_fraction=unseen_fraction, seed=seed)
