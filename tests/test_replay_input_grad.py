"""The replay's backward walk, checked end to end against autograd through the real kernel.

The replay computes dL/dx of the bottom layer from the output gradients alone. autograd
computes the same quantity through PyTorch's own fused kernel. Agreement validates every
layer's and direction's backward equations (gates, projection, packing, masks).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gradwatch._capture.fused import output_tensors, record_fused_call, replay


def _record(module: nn.RNNBase):
    calls = []

    def hook(mod, args, kwargs, output):
        call = record_fused_call("m", "m", mod, args, kwargs, output)
        inp = args[0] if args else kwargs["input"]
        for slot, t in output_tensors("m", mod, inp, output).items():
            t.register_hook(lambda g, slot=slot, call=call: call.grads.__setitem__(slot, g))
        calls.append(call)

    return calls, module.register_forward_hook(hook, with_kwargs=True)


CONFIGS = list(
    itertools.product(
        ["RNN_TANH", "RNN_RELU", "LSTM", "LSTM_PROJ", "GRU"],
        [1, 2],  # num_layers
        [False, True],  # bidirectional
        ["plain", "batch_first", "packed", "unbatched"],
    )
)


def _make(kind: str, layers: int, bidir: bool, batch_first: bool) -> nn.RNNBase:
    kw = dict(num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    if kind.startswith("RNN"):
        return nn.RNN(3, 5, nonlinearity="relu" if kind == "RNN_RELU" else "tanh", **kw)
    if kind == "LSTM_PROJ":
        return nn.LSTM(3, 5, proj_size=2, **kw)
    return getattr(nn, kind)(3, 5, **kw)


@pytest.mark.parametrize(("kind", "layers", "bidir", "layout"), CONFIGS)
def test_replayed_input_gradient_matches_autograd(kind, layers, bidir, layout):
    torch.manual_seed(hash((kind, layers, bidir, layout)) % 2**31)
    module = _make(kind, layers, bidir, layout == "batch_first").double()
    T, B = 6, 4
    x = torch.randn(T, B, 3, dtype=torch.float64, requires_grad=True)
    lengths = torch.tensor([6, 2, 5, 1])
    if layout == "batch_first":
        inp = x.transpose(0, 1)
    elif layout == "packed":
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False)
    elif layout == "unbatched":
        inp = x[:, 0]
    else:
        inp = x
    calls, handle = _record(module)
    out, state = module(inp)
    handle.remove()
    out_t = out.data if layout == "packed" else out
    h_n = state[0] if isinstance(state, tuple) else state
    loss = (out_t * torch.randn_like(out_t)).sum() + (h_n * torch.randn_like(h_n)).sum()
    if isinstance(state, tuple):
        loss = loss + (state[1] * torch.randn_like(state[1])).sum()
    loss.backward()

    rep = replay(calls[0], input_grad=True)
    expected = x.grad[:, 0] if layout == "unbatched" else x.grad
    assert rep.fidelity < 1e-12
    torch.testing.assert_close(rep.grad_input, expected, rtol=1e-9, atol=1e-12)
