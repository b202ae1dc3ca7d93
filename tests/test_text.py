"""Text through the pipeline: the text sources, the tokenizer, the token families and the
transformer on image patches - on data the tests generate (tests/text_data.py), fast.

The models are trained here with a few epochs of plain PyTorch (no Horovod) to show each
family learns the rule; the Horovod-trained, compressed and served text run is in
tests/test_text_pipeline.py (integration).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.factory import build_model
from models.spec import ModelSpec
from tasks.core.config import ParamsError, PrepareParams, validate_params
from tasks.compression.recipes import check_pipeline
from tasks.data import load_preprocessing, load_split, spec_for_data
from tasks.prepare import main, prepare_data, write_prepared
from tasks.sources import DataError, read_text_folder, read_text_table

from text_data import CLASS_NAMES, sentiment_texts, write_sentiment_csv, write_sentiment_folder

MAX_LENGTH = 40


# --------------------------------------------------------------------------- readers


def test_text_table_csv_and_tsv_read_texts_and_class_names(tmp_path: Path) -> None:
    texts, labels = sentiment_texts(30, seed=3)
    for suffix, delimiter in ((".csv", ","), (".tsv", "\t")):
        raw = read_text_table(write_sentiment_csv(tmp_path / f"r{suffix}", 30, seed=3, delimiter=delimiter),
                              f"r{suffix}", "text", "label")
        assert raw.texts == texts and raw.class_names == CLASS_NAMES
        assert raw.y.dtype == np.int64 and raw.y.tolist() == labels.tolist()


def test_text_folder_one_sample_per_file(tmp_path: Path) -> None:
    raw = read_text_folder(write_sentiment_folder(tmp_path / "reviews", 20, seed=4), "reviews")
    texts, labels = sentiment_texts(20, seed=4)
    assert raw.class_names == CLASS_NAMES and len(raw.texts) == 20
    assert sorted(raw.texts) == sorted(texts) and sorted(raw.y.tolist()) == sorted(labels.tolist())


def _table(tmp_path: Path, body: bytes, name: str = "t.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(b"text,label\n" + b"a fine film,pos\nan awful film,neg\n" + body)
    return path


BAD_TABLES = {
    "empty text": (b"  ,pos\n", r"t.csv: line 4, column 'text': empty text"),
    "missing label": (b"a good film,\n", r"t.csv: line 4, column 'label': missing label"),
    "not utf-8": (b"ok,pos\ncaf\xe9 film,pos\n", r"t.csv: line 5, column 4: not UTF-8 text \(byte 0xe9\)"),
    "field count": (b"one,two,pos\n", r"t.csv: line 4: expected 2 fields, found 3"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_a_bad_text_table_is_refused_naming_file_and_line(case: str, tmp_path: Path) -> None:
    body, message = BAD_TABLES[case]
    with pytest.raises(DataError) as caught:
        read_text_table(_table(tmp_path, body), "t.csv", "text", "label")
    assert re.fullmatch(message, str(caught.value)), str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_bad_text_folder_is_refused_naming_file_and_line(tmp_path: Path) -> None:
    folder = write_sentiment_folder(tmp_path / "reviews", 10)
    (folder / "positive" / "bad.txt").write_bytes(b"fine\nstill fine\nna\xefve\n")
    with pytest.raises(DataError, match=r"^reviews/positive/bad.txt: line 3, column 3: not UTF-8 text \(byte 0xef\)$"):
        read_text_folder(folder, "reviews")
    (folder / "positive" / "bad.txt").write_text(" \n\n")
    with pytest.raises(DataError, match=r"^reviews/positive/bad.txt: line 1: empty text$"):
        read_text_folder(folder, "reviews")
    with pytest.raises(DataError, match=r"^t.csv: no column 'body' in the header \(columns: text, label\)$"):
        read_text_table(_table(tmp_path, b""), "t.csv", "body", "label")


def test_cli_refuses_a_bad_text_file_in_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "project"
    raw = write_sentiment_csv(root / "data" / "raw" / "reviews.csv", 60)
    raw.write_bytes(raw.read_bytes() + b'60,"this film is \xff great",positive\n')
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump({"prepare": {"source": "text_table", "path": "data/raw/reviews.csv"}}))
    monkeypatch.delenv("SLIMFLOW_ROOT", raising=False)
    monkeypatch.delenv("SLIMFLOW_RUN_CONTEXT", raising=False)
    monkeypatch.chdir(root)
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err == "error: prepare: data/raw/reviews.csv: line 62, column 18: not UTF-8 text (byte 0xff)\n"
    assert sorted(p.name for p in (root / "data").iterdir()) == ["raw"]  # nothing prepared, no temp folder


# --------------------------------------------------------------------------- prepare + tokenizer


@pytest.fixture(scope="module")
def text_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("text")
    write_sentiment_csv(root / "data" / "raw" / "reviews.csv", 1500, seed=1)
    return root


def text_params(**changes: object) -> PrepareParams:
    return PrepareParams(source="text_table", path="data/raw/reviews.csv", text_max_length=MAX_LENGTH, **changes)


def test_prepare_text_writes_token_ids_the_tokenizer_and_its_card(text_root: Path, tmp_path: Path) -> None:
    from tokenizers import Tokenizer

    prepared = prepare_data(text_params(), 42, text_root)
    write_prepared(prepared, tmp_path / "a")
    write_prepared(prepare_data(text_params(), 42, text_root), tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert "tokenizer.json" in files
    for name in files:  # byte-identical: DVC sees no change when nothing changed
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name

    preprocessing = load_preprocessing(tmp_path / "a")
    tokenizer = Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json"))
    assert preprocessing.is_text and preprocessing.input_shape == (MAX_LENGTH,)
    assert preprocessing.vocab_size == tokenizer.get_vocab_size()
    train = load_split(tmp_path / "a", "train")
    assert train.x.shape[1] == MAX_LENGTH and train.x.dtype == np.float32
    assert np.array_equal(train.x, np.load(tmp_path / "a" / "train_x.npy"))  # ids are not normalized
    assert (train.x[:, 0] != 0).all() and ((train.x == 0).sum(1) > 0).any()  # padded at the end

    card = json.loads((tmp_path / "a" / "card.json").read_text())
    info = card["tokenizer"]
    assert info["vocab_size"] == tokenizer.get_vocab_size() and info["max_length"] == MAX_LENGTH
    assert info["pad_id"] == 0 and info["file"] == "tokenizer.json" and info["trained_on"] == "train split"
    # Trained on the train split only: noise words seen only in the test split are unknown there.
    vocab = set(tokenizer.get_vocab())
    test_words = {w for text in _split_texts(text_root, "test") for w in text.replace(".", " ").split()}
    train_words = {w for text in _split_texts(text_root, "train") for w in text.replace(".", " ").split()}
    assert (test_words - train_words) and not (test_words - train_words) & vocab
    assert info["unknown_share"]["test"] > info["unknown_share"]["train"]


def _split_texts(root: Path, split: str) -> list[str]:
    from tasks.prepare import SPLITS, read_raw
    from tasks.sources.splits import split_samples

    raw, _ = read_raw(text_params(), root)
    index = split_samples(raw.texts, raw.y, raw.class_names, "auto", 0.15, 0.25, 42, "texts")[0]
    assert split in SPLITS
    return [raw.texts[i] for i in index[split]]


def test_text_needs_a_family_that_reads_tokens() -> None:
    params = validate_params({"prepare": {"source": "text_folder", "path": "data/raw/r"}, "train": {"model": {"family": "cnn"}}})
    with pytest.raises(ParamsError, match=r"^params.yaml: train.model.family: cnn does not read text .*use one of lstm, gru, transformer$"):
        check_pipeline(params)
    with pytest.raises(ValueError, match="mlp does not read token ids"):
        build_model(ModelSpec(family="mlp", vocab_size=50), (MAX_LENGTH,), 2)


# --------------------------------------------------------------------------- the families learn


def _fit(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float = 3e-3) -> torch.nn.Module:
    """A few epochs of AdamW with a linear warm-up over the first epoch (from 5% of lr)."""
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    per_epoch = -(-len(xt) // 32)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, 0.05 + step / per_epoch))
    generator = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(xt), generator=generator).split(32):
            loss = torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def _accuracy(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.inference_mode():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


SMALL = {"embed_dim": 32, "ffn_dim": 64, "rnn_hidden": 32, "layers": 2}


@pytest.mark.parametrize("family", ["transformer", "lstm", "gru"])
def test_each_token_family_beats_chance_on_generated_text(family: str, text_root: Path) -> None:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    prepared = prepare_data(text_params(), 42, text_root)
    spec = spec_for_data(ModelSpec(family=family, **SMALL), prepared.preprocessing)
    assert spec.vocab_size == prepared.card["tokenizer"]["vocab_size"]
    model = _fit(build_model(spec, (MAX_LENGTH,), 2), *prepared.splits["train"], epochs=6)
    accuracy = _accuracy(model, *prepared.splits["test"])
    # Two balanced classes: chance is about 0.5 (the best reachable about 0.95: 5% label noise).
    assert accuracy >= 0.68, accuracy


def test_transformer_reads_digits_as_patches_and_beats_chance() -> None:
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    torch.set_num_threads(1)
    digits = load_digits()
    x = ((digits.images[:, None] / 16.0 - 0.3) / 0.4).astype(np.float32)
    y = digits.target.astype(np.int64)
    model = build_model(ModelSpec(family="transformer", patch_size=2, **SMALL), (1, 8, 8), 10)
    assert model.position.shape == (1, 16, 32)  # 4 x 4 patches of 2 x 2 pixels
    model = _fit(model, x[:1300], y[:1300], epochs=6)
    assert _accuracy(model, x[1300:], y[1300:]) >= 0.6  # ten classes: chance is 0.1


def test_padding_is_masked_out() -> None:
    """A text's prediction does not depend on what the padding positions' embedding holds."""
    torch.manual_seed(0)
    for family in ("transformer", "lstm"):
        model = build_model(ModelSpec(family=family, vocab_size=50, **SMALL), (12,), 2).eval()
        ids = torch.tensor([[15.0, 17, 19, 0, 0, 0, 0, 0, 0, 0, 0, 0], [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]])
        embedding = model.embed if family == "transformer" else model.embedding
        with torch.inference_mode():
            before = model(ids)
            embedding.weight[0] += torch.randn(32)  # what padding reads, changed (not by a constant: LayerNorm ignores that)
            assert torch.allclose(before, model(ids), atol=1e-5)
            embedding.weight[15] += torch.randn(32)  # a real token's embedding: the first text changes
            after = model(ids)
        assert not torch.allclose(before[0], after[0]) and torch.allclose(before[1], after[1], atol=1e-5)


# --------------------------------------------------------------------------- compression


def test_structured_pruning_removes_whole_heads_and_ffn_units_of_a_transformer() -> None:
    from tasks.compression.candidate import Candidate
    from tasks.compression.onnx import onnx_predictor, export_onnx
    from tasks.compression.pruning import prune_structured
    from tasks.compression.quantization import ort_dynamic_int8

    torch.manual_seed(0)
    spec = ModelSpec(family="transformer", vocab_size=60, embed_dim=32, heads=4, ffn_dim=64, layers=2)
    model = build_model(spec, (12,), 3).eval()
    example = torch.randint(2, 60, (4, 12)).float()
    example[:, 9:] = 0
    pruned = prune_structured(Candidate(model, spec, (12,), 3), 0.5, example[:2].clone())
    assert (pruned.spec.heads, pruned.spec.head_dim, pruned.spec.ffn_dim, pruned.spec.embed_dim) == (2, 8, 32, 32)
    for layer in pruned.module.layers:  # rebuilt from the spec: the heads it kept, and nothing else
        assert layer.attention.heads == 2 and layer.attention.query.out_features == 16 == layer.attention.out.in_features
        assert layer.ffn[0].out_features == 32 and layer.ffn[3].out_features == 32
    # The kept heads keep their weights: query rows of layer 0 are rows of the original.
    original = model.layers[0].attention.query.weight.detach()
    kept = pruned.module.layers[0].attention.query.weight.detach()
    assert all(any(torch.equal(row, other) for other in original) for row in kept)
    # It exports and quantizes like any model (ONNX Runtime dynamic int8 of its Linear layers).
    int8 = ort_dynamic_int8(export_onnx(pruned.module, example[:2].clone()))
    logits = onnx_predictor(int8)(example.numpy())
    assert logits.shape == (4, 3) and np.isfinite(logits).all()


def test_a_transformer_student_with_fewer_layers_is_a_recipe_and_other_families_refuse_it() -> None:
    from tasks.compression.distillation import student_spec
    from tasks.compression.recipes import RecipeError, check_recipes

    teacher = ModelSpec(family="transformer", layers=4, vocab_size=100)
    assert student_spec(teacher, None, 0.5, 2) == teacher.spec(width=0.5, layers=2)
    compress = validate_params({"compress": {"variants": [
        {"name": "distilled-l2", "steps": [{"method": "distill", "student_layers": 2}]}]}}).compress
    assert list(check_recipes(compress, "transformer")) == ["distilled-l2"]
    with pytest.raises(RecipeError, match=r"distilled-l2\).steps.1\(distill\): student_layers sets a transformer"):
        check_recipes(compress, "lstm")


# --------------------------------------------------------------------------- the Horovod loop


def test_transformer_warm_up_starts_low_and_ramps_to_the_world_size() -> None:
    from tasks.training.distributed import lr_multiplier
    from tasks.training.loop import WARMUP_START

    start = WARMUP_START["transformer"]
    assert lr_multiplier(0, 10, 100, 2, start) == pytest.approx(start)
    assert lr_multiplier(5, 10, 100, 2, start) == pytest.approx(start + (2 - start) / 2)
    assert lr_multiplier(10, 10, 100, 2, start) == pytest.approx(2.0)
    assert lr_multiplier(0, 10, 100, 2) == 1.0  # the other families: as before


@pytest.mark.integration
def test_the_transformer_trains_on_text_with_two_horovod_workers(text_root: Path, tmp_path: Path) -> None:
    from tasks.core.config import TrainParams
    from tasks.training import FitJob, launch_fit

    write_prepared(prepare_data(text_params(), 42, text_root), tmp_path / "prepared")
    job = FitJob(
        spec=ModelSpec(family="transformer", **SMALL).to_dict(), prepared=str(tmp_path / "prepared"),
        output=str(tmp_path / "model"), checkpoints=str(tmp_path / "checkpoints"), epochs=10, batch_size=32,
        lr=0.002, seed=0, patience=4, metrics_path=str(tmp_path / "train.json"),
        history_path=str(tmp_path / "history.json"),
    )
    launch_fit(job, TrainParams(workers=2, threads_per_worker=1), Path(__file__).resolve().parents[1])
    metrics = json.loads((tmp_path / "train.json").read_text())
    assert metrics["world_size"] == 2
    assert metrics["val_accuracy"] >= 0.65, metrics  # chance: about 0.5
    saved = torch.load(tmp_path / "model" / "model.pt", map_location="cpu", weights_only=True)
    assert saved["spec"]["vocab_size"] == load_preprocessing(tmp_path / "prepared").vocab_size  # filled from the data
