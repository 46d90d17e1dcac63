"""The rule driver: a rule that raises becomes a rejection naming the rule, the node and the exception."""

from __future__ import annotations

import importlib

import pytest
import torch

import fxfuse
from fxfuse.errors import strict
from fxfuse.passes.rules import RulePass, rule
from fxfuse.patterns import P, Var
from tests.helpers import captured


class TwoSoftmaxes(torch.nn.Module):
    def forward(self, x):
        return torch.softmax(x, -1) + torch.softmax(x * 2.0, -1)


@rule(P.softmax(Var("x"), -1))
def crashes_on_scaled_inputs(m, b):
    if m.x.target is torch.ops.aten.mul.Tensor:
        raise KeyError("a spelling this rule did not foresee")
    return b.call(torch.ops.aten._safe_softmax.default, m.x, -1)


def test_a_rule_that_raises_is_a_rejection_and_the_pass_goes_on():
    gm = captured(TwoSoftmaxes(), torch.randn(3, 5))
    with strict(False):
        result = RulePass([crashes_on_scaled_inputs])(gm)
    (rejection,) = result.rejections
    assert rejection.rule == "crashes_on_scaled_inputs" and rejection.node.startswith("softmax")
    assert "the rule raised KeyError" in rejection.reason and "did not foresee" in rejection.reason
    assert result.rewrites["crashes_on_scaled_inputs"] == 1  # the other softmax was still rewritten


def test_under_strict_the_exception_propagates():
    gm = captured(TwoSoftmaxes(), torch.randn(3, 5))
    with strict(), pytest.raises(KeyError, match="did not foresee"):
        RulePass([crashes_on_scaled_inputs])(gm)


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v


def test_optimize_survives_a_crashing_attention_rule(monkeypatch):
    def broken(*args, **kwargs):
        raise TypeError("'NoneType' object has no attribute 'dtype'")

    monkeypatch.setattr(importlib.import_module("fxfuse.passes.fuse_attention"), "_replay", broken)
    q = torch.randn(2, 2, 5, 4)
    with strict(False):
        opt = fxfuse.optimize(Attention().eval(), (q, q.clone(), q.clone()), on_failure="skip")
    assert "attention" not in opt.report.ops
    reasons = [r.reason for r in opt.report.rejections if r.rule == "eager_attention"]
    assert reasons == ["the rule raised TypeError: 'NoneType' object has no attribute 'dtype'"]
    assert "the rule raised TypeError" in str(opt.report)
    with torch.no_grad():
        torch.testing.assert_close(opt(q, q, q), Attention()(q, q, q))
