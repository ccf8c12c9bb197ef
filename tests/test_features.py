"""The frozen feature extractors."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vlmdiff.features import EfficientNetLite0Features, load_efficientnet_lite0


def unfused_features(images: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
    """The package's network as it ships (batch norms, padding modules), block by block."""
    net = load_efficientnet_lite0()
    x = net._swish(net._bn0(net._conv_stem((images - 0.5) / 0.5)))
    features = []
    for index, block in enumerate(net._blocks[: max(layers) + 1]):
        x = block(x)
        if index in layers:
            features.append(x)
    return features


@pytest.mark.parametrize("size", [(96, 96), (72, 120), (57, 83)])  # odd sides: the stride-2 convs pad one side
def test_fused_extractor_computes_the_package_network(size):
    layers = (1, 4, 10)
    extractor = EfficientNetLite0Features(layers).eval()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in extractor.modules())  # folded into the convolutions
    images = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused, reference = extractor(images), unfused_features(images, layers)
    assert [f.shape for f in fused] == [r.shape for r in reference]
    for f, r in zip(fused, reference):
        assert torch.allclose(f, r, atol=1e-4 * float(r.abs().max()), rtol=0)
