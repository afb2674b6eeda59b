"""Residual blocks and layers: where a whole branch can go and its input pass through.

The one place that knows what a residual block is (depth pruning, `--drop-layers`).

A **block** is a residual Add (or two-input Sum) ``y = x + f(x)`` where

* the skip input ``x`` is an ancestor of the other input ``f(x)``: the shortcut
  is the identity (a projection shortcut -- a Conv or Gemm, or a strided op, on
  the skip path -- is *refused*, with the op named);
* the branch ``f`` (every node between ``x`` and the Add) holds at least one
  learned layer: a Conv, ConvTranspose, Gemm or MatMul with a constant weight.
  ``x + 0.044715 x^3`` inside a tanh-GELU is a formula, not a block;
* ``x`` has the Add's output shape and type (no broadcasting).

Its kind is ``attention`` (a Softmax or a product of two run-time tensors in the
branch), ``conv`` (a convolutional branch: a ResNet basic or bottleneck block) or
``mlp`` (the rest: a transformer's feed-forward block).

After the Add the residual stream may pass through a *trunk* before anything
else reads it:

* nothing -- pre-norm transformers (GPT-2, ViT, LLaMA): ``x + Attn(LN(x))`` is
  the next block's input;
* elementwise ops -- ResNet's ``Relu(x + f(x))``, LLaMA's float32 Cast: they
  stay when the block is dropped (``Relu(x) = x`` there, x being a Relu output);
* a normalisation -- post-norm transformers (BERT): ``LN(x + f(x))``. Such a
  block is not droppable on its own: without the branch it computes ``LN(x)``,
  which is not ``x``. Its whole layer is.

A **layer** is the unit ``--drop-layers`` removes: a run of attention blocks and
the feed-forward block reading their output (a transformer layer), or a block
on its own (a ResNet block). Dropping a unit routes every reader of its
``output`` to its ``input`` (`onnxprune.passes.depth`); for a post-norm layer
the output is its last norm's output, so the norms go with it.

A unit is refused when a tensor computed inside it is read outside it (a
branch that also feeds a graph output, a KV cache...): dropping it would not
remove it. Integer shape arithmetic shared with other layers is fine.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import onnx

from onnxprune.errors import UsageError
from onnxprune.ir.graph_view import GraphView

RESIDUAL_OPS = {"Add", "Sum"}
WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
FUSED_RESIDUAL_OPS = {"SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipGroupNorm"}
FUSED_ATTENTION_OPS = {"Attention", "MultiHeadAttention", "GroupQueryAttention", "PackedAttention"}
NORM_OPS = {"LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization", "SkipLayerNormalization",
            "GroupNormalization", "InstanceNormalization", "BatchNormalization", "LpNormalization",
            "ReduceMean", "ReduceL2", "ReduceSumSquare"}
UNIT_KINDS = ("layer", "block", "attention", "mlp")
SEGMENT_LIMIT = 48  # nodes examined after a residual Add to find what reads the stream next
SEARCH_LIMIT = 600  # nodes examined backwards for a shortcut's common ancestor
_AUTO_NAME = re.compile(r"^(node_|val_|onnx::|_)|^[A-Za-z]+_\d+(_\d+)*$")


@dataclass
class Block:
    """One residual Add with an identity shortcut and a learned branch."""

    name: str
    add: str            # the residual node's name: the block's stable key (plans refer to it)
    kind: str           # attention | mlp | conv
    input: str          # x, the skip input
    branch: str         # f(x), the branch's output
    output: str         # x + f(x)
    exit: str           # what the rest of the graph reads: `output`, or after the trunk ops
    trunk: str          # none | elementwise | norm
    nodes: list[str]    # the branch's nodes, in graph order
    segment: list[str]  # trunk nodes between `output` and `exit`
    feature_axis: int


@dataclass
class Unit:
    """What depth pruning removes: readers of `output` read `input` instead."""

    name: str
    unit: str               # layer | block
    kind: str               # attention, mlp, conv, or e.g. attention+mlp for a layer
    adds: list[str]         # its residual nodes (the key a plan records)
    input: str
    output: str
    nodes: list[str]        # every node that goes with it
    feature_axis: int
    refused: str | None = None  # why it cannot be dropped

    @property
    def droppable(self) -> bool:
        return self.refused is None

    def to_dict(self) -> dict:
        out = {"name": self.name, "unit": self.unit, "kind": self.kind, "adds": list(self.adds),
               "input": self.input, "output": self.output, "nodes": len(self.nodes)}
        if self.refused:
            out["refused"] = self.refused
        return out


@dataclass
class Refused:
    """A residual-looking Add that is not a droppable block, and why."""

    name: str
    add: str
    reason: str
    nodes: list[str] = field(default_factory=list, repr=False)  # the residual branch (the longer side)
    kind: str = "residual"

    def to_dict(self) -> dict:
        return {"name": self.name, "add": self.add, "reason": self.reason}


@dataclass
class BlockScan:
    blocks: list[Block] = field(default_factory=list)
    block_units: list[Unit] = field(default_factory=list)
    layers: list[Unit] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)  # non-identity shortcuts

    def units(self, unit: str = "layer") -> list[Unit]:
        """Every unit of a kind (`layer`, `block`, or blocks of kind `attention` / `mlp`), droppable or not."""
        if unit == "layer":
            return list(self.layers)
        if unit == "block":
            return list(self.block_units)
        if unit in ("attention", "mlp"):
            return [u for u in self.block_units if u.kind == unit]
        raise UsageError(f"unknown unit '{unit}': choose one of {', '.join(UNIT_KINDS)}")

    def candidates(self, unit: str = "layer") -> list[Unit]:
        return [u for u in self.units(unit) if u.droppable]

    def not_droppable(self, unit: str = "layer") -> list[tuple[str, str]]:
        """(name, reason) of every unit of this kind that cannot go, projection shortcuts included."""
        out = [(u.name, u.refused) for u in self.units(unit) if not u.droppable]
        if unit in ("layer", "block"):
            out += [(r.name, r.reason) for r in self.refused]
        return out


def find_blocks(view: GraphView) -> BlockScan:
    return _Finder(view).run()


class _Finder:
    def __init__(self, view: GraphView):
        self.view = view
        self.nodes = view.nodes
        self.prod = {o: i for i, n in enumerate(self.nodes) for o in n.output if o}
        self.index_of = {n.name: i for i, n in enumerate(self.nodes)}
        self.outputs = set(view.graph_outputs)

    # -- graph helpers -----------------------------------------------------------------------
    def _producer_index(self, tensor: str) -> int:
        return self.prod.get(tensor, -1)

    def _ancestors(self, tensor: str, stop: int, limit: int | None = None) -> set[int]:
        """Indices of the nodes `tensor` depends on, produced after node `stop`."""
        seen: set[int] = set()
        stack = [self._producer_index(tensor)]
        while stack:
            i = stack.pop()
            if i <= stop or i in seen:
                continue
            seen.add(i)
            if limit is not None and len(seen) > limit:
                break
            stack.extend(self._producer_index(x) for x in self.nodes[i].input if x)
        return seen

    def _descendants_within(self, start: set[str], within: set[int]) -> list[int]:
        reached = set(start)
        out = []
        for i in sorted(within):
            node = self.nodes[i]
            if any(x in reached for x in node.input if x):
                out.append(i)
                reached.update(o for o in node.output if o)
        return out

    def _weighted(self, i: int) -> bool:
        node = self.nodes[i]
        if node.op_type in FUSED_ATTENTION_OPS:
            return True
        return node.op_type in WEIGHTED_OPS and any(self.view.is_const(x) for x in node.input[:2] if x)

    def _is_attention(self, i: int) -> bool:
        """A product of two run-time tensors (queries x keys, probabilities x values)."""
        node = self.nodes[i]
        ins = [x for x in node.input[:2] if x]
        return node.op_type == "MatMul" and len(ins) == 2 and not any(self.view.is_const(x) for x in ins)

    def _is_float(self, tensor: str) -> bool:
        entry = self.view.shapes.get(tensor)
        if entry is None or not entry[0]:
            return True  # unknown: assume it carries data
        return onnx.helper.tensor_dtype_to_np_dtype(entry[0]).kind not in "iub"

    # -- the scan ----------------------------------------------------------------------------------
    def run(self) -> BlockScan:
        scan = BlockScan()
        for i, node in enumerate(self.nodes):
            inputs = [x for x in node.input if x]
            if node.op_type in FUSED_RESIDUAL_OPS:
                scan.refused.append(Refused(
                    name=node.name, add=node.name, kind="fused",
                    reason=f"the residual sum is fused into {node.op_type} (onnxruntime's transformer optimizer); "
                           "drop layers in the unfused export, then optimize"))
                continue
            if node.op_type not in RESIDUAL_OPS or len(inputs) != 2 or not node.output or not node.output[0]:
                continue
            if any(self.view.is_const(x) for x in inputs):
                continue
            first, second = sorted(inputs, key=self._producer_index)
            region = self._ancestors(second, self._producer_index(first))
            if any(first in self.nodes[j].input for j in region):
                block = self._block(i, node, first, second, region)
                if isinstance(block, Block):
                    scan.blocks.append(block)
                elif block is not None:
                    scan.refused.append(block)
            else:
                refused = self._non_identity(i, node, inputs)
                if refused is not None:
                    scan.refused.append(refused)
        _unique_names(scan.blocks + scan.refused, self)
        self._trunks(scan.blocks)
        self._units(scan)
        return scan

    def _block(self, i, node, x, branch, region) -> Block | Refused | None:
        nodes = self._descendants_within({x}, region)
        if not any(self._weighted(j) for j in nodes):
            return None  # an elementwise formula (GELU's x + 0.044715 x^3), not a block
        out = node.output[0]
        shape_x, shape_y = self.view.shape(x), self.view.shape(out)
        if shape_x is None or shape_y is None:
            return Refused(self._readable(nodes, node), node.name,
                           f"the shapes of '{x}' and '{out}' are unknown (shape inference), so the skip input "
                           "cannot be shown to pass through unchanged", [self.nodes[j].name for j in nodes])
        if not _same_shape(shape_x, shape_y) or self._dtype(x) != self._dtype(out):
            return None  # x is broadcast: not x + f(x) on one stream
        fused = any(self.nodes[j].op_type in FUSED_ATTENTION_OPS for j in nodes)
        products = any(self._is_attention(j) for j in nodes)
        softmax = any(self.nodes[j].op_type == "Softmax" for j in nodes)
        kind = "attention" if fused or (products and softmax) else \
            "conv" if any(self.nodes[j].op_type in ("Conv", "ConvTranspose") for j in nodes) else "mlp"
        axis = 1 if kind == "conv" and len(shape_x) >= 3 else len(shape_x) - 1
        return Block(name=self._readable(nodes, node), add=node.name, kind=kind, input=x, branch=branch,
                     output=out, exit=out, trunk="none", nodes=[self.nodes[j].name for j in nodes], segment=[],
                     feature_axis=axis)

    def _dtype(self, tensor: str):
        entry = self.view.shapes.get(tensor)
        return None if entry is None else entry[0]

    def _non_identity(self, i, node, inputs) -> Refused | None:
        """Add(g(x), f(x)) with learned layers between x and the Add on some side: a residual
        block whose shortcut is not the identity (ResNet's downsampling blocks)."""
        stop = max(-1, i - SEARCH_LIMIT)
        sides = [self._ancestors(t, stop, SEARCH_LIMIT) for t in inputs]
        common = sides[0] & sides[1]
        if not common:
            return None
        split = max(common)
        rank = self.view.rank(node.output[0])
        outs = {o for o in self.nodes[split].output if o and self._is_float(o) and self.view.rank(o) == rank}
        if not outs:
            return None  # the sides share shape arithmetic only, not the data
        paths = [self._descendants_within(outs, s - common) for s in sides]
        if not any(self._weighted(j) for p in paths for j in p):
            return None  # e.g. rotary embeddings: q*cos + rotate_half(q)*sin
        short = 0 if len(paths[0]) <= len(paths[1]) else 1
        long = 1 - short
        if not paths[short]:
            return None
        ops = ", ".join(f"{self.nodes[j].op_type} '{self.nodes[j].name}'" for j in paths[short][:3])
        more = f" and {len(paths[short]) - 3} more" if len(paths[short]) > 3 else ""
        what = ": a projection or downsampling shortcut" if any(self._weighted(j) for j in paths[short]) else ""
        return Refused(
            name=self._readable(paths[long], node), add=node.name, nodes=[self.nodes[j].name for j in paths[long]],
            reason=f"its shortcut is not the identity ({ops}{more} on the skip path{what}), so there is no "
                   "block input to pass through")

    # -- what reads the stream after the Add -------------------------------------------------------
    def _segment(self, tensor: str) -> tuple[str, list[int]] | None:
        """The first tensor every path from `tensor` passes through, and the nodes in between."""
        consumers = self.view.consumers
        if tensor in self.outputs:
            return None
        open_: dict[str, int] = {tensor: len(consumers.get(tensor, []))}
        reach = {tensor}
        segment: list[int] = []
        start = self._producer_index(tensor) + 1
        for i in range(start, min(start + SEGMENT_LIMIT, len(self.nodes))):
            node = self.nodes[i]
            hits = [x for x in node.input if x in reach]
            if not hits:
                continue
            segment.append(i)
            for x in hits:
                if x in open_:
                    open_[x] -= 1
                    if open_[x] <= 0:
                        del open_[x]
            for o in node.output:
                if o and (consumers.get(o) or o in self.outputs):
                    reach.add(o)
                    open_[o] = len(consumers.get(o, [])) + (1 if o in self.outputs else 0)
            if len(open_) == 1 and next(iter(open_)) in node.output:
                return next(iter(open_)), segment
            if not open_:
                return None
        return None

    def _trunk_ops(self, segment: list[int], start: str) -> bool:
        """Per-position ops only: no learned layer, and nothing read from outside but constants."""
        produced = {start}
        for j in segment:
            node = self.nodes[j]
            if node.op_type in WEIGHTED_OPS or node.op_type in FUSED_ATTENTION_OPS:
                return False
            if any(x and x not in produced and not self.view.is_const(x) for x in node.input):
                return False
            produced.update(o for o in node.output if o)
        return True

    def _trunks(self, blocks: list[Block]) -> None:
        inputs = {b.input for b in blocks}
        norm_exits: set[str] = set()
        for b in blocks:  # graph order: a block's input was classified before it
            if b.output in inputs or b.output in self.outputs:
                continue
            found = self._segment(b.output)
            if found is None or not self._trunk_ops(found[1], b.output):
                continue
            exit_, segment = found
            has_norm = any(self.nodes[j].op_type in NORM_OPS for j in segment)
            if has_norm:
                # post-norm when the norm's output is the next block's input, or this block's input
                # came out of a norm too (the last layer of BERT); else it is the head's final norm
                producer = self._producer_index(b.input)
                after_norm = b.input in norm_exits or (producer >= 0 and self.nodes[producer].op_type in NORM_OPS)
                if exit_ not in inputs and not after_norm:
                    continue
                b.trunk = "norm"
                norm_exits.add(exit_)
            else:
                b.trunk = "elementwise"
            b.exit = exit_
            b.segment = [self.nodes[j].name for j in segment]

    # -- units ------------------------------------------------------------------------------------------
    def _units(self, scan: BlockScan) -> None:
        blocks = scan.blocks
        by_input: dict[str, list[Block]] = {}
        for b in blocks:
            by_input.setdefault(b.input, []).append(b)

        def successor(b: Block) -> Block | None:
            nxt = by_input.get(b.exit, [])
            return nxt[0] if len(nxt) == 1 else None

        for b in blocks:
            refused = None
            if b.trunk == "norm":
                refused = (f"post-norm: '{b.segment[-1] if b.segment else b.exit}' normalises the sum before the "
                           f"next block reads it; without the branch it would compute norm(x), not x. "
                           f"Drop the whole layer instead")
            scan.block_units.append(self._unit([b], "block", refused))

        used: set[int] = set()
        for b in blocks:  # graph order: a run of attention blocks starts at its first one
            if id(b) in used:
                continue
            chain = [b]
            if b.kind == "attention":
                nxt = successor(b)
                while nxt is not None and nxt.kind == "attention" and id(nxt) not in used:
                    chain.append(nxt)
                    nxt = successor(nxt)
                if nxt is not None and id(nxt) not in used:
                    chain.append(nxt)
            used.update(id(c) for c in chain)
            scan.layers.append(self._unit(chain, "layer", None))

    def _unit(self, chain: list[Block], unit: str, refused: str | None) -> Unit:
        last = chain[-1]
        output = last.exit if (last.trunk == "norm" and unit == "layer") else last.output
        names: list[str] = []
        for k, b in enumerate(chain):
            names += b.nodes + [b.add]
            if k < len(chain) - 1 or output == b.exit:
                names += b.segment
        kind = "+".join(dict.fromkeys(b.kind for b in chain)) if len(chain) > 1 else chain[0].kind
        name = chain[0].name if len(chain) == 1 else _common_name([b.name for b in chain], "/. ") or chain[0].name
        if refused is None:
            refused = self._closed(names, output, chain[0].input)
        return Unit(name=name, unit=unit, kind=kind, adds=[b.add for b in chain], input=chain[0].input,
                    output=output, nodes=names, feature_axis=chain[0].feature_axis, refused=refused)

    def _closed(self, names: list[str], output: str, x: str) -> str | None:
        """None when nothing computed inside the unit but its output is read from outside."""
        inside = set(names)
        sx, so = self.view.shape(x), self.view.shape(output)
        if sx is None or so is None or not _same_shape(sx, so) or self._dtype(x) != self._dtype(output):
            return (f"its input '{x}' {self.view.shape(x)} and output '{output}' {self.view.shape(output)} differ "
                    f"in shape or type")
        for name in names:
            for t in self.nodes[self.index_of[name]].output:
                if not t or t == output or not self._is_float(t):
                    continue
                if t in self.outputs:
                    return f"'{t}', computed inside it, is a graph output"
                for reader, _ in self.view.consumers.get(t, []):
                    if reader.name not in inside:
                        return f"'{t}', computed inside it, is also read by {reader.op_type} '{reader.name}' outside it"
        return None

    # -- names ----------------------------------------------------------------------------------------------
    def _readable(self, nodes: list[int], add: onnx.NodeProto) -> str:
        """The branch's module path: the common prefix of its layers' node or weight names."""
        learned = [j for j in nodes if self._weighted(j)]
        first = min(learned) if learned else None
        core = [j for j in nodes if first is not None and j >= first]
        candidates = [
            [self.nodes[j].name for j in learned],
            [self.nodes[j].name for j in core],
            [x for j in core for x in self.nodes[j].input if x and self.view.is_const(x)],
        ]
        for k, names in enumerate(candidates):
            meaningful = _meaningful(names)
            if not meaningful or (k < 2 and len(meaningful) < len(names) / 2):
                continue
            prefix = _common_name(meaningful)
            if prefix:
                return prefix
        # exporters that rename weights (dynamo: val_12) keep the norms' names: model.layers.0.input_layernorm.weight
        norms = _meaningful([x for j in nodes for x in self.nodes[j].input if x and self.view.is_const(x)])
        parent = _common_name([_common_name([n]) for n in norms]) if norms else ""
        return parent or add.name


def _same_shape(a, b) -> bool:
    """Same rank, equal static dims; two symbolic dims are taken as equal (an Add of the same stream)."""
    return len(a) == len(b) and all(x == y or (not isinstance(x, int) and not isinstance(y, int))
                                    for x, y in zip(a, b))


def _meaningful(names: list[str]) -> list[str]:
    return [n for n in names if not _AUTO_NAME.search(n) and ("/" in n or "." in n)]


def _common_name(names: list[str], seps: str = "/.") -> str:
    """Longest common prefix, cut at a separator ('/' or '.'); one name: its parent path."""
    if not names:
        return ""
    if len(names) == 1:
        name = names[0]
        cut = max(name.rfind(c) for c in seps)
        return name[:cut].rstrip(seps) if cut > 0 else name
    prefix = os.path.commonprefix(names)
    if all(len(n) == len(prefix) or n[len(prefix)] in seps for n in names):
        return prefix.rstrip(seps)
    cut = max(prefix.rfind(c) for c in seps)
    return prefix[:cut].rstrip(seps) if cut > 0 else ""


def _unique_names(blocks: list, finder: _Finder) -> None:
    """Blocks that share a name get a finer one ('_' as a separator too), else their kind, else their Add;
    a name that is another block's parent path gets its kind (ViT: layer.0 (mlp) beside layer.0/attention)."""
    names = {b.name for b in blocks}
    for b in blocks:
        if any(n != b.name and n.startswith(b.name) and n[len(b.name)] in "/." for n in names):
            b.name = f"{b.name} ({b.kind})"
    for refine in ("seps", "kind", "add"):
        seen: dict[str, list] = {}
        for b in blocks:
            seen.setdefault(b.name, []).append(b)
        clashes = [group for group in seen.values() if len(group) > 1]
        if not clashes:
            return
        for group in clashes:
            for b in group:
                if refine == "seps":
                    idx = [finder.index_of[n] for n in b.nodes]
                    learned = [finder.nodes[j].name for j in idx if finder._weighted(j)]
                    learned += [x for j in idx if finder._weighted(j) for x in finder.nodes[j].input
                                if x and finder.view.is_const(x)]
                    finer = _common_name(_meaningful(learned), "/._")
                    if finer and len(finer) > len(b.name):
                        b.name = finer
                elif refine == "kind":
                    b.name = f"{b.name} ({b.kind})"
                else:
                    b.name = f"{b.name} ({b.add})"
