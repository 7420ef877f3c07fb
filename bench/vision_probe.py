"""Can a vision tower learn where things are from this little data? Stand-alone probes on a demo dataset.

    python scripts/generate_demos.py task=reach num_episodes=400 distractors=0 output_dir=data/reach0
    python bench/vision_probe.py data/reach0 [--steps 400] [--out bench/vision_probe.json]

Each probe maps the front image to the dx and dy action tokens (256 bins each, the checkpoint's tokenizer
contract) with a small head, trained from scratch with AdamW (lr 3e-4, batch 16, one thread), and reports the
validation L1 of the decoded dx / dy (cm) every 100 steps, next to what predicting the training median gives.
Every tenth episode is held out. With one object and no distractors, no language is needed: a tower that cannot
get below the median here cannot steer a policy to an object.

Probes: ``cnn`` (4 strided 3x3/5x5 convs + flatten + MLP), ``cnn_onehot`` (the same with one-hot targets),
``vit`` (the Llava tower: SigLIP, 4 layers, 192 wide, 16 px patches, 2-D sin-cos positions; flatten + MLP),
``resnet`` (the FastVLM tower: HF ResNetModel, 3 stages; flatten + MLP), ``resnet_mean`` (mean-pooled instead,
so that position must be carried by the features, as when the LM reads the tokens) and ``resnet_state`` (flatten,
plus the proprio state scaled to [-1, 1] by its q01/q99: the tip's start is randomized, so where the gripper is
must be known too).

With distractors the image alone is ambiguous; two probes also read the instruction (a bag of its words, 64-d):
``resnet_text`` appends it to the flattened features and the state (late fusion, as an LM reading image tokens
and then the question), ``resnet_film`` also lets it scale and shift every ResNet stage's channels (FiLM, RT-1's
early fusion; zero-initialised, so it starts as ``resnet_text``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import ResNetConfig, ResNetModel, SiglipVisionConfig, SiglipVisionModel

from store.lerobot import LeRobotDataset
from vla.action_tokenizer import ActionTokenizer
from vla.model import sincos_2d

PROBES = ("cnn", "cnn_onehot", "vit", "resnet", "resnet_mean", "resnet_state", "resnet_text", "resnet_film")
TEXT_DIM = 64


class Probe(nn.Module):
    def __init__(self, kind: str, vocab: int = 1):
        super().__init__()
        self.kind = kind
        if kind.startswith("cnn"):
            self.tower = nn.Sequential(
                nn.Conv2d(3, 32, 5, 2, 2), nn.ReLU(), nn.Conv2d(32, 64, 3, 2, 1), nn.ReLU(),
                nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU(), nn.Conv2d(64, 64, 3, 2, 1), nn.ReLU())
            width = 64
        elif kind == "vit":
            self.tower = SiglipVisionModel(SiglipVisionConfig(hidden_size=192, intermediate_size=768, num_hidden_layers=4,
                                                              num_attention_heads=3, image_size=96, patch_size=16))
            with torch.no_grad():
                self.tower.embeddings.position_embedding.weight.copy_(sincos_2d(6, 192))
            width = 192
        else:
            self.tower = ResNetModel(ResNetConfig(num_channels=3, embedding_size=48, hidden_sizes=[48, 96, 192],
                                                  depths=[1, 1, 1], layer_type="basic",
                                                  downsample_in_first_stage=False))
            width = 192
        cells = 1 if kind == "resnet_mean" else 36  # a 6x6 map from 96 px for every tower
        self.reads_text = kind in ("resnet_text", "resnet_film")
        self.reads_state = self.reads_text or kind == "resnet_state"
        extra = 7 * self.reads_state  # the proprio state, scaled to [-1, 1] by its q01/q99
        if self.reads_text:
            self.words = nn.EmbeddingBag(vocab + 1, TEXT_DIM, mode="mean", padding_idx=vocab)  # the mean skips pads
            extra += TEXT_DIM
        if kind == "resnet_film":
            self.film = nn.ModuleList(nn.Linear(TEXT_DIM, 2 * c) for c in (48, 96, 192))
            for stage, film in zip(self.tower.encoder.stages, self.film):
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)
                stage.register_forward_hook(self._modulate(film))
        self.head = nn.Sequential(nn.Linear(cells * width + extra, 256), nn.GELU(), nn.Linear(256, 2 * 256))

    def _modulate(self, film: nn.Linear):
        def hook(module, args, out):
            gamma, beta = film(self._text).chunk(2, dim=1)  # (B, C) each
            return out * (1 + gamma[..., None, None]) + beta[..., None, None]
        return hook

    def forward(self, x: torch.Tensor, state: torch.Tensor, words: torch.Tensor | None = None) -> torch.Tensor:
        if words is not None:
            self._text = self.words(words)  # (B, TEXT_DIM), read by the FiLM hooks
            state = torch.cat([state, self._text], dim=1)
        if self.kind.startswith("cnn"):
            h = self.tower(x).flatten(1)
        elif self.kind == "vit":
            h = self.tower(pixel_values=x).last_hidden_state.flatten(1)
        else:
            h = self.tower(x).last_hidden_state  # (B, C, 6, 6)
            h = h.mean((2, 3)) if self.kind == "resnet_mean" else h.flatten(1)
            if self.reads_state:
                h = torch.cat([h, state], dim=1)
        return self.head(h).view(-1, 2, 256).log_softmax(-1)


def run(root: str, kind: str, steps: int, sigma: float = 4.0, seed: int = 0) -> list[dict]:
    torch.manual_seed(seed)
    ds = LeRobotDataset(root)
    items = [ds[i] for i in range(len(ds))]
    images = np.stack([item["image"] for item in items])
    actions = ds.columns["action"][:, :2].astype(np.float32)
    episodes = ds.columns["episode_index"]
    paired = ds.info["tabletop_vla"]["config"].get("paired", False)  # hold out both demos of a scene
    val = episodes // (1 + paired) % 10 == 0
    q = np.quantile(actions[~val], [0.01, 0.99], axis=0)
    tok = ActionTokenizer(q[0], q[1], token_offset=0, n_bins=256, absolute_dims=())
    bins = torch.from_numpy(tok.encode(actions))
    states = ds.columns["observation.state"]
    s = torch.from_numpy(ActionTokenizer.fit(states[~val], 0, absolute_dims=()).normalize(states)[0]).float()
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - 0.5) / 0.5
    texts = [item["instruction"].lower().split() for item in items]
    vocab = {w: n for n, w in enumerate(sorted({w for t in texts for w in t}))}
    pad, width = len(vocab), max(len(t) for t in texts)
    words = torch.tensor([[vocab[w] for w in t] + [pad] * (width - len(t)) for t in texts])
    median_l1 = np.abs(actions[val] - np.median(actions[~val], axis=0)).mean(0) * 100
    train_idx = np.flatnonzero(~val)
    model = Probe(kind, len(vocab))
    reads_text = model.reads_text
    opt = torch.optim.AdamW(model.parameters(), 3e-4)
    grid = torch.arange(256).float()
    rng = np.random.default_rng(seed)
    out = []
    for step in range(1, steps + 1):
        i = torch.from_numpy(rng.choice(train_idx, 16))
        logp = model(x[i], s[i], words[i] if reads_text else None)
        if kind == "cnn_onehot" or sigma <= 0:
            loss = nn.functional.nll_loss(logp.flatten(0, 1), bins[i].flatten())
        else:
            target = torch.exp(-0.5 * ((grid - bins[i][..., None].float()) / sigma) ** 2)
            loss = -(target / target.sum(-1, keepdim=True) * logp).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0:
            model.eval()
            with torch.no_grad():
                xv, sv, wv = x[val], s[val], words[val] if reads_text else None
                pred = torch.cat([model(xv[j : j + 256], sv[j : j + 256], None if wv is None else wv[j : j + 256])
                                  .argmax(-1) for j in range(0, len(xv), 256)])
            model.train()
            l1 = np.abs(tok.decode(pred.numpy()) - actions[val]).mean(0) * 100
            out.append({"step": step, "dx_cm": round(float(l1[0]), 3), "dy_cm": round(float(l1[1]), 3),
                        "median_dx_cm": round(float(median_l1[0]), 3), "median_dy_cm": round(float(median_l1[1]), 3)})
            print(kind, out[-1], flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--probes", nargs="*", choices=PROBES, default=list(PROBES))
    parser.add_argument("--out", default="bench/vision_probe.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = {kind: run(args.dataset, kind, args.steps) for kind in args.probes}
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
