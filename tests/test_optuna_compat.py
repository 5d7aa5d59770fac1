"""The Optuna internals vae_lab relies on (vae_lab/study/storage.py), against the real Optuna, on
each storage kind it uses: a release that changes one fails here, by name."""

import optuna
import pytest
from optuna.trial import TrialState

from vae_lab.study import storage as store


@pytest.fixture(params=["journal", "sqlite"])
def storage_url(request, tmp_path) -> str:
    return f"journal:///{tmp_path / 'optuna.journal'}" if request.param == "journal" \
        else f"sqlite:///{tmp_path / 'optuna.db'}"


def test_a_waiting_trial_is_claimed_once_and_its_handle_reports_into_it(storage_url):
    storage = store.open_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name="compat")
    for x in (1.0, 2.0, 3.0):
        study.enqueue_trial(params={"x": x}, user_attrs={"tag": f"x{x:g}"})
    claimed_ids = []

    trial = store.pop_waiting_trial(study, storage, wanted=lambda waiting: waiting.user_attrs["tag"] == "x2",
                                    on_claim=claimed_ids.append)
    assert isinstance(trial, optuna.Trial) and trial.number == 1
    assert claimed_ids == [store.trial_id(storage, study, 1)]
    # the handle is the trial itself: its enqueued value, its reports and its end land in the storage
    assert trial.suggest_float("x", 0.0, 5.0) == 2.0
    trial.report(0.5, step=1)
    study.tell(trial, 0.25)
    frozen = study.get_trials()[1]
    assert frozen.state == TrialState.COMPLETE and frozen.value == 0.25 and frozen.intermediate_values == {1: 0.5}

    # a second claim never takes a trial that is no longer WAITING
    assert store.pop_waiting_trial(study, storage, wanted=lambda waiting: waiting.user_attrs["tag"] == "x2") is None
    others = [store.pop_waiting_trial(study, storage) for _ in range(3)]
    assert [other.number for other in others[:2]] == [0, 2] and others[2] is None
    assert {t.state for t in study.get_trials()} == {TrialState.COMPLETE, TrialState.RUNNING}


def test_moving_a_trial_to_running_succeeds_for_one_caller_only(storage_url):
    """What makes a claim atomic across processes: the storage's WAITING -> RUNNING update."""
    storage = store.open_storage(storage_url)
    study = optuna.create_study(storage=storage, study_name="atomic")
    study.enqueue_trial(params={"x": 1.0})
    trial_id = store.trial_id(storage, study, 0)
    assert storage.set_trial_state_values(trial_id, state=TrialState.RUNNING) is True
    assert storage.set_trial_state_values(trial_id, state=TrialState.RUNNING) is False


def test_the_patient_storage_stands_in_for_every_storage_method_and_keeps_optunas_cache(tmp_path):
    """PatientStorage delegates each public BaseStorage method by name: a method a new Optuna
    adds would otherwise fall through to BaseStorage's own (NotImplementedError) unnoticed."""
    import inspect

    from vae_lab.study.patient_storage import PatientStorage

    public = {name for name, _ in inspect.getmembers(optuna.storages.BaseStorage, inspect.isfunction)
              if not name.startswith("_")}
    missing = sorted(name for name in public if name not in vars(PatientStorage))
    assert not missing, f"PatientStorage does not delegate {missing}"

    rdb = store.open_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert isinstance(rdb, PatientStorage)
    # the wrapper Optuna puts around an RDBStorage it is handed (its private _CachedStorage)
    assert isinstance(rdb.inner, optuna.storages._CachedStorage)
    study = optuna.create_study(storage=rdb, study_name="cached")
    study.enqueue_trial(params={"x": 1.0})
    assert [trial.state for trial in study.get_trials()] == [TrialState.WAITING]


def test_the_storage_proxy_serves_optunas_servicer_and_a_restarted_one_takes_a_claimed_trials_params(tmp_path):
    """`storage.serve_storage` builds Optuna's gRPC proxy from its private servicer and generated
    stub (`optuna.storages._grpc`); `proxied_storage` re-reads the trials (`FrozenStudy._study_id`)
    when Optuna's cache refuses the parameters of a trial it has not read, as after a restart."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"  # SQLite: the command refuses it, the parts serve it
    server, port = store.serve_storage(url, "127.0.0.1", 0)
    try:
        storage = store.open_storage(f"grpc://127.0.0.1:{port}")
        study = optuna.create_study(storage=storage, study_name="proxied")
        study.enqueue_trial(params={"x": 1.0})
        trial = store.pop_waiting_trial(study, storage)
        server.stop(grace=None).wait()
        server, _ = store.serve_storage(url, "127.0.0.1", port)  # a new proxy: its cache is empty
        assert trial.suggest_float("x", 0.0, 5.0) == 1.0
        study.tell(trial, 0.5)
        assert [(t.state, t.params) for t in study.get_trials()] == [(TrialState.COMPLETE, {"x": 1.0})]
    finally:
        server.stop(grace=None).wait()

    # what the re-read is for: Optuna's cache still refuses a trial it has not read
    fresh = store.cached(optuna.storages.RDBStorage(url))
    other = optuna.create_study(storage=url, study_name="unread")
    other.enqueue_trial(params={"x": 2.0})
    unread_id = store.trial_id(fresh, other, 0)
    distribution = optuna.distributions.FloatDistribution(0.0, 5.0)
    with pytest.raises(KeyError):
        fresh.set_trial_param(unread_id, "x", 2.0, distribution)
    store.proxied_storage(url).set_trial_param(unread_id, "x", 2.0, distribution)
