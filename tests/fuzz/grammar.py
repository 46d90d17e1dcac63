"""A grammar of transformer blocks in the spellings real code uses, for the differential fuzzer.

A ``Spec`` is plain data drawn by hypothesis (so a failure shrinks to the
simplest block that shows it); ``Block(spec)`` is the ``nn.Module`` it
spells: an optional norm, attention, a residual add, a norm and an MLP.
Each part has many spellings: scales by mul, div or folded into q or k;
additive float, boolean, integer, ``where``/``masked_fill``, causal-built
and sliding-window masks; casts, views, reshapes, transposes and clones;
softmax variants; grouped-query repeats; biases; returned probabilities;
LayerNorm and RMSNorm written out or called, with or without weight;
GELU, SwiGLU, GeGLU and ReLU MLPs.

``expected_ops(spec)`` says what a full fusion of the block gives, so the
fuzzer also catches a block that silently fails to fuse.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

MASK_INPUTS = ("none", "bool", "long", "float01", "additive", "bool4d")
SCALES = ("mul", "div", "q", "k", "tensor_div", "none")
MASK_STEPS = ("additive", "masked_fill", "where", "where_mild", "bool_add", "int_add", "causal_triu",
              "causal_arange", "sliding_window", "alibi", "number", "sub", "additive_inplace", "masked_fill_inplace")
SOFTMAXES = ("F", "method", "dtype32", "safe", "upcast")
LAYOUTS = ("4d", "bmm3d", "round_trip")
REPEATS = ("expand", "repeat_interleave")
NORMS = ("none", "layer_norm_module", "layer_norm_fn", "layer_norm_hand", "rms_hand", "rms_upcast", "rms_gemma",
         "rms_module", "rms_no_weight")
MLPS = ("gelu", "gelu_tanh_hand", "swiglu", "geglu", "relu", "quick_gelu")


@dataclass(frozen=True)
class Spec:
    """One generated block: every choice the grammar made."""

    heads: int
    kv_heads: int
    head_dim: int
    attention: str  # "eager" or "sdpa"
    layout: str
    repeat: str
    scale: str
    mask_input: str
    mask_steps: tuple[str, ...]
    softmax: str
    copies: bool  # .contiguous() on q, .clone() on the scores, .detach() on v: value-preserving ops
    clone_probs: bool
    return_probs: bool
    softcap: bool
    pre_norm: str
    post_norm: str
    mlp: str
    dtype: str  # "float32" or "bfloat16"
    all_true_example: bool
    batch: int
    seq: int

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim


@st.composite
def specs(draw) -> Spec:
    """A hypothesis strategy for ``Spec``s; simpler choices come first, so failures shrink towards them."""
    heads = draw(st.sampled_from([2, 4]))
    kv_heads = draw(st.sampled_from([h for h in (heads, heads // 2, 1) if h >= 1]))
    attention = draw(st.sampled_from(["eager", "sdpa"]))
    mask_input = draw(st.sampled_from(MASK_INPUTS))
    layout = draw(st.sampled_from(LAYOUTS)) if attention == "eager" and kv_heads == heads else "4d"
    steps: tuple[str, ...] = ()
    if attention == "eager":
        allowed = [s for s in MASK_STEPS if mask_input != "none" or s not in
                   ("additive", "masked_fill", "where", "where_mild", "bool_add", "int_add", "additive_inplace",
                    "masked_fill_inplace")]
        if mask_input in ("additive", "bool4d"):
            allowed = [s for s in allowed if s not in ("bool_add", "int_add")]
        steps = tuple(draw(st.lists(st.sampled_from(allowed), max_size=2, unique=True)))
    softcap = attention == "eager" and draw(st.booleans()) and not steps
    return Spec(
        heads=heads,
        kv_heads=kv_heads,
        head_dim=draw(st.sampled_from([4, 8])),
        attention=attention,
        layout=layout,
        repeat=draw(st.sampled_from(REPEATS)),
        scale=draw(st.sampled_from(SCALES)),
        mask_input=mask_input,
        mask_steps=steps,
        softmax=draw(st.sampled_from(SOFTMAXES)),
        copies=draw(st.booleans()),
        clone_probs=draw(st.booleans()),
        return_probs=attention == "eager" and draw(st.integers(0, 7)) == 7,
        softcap=softcap,
        pre_norm=draw(st.sampled_from(NORMS)),
        post_norm=draw(st.sampled_from(NORMS)),
        mlp=draw(st.sampled_from(MLPS)),
        dtype=draw(st.sampled_from(["float32", "bfloat16"])),
        all_true_example=draw(st.booleans()),
        batch=draw(st.sampled_from([1, 2, 3])),
        seq=draw(st.sampled_from([1, 2, 5, 8])),
    )


# -- the module --------------------------------------------------------------------------------------------------


class Norm(nn.Module):
    """A LayerNorm or RMSNorm in one of its spellings (``none``: identity)."""

    def __init__(self, kind: str, dim: int) -> None:
        super().__init__()
        self.kind = kind
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(dim))
        self.bias = nn.Parameter(0.1 * torch.randn(dim))
        self.module = nn.LayerNorm(dim) if kind == "layer_norm_module" else (
            nn.RMSNorm(dim, eps=1e-6) if kind == "rms_module" else None)
        if self.module is not None:
            with torch.no_grad():
                self.module.weight.copy_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind == "none":
            return x
        if self.module is not None:
            return self.module(x)
        if kind == "layer_norm_fn":
            return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, 1e-5)
        if kind == "layer_norm_hand":
            mean = x.mean(-1, keepdim=True)
            var = (x - mean).pow(2).mean(-1, keepdim=True)
            return (x - mean) / torch.sqrt(var + 1e-5) * self.weight + self.bias
        if kind == "rms_hand":
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
        if kind == "rms_upcast":
            h = x.to(torch.float32)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return self.weight * h.to(x.dtype)
        if kind == "rms_gemma":
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
            return (h * (1.0 + self.weight.float())).type_as(x)
        if kind == "rms_no_weight":
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        raise ValueError(kind)


class Block(nn.Module):
    """The block a ``Spec`` spells. Inputs: ``x`` (B, S, hidden) and, unless ``mask_input == "none"``, a mask."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        e, d = spec.hidden, spec.head_dim
        self.q = nn.Linear(e, e)
        self.k = nn.Linear(e, spec.kv_heads * d)
        self.v = nn.Linear(e, spec.kv_heads * d)
        self.o = nn.Linear(e, e)
        self.pre_norm = Norm(spec.pre_norm, e)
        self.post_norm = Norm(spec.post_norm, e)
        gated = spec.mlp in ("swiglu", "geglu")
        self.up = nn.Linear(e, 2 * e)
        self.gate = nn.Linear(e, 2 * e) if gated else None
        self.down = nn.Linear(2 * e, e)
        self.slopes = nn.Parameter(2.0 ** -torch.arange(1, spec.heads + 1, dtype=torch.float32), requires_grad=False)

    # - attention -
    def _heads(self, t: torch.Tensor, heads: int) -> torch.Tensor:
        b, s, _ = t.shape
        return t.view(b, s, heads, self.spec.head_dim).transpose(1, 2)

    def _repeat(self, t: torch.Tensor) -> torch.Tensor:
        groups = self.spec.heads // self.spec.kv_heads
        if groups == 1:
            return t
        if self.spec.repeat == "repeat_interleave":
            return t.repeat_interleave(groups, dim=1)
        b, h, s, d = t.shape
        return t[:, :, None].expand(b, h, groups, s, d).reshape(b, h * groups, s, d)

    def _keep(self, mask: torch.Tensor | None, sq: int, sk: int) -> torch.Tensor | None:
        """The mask input as a boolean keep-mask broadcasting to (B, H, Sq, Sk)."""
        kind = self.spec.mask_input
        if kind == "none":
            return None
        if kind in ("additive",):
            return mask == 0
        if kind == "bool4d":
            return mask
        return mask[:, None, None, :].bool()

    def _attention_mask_sdpa(self, mask, sq, sk, dtype):
        kind = self.spec.mask_input
        if kind == "none":
            return None
        if kind == "additive":
            return mask.to(dtype)
        if kind == "float01":
            return (1.0 - mask[:, None, None, :]).to(dtype) * torch.finfo(dtype).min
        return self._keep(mask, sq, sk)

    def attention(self, h: torch.Tensor, mask: torch.Tensor | None):
        spec = self.spec
        d = spec.head_dim
        q, k, v = self._heads(self.q(h), spec.heads), self._heads(self.k(h), spec.kv_heads), \
            self._heads(self.v(h), spec.kv_heads)
        sq = sk = h.shape[1]
        if spec.attention == "sdpa":
            attn_mask = self._attention_mask_sdpa(mask, sq, sk, q.dtype)
            groups = spec.heads // spec.kv_heads
            if spec.repeat == "expand" or groups == 1:
                out = F.scaled_dot_product_attention(q, self._repeat(k), self._repeat(v), attn_mask=attn_mask,
                                                     scale=None if spec.scale == "none" else d**-0.5)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, enable_gqa=True)
            return out, None
        k, v = self._repeat(k), self._repeat(v)
        if spec.copies:
            q, v = q.contiguous(), v.detach()
        if spec.scale == "q":
            q = q * d**-0.5
        b = q.shape[0]
        if spec.layout in ("bmm3d", "round_trip"):
            q3, k3, v3 = (t.reshape(b * spec.heads, -1, d) for t in (q, k, v))
            kt = k3.transpose(1, 2) / math.sqrt(d) if spec.scale == "k" else k3.transpose(1, 2)
            s = torch.bmm(q3, kt)
            if spec.layout == "round_trip":
                s = s.view(b, spec.heads, sq, sk)
        else:
            kt = k.transpose(-1, -2) / math.sqrt(d) if spec.scale == "k" else k.transpose(-1, -2)
            s = torch.matmul(q, kt)
        s = self._scale(s, d)
        if spec.copies:
            s = s.clone()
        if spec.softcap:
            s = torch.tanh(s / 20.0) * 20.0
        four_d = s.dim() == 4
        if not four_d:
            s = s.view(b, spec.heads, sq, sk)  # masks are spelled on 4-D scores; bmm models view them so
        for step in spec.mask_steps:
            s = self._mask_step(step, s, mask)
        if not four_d or spec.layout == "round_trip":
            s = s.reshape(b * spec.heads, sq, sk)
        p = self._softmax(s)
        if spec.clone_probs:
            p = p.clone()
        p = p.to(v.dtype)
        if p.dim() == 3:
            out = torch.bmm(p, v.reshape(b * spec.heads, -1, d)).view(b, spec.heads, sq, d)
        else:
            out = torch.matmul(p, v)
        return out, (p if spec.return_probs else None)

    def _scale(self, s: torch.Tensor, d: int) -> torch.Tensor:
        kind = self.spec.scale
        if kind == "mul":
            return s * (1.0 / math.sqrt(d))
        if kind == "div":
            return s / math.sqrt(d)
        if kind == "tensor_div":
            return s / torch.sqrt(torch.tensor(float(d)))
        return s

    def _mask_step(self, step: str, s: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        sq, sk = s.shape[-2], s.shape[-1]
        keep = self._keep(mask, sq, sk)
        if step == "additive":
            return s + torch.where(keep, 0.0, torch.finfo(s.dtype).min).to(s.dtype)
        if step == "masked_fill":
            return s.masked_fill(~keep, float("-inf"))
        if step == "additive_inplace":  # scores += mask, on the fresh scores
            s += torch.where(keep, 0.0, torch.finfo(s.dtype).min).to(s.dtype)
            return s
        if step == "masked_fill_inplace":
            return s.masked_fill_(~keep, torch.finfo(s.dtype).min)
        if step == "where":
            return torch.where(keep, s, torch.tensor(torch.finfo(s.dtype).min, dtype=s.dtype))
        if step == "where_mild":  # a fill adding a mask cannot reproduce on a fully masked row: refused
            return torch.where(keep, s, torch.tensor(-1e4, dtype=s.dtype))
        if step == "bool_add":
            return s + mask[:, None, None, :].bool()
        if step == "int_add":
            return s + mask[:, None, None, :].long()
        if step == "causal_triu":
            future = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(1)
            return s.masked_fill(future, torch.finfo(s.dtype).min)
        if step == "causal_arange":
            i, j = torch.arange(sq, device=s.device)[:, None], torch.arange(sk, device=s.device)[None, :]
            return torch.where(j <= i, s, float("-inf"))
        if step == "sliding_window":
            i, j = torch.arange(sq, device=s.device)[:, None], torch.arange(sk, device=s.device)[None, :]
            return s.masked_fill((j > i) | (j < i - 2), torch.finfo(s.dtype).min)
        if step == "alibi":
            pos = torch.arange(sk, device=s.device, dtype=s.dtype)
            return s + (self.slopes.to(s.dtype)[:, None] * pos[None, :])[None, :, None, :]
        if step == "number":
            return s + 0.25
        if step == "sub":
            return s - 0.5
        raise ValueError(step)

    def _softmax(self, s: torch.Tensor) -> torch.Tensor:
        kind = self.spec.softmax
        if kind == "F":
            return F.softmax(s, dim=-1)
        if kind == "method":
            return s.softmax(-1)
        if kind == "dtype32":
            return torch.softmax(s, dim=-1, dtype=torch.float32)
        if kind == "safe":
            return torch.ops.aten._safe_softmax(s, -1)
        if kind == "upcast":
            return F.softmax(s.float(), dim=-1)
        raise ValueError(kind)

    # - MLP -
    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        kind = self.spec.mlp
        up = self.up(h)
        if kind == "gelu":
            act = F.gelu(up)
        elif kind == "gelu_tanh_hand":
            act = 0.5 * up * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (up + 0.044715 * torch.pow(up, 3.0))))
        elif kind == "swiglu":
            act = F.silu(self.gate(h)) * up
        elif kind == "geglu":
            act = F.gelu(self.gate(h), approximate="tanh") * up
        elif kind == "relu":
            act = torch.relu(up)
        elif kind == "quick_gelu":
            act = up * torch.sigmoid(1.702 * up)
        else:
            raise ValueError(kind)
        return self.down(act)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        b, s, e = x.shape
        attn, probs = self.attention(self.pre_norm(x), mask)
        x = x + self.o(attn.transpose(1, 2).reshape(b, s, e))
        x = x + self.mlp(self.post_norm(x))
        return (x, probs) if probs is not None else x


# -- inputs ------------------------------------------------------------------------------------------------------


def make_inputs(spec: Spec, batch: int, seq: int, seed: int, all_true: bool = False) -> tuple:
    """(x, mask) for the block: x at the block's dtype; the mask padded (never a whole row) unless ``all_true``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, spec.hidden, generator=gen).to(getattr(torch, spec.dtype))
    if spec.mask_input == "none":
        return (x,)
    keep = torch.ones(batch, seq, dtype=torch.bool)
    if not all_true and seq > 1:
        for row in range(batch):
            drop = int(torch.randint(0, seq, (1,), generator=gen))
            if row % 2:
                keep[row, seq - drop:] = False  # right padding
            else:
                keep[row, :drop] = False  # left padding
    kind = spec.mask_input
    if kind == "bool":
        mask = keep
    elif kind == "long":
        mask = keep.long()
    elif kind == "float01":
        mask = keep.to(x.dtype)
    elif kind == "additive":
        mask = torch.where(keep, 0.0, torch.finfo(x.dtype).min).to(x.dtype)[:, None, None, :].expand(
            batch, 1, seq, seq).contiguous()
    else:  # bool4d
        mask = keep[:, None, None, :].expand(batch, 1, seq, seq).contiguous()
    return x, mask


def expected_ops(spec: Spec) -> dict[str, int]:
    """The fused-op counts a full fusion of the block gives (norm ops with or without their residual add)."""
    attention = 0 if spec.return_probs or "where_mild" in spec.mask_steps else 1
    norms = sum(1 for n in (spec.pre_norm, spec.post_norm) if n != "none")
    mlp = {"swiglu": "gated_mlp_act", "geglu": "gated_mlp_act", "gelu": "gelu", "gelu_tanh_hand": "gelu",
           "quick_gelu": "gelu"}.get(spec.mlp)
    out = {"attention": attention, "norms": norms}
    if mlp:
        out[mlp] = 1
    return out
