"""The `ggml` back end of WASI-NN: an execution context over a GGUF model, as WasmEdge's GGML plugin has it.

What a guest sees (docs/wasi-nn.md): input index 1 is JSON metadata, any other index the prompt;
output 0 the generated text (or the embedding JSON), output 1 the token counts; streaming through
compute_single / get_output_single / fini_single; codes 100/101/102/103. Parameters live in
`ggml_params`, models and their pools of llama contexts in `ggml_pool`, the token loop and the
embedding in `generation` (shared with the LLM host functions and `/v1`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .abi import NNError, NNFailure
from .generation import Generation, Stream, embed_tokens, open_generation, token_piece
from .ggml_params import GgmlParams, InstanceParams, SamplingParams, apply_metadata, parse_metadata_bytes
from .ggml_pool import LLAMA_BUILD_NUMBER, GgmlModel, Lease, LlamaPool, VocabOnly, borrow, gpu_offload_supported, llama_commit

__all__ = [  # the names callers imported from here before the split
    "GgmlExecution", "Generation", "embed_tokens", "token_piece", "GgmlParams", "InstanceParams", "SamplingParams",
    "apply_metadata", "parse_metadata_bytes", "GgmlModel", "LlamaPool", "VocabOnly", "gpu_offload_supported", "llama_commit",
]


@dataclass
class GgmlExecution:
    """A WASI-NN execution context on a GGML graph (per run, never shared)."""

    model: GgmlModel
    params: GgmlParams
    write_stdout: Callable[[bytes], None]
    deadline: Callable[[], float]  # seconds left in the run (queueing on the pool, decode steps)
    memory: Optional[int] = None  # the flow's memory limit: a guest's GGUF contexts must fit in it
    prompt: list[int] = field(default_factory=list)
    output: bytes = b""
    output_tokens: int = 0
    last_piece: bytes = b""
    _stream: Optional[Stream] = None
    _lease: Optional[Lease] = None  # an embedding's context

    # -- inputs ------------------------------------------------------------------------------

    def set_input(self, index: int, data: bytes) -> None:
        if index == 1:
            self.params = parse_metadata_bytes(self.params, data)
            return
        self._end_stream()
        self.prompt = self.model.tokenize(bytes(data))
        self.output = b""
        self.output_tokens = 0
        self.last_piece = b""

    # -- borrowing a llama context -----------------------------------------------------------

    def _borrow(self) -> Any:
        if self._lease is None:
            self._lease = borrow(self.model, self.params.instance, self.deadline(), self.deadline, self.memory)
        return self._lease.llama

    def _give_back(self) -> None:
        if self._lease is not None:
            lease, self._lease = self._lease, None
            lease.release()

    def _end_stream(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._give_back()

    # -- compute -----------------------------------------------------------------------------

    def compute(self) -> NNError:
        if not self.prompt:
            raise NNFailure(NNError.INVALID_ARGUMENT, "llama input is not set")
        self._end_stream()
        if self.params.instance.embedding:
            llama = self._borrow()
            try:
                vec = embed_tokens(llama, self.prompt, self.deadline)
            finally:
                self._give_back()
            self.output = json.dumps({"n_embedding": len(vec), "embedding": vec}, separators=(",", ":")).encode()
            self.output_tokens = 0
            return NNError.SUCCESS
        stream = self._open()
        gen = stream.gen
        try:
            while True:
                code, piece = gen.step()
                if piece and self.params.sampling.stream_stdout:
                    self.write_stdout(piece)
                if code != NNError.SUCCESS or gen.done is not None:
                    break
        finally:
            stream.close()
        self.output = bytes(gen.text)
        self.output_tokens = len(gen.tokens)
        final = gen.done or NNError.END_OF_SEQUENCE
        return NNError.SUCCESS if final == NNError.END_OF_SEQUENCE else final

    def _open(self) -> Stream:
        """A generation of the prompt: on the model's batch scheduler, or on a borrowed context."""
        return open_generation(self.model, self.params, self.prompt, self.deadline(), self.deadline, self.memory)

    def compute_single(self) -> NNError:
        if not self.prompt:
            raise NNFailure(NNError.INVALID_ARGUMENT, "llama input is not set")
        if self.params.instance.embedding:
            raise NNFailure(NNError.UNSUPPORTED_OPERATION, "compute_single does not apply to embeddings")
        if self._stream is None:
            self._stream = self._open()
            self.output = b""
            self.output_tokens = 0
        code, piece = self._stream.gen.step()
        self.last_piece = piece
        if code == NNError.SUCCESS:
            self.output += piece
            self.output_tokens = len(self._stream.gen.tokens)
            if piece and self.params.sampling.stream_stdout:
                self.write_stdout(piece)
        return code

    def fini_single(self) -> None:
        """Clear outputs, reset the sampler and the position, give the llama context back."""
        self._end_stream()
        self.output = b""
        self.output_tokens = 0
        self.last_piece = b""

    # -- outputs -----------------------------------------------------------------------------

    def metadata_output(self) -> bytes:
        return json.dumps(
            {
                "input_tokens": len(self.prompt),
                "output_tokens": self.output_tokens,
                "llama_build_number": LLAMA_BUILD_NUMBER,
                "llama_commit": llama_commit(),
            }
        ).encode()

    def get_output(self, index: int) -> bytes:
        return self.metadata_output() if index == 1 else self.output

    def get_output_single(self, index: int) -> bytes:
        return self.metadata_output() if index == 1 else self.last_piece

    def close(self) -> None:
        self._end_stream()
