"""FID: TorchScript feature networks (Inception's call convention, the toy network), distances, object score."""

import pytest
import torch

from foba_core.fid import INCEPTION_URL, extract_features, fid, fid_label, load_feature_network
from foba_core.toy.features import FID_LABEL_TOY, ToyFeatureNet, object_score, train_toy_feature_network
from foba_core.toy.world import ToyWorld


class InceptionLike(torch.nn.Module):
    """Stands in for inception-2015-12-05.pt: uint8 (N, 3, H, W) in, 2048 features out, any image size."""

    def __init__(self, dim: int = 2048):
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(6, dim)

    def forward(self, img: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        if img.dtype != torch.uint8:
            raise ValueError("expected uint8 images")
        x = img.float() / 128 - 1
        features = self.proj(torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], 1))  # (N, dim)
        return features if return_features else features[:, :2]


def scripted_toy_net(seed=0):
    torch.manual_seed(seed)
    return torch.jit.script(ToyFeatureNet(["circle", "square", "background"], width=8, feature_dim=16).eval())


def test_toy_feature_network_round_trip(tmp_path):
    world = ToyWorld("train", size=40, seed=0)
    out = tmp_path / "features" / "toy_features.pt"
    net = train_toy_feature_network(world, steps=3, seed=0, out_path=out, batch_size=14, width=8, feature_dim=16)
    loaded = load_feature_network(out)
    images = torch.stack([world[i]["image"] for i in range(6)])
    assert extract_features(loaded, images).shape == (6, 16)
    torch.testing.assert_close(extract_features(loaded, images), extract_features(net, images))
    assert list(loaded.classes) == [*world.classes, "background"]
    assert fid_label(loaded) == FID_LABEL_TOY and "not Inception" in FID_LABEL_TOY
    again = train_toy_feature_network(world, steps=3, seed=0, batch_size=14, width=8, feature_dim=16)
    torch.testing.assert_close(extract_features(again, images), extract_features(net, images))  # seeded
    assert [p.name for p in out.parent.iterdir()] == ["toy_features.pt"]  # atomic write leaves no temp file


def test_inception_calling_convention(tmp_path):
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(InceptionLike()), str(path))
    net = load_feature_network(path)
    images = torch.rand(5, 3, 20, 24)
    features = extract_features(net, images, batch_size=2)  # floats in [0, 1] are sent as uint8
    assert features.shape == (5, 2048) and features.dtype == torch.float64
    torch.testing.assert_close(features, extract_features(net, (images * 255).round().to(torch.uint8)))
    gray = extract_features(net, images[:, :1])  # grayscale is replicated to RGB
    torch.testing.assert_close(gray, extract_features(net, images[:, :1].expand(-1, 3, -1, -1)))
    assert fid_label(net) == "FID"


def test_missing_or_unusable_feature_networks_are_named(tmp_path):
    missing = tmp_path / "inception-2015-12-05.pt"
    with pytest.raises(FileNotFoundError) as err:
        load_feature_network(missing)
    message = str(err.value)
    assert str(missing) in message and INCEPTION_URL in message and "nothing is downloaded" in message
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a zip archive")
    with pytest.raises(ValueError, match="garbage.pt is not a TorchScript file"):
        load_feature_network(garbage)
    wrong_call = tmp_path / "linear.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(3, 2)), str(wrong_call))
    with pytest.raises(ValueError, match="return_features=True"):
        load_feature_network(wrong_call)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_a_shift():
    net = torch.jit.script(InceptionLike(dim=8))  # features: linear in per-channel mean and spread
    images = torch.stack([ToyWorld("val", size=48, seed=1)[i]["image"] for i in range(48)])
    assert abs(fid(net, images, images)) < 1e-6
    shifted = [fid(net, images, (images + s).clamp(0, 1)) for s in (0.05, 0.15, 0.3)]
    assert 0 < shifted[0] < shifted[1] < shifted[2]
    other = torch.stack([ToyWorld("test", size=48, seed=1)[i]["image"] for i in range(48)])
    assert fid(net, images, other) < shifted[2]  # another sample of the same world is closer than a strong shift


def test_frechet_distance_of_identical_feature_sets_is_never_negative():
    from foba_core import metrics

    for seed in range(20):  # the closed form rounds to about -1e-14 for several of these before the clamp
        features = torch.randn(50, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        stats = metrics.feature_statistics(features)
        assert 0.0 <= metrics.frechet_distance(*stats, *stats) < 1e-9


def test_object_score_is_one_minus_the_background_probability():
    net = scripted_toy_net()
    images = torch.rand(4, 3, 32, 32)
    score = object_score(net, images)
    probs = net(torch.round(images * 255).to(torch.uint8)).softmax(-1)
    torch.testing.assert_close(score, 1 - probs[:, 2])
    with torch.no_grad():
        net.head.bias[2] = 50.0  # certain "background"
    assert object_score(net, images).max() < 1e-6
    with torch.no_grad():
        net.head.bias[2] = -50.0
    assert object_score(net, images).min() > 1 - 1e-6
    with pytest.raises(ValueError, match="'background' class"):
        object_score(torch.jit.script(InceptionLike()), images)


def test_random_blur_draws_one_gaussian_per_image():
    from foba_core.toy.features import random_blur

    images = torch.zeros(3, 3, 16, 16)
    images[:, :, 8, 8] = 1.0  # a single bright pixel: the blurred image is the kernel itself
    assert torch.equal(random_blur(images, 0.0, torch.Generator().manual_seed(0)), images)
    out = random_blur(images, 1.5, torch.Generator().manual_seed(0))
    again = random_blur(images, 1.5, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # seeded
    torch.testing.assert_close(out.sum(dim=(2, 3)), torch.ones(3, 3))  # the kernel keeps the brightness
    assert (out[:, :, 8, 8] <= 1).all() and (out[:2, :, 8, 8] < 0.5).all()  # these two drew sigmas well above 0
    assert out[0, 0, 8, 8] != out[1, 0, 8, 8]  # a sigma of its own per image
    torch.testing.assert_close(out[:, 0], out[:, 2])  # the same sigma for the channels of one image
    torch.testing.assert_close(out[:, :, 8, 1:], out[:, :, 8, 1:].flip(-1))  # symmetric about the pixel


def test_toy_backgrounds_are_object_free_textures_of_the_world():
    from foba_core.toy.world import toy_backgrounds

    a, b = toy_backgrounds(5, seed=1), toy_backgrounds(5, seed=1)
    assert a.shape == (5, 3, 32, 32) and torch.equal(a, b)
    assert not torch.equal(a, toy_backgrounds(5, seed=2))
    assert a.min() >= 0 and a.max() <= 1


def test_quantise_is_the_one_uint8_conversion_of_the_fid_networks_and_the_pictures():
    import numpy as np

    from foba_core.visualize import quantise, to_uint8

    images = torch.rand(2, 1, 5, 7, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    q = quantise(images)
    assert q.dtype == torch.uint8 and q.shape == (2, 3, 5, 7) and torch.equal(quantise(q), q)
    assert torch.equal(q[:, 0], (images[:, 0].clamp(0, 1) * 255).round().to(torch.uint8))
    assert np.array_equal(to_uint8(images[1]), q[1].permute(1, 2, 0).numpy())  # the HWC array of one picture
    with pytest.raises(ValueError, match="1 or 3"):
        quantise(torch.rand(3, 5, 5))
