"""The image-synthesis and segmentation methods on the real EfficientNet-Lite0 and real photos."""
import numpy as np
import pytest
import skimage.data

import multisal as ms
from multisal import models

STINGRAY = 6


@pytest.fixture(scope="module")
def effnet():
    net = models.load("efficientnet-lite0")
    pre = ms.get_preset(models.preset_for("efficientnet-lite0"))
    return ms.load_backend("torch", model=net, preset=pre), pre


def test_fooling_image_fools_within_100_steps(effnet):
    be, pre = effnet
    x = pre.apply(skimage.data.chelsea())
    assert be.predict(x).argmax() == 285
    fooled, steps = ms.fooling_image(be, x, STINGRAY, max_iter=100)
    assert 1 <= steps[0] <= 100
    assert be.predict(fooled).argmax() == STINGRAY
    # The change is small: a fooling image looks like the photo.
    assert np.abs(fooled - x).mean() < 0.05 * (pre.value_range[1] - pre.value_range[0])


def test_class_visualization_raises_the_target_score(effnet):
    be, pre = effnet
    target = 967  # espresso
    start = pre.invert(np.random.default_rng(0).standard_normal((3, 224, 224)).astype(np.float32))
    before = be.predict(pre.apply(start))[0]
    # cs231n's defaults (lr=25, tuned for SqueezeNet) raise the score; a step size suited to this
    # model's gradients (lr=5) makes the target the top class.
    for lr, top in ((25, None), (5, 1)):
        picture = ms.class_visualization(be, target, preset=pre, lr=lr)
        assert picture.shape == (224, 224, 3) and picture.dtype == np.uint8
        after = be.predict(pre.apply(picture))[0]
        assert after[target] > before[target] + 3
        if top:
            assert after.argmax() == target


def test_segment_covers_the_cat_more_than_the_background(effnet):
    be, pre = effnet
    photo = skimage.data.chelsea()                   # 300 x 451; the cat's face fills the left 3/4
    sal = ms.smoothgrad(be, pre.apply(photo), n=10)[0]
    mask = ms.segment(photo, sal)
    assert mask.shape == photo.shape[:2] and mask.dtype == bool
    cat = mask[:, 60:340].mean()
    background = mask[:, 395:].mean()
    assert cat > 0.5 and cat > background + 0.3, (cat, background)


def test_layer_none_is_the_head_activation(effnet):
    be, _ = effnet
    name = be.default_layer((3, 224, 224))
    res = be.run(np.zeros((1, 3, 224, 224), np.float32), layers=[name])
    assert res.activations[name].shape == (1, 1280, 7, 7)
