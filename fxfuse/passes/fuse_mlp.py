"""fuse-mlp: gated activations and GELU in any spelling → fxfuse ops.

* ``gated_mlp``: ``act(gate) * up`` with act silu (SwiGLU), erf GELU or tanh
  GELU (GeGLU) → ``fxfuse.gated_mlp_act(gate, up, act)``;
* ``aten_gelu``: ``aten.gelu(x, approximate)`` → ``fxfuse.gelu``;
* ``gelu_by_hand``: any small pointwise function of one tensor x, built from
  arithmetic, pow, tanh, erf and sigmoid, that *computes* a GELU: the
  erf GELU, the tanh GELU (GPT-2's ``0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``,
  BLOOM's ``x·0.5·(1 + tanh(0.79788456·x·(1 + 0.044715·x·x)))``, …) or CLIP's
  quick GELU ``x·σ(1.702·x)``. The function is recognised by evaluating it
  in float64 on probe points and comparing with each GELU, so every
  association and constant spelling is found, and a near-miss constant is not.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from fxfuse.ir.dialect import OPS, QUICK_GELU_ALPHA
from fxfuse.ir.meta import same_shape, tensor
from fxfuse.ir.rewrite import Builder
from fxfuse.passes.canonicalize import constant_scalar
from fxfuse.passes.rules import Reject, RulePass, rule
from fxfuse.patterns import Const, Match, P, Var

aten = torch.ops.aten


_x = Var("x")
_activation = (
    P.silu(Var("gate")).bind("act").single_use()
    | P.gelu(Var("gate"), approximate=Const("approximate")).bind("act").single_use()
)
GATED = P.mul(_activation, Var("up"))
ATEN_GELU = P.gelu(_x, approximate=Const("approximate"))
_POINTWISE = {
    aten.mul.Tensor, aten.add.Tensor, aten.sub.Tensor, aten.div.Tensor, aten.pow.Tensor_Scalar, aten.neg.default,
    aten.tanh.default, aten.erf.default, aten.sigmoid.default, aten.exp.default, aten.reciprocal.default,
    aten.sqrt.default, aten.rsqrt.default,
}
_MAX_CONE = 16
_PROBE = torch.linspace(-8.0, 8.0, 321, dtype=torch.float64)
GELUS = {
    "none": lambda x: F.gelu(x),
    "tanh": lambda x: F.gelu(x, approximate="tanh"),
    "sigmoid": lambda x: x * torch.sigmoid(QUICK_GELU_ALPHA * x),
}


def _cone(root: fx.Node, x: fx.Node) -> list[fx.Node] | None:
    """The pointwise nodes from ``root`` down to ``x`` (topological order), if their only tensor input is ``x``."""
    seen: dict[fx.Node, None] = {}
    stack = [root]
    while stack:
        node = stack.pop()
        if node is x or node in seen:
            continue
        if node.op != "call_function" or node.target not in _POINTWISE or len(seen) >= _MAX_CONE:
            return None  # reached another tensor than x
        seen[node] = None
        stack += [arg for arg in node.all_input_nodes if constant_scalar(arg) is None]
    cone = set(seen)
    if any(u not in cone for n in cone if n is not root for u in n.users):
        return None  # an intermediate value is used outside: fusing would not remove it
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(cone, key=order.__getitem__)


def _evaluate(cone: list[fx.Node], x: fx.Node, probe: torch.Tensor) -> torch.Tensor:
    values: dict[fx.Node, object] = {x: probe}

    def value(arg):
        if arg in values:
            return values[arg]
        return constant_scalar(arg)

    for node in cone:
        values[node] = node.target(*fx.node.map_arg(node.args, value), **fx.node.map_arg(node.kwargs, value))
    return values[cone[-1]]


def _which_gelu(root: fx.Node) -> tuple[str, fx.Node] | None:
    """(approximation, x) if ``root`` computes a GELU of some x."""
    out = tensor(root)
    if out is None or not out.is_floating_point():
        return None
    candidates = {}
    stack, seen = [root], set()
    while stack and len(seen) < _MAX_CONE:
        node = stack.pop()
        if node in seen or node.op != "call_function" or node.target not in _POINTWISE:
            continue
        seen.add(node)
        for arg in node.all_input_nodes:
            candidates[arg] = candidates.get(arg, 0) + 1
            stack.append(arg)
    for x in [c for c, uses in candidates.items() if uses >= 2]:
        xt = tensor(x)
        if xt is None or xt.dtype != out.dtype or not same_shape(xt, out):
            continue
        cone = _cone(root, x)
        if cone is None or cone[-1] is not root:
            continue
        with torch.no_grad():
            y = _evaluate(cone, x, _PROBE)
        for name, reference in GELUS.items():
            expected = reference(_PROBE)
            if isinstance(y, torch.Tensor) and y.shape == expected.shape and \
                    bool(((y - expected).abs() <= 1e-6 * (1 + expected.abs())).all()):
                return name, x
    return None


def _looks_gated(node: fx.Node) -> bool:
    return any(isinstance(a, fx.Node) and a.target in (aten.silu.default, aten.gelu.default) for a in node.args)


@rule(GATED, looks_like=_looks_gated)
def gated_mlp(m: Match, b: Builder) -> fx.Node | Reject:
    if m.act.target is aten.silu.default:
        activation = "silu"
    else:
        activation = "gelu_tanh" if m.approximate == "tanh" else "gelu"
    gate, up = tensor(m.gate), tensor(m.up)
    if gate is None or up is None or gate.dtype != up.dtype or not same_shape(gate, up):
        return Reject(f"gate {gate} and up {up} differ in shape or dtype", m.act)
    return b.call(OPS["gated_mlp_act"], m.gate, m.up, activation)


@rule(ATEN_GELU, looks_like=lambda node: True)
def aten_gelu(m: Match, b: Builder) -> fx.Node:
    return b.call(OPS["gelu"], m.x, m.approximate)


@rule(P.mul(Var("a"), Var("b")))
def gelu_by_hand(m: Match, b: Builder) -> fx.Node | None:
    found = _which_gelu(m.root)
    if found is None:
        return None
    approximate, x = found
    b.consume(*_cone(m.root, x))
    return b.call(OPS["gelu"], x, approximate)


fuse_mlp = RulePass([gated_mlp, gelu_by_hand, aten_gelu])
"""The fuse-mlp pass."""
