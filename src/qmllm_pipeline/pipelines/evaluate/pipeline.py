from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.parameters import budgets, load_parameters, variants
from qmllm_pipeline.pipelines.evaluate import attacks, bound, overhead, report, systems, utility
from qmllm_pipeline.pipelines.shared import safeclip_nodes

SHARED = {"evaluation_systems", "jailbreak_instructions", "jailbreak_start"}


def _jailbreak(budget: str) -> Pipeline:
    """One budget's jailbreak (namespace `jailbreak_<budget>`): every attacker of `evaluate.attackers` crafts its
    images and each is judged on the held-out harmful instructions."""
    template = Pipeline([Node(attacks.jailbreak_budget, ["evaluation_systems", "jailbreak_instructions",
                                                         "jailbreak_start", "params:evaluate", "params:budget",
                                                         "params:seed"], "jailbreak_results", name="jailbreak")])
    return pipeline(template, namespace=f"jailbreak_{budget}", inputs=SHARED,
                    parameters={"params:evaluate": "params:evaluate", "params:seed": "params:seed",
                                "params:budget": f"params:evaluate.budgets.{budget}"})


def _models(names: tuple[str, ...]) -> Pipeline:
    """Each trained variant, frozen (outputs `<variant>.evaluated_model`)."""
    template = Pipeline([Node(systems.frozen_model, ["qmllm_config", "stage1_weights", "finetuned_llm", "clip_model",
                                                     "params:device"],
                              "evaluated_model", name="frozen_model")])
    return sum((pipeline(template, namespace=name, inputs={"clip_model"}, parameters={"params:device"})
                for name in names), Pipeline([]))


def create_pipeline(parameters: dict | None = None, **kwargs) -> Pipeline:
    """The evaluation of the three systems: the toxic-image attack, utility, the jailbreak at every budget of
    `evaluate.budgets` (one namespace each), the code-space bound, code stability, overhead and the report.
    `parameters`: what the variants and budgets are read from (default: the project's)."""
    parameters = parameters or load_parameters()
    names = budgets(parameters)
    shared = Pipeline([
        *safeclip_nodes(),
        Node(systems.assemble_systems, ["baseline.evaluated_model", "qmllm.evaluated_model", "tokenizer",
                                        "clip_image_processor", "safety_map", "safeclip_filter"],
             "evaluation_systems", name="assemble_systems"),
        Node(attacks.toxic_image_attack, ["evaluation_systems", "eval_toxic", "eval_neutral", "eval_hard_negative",
                                          "params:evaluate.toxic_image", "params:evaluate.batch_size"],
             ["toxic_image_responses", "toxic_image_metrics"], name="toxic_image_attack"),
        Node(utility.utility, ["evaluation_systems", "eval_utility", "params:evaluate.utility",
                               "params:evaluate.batch_size"], "utility_metrics", name="utility"),
        Node(attacks.jailbreak_start, ["evaluation_systems", "eval_neutral", "params:evaluate.jailbreak.start_rank"],
             "jailbreak_start", name="jailbreak_start"),
        Node(attacks.jailbreak_instructions, ["text_corpus", "params:evaluate.jailbreak", "params:seed"],
             "jailbreak_instructions", name="jailbreak_instructions"),
        Node(attacks.judge_clean_image, ["evaluation_systems", "jailbreak_instructions", "jailbreak_start",
                                         "params:evaluate.jailbreak", "params:evaluate.batch_size"],
             "jailbreak_clean", name="judge_clean_image"),
        Node(attacks.collect_jailbreaks, [f"jailbreak_{b}.jailbreak_results" for b in names], "jailbreak_results",
             name="collect_jailbreaks"),
        Node(bound.code_space_bound, ["evaluation_systems", "jailbreak_instructions", "jailbreak_start",
                                      "params:evaluate", "params:seed", "jailbreak_results"],
             ["code_space_bound", "code_space_bound_answers"], name="code_space_bound"),
        Node(overhead.overhead, ["evaluation_systems", "eval_neutral", "eval_toxic", "params:evaluate.overhead"],
             "overhead_metrics", name="overhead"),
        Node(attacks.code_stability, ["evaluation_systems", "eval_neutral", "params:evaluate.budgets",
                                      "params:evaluate.code_stability", "params:seed"],
             "code_stability_metrics", name="code_stability"),
        Node(report.jailbreak_summary, ["jailbreak_clean", "jailbreak_results", "code_space_bound", "params:evaluate"],
             "jailbreak_summary", name="jailbreak_summary"),
        Node(report.evaluation_report, ["toxic_image_metrics", "utility_metrics", "overhead_metrics",
                                        "code_stability_metrics", "jailbreak_summary"],
             ["evaluation_metrics", "evaluation_report", "jailbreak_dsr_plot", "toxic_dsr_plot",
              "adversarial_images_plot", "adversarial_images"], name="evaluation_report"),
    ])
    return _models(variants(parameters)) + shared + sum((_jailbreak(b) for b in names), Pipeline([]))
