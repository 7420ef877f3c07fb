"""Latency of one action: `VLAPolicy` against one prompt forward (the floor) and HF `generate`, side by side.

    python bench/policy_latency.py bench/policy_latency.json [--arch fast_vlm] [--repeats 30]

The default model (``VLAModelConfig()``, random init) with a tokenizer trained on a few prompts. Every case runs
once per round, round-robin, so that load from other jobs on the machine hits all of them alike; the figures are
medians over the rounds after warm-up, in milliseconds per action. Cases:

- ``floor_b1`` / ``floor_b8``: one ``model(...)`` forward over the prompt (image + instruction), inputs prebuilt, the
  logits of the last position only: the least any decoder must spend before its first action token.
- ``ours_b1`` / ``ours_b8``: ``VLAPolicy.act`` / ``act_batch`` end to end (inputs, prompt forward, 7 tokens,
  un-normalised actions) with the autoregressive head; b8 is per action.
- ``parallel_b1`` / ``parallel_b8``: the same with the parallel head (``vla.parallel``, K = 1): the 7 tokens from
  one forward over the prompt and 7 slots.
- ``chunk4_b1`` ... ``chunk8_b8``: the parallel head with chunks of K = 4 or 8 actions executed open loop: one round
  is K calls from a fresh chunk (one forward over the prompt and K * 7 slots, then K - 1 calls that read the chunk),
  divided by the K (times 8) actions.
- ``hf_loop_b1``: ``VLAPolicy(fast=False)``, the model's own cached forward for every token.
- ``generate_b1`` / ``generate_b8``: ``model.generate`` of the 7 tokens, greedy, restricted to the action ids by a
  logits processor, inputs prebuilt.
- ``gemv6_b1``: only the matrix-vector products of 6 single-token steps (every linear layer of the text model and
  the 256 action rows of the LM head, as ``x @ W.T`` with ``W.T`` contiguous): the memory traffic that any exact
  fp32 decoder of the remaining 6 tokens pays. ``(floor_b1 + gemv6_b1) / floor_b1`` bounds ``ours_b1 / floor_b1``
  from below.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from copy import deepcopy as copy_module
from pathlib import Path

import numpy as np
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from vla.action_tokenizer import ActionTokenizer
from vla.inputs import PROMPT_TEMPLATE, build_inputs, model_inputs
from vla.model import VLAModelConfig, build_vla
from vla.parallel import set_action_head
from vla.policy import VLAPolicy
from vla.text_tokenizer import action_token_offset, build_tokenizer

INSTRUCTIONS = (
    "pick up the red cube",
    "push the blue ball into the green bowl",
    "stack the yellow block on the red cube",
    "put the green cylinder in the bowl",
)
TARGETS = {"ours_b1 / floor_b1": ("<=", 1.3), "generate_b1 / ours_b1": (">=", 2.5),
           "parallel_b1 / floor_b1": ("<=", 1.1), "generate_b1 / chunk8_b1": (">=", 8.0)}
CHUNKS = (1, 4, 8)  # K of the parallel policies


def chunk_name(K: int) -> str:
    """The case name of the parallel policy with chunks of K actions (without its batch size)."""
    return "parallel" if K == 1 else f"chunk{K}"


class ActionIdsOnly(LogitsProcessor):
    """Sets every score outside the action-token ids [lo, hi) to -inf."""

    def __init__(self, lo: int, hi: int) -> None:
        self.lo, self.hi = lo, hi

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        masked = torch.full_like(scores, float("-inf"))
        masked[:, self.lo : self.hi] = scores[:, self.lo : self.hi]
        return masked


def _setup(arch: str, batch: int, seed: int):
    tokenizer = build_tokenizer([PROMPT_TEMPLATE.format(instruction=text) for text in INSTRUCTIONS] * 10)
    torch.manual_seed(seed)
    offset = action_token_offset(tokenizer)
    states = ActionTokenizer(q01=[-1.0] * 7, q99=[1.0] * 7, token_offset=offset, absolute_dims=())
    vla = build_vla(VLAModelConfig(arch=arch), tokenizer)._replace(state_tokenizer=states)  # as SFT's default
    vla.model.eval()
    action_tokenizer = ActionTokenizer(q01=[-1.0] * 7, q99=[1.0] * 7, token_offset=offset)
    size = vla.image_processor.size["height"]
    images = np.random.default_rng(seed).integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8)
    instructions = [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(batch)]
    state = np.zeros(7, np.float32)
    observations = [{"image": img, "instruction": text, "state": state} for img, text in zip(images, instructions)]
    return vla, action_tokenizer, observations


def measure(arch: str = "fast_vlm", batch: int = 8, repeats: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """Median milliseconds per action of every case (see the module docstring) and the ratios against targets."""
    vla, action_tokenizer, observations = _setup(arch, batch, seed)
    model, lo = vla.model, action_tokenizer.token_offset
    ours = VLAPolicy(vla, action_tokenizer)
    hf_loop = VLAPolicy(vla, action_tokenizer, fast=False)
    parallel = {}  # K -> a policy over a copy of the model with the parallel head (random init, like the others)
    for K in CHUNKS:
        twin = vla._replace(model=copy_module(model))
        set_action_head(twin.model, "parallel", K)
        parallel[K] = VLAPolicy(twin, action_tokenizer)
    inputs = {
        n: model_inputs(build_inputs(vla, np.stack([o["image"] for o in observations[:n]]),
                                     [o["instruction"] for o in observations[:n]],
                                     states=np.stack([o["state"] for o in observations[:n]])))
        for n in (1, batch)
    }  # fmt: skip
    processors = LogitsProcessorList([ActionIdsOnly(lo, lo + action_tokenizer.n_bins)])
    D = action_tokenizer.action_dim

    def generate(n: int) -> torch.Tensor:
        out = model.generate(**inputs[n], max_new_tokens=D, min_new_tokens=D, do_sample=False,
                             logits_processor=processors, pad_token_id=vla.tokenizer.pad_token_id)  # fmt: skip
        return out[:, -D:]

    linears = [m for m in model.get_decoder().modules() if isinstance(m, torch.nn.Linear)]
    gemv_weights = [lin.weight.t().contiguous() for lin in linears]  # (in, out) each
    gemv_weights.append(model.get_output_embeddings().weight[lo : lo + action_tokenizer.n_bins].t().contiguous())
    vectors = {w.shape[0]: torch.randn(1, w.shape[0]) for w in gemv_weights}

    def gemv6() -> None:
        for _ in range(D - 1):
            for weight in gemv_weights:
                torch.mm(vectors[weight.shape[0]], weight)

    def chunk_cycle(policy: VLAPolicy, n: int) -> None:
        policy.reset()
        for _ in range(policy.chunks.K):
            policy.act_batch(observations[:n])

    cases: dict[str, tuple[Callable[[], object], int]] = {
        "floor_b1": (lambda: model(**inputs[1], logits_to_keep=1), 1),
        f"floor_b{batch}": (lambda: model(**inputs[batch], logits_to_keep=1), batch),
        "ours_b1": (lambda: ours.act(observations[0]), 1),
        f"ours_b{batch}": (lambda: ours.act_batch(observations), batch),
        **{f"{chunk_name(K)}_b{n}": (lambda p=policy, n=n: chunk_cycle(p, n), n * K)
           for K, policy in parallel.items() for n in (1, batch)},
        "hf_loop_b1": (lambda: hf_loop.act(observations[0]), 1),
        "generate_b1": (lambda: generate(1), 1),
        f"generate_b{batch}": (lambda: generate(batch), batch),
        "gemv6_b1": (gemv6, 1),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    with torch.inference_mode():
        for round_ in range(warmup + repeats):
            for name, (run, n) in cases.items():
                start = time.perf_counter()
                run()
                if round_ >= warmup:
                    times[name].append((time.perf_counter() - start) * 1e3 / n)
        _, info = ours.act_batch(observations)
        same_tokens = torch.equal(generate(batch).cpu(), torch.from_numpy(info["token_ids"]))
    ms = {name: round(statistics.median(values), 2) for name, values in times.items()}
    ratios = {
        "ours_b1 / floor_b1": ms["ours_b1"] / ms["floor_b1"],
        "generate_b1 / ours_b1": ms["generate_b1"] / ms["ours_b1"],
        f"generate_b{batch} / ours_b{batch}": ms[f"generate_b{batch}"] / ms[f"ours_b{batch}"],
        f"ours_b{batch} / ours_b1": ms[f"ours_b{batch}"] / ms["ours_b1"],
        "hf_loop_b1 / ours_b1": ms["hf_loop_b1"] / ms["ours_b1"],
        "(floor_b1 + gemv6_b1) / floor_b1": (ms["floor_b1"] + ms["gemv6_b1"]) / ms["floor_b1"],
        "parallel_b1 / floor_b1": ms["parallel_b1"] / ms["floor_b1"],
        f"parallel_b{batch} / floor_b{batch}": ms[f"parallel_b{batch}"] / ms[f"floor_b{batch}"],
        **{f"{peer}_b{n} / {chunk_name(K)}_b{n}": ms[f"{peer}_b{n}"] / ms[f"{chunk_name(K)}_b{n}"]
           for peer in ("generate", "ours") for n in (1, batch) for K in CHUNKS},
    }
    return {
        "arch": arch,
        "torch_threads": torch.get_num_threads(),
        "prompt_tokens": int(inputs[1]["input_ids"].shape[1]),
        "repeats": repeats,
        "ms_per_action": ms,
        "ratios": {name: round(value, 2) for name, value in ratios.items()},
        "targets": {name: f"{op} {bound}" for name, (op, bound) in TARGETS.items()},
        "greedy_tokens_equal_generate": same_tokens,
        "decoder": "lean" if ours.fallback_reason is None else f"hf ({ours.fallback_reason})",
    }


def format_table(result: dict) -> str:
    header = (f"{result['arch']}, {result['prompt_tokens']} prompt tokens, {result['torch_threads']} threads, "
              f"median of {result['repeats']} rounds")  # fmt: skip
    lines = [header]
    lines += [f"  {name:<16} {value:8.2f} ms/action" for name, value in result["ms_per_action"].items()]
    for name, value in result["ratios"].items():
        target = result["targets"].get(name, "")
        lines.append(f"  {name:<34} {value:6.2f}  {'target ' + target if target else ''}")
    lines.append(f"  greedy tokens equal generate's: {result['greedy_tokens_equal_generate']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="JSON file to write")
    parser.add_argument("--arch", default="fast_vlm", choices=["fast_vlm", "llava", "paligemma"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    result = measure(arch=args.arch, batch=args.batch, repeats=args.repeats, warmup=args.warmup)
    print(format_table(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
