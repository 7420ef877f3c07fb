"""Run a suite manifest with any policy, in parallel worker processes, resumably; one JSON line per episode.

Each worker builds its environments and its policy once (the policy from a picklable `factory(env) -> policy`)
and runs fixed groups of consecutive manifest episodes in lockstep, the policy batched across them where it
allows, with one torch thread (local processes or Ray actors: ``tasks.parallel``); a group's results depend only on the manifest, so the same metrics come out for
any number of workers (tested). Finished episodes are appended to
`episodes.jsonl`; a rerun skips them. An optional picklable ``monitor(env)`` gives each episode a fresh monitor of its
actions (``tasks.rollout.rollout_batch``), e.g. stop-and-ask (``tasks.calibration.StopAndAsk``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import imageio.v3 as iio
import numpy as np
from PIL import Image
from tqdm import tqdm

from store.files import atomic_write
from tasks import make_env
from tasks.calibration import episode_stats
from tasks.parallel import worker_pool
from tasks.rollout import rollout_batch

RESULTS_FILE = "episodes.jsonl"


class _Worker:
    def __init__(self, factory: Callable, image_size: int, out_dir: str, monitor: Callable | None = None):
        self.factory, self.image_size, self.out_dir, self.monitor = factory, image_size, Path(out_dir), monitor
        self.envs: dict = {}

    def env(self, task: str, slot: int):
        if (task, slot) not in self.envs:
            self.envs[task, slot] = make_env(task, image_size=self.image_size, render_mode="rgb_array")
        return self.envs[task, slot]

    def run(self, chunk: list[tuple[dict, bool]]) -> list[dict]:
        """One batch of episodes run in lockstep (the policy acts on all of them in one call where it can)."""
        envs = [self.env(e["task"], j) for j, (e, _) in enumerate(chunk)]
        monitors = [self.monitor(env) if self.monitor else None for env in envs]
        rollouts = rollout_batch(
            envs, [self.factory(env) for env in envs], [e["seed"] for e, _ in chunk],
            [dict(e["options"]) for e, _ in chunk], record_video=[record for _, record in chunk], monitors=monitors,
        )
        rows = []
        for (episode, record), env, r, monitor in zip(chunk, envs, rollouts, monitors):
            video = None
            if record:
                video = f"videos/{episode['id'].replace('/', '_')}.gif"
                write_gif(r.frames, self.out_dir / video, fps=env.metadata["render_fps"])
                write_mp4(r.frames, (self.out_dir / video).with_suffix(".mp4"), fps=env.metadata["render_fps"])
            rows.append({
                **{k: episode[k] for k in ("id", "task", "axis", "seed")},
                "instruction": r.instruction,
                "success": r.success,
                "other_success": r.other_success,
                "steps": r.steps,
                "max_steps": env.task.max_steps,
                "safety": r.safety,
                "error": r.error,
                "confidence": r.confidence,
                "step_confidence": [float(i["confidence"]) for i in r.step_info if "confidence" in i],
                "step_motion": [float(np.linalg.norm(a[:3])) for a in r.actions],
                "step_stats": episode_stats(r.step_info),  # token statistics for tasks.calibration, or None
                "abstained": r.abstained,
                "abstain_probability": monitor.probability if r.abstained else None,
                "video": video,
            })
        return rows


_worker: _Worker | None = None  # one per worker process, built by the pool initializer


def _init(factory: Callable, image_size: int, out_dir: str, monitor: Callable | None = None) -> None:
    global _worker
    import torch

    torch.set_num_threads(1)
    _worker = _Worker(factory, image_size, out_dir, monitor)


def _run(chunk: list[tuple[dict, bool]]) -> list[dict]:
    return _worker.run(chunk)


def write_gif(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """Frames (H, W, 3) uint8 -> an animated GIF, written atomically."""
    images = [Image.fromarray(f) for f in frames]
    atomic_write(path, lambda p: images[0].save(p, format="GIF", save_all=True, append_images=images[1:],
                                                duration=int(1000 / fps), loop=0))


def write_mp4(frames: list[np.ndarray], path: Path, fps: int) -> None:
    """Frames (H, W, 3) uint8 -> an H.264 MP4 (yuv420p, which browsers play), written atomically by the ffmpeg that
    the imageio-ffmpeg wheel ships. An odd height or width gains one repeated row or column (H.264 needs even)."""
    video = np.stack(frames)  # (T, H, W, 3)
    video = np.pad(video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)), mode="edge")
    atomic_write(path, lambda tmp: iio.imwrite(tmp, video, plugin="FFMPEG", extension=".mp4", fps=fps, codec="libx264",
                                               pixelformat="yuv420p", macro_block_size=1,
                                               output_params=["-f", "mp4"]))  # tmp's name does not end in .mp4


def load_results(out_dir: Path) -> dict[str, dict]:
    """Finished episodes by id; a line cut short by a crash is ignored (that episode runs again)."""
    path = Path(out_dir) / RESULTS_FILE
    results = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            results[row["id"]] = row
    return results


def evaluate_manifest(
    manifest: dict, factory: Callable, out_dir: str | Path, *, workers: int = 1, videos: int = 0, image_size: int = 96,
    batch: int = 8, desc: str = "eval", backend: str = "local", monitor: Callable | None = None,
) -> list[dict]:
    """Run every episode of `manifest` not yet in `out_dir`, then return all results in manifest order.

    Episodes are grouped into runs of `batch` consecutive manifest entries (fixed by the manifest, not by the
    number of workers); each group runs in lockstep in one worker."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = load_results(out_dir)
    episodes = manifest["episodes"]
    record = {e["id"] for e in episodes[:: max(1, len(episodes) // videos)][:videos]} if videos else set()
    todo = [(e, e["id"] in record) for e in episodes if e["id"] not in done]
    chunks = [todo[i : i + batch] for i in range(0, len(todo), batch)]
    if chunks:
        setup = (factory, image_size, str(out_dir), monitor)
        with worker_pool(backend, workers, _init, setup, inline=False) as run_jobs, \
                open(out_dir / RESULTS_FILE, "a") as sink, \
                tqdm(total=len(episodes), initial=len(done), desc=desc, unit="ep") as bar:
            wins = sum(r["success"] for r in done.values())
            for rows in run_jobs(_run, chunks):
                for row in rows:
                    sink.write(json.dumps(row) + "\n")
                    done[row["id"]] = row
                    wins += row["success"]
                sink.flush()
                bar.set_postfix(success=f"{wins / len(done):.0%}", refresh=False)
                bar.update(len(rows))
    return [done[e["id"]] for e in episodes]
