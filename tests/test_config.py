"""params.yaml validation: every file in params/valid loads, every file in params/invalid
is refused with a message naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.config import ParamsError, load_params, write_overrides

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
        ("train.model.family=transformer", "train.model.family"),
        ("prepare.test_fraction=0.9", "val_fraction + test_fraction"),
        ("train.epochs", "expected key=value"),
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
