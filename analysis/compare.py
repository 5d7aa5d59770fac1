"""Two studies side by side: an ablation's two arms on one page.

    python -m analysis.compare default default_warmup                 # study names
    python -m analysis.compare PARENT_A PARENT_B --out reports/warmup_ablation
    python -m analysis.compare A B --tracking-uri http://127.0.0.1:5000

A and B are studies (parent run ids or study names) in one MLflow store. Configurations are
matched by their swept values (model family and every swept key but the seed); within a
match, runs are paired by seed where the arms share seeds. The page (index.html, one
self-contained file, plus compare.md, differences.csv and the figures) gives:
- what differs between the arms: the settings whose values are not the same in A and B;
- per matched configuration, each arm's mean with its 95% bootstrap interval and A − B with
  its seed-paired interval, P(A better) and the call, on the validation metric that compares
  them (test/* beside it, reported, not used to choose);
- per matched configuration, distortion (test/recon), rate (test/kl) and sample quality
  (eval/fd_classifier) of both arms with A − B, reported, never called;
- the learning curves of both arms overlaid, and the same test images reconstructed by both.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from vae_lab import names  # noqa: E402
from vae_lab.tracking.studies import StudyNotFound, find_study  # noqa: E402
from vae_lab.tracking.uris import resolve_tracking_uri  # noqa: E402

from . import plots, samples, stats  # noqa: E402
from .page import Bullets, Section, Table, Text, render_html, render_markdown  # noqa: E402
from .report import safe_name  # noqa: E402
from .runs import (SEED_PARAM, ReportInputError, Study, add_tracking_uri_option, display_param,  # noqa: E402
                   load_study, open_store, recent_studies)
from .tables import DIFFERENCE_COLUMNS, SAMPLE_FD, difference_cells, lower_is_better  # noqa: E402

MAX_CURVE_PANELS = 6
MAX_RECONSTRUCTED = 6
# settings that say how a run was executed or tracked, not what was trained
NOT_AN_ABLATION = ("tracking.", "train.progress", "train.checkpoint_every", "device")


@dataclass
class Match:
    """One configuration present in both arms."""

    name: str  # the swept values, as the page shows them
    label_a: str  # the configuration's label in study A's runs
    label_b: str
    family: str


def resolve_studies(client: MlflowClient, given: list[str]) -> tuple[str, str]:
    """The two parent run ids; an unknown or ambiguous study, or the same study twice, raise
    ReportInputError with one line (an unknown one lists the studies there are)."""
    parents = []
    for study in given:
        try:
            parents.append(find_study(client, study).info.run_id)
        except StudyNotFound as error:
            raise ReportInputError(f"{error}; studies in this store: "
                                   f"{', '.join(recent_studies(client, limit=20)) or 'none'}") from None
    if parents[0] == parents[1]:
        raise ReportInputError(f"{given[0]!r} and {given[1]!r} are the same study (parent run {parents[0]}); "
                               "compare two different studies")
    return parents[0], parents[1]


def _key(row: pd.Series, keys: list[str]) -> tuple:
    return (row["family"], *(display_param(row.get(f"params.{key}")) for key in keys))


def match_configurations(a: Study, b: Study) -> tuple[list[Match], list[str], list[str]]:
    """Configurations matched by family and swept values (all keys either arm sweeps, but the
    seed); and the labels found only in A, only in B."""
    keys = sorted(set(a.config_params) | set(b.config_params))
    by_key_a = {_key(row, keys): row["label"] for _, row in a.finished.drop_duplicates("label").iterrows()}
    by_key_b = {_key(row, keys): row["label"] for _, row in b.finished.drop_duplicates("label").iterrows()}
    matches = []
    for key, label_a in by_key_a.items():
        if key in by_key_b:
            shown = ", ".join([key[0], *(f"{name.split('.')[-1]}={value}" for name, value in zip(keys, key[1:])
                                         if name != "model.name")])
            matches.append(Match(shown, label_a, by_key_b[key], key[0]))
    only_a = [label for key, label in by_key_a.items() if key not in by_key_b]
    only_b = [label for key, label in by_key_b.items() if key not in by_key_a]
    return matches, only_a, only_b


def arm_settings(a: Study, b: Study) -> pd.DataFrame:
    """The settings (params) whose values differ between the arms' finished runs: the ablation."""
    swept = set(a.swept) | set(b.swept)
    columns = sorted({column for study in (a, b) for column in study.finished.columns if column.startswith("params.")})
    rows = []
    for column in columns:
        key = column[len("params."):]
        if key in swept or key == SEED_PARAM or key.startswith(NOT_AN_ABLATION):
            continue
        values = [sorted(study.finished[column].dropna().map(display_param).unique()) if column in study.finished
                  else [] for study in (a, b)]
        if values[0] != values[1]:
            rows.append({"setting": key, "A": ", ".join(values[0]) or "(not set)",
                         "B": ", ".join(values[1]) or "(not set)"})
    return pd.DataFrame(rows, columns=["setting", "A", "B"])


def _comparison_metric(a: Study, b: Study, match: Match) -> str | None:
    """val/elbo where both arms have it, else val/recon+kl (VAEs without an ELBO), else val/recon."""
    for metric in (names.VAL_ELBO, names.VAL_RECON_PLUS_KL, names.VAL_RECON):
        if stats.seed_values(a.finished, match.label_a, metric) and stats.seed_values(b.finished, match.label_b, metric):
            return metric
    return None


def difference_rows(a: Study, b: Study, matches: list[Match]) -> tuple[pd.DataFrame, list[stats.Difference]]:
    """One row per matched configuration and metric (the comparing val/* metric, and val/recon where
    that is another), with each arm's interval, A − B paired by seed, and test/* beside it; and
    each row's difference."""
    rows, decided = [], []
    for match in matches:
        metric = _comparison_metric(a, b, match)
        if metric is None:
            continue
        for shown in dict.fromkeys([metric, names.VAL_RECON]):
            values_a = stats.seed_values(a.finished, match.label_a, shown)
            values_b = stats.seed_values(b.finished, match.label_b, shown)
            if not values_a or not values_b:
                continue
            cells, found = difference_cells(a.finished, match.label_a, b.finished, match.label_b, shown)
            decided.append(found)
            rows.append({"configuration": match.name, "metric": shown,
                         "A [95% interval]": stats.interval_text(stats.mean_interval(values_a.values())),
                         "B [95% interval]": stats.interval_text(stats.mean_interval(values_b.values())),
                         **cells})
    columns = ["configuration", "metric", DIFFERENCE_COLUMNS[0], "A [95% interval]", "B [95% interval]",
               *DIFFERENCE_COLUMNS[1:]]
    return pd.DataFrame(rows, columns=columns), decided


TRADE_OFF = (names.TEST_RECON, names.TEST_KL, *SAMPLE_FD)  # distortion, rate, sample quality


def trade_off_rows(a: Study, b: Study, matches: list[Match]) -> pd.DataFrame:
    """Each matched configuration's distortion, rate and sample quality (`TRADE_OFF`, the ones both
    arms logged) on the test split: each arm's mean with its interval and A − B, paired by seed.
    Reported beside the decisions, so no call."""
    rows = []
    for match in matches:
        for metric in TRADE_OFF:
            values_a = stats.seed_values(a.finished, match.label_a, metric)
            values_b = stats.seed_values(b.finished, match.label_b, metric)
            if not values_a or not values_b:
                continue
            found = stats.difference(values_a, values_b, metric, lower_is_better(metric))
            rows.append({"configuration": match.name, "metric": metric,
                         "A [95% interval]": stats.interval_text(stats.mean_interval(values_a.values())),
                         "B [95% interval]": stats.interval_text(stats.mean_interval(values_b.values())),
                         "A − B [95% interval]": stats.interval_text(found.interval), "seeds": stats.how_paired(found)})
    return pd.DataFrame(rows, columns=["configuration", "metric", "A [95% interval]", "B [95% interval]",
                                       "A − B [95% interval]", "seeds"])


def summary_sentences(decided: list[stats.Difference], matches: list[Match], only_a: list[str],
                      only_b: list[str]) -> list[str]:
    if not matches:
        return ["No configuration is in both studies: nothing can be set side by side (see the lists below)."]
    sentences = [f"{len(matches)} configuration(s) are in both studies; each is compared on its validation metric "
                 "(val/elbo where both arms have it, else val/recon+kl, else val/recon), paired by seed, and on "
                 "val/recon beside it."]
    by_metric: dict[str, list[stats.Difference]] = {}
    for found in decided:  # the table's rows, counted as its "call" column calls them
        if found.interval.has_interval:
            by_metric.setdefault(found.metric, []).append(found)
    if not by_metric:
        sentences.append("Every match has one seed per arm (or no shared seed and one seed on a side): no interval "
                         "is possible, so no difference is called. Run more seeds in both studies.")
    for metric, with_interval in by_metric.items():
        a_better = sum(found.resolved and found.first_better for found in with_interval)
        b_better = sum(found.resolved and not found.first_better for found in with_interval)
        sentences.append(f"On {metric}: A is better in {a_better}, B in {b_better}, and "
                         f"{len(with_interval) - a_better - b_better} are not resolved (the 95% interval includes "
                         f"zero), out of {len(with_interval)} with an interval.")
    if only_a or only_b:
        sentences.append(f"Not matched: {len(only_a)} configuration(s) only in A, {len(only_b)} only in B.")
    return sentences


def overlaid_curves(a: Study, b: Study, matches: list[Match], path: Path) -> plots.Figure:
    """val/loss by epoch of each matched configuration, A solid and B dashed, one line per seed."""
    title = "Learning curves, A (solid) against B (dashed)"
    shown = matches[:MAX_CURVE_PANELS]
    if not shown:
        return plots.Figure(title, skipped="no configuration is in both studies")
    curves = []
    for arm, study, labels in (("A", a, [m.label_a for m in shown]), ("B", b, [m.label_b for m in shown])):
        runs = study.finished[study.finished["label"].isin(labels)]
        histories = plots.learning_histories(study.client, runs)
        curves.append(histories[histories["curve"] == plots.EPOCH_CURVE].assign(arm=arm))
    histories = pd.concat(curves, ignore_index=True)
    if histories.empty:
        return plots.Figure(title, skipped=f"no matched run logged {names.VAL_LOSS} by epoch")
    columns = min(3, len(shown))
    rows = int(np.ceil(len(shown) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.6 * rows), squeeze=False)
    for ax, match in zip(axes.flat, shown):
        for arm, label, style in (("A", match.label_a, "-"), ("B", match.label_b, "--")):
            arm_curves = histories[(histories["arm"] == arm) & (histories["label"] == label)]
            for index, (_, run) in enumerate(arm_curves.groupby("run_id")):
                ax.plot(run["x"], run["value"], style, color="C0" if arm == "A" else "C3", linewidth=1.2,
                        label=arm if index == 0 else None)
        ax.set_title(match.name, fontsize=9)
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"{names.VAL_LOSS} (nats per image)")
        ax.legend(fontsize=8, frameon=False)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    figure.tight_layout()
    figure.savefig(path, dpi=plots.DPI, bbox_inches="tight")
    plt.close(figure)
    more = f" The first {MAX_CURVE_PANELS} of {len(matches)} matches are drawn." if len(matches) > len(shown) else ""
    return plots.Figure(title, path, caption="One line per seed; val/loss on the validation split at the end of "
                                             f"each epoch.{more}")


def _run_of(study: Study, label: str, seed: str | None) -> pd.DataFrame:
    """The configuration's run at `seed`, or its lowest seed's."""
    runs = study.finished[study.finished["label"] == label]
    if seed is not None:
        runs = runs[runs[f"params.{SEED_PARAM}"].astype(str) == seed]
    return samples.one_run_per_configuration(runs)


def _shared_seed(a: Study, b: Study, match: Match) -> str | None:
    seeds = [set(study.finished.loc[study.finished["label"] == label, f"params.{SEED_PARAM}"].dropna().astype(str))
             if f"params.{SEED_PARAM}" in study.finished else set()
             for study, label in ((a, match.label_a), (b, match.label_b))]
    shared = seeds[0] & seeds[1]
    return min(shared, key=lambda seed: (len(seed), seed)) if shared else None


def reconstructions(a: Study, b: Study, matches: list[Match], folder: Path) -> tuple[list, list[str]]:
    """The same test images through A's and B's model of each match, at a seed both ran where there is one."""
    shown = matches[:MAX_RECONSTRUCTED]
    if not shown:
        return [plots.Figure("Reconstructions", skipped="no configuration is in both studies")], []
    runs = []
    for match in shown:
        seed = _shared_seed(a, b, match)
        for arm, study, label in (("A", a, match.label_a), ("B", b, match.label_b)):
            runs.append(_run_of(study, label, seed).assign(label=f"{arm}: {match.name}"))
    models, missing = samples.load_models(pd.concat(runs, ignore_index=True), a.tracking_uri)
    if not models:
        return [plots.Figure("Reconstructions", skipped="no logged model could be loaded")], missing
    figures, data_missing = samples.reconstructions(models, folder)
    return figures, missing + data_missing


def _arm_line(arm: str, study: Study) -> str:
    tags = study.target_run.data.tags
    return (f"{arm} = study {study.name!r}: parent run {study.target_run.info.run_id} "
            f"({study.target_run.info.status}), experiment {study.experiment_name}, "
            f"{len(study.finished)} finished runs, swept: {', '.join(study.swept) or 'nothing'}, "
            f"sampler {tags.get('vae_lab.sampler', 'not recorded')}")


def build_comparison(a: Study, b: Study, folder: Path) -> Path:
    """Write the page into `folder`; return index.html."""
    folder.mkdir(parents=True, exist_ok=True)
    matches, only_a, only_b = match_configurations(a, b)
    settings = arm_settings(a, b)
    differences, decided = difference_rows(a, b, matches)
    differences.to_csv(folder / "differences.csv", index=False)
    arms = [Bullets([_arm_line("A", a), _arm_line("B", b)])]
    arms += ([Text("Settings that differ between the arms (what the ablation changes):"), Table(settings)]
             if len(settings) else [Text("No setting differs between the arms' finished runs, apart from what "
                                         "they sweep.")])
    trade_off = trade_off_rows(a, b, matches)
    unmatched = [f"only in A: {label}" for label in only_a] + [f"only in B: {label}" for label in only_b]
    figures, missing = reconstructions(a, b, matches, folder)
    sections = [
        Section("The two arms", arms),
        Section("Findings", [Text("Decided on the validation split; test/* is reported beside it, never used to "
                                  f"choose. Intervals: {stats.METHOD}."),
                             Bullets(summary_sentences(decided, matches, only_a, only_b))]),
        Section("Matched configurations",
                [Table(differences) if len(differences) else Text("No configuration is in both studies."),
                 *([Text("Configurations without a counterpart:"), Bullets(unmatched)] if unmatched else [])]),
        Section("Rate, distortion and sample quality", [
            Text("On the test split, reported and never used to decide: distortion (test/recon) and rate (test/kl) "
                 "in nats per image, and eval/fd_classifier, the Fréchet distance between the model's prior samples "
                 "and the test images in the features of a classifier trained on the dataset (eval/fd_autoencoder "
                 "where the data has no labels); lower is better for each. A − B is paired by seed where the arms "
                 "share seeds."),
            Table(trade_off) if len(trade_off) else Text("No matched configuration logged these metrics in both arms.")]),
        Section("Learning curves", [overlaid_curves(a, b, matches, folder / "learning_curves.png")]),
        Section("The same test images through both",
                [*figures, *([Text("Missing from these figures:"), Bullets(missing)] if missing else [])]),
    ]
    title = f"vae_lab comparison: {a.name} (A) against {b.name} (B)"
    (folder / "compare.md").write_text(render_markdown(title, sections, folder), encoding="utf-8")
    (folder / "index.html").write_text(render_html(title, sections), encoding="utf-8")
    return folder / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.compare",
        description="Set two studies (an ablation's two arms) side by side on one page.")
    parser.add_argument("studies", nargs="*", metavar="STUDY", help="two parent run ids or study names: A B")
    parser.add_argument("--out", help="output folder (default: reports/compare_<A>_vs_<B>)")
    add_tracking_uri_option(parser)
    args = parser.parse_args(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        if len(args.studies) != 2:
            raise ReportInputError(f"compare takes exactly two studies (parent run ids or study names), got "
                                   f"{len(args.studies)}" + (f": {' '.join(args.studies)}" if args.studies else ""))
        client = open_store(tracking_uri)
        first, second = resolve_studies(client, args.studies)
        a, b = load_study(tracking_uri, first), load_study(tracking_uri, second)
    except ReportInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = Path(args.out) if args.out else Path("reports") / safe_name(f"compare_{a.name}_vs_{b.name}")
    index = build_comparison(a, b, folder)
    print(f"comparison: {index}")
    print(f"  also {folder / 'compare.md'}, {folder / 'differences.csv'} and the figures as PNG")
    return 0


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
