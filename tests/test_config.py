import pytest

from vae_lab.config import ConfigError, Config, build_config, load_config, parse_yaml
from vae_lab.models.components import check


def checked(overrides):
    """A config as an entry point takes it: its values, then its components."""
    config = build_config(overrides=overrides)
    check(config)
    return config


def test_defaults_build_and_flatten_to_dotted_keys():
    config = build_config()
    flat = config.flat()
    assert flat["model.latent_dim"] == 20
    assert flat["loss.kl_weight"] == 1.0
    assert flat["data.name"] == "mnist5k"
    assert all("." in key for key in flat if key not in ("device", "threads"))


def test_yaml_reads_scientific_notation_as_numbers():
    assert parse_yaml("lr: 1e-4") == {"lr": 1e-4}
    assert parse_yaml("lr: 3E+2") == {"lr": 300.0}
    assert parse_yaml("name: e5") == {"name": "e5"}


def test_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name: conv_vae\n  latent_dim: 8\ntrain:\n  lr: 1e-4\n")
    config = load_config(path, ["model.latent_dim=16", "loss.kl_weight=0.8", "model.hidden_dims=[32,16]"])
    assert config.model.name == "conv_vae"
    assert config.model.latent_dim == 16
    assert config.train.lr == pytest.approx(1e-4)
    assert config.loss.kl_weight == 0.8
    assert config.model.hidden_dims == [32, 16]


def test_int_is_accepted_for_float_and_list_from_scalar():
    config = build_config(overrides=["loss.kl_weight=1", "model.hidden_dims=400"])
    assert isinstance(config.loss.kl_weight, float)
    assert config.model.hidden_dims == [400]


@pytest.mark.parametrize("override, words", [
    ("model.latnet_dim=3", ["model.latnet_dim", "latent_dim"]),
    ("modle.name=ae", ["modle", "model"]),
    ("model.name=transformer", ["transformer", "linear_vae", "conv_vae"]),
    ("data.name=cifar", ["cifar", "mnist5k", "fashion-mnist"]),
    ("model.latent_dim=abc", ["model.latent_dim", "integer"]),
    ("model.latent_dim=0", ["model.latent_dim", "positive"]),
    ("model.hidden_dims=[64,-1]", ["model.hidden_dims", "positive"]),
    ("loss.kl_weight=-1", ["loss.kl_weight", "zero or positive"]),
    ("train.amp=maybe", ["train.amp", "true or false"]),
    ("device=tpu", ["device", "cpu", "cuda"]),
    ("model.latent_dim", ["section.key=value"]),
    ("model.activation=tanh", ["model.activation", "relu", "gated"]),
    ("loss.gaussian_std=0", ["loss.gaussian_std", "positive"]),
    ("eval.fd_samples=0", ["eval.fd_samples", "positive"]),
    ("data.val_size=0.5.5", ["data.val_size", "number"]),
])
def test_bad_values_name_the_key_and_what_is_allowed(override, words):
    with pytest.raises(ConfigError) as error:
        checked([override])
    message = str(error.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_cube_latent_needs_a_conv_model():
    with pytest.raises(ConfigError, match="latent_layout"):
        checked(["model.latent_layout=cube", "model.name=linear_vae"])


def test_shipped_run_configs_load():
    from pathlib import Path

    files = sorted((Path(__file__).parents[1] / "experiments" / "runs").glob("*.yaml"))
    assert len(files) >= 6
    for path in files:
        config = load_config(path)
        check(config)


def test_gated_activation_is_for_mlp_models():
    with pytest.raises(ConfigError, match="model.activation='gated' is not used by model.name=conv_vae"):
        checked(["model.name=conv_vae", "model.activation=gated"])


def test_a_likelihood_is_normalized_for_gaussian_or_binary_pixels():
    assert not build_config(overrides=[]).likelihood_is_normalized  # bernoulli on grey pixels: a loss
    assert build_config(overrides=["data.binarize=dynamic"]).likelihood_is_normalized
    assert build_config(overrides=["data.binarize=static"]).likelihood_is_normalized
    assert build_config(overrides=["loss.likelihood=gaussian"]).likelihood_is_normalized
