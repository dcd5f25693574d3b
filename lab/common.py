"""What the lab's scripts share: the command line (`--env`, the Kedro environment whose run is read; `--out`,
the table written under data/08_reporting/; comma lists and JSON settings), the trained run's Kedro context,
and writing a table. Nothing heavy is imported at the top, so each script's `--help` stays quick: the project
is imported only after the arguments are parsed."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]


def notebook_parser(doc: str, project: Path, out: str, out_help: str,
                    env_help: str = "Kedro environment to read (default: base)") -> argparse.ArgumentParser:
    """A parser with the script's docstring as its description, `--env` and `--out` (default
    `project`/data/08_reporting/`out`); the script adds its own arguments."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="base", help=env_help)
    parser.add_argument("--out", type=Path, default=project / "data/08_reporting" / out, help=out_help)
    return parser


def comma_list(kind: Callable) -> Callable[[str], list]:
    """An argparse type: "a,b,c" -> [kind("a"), kind("b"), kind("c")]."""
    return lambda text: [kind(item) for item in text.split(",")]


def json_settings(text: str) -> list[dict]:
    """An argparse type: a JSON list of objects, each one setting of a sweep ({} is the configured one)."""
    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error})") from None
    if not isinstance(settings, list) or not all(isinstance(s, dict) for s in settings):
        raise argparse.ArgumentTypeError("expected a JSON list of objects, e.g. '[{}, {\"steps\": 500}]'")
    return settings


@contextmanager
def project_context(project: Path, env: str = "base") -> Iterator:
    """The Kedro context of the project at `project` in environment `env` ("base": no overlay), for the
    notebooks' experiment scripts: its `catalog` loads the trained run's datasets, `params` its parameters.
    Kedro is imported here, so a script's `--help` stays quick."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project, env=None if env == "base" else env) as session:
        yield session.load_context()


def write_table(table, out: Path) -> None:
    """Write a sweep's table (a DataFrame) to the CSV `out` through a temporary file, so an interrupted
    write never leaves a half file over an earlier result, then print it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = out.with_suffix(".tmp")
    table.to_csv(scratch, index=False)
    os.replace(scratch, out)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"written to {out}")
