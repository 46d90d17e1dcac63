"""The pass manager: verification and numeric validation after each pass, rollback on request."""

from __future__ import annotations

import pytest
import torch

from fxfuse.passes import PASSES, NumericsError, PassFailure, PassManager, PassResult
from tests.helpers import captured


class Tiny(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x * 2.0, -1) + 1.0


def wrong_scale(gm):
    """A deliberately wrong rewrite: changes the constant of every scalar mul."""
    result = PassResult(name="")
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.mul.Tensor and isinstance(node.args[1], float):
            node.args = (node.args[0], node.args[1] * 1.5)
            result.rewrites["wrong"] += 1
            result.changed = True
    return result


def breaks_graph(gm):
    """A deliberately broken rewrite: a node that uses a value defined after it."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is not None]
    first, last = nodes[1], nodes[-1]
    first.args = (last, *first.args[1:])
    return PassResult(name="", changed=True)


def setup():
    x = torch.randn(3, 7)
    gm = captured(Tiny(), x)
    with torch.no_grad():
        ref = gm(x)
    return gm, x, ref


def test_numeric_validation_names_the_wrong_pass():
    gm, x, ref = setup()
    manager = PassManager([("canonicalize", PASSES["canonicalize"]), ("wrong-scale", wrong_scale)])
    with pytest.raises(NumericsError, match=r"pass 'wrong-scale' changed the model's outputs.*before it: canonicalize"):
        manager.run(gm, ((x,), {}), ref)


def test_skip_rolls_the_wrong_pass_back_and_keeps_going():
    gm, x, ref = setup()
    manager = PassManager([("wrong-scale", wrong_scale), ("cse", PASSES["cse"])], on_failure="skip")
    results = manager.run(gm, ((x,), {}), ref)
    assert results[0].skipped and "changed the model's outputs" in results[0].error
    assert results[1].name == "cse" and not results[1].skipped
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref)
    assert any(isinstance(n.args[1], float) and n.args[1] == 2.0 for n in gm.graph.nodes if n.op == "call_function" and len(n.args) > 1)


def test_verifier_names_the_pass_that_broke_the_graph():
    gm, x, ref = setup()
    manager = PassManager([("breaks-graph", breaks_graph)], validate=False)
    with pytest.raises(PassFailure, match="pass 'breaks-graph' broke the graph"):
        manager.run(gm, ((x,), {}), ref)


def test_validate_needs_the_example():
    gm, _, _ = setup()
    with pytest.raises(ValueError, match="example"):
        PassManager([("cse", PASSES["cse"])]).run(gm)


def test_results_record_sizes_and_rewrites():
    gm, x, ref = setup()
    (result,) = PassManager([("canonicalize", PASSES["canonicalize"])]).run(gm, ((x,), {}), ref)
    assert result.name == "canonicalize" and result.seconds > 0
    assert result.nodes_before >= result.nodes_after


def moves_weights_wrongly(gm):
    """A wrong rewrite that also edits the module: doubles a weight into a new attribute, deletes the old one."""
    (node,) = [n for n in gm.graph.nodes if n.op == "get_attr" and n.target.endswith("weight")]
    owner_path, name = node.target.rsplit(".", 1)
    owner = gm.get_submodule(owner_path)
    gm.register_parameter("doubled", torch.nn.Parameter(getattr(owner, name).detach() * 2, requires_grad=False))
    node.target = "doubled"
    delattr(owner, name)
    return PassResult(name="", changed=True)


def test_skip_restores_the_module_attributes_a_pass_added_and_deleted():
    x = torch.randn(3, 7)
    gm = captured(torch.nn.Sequential(torch.nn.Linear(7, 5)), x)
    with torch.no_grad():
        ref = gm(x)
    manager = PassManager([("moves-weights", moves_weights_wrongly)], on_failure="skip")
    (result,) = manager.run(gm, ((x,), {}), ref)
    assert result.skipped
    assert not hasattr(gm, "doubled")
    with torch.no_grad():
        torch.testing.assert_close(gm(x), ref)


def raises(gm):
    """A pass with a bug: it raises halfway through."""
    next(iter(gm.graph.nodes)).name = "renamed"
    raise IndexError("list index out of range")


def test_a_pass_that_raises_is_skipped_or_named():
    from fxfuse.errors import strict

    gm, x, ref = setup()
    with strict(False):
        (result, after) = PassManager([("raises", raises), ("cse", PASSES["cse"])], on_failure="skip").run(
            gm, ((x,), {}), ref)
        assert result.skipped and result.error == "raised IndexError: list index out of range"
        assert not after.skipped
        with pytest.raises(PassFailure, match="pass 'raises' raised IndexError"):
            PassManager([("raises", raises)]).run(gm, ((x,), {}), ref)
    with strict(), pytest.raises(IndexError):
        PassManager([("raises", raises)], on_failure="skip").run(gm, ((x,), {}), ref)
