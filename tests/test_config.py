"""params.yaml validation: every file in params/valid loads, every file in params/invalid
is refused with a message naming the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tasks.core.config import STEP_MODELS, Params, ParamsError, load_params, validate_params, write_overrides

HERE = Path(__file__).parent
REPO = HERE.parent


def test_project_params_are_valid() -> None:
    params = load_params(REPO / "params.yaml")
    assert params.train.workers == 2
    assert params.prepare.source == "digits"
    assert any(v.name == "int8-dynamic" for v in params.compress.variants)


@pytest.mark.parametrize("path", sorted((HERE / "params" / "valid").glob("*.yaml")), ids=lambda p: p.name)
def test_valid_params(path: Path) -> None:
    load_params(path)


@pytest.mark.parametrize("path", sorted((HERE / "params" / "invalid").glob("*.yaml")), ids=lambda p: p.name)
def test_invalid_params(path: Path) -> None:
    expected = path.read_text().splitlines()[0].removeprefix("# expect:").strip()
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert expected in str(err.value)
    assert path.name in str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.epochs=-1", "train.epochs"),
        ("train.nope=1", "train.nope: unknown key"),
        ("nosection.x=1", "nosection: unknown key"),
        ("train.model.family=resnet", "train.model.family"),
        ("train.monitor=val_f1", "train.monitor: .*'val_loss' or 'val_accuracy'"),
        ("prepare.test_fraction=0.9", "val_fraction + test_fraction"),
        ("train.epochs", "expected key=value"),
        ("prepare.log_features=log", r"prepare.log_features: expected none, auto or a list of feature indices >= 0 "
                                     r"or column names such as \[0, 3\] or \[amount, visits\], got 'log'$"),
        ("prepare.missing_values=median", r"prepare: missing_values median: source 'digits' gives images, not rows "
                                           r"of features; only rows have missing values to fill \(refuse\)$"),
        ("prepare.csv_ignore_columns=[id]", r"prepare: csv_ignore_columns \['id'\]: source 'digits' has no named "
                                            r"columns; only csv reads it$"),
        ("prepare.csv_categorical_columns=[plan]", r"prepare: csv_categorical_columns \['plan'\]: source 'digits' has "
                                                   r"no named columns; only csv reads it$"),
        ("prepare.log_features=[-1]", r"prepare.log_features: expected .*, got \[-1\]$"),
        ("prepare.log_features=[0]", r"prepare: log_features \[0\]: source 'digits' gives images, not rows of "
                                     r"features; only rows have features to log \(none or auto\)$"),
        ("prepare.npz_layout=sequences", r"prepare: npz_layout sequences: source 'digits' is not an npz; only npz "
                                         r"reads it$"),
        ("prepare.npz_layout=rows", r"prepare.npz_layout: .*'auto', 'images' or 'sequences'"),
        ("prepare.npz_channels=last", r"prepare: npz_channels last: source 'digits' is not an npz; only npz "
                                      r"reads it$"),
        ("prepare.npz_channels=nhwc", r"prepare.npz_channels: .*'auto', 'first' or 'last'"),
        ("train.allreduce_groups=-1", r"train.allreduce_groups: expected 'auto' or a whole number >= 0, got -1$"),
    ],
)
def test_bad_override_is_refused_naming_the_key(override: str, message: str) -> None:
    with pytest.raises(ParamsError, match=message.replace("+", r"\+")):
        load_params(REPO / "params.yaml", [override])


def test_overrides_are_typed_and_recorded_with_comments_kept(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text((REPO / "params.yaml").read_text())
    params = write_overrides(path, ["train.epochs=1", "train.model.width=0.5"])
    assert params.train.epochs == 1 and params.train.model.width == 0.5
    text = path.read_text()
    assert "epochs: 1" in text and "# mlp | cnn | lstm | gru" in text
    assert load_params(path).train.epochs == 1


def test_invalid_override_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    original = (REPO / "params.yaml").read_text()
    path.write_text(original)
    with pytest.raises(ParamsError):
        write_overrides(path, ["train.epochs=0"])
    assert path.read_text() == original


def test_the_schema_shows_each_compression_method_with_its_own_fields() -> None:
    """``slimflow params --schema``: a step is a union chosen by ``method``, one schema per method."""
    schema = Params.model_json_schema()
    defs = schema["$defs"]
    steps = defs["Variant"]["properties"]["steps"]["items"]
    assert steps["discriminator"]["propertyName"] == "method"
    mapping = steps["discriminator"]["mapping"]
    assert set(mapping) == set(STEP_MODELS) == {"prune", "quantize", "distill", "half", "export"}
    assert len(steps["oneOf"]) == 5
    fields = {method: set(defs[ref.rsplit("/", 1)[-1]]["properties"]) for method, ref in mapping.items()}
    assert fields["prune"] == {"method", "kind", "sparsity", "fine_tune_epochs", "lr"}
    assert fields["quantize"] == {"method", "mode", "runtime", "fine_tune_epochs", "lr", "fallback"}
    assert fields["distill"] == {"method", "student_family", "student_width", "student_layers", "student_init",
                                 "temperature", "alpha", "epochs", "lr"}
    assert fields["half"] == {"method"} and fields["export"] == {"method", "runtime"}
    prune = defs[mapping["prune"].rsplit("/", 1)[-1]]
    assert set(prune["required"]) == {"method", "kind", "sparsity"}
    share, auto = prune["properties"]["sparsity"]["anyOf"]  # a share, or searched (auto)
    assert share["exclusiveMaximum"] == 1 and auto["const"] == "auto"
    assert all(defs[ref.rsplit("/", 1)[-1]]["additionalProperties"] is False for ref in mapping.values())
    # train.model is the one model spec, with its ranges.
    assert defs["ModelSpec"]["properties"]["family"]["enum"] == ["mlp", "cnn", "lstm", "gru", "transformer"]


def test_every_problem_is_one_line_naming_its_key() -> None:
    raw = {"train": {"epochs": 0, "model": {"family": "resnet"}},
           "compress": {"variants": [{"name": "v", "steps": [{"method": "prune", "kind": "sideways", "sparsity": 2}]}]}}
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    lines = str(caught.value).splitlines()
    assert lines == [
        "params.yaml: train.model.family: Input should be 'mlp', 'cnn', 'lstm', 'gru' or 'transformer', got 'resnet'",
        "params.yaml: train.epochs: Input should be greater than or equal to 1, got 0",
        "params.yaml: compress.variants.1(v).steps.1(prune).kind: Input should be 'unstructured' or 'structured', got 'sideways'",
        "params.yaml: compress.variants.1(v).steps.1(prune).sparsity: Input should be less than 1, got 2",
    ]


def test_loading_params_imports_no_torch() -> None:
    code = "import sys, tasks.core.config as c; c.load_params('params.yaml'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


@pytest.mark.parametrize(
    ("prepare", "expected"),
    [
        ({}, "slimflow-digits"),
        ({"source": "breast_cancer"}, "slimflow-breast_cancer"),
        ({"source": "csv", "path": "data/raw/news.csv"}, "slimflow-news"),
        ({"source": "csv", "path": "data/raw/news.v2.csv"}, "slimflow-news-v2"),
        ({"source": "npz", "path": "data/raw/noisy28.npz"}, "slimflow-noisy28"),
        ({"source": "image_folder", "path": "data/raw/pets/"}, "slimflow-pets"),
        ({"source": "idx", "path": "data/raw/train-images-idx3-ubyte.gz", "labels_path": "l"}, "slimflow-train-images-idx3-ubyte"),
        ({"source": "text_folder", "path": "data/raw/my reviews (2024)"}, "slimflow-my-reviews-2024"),
    ],
)
def test_the_registered_model_is_named_after_the_data_by_default(prepare: dict, expected: str) -> None:
    """A project switched to its own data registers its champion under that data's name, not
    under the bundled digits' (whose @champion then refused it: another input)."""
    assert Params.model_validate({"prepare": prepare}).evaluate.registered_model == expected
    assert Params.model_validate({"prepare": prepare, "evaluate": {"registered_model": "auto"}}) \
        .evaluate.registered_model == expected


def test_a_registered_model_name_given_is_kept_whatever_the_data(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("evaluate:\n  registered_model: team-digits\n")
    assert load_params(params, ["prepare.source=breast_cancer", "train.model.family=mlp"]).evaluate.registered_model \
        == "team-digits"
    assert load_params(REPO / "params.yaml").evaluate.registered_model == "slimflow-digits"  # the project's default
