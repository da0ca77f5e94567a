"""Ghost networks of timm CNNs whose residual blocks end in a plain sum (ConvNeXt, EfficientNet): the skip is
eroded exactly, out = λ·input + branch(input)."""

from __future__ import annotations

import timm
import torch
from timm.models.convnext import ConvNeXtBlock

from conceptlens.handlers.attacks.ghost import GhostNetwork, additive_blocks


class _Fixed(GhostNetwork):
    """Every draw u = 1, so λ = 1 + skip_erosion."""

    def _rand(self, shape, like):
        return torch.ones(shape, dtype=like.dtype, device=like.device)


def test_convnext_block_skip_is_scaled_exactly():
    block = ConvNeXtBlock(8).eval()
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        expected = 1.2 * x + (block(x) - x)
        got = _Fixed(block, skip_erosion=0.2, dropout_keep=1.0)(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_timm_convnext_and_efficientnet_have_erodable_skips():
    for name in ("convnext_atto", "efficientnet_b0"):
        net = timm.create_model(name, pretrained=False, num_classes=3).eval()
        ghost = GhostNetwork(net, skip_erosion=0.2, dropout_keep=1.0, seed=0)
        assert len(ghost.additive) > 5 and ghost.dropout_keep == 1.0, name
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            assert not torch.allclose(ghost(x), net(x))  # an eroded view...
        assert len(additive_blocks(net)) == len(ghost.additive)
