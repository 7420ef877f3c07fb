"""Grounding: the location vocabulary, the vision-language queries of pretraining and co-training, their loss and
their metric.

Places are location tokens: an object's table (x, y) (and z) binned into the same 256 ids as the action tokens
(``location_tokenizer``: the ``ActionTokenizer`` contract over fixed workspace bounds, saved with the model as
``location_tokenizer.json``), the PaliGemma ``<loc>`` idea. The queries, all answered by the LM head:

    list   "In: List the objects.\\nOut:"  ->  " red cube" x y "; blue bar" x y ...   every object, random order
    where  "In: Where is the red cube?\\nOut:"  ->  x y
    plan   the action prompt of any task naming any object of the scene  ->  x y of that object

``plan`` is the prefix a grounded policy emits before its action tokens (``build_inputs(plan_ids=...)``), so the
words of every task's instructions are tied to places on scenes the simulator labels for free. Location targets
are Gaussians over neighbouring bins (as the action targets), text targets one-hot.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from vla.action_tokenizer import ActionTokenizer
from vla.inputs import IGNORE_INDEX, PROMPT_TEMPLATE, build_queries, model_inputs
from vla.model import VLA

LOCATION_LOW = (0.30, -0.26, 0.0)  # m: the table region objects stand in, and the height of the tip's work
LOCATION_HIGH = (0.68, 0.26, 0.30)
LIST_PROMPT = "In: List the objects.\nOut:"
WHERE_PROMPT = "In: Where is the {name}?\nOut:"
QUERIES = ("list", "where", "plan")
WITHIN = 0.03  # m: a predicted place this close to the named object counts as "within 3 cm"
PLAN_TOKENS = 2  # a grounded policy's plan: the (x, y) location tokens of the object its instruction names
OFFSET_TOKENS = 2  # with train.plan_offset, then the (x, y) offset from the tip to that object
OFFSET_RANGE = 0.16  # m: offsets are binned over +-this (1.25 mm per bin); farther ones fall into the end bins


def plan_tokens(model: torch.nn.Module) -> int:
    """How many plan tokens ``model`` emits before its action tokens: ``config.plan_tokens`` (saved in config.json
    by grounded SFT), 0 for a model that emits actions only."""
    return int(getattr(model.config, "plan_tokens", 0) or 0)


def location_tokenizer(token_offset: int, n_bins: int = 256) -> ActionTokenizer:
    """(x, y, z) in metres <-> location token ids, over the fixed bounds LOCATION_LOW..LOCATION_HIGH."""
    return ActionTokenizer(LOCATION_LOW, LOCATION_HIGH, token_offset, n_bins, absolute_dims=())


def offset_tokenizer(location: ActionTokenizer) -> ActionTokenizer:
    """(x, y) offsets in metres <-> token ids in ``location``'s ids, over +-OFFSET_RANGE."""
    return ActionTokenizer((-OFFSET_RANGE,) * 2, (OFFSET_RANGE,) * 2, location.token_offset, location.n_bins,
                           absolute_dims=())


class Queries:
    """Builds the prompts and answers of the grounding queries for one model (its tokenizers) and the tasks'
    instruction ``templates`` (with ``{target}`` and optionally ``{base}``)."""

    def __init__(self, vla: VLA, templates: Sequence[str]):
        if vla.location_tokenizer is None:
            raise ValueError("this model has no location tokenizer; build it with vla.grounding.location_tokenizer")
        self.vla, self.templates, self._text = vla, list(templates), {}
        self.offsets = offset_tokenizer(vla.location_tokenizer)

    def text(self, s: str) -> list[int]:
        if s not in self._text:
            self._text[s] = self.vla.tokenizer(s, add_special_tokens=False)["input_ids"]
        return self._text[s]

    def place(self, position: np.ndarray) -> list[int]:
        """The (x, y) location tokens of a position (3,) in metres."""
        return self.vla.location_tokenizer.encode(np.asarray(position, np.float64)[None])[0, :2].tolist()

    def plan(self, position: np.ndarray, tip: np.ndarray) -> list[int]:
        """The plan an action row answers before its actions: the named object's place (3,), and for a model with
        ``plan_tokens`` 4 (train.plan_offset) then the offset (x, y) from the tip (the state's first 3 values) to it."""
        place = self.place(position)
        if plan_tokens(self.vla.model) != PLAN_TOKENS + OFFSET_TOKENS:
            return place
        offset = np.asarray(position, np.float64)[:2] - np.asarray(tip, np.float64)[:2]
        return place + self.offsets.encode(offset[None])[0].tolist()

    def instruction(self, names: Sequence[str], i: int, rng: np.random.Generator) -> str:
        """A random task instruction naming object i (a stack's base: another object of the scene)."""
        template = self.templates[rng.integers(len(self.templates))]
        others = [k for k in range(len(names)) if k != i] or [i]
        return template.format(target=names[i], base=names[others[rng.integers(len(others))]])

    def sample(self, kind: str, names: Sequence[str], positions: np.ndarray, rng: np.random.Generator,
               ) -> tuple[str, list[int]]:
        """(prompt, answer ids) of one query of ``kind`` about a scene's objects: names [N], positions (N, 3)."""
        if kind == "list":
            answer = []
            for k, i in enumerate(rng.permutation(len(names))):
                answer += self.text(("; " if k else " ") + names[i]) + self.place(positions[i])
            return LIST_PROMPT, answer
        i = int(rng.integers(len(names)))
        if kind == "where":
            return WHERE_PROMPT.format(name=names[i]), self.place(positions[i])
        if kind == "plan":
            return PROMPT_TEMPLATE.format(instruction=self.instruction(names, i, rng)), self.place(positions[i])
        raise ValueError(f"query kind {kind!r} is not one of {QUERIES}")


def scored_logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Logits at the labelled positions only, (B, M, V), their targets (B, M) and which are real (B, M) (rows have
    different numbers M_b <= M of labelled tokens; the rest repeat position 0 and are masked)."""
    labelled = batch["labels"] != IGNORE_INDEX  # (B, L)
    counts = labelled.sum(1)
    order = torch.argsort((~labelled).to(torch.int8), dim=1, stable=True)[:, : int(counts.max())]  # (B, M)
    valid = torch.arange(order.shape[1], device=order.device)[None] < counts[:, None]
    at = torch.where(valid, order, 1)
    inputs = {k: v for k, v in model_inputs(batch).items() if k != "labels"}
    logits = model(**inputs, logits_to_keep=at - 1).logits  # logits at t score the token at t + 1
    return logits, batch["input_ids"].gather(1, at), valid


def sequence_loss(logits: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor, bins: slice, sigma: float,
                  ) -> torch.Tensor:
    """Mean cross-entropy over the valid targets; a target among the bin ids ``bins`` (a location or an action
    token) gets a Gaussian over the bins with std ``sigma`` bins (one-hot when 0), any other token one-hot."""
    logp = logits.float().log_softmax(-1)  # (B, M, V)
    hard = -logp.gather(-1, targets[..., None]).squeeze(-1)  # (B, M)
    is_bin = (targets >= bins.start) & (targets < bins.stop)
    if sigma > 0:
        n = bins.stop - bins.start
        centre = (targets - bins.start).clamp(0, n - 1).float()[..., None]  # (B, M, 1)
        q = torch.exp(-0.5 * ((torch.arange(n, device=logits.device) - centre) / sigma) ** 2)
        soft = -(q / q.sum(-1, keepdim=True) * logp[..., bins]).sum(-1)
        hard = torch.where(is_bin, soft, hard)
    return (hard * valid).sum() / valid.sum()


@torch.no_grad()
def grounding_accuracy(vla: VLA, queries: Queries, images: np.ndarray, states: np.ndarray | None,
                       names: Sequence[Sequence[str]], positions: Sequence[np.ndarray], seed: int = 0,
                       batch_size: int = 48) -> dict[str, dict[str, float]]:
    """Per query kind, over every object of every scene: how often the predicted place is nearest the named
    object (``nearest``; chance is 1 / objects), within 3 cm of it, and the median error (cm).

    ``list``: the named object is given as the first item of the list (teacher-forced), then x and y are decoded
    greedily, y after the decoded x; ``where`` and ``plan`` decode x then y after their prompt."""
    model, rng = vla.model, np.random.default_rng(seed)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    loc, out = vla.location_tokenizer, {}
    for kind in QUERIES:
        rows = [(s, i) for s in range(len(names)) for i in range(len(names[s]))]
        hits, errors = [], []
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            scenes = [s for s, _ in chunk]
            prompts, answers = [], []
            for s, i in chunk:
                if kind == "list":
                    prompts.append(LIST_PROMPT), answers.append(queries.text(" " + names[s][i]))
                elif kind == "where":
                    prompts.append(WHERE_PROMPT.format(name=names[s][i])), answers.append([])
                else:
                    prompts.append(PROMPT_TEMPLATE.format(instruction=queries.instruction(names[s], i, rng)))
                    answers.append([])
            for _ in range(2):  # x, then y after it
                batch = build_queries(vla, images[scenes], prompts, answers, None if states is None else states[scenes])
                at = batch["answer_starts"] + torch.tensor([len(a) for a in answers]) - 1  # the last given token
                inputs = {k: v.to(device) for k, v in model_inputs(batch).items() if k != "labels"}
                logits = model(**inputs, logits_to_keep=at[:, None].to(device)).logits[:, 0]  # (B, V)
                chosen = logits[:, loc.token_offset : loc.token_offset + loc.n_bins].argmax(-1) + loc.token_offset
                answers = [a + [int(c)] for a, c in zip(answers, chosen)]
            for (s, i), answer in zip(chunk, answers):
                xy = loc.decode(np.asarray([answer[-2:] + [loc.token_offset]]))[0, :2]
                distance = np.linalg.norm(np.asarray(positions[s])[:, :2] - xy, axis=1)
                hits.append(int(np.argmin(distance) == i))
                errors.append(distance[i])
        out[kind] = {"nearest": float(np.mean(hits)), "within_3cm": float(np.mean(np.asarray(errors) < WITHIN)),
                     "median_cm": float(np.median(errors) * 100), "queries": len(hits)}
    if was_training:
        model.train()
    return out
