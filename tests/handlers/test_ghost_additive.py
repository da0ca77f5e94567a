"""Ghost networks of timm and torchvision CNNs whose residual blocks end in a plain sum (ConvNeXt, EfficientNet,
MobileNet): the skip is eroded exactly, out = λ·input + branch(input); a CNN with no skips is refused a ghost
ensemble."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from timm.models.convnext import ConvNeXtBlock

from conceptlens.handlers.attacks.ghost import GhostEnsemble, GhostNetwork, additive_blocks, has_erodable_skips
from conceptlens.handlers.errors import InvalidInput


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


def test_torchvision_inverted_residual_and_convnext_block_skips_are_scaled_exactly():
    from torchvision.models.convnext import CNBlock
    from torchvision.models.mobilenetv2 import InvertedResidual

    for block in (InvertedResidual(8, 8, 1, 2), CNBlock(8, layer_scale=1.0, stochastic_depth_prob=0.0)):
        block.eval()
        assert additive_blocks(block) == [block]
        x = torch.randn(2, 8, 5, 5)
        with torch.no_grad():
            expected = 1.2 * x + (block(x) - x)
            got = _Fixed(block, skip_erosion=0.2, dropout_keep=1.0)(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0", "mnasnet0_5", "convnext_tiny"])
def test_torchvision_residual_cnns_have_erodable_skips(name):
    net = getattr(torchvision.models, name)(weights=None, num_classes=3).eval()
    assert has_erodable_skips(net) and len(additive_blocks(net)) >= 3, name


def test_a_ghost_ensemble_of_a_cnn_without_residual_skips_is_refused_naming_why():
    net = torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=3).eval()  # concat + shuffle, no sums
    assert not has_erodable_skips(net)
    with pytest.raises(InvalidInput, match="ghost-ensemble erodes residual skips, and ShuffleNetV2 has none"):
        GhostEnsemble(net, eps=8 / 255, steps=2)
    GhostNetwork(net, skip_erosion=0.2)  # a single ghost network still falls back to dropout erosion
