"""Shared by the fused-penalty tests (tests/penalties/test_fused_*.py): data, the squared-error
loss, the SGD loops and the Regularizer-state resume check."""

from __future__ import annotations

import io

import torch
from torch import nn

from bayes_spectral import penalties as P


def mlp(seed=0, dtype=torch.float64):
    """The fused tests' small MLP 20-48-32-5 (ReLU, Tanh), seeded."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(20, 48), nn.ReLU(), nn.Linear(48, 32), nn.Tanh(),
                         nn.Linear(32, 5)).to(dtype)


def data(n=16, d=20, seed=1, dtype=torch.float64):
    """``(x, y)``: ``n x d`` inputs and ``n x 5`` targets, seeded."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=dtype),
            torch.randn(n, 5, generator=g, dtype=dtype))


def loss(model, x, y):
    return (model(x) - y).square().mean()


def run(model, reg, opt, x, y, steps):
    """``steps`` optimiser steps with the penalty added by ``reg.accumulate_grad()``."""
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss(model, x, y).backward()
        reg.accumulate_grad()
        opt.step()


def train(model, reg, steps, x, y, lr=0.05, in_place=True):
    """Plain SGD, the penalty in place (``accumulate_grad``) or through ``reg.loss``."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        value = loss(model, x, y)
        if in_place:
            value.backward()
            reg.accumulate_grad()
        else:
            reg.loss(value).backward()
        opt.step()


def steps_without_host_sync(monkeypatch, model, reg, x, y, steps, lr=0.1):
    """One step creating the states, then ``steps`` SGD steps of ``model`` with ``reg``'s
    penalty in place while every tensor-to-Python read (``item``, ``float``, ``bool``,
    ``int``, ``tolist``) raises; the last ``accumulate_grad`` value."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss(model, x, y).backward()
    reg.accumulate_grad()

    def refuse(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "__float__", "__bool__", "__int__", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, refuse)
    try:
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss(model, x, y).backward()
            value = reg.accumulate_grad()
            opt.step()
    finally:
        monkeypatch.undo()
    return value


def roundtrip(obj):
    """``obj`` through ``torch.save`` / ``torch.load(weights_only=True)``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def check_fused_resume(make_penalty, make_mlp, every=1, first=5, then=5):
    """``first`` steps, save model + SGD + regulariser state (through a real ``torch.save``),
    ``then`` more; fresh objects loaded from the save run the same ``then``: equal bit for
    bit (``Regularizer(..., every=every)``). The saved state is the fused one (layer ``"2"``
    holds ``v``). Returns ``(saved, reloaded reg)``."""
    x, y = data(dtype=torch.float32)

    def build():
        model = make_mlp(dtype=torch.float32)
        reg = P.Regularizer(model, make_penalty(), log=False, every=every)
        return model, reg, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    model, reg, opt = build()
    run(model, reg, opt, x, y, first)
    saved = roundtrip({"m": model.state_dict(), "o": opt.state_dict(), "r": reg.state_dict()})
    assert saved["r"]["penalties"][0]["state"]["mode"] == "fused"
    assert set(saved["r"]["penalties"][0]["state"]["layers"]["2"]) == {"v"}
    run(model, reg, opt, x, y, then)
    reg.remove_hooks()
    m2, r2, o2 = build()
    m2.load_state_dict(saved["m"])
    o2.load_state_dict(saved["o"])
    r2.load_state_dict(saved["r"])
    run(m2, r2, o2, x, y, then)
    for a, b in zip(model.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)
    return saved, r2
