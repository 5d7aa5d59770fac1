"""Findings in words, generated from the numbers, each sentence backed by the table.

Every function takes the configuration summary (`analysis.tables.configuration_summary`,
columns `<metric> mean` / `<metric> std`) or the finished runs, and returns sentences.
A function whose data is missing returns no sentence rather than a guess.

Comparisons and trends are decisions, so they are made on the validation split (val/*);
a sentence that quotes numbers names their split, and test/* numbers appear only as what
is reported for the configurations validation picked. A difference is called only where its
95% bootstrap interval, paired by seed (`analysis.stats`), excludes zero.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from vae_lab import names

from vae_lab.evaluation.metrics import COLLAPSE_KL_NATS

from . import stats
from .runs import display_param, parse_param
from .runs import is_vae_family, variational_rows
from .tables import pareto_front

NAMES = {names.VAL_RECON: "validation reconstruction loss (val/recon)", names.VAL_ELBO: "validation ELBO (val/elbo)"}


def _number(value: float) -> str:
    if value is None or np.isnan(value):
        return "n/a"
    return f"{value:.4f}" if abs(value) < 1 else f"{value:.1f}"


def _plain(value) -> str:
    """4.0 -> '4', 0.5 -> '0.5': swept values as a person writes them."""
    number = float(value)
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _percent(before: float, after: float) -> float | None:
    if before is None or after is None or np.isnan(before) or np.isnan(after) or abs(before) < 1e-12:
        return None
    return 100.0 * (after - before) / abs(before)


PAIRED = object()  # a setting that changes together with the varied param


def _group_name(family: str, settings: dict) -> str:
    extra = ", ".join(f"{key.split('.')[-1]} paired with it" if value is PAIRED
                      else f"{key.split('.')[-1]}={display_param(value)}" for key, value in settings.items())
    return f"{family} ({extra})" if extra else family


def _groups(summary: pd.DataFrame, config_params: list[str], varying: str, paired: Sequence[str] = ()):
    """(family, {other param: value}, rows sorted by `varying`) for every group where only `varying`
    changes, or `varying` and the params `paired` with it (a study's `points:`) change together."""
    together = [key for key in paired if key != varying and key in summary] if varying in paired else []
    others = [key for key in config_params
              if key not in (varying, "model.name", *together) and key in summary]
    keys = ["family", *others]
    for values, group in summary.groupby(keys, sort=False, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        numbers = pd.to_numeric(group[varying], errors="coerce")
        if numbers.isna().any() or numbers.nunique() < 2 or not numbers.is_unique:
            continue
        settings = dict(zip(others, values[1:]))
        settings.update({key: PAIRED for key in together if group[key].astype(str).nunique() > 1})
        yield values[0], settings, group.assign(_x=numbers).sort_values("_x")


# ----------------------------------------------------------------------------- trends

def improving_steps(values: Sequence[float], lower_is_better: bool = True) -> tuple[int, int]:
    """How many consecutive steps of `values` improve (strictly), out of how many steps."""
    values = [float(value) for value in values]
    steps = list(zip(values[:-1], values[1:]))
    improved = sum((after < before) if lower_is_better else (after > before) for before, after in steps)
    return improved, len(steps)


def trend_sentence(metric: str, x_name: str, xs: Sequence, ys: Sequence[float],
                   lower_is_better: bool = True, context: str = "",
                   step_differences: Sequence[stats.Difference] | None = None) -> str | None:
    """'Reconstruction improves monotonically with latent size (5/5 steps; ...)', or the honest count.

    `step_differences` are the differences between neighbouring points, paired by seed; the sentence says
    how many of them their interval resolves, and a trend none of them resolves is noise.
    """
    if len(xs) < 2 or any(np.isnan(float(y)) for y in ys):
        return None
    improved, steps = improving_steps(ys, lower_is_better)
    where = f" for {context}" if context else ""
    span = f"{_number(ys[0])} at {x_name} {_plain(xs[0])} → {_number(ys[-1])} at {_plain(xs[-1])}"
    unit = "step" if steps == 1 else "steps"
    if improved == steps:
        how = "improves monotonically" if steps > 1 else "improves"
        sentence = f"{metric} {how} with {x_name}{where} ({improved}/{steps} {unit}; {span})"
    elif improved == 0:
        sentence = f"{metric} gets worse at every step of {x_name}{where} (0/{steps} {unit} improve; {span})"
    else:
        sentence = (f"{metric} improves with {x_name}{where} in {improved}/{steps} steps only, "
                    f"not monotonically ({span})")
    return sentence + _steps_resolved(step_differences) + "."


def _steps_resolved(steps: Sequence[stats.Difference] | None) -> str:
    """How many steps (each `after − before`, `first` = the later point) an interval resolves, and which way."""
    if not steps:
        return ""
    with_interval = [step for step in steps if step.interval.has_interval]
    if not with_interval:
        return "; one seed per point, so no step has an interval and no step is called"
    better = sum(step.resolved and step.first_better for step in with_interval)
    worse = sum(step.resolved and not step.first_better for step in with_interval)
    of = f"/{len(with_interval)} steps"
    if better + worse == 0:
        return (f"; no step's paired 95% interval excludes zero (0{of}), so the trend is not "
                "established at these seeds")
    words = [f"{better}{of} resolved as better" if better else "",
             f"{worse}{of} resolved as worse" if worse else ""]
    return f"; by a paired 95% interval that excludes zero, {' and '.join(word for word in words if word)}"


def _difference(runs: pd.DataFrame, first_label: str, second_label: str, metric: str,
                lower_is_better: bool) -> stats.Difference:
    return stats.difference(stats.seed_values(runs, first_label, metric),
                            stats.seed_values(runs, second_label, metric), metric, lower_is_better)


def latent_size_findings(summary: pd.DataFrame, runs: pd.DataFrame, config_params: list[str],
                         paired: Sequence[str] = ()) -> list[str]:
    """Reconstruction against latent size, per family and setting. Params in `paired` (the keys
    of a study's `points:`, e.g. seed 000's hidden width paired with its latent size) change
    along with the latent size instead of splitting it into groups."""
    mean = f"{names.VAL_RECON} mean"
    if "model.latent_dim" not in summary or mean not in summary:
        return []
    sentences = []
    for family, settings, group in _groups(summary, config_params, "model.latent_dim", paired):
        labels = list(group["label"])
        steps = [_difference(runs, after, before, names.VAL_RECON, True) for before, after in zip(labels, labels[1:])]
        sentence = trend_sentence("Validation reconstruction (val/recon)", "latent size", list(group["_x"]),
                                  list(group[mean]), True, _group_name(family, settings), steps)
        if sentence:
            sentences.append(sentence)
    return sentences


# ----------------------------------------------------------------------------- KL weight

def kl_weight_findings(summary: pd.DataFrame, runs: pd.DataFrame, config_params: list[str]) -> list[str]:
    """Each KL weight against the smallest one, at otherwise equal settings."""
    kl, recon = f"{names.VAL_KL} mean", f"{names.VAL_RECON} mean"
    if "loss.kl_weight" not in summary or kl not in summary or recon not in summary:
        return []
    sentences = []
    for family, settings, group in _groups(summary, config_params, "loss.kl_weight"):
        if group[kl].isna().any() or not is_vae_family(str(family), True):
            continue
        base = group.iloc[0]
        for _, row in group.iloc[1:].iterrows():
            kl_change = _percent(base[kl], row[kl])
            recon_change = _percent(base[recon], row[recon])
            if kl_change is None or recon_change is None:
                continue
            kl_words = f"{'cut' if kl_change < 0 else 'raised'} KL by {abs(kl_change):.0f}%"
            recon_words = f"{'raised' if recon_change > 0 else 'lowered'} reconstruction loss by {abs(recon_change):.0f}%"
            change = _difference(runs, row["label"], base["label"], names.VAL_RECON, True)
            same_way = (change.interval.estimate > 0) == (row[recon] > base[recon])
            called = ("" if not change.interval.has_interval else
                      "; the reconstruction change is not resolved, its interval includes zero" if not change.resolved
                      else "; the reconstruction change is resolved" if same_way else
                      "; over the seeds both share, the resolved change goes the other way")
            sentences.append(
                f"{_group_name(family, settings)}: KL weight {_plain(row['_x'])} {kl_words} and "
                f"{recon_words} compared with KL weight {_plain(base['_x'])} on the validation split "
                f"(val/kl {_number(base[kl])} → {_number(row[kl])} nats, "
                f"val/recon {_number(base[recon])} → {_number(row[recon])} nats; "
                f"val/recon change {stats.evidence(change, 'the larger weight')}{called}).")
    return sentences


# ----------------------------------------------------------------------------- families

def _reported_difference(runs: pd.DataFrame, first: pd.Series, second: pd.Series, chosen_on: str,
                         lower_is_better: bool) -> str:
    """'; their test/elbo: -91.0 vs -103.2 (difference 12.2 [10.1, 14.0])', or '' without test numbers."""
    reported = names.held_out_counterpart(chosen_on)
    means = [row.get(f"{reported} mean") if reported else None for row in (first, second)]
    if any(mean is None or np.isnan(mean) for mean in means):
        return ""
    found = _difference(runs, first["label"], second["label"], reported, lower_is_better)
    return (f"; their {reported}: {_number(means[0])} vs {_number(means[1])} "
            f"(difference {stats.interval_text(found.interval)}, reported, not used to choose)")


AE_PAYS_NO_KL = (" An autoencoder pays no KL: its whole code serves reconstruction, while a VAE's val/recon is one "
                 "side of a trade-off with its rate (val/kl); VAEs are compared with each other on val/elbo.")


def family_findings(summary: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """Best configuration of each family against the next one, both chosen and compared on
    validation (ELBO among VAEs, reconstruction among all); a difference is called only where
    its seed-paired 95% interval excludes zero."""
    sentences = []
    vae_families = list(runs.loc[variational_rows(runs), "family"].unique())
    for metric, higher_better, families in (
            (names.VAL_ELBO, True, vae_families),
            (names.VAL_RECON, False, list(summary["family"].unique()))):
        column = f"{metric} mean"
        if column not in summary or len(families) < 2:
            continue
        best = {}
        for family in families:
            rows = summary[(summary["family"] == family) & summary[column].notna()]
            if len(rows):
                best[family] = rows.loc[rows[column].idxmax() if higher_better else rows[column].idxmin()]
        ranked = sorted(best, key=lambda family: best[family][column], reverse=higher_better)
        for winner, loser in zip(ranked[:-1], ranked[1:]):
            first, second = best[winner], best[loser]
            found = _difference(runs, first["label"], second["label"], metric, not higher_better)
            if found.resolved and not found.first_better:  # the seeds both share point the other way
                winner, loser, first, second = loser, winner, second, first
                found = _difference(runs, first["label"], second["label"], metric, not higher_better)
            means = (f"best configuration of each, mean over seeds: {_number(first[column])} vs "
                     f"{_number(second[column])}")
            reported = _reported_difference(runs, first, second, metric, not higher_better)
            gap = (stats.number(abs(found.interval.estimate), spread=found.interval.high - found.interval.low)
                   if found.resolved else stats.number(abs(first[column] - second[column])))
            if found.resolved:  # the gap and its interval both say by how much the winner is better
                sentences.append(f"{winner} beats {loser} on {NAMES[metric]} by {gap} nats ({means}; "
                                 f"{stats.evidence(found, winner, found.advantage)}{reported})."
                                 + (AE_PAYS_NO_KL if metric == names.VAL_RECON and winner not in vae_families
                                    and loser in vae_families else ""))
            elif not found.interval.has_interval:
                sentences.append(f"{winner} and {loser} are not told apart on {NAMES[metric]}: {means}, a gap "
                                 f"of {gap} nats ({stats.how_paired(found)}), where no interval is possible"
                                 f"{reported}.")
            else:
                sentences.append(f"{winner} and {loser} are not told apart on {NAMES[metric]}: {means}, a gap "
                                 f"of {gap} nats whose 95% interval {stats.bounds(found.advantage)} includes zero "
                                 f"({stats.support(found, winner)}); {stats.settle(found)}{reported}.")
    return sentences


def _reported_mean(row: pd.Series, chosen_on: str) -> tuple[str, float] | None:
    """(test/elbo, its mean) for a row chosen on val/elbo: what is reported for what val chose."""
    reported = names.held_out_counterpart(chosen_on)
    value = row.get(f"{reported} mean") if reported else None
    if value is None or np.isnan(value):
        return None
    return reported, value


def best_configuration_findings(summary: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    if "best" not in summary:
        return []
    sentences = []
    for _, row in summary[summary["best"]].iterrows():
        metric = row["ranked_metric"]
        reported = _reported_mean(row, metric)
        test_words = f"; reported {reported[0]} {_number(reported[1])}" if reported else ""
        chosen = stats.mean_interval(stats.seed_values(runs, row["label"], metric).values())
        value = stats.interval_text(chosen) if chosen.n else _number(row[f"{metric} mean"])
        sentences.append(f"Best {row['family']} configuration by {row['ranked_by']}, mean over seeds "
                         f"[95% interval]: {row['label']} ({metric} {value}{test_words}).")
    return sentences


# ----------------------------------------------------------------------------- baselines and diagnostics

def pca_baseline_findings(summary: pd.DataFrame) -> list[str]:
    model, pca = "eval/mse_per_pixel mean", "eval/pca_mse_per_pixel mean"
    if model not in summary or pca not in summary:
        return []
    rows = summary.dropna(subset=[model, pca])
    if rows.empty:
        return []
    beats = rows[model] < rows[pca]
    losers = rows[~beats]
    head = (f"{int(beats.sum())}/{len(rows)} configurations beat their PCA baseline "
            f"(test MSE per pixel against PCA with as many components as latent units)")
    if losers.empty:
        return [f"{head}."]
    worst = "; ".join(f"{row['label']}: {_number(row[model])} vs PCA {_number(row[pca])}"
                      for _, row in losers.head(5).iterrows())
    more = f"; and {len(losers) - 5} more" if len(losers) > 5 else ""
    return [f"{head}; these did not: {worst}{more}."]


def collapse_findings(runs: pd.DataFrame) -> list[str]:
    vaes = runs[variational_rows(runs)]
    if vaes.empty or "tags.posterior_collapse" not in vaes:
        return []
    flags = vaes["tags.posterior_collapse"].dropna()
    # decided again from the metrics where a run has them: runs logged before vae_lab defined
    # collapse as "no information" carry a tag set by an older rule
    kl, units = vaes.get("metrics.test/kl"), vaes.get("metrics.eval/active_units")
    if kl is not None and units is not None:
        known = kl.notna() & units.notna()
        flags = flags.where(~known.loc[flags.index],
                            ((kl < COLLAPSE_KL_NATS) | (units == 0)).loc[flags.index].map(str).str.lower())
    if flags.empty:
        return []
    collapsed = vaes.loc[flags[flags == "true"].index]
    if collapsed.empty:
        return [f"No posterior collapse: {len(flags)}/{len(flags)} VAE runs carry information in their "
                "latent code (a test KL of at least 0.1 nats per image and at least one active unit)."]
    listed = ", ".join(f"{row['label']} ({_active(row)})" for _, row in collapsed.head(6).iterrows())
    return [f"Posterior collapse in {len(collapsed)}/{len(flags)} VAE runs "
            f"(a test KL under 0.1 nats per image, or no active unit): {listed}."]


def _active(row: pd.Series) -> str:
    units = row.get("metrics.eval/active_units")
    latent = parse_param(row.get("params.model.latent_dim"))
    if units is None or np.isnan(units):
        return "active units not logged"
    return f"{int(units)}/{latent} units active"


def iwae_findings(runs: pd.DataFrame) -> list[str]:
    """Where eval/nll_iwae was computed, its best value; where not, why not."""
    sentences = []
    column = "metrics.eval/nll_iwae"
    computed = runs[runs[column].notna()] if column in runs else runs.iloc[0:0]
    if len(computed):
        recorded = computed.get("tags.nll_iwae", pd.Series(dtype=object)).dropna()
        how = recorded.iloc[0] if len(recorded) else "importance samples"
        values = computed[column]
        span = _number(values.iloc[0]) if len(values) == 1 else f"{_number(values.min())} to {_number(values.max())}"
        sentences.append(f"eval/nll_iwae (importance-weighted -log p(x), {how}) was computed on the test split for "
                         f"{len(computed)} run(s): {span} nats/image (the table gives it per configuration).")
    vaes = runs[variational_rows(runs) & ~runs.index.isin(computed.index)]
    if len(vaes):
        reasons = vaes.get("tags.nll_iwae", pd.Series(index=vaes.index, dtype=object)).fillna(
            "not computed: the run has no eval/nll_iwae (evaluation off or an older run)")
        for reason, group in vaes.groupby(reasons):
            sentences.append(f"eval/nll_iwae was not computed for {len(group)} VAE run(s): "
                             f"{reason.removeprefix('not computed: ')}.")
    aes = runs[~variational_rows(runs)]
    if len(aes):
        sentences.append(f"eval/nll_iwae does not apply to the {len(aes)} plain autoencoder run(s): "
                         "they define no likelihood p(x).")
    return sentences


def pareto_findings(runs: pd.DataFrame) -> list[str]:
    needed = [f"metrics.{names.VAL_KL}", f"metrics.{names.VAL_RECON}"]
    if not all(column in runs for column in needed):
        return []
    points = runs.dropna(subset=needed)
    if len(points) < 2:
        return []
    front = pareto_front(points, *needed)
    seeds = front.get("params.train.seed")
    listed = "; ".join(label if seeds is None else f"{label} [seed {seed}]"
                       for label, seed in zip(front["label"], seeds if seeds is not None else front["label"]))
    return [f"{len(front)}/{len(points)} VAE runs lie on the validation rate–distortion Pareto front "
            f"(no other run has both lower val/kl and lower val/recon): {listed}."]


FEATURE_NETS = {names.FD_CLASSIFIER: "a classifier trained on the dataset, test accuracy",
                names.FD_AUTOENCODER: "an autoencoder trained on the dataset (it has no labels), test MSE per pixel"}


def sample_quality_findings(summary: pd.DataFrame, runs: pd.DataFrame) -> list[str]:
    """How far each VAE configuration's prior samples are from the test images (eval/fd_*, lower is
    better): the lowest and the highest, and the ★ rows'; reported, never used to choose."""
    sentences = []
    for space, network in FEATURE_NETS.items():
        column = f"{space.fd} mean"
        rows = summary.dropna(subset=[column]) if column in summary else summary.iloc[0:0]
        if rows.empty:
            continue
        lowest, highest = rows.loc[rows[column].idxmin()], rows.loc[rows[column].idxmax()]
        span = (f"{lowest['label']}: {_number(lowest[column])}" if len(rows) == 1 else
                f"from {_number(lowest[column])} ({lowest['label']}) to {_number(highest[column])} ({highest['label']})")
        scores = runs.get(f"metrics.{space.quality}", pd.Series(dtype=float)).dropna()
        score = ("" if scores.empty else f" {_number(scores.iloc[0])}" if scores.nunique() == 1 else
                 f" {_number(scores.min())} to {_number(scores.max())}")
        starred = rows[rows["best"]] if "best" in rows else rows.iloc[0:0]
        stars = "".join(f"; the ★ configuration {row['label']}: {_number(row[column])}"
                        for _, row in starred.iterrows())
        sentences.append(f"Prior samples against the test images, {space.fd} (the Fréchet distance in the features "
                         f"of {network}{score}; lower is better; reported, not used to choose): {span} over "
                         f"{len(rows)} VAE configuration(s){stars}.")
    return sentences


def seed_spread_findings(summary: pd.DataFrame) -> list[str]:
    std = f"{names.VAL_RECON} std"
    if std not in summary:
        return []
    replicated = summary[summary["runs"] > 1].dropna(subset=[std])
    if replicated.empty:
        return []
    return [f"Seed-to-seed spread: over {len(replicated)} replicated configuration(s), val/recon varies "
            f"with a std of {_number(replicated[std].mean())} nats on average "
            f"(largest {_number(replicated[std].max())}); differences are called only where a seed-paired "
            "95% bootstrap interval excludes zero."]


def all_findings(summary: pd.DataFrame, finished: pd.DataFrame, config_params: list[str],
                 paired: Sequence[str] = ()) -> list[str]:
    if summary.empty:
        return ["No run finished, so there are no numbers to draw findings from."]
    return [
        *best_configuration_findings(summary, finished),
        *family_findings(summary, finished),
        *latent_size_findings(summary, finished, config_params, paired),
        *kl_weight_findings(summary, finished, config_params),
        *pareto_findings(finished),
        *sample_quality_findings(summary, finished),
        *pca_baseline_findings(summary),
        *collapse_findings(finished),
        *iwae_findings(finished),
        *seed_spread_findings(summary),
    ]
