"""int8 weight storage pinned to a scale computed by hand: max|w| / 127 per
output channel, levels round(w / scale), and a round-trip error of at most half
a level (an off-by-one level count once survived the suite)."""
from __future__ import annotations

import torch

from ctapp.checkpoint import pack_state, unpack_state


def test_int8_scale_is_max_abs_over_127_per_output_channel():
    weight = torch.tensor([[0.5, -1.27, 0.1],  # max |w| 1.27 -> scale 0.01
                           [0.0254, 0.0, -0.00961]])  # max |w| 0.0254 -> scale 0.0002
    packed, scales = pack_state({"w": weight}, "int8")
    assert torch.allclose(scales["w"], torch.tensor([0.01, 0.0002]), rtol=1e-6)
    assert packed["w"].dtype == torch.int8
    assert packed["w"].tolist() == [[50, -127, 10], [127, 0, -48]]  # -0.00961 / 0.0002 = -48.05
    restored = unpack_state(packed, scales)["w"]
    assert restored.dtype == torch.float32
    assert torch.allclose(restored, torch.tensor([[0.5, -1.27, 0.1], [0.0254, 0.0, -0.0096]]), atol=1e-7)


def test_int8_round_trip_error_is_at_most_half_a_level():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 4, 3, 3, generator=generator) * torch.logspace(-3, 0, 8).view(-1, 1, 1, 1)
    packed, scales = pack_state({"conv.weight": weight, "conv.bias": torch.randn(8, generator=generator)}, "int8")
    by_hand = weight.abs().reshape(8, -1).max(dim=1).values / 127
    assert torch.allclose(scales["conv.weight"], by_hand, rtol=1e-6)
    assert int(packed["conv.weight"].abs().max()) == 127  # the largest weight of each channel uses the top level
    restored = unpack_state(packed, scales)
    error = (restored["conv.weight"] - weight).abs().reshape(8, -1).max(dim=1).values
    assert torch.all(error <= by_hand / 2 * (1 + 1e-4)), (error, by_hand / 2)
    assert "conv.bias" not in scales and packed["conv.bias"].dtype == torch.float32  # biases stay exact
    assert torch.equal(restored["conv.bias"], packed["conv.bias"])
