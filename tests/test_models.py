"""Every registered network: output shape, size against the published figure, gradients reach
every parameter, shake-shake gates random in training and fixed in evaluation."""
import pytest
import torch

from mgssl.model import MODELS, build_model

# name: (classes, channels, input size, published parameter count, relative tolerance)
SPECS = {
    "convlarge": (10, 3, 32, 3.1e6, 0.01),  # "Conv-Large, 3.1M parameters" (Tarvainen & Valpola 2017)
    "shakeshake26": (10, 3, 32, 26.2e6, 0.005),  # Shake-Shake 26 2x96d: 26.2M (Gastaldi 2017)
    "resnet18": (1000, 3, 64, 11.69e6, 0.001),  # torchvision / He et al.: 11.69M
    "digits_cnn": (10, 1, 8, None, None),  # ours, no published figure
}


def test_every_registered_model_has_a_spec():
    assert set(MODELS) == set(SPECS)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_shape_size_and_gradients(name):
    classes, ch, size, published, tol = SPECS[name]
    torch.manual_seed(0)
    net = build_model(name, classes, ch, channels_last=True).train()
    count = sum(p.numel() for p in net.parameters())
    if published is not None:
        assert abs(count - published) / published < tol, count
    x = torch.randn(2, ch, size, size).contiguous(memory_format=torch.channels_last)
    logits = net(x)
    assert logits.shape == (2, classes)
    assert net.forward_features(x).shape == (2, net.feature_dim)
    logits.logsumexp(1).sum().backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing


def test_conv_large_follows_table6():
    net = build_model("convlarge", 10, 3)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [128, 128, 128, 256, 256, 256, 512, 256, 128]
    assert [c.kernel_size[0] for c in convs] == [3] * 7 + [1, 1]
    assert all(c.bias is None for c in convs)
    assert sum(isinstance(m, torch.nn.Dropout2d) and m.p == 0.5 for m in net.modules()) == 2
    acts = [m for m in net.modules() if isinstance(m, torch.nn.LeakyReLU)]
    assert len(acts) == 9 and all(a.negative_slope == 0.1 for a in acts)


def test_shake_shake_gates_are_random_in_training_and_half_in_evaluation():
    torch.manual_seed(0)
    net = build_model("shakeshake26", 10, 3)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    with torch.no_grad():
        assert torch.equal(net(x), net(x))
        net.train()
        a, b = net(x), net(x)
    assert not torch.allclose(a, b)
    blocks = [m for m in net.modules() if type(m).__name__ == "ShakeBlock"]
    assert len(blocks) == 12
    assert [blk.branch_a[1].out_channels for blk in blocks[::4]] == [96, 192, 384]


def test_unknown_model_name_lists_the_choices():
    with pytest.raises(ValueError, match="convlarge"):
        build_model("vgg", 10)


def test_conv_large_width_scales_every_layer_and_width_one_is_the_paper_network():
    paper = build_model("convlarge", 10, 3)
    quarter = build_model("convlarge", 10, 3, width=0.25, dropout=0.2)
    assert sum(p.numel() for p in build_model("convlarge", 10, 3, width=1.0).parameters()) == \
        sum(p.numel() for p in paper.parameters())
    widths = [m.out_channels for m in quarter.modules() if isinstance(m, torch.nn.Conv2d)]
    assert widths == [c // 4 for c in (m.out_channels for m in paper.modules() if isinstance(m, torch.nn.Conv2d))]
    assert {m.p for m in quarter.modules() if isinstance(m, torch.nn.Dropout2d)} == {0.2}
    assert quarter(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_a_model_option_the_network_lacks_is_refused_by_name():
    with pytest.raises(ValueError, match="model.width is not an option of resnet18"):
        build_model("resnet18", 10, 3, width=0.5)
    with pytest.raises(ValueError, match="model.dropout=1.5"):
        build_model("convlarge", 10, 3, dropout=1.5)
