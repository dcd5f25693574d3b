"""The lab's sweep scripts (lab/*.py): run as a user runs them, never imported (the lab is research code outside
the package). Each explains itself without loading the project, and refuses bad arguments as a usage error."""

import subprocess
import sys
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "lab"
SCRIPTS = sorted(path for path in LAB.glob("*.py") if path.name != "common.py")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.name for script in SCRIPTS])
def test_each_script_explains_itself_without_loading_the_project(script):
    done = _run(str(script), "--help")
    assert done.returncode == 0, done.stderr
    assert "--env" in done.stdout and "--out" in done.stdout
    probe = (f"import runpy, sys; sys.path.insert(0, {str(LAB)!r}); sys.argv = [{str(script)!r}, '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "assert 'kedro' not in sys.modules and 'torch' not in sys.modules, 'imported before parsing'")
    done = _run("-c", probe)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("bad, message", [('{"steps": 5}', "JSON list of objects"), ("[{", "not JSON"),
                                          ("[1]", "JSON list of objects")])
def test_bad_settings_are_a_usage_error(bad, message):
    done = _run(str(LAB / "attack_strength.py"), "--settings", bad)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    done = _run(str(LAB / "safety_signal_limits.py"), "--k", "1,x")
    assert done.returncode == 2 and "--k" in done.stderr, done.stderr
