"""The local process pool: every job runs, and the workers exit cleanly (no "leaked semaphore" warning)."""

import os
import subprocess
import sys
import textwrap
import time
from multiprocessing.util import Finalize
from pathlib import Path

import pytest

from tasks.parallel import worker_pool

# A worker that draws a progress bar makes tqdm's lock, a named semaphore (transformers' loading bar does it in an
# evaluation worker). A killed worker never unlinks it, and Python's resource_tracker warns at shutdown.
SCRIPT = textwrap.dedent('''
    import io
    from tqdm import tqdm
    from tasks.parallel import worker_pool

    def draw_a_bar():
        for _ in tqdm(range(2), file=io.StringIO()):
            pass

    def square(x):
        return x * x

    if __name__ == "__main__":
        with worker_pool("local", 2, draw_a_bar) as run_jobs:
            print(sorted(run_jobs(square, range(6))))
''')


def _triple(x: int) -> int:
    return 3 * x


def _mark_clean_exit(folder: str) -> None:
    """Initializer: leave a file named by this worker's pid when it exits normally (running its exit handlers)."""
    Finalize(None, Path(folder, str(os.getpid())).touch, exitpriority=0)


def _pid_after_a_while(_: int) -> int:
    time.sleep(0.1)
    return os.getpid()


def test_local_pool_runs_every_job():
    with worker_pool("local", 2, inline=False) as run_jobs:
        assert sorted(run_jobs(_triple, range(8))) == [3 * x for x in range(8)]


def test_local_pool_workers_exit_normally(tmp_path):
    # A killed worker skips its exit handlers, which unlink the semaphores it made.
    with worker_pool("local", 2, _mark_clean_exit, (str(tmp_path),), inline=False) as run_jobs:
        pids = {str(pid) for pid in run_jobs(_pid_after_a_while, range(4))}
    markers = {p.name for p in tmp_path.iterdir()}
    assert len(markers) == 2 and pids <= markers


def test_local_pool_leaks_no_semaphore(tmp_path):
    script = tmp_path / "pool.py"
    script.write_text(SCRIPT)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "[0, 1, 4, 9, 16, 25]\n"
    assert "leaked" not in proc.stderr and "resource_tracker" not in proc.stderr, proc.stderr


def test_local_pool_stops_its_workers_on_error():
    with pytest.raises(RuntimeError, match="stop"), worker_pool("local", 2, inline=False) as run_jobs:
        next(iter(run_jobs(_triple, range(4))))
        raise RuntimeError("stop")
