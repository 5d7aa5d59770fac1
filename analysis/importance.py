"""The report's "Hyperparameter importance" section, from what the sweep logged on the study's
parent run when it ended: study/importances.json and Optuna's plots (vae_lab.study.summary).
Nothing is computed here; a study from before vae_lab logged them gets a line saying how to.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pandas as pd

from vae_lab.study.plots import KINDS, plot_file
from vae_lab.study.summary import ARTIFACT_DIR, IMPORTANCES_FILE

from .page import Section, Table, Text
from .plots import Figure
from .runs import Study, download_artifact

TITLE = "Hyperparameter importance"
PLOT_TITLES = {"optimization_history": "Optimization history", "pareto_front": "Pareto front",
               "param_importances": "Parameter importances", "contour": "Contour", "slice": "Slice"}
PLOT_CAPTIONS = {
    "optimization_history": "Optuna's plot: each complete trial's {metric} in trial order, and the best so far.",
    "pareto_front": "Optuna's plot: every complete trial on the validation objectives; red, the trials no other "
                    "trial beats on all of them.",
    "param_importances": "Optuna's plot of the fANOVA importances of {metric}, as in the table.",
    "contour": "Optuna's plot: {metric} interpolated over the two numeric swept params; dots are trials.",
    "slice": "Optuna's plot: {metric} of each complete trial against each swept param; colour: trial number.",
}


def importance_section(study: Study, folder: Path) -> Section:
    if not study.is_study:
        return Section(TITLE, [Text("Hyperparameter importance compares the trials of a study; "
                                    "this report is of a single run.")])
    try:
        blocks = _blocks(study, folder)
    except Exception as error:  # an unreadable artifact or a store gone away must not stop the report
        blocks = [Text(f"The study's importances could not be read: {type(error).__name__}: {error}")]
    return Section(TITLE, blocks)


def _blocks(study: Study, folder: Path) -> list:
    client, run_id = study.client, study.target_run.info.run_id
    metrics = [metric for metric, _ in study.objectives]
    listed = {Path(info.path).name for info in client.list_artifacts(run_id, ARTIFACT_DIR)}
    plots = [(kind, metric, name) for kind in KINDS for metric in [None, *metrics]
             if (name := plot_file(kind, metric)) in listed]
    if IMPORTANCES_FILE not in listed and not plots:
        return [Text(f"This study has no importances logged ({ARTIFACT_DIR}/{IMPORTANCES_FILE}): it ended before "
                     "vae_lab wrote them. Run its sweep command again (same study file and store): it trains "
                     "nothing already done and writes them, with Optuna's plots, when it ends.")]
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        blocks = _importance_blocks(client, run_id, listed, Path(scratch))
        for kind, metric, name in plots:
            local = download_artifact(client, run_id, f"{ARTIFACT_DIR}/{name}", Path(scratch))
            if local is None:
                continue
            path = folder / f"optuna_{name}"
            shutil.copyfile(local, path)
            shown = metric or (metrics[0] if len(metrics) == 1 else "the objective")
            title = PLOT_TITLES[kind] + (f" ({metric})" if metric else "")
            blocks.append(Figure(title, path, caption=PLOT_CAPTIONS[kind].format(metric=shown)))
    return blocks


def _importance_blocks(client, run_id: str, listed: set[str], scratch: Path) -> list:
    if IMPORTANCES_FILE not in listed:
        summary = download_artifact(client, run_id, f"{ARTIFACT_DIR}/summary.json", scratch)
        reason = json.loads(summary.read_text()).get("importance", {}).get("skipped") if summary else None
        return [Text(f"No importances: {reason}." if reason else "No importances were logged.")]
    local = download_artifact(client, run_id, f"{ARTIFACT_DIR}/{IMPORTANCES_FILE}", scratch)
    importances = json.loads(local.read_text())
    by_objective = importances["objectives"]
    objectives = list(by_objective)
    text = (f"How much of each objective's variation over the {importances['trials']} complete trials each swept "
            f"param explains, by {importances['evaluator']}; each column sums to 1. The objectives "
            f"({', '.join(objectives)}) are the validation metrics the study selected on: this ranks what drove "
            f"the selection, not the test score.")
    return [Text(text), Table(importance_table(by_objective, importances.get("notes", {})))]


def importance_table(by_objective: dict[str, dict[str, float]], notes: dict[str, str]) -> pd.DataFrame:
    """One row per param, one column per objective, largest importance (first objective) first."""
    table = pd.DataFrame(by_objective)
    table = table.sort_values(list(table.columns), ascending=False).round(3)
    table.insert(0, "param", table.index)
    if notes:
        table["note"] = [notes.get(param, "") for param in table["param"]]
    return table.reset_index(drop=True)
