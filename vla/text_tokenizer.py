"""An offline text tokenizer for the VLA: byte-level BPE trained on the instructions, plus action tokens."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<pad>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
IMAGE_TOKEN = "<image>"
MAX_ACTION_BINS = 1000  # action tokens are spelled with three digits


def action_token(index: int) -> str:
    """The spelling of action bin ``index``: ``<act_000>`` ... ``<act_999>``."""
    return f"<act_{index:03d}>"


def build_tokenizer(corpus: Iterable[str], vocab_size: int = 1024, n_action_bins: int = 256) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and add the special and action tokens.

    ``corpus`` should be the texts the model reads: the filled prompts (``vla.inputs.PROMPT_TEMPLATE``), not bare
    instructions, so that the template's words become single tokens (63 instead of 92 tokens a row by default).

    Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<image>`` 3, then the BPE vocabulary (the 256 byte symbols first, so
    any string encodes, seen or not, then up to ``vocab_size`` minus those merges), then ``n_action_bins`` action
    tokens ``<act_000>`` ... with contiguous ids (see ``action_token_offset``). ``len(tokenizer)`` is the LM's
    vocabulary size. Encoding prepends ``<s>``; pass ``add_special_tokens=False`` for a bare span.
    """
    if not 2 <= n_action_bins <= MAX_ACTION_BINS:
        raise ValueError(f"n_action_bins must be in [2, {MAX_ACTION_BINS}], got {n_action_bins}")
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IMAGE_TOKEN]
    if vocab_size < len(alphabet) + len(specials):
        raise ValueError(f"vocab_size must be >= {len(alphabet) + len(specials)} (bytes + specials), got {vocab_size}")

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    backend.train_from_iterator(corpus, trainer)
    backend.add_special_tokens(
        [AddedToken(action_token(i), special=True, normalized=False) for i in range(n_action_bins)]
    )
    bos_id = backend.token_to_id(BOS_TOKEN)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A $B:1", special_tokens=[(BOS_TOKEN, bos_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )
    action_token_offset(tokenizer, n_action_bins)
    return tokenizer


def action_token_offset(tokenizer: PreTrainedTokenizerFast, n_action_bins: int = 256) -> int:
    """Id of ``<act_000>``, after checking that the ``n_action_bins`` action tokens have contiguous ids."""
    ids = tokenizer.convert_tokens_to_ids([action_token(i) for i in range(n_action_bins)])
    if any(i is None or i == tokenizer.unk_token_id for i in ids):
        raise ValueError(
            f"tokenizer lacks some of the action tokens {action_token(0)}..{action_token(n_action_bins - 1)}; "
            "build it with vla.text_tokenizer.build_tokenizer"
        )
    offset = int(ids[0])
    if not np.array_equal(ids, offset + np.arange(n_action_bins)):
        raise ValueError(
            f"the {n_action_bins} action token ids are not contiguous (first {offset}); "
            "add them in one call after all other tokens, as build_tokenizer does"
        )
    return offset
