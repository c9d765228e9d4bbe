"""The table of rule cases (tests/onnx_rule_cases.py): each registered rule has a case, and each
case's gradient agrees with float64 finite differences. Test ids name the rules module first
(`-k activations-` runs one module's cases)."""
import pytest

from multisal.backends.onnx.grad.builder import RULES
from onnx_rule_cases import CASES, check_case


def _module(op):
    return RULES[op].__module__.rsplit(".", 1)[-1] if op in RULES else "no_rule"


def test_every_rule_has_a_case_and_every_case_a_rule():
    covered = {case.op for case in CASES}
    assert not set(RULES) - covered, f"rules without a case in tests/onnx_rule_cases.py: {sorted(set(RULES) - covered)}"
    assert not covered - set(RULES), f"cases of ops without a rule: {sorted(covered - set(RULES))}"
    names = [case.name(opset) for case in CASES for opset in case.opsets]
    assert len(names) == len(set(names)), "cases of one op need labels that tell them apart"


@pytest.mark.parametrize("case, opset", [pytest.param(case, opset, id=f"{_module(case.op)}-{case.name(opset)}")
                                         for case in CASES for opset in case.opsets])
def test_rule_case(case, opset):
    check_case(case, opset)
