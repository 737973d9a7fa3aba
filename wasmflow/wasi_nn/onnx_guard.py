"""Checks on ONNX graphs that a guest supplies: no host files, bounded memory, bounded uninterruptible work.

`vet` runs once per model (in a capped child, see isolate.py) before the host gives the bytes to ONNX
Runtime:

- nothing in the model may name a file: a tensor with `data_location: EXTERNAL` (ONNX Runtime reads it
  relative to the working directory, or from a raw address with its in-memory marker) anywhere, that is
  initializers, sparse initializers, tensor attributes of nodes, subgraphs of If/Loop/Scan, functions and
  training graphs; and no `EPContext` node (it names a compiled-model cache). `metadata_props` are
  dropped (ONNX Runtime can read session options from them).
- what the model holds and what creating a session needs are measured: constants (dense size of every
  tensor, sparse ones included), the largest tensor whose shape is fixed by the graph itself, and the
  peak memory of a real session created in the child.

`bound` runs (also in a child, once per distinct set of input shapes) before a compute, with the
guest's real input shapes and the values of its small integer inputs; shape inference with data
propagation, and evaluating the graph's small shape computations (`_fold_shapes`), resolve what the
graph will allocate: the peak of live tensors over the node order, and
the multiply-accumulates of the heaviest node (a single ONNX Runtime kernel cannot be interrupted, so
one too heavy to finish before the deadline is refused). A tensor whose size still depends on data the
guest controls (or that is not a tensor at all: sequences, maps, strings) is unbounded and refused.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional

from .abi import NNError
from .isolate import Refusal

STRIPPED_KEY = "wasmflow.stripped"  # metadata of a skeleton: the initializers turned into typed inputs
SMALL_INIT = 4096  # bytes: initializers up to this size keep their values in the skeleton (shape constants)
SMALL_FEED = 64  # elements: integer inputs up to this size are given to shape inference as values
# Constant folding runs kernels while a session is created, where no deadline can stop them: a
# guest's graph computes only in `run`, between whose nodes the deadline is checked.
GUEST_DISABLED_OPTIMIZERS = ["ConstantFolding"]
NO_EXTERNAL_DIR = "/dev/null/wasmflow-guest-models-have-no-external-data"  # a folder that cannot exist


@dataclass(frozen=True)
class Vetted:
    """What the child hands back for a model it accepted."""

    model: bytes  # what the host gives ONNX Runtime: the checked graph, re-serialized
    skeleton: bytes  # the graph without large initializer data, for `bound`
    constants: int  # bytes of every tensor the model holds (dense)
    largest_fixed: int  # bytes of the largest tensor whose shape the graph fixes by itself
    largest_fixed_name: str


@dataclass(frozen=True)
class RunBound:
    peak: int  # bytes of tensors alive at once (inputs and intermediates; constants not included)
    heaviest_macs: int
    heaviest_node: str


# -- helpers (child side) ---------------------------------------------------------------------


def _itemsize(elem_type: int) -> Optional[int]:
    """Bytes per element of an ONNX tensor type; None for strings and unknown types."""
    from onnx import TensorProto, helper

    if elem_type in (TensorProto.STRING, TensorProto.UNDEFINED):
        return None
    try:
        return max(1, int(helper.tensor_dtype_to_np_dtype(elem_type).itemsize))
    except Exception:
        return 16


def _tensor_bytes(t: Any, where: str) -> int:
    """Dense size of a TensorProto from its dims (what ONNX Runtime allocates for it)."""
    from onnx import TensorProto

    if any(d < 0 for d in t.dims):
        raise Refusal("invalid", f"{where}: negative dims {list(t.dims)}")
    if t.data_type == TensorProto.STRING:
        return sum(len(s) + 32 for s in t.string_data)
    return math.prod(t.dims) * (_itemsize(t.data_type) or 16)


def _graph_tensors(graph: Any, where: str) -> Iterator[tuple[str, Any, bool]]:
    """(where, TensorProto, is_sparse_part) for every tensor a graph holds, subgraphs included."""
    for t in graph.initializer:
        yield f"{where}initializer {t.name!r}", t, False
    for s in graph.sparse_initializer:
        yield f"{where}sparse initializer {s.values.name!r}", s, True
    yield from _node_tensors(graph.node, where)


def _node_tensors(nodes: Any, where: str) -> Iterator[tuple[str, Any, bool]]:
    for node in nodes:
        here = f"{where}node {node.name or node.op_type!r}"
        if node.op_type == "EPContext":
            raise Refusal("denied", f"{here}: EPContext nodes name a compiled-model file; a guest's model may not have them")
        for attr in node.attribute:
            if attr.HasField("t"):
                yield f"{here} attribute {attr.name!r}", attr.t, False
            for t in attr.tensors:
                yield f"{here} attribute {attr.name!r}", t, False
            if attr.HasField("sparse_tensor"):
                yield f"{here} attribute {attr.name!r}", attr.sparse_tensor, True
            for s in attr.sparse_tensors:
                yield f"{here} attribute {attr.name!r}", s, True
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g, f"{here}/{attr.name}: ")
            for i, g in enumerate(attr.graphs):
                yield from _graph_tensors(g, f"{here}/{attr.name}[{i}]: ")


def _model_tensors(model: Any) -> Iterator[tuple[str, Any, bool]]:
    yield from _graph_tensors(model.graph, "")
    for fn in model.functions:
        yield from _node_tensors(fn.node, f"function {fn.name!r}: ")
    for i, info in enumerate(model.training_info):
        yield from _graph_tensors(info.initialization, f"training_info[{i}].initialization: ")
        yield from _graph_tensors(info.algorithm, f"training_info[{i}].algorithm: ")


def _check_tensor(where: str, t: Any) -> None:
    from onnx import TensorProto

    if t.data_location == TensorProto.EXTERNAL or len(t.external_data):
        location = next((e.value for e in t.external_data if e.key == "location"), "?")
        raise Refusal("denied", f"{where}: external data ({location!r}) names a file; a guest's model must carry its data")


def _holdings(model: Any) -> int:
    """Check every tensor of the model for file references; the dense bytes of all of them."""
    total = 0
    for where, t, sparse in _model_tensors(model):
        if sparse:
            _check_tensor(where, t.values)
            _check_tensor(where, t.indices)
            if any(d < 0 for d in t.dims):
                raise Refusal("invalid", f"{where}: negative dims {list(t.dims)}")
            total += math.prod(t.dims) * (_itemsize(t.values.data_type) or 16)  # densified on load
            total += _tensor_bytes(t.indices, where)
        else:
            _check_tensor(where, t)
            total += _tensor_bytes(t, where)
    return total


def _type_bytes(tp: Any) -> Optional[int]:
    """Bytes of a value of this TypeProto, None when not a tensor of fully known shape."""
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    size = _itemsize(tp.tensor_type.elem_type)
    if size is None:
        return None
    n = 1
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value") or d.dim_value < 0:
            return None
        n *= d.dim_value
    return n * size


def _type_dims(tp: Any) -> Optional[list[int]]:
    if not tp.HasField("tensor_type") or not tp.tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tp.tensor_type.shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(d.dim_value)
    return dims


def _subgraphs(node: Any) -> list[Any]:
    out = []
    for attr in node.attribute:
        if attr.HasField("g"):
            out.append(attr.g)
        out.extend(attr.graphs)
    return out


def _collect_types(graph: Any, types: dict[str, Any]) -> None:
    """name -> TypeProto for every value of a graph and its subgraphs (initializers as tensor types)."""
    from onnx import helper

    for t in graph.initializer:
        types.setdefault(t.name, helper.make_tensor_type_proto(t.data_type, list(t.dims)))
    for vi in (*graph.input, *graph.value_info, *graph.output):
        if vi.type.ByteSize():
            types[vi.name] = vi.type
    for node in graph.node:
        for sub in _subgraphs(node):
            _collect_types(sub, types)


def _skeleton(model: Any) -> Any:
    """The model with large initializers replaced by typed graph inputs (their shapes, not their bytes)."""
    import onnx
    from onnx import helper

    sk = onnx.ModelProto()
    sk.CopyFrom(model)
    g = sk.graph
    inputs = {i.name for i in g.input}
    keep, stripped = [], []
    for t in g.initializer:
        if _tensor_bytes(t, t.name) <= SMALL_INIT:
            keep.append(t)
            continue
        stripped.append(t.name)
        if t.name not in inputs:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    del g.initializer[:]
    g.initializer.extend(keep)
    entry = sk.metadata_props.add()
    entry.key, entry.value = STRIPPED_KEY, json.dumps(stripped)
    return sk


def _infer(model: Any) -> Any:
    import onnx

    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except MemoryError:
        raise
    except Exception as exc:
        text = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        if "bad_alloc" in text:
            raise MemoryError(text) from None
        raise Refusal("invalid", f"shape inference failed: {text}") from None


def guest_session_options(threads: int = 1) -> Any:
    """SessionOptions for a guest's graph: one thread, ONNX format only, no external data, quiet."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 4
    so.add_session_config_entry("session.load_model_format", "ONNX")
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", NO_EXTERNAL_DIR)
    return so


# -- the two checks (run in the child) --------------------------------------------------------


def vet(data: bytes, memory: int) -> Vetted:
    """Parse and check a guest's model; create a session from it (in this capped child) to learn that
    creating one in the host stays within `memory`, the loading flow's limit."""
    import onnx
    import onnxruntime as ort

    model = onnx.ModelProto()
    try:
        model.ParseFromString(data)
    except Exception as exc:
        raise Refusal("invalid", f"not an ONNX model: {str(exc)[:200]}") from None
    if not model.HasField("graph"):
        raise Refusal("invalid", "not an ONNX model: it has no graph")
    constants = _holdings(model)
    model.ClearField("metadata_props")
    clean = model.SerializeToString()
    skeleton = _skeleton(model)
    inferred = _infer(skeleton)
    types: dict[str, Any] = {}
    _collect_types(inferred.graph, types)
    largest, largest_name = 0, ""
    for name, tp in types.items():
        size = _type_bytes(tp)
        if size is not None and size > largest:
            largest, largest_name = size, name
    _within(constants, memory, "of constants (sparse ones densified)")
    _within(largest, memory, f"in tensor {largest_name!r}, whose shape the graph fixes")
    try:
        ort.InferenceSession(clean, sess_options=guest_session_options(), providers=["CPUExecutionProvider"],
                             disabled_optimizers=GUEST_DISABLED_OPTIMIZERS)
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "External data" in text or "external data" in text:
            raise Refusal("denied", f"the model refers to external data: {text[:300]}") from None
        raise
    return Vetted(clean, skeleton.SerializeToString(), constants, largest, largest_name)


def _within(size: int, memory: int, what: str) -> None:
    if size > memory:
        raise Refusal("oom", f"the guest's graph has {size / 1024**2:.1f} MiB {what}, over the flow's memory limit of "
                             f"{memory / 1024**2:.1f} MiB", NNError.TOO_LARGE)


def bound(skeleton: bytes, feeds: list[tuple[str, str, tuple[int, ...], Optional[bytes]]]) -> RunBound:
    """Memory and heaviest node of one compute: `feeds` are (name, numpy dtype, shape, raw values of a
    small integer input or None)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    sk = onnx.ModelProto()
    sk.ParseFromString(skeleton)
    stripped = set(json.loads(next((p.value for p in sk.metadata_props if p.key == STRIPPED_KEY), "[]")))
    g = sk.graph
    by_name = {f[0]: f for f in feeds}
    kept_inputs = []
    for inp in g.input:
        feed = by_name.get(inp.name)
        if feed is None:
            kept_inputs.append(inp)
            continue
        name, dtype, shape, values = feed
        if values is not None:
            arr = np.frombuffer(values, dtype=np.dtype(dtype)).reshape(shape)
            g.initializer.append(numpy_helper.from_array(arr, name))
            continue
        dims = inp.type.tensor_type.shape.dim
        del dims[:]
        for d in shape:
            dims.add().dim_value = int(d)
        kept_inputs.append(inp)
    del g.input[:]
    g.input.extend(kept_inputs)
    inferred = _fold_shapes(sk)
    types: dict[str, Any] = {}
    _collect_types(inferred.graph, types)
    skip = stripped | {t.name for t in inferred.graph.initializer}
    heaviest = [0, ""]
    peak = _peak(inferred.graph, types, skip, heaviest)
    return RunBound(peak, heaviest[0], heaviest[1])


# Cheap operators on small integer tensors: what exported graphs compute shapes with.
_FOLDABLE = {"Shape", "Size", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice", "Cast", "Add", "Sub", "Mul", "Div",
             "Range", "Equal", "Less", "Greater", "Where", "Not", "And", "Or", "ConstantOfShape", "Reshape", "Identity",
             "ReduceProd", "ReduceSum", "Min", "Max", "Neg", "Abs", "Floor", "Ceil", "Expand", "Tile", "Constant"}
MAX_FOLD_ROUNDS = 8


def _fold_shapes(model: Any) -> Any:
    """Shape inference, with the small shape computations of the top-level graph evaluated.

    ONNX's data propagation follows Shape -> Gather -> Concat but not, say, Range(0, seq_len) or
    arithmetic on several sizes, which exported graphs use; without their values the sizes after them
    would be unknown. Nodes whose inputs are known small tensors and whose outputs are small are
    evaluated (onnx's reference evaluator, one node at a time), become initializers, and inference runs
    again, until nothing more folds. Outputs that would be large are never computed."""
    import numpy as np
    from onnx import numpy_helper

    for _ in range(MAX_FOLD_ROUNDS):
        inferred = _infer(model)
        types: dict[str, Any] = {}
        _collect_types(inferred.graph, types)
        values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer if math.prod(t.dims) <= SMALL_FEED}
        folded: dict[str, Any] = {}
        keep = []
        for node in model.graph.node:
            outs = _fold_node(node, types, {**values, **folded}, model.opset_import)
            if outs is None:
                keep.append(node)
                continue
            folded.update(outs)
        if not folded:
            return inferred
        del model.graph.node[:]
        model.graph.node.extend(keep)
        for name, arr in folded.items():
            model.graph.initializer.append(numpy_helper.from_array(np.asarray(arr), name))
    return _infer(model)


def _fold_node(node: Any, types: dict[str, Any], values: dict[str, Any], opsets: Any) -> Optional[dict[str, Any]]:
    """The outputs of `node` evaluated, when it is a cheap operator on known small values; else None."""
    import numpy as np

    if node.op_type not in _FOLDABLE or node.domain not in ("", "ai.onnx") or _subgraphs(node):
        return None
    if node.op_type in ("Shape", "Size"):
        dims = _type_dims(types[node.input[0]]) if node.input and node.input[0] in types else None
        if dims is None:
            return None
        if node.op_type == "Size":
            return {node.output[0]: np.array(math.prod(dims), np.int64)}
        attrs = {a.name: a.i for a in node.attribute}
        return {node.output[0]: np.array(dims, np.int64)[attrs.get("start", 0) : attrs.get("end", len(dims))]}
    inputs = [n for n in node.input if n]
    if any(n not in values for n in inputs):
        return None
    args = [values[n] for n in inputs]
    if not _small_result(node.op_type, args):
        return None
    from onnx import helper
    from onnx.reference import ReferenceEvaluator

    graph = helper.make_graph([node], "fold", [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(values[n].dtype), None)
                                               for n in inputs],
                              [helper.make_tensor_value_info(o, 0, None) for o in node.output if o])
    try:
        outs = ReferenceEvaluator(helper.make_model(graph, opset_imports=list(opsets))).run(None, dict(zip(inputs, args)))
    except Exception:
        return None
    result = {o: np.asarray(v) for o, v in zip([o for o in node.output if o], outs)}
    if any(v.size > SMALL_FEED or v.dtype.kind not in "biuf" for v in result.values()):
        return None
    return result


def _small_result(op: str, args: list[Any]) -> bool:
    """Whether an operator whose output can be larger than its inputs stays small here."""
    import numpy as np

    try:
        if op == "ConstantOfShape":
            return math.prod(int(d) for d in np.ravel(args[0])) <= SMALL_FEED
        if op == "Range":
            start, limit, delta = (float(np.ravel(a)[0]) for a in args[:3])
            return delta != 0 and math.isfinite((limit - start) / delta) and math.ceil(max(0.0, (limit - start) / delta)) <= SMALL_FEED
        if op == "Expand":
            shape = np.broadcast_shapes(args[0].shape, tuple(int(d) for d in np.ravel(args[1])))
            return math.prod(shape) <= SMALL_FEED
        if op == "Tile":
            return args[0].size * math.prod(int(d) for d in np.ravel(args[1])) <= SMALL_FEED
    except (ValueError, IndexError, OverflowError, TypeError):
        return False
    return True


def _uses(node: Any) -> set[str]:
    """Every name a node reads, including outer-scope names its subgraphs read."""
    names = {n for n in node.input if n}
    for sub in _subgraphs(node):
        for inner in sub.node:
            names |= _uses(inner)
        names |= {o.name for o in sub.output}
    return names


def _peak(graph: Any, types: dict[str, Any], skip: set[str], heaviest: list[Any]) -> int:
    """Peak bytes of a graph's inputs (constants aside) and of the tensors it produces while it runs,
    each freed after its last use (outer-scope names are the enclosing graph's to count)."""
    last: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for name in _uses(node):
            last[name] = i
    kept = {o.name for o in graph.output}
    live: dict[str, int] = {}
    for inp in graph.input:
        if inp.name in skip or inp.name in live:
            continue
        live[inp.name] = _size(inp.name, types, "input")
    current = sum(live.values())
    peak = current
    for i, node in enumerate(graph.node):
        label = node.name or node.op_type
        for out in node.output:
            if out:
                live[out] = _size(out, types, f"output of {node.op_type} node {label!r}")
                current += live[out]
        inner = max((_peak(sub, types, skip, heaviest) for sub in _subgraphs(node)), default=0)
        macs = _macs(node, types)
        if macs > heaviest[0]:
            heaviest[0], heaviest[1] = macs, f"{node.op_type} node {label!r}"
        peak = max(peak, current + inner)
        for name in [n for n in live if (last.get(n, -1) <= i) and n not in kept]:
            current -= live.pop(name)
    return peak


def _size(name: str, types: dict[str, Any], what: str) -> int:
    tp = types.get(name)
    size = _type_bytes(tp) if tp is not None else None
    if size is None:
        raise Refusal("oom", f"the size of {name!r} ({what}) depends on data the guest controls, so the host cannot "
                              f"hold it to the flow's memory limit; a guest's graph must have every tensor's size follow "
                              f"from its input shapes",
                      NNError.TOO_LARGE)
    return size


def _macs(node: Any, types: dict[str, Any]) -> int:
    """Multiply-accumulates of the node kinds whose single kernel can run for long (0 for the rest,
    whose work is linear in the tensors already bounded)."""

    def dims(i: int) -> list[int]:
        if i >= len(node.input) or not node.input[i] or node.input[i] not in types:
            return []
        return _type_dims(types[node.input[i]]) or []

    def out() -> list[int]:
        return (_type_dims(types[node.output[0]]) or []) if node.output and node.output[0] in types else []

    op = node.op_type
    if op in ("MatMul", "MatMulInteger", "FusedMatMul", "QLinearMatMul"):
        a = dims(0)
        return math.prod(out()) * (a[-1] if a else 1)
    if op == "Gemm":
        a = dims(0)
        trans = any(x.name == "transA" and x.i for x in node.attribute)
        k = (a[0] if trans else a[-1]) if a else 1
        return math.prod(out()) * k
    if op in ("Conv", "ConvInteger", "FusedConv", "NhwcConv"):
        w = dims(1)
        return math.prod(out()) * math.prod(w[1:])
    if op == "QLinearConv":
        w = dims(3)
        return math.prod(out()) * math.prod(w[1:])
    if op == "ConvTranspose":
        return math.prod(dims(0)) * math.prod(dims(1)[1:])
    if op in ("LSTM", "GRU", "RNN"):
        x, w, r = dims(0), dims(1), dims(2)
        return math.prod(x[:2]) * (math.prod(w) + math.prod(r))
    if op == "Einsum":
        return _einsum_macs(node, [dims(i) for i in range(len(node.input))])
    if op in ("Attention", "MultiHeadAttention", "GroupQueryAttention"):
        q, k = dims(0), dims(1)
        return 2 * math.prod(q) * (max(k[-2:-1] or [1]) if len(k) == 4 else (k[1] if len(k) > 1 else 1))
    return 0


def _einsum_macs(node: Any, shapes: list[list[int]]) -> int:
    equation = next((a.s.decode() for a in node.attribute if a.name == "equation"), "")
    lhs = equation.replace(" ", "").split("->")[0]
    sizes: dict[str, int] = {}
    ellipsis = 1
    for term, shape in zip(lhs.split(","), shapes):
        letters = term.replace("...", "")
        extra = len(shape) - len(letters)
        if "..." in term and extra > 0:
            at = term.index("...")
            ellipsis = max(ellipsis, math.prod(shape[at : at + extra]))
            shape = shape[:at] + shape[at + extra :]
        for ch, d in zip(letters, shape):
            sizes[ch] = max(sizes.get(ch, 1), d)
    return math.prod(sizes.values()) * ellipsis


__all__ = ["Vetted", "RunBound", "vet", "bound", "guest_session_options", "NO_EXTERNAL_DIR"]
