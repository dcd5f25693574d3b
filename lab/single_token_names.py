"""Stage 1 and stage 2 with every catalogue name a single token of the LLM's vocabulary.

Grows the shipped tokenizer and LLM by the multi-piece names (each new embedding the mean of its pieces'),
then runs the pretrain and finetune pipelines' own nodes in memory on the trained project's features, and
writes the stage-2 metrics (naming, count, colour, captions, safety) as JSON. About as long as those two
pipelines in a default run. Examples:

    python lab/single_token_names.py
    python lab/single_token_names.py --set pretrain.name_head.slots=0    # the paper's recipe
"""

from __future__ import annotations

import json
import os

import yaml
from common import PROJECT, notebook_parser


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "single_token_names.json", "JSON written (via a temporary file)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a parameter override, dotted key and YAML value (repeatable)")
    parser.add_argument("--seed", type=int, default=None, help="the run-wide seed (default: the configured one)")
    args = parser.parse_args()

    # the project is imported only now: --help stays quick and quiet
    from common import project_context
    from experiments.single_token_names import INPUTS, single_token_names

    from qmllm_pipeline.dotted import with_overrides

    overrides = {}
    for setting in args.set:
        key, _, value = setting.partition("=")
        overrides[key] = yaml.safe_load(value)
    with project_context(PROJECT, args.env) as context:
        params = with_overrides(context.params, **overrides)
        if args.seed is not None:
            params = with_overrides(params, seed=args.seed)
        inputs = {name: context.catalog.load(name) for name in INPUTS}
        result = {"overrides": overrides, "seed": params["seed"], **single_token_names(inputs, params)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    scratch = args.out.with_suffix(".tmp")
    scratch.write_text(json.dumps(result, indent=2, default=str) + "\n")
    os.replace(scratch, args.out)
    finetuned = result["finetune"]
    for system in ("qmllm", "baseline"):
        print(system, "utility", finetuned[system]["utility"], "naming", finetuned[system]["naming"]["all"],
              "safety", finetuned[system]["safety"])
    print(f"{result['tokens_added']} names added; {result['seconds']:.0f} s; written to {args.out}")


if __name__ == "__main__":
    main()
