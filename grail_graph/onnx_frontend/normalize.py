"""Graph clean-ups that let the matcher see the weights of exports without constant folding."""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from grail_graph.onnx_frontend.matcher import LINEAR_OPS

logger = logging.getLogger(__name__)


def fold_weight_transposes(graph: ir.Graph) -> int:
    """Fold Transpose nodes on initializers that only Conv / Gemm / MatMul weights read.

    torch.onnx.export without its optimizer writes `MatMul(x, Transpose(W))` for every
    nn.Linear, and the matcher needs the weight as a constant. The initializer takes the
    transposed value under its own name. An initializer with other readers (an embedding
    tied to the output layer) is left alone, so no weight is copied. Returns the number
    of Transpose nodes removed.
    """
    folded = 0
    for node in list(graph):
        if node.op_type != "Transpose" or not _foldable(node):
            continue
        source, output = node.inputs[0], node.outputs[0]
        permutation = node.attributes.get("perm")
        array = source.const_value.numpy()
        axes = None if permutation is None else list(permutation.value)
        transposed = np.ascontiguousarray(np.transpose(array, axes))
        source.const_value = ir.tensor(transposed, name=source.name)
        source.shape = ir.Shape(transposed.shape)
        for user, index in list(output.uses()):
            user.replace_input_with(index, source)
        graph.remove(node, safe=True)
        folded += 1
    if folded:
        logger.info("folded %d Transpose nodes into the weights they transpose", folded)
    return folded


def _foldable(node: ir.Node) -> bool:
    source = node.inputs[0] if node.inputs else None
    if source is None or source.const_value is None or not source.is_initializer():
        return False
    if source.is_graph_input() or source.is_graph_output() or len(source.uses()) != 1:
        return False
    output = node.outputs[0]
    if output.is_graph_output() or not output.uses():
        return False
    return all(user.op_type in LINEAR_OPS and index == 1 for user, index in output.uses())
