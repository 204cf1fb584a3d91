"""Config loading: YAML + CLI overrides, and one clear error for every kind of bad value."""

import pytest

from uegr_dist.config import ConfigError, load_config, parse_overrides


def test_defaults_match_design():
    cfg = load_config()
    assert cfg.method.name == "uegr"
    assert cfg.method.dropout.k == 2
    assert (cfg.method.dropout.p_min, cfg.method.dropout.p_max) == (0.05, 0.3)
    assert (cfg.method.alpha, cfg.method.beta) == (1.0, 1.0)
    assert cfg.method.adversary.steps == 1 and cfg.method.adversary.norm == "l2"
    assert cfg.method.mask.ratio == 0.3 and cfg.method.mask.scope == "global" and cfg.method.mask.kind == "hard"
    assert cfg.method.mask.saliency == "taylor" and cfg.method.mask.exclude == []


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method:\n  dropout:\n    k: 3\n  mask:\n    exclude: [classifier]\ntrain:\n  lr: 1e-5\n")
    cfg = load_config(path, ["--method.dropout.k", "4", "--train.batch-size=8", "--method.adversary.norm", "linf"])
    assert cfg.method.dropout.k == 4  # CLI wins over the file
    assert cfg.train.lr == pytest.approx(1e-5)  # "1e-5" is a string to YAML 1.1; it is read as a number
    assert cfg.train.batch_size == 8
    assert cfg.method.adversary.norm == "linf"
    assert cfg.method.mask.exclude == ["classifier"]


def test_override_parsing_nests_and_types():
    assert parse_overrides(["--a.b.c", "3", "--a.b.d=true", "--x", "[1, 2]"]) == {
        "a": {"b": {"c": 3, "d": True}},
        "x": [1, 2],
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--method.dropout.kk", "3"], "unknown key method.dropout.kk (method.dropout allows: k, p_min"),
        (["--methd.k", "3"], "unknown key methd (top level allows: model, data, train, method)"),
        (["--method.dropout.k", "three"], "method.dropout.k = 'three': expected an integer"),
        (["--method.dropout.k", "2.5"], "method.dropout.k = 2.5: expected an integer"),
        (["--method.dropout.k", "0"], "method.dropout.k = 0: must be in [1, 8]"),
        (["--method.mask.ratio", "0"], "method.mask.ratio = 0.0: must be in (0.0, 1.0]"),
        (["--method.mask.ratio", "1.5"], "method.mask.ratio = 1.5: must be in (0.0, 1.0]"),
        (["--method.mask.scope", "layer"], "method.mask.scope = 'layer': must be one of global, per_layer, per_tensor"),
        (["--method.name", "adam"], "method.name = 'adam': must be one of uegr, vanilla, rdrop, freelb"),
        (["--train.progress", "maybe"], "train.progress = 'maybe': expected true or false"),
        (["--method.dropout.p_min", "0.4"], "method.dropout.p_min = 0.4 > method.dropout.p_max = 0.3"),
        (["--model.init", "random"], "model.architecture = None"),
        (["--method.dropout", "3"], "method.dropout = 3: expected a mapping"),
        (["--train.lr"], "override --train.lr: missing value"),
        (["lr", "3"], "override 'lr': expected --section.key value"),
    ],
)
def test_bad_values_name_key_value_and_allowed(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(listing)
