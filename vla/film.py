"""FiLM for the FastVLM tower (as in RT-1): the instruction scales and shifts the channels of every ResNet stage.

``FilmFastVlm`` is the model class of ``arch=fast_vlm`` (``vla.model.ARCHITECTURES``); without
``config.film_token_range`` it is exactly ``FastVlmForConditionalGeneration``, so every FastVLM checkpoint loads
through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import FastVlmConfig, FastVlmForConditionalGeneration


class _Instruction:
    """The instruction vector of the current forward pass, shared by a FiLM model and its stage hooks."""

    value: torch.Tensor | None = None


def _film_hook(stage: torch.nn.Module, args, out: torch.Tensor) -> torch.Tensor:
    # A plain function reading the stage's own attribute, so that a deep copy of the model (a frozen DPO reference)
    # modulates with its own copies of the layer and the instruction.
    layer, instruction = stage.film
    if instruction.value is None:
        raise RuntimeError("a FiLM model reads the instruction: call the model's forward, not its vision tower")
    gamma, beta = layer(instruction.value).chunk(2, dim=1)  # (B, C) each
    return out * (1 + gamma[..., None, None]) + beta[..., None, None]


class FilmFastVlm(FastVlmForConditionalGeneration):
    """FastVLM, optionally with FiLM: when ``config.film_token_range`` is set, the mean embedding of the prompt's
    words (ids in that range), layer-normalised, gives a per-channel scale and shift for every ResNet stage's output,
    ``h * (1 + gamma) + beta``, zero-initialised so that training starts from the plain model.

    Without it this is exactly ``FastVlmForConditionalGeneration``, so every FastVLM checkpoint loads through it.
    Only the forward pass sets the instruction: a vision-tower call outside it raises instead of using a stale one.
    """

    def __init__(self, config: FastVlmConfig) -> None:
        super().__init__(config)
        self.film, self._instruction = None, _Instruction()
        if getattr(config, "film_token_range", None) is None:
            return
        self.film = torch.nn.ModuleList(
            torch.nn.Linear(config.text_config.hidden_size, 2 * width) for width in config.vision_config.hidden_sizes
        )
        for layer in self.film:
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
        for stage, layer in zip(self.model.vision_tower.encoder.stages, self.film):
            stage.film = (layer, self._instruction)  # a plain attribute: not a submodule, not in the state dict
            stage.register_forward_hook(_film_hook)

    def _init_weights(self, module: torch.nn.Module) -> None:
        super()._init_weights(module)
        film = getattr(self, "film", None)  # post_init runs before __init__ has made it
        if film is not None and any(module is layer for layer in film):  # weights a checkpoint lacks start at zero
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, **kwargs):
        if self.film is None or pixel_values is None:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   **kwargs)
        low, high = self.config.film_token_range
        words = (input_ids >= low) & (input_ids < high)
        if attention_mask is not None and attention_mask.dim() == 2:  # a 4-D mask (vla.parallel) marks no padding
            words &= attention_mask.bool()  # and needs none: pad ids lie outside the words' range
        embeddings = self.get_input_embeddings()(input_ids) * words[..., None]  # (B, L, H)
        mean = embeddings.sum(1) / words.sum(1, keepdim=True).clamp(min=1)
        # Normalised: token embeddings start ~0.02 per channel, which would keep the modulation ~100x too weak.
        self._instruction.value = F.layer_norm(mean, mean.shape[-1:])
        try:
            return super().forward(input_ids=input_ids, pixel_values=pixel_values, attention_mask=attention_mask,
                                   **kwargs)
        finally:
            self._instruction.value = None
