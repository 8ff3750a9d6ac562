"""mfl_tff: meta-federated learning as TensorFlow Federated computations.

Importing the package (or `mfl_tff.meta`, the pure-TensorFlow math) loads neither TFF nor gRPC:
only the subpackages that build federated computations import TFF.
"""

from __future__ import annotations

import atexit
import sys

# TFF's modules holding its default execution context; looked up in `sys.modules` rather than
# imported, so that the exit hook below never loads TFF itself.
_CONTEXT_STACK_MODULE = "tensorflow_federated.python.core.impl.context_stack.context_stack_impl"
_ERROR_CONTEXT_MODULE = "tensorflow_federated.python.core.impl.context_stack.runtime_error_context"


def _release_tff_default_context() -> None:
    """Replaces TFF's import-time default context at exit, if the program imported TFF.

    That context owns a service manager whose `__del__` otherwise runs during interpreter
    teardown, after `subprocess` is gone, and can print "Exception ignored in ... 'NoneType'
    object has no attribute 'Popen'". `mfl_tff.training.runtime` registers the same release; this
    one covers programs that use TFF through any other mfl_tff module.
    """
    stack_impl = sys.modules.get(_CONTEXT_STACK_MODULE)
    error_context = sys.modules.get(_ERROR_CONTEXT_MODULE)
    if stack_impl is None or error_context is None:
        return
    stack_impl.context_stack.set_default_context(error_context.RuntimeErrorContext())


atexit.register(_release_tff_default_context)
