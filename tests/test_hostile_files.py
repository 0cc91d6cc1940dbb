"""Files bp-service did not write, or that stretch the CSV conventions: cells pandas would read as missing,
damaged or oversized model bundles, spreadsheet formulas, symbolic links, and separators that disagree.

Tiny hand-made bundles (2 features) keep each case quick. Every case runs through the real command: ``bp-predict``
in-process through its entry point ``main`` (the console script calls exactly that), and the bundle catalogue
once more as a separate ``bp-predict`` process (slow); the ``bp-train`` cases as a separate process.
"""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from bp_service.bundle import build_net, load_bundle
from bp_service.serving.predict import main

FEATURES = ["a", "b"]
NA_WORDS = ["NA", "None", "null", "nan", "N/A", "NaN", "n/a", "#N/A", "NULL"]


def _bundle(
    path: Path,
    sizes: tuple[int, ...] = (2, 4, 1),
    classes: list | None = None,
    features: list[str] | None = None,
    target: str = "label",
) -> dict:
    """A small trained-looking bundle (weights seeded), as a dict to damage before :func:`_save`."""
    torch.manual_seed(0)
    regression = classes is None and sizes[-1] == 1 and target == "y"
    arch = {"sizes": list(sizes), "activation": "sigmoid", "output_activation": None if regression else "sigmoid"}
    arch |= {"fused": True, "bias": True}
    features = features or (FEATURES if sizes[0] == 2 else [f"f{i}" for i in range(sizes[0])])
    meta = {
        "task": "regression" if regression else "classification",
        "feature_names": list(features),
        "classes": None if regression else list(classes or [0, 1]),
        "scaler_mean": [0.0] * sizes[0],
        "scaler_scale": [1.0] * sizes[0],
        "target_mean": 0.0,
        "target_scale": 1.0,
        "target": target,
        "impute_mean": None,
    }
    return {"state_dict": build_net(arch).state_dict(), "meta": meta, "architecture": arch, "path": path}


def _save(bundle: dict) -> Path:
    path = bundle.pop("path")
    torch.save(bundle, path)
    return path


@pytest.fixture
def rows(tmp_path) -> Path:
    path = tmp_path / "rows.csv"
    pd.DataFrame({"a": np.linspace(-2, 2, 20), "b": np.linspace(3, -1, 20)}).to_csv(path, index=False)
    return path


def predict(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


# --------------------------------------------------------------------------- cells pandas reads as missing
def test_ids_and_kept_targets_that_read_like_missing_values_come_back_as_written(cli, tmp_path):
    bundle = _save(_bundle(tmp_path / "b.pt", sizes=(2, 4, 3), classes=["EU", "NA", "SA"], target="region"))
    ids = [*NA_WORDS, ""]
    n = len(ids)
    frame = pd.DataFrame({"id": ids, "a": np.arange(n) / n, "b": 0.5, "region": ["NA", "None", "EU"] * 3 + [""]})
    frame.to_csv(tmp_path / "in.csv", index=False)
    out = tmp_path / "out.csv"
    result = cli("bp-predict", f"model={bundle}", f"input={tmp_path / 'in.csv'}", f"output={out}", "keep_target=true")
    assert result.returncode == 0, result.stderr
    with open(out, newline="") as fh:
        got = list(csv.reader(fh))
    assert got[0][:3] == ["id", "prediction", "region"] and got[0][3:] == ["proba_EU", "proba_NA", "proba_SA"]
    assert [r[0] for r in got[1:]] == ids
    assert [r[2] for r in got[1:]] == frame["region"].tolist()
    assert {r[1] for r in got[1:]} <= {"EU", "NA", "SA"}


def test_a_feature_cell_written_NA_is_a_text_cell_named_by_row_and_column(rows, tmp_path, capsys):
    bundle = _save(_bundle(tmp_path / "b.pt"))
    frame = pd.read_csv(rows).astype({"b": object})
    frame.loc[6, "b"] = "NA"
    frame.to_csv(tmp_path / "in.csv", index=False)
    code, err = predict(capsys, f"model={bundle}", f"input={tmp_path / 'in.csv'}", f"output={tmp_path / 'o.csv'}")
    assert code == 2
    assert "row 8, column 'b': not a finite number: 'NA'" in one_line(err)


def _three_regions(path: Path) -> Path:
    rng = np.random.default_rng(0)
    regions = np.repeat(["EU", "NA", "SA"], 40)
    centre = {"EU": 0.0, "NA": 3.0, "SA": 6.0}
    x1 = np.array([centre[r] for r in regions]) + rng.normal(0, 0.3, len(regions))
    frame = pd.DataFrame({"x1": x1.round(3), "x2": rng.normal(0, 1, len(regions)).round(3), "region": regions})
    frame.loc[5, "x2"] = None  # one empty cell: data.missing=drop has a row to leave out
    frame.to_csv(path, index=False)
    return path


@pytest.mark.slow  # one bp-train run
def test_a_class_named_NA_is_a_class_not_a_missing_label(cli, tmp_path):
    data = _three_regions(tmp_path / "regions.csv")
    args = ["data=csv", f"data.path={data}", "data.target=region", "data.missing=drop", "trainer=cpu"]
    result = cli("bp-train", *args, "trainer.max_epochs=1", "tracking.enabled=false", "trainer.enable_progress_bar=0")
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoints = list(tmp_path.rglob("*.ckpt"))
    assert checkpoints
    assert load_bundle(checkpoints[0])["meta"]["classes"] == ["EU", "NA", "SA"]


# --------------------------------------------------------------------------- damaged and oversized bundles
def _wide(path: Path, width: int, tensor: Callable[[tuple[int, ...]], torch.Tensor]) -> Path:
    """A ``width``-wide network, each parameter made by ``tensor(shape)``."""
    bundle = _bundle(path, sizes=(width, 1, 1))
    bundle["architecture"]["sizes"] = [width, width, 1]
    shapes = {"layers.0.weight": (width, width), "layers.0.bias": (width,), "layers.1.weight": (1, width)}
    bundle["state_dict"] = {k: tensor(s) for k, s in {**shapes, "layers.1.bias": (1,)}.items()}
    return _save(bundle)


def _expanded(path: Path) -> Path:
    """Every tensor a stride-0 view of one number: a 4000-wide network (64 MB of weights) declared in a few KB."""
    return _wide(path, 4000, lambda shape: torch.full((1,) * len(shape), 0.1).expand(*shape))


def _shared(path: Path) -> Path:
    """Four 1000x1000 layers viewing one stored tensor: 4 MB in the file, 16 MB once built."""
    width, base = 1000, torch.zeros(1000, 1000)
    bundle = _bundle(path, sizes=(width, 1, 1))
    bundle["architecture"]["sizes"] = [width] * 5 + [1]
    bundle["state_dict"] = {f"layers.{i}.weight": base for i in range(4)}
    bundle["state_dict"] |= {f"layers.{i}.bias": base[0] for i in range(4)}
    bundle["state_dict"] |= {"layers.4.weight": base[:1], "layers.4.bias": base[0, :1]}
    return _save(bundle)


def _deflated(path: Path) -> Path:
    """A genuine 3000-wide bundle of zeros whose zip entries are compressed: 36 MB of weights in a small file."""
    plain = _wide(path.with_suffix(".plain"), 3000, torch.zeros)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert path.stat().st_size < 1_000_000 < 30_000_000 < plain.stat().st_size
    return path


def _damaged(change: Callable[[dict], None]) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        bundle = _bundle(path)
        change(bundle)
        return _save(bundle)

    return build


def _meta(**values) -> Callable[[dict], None]:
    return lambda b: b["meta"].update(values)


def _regression(**values) -> Callable[[Path], Path]:
    def build(path: Path) -> Path:
        bundle = _bundle(path, target="y")
        bundle["meta"].update(values)
        return _save(bundle)

    return build


def _without_meta(key: str) -> Callable[[dict], None]:
    return lambda b: b["meta"].pop(key)


def _shared_refs(depth: int, pair: type = list) -> object:
    """``x = [x, x]`` ``depth`` times: a few hundred bytes pickled (shared references), 2**depth items as text."""
    value = pair()
    for _ in range(depth):
        value = pair([value, value])
    return value


BROKEN_BUNDLES = {
    "zero_feature_scale": (_damaged(_meta(scaler_scale=[1.0, 0.0])), "scaler_scale"),
    "nan_feature_scale": (_damaged(_meta(scaler_scale=[float("nan"), 1.0])), "scaler_scale"),
    "nan_feature_mean": (_damaged(_meta(scaler_mean=[0.0, float("inf")])), "scaler_mean"),
    "nan_target_scale": (_regression(target_scale=float("nan")), "target_scale"),
    "zero_target_scale": (_regression(target_scale=0.0), "target_scale"),
    "three_classes_one_output": (_damaged(_meta(classes=["x", "y", "z"])), "classes"),
    "repeated_classes": (_damaged(_meta(classes=["x", "x"])), "classes"),
    "feature_count": (_damaged(_meta(feature_names=["a", "b", "c"])), "feature_names"),
    "scaler_length": (_damaged(_meta(scaler_mean=[0.0])), "scaler_mean"),
    "unknown_task": (_damaged(_meta(task="ranking")), "task"),
    "missing_meta_key": (_damaged(_without_meta("scaler_scale")), "scaler_scale"),
    "unknown_meta_key": (_damaged(_meta(log_target=True)), "log_target"),
    "unknown_activation": (_damaged(lambda b: b["architecture"].update(activation="swish")), "swish"),
    "extra_architecture_key": (_damaged(lambda b: b["architecture"].update(dropout=0.5)), "dropout"),
    "non_tensor_weights": (
        _damaged(lambda b: b["state_dict"].update({"layers.1.bias": [0.0]})),
        "layers.1.bias is not a tensor",
    ),
    "integer_weights": (
        _damaged(lambda b: b["state_dict"].update({"layers.1.bias": torch.zeros(1, dtype=torch.int64)})),
        "layers.1.bias",
    ),
    "meta_not_a_dict": (_damaged(lambda b: b.update(meta=[1, 2])), "meta"),
    "stride_0_weights": (
        _damaged(lambda b: b["state_dict"].update({"layers.0.weight": torch.ones(1, 1).expand(4, 2)})),
        "layers.0.weight",
    ),
    # Each shown by its type: the whole of one would take minutes and gigabytes to print (2**24 items).
    "sizes_of_shared_lists": (
        _damaged(lambda b: b["architecture"].update(sizes=_shared_refs(24))),
        "sizes must be two or more positive widths, got a list of 2",
    ),
    "task_of_shared_lists": (
        _damaged(_meta(task=_shared_refs(24))),
        "task must be classification or regression, got a list of 2",
    ),
    "meta_key_of_shared_tuples": (
        _damaged(lambda b: b["meta"].update({_shared_refs(24, tuple): 1})),
        "meta: unknown key a tuple of 2",
    ),
    "run_id_of_shared_lists": (
        _damaged(_meta(mlflow_run_id=_shared_refs(24))),
        "meta: mlflow_run_id must be an MLflow run id, got a list of 2",
    ),
    "weight_key_not_a_name": (
        _damaged(lambda b: b["state_dict"].update({_shared_refs(24, tuple): torch.zeros(1)})),
        "weights: a key that is not a name (a tuple of 2)",
    ),
    "4000_wide_in_a_few_kb": (_expanded, "4000"),
    "compressed_entries": (_deflated, "compressed"),
    "layers_sharing_one_storage": (_shared, "declares 4,005,001 weights"),
}


def _check_broken(code: int, err: str, path: Path, needle: str) -> None:
    line = one_line(err)
    assert code == 2, err
    assert line.startswith(f"bp-predict: error: {path}: "), line
    assert needle in line, line
    assert "Traceback" not in err


@pytest.mark.parametrize("case", list(BROKEN_BUNDLES))
def test_a_damaged_bundle_is_one_line_naming_the_file_and_field(case, rows, tmp_path, capsys):
    build, needle = BROKEN_BUNDLES[case]
    path = build(tmp_path / f"{case}.pt")
    out = tmp_path / "out.csv"
    code, err = predict(capsys, f"model={path}", f"input={rows}", f"output={out}")
    _check_broken(code, err, path, needle)
    assert not out.exists()


@pytest.mark.slow  # one bp-predict process per case
def test_every_damaged_bundle_through_the_bp_predict_process(cli, rows, tmp_path):
    for case, (build, needle) in BROKEN_BUNDLES.items():
        path = build(tmp_path / f"{case}.pt")
        result = cli("bp-predict", f"model={path}", f"input={rows}", f"output={tmp_path / 'out.csv'}")
        _check_broken(result.returncode, result.stderr, path, needle)


def test_an_intact_bundle_still_predicts(rows, tmp_path, capsys):
    """The checks refuse damage, not the bundles bp-train writes (a regression one too)."""
    for name, bundle in (("c", _bundle(tmp_path / "c.pt")), ("r", _bundle(tmp_path / "r.pt", target="y"))):
        code, err = predict(capsys, f"model={_save(bundle)}", f"input={rows}", f"output={tmp_path / name}.csv")
        assert code == 0, err


def test_an_empty_model_argument_is_one_line_naming_it(cli, rows, tmp_path):
    result = cli("bp-predict", "model=", f"input={rows}", f"output={tmp_path / 'o.csv'}")
    assert result.returncode == 2
    assert one_line(result.stderr) == "bp-predict: error: model= must not be empty"


# --------------------------------------------------------------------------- spreadsheet formulas
FORMULAS = ['=HYPERLINK("http://evil.example","x")', "@SUM(1+1)", "+cmd", "-2+3+cmd|' /C calc'!A0", "\tx"]


def test_a_leading_carriage_return_is_escaped_like_the_others():
    # Not through a file: the csv module (and so pandas) writes a lone \r unquoted, which readers take as a row end.
    from bp_service.serving.predict import escape_formula

    assert [escape_formula(c) for c in ("\rx", "\tx", "-1.5", "+2", "1e-3", "-1+2", "@x", "a=b")] == [
        "'\rx",
        "'\tx",
        "-1.5",
        "+2",
        "1e-3",
        "'-1+2",
        "'@x",
        "a=b",
    ]


def _formula_case(tmp_path: Path) -> tuple[Path, Path]:
    bundle = _save(_bundle(tmp_path / "b.pt", sizes=(2, 4, 3), classes=["=1+1", "@A1", "plain"], target="=label"))
    n = len(FORMULAS) + 3
    frame = pd.DataFrame(
        {
            "=id": [*FORMULAS, "-1.5", "-007", "ok"],
            "a": np.linspace(-3, 3, n),
            "b": np.linspace(3, -3, n),
            "=label": ["-1.5", "=2*3", "plain", *FORMULAS][:n],
        }
    )
    frame.to_csv(tmp_path / "in.csv", index=False, quoting=csv.QUOTE_NONNUMERIC)  # a bare \r would end the row
    return bundle, tmp_path / "in.csv"


def _written(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def test_cells_a_spreadsheet_would_run_as_formulas_are_written_as_text(cli, tmp_path):
    bundle, src = _formula_case(tmp_path)
    out = tmp_path / "out.csv"
    args = [f"model={bundle}", f"input={src}", f"output={out}", "id_column==id", "keep_target=true"]
    result = cli("bp-predict", *args)
    assert result.returncode == 0, result.stderr
    got = _written(out)
    assert got[0] == ["'=id", "prediction", "'=label", "proba_=1+1", "proba_@A1", "proba_plain"]
    assert [r[0] for r in got[1:]] == [*(f"'{f}" for f in FORMULAS), "-1.5", "-007", "ok"]  # numbers stay numbers
    assert [r[2] for r in got[1:4]] == ["-1.5", "'=2*3", "plain"]
    assert {r[1] for r in got[1:]} <= {"'=1+1", "'@A1", "plain"}
    for row in got[1:]:
        float(row[3]), float(row[4]), float(row[5])  # probabilities untouched


def test_escape_formulas_false_writes_cells_as_they_are(tmp_path, capsys):
    bundle, src = _formula_case(tmp_path)
    out = tmp_path / "out.csv"
    args = [f"model={bundle}", f"input={src}", f"output={out}", "id_column==id", "keep_target=1"]
    code, err = predict(capsys, *args, "escape_formulas=false")
    assert code == 0, err
    got = _written(out)
    assert got[0][:3] == ["=id", "prediction", "=label"]
    assert [r[0] for r in got[1:]] == [*FORMULAS, "-1.5", "-007", "ok"]


# --------------------------------------------------------------------------- symbolic links
def test_an_output_link_leading_out_of_its_folder_is_refused(cli, rows, tmp_path, capsys):
    bundle = _save(_bundle(tmp_path / "b.pt"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "important.csv").write_text("keep me\n")
    given = tmp_path / "given"
    given.mkdir()
    (given / "out.csv").symlink_to(elsewhere / "important.csv")
    (given / "dangling.csv").symlink_to(elsewhere / "new.csv")
    result = cli("bp-predict", f"model={bundle}", f"input={rows}", f"output={given / 'out.csv'}")
    code, err = predict(capsys, f"model={bundle}", f"input={rows}", f"output={given / 'dangling.csv'}")
    for link, status, line in (("out.csv", result.returncode, one_line(result.stderr)), ("dangling.csv", code, err)):
        assert status == 2
        assert f"{given / link}: output is a symbolic link to {elsewhere}" in line and f"outside {given};" in line
    assert (elsewhere / "important.csv").read_text() == "keep me\n"
    assert sorted(p.name for p in elsewhere.iterdir()) == ["important.csv"]


SECRET_LINE = "root:$y$j9T$Zq0saltsaltsalt$HASHHASHHASHHASHHASHHASHHASHHASHHASH:19000:0:99999:7:::"


def _secret(tmp_path: Path) -> Path:
    secret = tmp_path / "private" / "shadow"
    secret.parent.mkdir()
    secret.write_text(SECRET_LINE + "\ndaemon:*:19000:0:99999:7:::\n")
    link = tmp_path / "rows.csv"
    link.symlink_to(secret)
    return link


def _leaks(text: str) -> bool:
    """More than a short piece (20 characters) of the private file's first line, or any of its other lines."""
    return SECRET_LINE[:21] in text or "HASH" in text or "daemon" in text


def test_an_input_link_to_a_private_file_does_not_print_it(cli, tmp_path):
    bundle = _save(_bundle(tmp_path / "b.pt"))
    result = cli("bp-predict", f"model={bundle}", f"input={_secret(tmp_path)}", f"output={tmp_path / 'o.csv'}")
    assert result.returncode == 2
    line = one_line(result.stderr)
    assert "unexpected column(s)" in line and not _leaks(line), line


@pytest.mark.slow  # a bp-train process; bp-predict above reads through the same tables.py
def test_bp_train_does_not_print_a_private_file_given_as_data(cli, tmp_path):
    result = cli("bp-train", "data=csv", f"data.path={_secret(tmp_path)}", "data.target=y", "trainer=cpu")
    assert result.returncode == 2
    assert "target column 'y' not found" in result.stderr and not _leaks(result.stderr), result.stderr[-2000:]


# --------------------------------------------------------------------------- separators
def test_a_tsv_whose_first_header_cell_holds_a_quoted_comma_is_read_as_a_tsv(cli, tmp_path):
    bundle = _save(_bundle(tmp_path / "b.pt", features=["a,b", "c"]))
    src = tmp_path / "in.tsv"
    src.write_text('"a,b"\tc\n' + "".join(f"{i / 10}\t1.0\n" for i in range(10)))
    result = cli("bp-predict", f"model={bundle}", f"input={src}", f"output={tmp_path / 'o.csv'}")
    assert result.returncode == 0, result.stderr
    assert len(pd.read_csv(tmp_path / "o.csv")) == 10


@pytest.mark.slow  # a bp-train process; the bp-predict case below reads through the same tables.py
def test_a_header_and_rows_with_different_separators_are_named(cli, tmp_path):
    src = tmp_path / "mixed.csv"
    src.write_text("x1;x2;y\n" + "".join(f"{i},{i % 3},{i % 2}\n" for i in range(30)))
    result = cli("bp-train", "data=csv", f"data.path={src}", "data.target=y", "trainer=cpu")
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert f"{src}: the header is separated by ';' but the rows by ','" in line, line


def test_the_same_mismatch_in_bp_predict(rows, tmp_path, capsys):
    bundle = _save(_bundle(tmp_path / "b.pt"))
    src = tmp_path / "mixed.csv"
    src.write_text("a\tb\n" + "".join(f"{i};{i}\n" for i in range(5)))
    code, err = predict(capsys, f"model={bundle}", f"input={src}", f"output={tmp_path / 'o.csv'}")
    assert code == 2 and "the header is separated by tab but the rows by ';'" in one_line(err)
