"""Tests for vla/text_tokenizer.py, vla/model.py, vla/film.py and vla/inputs.py on tiny random-weight models of every
architecture."""

import json
from copy import deepcopy

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer, PreTrainedTokenizerFast

from store.errors import UsageError
from vla.action_tokenizer import ActionTokenizer
from vla.inputs import IGNORE_INDEX, build_inputs, model_inputs, preprocess_images
from vla.model import ARCHITECTURES, VLA, VLAModelConfig, build_model, build_vla, load_model
from vla.text_tokenizer import action_token, action_token_offset, build_tokenizer

CORPUS = ["pick up the red cube", "push the blue ball into the green bowl", "stack the yellow block on the cube"]
INSTRUCTIONS = ["pick up the red cube", "put the zebra-striped mug under the lamp, carefully", "stack"]
D = 7


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer(CORPUS * 10, vocab_size=300)


@pytest.fixture(scope="module", params=[*sorted(ARCHITECTURES), "fast_vlm/film"])
def vla(request, tokenizer, tiny_model) -> VLA:
    """Every architecture, and the default one with FiLM (its scales and shifts moved off their zero init)."""
    arch, _, film = request.param.partition("/")
    torch.manual_seed(0)
    vla = build_vla(tiny_model(arch=arch, film=bool(film)), tokenizer)
    if film:
        with torch.no_grad():
            for layer in vla.model.film:
                layer.weight.normal_(0, 0.3)
    return vla


@pytest.fixture
def batch_data(tokenizer):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(len(INSTRUCTIONS), 32, 32, 3), dtype=np.uint8)
    offset = action_token_offset(tokenizer)
    action_ids = rng.integers(offset, offset + 256, size=(len(INSTRUCTIONS), D))
    return images, action_ids


# ---- text tokenizer ----


def test_tokenizer_special_and_contiguous_action_ids(tokenizer):
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.image_token_id] == [
        0, 1, 2, 3,
    ]  # fmt: skip
    offset = action_token_offset(tokenizer)
    ids = tokenizer.convert_tokens_to_ids([action_token(i) for i in range(256)])
    assert ids == list(range(offset, offset + 256))
    assert offset + 256 == len(tokenizer)
    with pytest.raises(ValueError, match="lacks"):
        action_token_offset(tokenizer, n_action_bins=300)


def test_tokenizer_encodes_unseen_text_through_bytes(tokenizer):
    text = "grasp the Ünïcode 🦓 quokka"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id


def test_tokenizer_save_and_reload(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path), PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded(CORPUS)["input_ids"] == tokenizer(CORPUS)["input_ids"]
        assert action_token_offset(loaded) == action_token_offset(tokenizer)
        assert loaded.image_token_id == tokenizer.image_token_id and loaded.pad_token_id == tokenizer.pad_token_id


# ---- config and model ----


def test_default_config_size(tokenizer):
    cfg = VLAModelConfig()
    assert cfg.num_image_tokens == 36
    n_params = sum(p.numel() for p in build_model(cfg, tokenizer).parameters())
    assert 4e6 <= n_params <= 12e6, n_params


def test_vision_positions_start_as_2d_sincos(tokenizer):
    from vla.model import sincos_2d

    codes = sincos_2d(6, 192)
    assert codes.shape == (36, 192) and torch.cdist(codes, codes).fill_diagonal_(1e9).min() > 0.5  # all distinct
    # neighbours in the grid are closer than far cells: position is a smooth function of the code
    assert torch.dist(codes[0], codes[1]) < torch.dist(codes[0], codes[5]) < torch.dist(codes[0], codes[35])
    model = build_model(VLAModelConfig(arch="llava"), tokenizer)
    weight = next(m.weight for n, m in model.named_modules() if n.endswith("embeddings.position_embedding"))
    assert torch.equal(weight, codes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"arch": "gpt2"}, "not supported"),
        ({"image_size": 100}, "multiple of patch_size"),
        ({"text_hidden_size": 250}, "even integer"),
        ({"vision_layers": 0}, "positive integer"),
        ({"max_position_embeddings": 40}, "raise it"),
        ({"arch": "llava", "film": True}, "has none"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(UsageError, match=match):
        VLAModelConfig(**kwargs)


def test_preprocess_matches_the_saved_image_processor(vla, batch_data):
    images, _ = batch_data
    reference = vla.image_processor(list(images), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess_images(images, vla.image_processor), reference, atol=1e-6, rtol=0)
    larger = images.repeat(2, axis=1).repeat(2, axis=2)  # (B, 64, 64, 3): resized to 32 px
    reference = vla.image_processor(list(larger), return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(preprocess_images(larger, vla.image_processor), reference, atol=2 * 2 / 255, rtol=0)


def test_labels_cover_exactly_the_action_tokens_and_eos(vla, batch_data):
    images, action_ids = batch_data
    batch = build_inputs(vla, images, INSTRUCTIONS, action_ids)
    config = vla.model.config
    for row in range(len(INSTRUCTIONS)):
        positions = batch["action_positions"][row]
        assert batch["input_ids"][row, positions].tolist() == action_ids[row].tolist()
        targets = (batch["labels"][row] != IGNORE_INDEX).nonzero().squeeze(1)
        assert targets.tolist() == positions.tolist() + [positions[-1].item() + 1]
        assert batch["labels"][row, targets[-1]] == vla.tokenizer.eos_token_id
        assert (batch["input_ids"][row] == config.image_token_id).sum() == 4  # (32 / 16) ** 2 patches
    assert batch["attention_mask"][:, 0].all()  # right padding for training


def target_positions(batch) -> torch.Tensor:
    """(B, L) bool: logits positions that score a label (the model shifts labels left by one)."""
    scored = torch.zeros_like(batch["labels"], dtype=torch.bool)
    scored[:, :-1] = batch["labels"][:, 1:] != IGNORE_INDEX
    return scored


def test_loss_depends_only_on_action_positions(vla, batch_data):
    images, action_ids = batch_data
    batch = build_inputs(vla, images, INSTRUCTIONS, action_ids)
    model = vla.model.eval()
    with torch.no_grad():
        out = model(**model_inputs(batch))
    assert torch.isfinite(out.loss)
    labels, vocab = batch["labels"], model.config.text_config.vocab_size
    scored = target_positions(batch)
    assert scored.sum() == len(INSTRUCTIONS) * (D + 1)

    logits = out.logits.detach().clone().requires_grad_(True)
    loss = model.loss_function(logits=logits, labels=labels, vocab_size=vocab)
    torch.testing.assert_close(loss, out.loss)
    manual = torch.nn.functional.cross_entropy(logits[scored], labels[:, 1:][scored[:, :-1]])
    torch.testing.assert_close(loss, manual)

    (grad,) = torch.autograd.grad(loss, logits)
    assert (grad[~scored] == 0).all()
    assert (grad[scored].abs().sum(-1) > 0).all()

    noisy = logits.detach() + 100 * torch.randn_like(logits) * (~scored).unsqueeze(-1)
    torch.testing.assert_close(model.loss_function(logits=noisy, labels=labels, vocab_size=vocab), loss)


def test_every_trainable_parameter_gets_a_gradient(vla, batch_data):
    images, action_ids = batch_data
    model = vla.model.train()
    model.zero_grad(set_to_none=True)
    model(**model_inputs(build_inputs(vla, images, INSTRUCTIONS, action_ids))).loss.backward()
    missing = [name for name, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []  # DDP without find_unused_parameters
    model.zero_grad(set_to_none=True)


def test_left_padded_inference_matches_unpadded_and_teacher_forcing(vla, batch_data):
    images, action_ids = batch_data
    model = vla.model.eval()
    with torch.no_grad():
        infer = build_inputs(vla, images, INSTRUCTIONS)
        assert "labels" not in infer and infer["attention_mask"][:, -1].all()  # left padding
        last = model(**model_inputs(infer)).logits[:, -1]  # (B, V)
        train = build_inputs(vla, images, INSTRUCTIONS, action_ids)
        forced = model(**model_inputs(train)).logits
        for row in range(len(INSTRUCTIONS)):
            alone = model(**model_inputs(build_inputs(vla, images[row : row + 1], INSTRUCTIONS[row : row + 1])))
            torch.testing.assert_close(alone.logits[0, -1], last[row], atol=1e-5, rtol=0)
            first_action = train["action_positions"][row, 0]
            torch.testing.assert_close(forced[row, first_action - 1], last[row], atol=1e-5, rtol=0)


def test_actions_are_causal(vla, batch_data):
    """Changing an action token never changes logits before it; the prompt is read whole by PaliGemma and FiLM."""
    images, action_ids = batch_data
    model = vla.model.eval()
    batch = build_inputs(vla, images[:1], INSTRUCTIONS[:1], action_ids[:1])
    pos = batch["action_positions"][0, 3].item()
    changed = {key: value.clone() for key, value in batch.items()}
    changed["input_ids"][0, pos] = action_ids[0, 3] + (1 if action_ids[0, 3] % 2 == 0 else -1)
    with torch.no_grad():
        before, after = model(**model_inputs(batch)).logits, model(**model_inputs(changed)).logits
    assert torch.equal(before[0, :pos], after[0, :pos])
    assert not torch.allclose(before[0, pos], after[0, pos])

    prompt_end = batch["action_positions"][0, 0].item() - 1
    changed = {key: value.clone() for key, value in batch.items()}
    changed["input_ids"][0, prompt_end] = vla.tokenizer.convert_tokens_to_ids("a")
    with torch.no_grad():
        after = model(**model_inputs(changed)).logits
    prefix_sees_future = not torch.allclose(before[0, : prompt_end - 1], after[0, : prompt_end - 1])
    # PaliGemma's prefix is bidirectional, and FiLM's image tokens read every word of the prompt
    film = getattr(model, "film", None) is not None
    assert prefix_sees_future == (ARCHITECTURES[model.config.model_type].uses_token_type_ids or film)


def test_film_conditions_the_image_tokens_on_the_words_only(vla, batch_data):
    images, action_ids = batch_data
    model = vla.model.eval()
    film = getattr(model, "film", None) is not None

    def image_states(texts, actions=None, of=vla):
        batch = build_inputs(of, images, texts, actions)
        with torch.no_grad():
            hidden = of.model(**model_inputs(batch), output_hidden_states=True).hidden_states[0]  # LM input embeddings
        return hidden[batch["input_ids"] == model.config.image_token_id]  # (B * N, H)

    base = image_states(INSTRUCTIONS)
    other = ["push the blue ball into the green bowl"] * len(INSTRUCTIONS)
    assert (not torch.allclose(base, image_states(other))) == film  # the image tokens depend on the instruction
    shifted = (action_ids - action_ids.min() + 1) % 256 + action_ids.min()  # other action tokens: never read
    torch.testing.assert_close(image_states(INSTRUCTIONS, action_ids), image_states(INSTRUCTIONS, shifted))
    if film:
        with pytest.raises(RuntimeError, match="call the model's forward"):
            model.model.vision_tower(preprocess_images(images, vla.image_processor))
        copy = vla._replace(model=deepcopy(model))  # a frozen reference, as DPO keeps one
        torch.testing.assert_close(image_states(INSTRUCTIONS), base)
        with torch.no_grad():
            copy.model.film[0].bias.fill_(1.0)
        assert not torch.allclose(image_states(INSTRUCTIONS, of=copy), base)  # the copy modulates with its own layers
        torch.testing.assert_close(image_states(INSTRUCTIONS), base)  # and the original keeps its own


def test_save_load_round_trip_and_train_step(tmp_path, vla, batch_data):
    images, action_ids = batch_data
    vla.save_pretrained(tmp_path)
    saved = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= saved
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == vla.model.config.model_type

    loaded = load_model(tmp_path)
    assert isinstance(vla.model, type(AutoModelForImageTextToText.from_pretrained(tmp_path)))
    batch = build_inputs(vla, images, INSTRUCTIONS, action_ids)
    assert all(torch.equal(v, build_inputs(loaded, images, INSTRUCTIONS, action_ids)[k]) for k, v in batch.items())
    with torch.no_grad():
        expected = vla.model.eval()(**model_inputs(batch)).logits
        torch.testing.assert_close(loaded.model(**model_inputs(batch)).logits, expected, atol=0, rtol=0)

    model = loaded.model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    loss = model(**model_inputs(batch)).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_load_model_errors(tmp_path, vla):
    with pytest.raises(UsageError, match="no config.json"):
        load_model(tmp_path)
    vla.save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(UsageError, match="preprocessor_config.json"):
        load_model(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for model_type in ("gpt2", "not_a_model"):
        (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
        with pytest.raises(UsageError, match="supported model types"):
            load_model(tmp_path)


def test_build_inputs_rejects_bad_shapes(vla, batch_data):
    images, action_ids = batch_data
    with pytest.raises(ValueError, match="images for"):
        build_inputs(vla, images[:2], INSTRUCTIONS, action_ids)
    with pytest.raises(ValueError, match="action_ids must be integer"):
        build_inputs(vla, images, INSTRUCTIONS, action_ids.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        build_inputs(vla, images.astype(np.float32), INSTRUCTIONS)


def with_state(vla: VLA) -> VLA:
    """``vla`` reading a 7-D proprio state in [-1, 1] per dimension, as SFT attaches it (model.proprio=true)."""
    offset = action_token_offset(vla.tokenizer)
    return vla._replace(state_tokenizer=ActionTokenizer([-1.0] * 7, [1.0] * 7, offset, absolute_dims=()))


def test_state_tokens_follow_the_image_and_are_read_not_scored(tmp_path, vla, batch_data):
    images, action_ids = batch_data
    reader = with_state(vla)
    states = np.random.default_rng(1).uniform(-1, 1, (len(INSTRUCTIONS), 7))
    plain = build_inputs(vla, images, INSTRUCTIONS, action_ids)
    batch = build_inputs(reader, images, INSTRUCTIONS, action_ids, states)
    assert torch.equal(batch["action_positions"], plain["action_positions"] + 7)
    image_token = vla.model.config.image_token_id
    for row in range(len(INSTRUCTIONS)):
        after_images = (batch["input_ids"][row] == image_token).nonzero().max() + 1
        after_images += ARCHITECTURES[vla.model.config.model_type].image_before_bos  # PaliGemma: <image>*N <s>
        state_ids = batch["input_ids"][row, after_images : after_images + 7]
        assert state_ids.tolist() == reader.state_tokenizer.encode(states[row]).tolist()
    assert (batch["labels"] != IGNORE_INDEX).sum() == (plain["labels"] != IGNORE_INDEX).sum()  # actions + EOS only

    moved = build_inputs(reader, images, INSTRUCTIONS, action_ids, -states)
    with torch.no_grad():
        model = reader.model.eval()
        a, b = (model(**model_inputs(x)).logits for x in (batch, moved))
    assert not torch.allclose(a, b)  # the model reads the state

    reader.save_pretrained(tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.state_tokenizer.to_dict() == reader.state_tokenizer.to_dict()
    with pytest.raises(ValueError, match="pass states="):
        build_inputs(loaded, images, INSTRUCTIONS, action_ids)
    with pytest.raises(ValueError, match="states must be"):
        build_inputs(loaded, images, INSTRUCTIONS, action_ids, states[:, :3])
