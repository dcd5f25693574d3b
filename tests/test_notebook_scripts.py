"""The sweep scripts in notebooks/: their shared command line (experiments/cli.py) and a quick --help each."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from qmllm_pipeline.experiments.cli import comma_list, json_settings, notebook_parser

SCRIPTS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.py"))


def test_the_shared_arguments_and_types(tmp_path):
    parser = notebook_parser("doc", tmp_path, "table.csv", "the table")
    parser.add_argument("--settings", type=json_settings, default="[{}]")
    parser.add_argument("--k", type=comma_list(int), default=[1])
    args = parser.parse_args([])
    assert (args.env, args.out, args.settings, args.k) == ("base", tmp_path / "data/08_reporting/table.csv", [{}], [1])
    args = parser.parse_args(["--env", "full", "--settings", '[{"steps": 5}, {}]', "--k", "3,4"])
    assert (args.env, args.settings, args.k) == ("full", [{"steps": 5}, {}], [3, 4])
    for bad, message in (('{"steps": 5}', "JSON list of objects"), ("[{", "not JSON"), ("[1]", "JSON list of objects")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            json_settings(bad)


@pytest.mark.parametrize("script", SCRIPTS, ids=[script.name for script in SCRIPTS])
def test_each_script_explains_itself_without_loading_the_project(script):
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "--env" in done.stdout and "--out" in done.stdout
    probe = (f"import runpy, sys; sys.argv = [{str(script)!r}, '--help']\n"
             "try:\n    runpy.run_path(sys.argv[0], run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "assert 'kedro' not in sys.modules and 'torch' not in sys.modules, 'imported before parsing'")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
