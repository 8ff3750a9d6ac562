"""TFF's native compiler, with Grappler run once per distinct TensorFlow graph.

`tff.backends.native.desugar_and_transform_to_native` replaces intrinsics with TensorFlow
bodies, brings the computation to call-dominant form, runs Grappler over every TensorFlow
computation in it, turns Grappler off in their call ops (it has run) and gives each graph an id
(a hash of its bytes; the worker builds a graph once per id). Two things make the Grappler step
cost more than its work:

* A graph that occurs several times is optimized each time. A call of R rounds
  (`mfl_tff.training.rounds.MultiRound`) holds R copies of the round's graphs, so compiling it
  took about R times one round's compilation. And Grappler's output is not deterministic (the
  names it gives), so the R optimized copies differ, get R ids, and the worker builds each one.
* To read the dtypes and shapes of a graph's inputs and outputs, TFF imports the whole graph
  into a Python `tf.Graph` (`GraphSpec.to_meta_graph_def`), which costs about as much as
  Grappler itself on the large graphs of second-order meta-gradients under `tf.vectorized_map`.

`compile_to_native` runs TFF's same passes in the same order with the same Grappler
configuration, but optimizes each distinct TensorFlow computation once per compilation, and
assembles the `MetaGraphDef` that Grappler reads from the graph's placeholders and the
computation's type. That `MetaGraphDef` is byte for byte the one TFF builds (the tests compare
them on every graph of several rounds); graphs whose bindings are not plain tensors (datasets)
take TFF's own path.
"""

from __future__ import annotations

import hashlib

import tensorflow as tf
import tensorflow_federated as tff
from tensorflow.python.grappler import tf_optimizer
from tensorflow_federated.proto.v0 import computation_pb2
from tensorflow_federated.python.core.environments.tensorflow_backend import (
    compiled_computation_transformations,
    tensorflow_tree_transformations,
)
from tensorflow_federated.python.core.impl.compiler import (
    building_blocks,
    transformation_utils,
    transformations,
)
from tensorflow_federated.python.tensorflow_libs import serialization_utils

__all__ = ["compile_to_native", "grappler_config", "meta_graph_def"]

# The name TFF gives the lone signature of the MetaGraphDef it hands Grappler.
_SIGNATURE = "FunctionSpec"


def grappler_config() -> tf.compat.v1.ConfigProto:
    """The Grappler configuration of TFF's native compiler (aggressive memory, constant
    folding, arithmetic, loop and function optimization)."""
    config = tf.compat.v1.ConfigProto()
    options = config.graph_options.rewrite_options
    for name in (
        "memory_optimization",
        "constant_folding",
        "arithmetic_optimization",
        "loop_optimization",
        "function_optimization",
    ):
        setattr(options, name, options.AGGRESSIVE)
    return config


def _tensor_leaves(binding, type_spec, leaves: list) -> bool:
    """Appends (tensor name, TensorType) for each tensor of `binding`; False if `binding` holds
    anything else (a dataset) or does not match `type_spec`."""
    kind = binding.WhichOneof("binding")
    if kind == "tensor" and isinstance(type_spec, tff.TensorType):
        leaves.append((binding.tensor.tensor_name, type_spec))
        return True
    if (
        kind == "struct"
        and isinstance(type_spec, tff.StructType)
        and len(binding.struct.element) == len(type_spec)
    ):
        return all(_tensor_leaves(b, t, leaves) for b, t in zip(binding.struct.element, type_spec))
    return False


def meta_graph_def(comp: building_blocks.CompiledComputation):
    """The `MetaGraphDef` TFF hands Grappler for the TensorFlow computation `comp`, built
    without importing the graph, or None when its bindings are not all tensors."""
    tf_proto = comp.proto.tensorflow
    inputs, outputs = [], []
    if tf_proto.parameter.WhichOneof("binding") is not None and not _tensor_leaves(
        tf_proto.parameter, comp.type_signature.parameter, inputs
    ):
        return None
    if not _tensor_leaves(tf_proto.result, comp.type_signature.result, outputs):
        return None
    graph_def = serialization_utils.unpack_graph_def(tf_proto.graph_def)
    placeholders = {node.name: node for node in graph_def.node if node.op == "Placeholder"}
    result = tf.compat.v1.MetaGraphDef()
    result.graph_def.CopyFrom(graph_def)
    if tf_proto.initialize_op:
        result.collection_def[tf.compat.v1.GraphKeys.INIT_OP].node_list.value.append(
            tf_proto.initialize_op
        )
    signature = result.signature_def[_SIGNATURE]
    for index, (name, _) in enumerate(inputs):
        node = placeholders.get(name.partition(":")[0])
        if node is None:
            return None
        info = signature.inputs[f"arg_{index}"]
        info.name = name
        # A placeholder's tensor has exactly its node's dtype and shape attributes.
        info.dtype = node.attr["dtype"].type
        info.tensor_shape.CopyFrom(node.attr["shape"].shape)
    for index, (name, type_spec) in enumerate(outputs):
        info = signature.outputs[f"output_{index}"]
        info.name = name
        info.dtype = tf.dtypes.as_dtype(type_spec.dtype).as_datatype_enum
        info.tensor_shape.CopyFrom(tf.TensorShape(type_spec.shape).as_proto())
    return result


def _optimized(
    comp: building_blocks.CompiledComputation, config: tf.compat.v1.ConfigProto
) -> building_blocks.CompiledComputation:
    """`comp` after Grappler, as TFF's `optimize_tensorflow_comp` returns it."""
    graph = meta_graph_def(comp)
    if graph is None:
        return compiled_computation_transformations.optimize_tensorflow_comp(comp, config)
    try:
        graph_def = tf_optimizer.OptimizeGraph(config, graph)
    except ValueError:
        # As TFF does: Grappler refuses some graphs without feeds or fetches; keep them as is.
        return comp
    original = comp.proto.tensorflow
    tf_proto = computation_pb2.TensorFlow(
        graph_def=serialization_utils.pack_graph_def(graph_def),
        initialize_op=original.initialize_op or None,
        session_token_tensor_name=original.session_token_tensor_name or None,
        parameter=original.parameter if original.HasField("parameter") else None,
        result=original.result,
    )
    return building_blocks.CompiledComputation(
        computation_pb2.Computation(type=comp.proto.type, tensorflow=tf_proto),
        type_signature=comp.type_signature,
    )


class _GrapplerOnce(transformation_utils.TransformSpec):
    """Grappler over each TensorFlow computation, once per distinct one."""

    def __init__(self, config: tf.compat.v1.ConfigProto):
        self._config = config
        self._done: dict[bytes, building_blocks.CompiledComputation] = {}

    def should_transform(self, comp) -> bool:
        return (
            isinstance(comp, building_blocks.CompiledComputation)
            and comp.proto.WhichOneof("computation") == "tensorflow"
        )

    def transform(self, comp):
        if not self.should_transform(comp):
            return comp, False
        key = hashlib.sha256(comp.proto.SerializeToString(deterministic=True)).digest()
        optimized = self._done.get(key)
        if optimized is None:
            optimized = self._done[key] = _optimized(comp, self._config)
        return optimized, True


def compile_to_native(comp: tff.Computation) -> tff.Computation:
    """What `tff.backends.native.desugar_and_transform_to_native(comp)` returns, with each
    distinct TensorFlow computation optimized once (see the module docstring)."""
    desugared, _ = tensorflow_tree_transformations.replace_intrinsics_with_bodies(
        comp.to_building_block()
    )
    try:
        form = transformations.to_call_dominant(desugared)
        form, _ = transformation_utils.transform_postorder(
            form, _GrapplerOnce(grappler_config()).transform
        )
        form, _ = compiled_computation_transformations.transform_tf_call_ops_to_disable_grappler(
            form
        )
        form, _ = compiled_computation_transformations.transform_tf_add_ids(form)
    except ValueError:
        # TFF's compiler returns its input when a transformation refuses it; so do we.
        return tff.framework.ConcreteComputation(
            computation_proto=desugared.proto, context_stack=tff.framework.get_context_stack()
        )
    return tff.framework.ConcreteComputation(
        computation_proto=form.proto, context_stack=tff.framework.get_context_stack()
    )
