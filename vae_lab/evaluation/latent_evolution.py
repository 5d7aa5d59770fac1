"""The latent space forming during training: `latents/evolution.gif`.

Every `tracking.latent_frames_every` training steps (and once before the first), the engine
records the posterior means of a fixed subset of test images (the first FRAME_IMAGES) for each
trial it trains. At the end the frames become one animated GIF, points coloured by class: a
2-D latent as it is, a larger one through one PCA fitted on the last frame, so the axes stay
put and the picture shows the codes moving, not the projection. At most MAX_FRAMES frames are
kept (evenly spaced, the first and last always), so a long run makes a GIF of bounded size.

Frames are drawn straight into palette-indexed pixel arrays (no matplotlib, and no colour
quantization when the GIF is written: the palette is the classes' colours), so the animation
adds little to a run (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

FRAME_IMAGES = 300
MAX_FRAMES = 60
FRAME_SIZE = 320  # pixels, square
MARGIN = 12
FRAME_MS = 120
# matplotlib's tab10, so classes have the colours of the other latent plots
TAB10 = np.array([[31, 119, 180], [255, 127, 14], [44, 160, 44], [214, 39, 40], [148, 103, 189],
                  [140, 86, 75], [227, 119, 194], [127, 127, 127], [188, 189, 34], [23, 190, 207]], dtype=np.uint8)
# the frames' palette: background, frame outline, caption text, then the ten class colours
BACKGROUND, OUTLINE, TEXT, FIRST_CLASS = 0, 1, 2, 3
PALETTE = np.concatenate([np.array([[255, 255, 255], [200, 200, 200], [60, 60, 60]], dtype=np.uint8), TAB10])


def frame_images(data) -> tuple[torch.Tensor, np.ndarray]:
    """The fixed subset, as float images on the data's device, and its labels."""
    images, labels = data.split("test")
    count = min(FRAME_IMAGES, len(labels))
    return data.to_float(images[:count]), labels[:count].cpu().numpy()


def due(step: int, config) -> bool:
    """Is `step` a frame step of this run? Only runs whose images reach a store record frames."""
    tracking = config.tracking
    every = tracking.latent_frames_every
    return tracking.enabled and tracking.log_images and every > 0 and step % every == 0


@torch.no_grad()
def capture(forward, images: torch.Tensor, latent_dim: int, variational: bool) -> np.ndarray:
    """Posterior means [K, N, latent_dim] of K models, through the engine's `forward(images, noise,
    noise_dim)` (zero noise: only the means are kept)."""
    noise = torch.zeros(images.shape[0], latent_dim, device=images.device) if variational else None
    _, means, *_ = forward(images, noise, None)
    return means.float().flatten(2).cpu().numpy()


def thinned(frames: list[tuple[int, np.ndarray]], limit: int = MAX_FRAMES) -> list[tuple[int, np.ndarray]]:
    """At most `limit` frames, evenly spaced, keeping the first and the last."""
    if len(frames) <= limit:
        return frames
    keep = np.unique(np.round(np.linspace(0, len(frames) - 1, limit)).astype(int))
    return [frames[index] for index in keep]


def _projection(last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(centre, 2 x D axes): the identity for a 2-D latent, else PCA of the last frame."""
    if last.shape[1] <= 2:
        return np.zeros(last.shape[1]), np.eye(2, last.shape[1])
    centre = last.mean(axis=0)
    _, _, components = np.linalg.svd(last - centre, full_matrices=False)
    return centre, components[:2]


def _draw(points: np.ndarray, labels: np.ndarray, low: np.ndarray, high: np.ndarray, caption: str) -> Image.Image:
    canvas = np.full((FRAME_SIZE, FRAME_SIZE), BACKGROUND, dtype=np.uint8)
    inner = FRAME_SIZE - 2 * MARGIN
    scaled = (points - low) / np.maximum(high - low, 1e-9)
    xs = (MARGIN + scaled[:, 0] * (inner - 1)).round().astype(int)
    ys = (FRAME_SIZE - 1 - MARGIN - scaled[:, 1] * (inner - 1)).round().astype(int)
    colours = FIRST_CLASS + labels % len(TAB10)
    for dx in (-1, 0, 1):  # 3x3 dots
        for dy in (-1, 0, 1):
            canvas[np.clip(ys + dy, 0, FRAME_SIZE - 1), np.clip(xs + dx, 0, FRAME_SIZE - 1)] = colours
    image = Image.fromarray(canvas, mode="P")
    image.putpalette(PALETTE.tobytes())
    draw = ImageDraw.Draw(image)
    draw.rectangle([MARGIN - 4, MARGIN - 4, FRAME_SIZE - MARGIN + 3, FRAME_SIZE - MARGIN + 3], outline=OUTLINE)
    draw.text((MARGIN, 1), caption, fill=TEXT)
    return image


def save_evolution(frames: list[tuple[int, np.ndarray]], labels: np.ndarray, path: Path) -> Path:
    """One animated GIF of the frames (step, means [N, D]); the axes are fixed by the last frame's
    PCA and the range of every frame."""
    frames = thinned(frames)
    centre, axes = _projection(frames[-1][1])
    projected = [(means - centre) @ axes.T for _, means in frames]
    stacked = np.concatenate(projected)
    low, high = np.percentile(stacked, 0.5, axis=0), np.percentile(stacked, 99.5, axis=0)
    how = "z1, z2" if frames[-1][1].shape[1] <= 2 else "PCA of the last frame"
    images = [_draw(points, labels, low, high, f"step {step}  ({how})")
              for (step, _), points in zip(frames, projected)]
    path.parent.mkdir(parents=True, exist_ok=True)
    durations = [FRAME_MS] * (len(images) - 1) + [FRAME_MS * 10]  # linger on the last frame
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path
