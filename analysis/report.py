"""A comparison report for a study (or one run), read back from MLflow.

    python -m analysis.report --experiment vae_lab             # the newest study of that experiment
    python -m analysis.report --run PARENT_RUN_ID --out reports/mystudy
    python -m analysis.report --run RUN_ID --tracking-uri http://127.0.0.1:5000

Writes `reports/<study name>/` — index.html (one self-contained page), report.md, runs.csv
and every figure as PNG — and logs that folder to the study's parent run as `report/`.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from pathlib import Path

import pandas as pd

from vae_lab import names
from vae_lab.tracking.uris import redact, resolve_tracking_uri

from . import findings, importance, latents, plots, samples, stats
from .page import Bullets, Code, Section, Table, Text, render_html, render_markdown
from .runs import (ReportInputError, Study, add_tracking_uri_option, load_study, newest_parent_of, newest_study_id,
                   open_store, paired_params, read_text_artifact)
from .tables import (ALL_PAIRS_UP_TO, configuration_summary, difference_table, display_table, interval_table, mark_best,
                     metric_names, table_metrics)

REPORT_ARTIFACT_DIR = "report"
KEY_PARAMS = ["model.name", "model.latent_dim", "loss.kl_weight", "train.seed", "train.epochs", "data.name"]
SELECTION_RULE = ("Selection used the validation split: every ★, best configuration, comparison and trend below "
                  "is decided on val/*; test/* and eval/* numbers are reported for what validation selected, "
                  "never used to choose.")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "report"


def _datasets(runs: pd.DataFrame) -> str:
    """Each dataset the runs trained on: its name, the file or folder, the first digits of its digest."""
    described = []
    for name, group in runs.groupby(runs.get("tags.dataset", pd.Series("", index=runs.index)).fillna(""), sort=False):
        if not name:
            continue
        details = []
        for column, width in ((f"tags.{names.DATA_SOURCE_TAG}", None), (f"tags.{names.DATA_DIGEST_TAG}", 12)):
            values = group[column].dropna().unique() if column in group else []
            details.extend(f"{'digest ' if width else ''}{value[:width] if width else value}" for value in values)
        described.append(f"{name} ({', '.join(details)})" if details else name)
    return "; ".join(described)


def _seconds(total: float) -> str:
    minutes, seconds = divmod(int(round(total)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"


def runs_table(study: Study) -> pd.DataFrame:
    """runs.csv: one row per run with its status, swept and key params, duration and every metric."""
    runs = study.runs
    table = pd.DataFrame({
        "run_id": runs["run_id"],
        "run_name": runs.get("tags.mlflow.runName"),
        "status": runs["status"],
        "trial_number": runs.get("tags.vae_lab.trial_number"),
        "family": runs["family"],
        "configuration": runs["label"],
    })
    for key in dict.fromkeys([*study.swept, *KEY_PARAMS]):
        if f"params.{key}" in runs:
            table[key] = runs[f"params.{key}"]
    table["seconds"] = runs["seconds"].round(2)
    table["failure_reason"] = runs.get("tags.failure_reason")
    for column in sorted(column for column in runs.columns if column.startswith("metrics.")):
        table[column[len("metrics."):]] = runs[column]
    return table


# ----------------------------------------------------------------------------- sections

def _reason(run: pd.Series) -> str:
    reason = run.get("tags.failure_reason")
    if not isinstance(reason, str) or not reason.strip():
        return "no reason recorded"
    return reason.strip().rstrip(":")  # "TrialPruned: " carries no message

def what_was_run(study: Study) -> Section:
    runs, target = study.runs, study.target_run
    counts = runs["status"].value_counts()
    items = [f"Experiment: {study.experiment_name}; tracking URI: {redact(study.tracking_uri)}"]
    if study.is_study:
        tags = target.data.tags
        items.append(f"Study {study.name!r}: parent run {target.info.run_id} ({target.info.status}), "
                     f"sampler {tags.get('vae_lab.sampler', 'not recorded')}")
        nothing_swept = "none (every run has the same config)" if len(runs) else "none (no trials yet)"
        items.append("Swept parameters: " + (", ".join(study.swept) or nothing_swept)
                     + ("" if tags.get(names.SWEPT_PARAMS_TAG) else " (found as the params that differ; "
                        "the parent has no vae_lab.swept_params tag)"))
        if study.objectives:
            items.append("Objectives: " + ", ".join(f"{metric} ({direction})" for metric, direction in study.objectives)
                         + ("" if all(names.is_selectable(metric) for metric, _ in study.objectives) else
                            "; objectives on test/* or eval/* do not choose here: the ★ rows rank on val/*"))
    else:
        items.append(f"A single run: {target.info.run_id} ({target.info.run_name}, {target.info.status})")
    items.append(f"Runs: {len(runs)} — finished {counts.get('FINISHED', 0)}, failed {counts.get('FAILED', 0)}, "
                 f"pruned or interrupted (KILLED) {counts.get('KILLED', 0)}, still running {counts.get('RUNNING', 0)}")
    if len(runs):
        items.append(f"Total compute time (sum over runs): {_seconds(runs['seconds'].fillna(0).sum())}")
        devices = runs.get("tags.device", pd.Series(index=runs.index, dtype=object))
        if "tags.device_name" in runs:  # the GPU's name where there is one
            devices = runs["tags.device_name"].fillna(devices)
        listed = ", ".join(f"{name} ({count} runs)" for name, count in devices.dropna().value_counts().items())
        items.append(f"Device: {listed or 'not recorded'}")
        items.append(f"Dataset: {_datasets(runs) or 'not recorded'}")
    blocks = [Bullets(items)]
    problems = [f"{row['status']}: {row['label']} ({row['run_id'][:8]}): {_reason(row)}"
                for _, row in runs[runs["status"].isin(["FAILED", "KILLED"])].iterrows()]
    if problems:
        blocks += [Text("Runs that did not finish (left out of the table and plots below; their learning "
                        "curves are kept):"), Bullets(problems)]
    return Section("What was run", blocks)


def file_section(study: Study) -> Section:
    """The study file (or a single run's config), folded: the last thing a reader needs."""
    if study.study_yaml:
        return Section("The study file", [Code(study.study_yaml, "yaml", folded="the parent's study/study.yaml "
                                               f"({len(study.study_yaml.splitlines())} lines)")])
    if study.is_study:
        return Section("The study file", [Text("The parent run has no study/study.yaml artifact.")])
    config = read_text_artifact(study.client, study.target_run.info.run_id, "config.yaml")
    return Section("The run's config", [Code(config, "yaml", folded=f"config.yaml ({len(config.splitlines())} lines)")]
                   if config else [Text("The run has no config.yaml artifact.")])


def comparison_section(study: Study, summary: pd.DataFrame, metrics: list[str]) -> Section:
    if summary.empty:
        return Section("Comparison", [Text("No run finished: there is nothing to compare.")])
    rankings = "; ".join(f"{family}: {group['ranked_by'].iloc[0]}" for family, group in summary.groupby("family")
                         if group["ranked_by"].iloc[0])
    replicated = (summary["runs"] > 1).any()
    stars = (f"★ = the best configuration of each model family on validation, by the mean over its seeds of "
             f"{rankings}" if rankings else
             "No ★: no finished run logged val/* (runs from before the validation split), and test/* never chooses")
    if len(study.objectives) > 1 and rankings:
        objectives = " and ".join(metric for metric, _ in study.objectives)
        stars += (f" (this study has {len(study.objectives)} objectives, {objectives}, and no single best: "
                  "among VAEs the ★ is the configuration whose sum val/recon + val/kl is lowest, i.e. the best "
                  "ELBO, which is one point of the front of those two; the rate–distortion plot shows the whole front)")
    text = ("One row per configuration" + (" (mean ± std over seeds)" if replicated else "") +
            f"; losses in nats per image. {stars}. The test/* and eval/* columns are reported, not used to choose.")
    shown = table_metrics(summary, metrics)
    return Section("Comparison", [Text(text), Table(display_table(summary, study.config_params, shown), "")])


def intervals_section(summary: pd.DataFrame, finished: pd.DataFrame) -> Section:
    title = "Intervals and paired differences"
    if summary.empty:
        return Section(title, [Text("No run finished: there is nothing to compare.")])
    blocks = [Text(f"Each configuration's mean over its seeds with a {stats.METHOD}; with one seed no interval "
                   "is possible. With very few seeds these intervals are optimistic (three seeds admit ten "
                   "distinct resamples)."),
              Table(interval_table(summary, finished), "")]
    if len(summary) < 2:
        return Section(title, blocks)
    if summary["runs"].max() < 2:
        return Section(title, blocks + [Text(
            "Every configuration ran one seed, so no difference between two of them has an interval and none is "
            "called; add `seeds: [0, 1, 2]` under the study file's `search_space` to replicate them.")])
    differences = difference_table(summary, finished)
    if differences.empty:
        return Section(title, blocks + [Text("No two configurations share a validation metric to compare.")])
    scope = ("every pair of configurations" if len(summary) <= ALL_PAIRS_UP_TO else
             "each configuration against its family's ★ row, and the ★ rows against each other")
    blocks += [Text(f"Differences A − B for {scope}, on the validation metric that compares them, paired by "
                    "train.seed where the two share seeds (the seed's luck cancels) and unpaired otherwise. "
                    "P(A better) is the share of bootstrap resamples in which A's mean is better. A difference is "
                    "called only when its 95% interval excludes zero; otherwise the call says how many seeds "
                    "would settle it at the observed spread (Student's t). The test/* column is reported, "
                    "not used to choose."),
               Table(differences)]
    return Section(title, blocks)


def heatmap_metric(study: Study) -> str:
    """What the heatmaps show: the study's first objective when it may select (val/*), else val/recon."""
    objective = study.objectives[0][0] if study.objectives else names.VAL_RECON
    if names.is_selectable(objective) and f"metrics.{objective}" in study.finished:
        return objective
    return names.VAL_RECON


def plot_section(study: Study, folder: Path) -> Section:
    finished = study.finished
    histories = plots.learning_histories(study.client, study.runs)
    figures = [plots.learning_curves(histories, folder / "learning_curves.png"),
               plots.rate_distortion(finished, folder / "rate_distortion.png"),
               plots.metric_vs_latent(finished, study.config_params, folder / "metric_vs_latent.png")]
    numeric = plots.numeric_swept(finished, study.config_params)
    metric = heatmap_metric(study)
    pairs = list(itertools.combinations(numeric, 2))[:3]
    if pairs:
        figures += [plots.heatmap(finished, study.config_params, metric, folder / f"heatmap_{index}.png", pair)
                    for index, pair in enumerate(pairs)]
    else:
        figures.append(plots.heatmap(finished, study.config_params, metric, folder / "heatmap_0.png"))
    return Section("Plots", figures)


def latents_section(study: Study, folder: Path) -> Section:
    finished = study.finished
    note = []
    if len(finished) > latents.MAX_MAPS:
        finished = samples.one_run_per_configuration(finished)
        note.append(f"More than {latents.MAX_MAPS} runs: one map per configuration (its lowest seed).")
    if len(finished) > latents.MAX_MAPS:
        note.append(f"Only the first {latents.MAX_MAPS} of {len(finished)} configurations are mapped.")
        finished = finished.head(latents.MAX_MAPS)
    found, missing = latents.load_latents(study.client, finished)
    blocks = [Text(line) for line in note]
    blocks.append(latents.latent_maps(found, folder / "latents.png"))
    if missing:
        blocks += [Text("Runs without test latents (no latents/test_latents.parquet artifact):"), Bullets(missing)]
    evolving = samples.one_run_per_configuration(study.finished).head(latents.MAX_MAPS)
    blocks += latents.evolution_figures(study.client, evolving, folder)
    return Section("Latents", blocks)


def models_section(study: Study, folder: Path) -> Section:
    chosen = samples.one_run_per_configuration(study.finished)
    blocks = []
    if len(chosen) > samples.MAX_MODELS:
        blocks.append(Text(f"{len(chosen)} configurations: only the first {samples.MAX_MODELS} are shown."))
        chosen = chosen.head(samples.MAX_MODELS)
    if len(chosen) < len(study.finished):
        blocks.append(Text("One model per configuration: the run with the lowest seed."))
    models, missing = samples.load_models(chosen, study.tracking_uri)
    if models:
        figures, data_missing = samples.reconstructions(models, folder)
        blocks += figures
        missing += data_missing
    else:
        blocks.append(plots.Figure("Reconstructions", skipped="no logged model could be loaded"))
    blocks.append(samples.prior_samples(models, folder / "prior_samples.png"))
    if missing:
        blocks += [Text("Missing from these figures:"), Bullets(missing)]
    return Section("Models side by side", blocks)


# ----------------------------------------------------------------------------- the report

def build_report(study: Study, folder: Path, log_to_mlflow: bool = True) -> Path:
    """Write the report into `folder`, log it to the study's run as `report/`, return index.html."""
    folder.mkdir(parents=True, exist_ok=True)
    finished = study.finished
    metrics = metric_names(finished)
    summary = mark_best(configuration_summary(finished, study.config_params, metrics), study.objectives)
    written = [folder / "runs.csv"]
    runs_table(study).to_csv(written[0], index=False)

    sections = [Section("Findings", [Text(SELECTION_RULE),
                                     Bullets(findings.all_findings(summary, finished, study.config_params,
                                                                   paired_params(study.study_yaml)))]),
                what_was_run(study),
                comparison_section(study, summary, metrics),
                intervals_section(summary, finished),
                importance.importance_section(study, folder),
                plot_section(study, folder),
                latents_section(study, folder),
                models_section(study, folder),
                file_section(study)]
    title = f"vae_lab report: {study.name}" + ("" if study.is_study else " (single run)")
    for section in sections:
        written += [block.path for block in section.blocks if isinstance(block, plots.Figure) and block.path]
    (folder / "report.md").write_text(render_markdown(title, sections, folder), encoding="utf-8")
    (folder / "index.html").write_text(render_html(title, sections), encoding="utf-8")
    written += [folder / "report.md", folder / "index.html"]
    if log_to_mlflow:
        client = study.client
        for path in written:  # only this report's files, not whatever else the folder holds
            client.log_artifact(study.target_run.info.run_id, str(path), REPORT_ARTIFACT_DIR)
    return folder / "index.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report",
        description="Write an HTML/Markdown comparison report for a study (or one run) from MLflow.")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--experiment", help="report the newest study (parent run) of this MLflow experiment")
    target.add_argument("--run", help="a study's parent run id, or any single run id")
    target.add_argument("--study", help="a study's name (its newest parent run: what `make sweep` reports)")
    parser.add_argument("--out", help="output folder (default: reports/<study name>)")
    add_tracking_uri_option(parser)
    args = parser.parse_args(argv)
    tracking_uri = resolve_tracking_uri(args.tracking_uri)
    try:
        client = open_store(tracking_uri)
        if args.study:
            run_id = newest_parent_of(client, args.study)
        else:
            run_id = args.run or newest_study_id(client, args.experiment)
        study = load_study(tracking_uri, run_id)
    except ReportInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    folder = Path(args.out) if args.out else Path("reports") / safe_name(study.name)
    index = build_report(study, folder)
    print(f"report: {index}")
    print(f"  also {folder / 'report.md'}, {folder / 'runs.csv'} and the figures as PNG")
    print(f"  logged to run {study.target_run.info.run_id} as artifact {REPORT_ARTIFACT_DIR}/")
    return 0


if __name__ == "__main__":
    from vae_lab.cli import exit_now

    exit_now(main())
