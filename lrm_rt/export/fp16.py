"""Float32 -> float16 ONNX conversion that keeps the numerically fragile ops in float32.

Written here instead of using onnxconverter-common so the runtime has no extra dependency and the
rule set is the one the TensorRT builder applies too (``FP32_OPS``):

* LayerNorm / InstanceNorm (TripoSR's GroupNorm) / Softmax / Exp / Log / Pow / Sqrt / reductions run
  in float32: variances and exponentials overflow or underflow in fp16 (TripoSR's ViT LayerNorm eps
  1e-12 is 0 in fp16; runtime-anchors §0.3).
* The final ConvTranspose upsampler runs in float32 and the graph inputs and outputs stay float32, so
  the triplane handed to the field kernels is float32 end to end (§0.2: triplane values reach ~1e3,
  where fp16 spacing is ~1).
* Pure data-movement ops (Reshape, Transpose, ...) keep whatever precision their input has, so no
  cast round trip is inserted after an fp32 op.

Everything else (MatMul, Gemm, Conv, Add, Mul, Erf/GELU, ...) runs in float16, with Cast nodes at the
boundaries. On ONNX Runtime's CPU provider, ops without an fp16 kernel are wrapped in casts by ORT
itself, so a CPU run reproduces the fp16 rounding between ops but not fp16 accumulation inside them.
"""
from __future__ import annotations

from typing import Dict, Iterable, Optional, Set, Tuple

import numpy as np

FP32_OPS = frozenset({
    "LayerNormalization", "InstanceNormalization", "GroupNormalization", "BatchNormalization",
    "Softmax", "LogSoftmax", "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
    "ReduceMean", "ReduceSum", "ReduceSumSquare", "ReduceL2", "ReduceLogSumExp",
    "ConvTranspose",
})
# Ops whose float output is its (first) input rearranged: they follow their input's precision.
PASSTHROUGH_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Slice", "Gather",
    "Expand", "Split", "Tile", "DepthToSpace", "SpaceToDepth",
})


def _float_types(model) -> Dict[str, int]:
    """Element type of every tensor name (after shape inference)."""
    import onnx
    from onnx import helper

    # Shape inference serialises the model (2 GB protobuf limit): run it on a copy whose large weights
    # are turned into typed graph inputs, which is all type inference needs.
    probe = helper.make_model(helper.make_graph(
        list(model.graph.node), "probe",
        list(model.graph.input) + [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                                   for t in model.graph.initializer if len(t.raw_data) > 4096],
        list(model.graph.output),
        [t for t in model.graph.initializer if len(t.raw_data) <= 4096]), opset_imports=model.opset_import)
    inferred = onnx.shape_inference.infer_shapes(probe, strict_mode=False)
    g = inferred.graph
    types: Dict[str, int] = {}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        types[vi.name] = vi.type.tensor_type.elem_type
    for init in g.initializer:
        types[init.name] = init.data_type
    for node in g.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    types[node.output[0]] = a.t.data_type
    return types


def convert_to_fp16(model, fp32_ops: Iterable[str] = FP32_OPS, keep_io_fp32: bool = True):
    """Return a new ModelProto with float tensors in float16 except around ``fp32_ops`` (see module doc).

    ``model`` must be a float32 graph with external data already loaded; it is not modified.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    F32, F16 = TensorProto.FLOAT, TensorProto.FLOAT16
    fp32_ops = frozenset(fp32_ops)
    src, model = model, onnx.ModelProto()
    model.CopyFrom(src)  # in-memory copy: no serialisation, so no 2 GB limit
    g = model.graph
    types = _float_types(model)
    is_float = lambda name: types.get(name) in (F32, F16)  # noqa: E731

    inits = {t.name: t for t in g.initializer}
    const_nodes = {n.output[0]: n for n in g.node if n.op_type == "Constant"}
    prec: Dict[str, int] = {i.name: F32 for i in g.input if is_float(i.name)}
    prec.update({name: F32 for name, t in inits.items() if t.data_type == F32})
    new_inits = []
    new_nodes = []
    cache: Dict[Tuple[str, int], str] = {}

    def as_prec(name: str, want: int) -> str:
        """Name of a tensor holding ``name`` in precision ``want`` (converted constant or a Cast)."""
        if not name or prec.get(name, want) == want:
            return name
        key = (name, want)
        if key in cache:
            return cache[key]
        suffix = "_fp16" if want == F16 else "_fp32"
        new = name + suffix
        if name in inits:  # constants are converted once, offline, instead of cast at run time
            arr = numpy_helper.to_array(inits[name]).astype(np.float16 if want == F16 else np.float32)
            new_inits.append(numpy_helper.from_array(arr, new))
        elif name in const_nodes:
            value = next(a.t for a in const_nodes[name].attribute if a.name == "value")
            arr = numpy_helper.to_array(value).astype(np.float16 if want == F16 else np.float32)
            new_nodes.append(helper.make_node("Constant", [], [new], value=numpy_helper.from_array(arr, new)))
        else:
            new_nodes.append(helper.make_node("Cast", [name], [new], to=want, name=new + "_cast"))
        prec[new] = want
        cache[key] = new
        return new

    for node in g.node:
        if not any(n and is_float(n) for n in node.input):
            # Constant, ConstantOfShape, Cast from int (shape arithmetic), ...: the output type is set by
            # attributes. Left as exported; fp16 consumers get a converted constant or a Cast.
            for out in node.output:
                if out and is_float(out):
                    prec[out] = types[out]
            new_nodes.append(node)
            continue
        if node.op_type in fp32_ops:
            want = F32
        elif (node.op_type in PASSTHROUGH_OPS or node.op_type == "Cast") and node.input[0] in prec:
            want = prec[node.input[0]]  # no cast round trip; a float->int Cast keeps exact values
        else:
            want = F16
        for i, name in enumerate(node.input):
            if name and is_float(name):
                node.input[i] = as_prec(name, want)
        if node.op_type == "Cast":
            for a in node.attribute:
                if a.name == "to" and a.i in (F32, F16):
                    a.i = want
        for out in node.output:
            if out and is_float(out):
                prec[out] = want
        new_nodes.append(node)

    # Graph outputs: float32 through a final Cast (renaming the producer's output).
    out_fix = []
    for o in g.output:
        if is_float(o.name) and prec.get(o.name) == F16 and keep_io_fp32:
            inner = o.name + "_fp16out"
            for n in new_nodes:
                for i, name in enumerate(n.output):
                    if name == o.name:
                        n.output[i] = inner
                for i, name in enumerate(n.input):
                    if name == o.name:
                        n.input[i] = inner
            out_fix.append(helper.make_node("Cast", [inner], [o.name], to=F32, name=o.name + "_cast"))
    # Drop fp32 initializers nobody reads any more (their fp16 copies replaced them).
    used = {name for n in new_nodes + out_fix for name in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.node[:]
    g.node.extend(_toposort(new_nodes + out_fix, {i.name for i in g.input} | {t.name for t in kept + new_inits}))
    del g.initializer[:]
    g.initializer.extend(kept + [t for t in new_inits if t.name in used])
    del g.value_info[:]
    for o in g.output:
        if is_float(o.name):
            o.type.tensor_type.elem_type = F32 if keep_io_fp32 else prec.get(o.name, F32)
    return model


def _toposort(nodes, available: Set[str]):
    """Nodes in an order where each runs after its inputs' producers (Casts were appended late)."""
    produced_by = {}
    for idx, n in enumerate(nodes):
        for o in n.output:
            produced_by[o] = idx
    order, state = [], [0] * len(nodes)  # 0 new, 1 visiting, 2 done

    def visit(i: int) -> None:
        stack = [(i, iter(nodes[i].input))]
        state[i] = 1
        while stack:
            j, it = stack[-1]
            for name in it:
                k = produced_by.get(name)
                if k is not None and state[k] == 0 and name not in available:
                    state[k] = 1
                    stack.append((k, iter(nodes[k].input)))
                    break
            else:
                stack.pop()
                state[j] = 2
                order.append(nodes[j])

    for i in range(len(nodes)):
        if state[i] == 0:
            visit(i)
    return order


def fp32_op_counts(model, fp32_ops: Optional[Iterable[str]] = None) -> Dict[str, int]:
    """How many nodes of each kept-in-fp32 type a graph has (reported in the manifest)."""
    ops = frozenset(fp32_ops or FP32_OPS)
    counts: Dict[str, int] = {}
    for n in model.graph.node:
        if n.op_type in ops:
            counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return counts
