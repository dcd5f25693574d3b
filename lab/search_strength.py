"""Measure the code-space bound on qmllm under a stronger search than the default evaluation's: every code at
every position (`"candidates": null`), a wider beam, more sweeps (issue 19: is a zero bound the model's, or the
default search's?). Reads what `kedro run` wrote and changes none of it: the table is printed and saved to
--out. Each setting is a JSON object of `evaluate.code_search` keys (instructions, names, sweeps, beam_width,
candidates, batch_size, objective, kappa); every search begins from the clean image's codes. Example (the
default search, then every code at every position; about 12 minutes on 2 cores for the second):

    python lab/search_strength.py --settings '[{}, {"candidates": null}]'
"""

from __future__ import annotations

from common import PROJECT, json_settings, notebook_parser


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "search_strength.csv",
                             "CSV written (via a temporary file) with one row per setting")
    parser.add_argument("--settings", type=json_settings, default='[{}, {"candidates": null}]',
                        help="JSON list of settings; {} is the configured search (default: it, then exhaustive)")
    args = parser.parse_args()

    # the project is imported only now: --help stays quick and quiet
    from common import project_context, write_table
    from experiments.attack_strength import evaluation_setup, search_strength

    with project_context(PROJECT, args.env) as context:
        params = context.params
        table = search_strength(evaluation_setup(context.catalog.load, params), params, args.settings)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
