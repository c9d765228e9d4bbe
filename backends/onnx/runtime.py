"""onnxruntime sessions, with their failures said in one line.

onnxruntime reports a failure as an exception whose text carries its own source location, C++
signatures and status codes. What a user needs is what failed and where in their model: the op
and the node (for a node of a gradient graph, the model's node it differentiates).
"""
from __future__ import annotations

import re

from multisal.errors import MultisalError
from multisal.frameworks import lazy_import

from .grad.context import OBJECTIVE_SCOPE, forward_node_name

ort = lazy_import("onnxruntime")

_RUNNING = re.compile(r"running (\w+) node\. Name:'([^']*)'")
_IN_NODE = re.compile(r"in node \(([^)]*)\)")
_NODE_OP = re.compile(r"Node \(([^)]*)\) Op \((\w+)\)")
_IN_NODE_SPEC = re.compile(r'In Node, \("([^"]*)", (\w+), [^)]*\) : \(.*?\) -> \(.*?\) , ')
_SOURCE = re.compile(r"/onnxruntime_src/\S+:\d+ (?:[^()]*\([^()]*\)(?: const)? )?")
# onnxruntime repeats its prefix before each status it wraps.
_PREFIX = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")


def failure(err, doing: str, source: str) -> MultisalError:
    """One line for an onnxruntime exception raised while `doing` something with model `source`."""
    text = " ".join(str(err).split())
    text = _SOURCE.sub("", _PREFIX.sub("", text))
    where = ""
    match = _RUNNING.search(text) or _NODE_OP.search(text) or _IN_NODE_SPEC.search(text) or _IN_NODE.search(text)
    if match:
        if match.re is _RUNNING:
            op, node = match.group(1), match.group(2)
        elif match.re in (_NODE_OP, _IN_NODE_SPEC):
            node, op = match.group(1), match.group(2)
        else:
            op, node = None, match.group(1)
        forward = forward_node_name(node) if node else node
        if forward != node:   # a node of the gradient graph: the model's node it differentiates
            where = f" (the gradient of node {forward!r}" + (f", op {op})" if op else ")")
        elif node.startswith(OBJECTIVE_SCOPE + "/"):   # what the objective wrote on the model's output
            where = f" (the objective on the model's output, node {node!r}" + (f", op {op})" if op else ")")
        elif node:
            where = f" (node {node!r}" + (f", op {op})" if op else ")")
        else:
            where = f" (op {op})"
        text = text.replace(match.group(0), "").strip(" .:")
    text = text.split(" Status Message: ", 1)[-1]
    return MultisalError(f"onnxruntime cannot {doing} {source}{where}: {text[:300]}")


def session(model_bytes, source: str, providers=("CPUExecutionProvider",), threads=None, optimize=True):
    """An InferenceSession of a serialized model, or one line saying why there is none."""
    ort.set_default_logger_severity(4)   # its own log lines (colour codes too): failures come as one line
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return ort.InferenceSession(model_bytes, options, providers=list(providers))
    except Exception as err:   # noqa: BLE001 - onnxruntime raises its own exception types
        raise failure(err, "load", source) from None


def run(sess, feeds, source: str, outputs=None):
    """sess.run(outputs, feeds), or one line naming the op and node that failed."""
    options = ort.RunOptions()
    options.log_severity_level = 4
    try:
        return sess.run(outputs, feeds, options)
    except Exception as err:   # noqa: BLE001 - onnxruntime raises its own exception types
        raise failure(err, "run", source) from None
