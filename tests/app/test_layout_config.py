"""The layout keys of a configuration (layout, prefix_tokens, token_grid; top-level for every CAM
method, or in a method's table) and the attention methods' tables, on a small timm ViT
(tests/timm_models.py) run by `multisal explain`."""
import cv2
import numpy as np
import pytest

from multisal.app.cli import main
from multisal.app.config import ConfigError, load_config

VIT = ["--model", "timm_models:vit", "--preset", "raw", "--size", "64", "64"]


@pytest.mark.parametrize("config, message", [
    ({"layout": "NCHW"}, 'config key \'layout\': expected one of "nchw", "nhwc", "tokens", got "NCHW"'),
    ({"prefix_tokens": -1}, "config key 'prefix_tokens': expected an integer >= 0, got -1"),
    ({"gradcam": {"token_grid": [4]}}, "config key 'gradcam.token_grid': expected [rows, columns], integers 1..8192, got [4]"),
    ({"attention_rollout": {"head_fusion": "sum"}}, "config key 'attention_rollout.head_fusion': expected one of \"mean\""),
    ({"attention_rollout": {"discard_ratio": 1}}, "config key 'attention_rollout.discard_ratio': expected a number in [0, 1)"),
    ({"attention_rollout": {"layers": []}}, "config key 'attention_rollout.layers': expected a non-empty list"),
])
def test_layout_and_attention_keys_are_checked(config, message):
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value).startswith(message), str(info.value)


def test_layout_keys_reach_the_methods_and_an_impossible_one_names_its_key(tmp_path, capsys):
    photo = tmp_path / "p.png"
    assert cv2.imwrite(str(photo), np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    config = tmp_path / "c.toml"
    config.write_text('methods = ["gradcam", "attention_rollout", "transformer_attribution"]\n'
                      'prefix_tokens = 1\ntoken_grid = [4, 4]\n[attention_rollout]\nhead_fusion = "max"\n')
    out = tmp_path / "run"
    assert main(["explain", str(photo), *VIT, "--config", str(config), "--out", str(out)]) == 0
    for name in ("gradcam", "attention_rollout", "transformer_attribution"):
        saved = np.load(out / "p" / f"{name}.npy")
        assert saved.shape == (64, 64) and saved.max() == 1, name
    capsys.readouterr()
    for text, message in [
        ('layout = "nchw"\n', "config key 'layout': layer 'blocks.0' gives an activation of shape (1, 17, 192); "
                              "layout='nchw' needs a 4-D (N,C,H,W) one"),
        ('[gradcam]\nprefix_tokens = 3\n', "config key 'gradcam.prefix_tokens': layer 'blocks.0' has 17 tokens, which "
                                           "after 3 prefix tokens fit no grid of a 64x64 input"),
    ]:
        config.write_text('methods = ["gradcam"]\n' + text)
        assert main(["explain", str(photo), *VIT, "--config", str(config), "--out", str(tmp_path / "bad")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("multisal: error: " + message), err
