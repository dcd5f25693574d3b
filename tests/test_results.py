"""`qmllm report`: docs/results.md and the README's headline table are written from metrics/, and the
committed ones are what the committed metrics give (the docs never drift from the measurements)."""

import shutil
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT
from qmllm_pipeline.results import HEADLINE_END, HEADLINE_START, headline_table, load_metrics, results_markdown


def test_committed_docs_are_written_from_the_committed_metrics():
    metrics = load_metrics(PROJECT_ROOT / "metrics")
    assert {"world_summary", "foundation", "pretrain", "finetune", "safety_map", "evaluate"} <= set(metrics)
    assert set(metrics) <= {"world_summary", "foundation", "pretrain", "finetune", "safety_map", "evaluate", "seeds"}
    assert (PROJECT_ROOT / "docs" / "results.md").read_text() == results_markdown(metrics), \
        "docs/results.md is stale: run `qmllm report`"
    readme = (PROJECT_ROOT / "README.md").read_text()
    block = readme[readme.index(HEADLINE_START) + len(HEADLINE_START):readme.index(HEADLINE_END)]
    assert block.strip() == headline_table(metrics).strip(), "README's headline table is stale: run `qmllm report`"


def test_qmllm_report_writes_both_and_refuses_bad_input(tmp_path):
    metrics = tmp_path / "metrics"
    shutil.copytree(PROJECT_ROOT / "metrics", metrics)
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{HEADLINE_START}\nold\n{HEADLINE_END}\noutro\n")
    command = [sys.executable, "-m", "qmllm_pipeline.commands", "report", "--metrics", str(metrics),
               "--out", str(tmp_path / "docs" / "results.md"), "--readme", str(readme)]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("outro\n") and "old" not in text
    # the headline is the seed table when a sweep was aggregated, else the last run's per system
    headline = "| figure | mean [min, max] |" if (metrics / "seeds.json").exists() else "| qmllm |"
    assert headline in text and "## Evaluation" in (tmp_path / "docs" / "results.md").read_text()
    (metrics / "seeds.json").unlink(missing_ok=True)
    assert subprocess.run(command, capture_output=True, text=True).returncode == 0
    assert "| qmllm |" in readme.read_text()

    (metrics / "evaluate.json").write_text("{broken")
    broken = subprocess.run(command, capture_output=True, text=True)
    assert broken.returncode == 1 and "evaluate.json: not valid JSON" in broken.stderr
    assert "Traceback" not in broken.stderr
    empty = subprocess.run([*command[:5], str(tmp_path / "nothing"), *command[6:]], capture_output=True, text=True)
    assert empty.returncode == 1 and "no metrics files" in empty.stderr


@pytest.mark.parametrize("missing", ["evaluate", "foundation"])
def test_the_report_covers_what_there_is(missing):
    metrics = {k: v for k, v in load_metrics(PROJECT_ROOT / "metrics").items() if k != missing}
    text = results_markdown(metrics)
    assert ("## Evaluation" in text) == (missing != "evaluate")
    assert ("## Foundation" in text) == (missing != "foundation")
