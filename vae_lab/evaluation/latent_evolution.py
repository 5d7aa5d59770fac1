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
from PIL import Image, ImageDraw, ImageFont

FAST_PNG = 1  # zlib's level for the pictures a run writes: Pillow's default (6) saves about 10% and is 2-6x slower
FRAME_IMAGES = 300
MAX_FRAMES = 60
PLOT_SIZE = 440  # pixels: the square plot
LEGEND_WIDTH = 130  # pixels right of it: one colour and class name per line
FRAME_SIZE = (PLOT_SIZE + LEGEND_WIDTH, PLOT_SIZE)  # (width, height)
MARGIN = 34  # room left of and below the plot for its axis labels
LOOP_MS = 4000  # one pass through the frames, however many (a GIF frame lasts at least 20 ms)
LAST_FRAME_MS = 1500  # then the last frame lingers
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
def capture(encode_means, images: torch.Tensor) -> np.ndarray:
    """Posterior means [K, N, D] of K models, through the engine's `encode_means(images)` (the
    encoders alone)."""
    return encode_means(images).float().flatten(2).cpu().numpy()


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


def _background(low: np.ndarray, high: np.ndarray, axis_names: tuple[str, str],
                legend: list[tuple[int, str]]) -> np.ndarray:
    """What every frame shares, as palette indices: the plot's box, its axes, the class legend."""
    width, height = FRAME_SIZE
    image = Image.fromarray(np.full((height, width), BACKGROUND, dtype=np.uint8), mode="P")
    draw = ImageDraw.Draw(image)
    draw.font = _font()
    top, bottom, left, right = MARGIN - 4, PLOT_SIZE - MARGIN + 3, MARGIN - 4, PLOT_SIZE - MARGIN + 3
    draw.rectangle([left, top, right, bottom], outline=OUTLINE)
    # each axis: its name and the values at its ends
    draw.text((left, bottom + 4), f"{low[0]:.3g}", fill=TEXT)
    draw.text((right - 6 * len(f"{high[0]:.3g}"), bottom + 4), f"{high[0]:.3g}", fill=TEXT)
    draw.text(((left + right) // 2 - 6, bottom + 4), axis_names[0], fill=TEXT)
    draw.text((2, bottom - 12), f"{low[1]:.3g}", fill=TEXT)
    draw.text((2, top), f"{high[1]:.3g}", fill=TEXT)
    draw.text((2, (top + bottom) // 2 - 6), axis_names[1], fill=TEXT)
    for row, (label, name) in enumerate(legend):
        y = top + 18 * row
        draw.rectangle([PLOT_SIZE, y + 2, PLOT_SIZE + 8, y + 10], fill=FIRST_CLASS + label % len(TAB10))
        draw.text((PLOT_SIZE + 14, y), name, fill=TEXT)
    return np.asarray(image)


_default_font = None


def _font():
    """Pillow's default font, loaded once: every frame's caption loaded it afresh (0.3 ms a frame)."""
    global _default_font
    if _default_font is None:
        _default_font = ImageFont.load_default()
    return _default_font


def _draw(background: np.ndarray, points: np.ndarray, labels: np.ndarray, low: np.ndarray, high: np.ndarray,
          caption: str) -> Image.Image:
    canvas = background.copy()
    inner = PLOT_SIZE - 2 * MARGIN  # the plot's square, MARGIN from each side of its area
    scaled = (points - low) / np.maximum(high - low, 1e-9)  # in [0, 1]: low and high hold every point
    xs = (MARGIN + scaled[:, 0] * (inner - 1)).round().astype(int)
    ys = (PLOT_SIZE - 1 - MARGIN - scaled[:, 1] * (inner - 1)).round().astype(int)
    colours = FIRST_CLASS + labels % len(TAB10)
    for dx in (-1, 0, 1):  # 3x3 dots
        for dy in (-1, 0, 1):
            canvas[ys + dy, xs + dx] = colours
    image = Image.fromarray(canvas, mode="P")
    image.putpalette(PALETTE.tobytes())
    ImageDraw.Draw(image).text((MARGIN - 4, 8), caption, fill=TEXT, font=_font())
    return image


def _frames(frames: list[tuple[int, np.ndarray]], labels: np.ndarray, class_names, caption) -> list[Image.Image]:
    """The frames (step, means [N, D]) drawn with one set of axes: the last frame's PCA (or z1, z2)
    and the range of every frame (every point of every frame inside the plot), a class legend;
    `caption(step)` is the text above each."""
    centre, axes = _projection(frames[-1][1])
    projected = [(means - centre) @ axes.T for _, means in frames]
    stacked = np.concatenate(projected)
    low, high = stacked.min(axis=0), stacked.max(axis=0)
    pad = 0.03 * np.maximum(high - low, 1e-9)
    low, high = low - pad, high + pad
    plain = frames[-1][1].shape[1] <= 2
    axis_names = ("z1", "z2") if plain else ("PC1", "PC2")
    legend = [(int(label), str(class_names[label]) if class_names is not None else str(label))
              for label in np.unique(labels)]
    background = _background(low, high, axis_names, legend)
    return [_draw(background, points, labels, low, high, caption(step))
            for (step, _), points in zip(frames, projected)]


def save_still(means: np.ndarray, labels: np.ndarray, path: Path, class_names=None,
               title: str = "test latents (posterior means)") -> Path:
    """One PNG of latents [N, D] drawn as the GIF's frames are (a 2-D latent as it is, a larger
    one on its first two principal components): `latents/latent_scatter.png` in a few ms, where
    matplotlib took about 0.1 s a run."""
    caption = title if means.shape[1] <= 2 else f"{title}, first two principal components"
    [image] = _frames([(0, means)], labels, class_names, lambda step: caption)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=FAST_PNG)
    return path


def save_evolution(frames: list[tuple[int, np.ndarray]], labels: np.ndarray, path: Path,
                   class_names=None) -> Path:
    """One animated GIF of the frames (step, means [N, D]): axes fixed by the last frame's PCA and
    by the range of every frame (every point of every frame inside the plot), a class legend,
    one pass in about LOOP_MS whatever the number of frames."""
    frames = thinned(frames)
    how = "z1, z2" if frames[-1][1].shape[1] <= 2 else "PCA of the last frame"
    images = _frames(frames, labels, class_names, lambda step: f"step {step}  ({how})")
    path.parent.mkdir(parents=True, exist_ok=True)
    frame_ms = max(20, round(LOOP_MS / len(images), -1))  # GIF delays are in 10 ms units
    durations = [frame_ms] * (len(images) - 1) + [LAST_FRAME_MS]
    images[0].save(path, save_all=True, append_images=images[1:], duration=durations, loop=0, optimize=False)
    return path
