"""Continuous batching and the prefix cache (wasi_nn/batch_scheduler.py, prefix_cache.py).

- Concurrent wasm guests on both engines (different prompts, a grammar, seeds, at once) each get the
  answer they get alone, and they were decoded in shared batches.
- A guest whose run times out mid-generation frees its sequence: a run queued behind it finishes.
- A cancelled request (a /v1 stream whose client leaves) leaves the batch; the others finish.
- The prefix cache reuses only a common token prefix: prompts that share a start and then differ, a
  prompt that is a prefix of another, and the same prompt twice give the answers a fresh context gives.
- Under a burst of long prompts the KV kept for reuse stays within its memory budget.

The tiny generated llama gives the same numbers whatever the batch, so answers are compared exactly;
Gemma 3 270M (slow) checks the real model.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from optional_support import need_llama_cpp, need_model

need_llama_cpp()

from engine_support import skip_without  # noqa: E402
from wasmflow.engine.base import RunRequest, Status  # noqa: E402
from wasmflow.flows.model import Allow, Flow, Limits  # noqa: E402
from wasmflow.host_functions import Host  # noqa: E402
from wasmflow.host_functions.spec import Event  # noqa: E402
from wasmflow.wasi_nn import ModelRegistry, WasiNNCapability  # noqa: E402
from wasmflow.wasi_nn.abi import Encoding, Target  # noqa: E402
from wasmflow.wasi_nn.generation import BatchedGeneration, complete  # noqa: E402
from wasmflow.wasi_nn.ggml_params import GgmlParams, apply_metadata  # noqa: E402
from wasmflow.wasi_nn.ggml_pool import GgmlModel  # noqa: E402
from wasmflow.wasi_nn.registry import ModelEntry  # noqa: E402
from wasmflow.wasi_nn.testmodels import write_tiny_llama  # noqa: E402

GEMMA = Path(__file__).resolve().parents[1] / ".wasmflow" / "models" / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("batching") / "tiny.gguf")


@pytest.fixture(scope="module")
def long_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny llama with an 8k training context: generating to its end takes far longer than a second."""
    return write_tiny_llama(tmp_path_factory.mktemp("batching-long") / "long.gguf", n_ctx=8192)


def entry(name: str, path: Path, **options: Any) -> ModelEntry:
    return ModelEntry(name, Encoding.GGML, Target.CPU, str(path), {"ctx-size": 512, **options})


class Guests:
    """One host and engine, as a wasmflow process has them, running `llama-chat` guests."""

    def __init__(self, registry: ModelRegistry, cache: Path, wasm: Path, engine: str) -> None:
        from wasmflow.engine import make_engine

        self.registry = registry
        self.host = Host([WasiNNCapability(registry)])
        self.engine = make_engine(engine, self.host, cache)
        self.module = self.engine.load(wasm, "batching")

    def chat(self, prompt: str, meta: dict[str, Any], model: str = "default", timeout: float = 120) -> Any:
        args = ["--json", "--model", model, "--metadata", json.dumps(meta), prompt]
        flow = Flow(name="batching", module="x.wasm", allow=Allow(models=[model]),
                    limits=Limits(timeout=timeout, memory="1GiB", output="16MiB"))
        return self.engine.run(self.module, RunRequest(flow=flow, event=Event(name="test"), args=args))

    def close(self) -> None:
        self.engine.close()
        self.host.close()


@pytest.fixture(params=["wasmtime", "wasmedge"])
def engine(request: pytest.FixtureRequest) -> str:
    skip_without(request.param)
    return str(request.param)


def text_of(result: Any) -> bytes:
    assert result.status is Status.OK, (result.status, result.error, result.stderr[-500:])
    return bytes.fromhex(json.loads(result.stdout)["text_hex"])


def settled(stats: Any) -> dict[str, Any]:
    """The model's figures once the decode thread has taken the last ended request out of its batch
    (it does so at its next step): `stats` is a callable returning a model's stats()."""
    deadline = time.monotonic() + 10
    while stats()["batching"]["sequences_busy"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return stats()  # type: ignore[no-any-return]


def at_once(jobs: list[Any]) -> list[Any]:
    """Run the callables in threads started together; their results in order."""
    out: list[Any] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def go(i: int) -> None:
        start.wait()
        out[i] = jobs[i]()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    return out


GRAMMAR = 'root ::= [abc]+ " " [abc]+'
JOBS = [
    ("once upon a time", {"temp": 0, "n-predict": 40}),
    ("the cat is a dog", {"temp": 0.9, "seed": 7, "n-predict": 32}),
    ("the cat is a dog", {"temp": 0.9, "seed": 8, "n-predict": 32}),
    ("hello world", {"temp": 0, "n-predict": 24, "grammar": GRAMMAR}),
    ("a story of the world", {"temp": 0, "n-predict": 30, "ignore-eos": True}),
]


def test_concurrent_guests_get_their_own_answers(engine: str, tiny: Path, guest_wasm: dict[str, Path],
                                                 tmp_path: Path) -> None:
    registry = ModelRegistry([entry("default", tiny)])
    guests = Guests(registry, tmp_path, guest_wasm["llama-chat"], engine)
    try:
        alone = [text_of(guests.chat(p, m)) for p, m in JOBS]
        together = at_once([lambda p=p, m=m: text_of(guests.chat(p, m)) for p, m in JOBS])
        assert together == alone
        assert alone[1] != alone[2]  # the seed is per request, even in one batch
        grammar_answer = alone[3].decode()
        assert grammar_answer and set(grammar_answer) <= set("abc "), grammar_answer
        stats = settled(lambda: registry.stats()["default"])
        assert stats["batching"]["batch_size_max"] >= 2  # they did share decode steps
        assert stats["busy"] == 0 and stats["batching"]["sequences_busy"] == 0
        assert stats["batching"]["tokens_generated"] >= sum(len(t) > 0 for t in alone)
    finally:
        guests.close()
        registry.close()


def test_a_guest_that_times_out_frees_its_sequence(engine: str, long_tiny: Path, guest_wasm: dict[str, Path],
                                                   tmp_path: Path) -> None:
    """One sequence: the run that holds it times out, and the run queued behind it then finishes."""
    registry = ModelRegistry([entry("default", long_tiny, sequences=1, **{"ctx-size": 8192})])
    guests = Guests(registry, tmp_path, guest_wasm["llama-chat"], engine)
    try:
        expected = text_of(guests.chat("hello world", {"temp": 0, "n-predict": 16}))
        endless = {"temp": 0, "n-predict": -1, "ignore-eos": True}

        def hog() -> Any:
            return guests.chat("once upon a time", endless, model="default", timeout=1.5)

        def queued() -> Any:
            time.sleep(0.3)  # after the hog has the sequence
            return guests.chat("hello world", {"temp": 0, "n-predict": 16})

        t0 = time.monotonic()
        hogged, behind = at_once([hog, queued])
        assert hogged.status is Status.TIMEOUT, (hogged.status, hogged.error)
        assert text_of(behind) == expected
        assert 1.5 <= time.monotonic() - t0 < 60
        stats = settled(lambda: registry.stats()["default"])["batching"]
        assert stats["cancelled"] >= 1 and stats["sequences_busy"] == 0 and stats["waiting"] == 0
    finally:
        guests.close()
        registry.close()


def test_a_cancelled_request_leaves_the_batch_and_the_others_finish(tiny: Path) -> None:
    base = apply_metadata(GgmlParams(), {"temp": 0, "ctx-size": 512})
    model = GgmlModel("tiny", str(tiny), base)
    try:
        endless = apply_metadata(base, {"n-predict": -1, "ignore-eos": True})
        short = apply_metadata(base, {"n-predict": 24})
        prompt = model.tokenize(b"hello world")
        expected = complete(model, short, prompt, [], wait=30).text
        def leaver() -> tuple[Any, threading.Event]:
            """A streaming request whose client goes away after five pieces, as /v1 sees it."""
            cancel = threading.Event()
            seen: list[str] = []

            def emit(text: str) -> None:
                seen.append(text)
                if len(seen) >= 5:
                    cancel.set()

            return complete(model, endless, model.tokenize(b"once upon a time"), [], wait=30, emit=emit, cancel=cancel), cancel

        left, cancel = leaver()
        assert cancel.is_set() and 5 <= left.completion_tokens < 400
        results = at_once([leaver, lambda: complete(model, short, prompt, [], wait=30)])
        assert results[0][1].is_set() and results[1].text == expected
        stats = settled(model.stats)
        assert stats["batching"]["cancelled"] >= 2 and stats["batching"]["sequences_busy"] == 0 and stats["busy"] == 0
    finally:
        model.close()


def generate(model: GgmlModel, text: str, n_predict: int = 24) -> tuple[str, int]:
    """Greedy text and how many prompt tokens came from the prefix cache."""
    params = apply_metadata(model.base, {"temp": 0, "n-predict": n_predict})
    sched = model.scheduler(params.instance)
    assert sched is not None
    gen = BatchedGeneration(sched, model.tokenize(text.encode()), params.sampling, params.instance.ctx_size, model=model)
    try:
        while gen.step()[0] == 0:
            pass
    finally:
        gen.close()
    return bytes(gen.text).decode("utf-8", "replace"), gen.reused


def test_the_prefix_cache_never_returns_another_prompts_state(tiny: Path) -> None:
    shared = "once upon a time the cat and the dog "
    prompts = [shared + "is a story", shared + "of the world", shared, shared + "is a story of it", shared + "is a story"]
    base = apply_metadata(GgmlParams(), {"ctx-size": 512})
    fresh = GgmlModel("fresh", str(tiny), base, batching=False)
    model = GgmlModel("cached", str(tiny), base)
    try:
        params = apply_metadata(base, {"temp": 0, "n-predict": 24})
        expected = [complete(fresh, params, fresh.tokenize(p.encode()), [], wait=30).text for p in prompts]
        assert len(set(expected)) >= 3  # the prompts do lead to different answers
        tokens = [model.tokenize(p.encode()) for p in prompts]
        got, reused = zip(*(generate(model, p) for p in prompts))
        assert list(got) == expected
        from wasmflow.wasi_nn.prefix_cache import common_prefix

        assert reused[0] == 0
        assert reused[1] == common_prefix(tokens[0], tokens[1])  # the shared start, not a token more
        assert reused[2] == len(tokens[2]) - 1  # a prefix of an earlier prompt: all but its last token
        assert reused[3] >= common_prefix(tokens[0], tokens[3]) > len(tokens[2])  # the longer of two matches
        assert reused[4] == len(tokens[4]) - 1  # the same prompt again
        # concurrently, with entries taken over and copied while others generate
        together = at_once([lambda p=p: generate(model, p)[0] for p in prompts])
        assert together == expected
        stats = model.stats()["batching"]
        assert stats["cache_hits"] >= 4 and stats["cache_saved_tokens"] >= sum(reused)
    finally:
        fresh.close()
        model.close()


def test_greedy_answers_match_the_sampler_chain_with_and_without_its_fast_path(tiny: Path) -> None:
    """Plain greedy requests skip llama.cpp's sampler chain for an argmax over the logits; a penalty or
    a grammar keeps the chain. Each answer equals the pooled context's (llama-cpp-python's chain)."""
    from wasmflow.wasi_nn.batch_scheduler import SeqRequest, _greedy

    base = apply_metadata(GgmlParams(), {"ctx-size": 512})
    pooled = GgmlModel("pooled", str(tiny), base, batching=False)
    batched = GgmlModel("batched", str(tiny), base)
    cases = [({"temp": 0}, True), ({"temp": 0, "repeat-penalty": 1.5}, False), ({"temp": 0, "grammar": GRAMMAR}, False)]
    try:
        prompt = "the cat is a dog and the dog"
        answers = []
        for meta, fast in cases:
            params = apply_metadata(base, {**meta, "n-predict": 32})
            grammar = object() if meta.get("grammar") else None
            assert _greedy(SeqRequest(prompt=[], sampling=params.sampling, n_ctx=512, grammar=grammar)) is fast
            want = complete(pooled, params, pooled.tokenize(prompt.encode()), [], wait=30).text
            assert complete(batched, params, batched.tokenize(prompt.encode()), [], wait=30).text == want
            answers.append(want)
        assert answers[0] != answers[1]  # the penalty did change the answer: the chain ran
    finally:
        pooled.close()
        batched.close()


def test_the_prefix_cache_stays_within_its_memory_budget(tiny: Path) -> None:
    budget = 320 << 10  # about two of the burst's prompts (the tiny llama's KV is ~0.5 KiB a token)
    base = apply_metadata(GgmlParams(), {"ctx-size": 512, "temp": 0})
    model = GgmlModel("burst", str(tiny), base, cache_bytes=budget)
    try:
        params = apply_metadata(base, {"n-predict": 8, "ignore-eos": True})
        words = "the cat is a dog and it is a story of the world once upon a time".split()
        prompts = [" ".join(words[(i + j) % len(words)] for j in range(90)) + f" {i}" for i in range(8)]
        answers = at_once([lambda p=p: complete(model, params, model.tokenize(p.encode()), [], wait=60) for p in prompts])
        assert all(a.completion_tokens == 8 for a in answers)
        sched = model.scheduler(params.instance)
        assert sched is not None
        held = sched.cache_state_bytes()
        stats = model.stats()["batching"]
        assert 0 < held <= budget, (held, budget)
        assert stats["cache_evictions"] >= 1 and stats["cache_bytes"] == held and 1 <= stats["cache_entries"] < len(prompts)
        # the context itself holds nothing of finished requests: their cells are free for the next ones
        lc = sched._lc
        assert all(lc.llama_memory_seq_pos_max(sched._kv.mem, s.seq) == -1 for s in sched.cache.slots)
        assert stats["prompt_tokens_evaluated"] >= sum(len(model.tokenize(p.encode())) for p in prompts) // 2
    finally:
        model.close()


def test_batching_options_are_checked(tiny: Path) -> None:
    from wasmflow.wasi_nn import NNFailure
    from wasmflow.wasi_nn.batch_scheduler import batching_options

    assert batching_options({"sequences": 4, "prefix-cache-mib": 1, "batching": False}) == {
        "sequences": 4, "cache_bytes": 1 << 20, "batching": False}
    for bad in ({"sequences": 0}, {"sequences": "4"}, {"batching": "yes"}, {"kv-size": 1.5}):
        with pytest.raises(NNFailure):
            batching_options(bad)
    registry = ModelRegistry([entry("off", tiny, batching=False)])
    try:
        assert registry.model("off").scheduler() is None  # the pooled path, a context per request
    finally:
        registry.close()


@pytest.mark.slow
def test_gemma_concurrent_answers_and_a_reused_review_prefix() -> None:
    need_model(GEMMA, "gemma")
    base = apply_metadata(GgmlParams(), {"ctx-size": 1024, "threads": 2, "temp": 0})
    model = GgmlModel("gemma", str(GEMMA), base)
    single = GgmlModel("gemma-single", str(GEMMA), base, batching=False)
    try:
        params = apply_metadata(base, {"n-predict": 24})
        questions = ["The capital of France is", "Water boils at", "The largest planet is", "Two plus two is"]
        alone = [complete(single, params, single.tokenize(q.encode()), [], wait=60).text for q in questions]
        together = at_once([lambda q=q: complete(model, params, model.tokenize(q.encode()), [], wait=120).text
                            for q in questions])
        for a, b in zip(alone, together):  # batched arithmetic may round differently late in an answer
            assert a[:12] == b[:12], (a, b)
        instructions = "You review pull requests. Point out bugs, missing tests and unclear names. " * 12
        first = model.tokenize(f"{instructions}\nDiff:\n+ x = 1\n".encode())
        second = model.tokenize(f"{instructions}\nDiff:\n+ y = 2\n".encode())
        review = apply_metadata(base, {"n-predict": 1})
        t0 = time.monotonic()
        complete(model, review, first, [], wait=60)
        cold = time.monotonic() - t0
        saved_before = model.stats()["batching"]["cache_saved_tokens"]
        t0 = time.monotonic()
        complete(model, review, second, [], wait=60)
        warm = time.monotonic() - t0
        from wasmflow.wasi_nn.prefix_cache import common_prefix

        assert model.stats()["batching"]["cache_saved_tokens"] - saved_before == common_prefix(first, second)
        assert warm < cold
    finally:
        model.close()
        single.close()


def test_metrics_export_the_serving_figures(tiny: Path) -> None:
    from wasmflow.platform.metrics import Metrics

    registry = ModelRegistry([entry("tiny", tiny)])
    metrics = Metrics()
    metrics.watch_models(registry.stats)
    try:
        assert b'wasmflow_llm_tokens_generated_total{model="tiny"}' not in metrics.render()  # not loaded yet
        model = registry.model("tiny")
        params = apply_metadata(model.base, {"temp": 0, "n-predict": 12, "ignore-eos": True})
        prompt = model.tokenize(b"once upon a time the cat")
        at_once([lambda: complete(model, params, prompt, [], wait=30) for _ in range(3)])
        complete(model, params, prompt, [], wait=30)  # the same prompt again: from the cache
        settled(model.stats)
        text = metrics.render().decode()
        figures = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("wasmflow_llm_") and 'model="tiny"' in line}
        assert figures["wasmflow_llm_tokens_generated_total"] == 48
        assert figures["wasmflow_llm_prefix_cache_hits_total"] >= 1
        assert figures["wasmflow_llm_prefix_cache_saved_tokens_total"] >= len(prompt) - 1
        assert figures["wasmflow_llm_sequences_busy"] == 0 and figures["wasmflow_llm_tokens_per_second"] > 0
        assert figures["wasmflow_llm_batch_size_mean"] >= 1
    finally:
        registry.close()


def test_a_request_that_cannot_get_a_sequence_in_time_is_busy(long_tiny: Path) -> None:
    from wasmflow.wasi_nn import NNError, NNFailure

    base = apply_metadata(GgmlParams(), {"temp": 0, "ctx-size": 8192})
    model = GgmlModel("one", str(long_tiny), base, sequences=1)
    try:
        endless = apply_metadata(base, {"n-predict": -1, "ignore-eos": True})
        cancel = threading.Event()
        started = threading.Event()
        hog = threading.Thread(target=lambda: complete(model, endless, model.tokenize(b"once upon a time"), [], wait=30,
                                                       emit=lambda _t: started.set(), cancel=cancel))
        hog.start()
        assert started.wait(30)
        t0 = time.monotonic()
        with pytest.raises(NNFailure) as exc:
            complete(model, base, model.tokenize(b"hello"), [], wait=0.5)
        assert exc.value.code == NNError.BUSY and 0.4 < time.monotonic() - t0 < 5
        cancel.set()
        hog.join(30)
        assert settled(model.stats)["batching"]["waiting"] == 0
    finally:
        cancel.set()
        model.close()
