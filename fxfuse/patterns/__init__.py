"""The pattern DSL and matcher that fusion passes are written in."""

from fxfuse.patterns.dsl import Alt, Const, Op, P, Pattern, Var, maybe
from fxfuse.patterns.matcher import Match, NoMatch, match, node_root_key, root_targets

__all__ = [
    "Alt", "Const", "Match", "NoMatch", "Op", "P", "Pattern", "Var",
    "match", "maybe", "node_root_key", "root_targets",
]
