"""Data sources: each kind is a class named by ``_target_`` in conf/data/, and refuses a bad field of its own."""

import pytest
from hydra.utils import get_class
from omegaconf import OmegaConf

from bp_service.training.cli import CONF_DIR
from bp_service.training.config import ConfigError, DataConfig
from bp_service.training.data import build_source, prepare
from bp_service.training.data.sources import Source
from bp_service.training.guard import JOB_CLASSES
from bp_service.training.preflight import check_config

OPTIONS = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
CSV_ARGS = ["data.target=label"]


@pytest.fixture
def table(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n" + "".join(f"{i},{i % 7},{i % 2}\n" for i in range(60)))
    return path


@pytest.mark.parametrize("option", OPTIONS)
def test_every_option_names_an_allowlisted_source_class(compose_cfg, option, table):
    extra = [f"data.path={table}", *CSV_ARGS] if option == "csv" else []
    cfg = compose_cfg(f"data={option}", *extra)
    assert cfg.data._target_ in JOB_CLASSES
    assert issubclass(get_class(cfg.data._target_), Source)
    source = build_source(cfg.data)
    assert source.name == cfg.data.name and isinstance(source.task, str) and type(source.task) is str


# One bad field per kind of source, refused by its constructor through the checks bp-train runs first.
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data=iris", "data.name=iris2"], "data.name must be one of breast_cancer, diabetes, digits, iris, wine"),
        (["data=blog", "data.n_samples=10"], "data.n_samples must be >= 20, got 10"),
        (["data=moons", "data.noise=-1"], "data.noise must be >= 0, got -1"),
        (["data=synthetic", "data.n_features=0"], "data.n_features must be >= 1, got 0"),
        (["data=csv", "data.target=label"], "data.path is required for data=csv"),
        (["data=csv", "data.path=x.csv"], "data.target is required for data=csv"),
        (["data=csv", "data.path=x.csv", "data.target=y", "data.features=[a,a]"], "data.features lists 'a' more"),
    ],
)
def test_each_source_refuses_a_bad_field(compose_cfg, overrides, message):
    cfg = compose_cfg(*overrides)
    with pytest.raises(ConfigError, match=message):
        check_config(cfg)


@pytest.mark.parametrize("source", ["BundledSource", "ToySource", "SyntheticSource", "CsvSource"])
def test_each_source_class_checks_in_its_constructor(source):
    """Built in code, not from a config, a source still refuses what it cannot load."""
    cls = get_class(next(name for name in JOB_CLASSES if name.endswith(f".{source}")))
    with pytest.raises(ConfigError, match=r"data\.task must be one of auto, classification, regression, got 'ranking'"):
        cls(name={"CsvSource": "csv", "SyntheticSource": "synthetic", "ToySource": "blog"}.get(source, "iris"),
            **({"path": "x.csv", "target": "y"} if source == "CsvSource" else {}), task="ranking")  # fmt: skip


def test_a_field_of_another_source_is_refused_by_hydra(compose_cfg):
    """Each option takes only its own source's fields: data=iris has no n_samples to set."""
    with pytest.raises(Exception, match=r"Could not override 'data\.n_samples'"):
        compose_cfg("data=iris", "data.n_samples=500")


@pytest.mark.slow
def test_the_command_refuses_a_bad_source_field(cli):
    result = cli("bp-train", "data=moons", "data.noise=-1", "trainer=cpu", "tracking.enabled=false")
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1] == "bp-train: error: data.noise must be >= 0, got -1.0"


def test_data_config_builds_an_option_in_code(compose_cfg):
    """DataConfig(name, **fields): the node bp-train composes for data=<name>, without Hydra."""
    composed = compose_cfg("data=digits", "data.steps_per_execution=2").data
    built = OmegaConf.structured(DataConfig(name="digits", steps_per_execution=2))
    assert built == composed and OmegaConf.get_type(built) is OmegaConf.get_type(composed)
    assert prepare(built, 0).meta == prepare(composed, 0).meta


def test_the_early_check_hands_its_csv_to_the_run_unless_the_file_changed(tmp_path, monkeypatch):
    """bp-train's check before torch loads reads the file; the run takes that frame instead of parsing it again,
    but never a frame of a file changed in between."""
    import os

    from bp_service import tables
    from bp_service.training.data.csv import CsvSource

    reads = []
    real = tables.read_rows
    monkeypatch.setattr(tables, "read_rows", lambda path, **kw: reads.append(path) or real(path, **kw))
    monkeypatch.setattr(tables, "_HANDED_OVER", {})  # this test's frames stay in this test
    path = tmp_path / "rows.csv"
    path.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(40)))

    assert CsvSource(str(path), target="y").problems() == []
    raw = CsvSource(str(path), target="y").load(seed=0)  # a new source, as the run builds its own
    assert len(reads) == 1 and raw.x.shape == (40, 1)

    CsvSource(str(path), target="y").problems()
    path.write_text("x,y\n" + "".join(f"{i},{i % 2}\n" for i in range(50)))
    os.utime(path, ns=(1, 1))  # a different modification time, whatever the clock's resolution
    assert CsvSource(str(path), target="y").load(seed=0).x.shape == (50, 1) and len(reads) == 3
    CsvSource(str(path), target="y").load(seed=0)  # nothing handed over: read again
    assert len(reads) == 4

    CsvSource(str(path), target="y").problems()  # checked twice (a second check takes the frame and keeps it)
    CsvSource(str(path), target="y").problems()
    assert len(reads) == 5
    path.write_text("x,y\n" + "".join(f"{9 - i % 10},{i % 2}\n" for i in range(50)))  # the same size, other rows
    os.utime(path, ns=(2, 2))
    assert CsvSource(str(path), target="y").load(seed=0).x[0, 0] == 9 and len(reads) == 6
