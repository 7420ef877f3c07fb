"""PyBullet's C-level chatter is silenced, and a physics client left open at exit is closed without a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

from sim.bullet import Bullet
from sim.quiet import quiet

REPO = Path(__file__).resolve().parents[2]


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)


def test_importing_and_connecting_prints_nothing():
    proc = python("from sim.bullet import Bullet\nfor _ in range(3):\n    Bullet().close()\nprint('done')")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "done\n"
    assert proc.stderr == ""


def test_quiet_drops_c_output_and_restores_the_descriptors_even_on_error():
    code = (
        "import ctypes, sys\n"
        "from sim.quiet import quiet\n"
        "libc = ctypes.CDLL(None)\n"
        "try:\n"
        "    with quiet(1, 2):\n"
        "        libc.printf(b'hidden-out\\n')\n"
        "        libc.dprintf(2, b'hidden-err\\n')\n"
        "        raise KeyError('boom')\n"
        "except KeyError:\n"
        "    pass\n"
        "libc.printf(b'shown-out\\n')\n"
        "libc.fflush(None)\n"
        "print('shown-err', file=sys.stderr)\n"
    )
    proc = python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "shown-out\n"
    assert proc.stderr == "shown-err\n"


def test_quiet_keeps_python_exceptions():
    with pytest.raises(ValueError, match="still raised"), quiet(1):
        raise ValueError("still raised")


def test_close_is_idempotent():
    world = Bullet()
    world.close()
    world.close()
    assert world.client._client < 0


def test_a_client_alive_until_module_teardown_exits_cleanly():
    # An env held by a module global (a worker's env cache, say) is freed only when modules are torn down, when
    # BulletClient.__del__ fails with "Exception ignored ... TypeError"; a global of pybullet itself goes last.
    proc = python("from tasks import make_env\nimport pybullet\npybullet.zz_env = make_env('reach')")
    assert proc.returncode == 0
    assert proc.stdout == "" and proc.stderr == ""
