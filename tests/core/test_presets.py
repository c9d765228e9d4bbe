"""Presets: the model-space maps are the documented affine transforms, invertible, with the value
range that noise_level refers to."""
import numpy as np
import pytest
from PIL import Image

import multisal as ms
from multisal.images import MAX_IMAGE_PIXELS


def _photo(h=40, w=60, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_chainer_vgg16_is_the_writeups_preprocessing():
    img = _photo()
    pre = ms.get_preset("chainer-vgg16")
    x = pre.apply(img, size=(224, 224))
    # The write-up, line by line (Pillow resize with the 2017 default filter, NEAREST).
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.NEAREST), dtype=np.float32)
    ref = ref[:, :, ::-1]
    ref -= np.array([103.939, 116.779, 123.68], dtype=np.float32)
    ref = ref.transpose((2, 0, 1))[np.newaxis]
    np.testing.assert_array_equal(x, ref)
    assert x.dtype == np.float32 and x.shape == (1, 3, 224, 224)


def test_chainer_vgg16_filter_can_be_chosen():
    img = _photo()
    nearest = ms.get_preset("chainer-vgg16").apply(img)
    bicubic = ms.get_preset("chainer-vgg16", resample="bicubic").apply(img)
    ref = np.asarray(Image.fromarray(img).resize((224, 224), Image.Resampling.BICUBIC), np.float32)[:, :, ::-1]
    np.testing.assert_allclose(bicubic[0], (ref - [103.939, 116.779, 123.68]).transpose(2, 0, 1), atol=1e-4)
    assert np.abs(nearest - bicubic).max() > 1


def test_noise_level_is_relative_to_value_range():
    lo, hi = ms.get_preset("chainer-vgg16").value_range
    assert hi - lo == pytest.approx(255.0)
    assert 0.2 * (hi - lo) == pytest.approx(51.0)
    lo, hi = ms.get_preset("raw").value_range
    assert (lo, hi) == (0.0, 1.0)


def test_torchvision_preset_matches_torchvision_transforms():
    torch = pytest.importorskip("torch")
    from torchvision import transforms

    img = _photo(224, 224)
    x = ms.get_preset("torchvision-imagenet").apply(img)
    ref = transforms.Compose([transforms.ToTensor(),
                              transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])(Image.fromarray(img))
    np.testing.assert_allclose(x[0], ref.numpy(), atol=1e-5)
    assert isinstance(ref, torch.Tensor)


@pytest.mark.parametrize("name", ["chainer-vgg16", "torchvision-imagenet", "efficientnet-lite", "raw"])
def test_invert_undoes_apply(name):
    img = _photo(32, 32)
    pre = ms.get_preset(name)
    np.testing.assert_array_equal(pre.invert(pre.apply(img, size=(32, 32)))[0], img)


def test_inputs_paths_pil_and_arrays(tmp_path):
    img = _photo()
    path = tmp_path / "p.png"
    Image.fromarray(img).save(path)
    pre = ms.get_preset("raw")
    a = pre.apply([str(path), Image.fromarray(img), img], size=(20, 30))
    assert a.shape == (3, 3, 20, 30)
    np.testing.assert_array_equal(a[0], a[1])
    np.testing.assert_array_equal(a[1], a[2])


def test_bad_images_are_one_line_errors(tmp_path, monkeypatch):
    pre = ms.get_preset("raw")
    with pytest.raises(ms.MultisalError, match="not found"):
        pre.apply(str(tmp_path / "missing.png"))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ms.MultisalError, match="cannot read image .*bad.jpg"):
        pre.apply(str(bad))
    big = tmp_path / "big.png"
    Image.new("RGB", (300, 200)).save(big)
    monkeypatch.setattr("multisal.images.MAX_IMAGE_PIXELS", 300 * 200 - 1)
    with pytest.raises(ms.MultisalError, match="300x200 pixels, over the limit"):
        pre.apply(str(big))
    assert MAX_IMAGE_PIXELS > 10_000_000
    with pytest.raises(ms.MultisalError, match="uint8"):
        pre.apply(np.zeros((4, 4, 3), np.float32))


def test_unknown_preset():
    with pytest.raises(ms.MultisalError, match="unknown preset 'vgg'.*chainer-vgg16"):
        ms.get_preset("vgg")
    with pytest.raises(ms.MultisalError, match="unknown resample filter"):
        ms.get_preset("chainer-vgg16", resample="fancy")
