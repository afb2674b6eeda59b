"""Gemm and MatMul: input features are consumed, output features are new units.

With a constant weight these are the FC sources/sinks.  MatMul of two run-time
tensors (attention scores, context) couples the contracted axes of both sides
and passes the outer axes through.
"""
from __future__ import annotations

from onnxprune.analysis.rules.base import Rule, register
from onnxprune.analysis.rules.constant_axis import follow_constant


@register("Gemm")
class GemmRule(Rule):
    weight_index, bias_index = 1, 2  # QGemm: 3 and 6

    def consume(self, s, node, tensor: str, axis: int) -> None:
        """Record where input features are consumed (QGemm: the float tensor before quantization)."""
        s.sink(node, tensor, axis)

    def propagate(self, node, s):
        a, y = node.input[0], node.output[0]
        w, c = self.weight_index, self.bias_index
        where = f"{node.op_type} '{node.name}'"
        for index in (w, c):  # units reaching B or C at run time: no rule to follow them through
            if s.view.has_input(node, index) and not s.view.is_const(node.input[index]):
                s.block_tensor(node.input[index], f"{where} uses '{node.input[index]}' as a run-time weight or bias")
        trans_a = int(s.view.attr(node, "transA", 0))
        trans_b = int(s.view.attr(node, "transB", 0))
        k_axis_a, m_axis_a = (0, 1) if trans_a else (1, 0)
        c_shape = s.view.shape(node.input[c]) if s.view.has_input(node, c) else None
        m_layout = s.layout(a, m_axis_a)
        if m_layout is not None:
            s.set_layout(y, 0, m_layout)
            if c_shape and len(c_shape) == 2 and c_shape[0] != 1:
                s.param(node, c, 0, m_layout, "bias")  # a bias with one row per row of A
        k_layout = s.layout(a, k_axis_a)
        weight = s.view.const_input(node, w)
        if weight is None:
            s.block(k_layout, f"{where}: weight '{node.input[w]}' is computed at run time")
            return
        k_axis_b, n_axis_b = (1, 0) if trans_b else (0, 1)
        if k_layout is not None:
            s.param(node, w, k_axis_b, k_layout, "weight_in")
            self.consume(s, node, a, k_axis_a)
        out_layout = s.fresh(node, y, 1, weight.shape[n_axis_b])
        s.param(node, w, n_axis_b, out_layout, "weight_out")
        if c_shape and c_shape[-1] == weight.shape[n_axis_b] and weight.shape[n_axis_b] != 1:
            s.param(node, c, len(c_shape) - 1, out_layout, "bias")
        s.set_layout(y, 1, out_layout)

    def zeros(self, node, z):
        z.source_zeros(node, alpha_beta=True)


@register("MatMul")
class MatMulRule(Rule):
    def propagate(self, node, s):
        a, b, y = node.input[0], node.input[1], node.output[0]
        where = f"MatMul '{node.name}'"
        ra, rb, ry = s.view.rank(a), s.view.rank(b), s.view.rank(y)
        if ra is None or rb is None or ry is None or ra < 2 or rb < 2:
            s.block_tensor(a, f"{where}: operand ranks unknown or 1-D")
            s.block_tensor(b, f"{where}: operand ranks unknown or 1-D")
            return
        # batch axes broadcast like an elementwise op: a constant batch axis is sliced with the units
        for out_axis in range(ry - 2):
            layouts, consts, pinned = [], [], []
            for index, (name, r) in enumerate(((a, ra), (b, rb))):
                in_axis = out_axis - (ry - r)
                if in_axis >= 0 and s.view.dim(name, in_axis) != 1:
                    layout = s.layout(name, in_axis)
                    if layout is not None:
                        layouts.append(layout)
                    elif s.view.is_const(name):
                        consts.append((index, in_axis))
                    else:
                        pinned.append((name, in_axis))
            if layouts:
                merged = s.couple(layouts, where)
                for name, in_axis in pinned:
                    if not follow_constant(s, name, in_axis, merged):
                        s.block(merged, f"{where}: batch axis {out_axis} is shared with '{name}', "
                                        "whose channels cannot be pruned")
                for index, in_axis in consts:
                    s.param(node, index, in_axis, merged, "constant")
                s.set_layout(y, out_axis, merged)
        k_a, k_b = ra - 1, rb - 2
        a_const, b_const = s.view.is_const(a), s.view.is_const(b)
        if b_const and not a_const:
            self._weight_side(node, s, act=a, act_k=k_a, weight_index=1, w_k=rb - 2, w_n=rb - 1, out_axis=ry - 1)
            m_layout = s.layout(a, ra - 2)
            if m_layout is not None:
                s.set_layout(y, ry - 2, m_layout)
        elif a_const and not b_const:
            self._weight_side(node, s, act=b, act_k=k_b, weight_index=0, w_k=ra - 1, w_n=ra - 2, out_axis=ry - 2)
            n_layout = s.layout(b, rb - 1)
            if n_layout is not None:
                s.set_layout(y, ry - 1, n_layout)
        elif not a_const and not b_const:
            ka, kb = s.layout(a, k_a), s.layout(b, k_b)
            if ka is not None and kb is not None:
                s.couple([ka, kb], where)
            elif ka is not None or kb is not None:
                s.block(ka if ka is not None else kb, f"{where}: contracted with a tensor whose features cannot be pruned")
            for name, axis in ((a, k_a), (b, k_b)):
                if s.layout(name, axis) is not None:
                    s.sink(node, name, axis)
            for name, axis, out_axis in ((a, ra - 2, ry - 2), (b, rb - 1, ry - 1)):
                layout = s.layout(name, axis)
                if layout is not None:
                    s.set_layout(y, out_axis, layout)

    @staticmethod
    def _weight_side(node, s, *, act, act_k, weight_index, w_k, w_n, out_axis):
        k_layout = s.layout(act, act_k)
        if k_layout is not None:
            s.param(node, weight_index, w_k, k_layout, "weight_in")
            s.sink(node, act, act_k)
        weight = s.view.const_input(node, weight_index)
        out_layout = s.fresh(node, node.output[0], out_axis, weight.shape[w_n])
        s.param(node, weight_index, w_n, out_layout, "weight_out")
        s.set_layout(node.output[0], out_axis, out_layout)

    def zeros(self, node, z):
        a, b = node.input[0], node.input[1]
        if z.view.is_const(a) or z.view.is_const(b):
            z.source_zeros(node)
            return
        # attention's probs @ V: a head whose values are all zero gives an all-zero context
        ra, rb = z.view.rank(a), z.view.rank(b)
        if ra is not None and rb is not None:
            z.product_zeros(node, contracted={a: ra - 1, b: rb - 2})
