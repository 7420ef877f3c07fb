"""Tests for vla/bases.py: the shipped base is what its digest says, exports keep the model, damage is refused."""

import numpy as np
import pytest
import torch

import vla.bases as bases
from store.errors import UsageError
from vla.grounding import location_tokenizer
from vla.inputs import build_inputs, model_inputs
from vla.model import build_vla, load_model
from vla.text_tokenizer import action_token_offset, build_tokenizer


def test_the_shipped_base_matches_its_digest_and_loads():
    path = bases.shipped_base()
    vla = load_model(path)
    assert vla.location_tokenizer is not None and next(vla.model.parameters()).dtype == torch.float32
    assert bases.file_sha256(path / bases.WEIGHTS) == bases.SHIPPED_SHA256


def test_an_export_acts_like_its_source_and_damage_is_refused(tiny_model, tmp_path, monkeypatch):
    vla = build_vla(tiny_model(arch="fast_vlm"), build_tokenizer(["touch the red cube"], 300))
    vla = vla._replace(location_tokenizer=location_tokenizer(action_token_offset(vla.tokenizer)))
    vla.save_pretrained(tmp_path / "src")
    digest = bases.export(tmp_path / "src", tmp_path / "base")
    monkeypatch.setattr(bases, "SHIPPED", tmp_path / "base")
    monkeypatch.setattr(bases, "SHIPPED_SHA256", digest)
    exported = load_model(bases.shipped_base())
    batch = model_inputs(build_inputs(vla, np.zeros((1, 32, 32, 3), np.uint8), ["touch the red cube"]))
    with torch.no_grad():
        a, b = vla.model.eval()(**batch).logits, exported.model(**batch).logits
    torch.testing.assert_close(a, b, atol=2e-2, rtol=1e-2)  # fp16 weights
    weights = tmp_path / "base" / bases.WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(UsageError, match="damaged or was replaced"):
        bases.shipped_base()
    weights.unlink()
    with pytest.raises(UsageError, match="base=pretrain"):
        bases.shipped_base()
