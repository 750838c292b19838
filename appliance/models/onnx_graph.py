"""Facts read from an ONNX graph, and the rewrites the loaders make (dynamic batch, uint8 input).

Real exports differ: some SCRFD files have a fixed batch of 1 and outputs without a batch
dimension, ArcFace inputs are called `data` or `input.1`, and the MXNet-converted ArcFace
normalises inside the graph. These helpers absorb that so backends see one shape of model.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

BATCH_DIM = "batch"


def load(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path), load_external_data=False)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk_size):
            digest.update(block)
    return digest.hexdigest()


def _graph_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    initializers = {i.name for i in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def input_shape(model: onnx.ModelProto) -> list[int | str]:
    """Shape of the first real input; symbolic or unknown dimensions as their names or "?"."""
    dims = _graph_inputs(model)[0].type.tensor_type.shape.dim
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]


def has_dynamic_batch(model: onnx.ModelProto) -> bool:
    first = _graph_inputs(model)[0].type.tensor_type.shape.dim[0]
    return not first.HasField("dim_value")


def make_batch_dynamic(model: onnx.ModelProto) -> onnx.ModelProto:
    """Return a copy whose input batch dimension is symbolic, as InsightFace-REST does before
    building engines. Outputs that carry a leading batch dimension get it made symbolic too;
    outputs without one (some SCRFD exports) are left alone and the backend adds it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for value in _graph_inputs(out):
        dim = value.type.tensor_type.shape.dim[0]
        dim.Clear()
        dim.dim_param = BATCH_DIM
    for value in out.graph.output:
        dims = value.type.tensor_type.shape.dim
        # A 3-D SCRFD output (N, A, K) or a 2-D embedding (N, 512) leads with the batch.
        if len(dims) >= 2 and dims[0].HasField("dim_value") and dims[0].dim_value == 1:
            dims[0].Clear()
            dims[0].dim_param = BATCH_DIM
    return out


def normalizes_input(model: onnx.ModelProto, lookahead: int = 8) -> bool:
    """True when the graph subtracts and scales its input itself (MXNet-converted ArcFace).

    Decided as InsightFace's ArcFaceONNX decides it, so both feed a model the same pixels:
    a node named `Sub...` or `_minus...` and one named `Mul...` or `_mul...` among the first
    `lookahead` nodes. Names, not operator types: a trunk may multiply early (PReLU slopes,
    scale layers) without normalising anything.
    """
    names = [node.name for node in model.graph.node[:lookahead]]
    subtracts = any(n.startswith(("Sub", "_minus")) for n in names)
    scales = any(n.startswith(("Mul", "_mul")) for n in names)
    return subtracts and scales


@dataclasses.dataclass(frozen=True)
class InputRewrite:
    """The pixel conversion moved into the graph: BGR uint8 NHWC in, what the model wants out.

    Prepending it (`prepend_input_conversion`) means the CPU hands the model the letterboxed
    canvas or aligned crop as it is, and on TensorRT the conversion runs on the GPU. The same
    rewritten graph feeds ONNX Runtime and the TensorRT builder; `describe()` is part of the
    engine-cache key, so changing the conversion rebuilds the engine.
    """

    rgb: bool
    mean: float
    std: float

    def describe(self) -> str:
        order = "rgb" if self.rgb else "bgr"
        return f"uint8-nhwc-bgr->{order};mean={self.mean!r};std={self.std!r};nchw"


UINT8_INPUT = "pixels_uint8_nhwc"


def prepend_input_conversion(model: onnx.ModelProto, rewrite: InputRewrite) -> onnx.ModelProto:
    """A copy of `model` whose single input is (N, H, W, 3) uint8 BGR pixels.

    Nodes: Transpose to NCHW (on the uint8 pixels), Cast to float, Sub mean, Mul 1/std, feeding
    the original input. Where the model takes RGB, the first convolutions' weights are given
    their input channels in reverse (exact, and free at run time), or, where the input feeds
    anything else, a Gather reverses the channels. The arithmetic is OpenCV's
    blobFromImages' ((x - mean) * (1 / std) in float32), so results do not move.
    N, H and W keep the original input's dimensions (fixed or symbolic).
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inputs = _graph_inputs(out)
    if len(inputs) != 1:
        raise ValueError(f"expected one graph input, found {len(inputs)}")
    original = inputs[0]
    dims = original.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ValueError(f"input {original.name} has {len(dims)} dimensions, expected NCHW")
    if dims[1].HasField("dim_value") and dims[1].dim_value != 3:
        raise ValueError(f"input {original.name} has {dims[1].dim_value} channels, expected 3")

    def dim(d: onnx.TensorShapeProto.Dimension) -> int | str:
        return d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")

    new_input = helper.make_tensor_value_info(
        UINT8_INPUT,
        onnx.TensorProto.UINT8,
        [dim(dims[0]), dim(dims[2]), dim(dims[3]), 3],
    )
    prefix = "pixels_"
    # Transpose the uint8 pixels (a quarter of the bytes of floats), then the elementwise
    # conversion; the colour swap goes into the first convolution's weights where it can (free
    # at run time), else a Gather on the channel axis.
    nodes = [
        helper.make_node(
            "Transpose", [UINT8_INPUT], [prefix + "nchw"], perm=[0, 3, 1, 2], name="pixels_nchw"
        ),
        helper.make_node(
            "Cast",
            [prefix + "nchw"],
            [prefix + "f32"],
            to=onnx.TensorProto.FLOAT,
            name="pixels_cast",
        ),
    ]
    current = prefix + "f32"
    initializers = [
        numpy_helper.from_array(np.array([rewrite.mean], np.float32), prefix + "mean"),
        numpy_helper.from_array(np.array([1.0 / rewrite.std], np.float32), prefix + "scale"),
    ]
    if rewrite.rgb and not _swap_into_convolutions(out, original.name):
        initializers.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), prefix + "bgr"))
        nodes.append(
            helper.make_node(
                "Gather", [current, prefix + "bgr"], [prefix + "rgb"], axis=1, name="pixels_rgb"
            )
        )
        current = prefix + "rgb"
    nodes += [
        helper.make_node(
            "Sub", [current, prefix + "mean"], [prefix + "centred"], name="pixels_sub"
        ),
        helper.make_node(
            "Mul", [prefix + "centred", prefix + "scale"], [original.name], name="pixels_mul"
        ),
    ]
    kept = [i for i in graph.input if i.name != original.name]
    del graph.input[:]
    graph.input.extend([new_input, *kept])
    old_nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend([*nodes, *old_nodes])
    graph.initializer.extend(initializers)
    return out


def _swap_into_convolutions(model: onnx.ModelProto, input_name: str) -> bool:
    """Reverse the input-channel axis of the weights of every convolution reading
    `input_name`, so that BGR pixels give what RGB gave; False (nothing changed) unless every
    reader is an ungrouped Conv with its weights in an initializer."""
    graph = model.graph
    readers = [n for n in graph.node if input_name in n.input]
    weights = {i.name: i for i in graph.initializer}
    for node in readers:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type != "Conv" or node.input[0] != input_name or group != 1:
            return False
        if len(node.input) < 2 or node.input[1] not in weights:
            return False
        if numpy_helper.to_array(weights[node.input[1]]).shape[1] != 3:
            return False
    for k, node in enumerate(readers):
        array = numpy_helper.to_array(weights[node.input[1]])
        name = f"pixels_bgr_weights_{k}"
        graph.initializer.append(numpy_helper.from_array(array[:, ::-1].copy(), name))
        node.input[1] = name
    return bool(readers)
