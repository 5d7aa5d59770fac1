"""The report's sentences and numbers, on small hand-made tables with known answers.

Comparisons, trends and best rows are decided on val/* (the validation split); test/* is
only reported. Several tables below give val and test opposite answers on purpose.
"""

import re

import numpy as np
import pandas as pd
import pytest

from analysis import findings, stats
from analysis.runs import config_label, display_param, parse_param, swept_params
from analysis.tables import (configuration_summary, display_table, mark_best, markdown_table, pareto_front,
                             table_metrics)
from vae_lab.tracking.studies import parse_objectives


def summary_frame(rows: list[dict]) -> pd.DataFrame:
    """A configuration summary as `configuration_summary` returns it (single runs: std NaN)."""
    frame = pd.DataFrame(rows)
    for column in [c for c in frame.columns if c.endswith(" mean")]:
        std = column.replace(" mean", " std")
        if std not in frame:
            frame[std] = np.nan
    if "runs" not in frame:
        frame["runs"] = 1
    if "label" not in frame:
        frame["label"] = [f"{row['family']} #{index}" for index, row in frame.iterrows()]
    return frame


def one_seed_runs(summary: pd.DataFrame) -> pd.DataFrame:
    """The finished runs behind a summary of single runs: one run (seed 0) per configuration."""
    runs = pd.DataFrame({"label": summary["label"], "family": summary["family"], "params.train.seed": "0"})
    for column in [c for c in summary.columns if c.endswith(" mean")]:
        runs[f"metrics.{column[:-len(' mean')]}"] = summary[column]
    return runs


def seeded(rows: list[dict], config_params: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(summary, runs) from one dict per run: family, seed, the config params and metrics by name."""
    runs = pd.DataFrame([{"family": row["family"], "params.train.seed": str(row["seed"]),
                          **{f"params.{key}": str(row[key]) for key in config_params if key in row},
                          **{f"metrics.{key}": value for key, value in row.items() if "/" in key}}
                         for row in rows])
    runs["label"] = [config_label(row, config_params) for _, row in runs.iterrows()]
    metrics = [column[len("metrics."):] for column in runs.columns if column.startswith("metrics.")]
    return configuration_summary(runs, config_params, metrics), runs


# ----------------------------------------------------------------------------- trends

def test_monotone_series_counts_every_step():
    assert findings.improving_steps([50, 40, 30, 25, 20, 18]) == (5, 5)
    sentence = findings.trend_sentence("Reconstruction", "latent size", [2, 4, 8, 16, 32, 64],
                                       [50, 40, 30, 25, 20, 18])
    assert "improves monotonically" in sentence
    assert "(5/5 steps" in sentence
    assert "50.0 at latent size 2 → 18.0 at 64" in sentence


def test_non_monotone_series_does_not_claim_monotonicity():
    ys = [50, 40, 45, 25, 20, 18]
    assert findings.improving_steps(ys) == (4, 5)
    sentence = findings.trend_sentence("Reconstruction", "latent size", [2, 4, 8, 16, 32, 64], ys)
    assert "improves monotonically" not in sentence
    assert "4/5 steps only, not monotonically" in sentence


def test_flat_steps_are_not_improvements_and_higher_is_better_flips():
    assert findings.improving_steps([3, 3, 2]) == (1, 2)
    assert findings.improving_steps([0.5, 0.6, 0.7], lower_is_better=False) == (2, 2)
    sentence = findings.trend_sentence("Accuracy", "latent size", [2, 4], [0.7, 0.6], lower_is_better=False)
    assert "gets worse at every step" in sentence and "0/1 step improve" in sentence


def test_trend_within_seed_noise_is_not_established():
    def step(before: list[float], after: list[float]) -> stats.Difference:
        return stats.difference(dict(enumerate(after)), dict(enumerate(before)), "val/recon", True)

    # the means fall by 1 per step, but seed by seed the steps go both ways
    noisy = [step([100, 95, 105], [96, 99, 102]), step([96, 99, 102], [101, 92, 101])]
    sentence = findings.trend_sentence("Reconstruction", "latent size", [2, 4, 8], [100, 99, 98],
                                       step_differences=noisy)
    assert sentence.endswith("; no step's paired 95% interval excludes zero (0/2 steps), so the trend is not "
                             "established at these seeds.")
    clear = [step([100, 95, 105], [90, 86, 94]), step([90, 86, 94], [80, 75, 85])]
    sentence = findings.trend_sentence("Reconstruction", "latent size", [2, 4, 8], [100, 90, 80],
                                       step_differences=clear)
    assert sentence.endswith("; by a paired 95% interval that excludes zero, 2/2 steps resolved as better.")
    mixed = [step([100, 95, 105], [90, 86, 94]), step([90, 86, 94], [95, 90, 99])]
    sentence = findings.trend_sentence("Reconstruction", "latent size", [2, 4, 8], [100, 90, 94.7],
                                       step_differences=mixed)
    assert sentence.endswith("1/2 steps resolved as better and 1/2 steps resolved as worse.")
    single = [step([100], [90])]
    assert findings.trend_sentence("Reconstruction", "latent size", [2, 4], [100, 90], step_differences=single) \
        .endswith("; one seed per point, so no step has an interval and no step is called.")


def test_trend_needs_two_points():
    assert findings.trend_sentence("Reconstruction", "latent size", [2], [100]) is None


def test_latent_size_findings_per_family_and_setting():
    summary = summary_frame([
        {"family": "linear_vae", "model.latent_dim": d, "loss.kl_weight": 1.0, "val/recon mean": r}
        for d, r in [(2, 140.0), (4, 120.0), (8, 110.0), (16, 100.0), (32, 95.0), (64, 94.0)]
    ] + [{"family": "ae", "model.latent_dim": d, "loss.kl_weight": 1.0, "val/recon mean": r}
         for d, r in [(2, 130.0), (4, 131.0)]])
    sentences = findings.latent_size_findings(summary, one_seed_runs(summary),
                                              ["model.name", "model.latent_dim", "loss.kl_weight"])
    assert len(sentences) == 2
    vae = next(s for s in sentences if "linear_vae" in s)
    assert "improves monotonically" in vae and "5/5 steps" in vae and "kl_weight=1" in vae
    ae = next(s for s in sentences if s.startswith("Validation reconstruction (val/recon)") and "for ae" in s)
    assert "gets worse" in ae


def test_latent_size_trend_follows_validation_not_test():
    # test/recon improves with latent size, val/recon gets worse: the sentence is about val
    summary = summary_frame([
        {"family": "ae", "model.latent_dim": d, "val/recon mean": v, "test/recon mean": t}
        for d, v, t in [(2, 100.0, 120.0), (4, 105.0, 90.0), (8, 110.0, 80.0)]])
    runs = one_seed_runs(summary)
    [sentence] = findings.latent_size_findings(summary, runs, ["model.latent_dim"])
    assert sentence.startswith("Validation reconstruction (val/recon) gets worse at every step of latent size")
    assert "100.0 at latent size 2 → 110.0 at 8" in sentence
    assert findings.latent_size_findings(summary.drop(columns=["val/recon mean", "val/recon std"]),
                                         runs, ["model.latent_dim"]) == []


def test_latent_size_trend_over_paired_points():
    # seed 000's NAS: each latent size comes with its own hidden width (study file `points:`)
    summary = summary_frame([
        {"family": "linear_vae", "model.latent_dim": d, "model.hidden_dims": f"[{8 * d}]", "val/recon mean": r}
        for d, r in [(4, 220.0), (8, 200.0), (16, 190.0), (32, 185.0), (64, 179.0)]])
    params = ["model.latent_dim", "model.hidden_dims"]
    runs = one_seed_runs(summary)
    assert findings.latent_size_findings(summary, runs, params) == []  # unpaired: no two rows share a setting
    (sentence,) = findings.latent_size_findings(summary, runs, params, paired=params)
    assert "hidden_dims paired with it" in sentence
    assert "improves monotonically" in sentence and "4/4 steps" in sentence


def test_paired_params_come_from_the_study_files_points():
    from analysis.runs import paired_params

    study = "search_space:\n  points:\n    - {model.hidden_dims: [32], model.latent_dim: 4}\n"
    assert paired_params(study) == ["model.hidden_dims", "model.latent_dim"]
    assert paired_params("search_space:\n  model.latent_dim: [2, 4]\n") == []
    assert paired_params(None) == []


# ----------------------------------------------------------------------------- KL weight, families

def test_kl_weight_sentence_has_the_right_percentages():
    summary = summary_frame([
        {"family": "linear_vae", "loss.kl_weight": 1.0, "val/kl mean": 10.0, "val/recon mean": 100.0,
         "test/kl mean": 10.0, "test/recon mean": 100.0},
        {"family": "linear_vae", "loss.kl_weight": 100.0, "val/kl mean": 2.0, "val/recon mean": 135.0,
         "test/kl mean": 12.0, "test/recon mean": 90.0},
    ])
    [sentence] = findings.kl_weight_findings(summary, one_seed_runs(summary), ["model.name", "loss.kl_weight"])
    assert "KL weight 100 cut KL by 80% and raised reconstruction loss by 35% compared with KL weight 1" in sentence
    assert ("on the validation split (val/kl 10.0 → 2.0 nats, val/recon 100.0 → 135.0 nats; "
            "val/recon change one seed each: no interval is possible).") in sentence


def test_kl_weight_sentence_says_whether_the_paired_interval_resolves_the_change():
    rows = [{"family": "linear_vae", "loss.kl_weight": weight, "seed": seed, "val/kl": 10.0 / weight,
             "val/recon": recon} for weight, recons in ((1.0, [100, 104, 102]), (4.0, [110, 115, 111]))
            for seed, recon in enumerate(recons)]
    summary, runs = seeded(rows, ["loss.kl_weight"])
    [sentence] = findings.kl_weight_findings(summary, runs, ["loss.kl_weight"])
    assert ("val/recon change 95% interval [9.0, 11.0], paired over 3 shared seeds; the larger weight better "
            "in 0% of resamples; the reconstruction change is resolved).") in sentence
    rows[3]["val/recon"] = 95.0  # seed 0 now improves with the larger weight
    summary, runs = seeded(rows, ["loss.kl_weight"])
    [sentence] = findings.kl_weight_findings(summary, runs, ["loss.kl_weight"])
    assert sentence.endswith("; the reconstruction change is not resolved, its interval includes zero).")


def test_kl_weight_sentence_reports_the_other_direction_too():
    summary = summary_frame([
        {"family": "conv_vae", "loss.kl_weight": 0.5, "val/kl mean": 4.0, "val/recon mean": 100.0},
        {"family": "conv_vae", "loss.kl_weight": 2.0, "val/kl mean": 5.0, "val/recon mean": 90.0},
    ])
    [sentence] = findings.kl_weight_findings(summary, one_seed_runs(summary), ["loss.kl_weight"])
    assert "KL weight 2 raised KL by 25% and lowered reconstruction loss by 10%" in sentence


def test_kl_weight_ignores_plain_autoencoders():
    summary = summary_frame([
        {"family": "ae", "loss.kl_weight": 1.0, "val/kl mean": np.nan, "val/recon mean": 100.0},
        {"family": "ae", "loss.kl_weight": 10.0, "val/kl mean": np.nan, "val/recon mean": 101.0},
    ])
    assert findings.kl_weight_findings(summary, one_seed_runs(summary), ["loss.kl_weight"]) == []


def test_family_comparison_on_elbo_and_reconstruction():
    # three seeds each; every seed agrees on each ranking, so each difference is resolved
    rows = []
    for seed in range(3):
        rows += [{"family": "conv_vae", "model.latent_dim": 2, "seed": seed, "val/elbo": -90.0 - seed,
                  "val/recon": 80.0 + seed},
                 {"family": "linear_vae", "model.latent_dim": 2, "seed": seed, "val/elbo": -102.0 - 2 * seed,
                  "val/recon": 95.0 + seed},
                 {"family": "linear_vae", "model.latent_dim": 4, "seed": seed, "val/elbo": -110.0,
                  "val/recon": 90.0 + seed},
                 {"family": "ae", "model.latent_dim": 2, "seed": seed, "val/recon": 70.0 + 2 * seed}]
    summary, runs = seeded(rows, ["model.name", "model.latent_dim"])
    sentences = findings.family_findings(summary, runs)
    assert ("conv_vae beats linear_vae on validation ELBO (val/elbo) by 13.0 nats (best configuration of each, "
            "mean over seeds: -91.0 vs -104.0; 95% interval [12.0, 14.0], paired over 3 shared seeds; "
            "conv_vae better in 100% of resamples).") in sentences
    recon = [s for s in sentences if "reconstruction loss" in s]
    assert recon[0].startswith("ae beats conv_vae on validation reconstruction loss (val/recon) by 9.0 nats")
    assert recon[0].endswith(findings.AE_PAYS_NO_KL) and not recon[1].endswith(findings.AE_PAYS_NO_KL)
    # lower is better here: the gap and its interval both say by how much the winner is lower
    low, high = map(float, re.search(r"95% interval \[([-\d.]+), ([-\d.]+)\]", recon[0]).groups())
    assert 0 < low < 9.0 < high
    assert recon[1].startswith("conv_vae beats linear_vae on validation reconstruction loss (val/recon) by 10.00 nats")
    assert not any(s.startswith("ae ") and "ELBO" in s for s in sentences)


def test_family_winner_is_decided_on_validation_and_its_test_numbers_are_reported():
    # linear_vae is better on test/elbo, conv_vae on val/elbo: conv_vae wins, test is only quoted
    rows = []
    for seed in range(2):
        rows += [{"family": "conv_vae", "model.latent_dim": 2, "seed": seed, "val/elbo": -95.0 - seed,
                  "test/elbo": -120.0 - seed},
                 {"family": "conv_vae", "model.latent_dim": 4, "seed": seed, "val/elbo": -130.0, "test/elbo": -80.0},
                 {"family": "linear_vae", "model.latent_dim": 2, "seed": seed, "val/elbo": -100.0 - 2 * seed,
                  "test/elbo": -90.0}]
    summary, runs = seeded(rows, ["model.name", "model.latent_dim"])
    [sentence] = findings.family_findings(summary, runs)
    assert sentence.startswith("conv_vae beats linear_vae on validation ELBO (val/elbo) by 5.5 nats "
                               "(best configuration of each, mean over seeds: -95.5 vs -101.0")
    assert sentence.endswith("; their test/elbo: -120.5 vs -90.0 (difference -30.5 [-31.0, -30.0], reported, "
                             "not used to choose)).")
    assert findings.family_findings(summary.drop(columns=["val/elbo mean", "val/elbo std"]), runs) == []


def test_family_gap_inside_the_paired_interval_is_not_called():
    rows = [{"family": family, "seed": seed, "val/elbo": value}
            for family, values in (("conv_vae", [-98.0, -100.0, -102.0]), ("linear_vae", [-101.0, -99.0, -103.0]))
            for seed, value in enumerate(values)]
    summary, runs = seeded(rows, ["model.name"])
    [sentence] = findings.family_findings(summary, runs)
    assert sentence.startswith("conv_vae and linear_vae are not told apart on validation ELBO (val/elbo): "
                               "best configuration of each, mean over seeds: -100.0 vs -101.0, a gap of 1.00 nats "
                               "whose 95% interval [")
    assert sentence.endswith("includes zero (paired over 3 shared seeds; conv_vae better in 85% of resamples); "
                             "about 18 seeds would be needed for the interval to exclude zero if the observed difference and spread held.")
    assert " beats " not in sentence


def test_family_gap_from_one_seed_is_not_called():
    rows = [{"family": "conv_vae", "seed": 0, "val/elbo": -90.0}, {"family": "linear_vae", "seed": 0, "val/elbo": -99.0}]
    summary, runs = seeded(rows, ["model.name"])
    assert findings.family_findings(summary, runs) == [
        "conv_vae and linear_vae are not told apart on validation ELBO (val/elbo): best configuration of each, "
        "mean over seeds: -90.0 vs -99.0, a gap of 9.00 nats (one seed each), where no interval is possible."]


def test_the_winner_follows_the_seeds_both_share_not_the_means():
    # conv_vae's mean is worse only because of a seed linear_vae never ran; on the two seeds both
    # ran, conv_vae is better at each: the interval decides, and names conv_vae
    rows = [{"family": "linear_vae", "seed": 0, "val/recon": 12.0}, {"family": "linear_vae", "seed": 1, "val/recon": 12.1},
            {"family": "conv_vae", "seed": 0, "val/recon": 11.0}, {"family": "conv_vae", "seed": 1, "val/recon": 11.2},
            {"family": "conv_vae", "seed": 2, "val/recon": 20.0}]
    summary, runs = seeded(rows, ["model.name"])
    [sentence] = findings.family_findings(summary, runs)
    assert sentence.startswith("conv_vae beats linear_vae on validation reconstruction loss (val/recon) by 0.950 "
                               "nats"), sentence
    assert "paired over 2 shared seeds of 3 and 2; conv_vae better in 100% of resamples" in sentence


# ----------------------------------------------------------------------------- baselines and diagnostics

def test_pca_baseline_counts_winners_and_names_losers():
    summary = summary_frame([
        {"family": "ae", "label": "ae, latent_dim=2", "eval/mse_per_pixel mean": 0.05, "eval/pca_mse_per_pixel mean": 0.06},
        {"family": "ae", "label": "ae, latent_dim=4", "eval/mse_per_pixel mean": 0.04, "eval/pca_mse_per_pixel mean": 0.05},
        {"family": "linear_vae", "label": "linear_vae, latent_dim=4", "eval/mse_per_pixel mean": 0.07,
         "eval/pca_mse_per_pixel mean": 0.05},
    ])
    [sentence] = findings.pca_baseline_findings(summary)
    assert sentence.startswith("2/3 configurations beat their PCA baseline")
    assert "these did not: linear_vae, latent_dim=4: 0.0700 vs PCA 0.0500" in sentence
    assert "ae, latent_dim=2:" not in sentence


def runs_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["label"] = frame.get("label", frame["family"])
    return frame


def test_collapse_flags_are_counted_from_the_tags():
    runs = runs_frame([
        {"family": "linear_vae", "label": "a", "tags.posterior_collapse": "true",
         "metrics.eval/active_units": 1.0, "params.model.latent_dim": "8"},
        {"family": "linear_vae", "label": "b", "tags.posterior_collapse": "false",
         "metrics.eval/active_units": 8.0, "params.model.latent_dim": "8"},
        {"family": "ae", "label": "c", "tags.posterior_collapse": "false",
         "metrics.eval/active_units": np.nan, "params.model.latent_dim": "8"},
    ])
    [sentence] = findings.collapse_findings(runs)
    assert sentence.startswith("Posterior collapse in 1/2 VAE runs")
    assert "a (1/8 units active)" in sentence
    healthy = findings.collapse_findings(runs.iloc[1:])
    assert healthy == ["No posterior collapse: 1/1 VAE runs carry information in their latent code "
                       "(a test KL of at least 0.1 nats per image and at least one active unit)."]


def test_iwae_sentences_say_where_computed_and_why_not():
    runs = runs_frame([
        {"family": "linear_vae", "label": "binarized", "metrics.eval/nll_iwae": 95.25,
         "tags.nll_iwae": "100 samples on 1000 test images"},
        {"family": "conv_vae", "label": "grey", "metrics.eval/nll_iwae": np.nan,
         "tags.nll_iwae": "not computed: needs loss.likelihood=bernoulli and data.binarize=dynamic or static"},
        {"family": "ae", "label": "ae", "metrics.eval/nll_iwae": np.nan, "tags.nll_iwae": None},
    ])
    sentences = findings.iwae_findings(runs)
    assert sentences[0].startswith("eval/nll_iwae (importance-weighted -log p(x), 100 samples on 1000 test images) "
                                   "was computed on the test split for 1 run(s): 95.2 nats/image")
    assert sentences[1] == ("eval/nll_iwae was not computed for 1 VAE run(s): needs loss.likelihood=bernoulli "
                            "and data.binarize=dynamic or static.")
    assert "1 plain autoencoder run(s)" in sentences[2]
    only_grey = findings.iwae_findings(runs.iloc[1:2])
    assert not any("was computed" in s for s in only_grey)


def test_no_finished_run_gives_no_claims():
    assert findings.all_findings(pd.DataFrame(), pd.DataFrame(), []) == [
        "No run finished, so there are no numbers to draw findings from."]


# ----------------------------------------------------------------------------- tables

def test_pareto_front_keeps_only_undominated_points():
    frame = pd.DataFrame({"kl": [1.0, 2.0, 3.0, 2.5, 0.5], "recon": [10.0, 8.0, 9.0, 7.0, 12.0]})
    front = pareto_front(frame, "kl", "recon")
    assert front.index.tolist() == [4, 0, 1, 3]  # (3, 9) is beaten by (2.5, 7)


def test_configuration_summary_mean_std_and_best():
    runs = pd.DataFrame({
        "family": ["linear_vae"] * 4 + ["ae"],
        "params.loss.kl_weight": ["1.0", "1.0", "10.0", "10.0", "1.0"],
        "params.train.seed": ["0", "1", "0", "1", "0"],
        "metrics.val/recon": [99.0, 103.0, 119.0, 121.0, 89.0],
        "metrics.val/elbo": [-102.0, -106.0, -120.0, -122.0, np.nan],
        "metrics.test/recon": [100.0, 104.0, 120.0, 122.0, 90.0],
        "metrics.test/elbo": [-103.0, -107.0, -121.0, -123.0, np.nan],
    })
    runs["label"] = [config_label(row, ["loss.kl_weight"]) for _, row in runs.iterrows()]
    metrics = ["val/recon", "val/elbo", "test/recon", "test/elbo"]
    summary = configuration_summary(runs, ["loss.kl_weight"], metrics)
    assert summary["label"].tolist() == ["ae, kl_weight=1", "linear_vae, kl_weight=1", "linear_vae, kl_weight=10"]
    row = summary.set_index("label").loc["linear_vae, kl_weight=1"]
    assert row["test/recon mean"] == pytest.approx(102.0)
    assert row["test/recon std"] == pytest.approx(np.std([100.0, 104.0], ddof=1))
    assert row["runs"] == 2 and row["seeds"] == "0,1"
    assert np.isnan(summary.set_index("label").loc["ae, kl_weight=1", "test/recon std"])

    best = mark_best(summary, objectives=[])
    assert best.loc[best["best"], "label"].tolist() == ["ae, kl_weight=1", "linear_vae, kl_weight=1"]
    assert best.set_index("family").loc["linear_vae", "ranked_by"].iloc[0] == "val/elbo (max)"
    assert best.set_index("family").loc["ae", "ranked_by"] == "val/recon (min)"
    shown = table_metrics(best, metrics)
    assert shown == ["val/recon", "test/recon", "val/elbo", "test/elbo"]  # each chooser beside what it reports
    table = display_table(best, ["loss.kl_weight"], shown)
    assert table.loc[1, "test/recon"] == f"102.0 ± {np.std([100.0, 104.0], ddof=1):.1f}"  # two digits of the std
    assert table[""].tolist() == ["★", "★", ""]
    assert markdown_table(table).splitlines()[0].startswith("|  | family | loss.kl_weight | runs | val/recon |")

    by_objective = mark_best(summary, objectives=[("val/recon", "minimize")])
    assert by_objective.set_index("label").loc["linear_vae, kl_weight=1", "ranked_by"] == "val/recon (min)"


def test_best_row_follows_the_validation_mean_over_seeds_not_test_nor_one_lucky_seed():
    # kl_weight=10 has the best single val/elbo run (-95) and the best test/elbo;
    # kl_weight=1 has the best val/elbo averaged over its seeds: it gets the ★
    runs = pd.DataFrame({
        "family": ["linear_vae"] * 4,
        "params.loss.kl_weight": ["1.0", "1.0", "10.0", "10.0"],
        "params.train.seed": ["0", "1", "0", "1"],
        "metrics.val/elbo": [-100.0, -102.0, -95.0, -109.0],
        "metrics.test/elbo": [-110.0, -110.0, -90.0, -91.0],
        "metrics.test/recon": [100.0, 100.0, 80.0, 80.0],
    })
    runs["label"] = [config_label(row, ["loss.kl_weight"]) for _, row in runs.iterrows()]
    metrics = ["val/elbo", "test/recon", "test/elbo"]
    summary = configuration_summary(runs, ["loss.kl_weight"], metrics)
    for objectives in ([], [("test/elbo", "maximize")], [("test/recon", "minimize")],
                       [("val/elbo", "maximize"), ("test/recon", "minimize")]):
        best = mark_best(summary, objectives)
        assert best.loc[best["best"], "label"].tolist() == ["linear_vae, kl_weight=1"], objectives
        assert set(best["ranked_by"]) == {"val/elbo (max)"}
    [sentence] = findings.best_configuration_findings(mark_best(summary, []), runs)
    assert sentence == ("Best linear_vae configuration by val/elbo (max), mean over seeds [95% interval]: "
                        "linear_vae, kl_weight=1 (val/elbo -101.0 [-102.0, -100.0]; reported test/elbo -110.0).")


def test_runs_without_validation_metrics_get_no_best_row():
    summary = summary_frame([{"family": "ae", "test/recon mean": 90.0}, {"family": "ae", "test/recon mean": 80.0}])
    best = mark_best(summary, objectives=[("test/recon", "minimize")])
    assert not best["best"].any() and set(best["ranked_by"]) == {""}
    assert table_metrics(best, ["test/recon"]) == ["test/recon"]
    assert findings.best_configuration_findings(best, one_seed_runs(summary)) == []


def test_pareto_finding_uses_the_validation_split():
    runs = runs_frame([
        {"family": "linear_vae", "label": "a", "metrics.val/kl": 1.0, "metrics.val/recon": 10.0,
         "metrics.test/kl": 9.0, "metrics.test/recon": 90.0},
        {"family": "linear_vae", "label": "b", "metrics.val/kl": 2.0, "metrics.val/recon": 20.0,
         "metrics.test/kl": 1.0, "metrics.test/recon": 1.0},
    ])
    [sentence] = findings.pareto_findings(runs)
    assert sentence == ("1/2 VAE runs lie on the validation rate–distortion Pareto front "
                        "(no other run has both lower val/kl and lower val/recon): a.")


def test_seed_spread_is_measured_on_validation():
    summary = summary_frame([
        {"family": "ae", "runs": 3, "val/recon mean": 90.0, "val/recon std": 2.0, "test/recon std": 9.0},
        {"family": "ae", "runs": 3, "val/recon mean": 91.0, "val/recon std": 4.0, "test/recon std": 9.0},
    ])
    assert findings.seed_spread_findings(summary) == [
        "Seed-to-seed spread: over 2 replicated configuration(s), val/recon varies with a std of 3.0 nats "
        "on average (largest 4.0); differences are called only where a seed-paired 95% bootstrap interval "
        "excludes zero."]


def test_swept_params_from_tag_or_from_differences():
    runs = pd.DataFrame({"params.model.latent_dim": ["2", "4"], "params.loss.kl_weight": ["1.0", "1.0"],
                         "params.train.seed": ["0", "1"]})
    assert swept_params({"vae_lab.swept_params": "model.latent_dim, train.seed"}, runs) == \
        ["model.latent_dim", "train.seed"]
    assert swept_params({}, runs) == ["model.latent_dim", "train.seed"]


def test_param_parsing_and_objectives():
    assert parse_param("4") == 4 and parse_param("1e-3") == pytest.approx(0.001) and parse_param("ae") == "ae"
    assert display_param("1.0") == "1" and display_param("0.001") == "0.001" and display_param("[64]") == "[64]"
    assert parse_objectives("test/recon:minimize,test/kl:minimize") == [
        ("test/recon", "minimize"), ("test/kl", "minimize")]


def test_old_runs_lose_elbos_their_likelihood_never_had_and_vaes_rank_on_recon_plus_kl():
    """Runs logged before elbo meant a normalized likelihood: a grey-pixel Bernoulli run's
    'elbo' is blanked, and VAEs without an ELBO are ranked by val/recon + val/kl, so a KL
    weight cannot win by leaving its KL out."""
    from analysis.runs import honest_likelihood_metrics

    runs = pd.DataFrame({
        "family": ["linear_vae"] * 3, "label": ["kl 0.05", "kl 1", "binary"],
        "params.loss.likelihood": ["bernoulli"] * 3, "params.data.binarize": ["none", "none", "dynamic"],
        "metrics.val/recon": [90.0, 100.0, 80.0], "metrics.val/kl": [60.0, 20.0, 25.0],
        "metrics.val/elbo": [-150.0, -120.0, -105.0], "metrics.test/elbo": [-151.0, -121.0, -106.0],
    })
    honest_likelihood_metrics(runs)
    assert runs["metrics.val/elbo"].isna().tolist() == [True, True, False]
    assert runs["metrics.test/elbo"].isna().tolist() == [True, True, False]
    assert runs["metrics.val/recon+kl"].tolist()[:2] == [150.0, 120.0] and np.isnan(runs["metrics.val/recon+kl"][2])
    grey = runs.iloc[:2].assign(**{"metrics.val/elbo": np.nan})
    summary = mark_best(configuration_summary(grey, [], ["val/recon", "val/recon+kl"]), [])
    assert summary.loc[summary["best"], "label"].tolist() == ["kl 1"]  # by val/recon alone it would be kl 0.05
    assert set(summary["ranked_by"]) == {"val/recon+kl (min)"}


def test_collapse_is_decided_from_the_metrics_when_a_run_has_them():
    runs = runs_frame([  # an old tag ("fewer than half active") against what the metrics say
        {"family": "linear_vae", "label": "old", "tags.posterior_collapse": "true",
         "metrics.test/kl": 12.0, "metrics.eval/active_units": 2.0, "params.model.latent_dim": "8"},
        {"family": "linear_vae", "label": "empty", "tags.posterior_collapse": "false",
         "metrics.test/kl": 0.01, "metrics.eval/active_units": 0.0, "params.model.latent_dim": "8"},
    ])
    [sentence] = findings.collapse_findings(runs)
    assert sentence.startswith("Posterior collapse in 1/2 VAE runs") and "empty (0/8" in sentence


def test_a_heatmap_needs_values_on_a_grid(tmp_path):
    from analysis import plots

    def finished(pairs):
        return pd.DataFrame([{"family": "linear_vae", "params.loss.kl_weight": str(weight),
                              "params.model.latent_dim": str(latent), "metrics.val/recon": 100.0 + index}
                             for index, (weight, latent) in enumerate(pairs)])

    keys = ["loss.kl_weight", "model.latent_dim"]
    on_a_grid = finished([(weight, latent) for weight in (0.49740235767797003, 2.0) for latent in (2, 4)] * 2)
    drawn = plots.heatmap(on_a_grid, keys, "val/recon", tmp_path / "grid.png")
    assert drawn.path is not None and drawn.path.is_file()
    sampled = finished([(0.1 * index + 0.013, index + 2) for index in range(6)])  # TPE: a cell each
    skipped = plots.heatmap(sampled, keys, "val/recon", tmp_path / "sampled.png")
    assert skipped.path is None and "not on a grid" in skipped.skipped
    assert not (tmp_path / "sampled.png").exists()


def test_legends_show_numbers_to_three_digits(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from analysis import plots

    shown = []
    monkeypatch.setattr(plots, "_save", lambda figure, path: shown.extend(
        text.get_text() for ax in figure.axes if ax.get_legend() for text in ax.get_legend().get_texts()) or path)
    rows = [{"family": "linear_vae", "params.loss.kl_weight": str(weight), "metrics.val/kl": kl, "metrics.val/recon": recon}
            for weight, kl, recon in ((0.49740235767797003, 10, 100), (1.3123456789, 8, 105), (2.71828182845, 6, 110))]
    plots.rate_distortion(pd.DataFrame(rows), tmp_path / "rd.png")
    plt.close("all")
    assert {"0.497", "1.31", "2.72", "linear_vae"} <= set(shown)
    assert not any(len(text) > 12 and text[0].isdigit() for text in shown)
