"""The dialect ops' backward formulas (``fxfuse.ir.gradients``) and their fake implementations' layouts.

Gradients are checked two ways: against finite differences in float64
(``torch.autograd.gradcheck``) where the op computes in float64, and against
autograd through the op's reference implementation (plain torch ops) in
float32 and bfloat16. ``torch.library.opcheck`` checks each op's
registration as torch.compile uses it (fake strides, autograd, AOT dispatch).
"""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck
from torch._subclasses.fake_tensor import FakeTensorMode

from fxfuse.ir.dialect import OPS, REFERENCE


def leaf(*shape, dtype=torch.float64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


ATTENTION_CASES = {
    "plain gqa": {},
    "causal": dict(causal=True),
    "float mask": dict(mask=leaf(2, 1, 3, 5, seed=3)),
    "bool mask": dict(mask=torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(4)) > 0.3),
    "softcap": dict(softcap=2.0),
    "sinks": dict(sinks=leaf(4, 1, 1, seed=5)),
    "sinks, mask, softcap": dict(sinks=leaf(4, 1, 1, seed=5), mask=leaf(1, 4, 3, 5, seed=6), softcap=3.0),
    "scale": dict(scale=0.3),
}


@pytest.mark.parametrize("case", ATTENTION_CASES)
def test_attention_gradcheck(case):
    kw = ATTENTION_CASES[case]
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    others = {k: v for k, v in kw.items() if k not in tensors}
    names = list(tensors)

    def f(q, k, v, *extra):
        return OPS["attention"](q, k, v, **others, **dict(zip(names, extra)))

    assert gradcheck(f, (leaf(2, 4, 3, 6, seed=0), leaf(2, 2, 5, 6, seed=1), leaf(2, 2, 5, 4, seed=2),
                         *tensors.values()))


def test_attention_fully_masked_row_has_zero_gradient():
    q, k, v = leaf(1, 2, 3, 4, seed=0), leaf(1, 2, 5, 4, seed=1), leaf(1, 2, 5, 4, seed=2)
    mask = torch.ones(1, 1, 3, 5, dtype=torch.bool)
    mask[..., 1, :] = False
    out = OPS["attention"](q, k, v, mask=mask)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()
    assert q.grad[:, :, 1].abs().max() == 0 and q.grad[:, :, 0].abs().max() > 0


LATENT_CASES = {
    "float mask": dict(mask=leaf(2, 1, 3, 5, seed=3)),
    "causal, bool mask": dict(causal=True,
                              mask=torch.rand(2, 1, 3, 5, generator=torch.Generator().manual_seed(4)) > 0.3),
    "no rotary part, scale": dict(rope_dim=0, scale=0.3),
}


@pytest.mark.parametrize("case", LATENT_CASES)
def test_latent_attention_gradcheck(case):
    kw = dict(LATENT_CASES[case])
    dr = kw.pop("rope_dim", 3)
    tensors = {k: v for k, v in kw.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    others = {k: v for k, v in kw.items() if k not in tensors}

    def f(ql, qr, lat, kr, *extra):
        return OPS["latent_attention"](ql, qr, lat, kr, **others, **dict(zip(tensors, extra)))

    assert gradcheck(f, (leaf(2, 4, 3, 6, seed=0), leaf(2, 4, 3, dr, seed=1), leaf(2, 2, 5, 6, seed=2),
                         leaf(2, 2, 5, dr, seed=5), *tensors.values()))


NORM_CASES = {
    "layer_norm": lambda: (leaf(3, 5, 8), leaf(8, seed=1), leaf(8, seed=2), 1e-5),
    "layer_norm no affine": lambda: (leaf(3, 5, 8), None, None, 1e-5),
    "add_layer_norm": lambda: (leaf(3, 5, 8), leaf(3, 5, 8, seed=3), leaf(8, seed=1), leaf(8, seed=2), 1e-5),
    "add_layer_norm broadcast residual": lambda: (leaf(3, 5, 8), leaf(5, 8, seed=3), leaf(8, seed=1), None, 1e-5),
    "gated_mlp_act silu": lambda: (leaf(3, 8), leaf(3, 8, seed=1), "silu"),
    "gated_mlp_act gelu": lambda: (leaf(3, 8), leaf(3, 8, seed=1), "gelu"),
    "gated_mlp_act gelu_tanh": lambda: (leaf(3, 8), leaf(1, 8, seed=1), "gelu_tanh"),
    "gelu none": lambda: (leaf(3, 8), "none"),
    "gelu tanh": lambda: (leaf(3, 8), "tanh"),
    "gelu sigmoid": lambda: (leaf(3, 8), "sigmoid"),
    "rope": lambda: (leaf(2, 3, 5, 6), leaf(2, 1, 5, 6, seed=1), leaf(5, 6, seed=2), leaf(5, 6, seed=3), False),
    "rope partial": lambda: (leaf(2, 3, 5, 6), leaf(2, 1, 5, 6, seed=1), leaf(5, 4, seed=2), leaf(5, 4, seed=3), False),
    "rope interleaved": lambda: (leaf(2, 3, 5, 6), leaf(2, 1, 5, 6, seed=1), leaf(5, 6, seed=2), leaf(5, 6, seed=3), True),
    "rope interleaved partial": lambda: (leaf(2, 3, 5, 6), leaf(2, 1, 5, 6, seed=1), leaf(5, 4, seed=2),
                                         leaf(5, 4, seed=3), True),
}


@pytest.mark.parametrize("case", NORM_CASES)
def test_gradcheck(case):
    op = OPS[case.split()[0]]
    args = NORM_CASES[case]()
    at = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]

    def f(*tensors):
        full = list(args)
        for i, t in zip(at, tensors):
            full[i] = t
        return op(*full)

    assert gradcheck(f, tuple(args[i] for i in at))


def _grads(fn, inputs, seed=0):
    inputs = [x.detach().clone().requires_grad_(x.requires_grad) if isinstance(x, torch.Tensor) else x
              for x in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=g)).sum() for o in outs)
    return torch.autograd.grad(loss, [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad])


REFERENCE_CASES = {
    "rms_norm": lambda d: (leaf(3, 5, 8, dtype=d), leaf(8, dtype=d, seed=1), 1e-5),
    "rms_norm no weight": lambda d: (leaf(3, 5, 8, dtype=d), None, 1e-5),
    "add_rms_norm": lambda d: (leaf(3, 5, 8, dtype=d), leaf(3, 5, 8, dtype=d, seed=2), leaf(8, dtype=d, seed=1), 1e-5),
    "layer_norm": lambda d: (leaf(3, 5, 8, dtype=d), leaf(8, dtype=d, seed=1), leaf(8, dtype=d, seed=2), 1e-5),
    "attention": lambda d: (leaf(2, 4, 3, 6, dtype=d), leaf(2, 2, 5, 6, dtype=d, seed=1),
                            leaf(2, 2, 5, 6, dtype=d, seed=2), leaf(2, 1, 3, 5, dtype=d, seed=3)),
    "latent_attention": lambda d: (leaf(2, 4, 3, 8, dtype=d), leaf(2, 4, 3, 4, dtype=d, seed=1),
                                   leaf(2, 1, 5, 8, dtype=d, seed=2), leaf(2, 1, 5, 4, dtype=d, seed=3),
                                   leaf(2, 1, 3, 5, dtype=d, seed=4), None, True),
    "attention sinks": lambda d: (leaf(2, 4, 3, 6, dtype=d), leaf(2, 2, 5, 6, dtype=d, seed=1),
                                  leaf(2, 2, 5, 6, dtype=d, seed=2), None, None, False, 3.0,
                                  leaf(4, 1, 1, dtype=d, seed=4)),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 4e-2)])
@pytest.mark.parametrize("case", REFERENCE_CASES)
def test_gradients_match_autograd_through_the_reference(case, dtype, tol):
    name = case.split()[0]
    args = REFERENCE_CASES[case](dtype)
    ours = _grads(OPS[name], args)
    reference = _grads(REFERENCE[name], args)
    for a, b in zip(ours, reference):
        assert a.dtype == b.dtype and a.shape == b.shape
        err = ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
        assert err < tol, err


OPCHECK_CASES = {
    "attention": (leaf(2, 4, 3, 8, dtype=torch.float32), leaf(2, 2, 5, 8, dtype=torch.float32),
                  leaf(2, 2, 5, 8, dtype=torch.float32), leaf(2, 1, 3, 5, dtype=torch.float32)),
    "attention seq-major q, sinks": (leaf(2, 3, 4, 8, dtype=torch.float32).transpose(1, 2),
                                     leaf(2, 2, 5, 8, dtype=torch.float32), leaf(2, 2, 5, 8, dtype=torch.float32),
                                     None, None, True, 3.0, leaf(4, 1, 1, dtype=torch.float32)),
    "latent_attention seq-major q": (leaf(2, 3, 4, 8, dtype=torch.float32).transpose(1, 2),
                                     leaf(2, 4, 3, 4, dtype=torch.float32), leaf(2, 2, 5, 8, dtype=torch.float32),
                                     leaf(2, 2, 5, 4, dtype=torch.float32), leaf(2, 1, 3, 5, dtype=torch.float32),
                                     None, True),
    "rms_norm": (leaf(3, 5, 8, dtype=torch.float32).transpose(0, 1), leaf(8, dtype=torch.float32), 1e-5),
    "add_rms_norm": (leaf(3, 5, 8, dtype=torch.float32), leaf(3, 5, 8, dtype=torch.float32), None, 1e-5),
    "layer_norm": (leaf(3, 5, 8, dtype=torch.float32), leaf(8, dtype=torch.float32), leaf(8, dtype=torch.float32),
                   1e-5),
    "add_layer_norm": (leaf(3, 5, 8, dtype=torch.float32), leaf(3, 5, 8, dtype=torch.float32), None, None, 1e-5),
    "gated_mlp_act": (leaf(3, 8, dtype=torch.float32), leaf(3, 8, dtype=torch.float32), "silu"),
    "gelu": (leaf(3, 8, dtype=torch.float32), "tanh"),
    "rope": (leaf(2, 5, 3, 8, dtype=torch.float32).transpose(1, 2), leaf(2, 1, 5, 8, dtype=torch.float32),
             leaf(5, 8, dtype=torch.float32, grad=False), leaf(5, 8, dtype=torch.float32, grad=False), False),
}


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(case):
    torch.library.opcheck(OPS[case.split()[0]], OPCHECK_CASES[case])


def _layout_cases():
    q, k, v = leaf(2, 4, 5, 8, grad=False), leaf(2, 2, 5, 8, grad=False), leaf(2, 2, 5, 8, grad=False)
    seq_major_q = leaf(2, 5, 4, 8, grad=False).transpose(1, 2)
    for name, qq in (("contiguous q", q), ("seq-major q", seq_major_q)):
        for kw in ({}, dict(causal=True), dict(mask=leaf(2, 1, 5, 5, grad=False)), dict(softcap=5.0),
                   dict(sinks=leaf(4, 1, 1, grad=False))):
            yield f"attention {name} {sorted(kw)}", "attention", (qq, k, v), kw
    lat, kr = leaf(2, 2, 5, 8, grad=False), leaf(2, 2, 5, 3, grad=False)
    for name, qq in (("contiguous q", q), ("seq-major q", seq_major_q)):
        for kw in ({}, dict(causal=True), dict(mask=leaf(2, 1, 5, 5, grad=False) > 0)):
            yield f"latent_attention {name} {sorted(kw)}", "latent_attention", (qq, q[..., :3], lat, kr), kw
    w = leaf(8, grad=False)
    for name, x in (("contiguous", leaf(3, 5, 8, grad=False)), ("transposed", leaf(3, 5, 8, grad=False).transpose(0, 1)),
                    ("strided", leaf(3, 5, 16, grad=False)[..., ::2])):
        r = leaf(*x.shape, grad=False, seed=9)
        cos = leaf(x.shape[-2], 4, grad=False)
        yield f"layer_norm {name}", "layer_norm", (x, w, None, 1e-5), {}
        yield f"rms_norm {name}", "rms_norm", (x, w, 1e-5), {}
        yield f"add_rms_norm {name}", "add_rms_norm", (x, r, w, 1e-5), {}
        yield f"add_layer_norm {name}", "add_layer_norm", (x, r, w, w, 1e-5), {}
        yield f"gelu {name}", "gelu", (x, "sigmoid"), {}
        yield f"gated_mlp_act {name}", "gated_mlp_act", (x, r, "gelu"), {}
        yield f"rope {name}", "rope", (x.unsqueeze(0), x.unsqueeze(0), cos, cos), {}


LAYOUT_CASES = {name: rest for name, *rest in _layout_cases()}


@pytest.mark.parametrize("case", LAYOUT_CASES)
def test_fake_layout_equals_real(case):
    """Compilers plan buffers from the fake implementation: its shapes, dtypes and strides must be the real ones."""
    name, args, kwargs = LAYOUT_CASES[case]
    real = OPS[name](*args, **kwargs)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = OPS[name](*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args],
                         **{k: mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for k, a in kwargs.items()})
    real, fake = (real if isinstance(real, tuple) else (real,)), (fake if isinstance(fake, tuple) else (fake,))
    for r, f in zip(real, fake):
        assert (r.shape, r.stride(), r.dtype) == (f.shape, f.stride(), f.dtype)


def test_attention_output_is_seq_major():
    """The (B, H, S, D) result is laid out as (B, S, H, D), so the model's transpose-and-merge of heads is a view."""
    q, k, v = leaf(2, 4, 5, 8, grad=False), leaf(2, 2, 5, 8, grad=False), leaf(2, 2, 5, 8, grad=False)
    for kw in ({}, dict(softcap=5.0)):
        out = OPS["attention"](q, k, v, **kw)
        assert out.transpose(1, 2).is_contiguous()
