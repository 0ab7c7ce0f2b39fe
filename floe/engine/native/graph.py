"""Points a converted graph's attention at floe's kernel (segment_attention.cpp).

A BERT-family graph as floe converts it (openvino_convert.py, packed_graph.py) computes each
layer's attention as ``ScaledDotProductAttention`` on queries, keys and values reshaped to (rows,
tokens, heads, 32) and transposed to (rows, heads, tokens, 32), with a mask made from the
attention mask (padded graph) or the segment numbers (packed graph), the keys and values perhaps
extended with zeros to a multiple of 16 (aligned_keys.py), and the output transposed back. Each
such layer becomes one ``SegmentAttention`` on the untransposed tensors (in bf16) and the graph
input the mask was made from; the transposes, the mask and the zero keys are left without users
and dropped. (The kernel runs under the engine's bf16 hint only.)

The rewrite only matches that shape: non-causal, heads of 32, both transposes (0, 2, 1, 3). A
layer that differs is left to OpenVINO, and a graph where any attention would remain (one the
rewrite cannot account for) is not rewritten at all. The engine checks the result against the
untouched graph on a probe batch before it keeps it (openvino_engine.py).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

HEAD_DIM = 32
_SWAP = [0, 2, 1, 3]
# Part of the rewritten graph's cache key (with the kernel build's): a change to what the rewrite
# produces must bump it.
VERSION = 1


def _op_class() -> Any:
    """The op as the graph's Python side builds it; saved to IR and read back, the runtime
    instantiates the C++ op of the same name and version from the loaded library."""
    import openvino as ov

    class SegmentAttention(ov.Op):
        class_type_info = ov.DiscreteTypeInfo("SegmentAttention", "floe")

        def __init__(self, inputs: Optional[list] = None, scale: float = 1.0) -> None:
            super().__init__(self)
            self._scale = float(scale)
            if inputs is not None:
                self.set_arguments(inputs)
                self.constructor_validate_and_infer_types()

        def validate_and_infer_types(self) -> None:
            self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

        def clone_with_new_inputs(self, new_inputs: list) -> Any:
            return SegmentAttention(new_inputs, self._scale)

        def get_type_info(self) -> Any:
            return SegmentAttention.class_type_info

        def visit_attributes(self, visitor: Any) -> bool:
            visitor.on_attributes({"scale": self._scale})
            return True

    return SegmentAttention


def _transposed(output: Any) -> Optional[Any]:
    """The (rows, tokens, heads, 32) tensor that ``output`` transposes to (rows, heads, tokens,
    32), looking through aligned_keys' concatenation with zero keys; None if it is not that."""
    node = output.get_node()
    if node.get_type_name() == "Concat":
        node = node.input(0).get_source_output().get_node()
    if node.get_type_name() != "Transpose" or not _is_swap(node):
        return None
    source = node.input(0).get_source_output()
    shape = source.get_partial_shape()
    if shape.rank.is_dynamic or shape.rank.get_length() != 4:
        return None
    if shape[3].is_dynamic or shape[3].get_length() != HEAD_DIM or shape[2].is_dynamic:
        return None
    return source


def _is_swap(transpose: Any) -> bool:
    order = transpose.input(1).get_source_output().get_node()
    return order.get_type_name() == "Constant" and list(order.get_data().reshape(-1)) == _SWAP


def _output_transpose(sdpa: Any) -> Optional[Any]:
    """The Transpose (0, 2, 1, 3) that takes the attention's output back to (rows, tokens, heads,
    32), through the reshape the converter leaves between them."""
    for target in sdpa.output(0).get_target_inputs():
        node = target.get_node()
        if node.get_type_name() == "Reshape":
            for after in node.output(0).get_target_inputs():
                t = after.get_node()
                if t.get_type_name() == "Transpose" and _is_swap(t):
                    return t
        elif node.get_type_name() == "Transpose" and _is_swap(node):
            return node
    return None


def rewrite(model: Any, segments_input: str) -> int:
    """Replaces every attention of ``model`` with SegmentAttention on the graph input named
    ``segments_input`` ("attention_mask" or "segments"); returns how many (0: the model is left
    as it was)."""
    params = [p for p in model.get_parameters() if segments_input in p.output(0).get_names()]
    attentions = [op for op in model.get_ordered_ops()
                  if op.get_type_name() == "ScaledDotProductAttention"]
    if len(params) != 1 or not attentions:
        return 0
    plan = []
    for op in attentions:
        if op.get_attributes().get("causal", False):
            return 0
        q, k, v = (_transposed(op.input(i).get_source_output()) for i in range(3))
        out = _output_transpose(op)
        if q is None or k is None or v is None or out is None:
            return 0
        if op.get_input_size() > 4:
            node = op.input(4).get_source_output().get_node()
            if node.get_type_name() != "Constant":
                return 0
            scale = float(np.asarray(node.get_data()).reshape(-1)[0])
        else:
            scale = HEAD_DIM ** -0.5
        plan.append((q, k, v, out, scale))
    import openvino.opset13 as ops

    op_class = _op_class()
    segments = params[0].output(0)

    def bf16(x: Any) -> Any:
        return ops.convert(x, "bf16").output(0)

    for q, k, v, out, scale in plan:
        # In bf16 both ways: the CPU plugin keeps a node it does not know in the precision the
        # graph gives it, so without the conversions it would reorder each projection's bf16
        # output to float32 for the kernel and back (as much time as the kernel saves). The
        # conversions fold into the projections.
        attended = op_class([bf16(q), bf16(k), bf16(v), segments], scale)
        out.output(0).replace(ops.convert(attended.output(0), "f32").output(0))
    model.validate_nodes_and_infer_types()
    left = sum(op.get_type_name() == "ScaledDotProductAttention" for op in model.get_ordered_ops())
    if left:   # something else still reads an attention's output: not a graph this rewrite knows
        raise ValueError(f"{left} attention node(s) still in use after the rewrite")
    return len(plan)
