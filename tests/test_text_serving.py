"""The champion of a text run serves raw text: ``mlflow models serve`` gets two sentences and
answers two labels, the same the loaded model gives, tokenized inside with the tokenizer
the prepare stage trained.

The project is made here (generated reviews, the prepare stage's code, a transformer
trained for a few epochs in this process) and the evaluate stage registers its champion
against a real MLflow registry; the server is the real ``mlflow models serve``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from models.factory import build_model
from models.spec import ModelSpec
from tasks.core.config import PrepareParams
from tasks.core.model_files import save_state_dict_model
from tasks.prepare import prepare_data, write_prepared
from tasks.data import spec_for_data

from conftest import free_port
from test_champion import project_env
from test_evaluate_support import make_params
from test_text import _fit
from text_data import write_sentiment_csv

NAME = "text-classifier"
pytestmark = pytest.mark.integration  # a real registry and a real model server (~45 s here)


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_the_champion_of_a_text_run_serves_raw_text(tmp_path: Path) -> None:
    from tasks.core.paths import ProjectPaths
    from tasks.evaluate import run_evaluate

    root = tmp_path / "project"
    write_sentiment_csv(root / "data" / "raw" / "reviews.csv", 900, seed=2)
    (root / "params.yaml").write_text(yaml.safe_dump({"base": {"seed": 0, "experiment": "tests"}}))
    prepared_dir = root / "data" / "prepared"
    prepared = prepare_data(PrepareParams(source="text_table", path="data/raw/reviews.csv", text_max_length=32), 0, root)
    write_prepared(prepared, prepared_dir)
    torch.manual_seed(0)
    spec = spec_for_data(ModelSpec(family="transformer", embed_dim=32, ffn_dim=64, layers=2), prepared.preprocessing)
    model = _fit(build_model(spec, (32,), 2), *prepared.splits["train"], epochs=6)
    save_state_dict_model(model, spec, (32,), 2, root / "artifacts" / "model",
                          {"name": "baseline", "method": "baseline", "recipe": [], "parent": None})
    for args in (["init", "-q"], ["-c", "user.email=t@t.invalid", "-c", "user.name=t", "commit", "-qm", "x", "--allow-empty"]):
        subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)

    with project_env(root):
        import mlflow

        evaluation = run_evaluate(ProjectPaths(root), make_params(NAME))
        assert evaluation.promotion.version == "1"
        version = mlflow.MlflowClient().get_model_version_by_alias(NAME, "champion")
        assert json.loads(version.tags["input_schema"])["type"] == "text"
        loaded = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
        inputs = loaded.metadata.get_input_schema().to_dict()
        assert inputs == [{"type": "string", "name": "text", "required": True}]  # the signature says: raw text

        # The loaded champion on the raw test texts: what evaluate measured on their token ids.
        from tasks.prepare import read_raw
        from tasks.sources.splits import split_samples

        raw, _ = read_raw(PrepareParams(source="text_table", path="data/raw/reviews.csv"), root)
        test_index = split_samples(raw.texts, raw.y, raw.class_names, "auto", 0.15, 0.25, 0, "reviews")[0]["test"]
        import pandas as pd

        predicted = loaded.predict(pd.DataFrame({"text": [raw.texts[i] for i in test_index]}))
        accuracy = float((np.asarray(predicted) == raw.y[test_index]).mean())
        assert accuracy == pytest.approx(evaluation.models["baseline"].metrics["accuracy"])
        assert accuracy > 0.65  # two classes: chance is 0.5

        sentences = ["the film was truly wonderful and the cast was superb",
                     "i found the plot very boring. the ending was awful"]
        expected = loaded.predict(pd.DataFrame({"text": sentences})).tolist()
        port = free_port()
        bin_dir = str(Path(sys.executable).parent)
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
               "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        server = subprocess.Popen(
            [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{NAME}@champion", "--env-manager", "local",
             "-h", "127.0.0.1", "-p", str(port)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                        break
                except OSError:
                    assert server.poll() is None, server.stderr.read().decode()[-2000:]
                    assert time.monotonic() < deadline, "mlflow models serve did not answer within 120 s"
                    time.sleep(0.5)
            status, answer = _post(port, {"dataframe_split": {"columns": ["text"], "data": [[s] for s in sentences]}})
            assert status == 200 and answer == {"predictions": expected}, answer
            assert len(expected) == 2 and set(expected) <= {0, 1}
            status, answer = _post(port, {"inputs": {"text": sentences}})
            assert status == 200 and answer == {"predictions": expected}
            status, answer = _post(port, {"inputs": [[0.5, 1.5]]})  # numbers, not text: refused, said why
            assert status == 400 and "raw text" in answer["message"]
        finally:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
            server.wait(timeout=30)
