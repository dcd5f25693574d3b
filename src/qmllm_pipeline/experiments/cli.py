"""The command line the `notebooks/*.py` sweep scripts share: `--env` (the Kedro environment whose run is read)
and `--out` (the table written under data/08_reporting/), and the argument types for comma lists and JSON
settings. It imports nothing heavy, so each script's `--help` stays quick: the project is imported only
after the arguments are parsed."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path


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
