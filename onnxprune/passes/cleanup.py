"""Graph cleanup after a rewrite: dead nodes, unused initializers, order."""
from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs


def remove_dead_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers that no graph output depends on (onnx-graphsurgeon)."""
    graph = gs.import_onnx(model)
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    cleaned = gs.export_onnx(graph, do_type_check=False)
    cleaned.ir_version = model.ir_version
    del cleaned.opset_import[:]
    cleaned.opset_import.extend(model.opset_import)
    for field in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(cleaned, field, getattr(model, field))
    del cleaned.metadata_props[:]
    cleaned.metadata_props.extend(model.metadata_props)
    return cleaned


def drop_unused_initializers(model: onnx.ModelProto) -> int:
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    live = [t for t in graph.initializer if t.name in used]
    dropped = len(graph.initializer) - len(live)
    if dropped:
        del graph.initializer[:]
        graph.initializer.extend(live)
    return dropped
