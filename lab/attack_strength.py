"""Measure the per-instruction attack (white-box on the trained baseline by default, or any configured
attacker) at more budget or another objective: steps, restarts, first step size, target tokens, objective
(issue 19's eps-32 goal). Reads what `kedro run` wrote and changes none of
it: the table is printed and saved to --out. Each setting is a JSON object of `evaluate.per_instruction`
keys (steps, restarts, step_size, schedule, momentum, batch_size, objective, kappa, stop_on,
check_every) and `target_tokens`. Example (the default
attack, then the `full` profile's):

    python lab/attack_strength.py --eps 32 --settings '[{}, {"steps": 500, "restarts": 3}]'
"""

from __future__ import annotations

from common import PROJECT, json_settings, notebook_parser


def main() -> None:
    parser = notebook_parser(__doc__, PROJECT, "attack_strength.csv",
                             "CSV written (via a temporary file) with one row per setting and budget")
    parser.add_argument("--eps", default="32", help="comma list of budgets in 1/255 (default: 32)")
    parser.add_argument("--settings", type=json_settings, default='[{}, {"steps": 500, "restarts": 3}]',
                        help="JSON list of settings; {} is the configured attack (default: it and full's)")
    parser.add_argument("--attacker", default="baseline_whitebox_per_instruction",
                        help="a per_instruction entry of evaluate.attackers (default: "
                             "baseline_whitebox_per_instruction; qmllm_adaptive_per_instruction: BPDA on qmllm)")
    args = parser.parse_args()
    budgets = [int(eps) for eps in args.eps.split(",")]

    # the project is imported only now: --help stays quick and quiet
    from common import project_context, write_table
    from experiments.attack_strength import attack_strength, evaluation_setup

    with project_context(PROJECT, args.env) as context:
        params = context.params
        setup = evaluation_setup(context.catalog.load, params)
        table = attack_strength(setup, params, args.settings, budgets, args.attacker)
    write_table(table, args.out)


if __name__ == "__main__":
    main()
