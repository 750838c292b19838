"""Facts read from an ONNX graph, and the one rewrite the loaders need (dynamic batch).

Real exports differ: some SCRFD files have a fixed batch of 1 and outputs without a batch
dimension, ArcFace inputs are called `data` or `input.1`, and the MXNet-converted ArcFace
normalises inside the graph. These helpers absorb that so backends see one shape of model.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx

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
