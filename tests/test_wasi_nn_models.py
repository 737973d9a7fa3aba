"""Model preparation: the tiny test models, the MiniLM converters, manifests and the `models` CLI."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from wasmflow.wasi_nn import models
from wasmflow.wasi_nn.cli_commands import models_group
from wasmflow.wasi_nn.testmodels import write_tiny_llama, write_tiny_onnx
from optional_support import need_llama_cpp

REPO = Path(__file__).resolve().parents[1]
STATE = Path(os.environ.get("WASMFLOW_TEST_STATE_DIR", REPO / ".wasmflow"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_models_are_deterministic(tmp_path: Path) -> None:
    a, b = write_tiny_llama(tmp_path / "a.gguf"), write_tiny_llama(tmp_path / "b.gguf")
    assert sha(a) == sha(b)
    c, d = write_tiny_onnx(tmp_path / "c.onnx"), write_tiny_onnx(tmp_path / "d.onnx")
    assert sha(c) == sha(d)
    assert sha(write_tiny_llama(tmp_path / "e.gguf", seed=99)) != sha(a)


def test_wordpiece_vocab_becomes_llama_cpp_wpm() -> None:
    assert models.bert_vocab_for_gguf(["[CLS]", "play", "##ing", "[unused3]"]) == ["[CLS]", "\u2581play", "ing", "[unused3]"]


@pytest.fixture(scope="module")
def minilm() -> list[Path]:
    return models.pull("minilm", STATE)


def test_pull_minilm_records_checksums(minilm: list[Path]) -> None:
    manifest = models.read_manifest(minilm[0].parent)
    for path in minilm:
        assert manifest[path.name]["sha256"] == sha(path)
        assert manifest[path.name]["size"] == path.stat().st_size
        assert models.verify_beside(path)
    again = models.pull("all-minilm-l6-v2", STATE)  # second pull: verified, not converted again
    assert again == minilm and all(p.stat().st_mtime == q.stat().st_mtime for p, q in zip(again, minilm))


def test_converted_gguf_is_a_bert_llama_cpp_reads(minilm: list[Path]) -> None:
    need_llama_cpp()
    from wasmflow.wasi_nn.ggml_backend import VocabOnly

    v = VocabOnly(str(minilm[0]))
    try:
        assert v.meta("general.architecture") == "bert"
        assert v.meta("bert.pooling_type") == "1"  # mean, as the sentence-transformers config says
        assert v.context_length() == 512
        ids = v.tokenize(b"Hello, world!")
        assert ids == [101, 7592, 1010, 2088, 999, 102]  # [CLS] hello , world ! [SEP], as BertTokenizer gives
    finally:
        v.close()


def test_converted_onnx_declares_bert_inputs_and_outputs(minilm: list[Path]) -> None:
    import onnx

    model = onnx.load(str(minilm[1]))
    onnx.checker.check_model(model)
    ins = [(i.name, i.type.tensor_type.elem_type) for i in model.graph.input]
    assert ins == [("input_ids", onnx.TensorProto.INT64), ("attention_mask", onnx.TensorProto.INT64), ("token_type_ids", onnx.TensorProto.INT64)]
    outs = {o.name: [d.dim_param or d.dim_value for d in o.type.tensor_type.shape.dim] for o in model.graph.output}
    assert outs == {"last_hidden_state": ["batch", "seq", 384], "sentence_embedding": ["batch", 384]}


def test_a_corrupted_pull_is_refused(minilm: list[Path], tmp_path: Path) -> None:
    from wasmflow.wasi_nn import NNFailure

    copy = tmp_path / minilm[2].name
    copy.write_bytes(minilm[2].read_bytes())
    models.record(copy, "test")
    data = bytearray(copy.read_bytes())
    data[100] ^= 1
    copy.write_bytes(bytes(data))
    with pytest.raises(NNFailure) as exc:
        models.verify_beside(copy)
    assert "sha256" in exc.value.message


def test_models_cli_list_and_pull(minilm: list[Path]) -> None:
    runner = CliRunner()
    listed = runner.invoke(models_group, ["list", "--state-dir", str(STATE), "--verify"])
    assert listed.exit_code == 0, listed.output
    assert "all-MiniLM-L6-v2.onnx" in listed.output and "ok" in listed.output
    pulled = runner.invoke(models_group, ["pull", "minilm", "--state-dir", str(STATE), "--no-install"])
    assert pulled.exit_code == 0, pulled.output
    assert "ready" in pulled.output and "minilm-onnx:ONNX:AUTO:" in pulled.output
    unknown = runner.invoke(models_group, ["pull", "gpt-5", "--state-dir", str(STATE)])
    assert unknown.exit_code == 2 and "unknown model" in unknown.output


def test_status_reports_missing_models(tmp_path: Path) -> None:
    items = {i["name"]: i for i in models.status(tmp_path)}
    assert set(items) == {"gemma3-270m", "all-minilm-l6-v2"}
    assert not items["gemma3-270m"]["ready"] and items["gemma3-270m"]["files"][0]["state"] == "missing"
    assert json.loads(json.dumps(items)) == items  # plain data, for the dashboard or an API
