"""The Ray backend (a local Ray instance with 2 workers) gives the same demos, evaluation rows and preference data as
the local backend for the same arguments."""

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

from harness.policies import PolicySpec
from store.errors import UsageError
from tasks.demos import DemoConfig, generate
from tasks.evaluation import evaluate_manifest
from tasks.parallel import check_backend, init_ray, worker_pool
from tasks.suites import build_manifest

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'tabletop-vla[ray]'); backend=ray untested")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_cluster():
    init_ray(2)
    # Ray sends functions by name, and a test module is not importable in its workers: send this one's by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted((root / "data").rglob("*.parquet")) + sorted((root / "meta").rglob("*")):
        if p.is_file():
            h.update(p.relative_to(root).as_posix().encode() + p.read_bytes())
    return h.hexdigest()


def _square(x: int) -> tuple[int, int]:
    return x * x, os.getpid()


def test_ray_pool_runs_every_job_on_two_actors(ray_cluster):
    with worker_pool("ray", 2) as run_jobs:
        results = list(run_jobs(_square, range(12)))
    assert sorted(r for r, _ in results) == [x * x for x in range(12)]
    pids = {pid for _, pid in results}
    assert len(pids) == 2 and all(pid != os.getpid() for pid in pids)


def test_ray_demos_equal_local_demos(ray_cluster, tmp_path):
    base = dict(task="reach,pick", num_episodes=2, workers=2, image_size=48)
    generate(DemoConfig(**base, backend="local", output_dir=str(tmp_path / "local")))
    generate(DemoConfig(**base, backend="ray", output_dir=str(tmp_path / "ray")))
    assert _digest(tmp_path / "local") == _digest(tmp_path / "ray")


def test_ray_evaluation_equals_local(ray_cluster, tmp_path):
    manifest = build_manifest("safety", 2, ["reach", "push"])
    run = dict(workers=2, image_size=48, batch=2)
    local = evaluate_manifest(manifest, PolicySpec("random"), tmp_path / "local", backend="local", **run)
    remote = evaluate_manifest(manifest, PolicySpec("random"), tmp_path / "ray", backend="ray", **run)
    assert len(local) == len(manifest["episodes"]) == 4
    assert json.dumps(local, sort_keys=True) == json.dumps(remote, sort_keys=True)


def test_unknown_backend_is_refused():
    with pytest.raises(UsageError, match="backend='spark' is not one of local, ray"):
        check_backend("spark")
    with pytest.raises(UsageError, match="backend='spark'"):
        DemoConfig(backend="spark")
