"""Stage configs: TOML + CLI precedence and error messages that name key, value and what is allowed."""

import tomllib
from pathlib import Path

import pytest

from fedslide.deploy.cli import main
from fedslide.common.config.base import ConfigError, load_config
from fedslide.common.config.preprocess import PreprocessConfig, TilingConfig


def test_defaults_nest_four_by_four() -> None:
    cfg = PreprocessConfig()
    assert cfg.tiling.ratio == 4
    assert cfg.encoder.name == "efficientnet_lite0"


def test_out_of_range_value_names_key_value_and_rule() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PreprocessConfig, section="preprocess", values={"tiling.low_mpp": -1})
    text = str(err.value)
    assert "preprocess.tiling.low-mpp" in text and "-1" in text and "greater than 0" in text


def test_unknown_key_lists_allowed_keys() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PreprocessConfig, overrides=["tiling.low-mag=5"])
    text = str(err.value)
    assert "unknown key 'tiling.low-mag'" in text
    assert "low-mpp" in text and "min-tissue-high" in text


def test_wrong_choice_lists_choices() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(PreprocessConfig, overrides=["resolutions=medium"])
    assert "'medium'" in str(err.value) and "'both', 'low' or 'high'" in str(err.value)


def test_grids_that_do_not_nest_are_refused() -> None:
    with pytest.raises(ValueError, match="whole multiple"):
        TilingConfig(low_mpp=1.7)


def test_precedence_defaults_file_flags_overrides(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text(
        '[preprocess]\nresolutions = "low"\n[preprocess.tiling]\nmin-tissue-low = 0.3\nmin-tissue-high = 0.4\n'
    )
    cfg = load_config(
        PreprocessConfig,
        path=toml,
        section="preprocess",
        values={"tiling.min_tissue_high": 0.5},
        overrides=["encoder.batch-size=8"],
    )
    assert cfg.resolutions == "low"
    assert cfg.tiling.min_tissue_low == 0.3
    assert cfg.tiling.min_tissue_high == 0.5
    assert cfg.encoder.batch_size == 8


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[preprocess\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(PreprocessConfig, path=bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(PreprocessConfig, path=tmp_path / "nope.toml")


def test_shipped_config_files_are_valid() -> None:
    configs = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(configs.glob("*.toml"))
    assert files, "configs/ ships TOML files"
    for f in files:
        load_config(PreprocessConfig, path=f, section="preprocess")


def test_cli_refuses_bad_value_before_doing_anything(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "slides").mkdir()
    code = main(["preprocess", "--site", str(tmp_path), "--set", "tiling.min-tissue-low=2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tiling.min-tissue-low" in err and "2" in err and "less than or equal to 1" in err
    assert not (tmp_path / "features").exists()


def test_defaults_file_documents_the_real_defaults() -> None:
    defaults = Path(__file__).resolve().parents[1] / "configs" / "defaults.toml"
    assert load_config(PreprocessConfig, path=defaults, section="preprocess") == PreprocessConfig()


def test_defaults_file_documents_the_synth_defaults(tmp_path: Path) -> None:
    from fedslide.common.config.synth import SynthConfig

    defaults = Path(__file__).resolve().parents[1] / "configs" / "defaults.toml"
    loaded = load_config(SynthConfig, path=defaults, section="synth", values={"out_dir": str(tmp_path)})
    assert loaded == SynthConfig(out_dir=tmp_path)


def test_defaults_file_documents_the_predict_defaults() -> None:
    from fedslide.common.config.predict import PredictConfig

    defaults = Path(__file__).resolve().parents[1] / "configs" / "defaults.toml"
    assert load_config(PredictConfig, path=defaults, section="predict") == PredictConfig()


def test_defaults_file_documents_the_train_defaults(tmp_path: Path) -> None:
    from fedslide.common.config.train import TrainConfig

    defaults = Path(__file__).resolve().parents[1] / "configs" / "defaults.toml"
    required = {"features_dir": str(tmp_path), "labels": str(tmp_path / "l.csv"), "out_dir": str(tmp_path / "o")}
    loaded = load_config(TrainConfig, path=defaults, section="train", values=required)
    assert loaded == TrainConfig.model_validate(required)


def test_federation_override_keeps_the_federated_defaults() -> None:
    """Overriding one training/adapter key must not reset the others to the centralized defaults."""
    from fedslide.common.config.distill import AdapterConfig, MILTrainingConfig
    from fedslide.common.config.federation import FederationConfig

    default = FederationConfig()
    assert default.training.scheduler != MILTrainingConfig().scheduler
    assert default.adapter.batch_size != AdapterConfig().batch_size
    cfg = load_config(FederationConfig, overrides=["training.batch-size=2", "adapter.lr=0.01"])
    assert (cfg.training.batch_size, cfg.adapter.lr) == (2, 0.01)
    assert (cfg.training.lr, cfg.training.scheduler) == (default.training.lr, default.training.scheduler)
    assert cfg.adapter.batch_size == default.adapter.batch_size
    flat = FederationConfig.from_run_config({"training.lr": 0.01, "adapter.lr": 0.01})
    assert (flat.training.scheduler, flat.adapter.batch_size) == ("none", default.adapter.batch_size)


def test_federation_refuses_epoch_keys_it_would_ignore(tmp_path: Path) -> None:
    """Federated phases count rounds x local epochs: an epochs key is refused, not silently ignored."""
    from fedslide.common.config.federation import FederationConfig

    toml = tmp_path / "fed.toml"
    toml.write_text("[federation.training]\nlr = 0.001\nepochs = 100\n")
    with pytest.raises(
        ConfigError,
        match=r"'federation.training' \(from .*fed.toml\): epochs: not used by a "
        r"federated run; .*rounds.local-epochs",
    ):
        load_config(FederationConfig, toml, "federation")
    with pytest.raises(ConfigError, match=r"'federation.adapter': patience: not used .*adapter-local-epochs"):
        load_config(FederationConfig, None, "federation", overrides=["adapter.patience=2"])
    with pytest.raises(ConfigError, match="allowed keys here: batch-size, class-weighting") as unknown:
        load_config(FederationConfig, overrides=["training.epoch=3"])
    assert "student-epochs" not in str(unknown.value) and " epochs," not in str(unknown.value)
    assert "epochs" not in FederationConfig().to_toml_dict()["training"]
    logits = load_config(FederationConfig, overrides=["training.early-stopping-patience=3"])  # logits mode's server
    assert logits.training.early_stopping_patience == 3


def test_federation_min_epochs_is_checked_against_proxy_epochs(tmp_path: Path) -> None:
    """min-epochs bounds logits mode's server-side student, so it is checked against proxy-epochs, a key one can set."""
    from fedslide.common.config.federation import FederationConfig

    toml = tmp_path / "fed.toml"
    toml.write_text("[federation]\nproxy-epochs = 20\n[federation.training]\nmin-epochs = 25\n")
    with pytest.raises(ConfigError) as err:
        load_config(FederationConfig, toml, "federation")
    assert str(err.value) == (
        f"invalid settings in [federation] (from {toml}): training.min-epochs (25) exceeds "
        "proxy-epochs (20), the logits-mode student's epochs"
    )
    cfg = load_config(FederationConfig, overrides=["training.min-epochs=60", "proxy-epochs=80"])  # above the hidden 50
    assert (cfg.training.min_epochs, cfg.proxy_epochs) == (60, 80)


def test_generated_settings_files_are_current() -> None:
    """configs/defaults.toml and pyproject's app config are written from the models (`fedslide config dump`)."""
    from fedslide.common.config.dump import stale_files

    assert stale_files() == [], "run `fedslide config dump` and commit the files it writes"


def test_config_dump_check_names_the_stale_file_and_dump_rewrites_only_the_app_config(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedslide.common.config.dump import APP_CONFIG_TABLE

    (tmp_path / "configs").mkdir()
    before = (
        '[project]\nname = "x"\n\n[tool.flwr.app.config]\nseed = 7\n\n[tool.flwr.app.config.kd]\nlambda-base = 9.0\n'
    )
    after = "# kept\n[tool.other]\nkeep = 'byte for byte'   # comment\n"
    (tmp_path / "pyproject.toml").write_text(before + "\n" + after)
    assert main(["config", "dump", "--check", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "defaults.toml differs" in err and "pyproject.toml differs" in err
    assert main(["config", "dump", "--root", str(tmp_path)]) == 0
    assert main(["config", "dump", "--check", "--root", str(tmp_path)]) == 0
    text = (tmp_path / "pyproject.toml").read_text()
    assert text.startswith('[project]\nname = "x"\n\n[tool.flwr.app.config]\n') and text.endswith("\n\n" + after)
    app = tomllib.loads(text)["tool"]["flwr"]["app"]["config"]
    assert app["seed"] == 0 and app["kd"]["lambda-base"] == 1.0 and f"[{APP_CONFIG_TABLE}.rounds]" in text


def test_defaults_file_carries_every_key_and_its_description() -> None:
    from fedslide.common.config.dump import defaults_toml
    from fedslide.common.config.federation import FederationConfig, RoundsConfig

    text = defaults_toml()
    assert tomllib.loads(text)["federation"]["rounds"]["teacher"] == FederationConfig().rounds.teacher
    lines = text.splitlines()
    for name, info in RoundsConfig.model_fields.items():
        assert any(line.startswith(f"{name.replace('_', '-')} = ") for line in lines), name
        assert info.description and info.description in text, name
    assert "# in-dim = 1280" in lines  # filled from the data unless set: commented out
    at = next(i for i, line in enumerate(lines) if line.startswith("# features-dir = "))  # required: no default
    assert "required" in lines[at] or lines[at - 1].startswith("# required;")
    assert '# name = "transmil": Nystrom self-attention layers with positional encoding.' in lines  # other models' keys


def test_the_app_declared_run_config_gives_back_the_default_federation_config() -> None:
    """Every federation setting travels through Flower's flat run config (scalars only): the app's declared table
    in pyproject.toml, and the default config flattened, both read back as the defaults."""
    import tomllib
    from pathlib import Path

    from fedslide.common.config.federation import FederationConfig

    def flat(node: dict, prefix: str = "") -> dict:  # Flower flattens the app's nested table into dotted keys
        out: dict = {}
        for key, value in node.items():
            out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
        return out

    app = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert FederationConfig.from_run_config(flat(app)) == FederationConfig()
    assert FederationConfig.from_run_config(FederationConfig().to_run_config()) == FederationConfig()
