"""latents/evolution.gif: frames of the test latents while a run trains, and where they show."""

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from analysis import report
from vae_lab.evaluation import latent_evolution
from vae_lab.config import load_config
from vae_lab.data.datasets import load_data
from vae_lab.train import train
from vae_lab.training.device import resolve_device


def gif_of(client: MlflowClient, run_id: str, folder) -> Image.Image:
    return Image.open(client.download_artifacts(run_id, "latents/evolution.gif", str(folder)))


def test_a_run_logs_one_frame_every_n_steps_and_the_report_shows_it(tiny_overrides, tracking_uri, tmp_path):
    config = load_config(None, [*tiny_overrides, "train.epochs=2", "model.latent_dim=2", "eval.enabled=false",
                                "tracking.latent_frames_every=3"])
    data = load_data(config.data, resolve_device(config.device), config.train.batch_size)  # where it trains
    steps = 2 * data.num_batches("train", config.train.batch_size)
    run_id = train(config, data=data).run_id
    client = MlflowClient(tracking_uri)
    with gif_of(client, run_id, tmp_path / "a") as gif:
        assert gif.n_frames == steps // 3 + 1  # step 0, then every third step
        assert gif.size == latent_evolution.FRAME_SIZE
        gif.seek(gif.n_frames - 1)
        pixels = np.asarray(gif.convert("RGB"))
        coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 60  # the class colours, not grey or white
        assert coloured.sum() > 100

    out = tmp_path / "report"
    assert report.main(["--run", run_id, "--out", str(out), "--tracking-uri", tracking_uri]) == 0
    assert (out / "latent_evolution_0.gif").is_file()
    assert "data:image/gif;base64," in (out / "index.html").read_text()
    assert "![The latent space forming: " in (out / "report.md").read_text()

    quiet = train(load_config(None, [*tiny_overrides, "train.epochs=1", "eval.enabled=false",
                                     "tracking.latent_frames_every=0"]), data=data).run_id
    assert "latents/evolution.gif" not in {item.path for item in client.list_artifacts(quiet, "latents")}


def test_frames_are_bounded_and_projected_on_fixed_axes(tmp_path):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=50)
    frames = [(step, rng.normal(size=(50, 8)) * (1 + step / 100)) for step in range(0, 2000, 10)]
    kept = latent_evolution.thinned(frames)
    assert len(kept) == latent_evolution.MAX_FRAMES and kept[0][0] == 0 and kept[-1][0] == 1990
    path = latent_evolution.save_evolution(frames, labels, tmp_path / "evolution.gif",
                                           class_names=[f"class {digit}" for digit in range(10)])
    with Image.open(path) as gif:
        assert gif.n_frames == latent_evolution.MAX_FRAMES
        durations, outside = [], 0
        plot_end = latent_evolution.PLOT_SIZE - latent_evolution.MARGIN + 4
        for index in range(gif.n_frames):
            gif.seek(index)
            durations.append(gif.info["duration"])
            pixels = np.asarray(gif.convert("RGB")).astype(int)
            coloured = (pixels.max(axis=2) - pixels.min(axis=2)) > 60  # class colours
            plot, legend = coloured[:, :latent_evolution.PLOT_SIZE], coloured[:, latent_evolution.PLOT_SIZE:]
            outside += plot[:, plot_end:].sum() + plot[plot_end:, :].sum()  # right of and below the plot's box
            assert legend.any()  # the class legend beside it
        assert outside == 0  # every point of every frame inside the plot
        # one pass in about LOOP_MS, whatever the number of frames, then the last frame lingers
        assert sum(durations[:-1]) == pytest.approx(latent_evolution.LOOP_MS, rel=0.1)
        assert durations[-1] == latent_evolution.LAST_FRAME_MS
    # a 2-D latent is drawn as it is: the projection is the identity
    centre, axes = latent_evolution._projection(rng.normal(size=(50, 2)))
    assert np.array_equal(axes, np.eye(2)) and not centre.any()
    # larger latents: the last frame's two principal directions
    last = rng.normal(size=(200, 5)) * np.array([5.0, 3.0, 0.1, 0.1, 0.1])
    _, axes = latent_evolution._projection(last)
    assert np.abs(axes[:, :2]).sum(axis=1).min() > 0.99


def test_the_latent_scatter_is_a_still_frame_with_every_class_in_its_colour(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    means = rng.normal(size=(200, 8)) + labels[:, None]  # 8-D: drawn on two principal components
    path = latent_evolution.save_still(means, labels, tmp_path / "latents" / "latent_scatter.png",
                                       class_names=("a", "b", "c", "d"))
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == latent_evolution.FRAME_SIZE
        pixels = np.asarray(image.convert("RGB"))
    plot = pixels[:, :latent_evolution.PLOT_SIZE].reshape(-1, 3)
    for colour in latent_evolution.TAB10[:4]:  # each class's points, inside the plot
        assert (plot == colour).all(axis=1).sum() >= 9 * 10
    assert not (plot == latent_evolution.TAB10[4]).all(axis=1).any()  # no fifth class
