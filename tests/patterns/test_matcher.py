"""The pattern DSL and the matcher, on small ATen-level graphs.

Graphs come from ``torch.export.export(...).module()`` (placeholders, a
``_guards_fn`` call_module node, aten OpOverload call_function nodes) or are
built by hand with ``torch.fx.Graph``.
"""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from fxfuse.patterns import Alt, Const, Match, NoMatch, Op, P, Var, match, maybe, node_root_key, root_targets

aten = torch.ops.aten


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def export_graph(fn, *shapes) -> fx.GraphModule:
    class M(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    return torch.export.export(M(), tuple(torch.randn(*s) for s in shapes)).module()


def nodes_of(gm: fx.GraphModule, packet) -> list[fx.Node]:
    """call_function nodes whose target is an overload of ``packet``, in graph order."""
    return [
        n for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "overloadpacket", None) is packet
    ]


def one(gm: fx.GraphModule, packet) -> fx.Node:
    found = nodes_of(gm, packet)
    assert len(found) == 1, found
    return found[0]


def placeholder(gm: fx.GraphModule, index: int) -> fx.Node:
    """The index-th input (export names them after the forward's *args)."""
    return [n for n in gm.graph.nodes if n.op == "placeholder"][index]


def is_match(m) -> bool:
    return isinstance(m, Match)


# One exported graph shared by many tests; exporting is the slow part.
@pytest.fixture(scope="module")
def g():
    def f(x, y):
        sq = x * x  # mul(x, x)
        xy = x * y  # mul(x, y)
        two = x * 2.0  # mul(x, 2.0)
        three = y * 3.0  # mul(y, 3.0)
        m = x.mean(-1, keepdim=True)  # mean.dim(x, [-1], True)
        m2 = y.mean(-1)  # mean.dim(y, [-1])
        a = x.sin()
        b = y.exp()
        swapped = b * a  # mul(exp(y), sin(x)): sin is the 2nd operand
        swapped_add = b + a  # add(exp(y), sin(x))
        diff = b - a  # sub(exp(y), sin(x))
        return sq, xy, two, three, m, m2, swapped, swapped_add, diff

    gm = export_graph(f, (3, 4), (3, 4))
    x, y = placeholder(gm, 0), placeholder(gm, 1)
    muls = nodes_of(gm, aten.mul)
    names = {x: "x", y: "y"}
    byargs = {tuple(names.get(a, getattr(a, "name", a)) for a in n.args): n for n in muls}
    means = nodes_of(gm, aten.mean)
    return dict(
        gm=gm, x=x, y=y,
        sq=byargs[("x", "x")], xy=byargs[("x", "y")], two=byargs[("x", 2.0)], three=byargs[("y", 3.0)],
        mean_keep=next(n for n in means if n.args[0] is x), mean_nokeep=next(n for n in means if n.args[0] is y),
        sin=one(gm, aten.sin), exp=one(gm, aten.exp),
        swapped=byargs[("exp", "sin")], swapped_add=one(gm, aten.add), diff=one(gm, aten.sub),
    )


def test_exported_graph_shape(g):
    """The captured module looks as the tests assume (ATen OpOverloads, a _guards_fn call_module)."""
    gm = g["gm"]
    assert any(n.op == "call_module" and n.target == "_guards_fn" for n in gm.graph.nodes)
    assert g["sq"].target is aten.mul.Tensor
    assert g["mean_keep"].target is aten.mean.dim
    assert g["mean_keep"].args == (g["x"], [-1], True)
    assert g["mean_nokeep"].args == (g["y"], [-1])  # keepdim left to its default


# --------------------------------------------------------------------------
# Var
# --------------------------------------------------------------------------


def test_var_captures_argument(g):
    m = match(P.mul(Var("a"), Var("b")), g["xy"])
    assert is_match(m)
    assert m.a is g["x"] and m.b is g["y"]
    assert m.root is g["xy"]
    assert m.nodes == [g["xy"]]


def test_var_repeated_name_must_capture_same_node(g):
    pat = P.mul(Var("x"), Var("x"))
    m = match(pat, g["sq"])
    assert is_match(m) and m.x is g["x"]
    miss = match(pat, g["xy"])
    assert isinstance(miss, NoMatch)
    assert "'x'" in miss.reason  # the reason names the inconsistent capture


def test_var_wildcards_do_not_constrain_each_other(g):
    assert is_match(match(P.mul(Var(), Var()), g["xy"]))
    m = match(P.mul(Var(), Var()), g["xy"])
    assert m.captures == {}


def test_var_repeated_literal(g):
    """A name bound to a literal must see an equal literal the second time."""
    m = match(P.mul(Var("v"), Var("c")), g["two"])
    assert m.c == 2.0
    # mul(x, 2.0): binding c to x then to 2.0 is inconsistent (and so is the swapped order)
    assert isinstance(match(P.mul(Var("c"), Var("c")), g["two"]), NoMatch)


def test_var_predicate(g):
    is_placeholder = lambda v: isinstance(v, fx.Node) and v.op == "placeholder"  # noqa: E731
    assert is_match(match(P.mul(Var("a", is_placeholder), Var("b", is_placeholder)), g["xy"]))
    miss = match(P.mul(Var("a", is_placeholder), Var("b", is_placeholder)), g["swapped"])
    assert isinstance(miss, NoMatch) and "fails the check" in miss.reason


def test_var_matches_node_and_literal(g):
    m = match(P.mul(Var("a"), Var("b")), g["two"])
    assert m.a is g["x"] and m.b == 2.0


# --------------------------------------------------------------------------
# Const
# --------------------------------------------------------------------------


def test_const_with_predicate(g):
    pat = P.mul(Var("x"), Const("c", lambda c: c == 2.0))
    m = match(pat, g["two"])
    assert is_match(m) and m.c == 2.0 and m.x is g["x"]
    miss = match(pat, g["three"])
    assert isinstance(miss, NoMatch)
    assert "'c'" in miss.reason and "3.0" in miss.reason and "fails its check" in miss.reason


def test_const_rejects_a_node(g):
    miss = match(P.mul(Var("x"), Const("c")), g["sq"])
    assert isinstance(miss, NoMatch)
    assert "expected a constant" in miss.reason and "'c'" in miss.reason
    assert miss.node is g["x"]


def test_const_captures_list_arguments(g):
    m = match(P.mean(Var("x"), Const("dims", lambda d: list(d) == [-1]), Const("keep")), g["mean_keep"])
    assert is_match(m) and m.dims == [-1] and m.keep is True


# --------------------------------------------------------------------------
# commutativity
# --------------------------------------------------------------------------


def test_commutative_constant_first_in_pattern(g):
    """aten puts the scalar second; a pattern with the Const first still matches mul."""
    m = match(P.mul(Const("c"), Var("x")), g["two"])
    assert is_match(m) and m.c == 2.0 and m.x is g["x"]


@pytest.mark.parametrize("key,packet", [("swapped", "mul"), ("swapped_add", "add")])
def test_commutative_subpattern_as_second_operand(g, key, packet):
    """Graph: op(exp(y), sin(x)); pattern op(sin(Var x), Var other) matches with operands swapped."""
    pat = getattr(P, packet)(P.sin(Var("x")).bind("s"), Var("other"))
    m = match(pat, g[key])
    assert is_match(m)
    assert m.x is g["x"] and m.s is g["sin"] and m.other is g["exp"]
    assert set(m.nodes) == {g["sin"], g[key]}
    # both operands as sub-patterns, written in the "wrong" order
    m2 = match(getattr(P, packet)(P.sin(Var("a")), P.exp(Var("b"))), g[key])
    assert is_match(m2) and m2.a is g["x"] and m2.b is g["y"]


def test_sub_is_not_commutative(g):
    assert is_match(match(P.sub(P.exp(Var()), P.sin(Var())), g["diff"]))
    miss = match(P.sub(P.sin(Var()), P.exp(Var())), g["diff"])
    assert isinstance(miss, NoMatch)
    assert "sin" in miss.reason


def test_add_with_alpha_is_not_commutative():
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.placeholder("y")
    s = graph.call_function(aten.sin.default, (x,))
    root = graph.call_function(aten.add.Tensor, (y, s), {"alpha": 2})  # y + 2*sin(x)
    graph.output(root)
    assert is_match(match(P.add(Var("y"), P.sin(Var("x")), alpha=2), root))
    # the pattern means sin(x) + 2*y: it must not match
    assert isinstance(match(P.add(P.sin(Var("x")), Var("y"), alpha=2), root), NoMatch)


def test_commutative_swap_backtracks_over_captures():
    """mul(sin(x), x) against mul(Var a, sin(Var a)): the first order binds a = sin(x) and
    fails; the swapped order must start from fresh captures."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    s = graph.call_function(aten.sin.default, (x,))
    root = graph.call_function(aten.mul.Tensor, (s, x))
    graph.output(root)
    m = match(P.mul(Var("a"), P.sin(Var("a"))), root)
    assert is_match(m) and m.a is x


def test_specific_overload_target(g):
    assert is_match(match(Op((aten.mul.Tensor,), (Var(), Var())), g["xy"]))
    miss = match(Op((aten.mul.Scalar,), (Var(), Var())), g["xy"])
    assert isinstance(miss, NoMatch) and "mul.Scalar" in miss.reason


def test_any_of(g):
    pat = P.any_of(["sin", "exp"], Var("v"))
    assert match(pat, g["sin"]).v is g["x"]
    assert match(pat, g["exp"]).v is g["y"]
    assert isinstance(match(pat, g["sq"]), NoMatch)


# --------------------------------------------------------------------------
# schema-normalized arguments
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pat",
    [
        P.mean(Var("x"), [-1], keepdim=True),
        P.mean(Var("x"), [-1], True),
        P.mean(Var("x"), dim=[-1], keepdim=True),
        P.mean(Var("x"), keepdim=True),
    ],
    ids=["pos+kw", "positional", "keywords", "keepdim-only"],
)
def test_keyword_pattern_matches_positional_call(g, pat):
    m = match(pat, g["mean_keep"])
    assert is_match(m) and m.x is g["x"]


def test_keyword_mismatch(g):
    miss = match(P.mean(Var("x"), [-1], keepdim=False), g["mean_keep"])
    assert isinstance(miss, NoMatch)
    assert isinstance(match(P.mean(Var("x"), [-2], keepdim=True), g["mean_keep"]), NoMatch)


def test_defaults_are_filled_in(g):
    """mean.dim(y, [-1]) leaves keepdim at its schema default False."""
    assert is_match(match(P.mean(Var("x"), [-1], keepdim=False), g["mean_nokeep"]))
    assert isinstance(match(P.mean(Var("x"), [-1], keepdim=True), g["mean_nokeep"]), NoMatch)


def test_positional_pattern_matches_keyword_call():
    graph = fx.Graph()
    x = graph.placeholder("x")
    root = graph.call_function(aten.mean.dim, (x,), {"dim": [-1], "keepdim": True})
    graph.output(root)
    assert is_match(match(P.mean(Var("x"), [-1], True), root))
    assert is_match(match(P.mean(Var("x"), dim=[-1], keepdim=True), root))
    assert isinstance(match(P.mean(Var("x"), [-1], False), root), NoMatch)


def test_too_many_pattern_arguments(g):
    miss = match(P.sin(Var(), Var()), g["sin"])
    assert isinstance(miss, NoMatch) and "fewer arguments" in miss.reason
    miss = match(P.sin(Var(), no_such_arg=1), g["sin"])
    assert isinstance(miss, NoMatch) and "fewer arguments" in miss.reason


# --------------------------------------------------------------------------
# Alt / maybe
# --------------------------------------------------------------------------


def test_alt_either_option(g):
    pat = P.sin(Var("v")) | P.exp(Var("v"))
    assert isinstance(pat, Alt)
    assert match(pat, g["sin"]).v is g["x"]
    assert match(pat, g["exp"]).v is g["y"]
    miss = match(pat, g["sq"])
    assert isinstance(miss, NoMatch)


def test_alt_chains_flatten():
    a, b, c = P.sin(Var()), P.cos(Var()), P.exp(Var())
    assert (a | b | c).options == (a, b, c)


def test_alt_first_option_wins(g):
    m = match(Var("first") | P.sin(Var("second")), g["sin"])
    assert "first" in m.captures and "second" not in m.captures


def test_alt_backtracks_when_outer_pattern_fails():
    """sub(sin(x), x) against sub(Var a | sin(Var a), Var a): option 1 binds a = sin(x), which
    the second operand contradicts; option 2 must then be tried."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    s = graph.call_function(aten.sin.default, (x,))
    root = graph.call_function(aten.sub.Tensor, (s, x))
    graph.output(root)
    m = match(P.sub(Var("a") | P.sin(Var("a")), Var("a")), root)
    assert is_match(m) and m.a is x
    assert m.nodes == [s, root]


@pytest.fixture(scope="module")
def gmaybe():
    def f(x, y):
        return x.sin().to(torch.float16).neg(), y.sin().neg()

    gm = export_graph(f, (2, 3), (2, 3))
    negs = nodes_of(gm, aten.neg)
    return gm, negs


def test_maybe(gmaybe):
    gm, (neg_to, neg_plain) = gmaybe
    inner = P.sin(Var("x")).bind("s")
    pat = P.neg(maybe(P.to(inner, Var("dtype")).bind("cast"), inner))
    m1 = match(pat, neg_to)
    assert is_match(m1)
    assert m1.x is placeholder(gm, 0)
    assert m1.dtype == torch.float16 and m1.cast.target is aten.to.dtype
    m2 = match(pat, neg_plain)
    assert is_match(m2)
    assert m2.x is placeholder(gm, 1)
    assert m2.get("dtype") is None and m2.get("cast", "absent") == "absent"
    with pytest.raises(AttributeError, match="cast"):
        m2.cast


# --------------------------------------------------------------------------
# bind / single_use
# --------------------------------------------------------------------------


def test_bind_captures_node(g):
    m = match(P.mul(P.exp(Var("b")).bind("e"), P.sin(Var("a")).bind("s")).bind("root"), g["swapped"])
    assert is_match(m)
    assert m.e is g["exp"] and m.s is g["sin"] and m.root is g["swapped"]
    assert m.captures["root"] is g["swapped"]
    assert set(m.nodes) == {g["exp"], g["sin"], g["swapped"]}


def test_bind_same_name_needs_same_node():
    graph = fx.Graph()
    x = graph.placeholder("x")
    t = graph.call_function(aten.sin.default, (x,))
    same = graph.call_function(aten.mul.Tensor, (t, t))
    t2 = graph.call_function(aten.sin.default, (x,))
    diff = graph.call_function(aten.mul.Tensor, (t, t2))
    graph.output((same, diff))
    pat = P.mul(P.sin(Var("x")).bind("s"), P.sin(Var("x")).bind("s"))
    m = match(pat, same)
    assert is_match(m) and m.s is t
    assert isinstance(match(pat, diff), NoMatch)


@pytest.fixture(scope="module")
def gshared():
    def f(x):
        t = x.sin()
        return t.exp(), t.cos(), x.tanh().exp()

    gm = export_graph(f, (2, 3))
    exps = nodes_of(gm, aten.exp)
    return gm, exps, one(gm, aten.sin), one(gm, aten.cos)


def test_single_use_rejects_shared_node(gshared):
    gm, (exp_shared, exp_alone), sin, cos = gshared
    assert is_match(match(P.exp(P.sin(Var("x"))), exp_shared))
    miss = match(P.exp(P.sin(Var("x")).single_use()), exp_shared)
    assert isinstance(miss, NoMatch)
    assert miss.node is sin
    assert cos.name in miss.reason and sin.name in miss.reason
    # a node with one user passes
    assert is_match(match(P.exp(P.tanh(Var("x")).single_use()), exp_alone))


def test_single_use_on_root(gshared):
    gm, (exp_shared, _), sin, cos = gshared
    assert isinstance(match(P.sin(Var()).single_use(), sin), NoMatch)
    assert is_match(match(P.sin(Var()), sin))


def test_single_use_is_a_copy():
    base = P.sin(Var("x"))
    assert base.single_use().one_use and not base.one_use
    assert base.bind("s").name == "s" and base.name is None


# --------------------------------------------------------------------------
# NoMatch reasons
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gchain():
    def f(x):
        return x.neg().cos().exp()

    gm = export_graph(f, (2, 3))
    return gm, one(gm, aten.exp), one(gm, aten.cos), one(gm, aten.neg)


def test_nomatch_names_expected_op_at_root(gchain):
    gm, exp, cos, neg = gchain
    miss = match(P.sin(Var()), exp)
    assert isinstance(miss, NoMatch)
    assert "expected sin" in miss.reason and miss.node is exp


def test_nomatch_reports_deepest_failure(gchain):
    gm, exp, cos, neg = gchain
    miss = match(P.exp(P.sin(Var())), exp)
    assert "expected sin" in miss.reason and miss.node is cos and cos.name in miss.reason
    miss = match(P.exp(P.cos(P.relu(Var()))), exp)
    assert "expected relu" in miss.reason and miss.node is neg
    assert miss.depth == 2


def test_nomatch_deepest_among_alternatives(gchain):
    gm, exp, cos, neg = gchain
    # option 1 breaks at depth 1 (tanh vs cos), option 2 at depth 2 (relu vs neg)
    miss = match(P.exp(P.tanh(Var()) | P.cos(P.relu(Var()))), exp)
    assert "expected relu" in miss.reason and miss.node is neg


def test_nomatch_on_non_call_nodes(g):
    miss = match(P.sin(Var()), g["x"])
    assert isinstance(miss, NoMatch) and "expected sin" in miss.reason
    guards = next(n for n in g["gm"].graph.nodes if n.op == "call_module")
    assert isinstance(match(P.sin(Var()), guards), NoMatch)


# --------------------------------------------------------------------------
# root_targets / node_root_key
# --------------------------------------------------------------------------


def test_root_targets():
    assert root_targets(P.mul(Var(), Var())) == {aten.mul}
    assert root_targets(P.mul(Var(), Var()) | P.add(Var(), Var())) == {aten.mul, aten.add}
    assert root_targets(P.any_of(["sin", "cos"], Var())) == {aten.sin, aten.cos}
    assert root_targets(Op((aten.mul.Tensor,), (Var(), Var()))) == {aten.mul}
    inner = P.sin(Var())
    assert root_targets(maybe(P.to(inner, Var()), inner)) == {aten.to, aten.sin}
    # only the root counts, not what it wraps
    assert root_targets(P.exp(P.sin(Var()))) == {aten.exp}
    with pytest.raises(ValueError, match="rooted at an op"):
        root_targets(Var())


def test_node_root_key_agrees_with_root_targets(g):
    for key, pat in [("xy", P.mul(Var(), Var())), ("sin", P.sin(Var())), ("mean_keep", P.mean(Var()))]:
        assert node_root_key(g[key]) in root_targets(pat)
    assert node_root_key(g["swapped_add"]) not in root_targets(P.mul(Var(), Var()))
    guards = next(n for n in g["gm"].graph.nodes if n.op == "call_module")
    assert node_root_key(guards) == "_guards_fn"


# --------------------------------------------------------------------------
# property: chains of unary ops
# --------------------------------------------------------------------------

UNARY = ["sin", "cos", "exp", "neg", "tanh", "relu", "sigmoid", "abs", "rsqrt"]


def build_chain(names: list[str]) -> tuple[fx.Graph, fx.Node, list[fx.Node]]:
    graph = fx.Graph()
    x = graph.placeholder("x")
    cur, made = x, []
    for name in names:
        cur = graph.call_function(getattr(aten, name).default, (cur,))
        made.append(cur)
    graph.output(cur)
    return graph, x, made


def chain_pattern(names: list[str], leaf=None):
    pat = Var("x") if leaf is None else leaf
    for name in names:
        pat = getattr(P, name)(pat)
    return pat


@settings(max_examples=25, deadline=None)
@given(data=st.data(), names=st.lists(st.sampled_from(UNARY), min_size=1, max_size=6))
def test_chain_property(data, names):
    graph, x, made = build_chain(names)
    root = made[-1]

    m = match(chain_pattern(names), root)
    assert is_match(m)
    assert m.x is x and m.nodes == made and m.root is root
    assert root_targets(chain_pattern(names)) == {node_root_key(root)}

    # perturb one op: no match, and the reason points at that node and names the op expected there
    i = data.draw(st.integers(0, len(names) - 1), label="position")
    other = data.draw(st.sampled_from([n for n in UNARY if n != names[i]]), label="replacement")
    perturbed = [*names[:i], other, *names[i + 1:]]
    miss = match(chain_pattern(perturbed), root)
    assert isinstance(miss, NoMatch)
    assert miss.node is made[i]
    assert f"expected {other} " in miss.reason
    assert miss.depth == len(names) - 1 - i

    # one op too many at the bottom: it would have to match the placeholder
    extra = data.draw(st.sampled_from(UNARY), label="extra")
    assert isinstance(match(chain_pattern([extra, *names]), root), NoMatch)
    # a shorter pattern matches with the leaf capturing an inner node
    if len(names) > 1:
        m2 = match(chain_pattern(names[1:]), root)
        assert is_match(m2) and m2.x is made[0]
