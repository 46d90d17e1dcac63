"""Judging a rewrite against float64 where the model's own float32 result strays (an ill-conditioned input)."""

from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

import fxfuse
from fxfuse.dynamo import Inputs
from fxfuse.ir.inputs import Probe
from fxfuse.ir.numerics import Float64Replay, compare, compare_exact
from fxfuse.passes import PassResult
from fxfuse.passes.manager import validate_on
from tests.helpers import captured


def cancelling(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a + (b + c) with a ≈ -b: float32 rounds c's digits away in b + c, and the result keeps the loss."""
    return a + (b + c)


def cancelling_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    a = 1e3 * torch.randn(4096, generator=gen)
    b = -a + torch.randn(4096, generator=gen) * 1e-2
    return a, b, torch.randn(4096, generator=gen) * 1e-2


def test_compare_exact_passes_rounding_and_fails_a_wrong_result():
    exact = torch.linspace(-1, 1, 1000, dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    reference = (exact + 3e-4 * torch.randn(1000, generator=gen, dtype=torch.float64)).float()
    rounded = (exact + 3e-4 * torch.randn(1000, generator=gen, dtype=torch.float64)).float()
    assert not compare(reference, rounded).ok
    judged = compare_exact(reference, rounded, exact)
    assert judged.ok and "the model itself is" in judged.detail
    assert judged.max_error == compare(reference, rounded).max_error  # still the error against float32
    wrong = compare_exact(reference, rounded * 1.01, exact)  # a lost scale: 1e-2, far past the rounding
    assert not wrong.ok and "from float64" in wrong.detail
    hopeless = (exact + 0.05 * torch.randn(1000, generator=gen, dtype=torch.float64)).float()
    unjudgeable = compare_exact(hopeless, rounded, exact)
    assert not unjudgeable.ok and "too far to judge" in unjudgeable.detail
    assert not compare_exact(reference, rounded[:10], exact).ok  # shapes are never excused


def test_validation_judges_a_reordered_sum_against_float64_and_still_rejects_a_dropped_term():
    a, b, c = cancelling_inputs()
    gm = fx.symbolic_trace(cancelling)
    replay = Float64Replay(gm)
    case = Probe("cancelling", (a, b, c), {}, cancelling(a, b, c), lambda: replay(a, b, c))

    def reordered(a, b, c):  # more accurate than the model, so as far from its float32 result as it is from float64
        return (a + b) + c

    assert not compare(case.reference, reordered(a, b, c)).ok  # float32 rounding alone fails the plain check
    result = PassResult("reorder")
    assert validate_on(reordered, [case], result) is None
    assert result.validated_on[0].startswith("cancelling (judged against float64")
    failure = validate_on(lambda a, b, c: a + b, [case], PassResult("drop c"))
    assert failure is not None and "from float64" in failure[1]
    no_float64 = Probe("cancelling", (a, b, c), {}, cancelling(a, b, c))
    assert validate_on(reordered, [no_float64], PassResult("reorder")) is not None


class Upcasting(nn.Module):
    """A norm that upcasts to float32 and a weight read by get_attr, as exported graphs spell them."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        h = x.to(torch.float32)
        return self.proj(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6))


def test_the_float64_replay_computes_in_float64_and_keeps_the_graph_before_rewrites():
    model = Upcasting().eval()
    x = torch.randn(2, 8)
    gm = captured(model, x)
    replay = Float64Replay(gm)
    exact = replay(x)
    exact = exact[0] if isinstance(exact, (tuple, list)) else exact
    assert exact.dtype == torch.float64
    h = x.double()
    by_hand = torch.nn.functional.linear(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6),
                                         model.proj.weight.double(), model.proj.bias.double()).detach()
    torch.testing.assert_close(exact, by_hand, rtol=1e-12, atol=1e-12)
    for node in gm.graph.nodes:  # a rewrite of gm after the replay was taken does not reach it
        if node.op == "output":
            node.args = (fx.node.map_arg(node.args, lambda n: gm.graph.call_function(torch.neg, (n,))),)
    gm.recompile()
    again = replay(x)
    torch.testing.assert_close(again[0] if isinstance(again, (tuple, list)) else again, by_hand)


def test_the_backend_gives_every_case_a_float64_result():
    graphs = []

    def keep(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    model = Upcasting().eval()
    x, mask = torch.randn(2, 8), torch.ones(2, 8)
    compiled = torch.compile(lambda x, mask: model(x * mask), backend=keep)
    with torch.no_grad():
        compiled(x, mask)
    gm, example = graphs[0]
    inputs = Inputs(gm, example)
    probes = inputs.probes(gm)
    assert probes
    for probe in probes:
        exact = probe.exact()
        assert exact[0].dtype == torch.float64
        torch.testing.assert_close(exact[0].float(), probe.reference[0], rtol=1e-5, atol=1e-5)


def test_optimize_still_validates_and_reports_plain_cases_by_their_labels():
    model = Upcasting().eval()
    opt = fxfuse.optimize(model, (torch.randn(2, 8),))
    assert opt.report.validated_on and all("float64" not in label for label in opt.report.validated_on)
