from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.constants import VARIANTS
from qmllm_pipeline.pipelines.evaluate import attacks, overhead, systems, utility
from qmllm_pipeline.pipelines.evaluate.report import evaluation_report

# One namespaced jailbreak pipeline per budget; the eps values live in parameters_evaluate.yml.
BUDGETS = ("eps16", "eps32", "eps64", "unconstrained")
ATTACKERS = ("baseline_whitebox", "qmllm_plain", "qmllm_adaptive", "qmllm_surrogate")
# the attackers that also craft one image per held-out instruction (the deployed qmllm gives PGD no gradient,
# and the surrogate's images are judged through the universal setting only, to keep `evaluate` short)
PER_INSTRUCTION_ATTACKERS = ("baseline_whitebox", "qmllm_adaptive")
SHARED = {"evaluation_systems", "jailbreak_instructions", "jailbreak_start"}
SHARED_PARAMETERS = ("params:evaluate.jailbreak", "params:evaluate.per_instruction", "params:evaluate.batch_size",
                     "params:seed")


def _jailbreak_template() -> Pipeline:
    """Craft one universal image per attacker and one image per held-out instruction for the per-instruction
    attackers (PGD), then judge them all on the held-out instructions."""
    common = ["evaluation_systems", "jailbreak_instructions", "jailbreak_start", "params:evaluate.jailbreak"]
    craft = [Node(attacks.craft_jailbreak_image, [*common, f"params:attacker_{name}", "params:budget", "params:seed"],
                  f"{name}_image", name=f"craft_{name}") for name in ATTACKERS]
    craft += [Node(attacks.craft_per_instruction_images,
                   [*common, "params:evaluate.per_instruction", f"params:attacker_{name}", "params:budget",
                    "params:seed"], f"{name}_per_instruction_images", name=f"craft_{name}_per_instruction")
              for name in PER_INSTRUCTION_ATTACKERS]
    judge = Node(attacks.judge_jailbreaks,
                 {"systems": "evaluation_systems", "instructions": "jailbreak_instructions", "start": "jailbreak_start",
                  "params": "params:evaluate.jailbreak", "budget": "params:budget",
                  "batch_size": "params:evaluate.batch_size", "seed": "params:seed",
                  **{name: f"{name}_image" for name in ATTACKERS},
                  **{f"{name}_per_instruction": f"{name}_per_instruction_images"
                     for name in PER_INSTRUCTION_ATTACKERS}},
                 "jailbreak_results", name="judge_jailbreaks")
    return Pipeline([*craft, judge])


def _models() -> Pipeline:
    """Each trained variant, frozen (outputs `qmllm.evaluated_model`, `baseline.evaluated_model`)."""
    template = Pipeline([Node(systems.frozen_model, ["qmllm_config", "stage1_weights", "finetuned_llm", "clip_model"],
                              "evaluated_model", name="frozen_model")])
    return sum((pipeline(template, namespace=name, inputs={"clip_model"}) for name in VARIANTS), Pipeline([]))


def create_pipeline(**kwargs) -> Pipeline:
    template = _jailbreak_template()
    budgets = [pipeline(template, namespace=f"jailbreak_{budget}", inputs=SHARED,
                        parameters={**{p: p for p in SHARED_PARAMETERS},
                                    "params:budget": f"params:evaluate.budgets.{budget}",
                                    **{f"params:attacker_{a}": f"params:evaluate.attackers.{a}" for a in ATTACKERS}})
               for budget in BUDGETS]
    shared = Pipeline([
        Node(systems.safeclip_guard, ["clip_model", "clip_tokenizer", "clip_image_processor", "emoji_catalogue",
                                      "params:data.layout.backgrounds", "params:foundation.clip.text_side",
                                      "params:safety_map.safeclip_threshold"], "safeclip_guard",
             name="safeclip_guard"),
        Node(systems.assemble_systems, ["baseline.evaluated_model", "qmllm.evaluated_model", "tokenizer",
                                        "clip_image_processor", "safety_map", "safeclip_guard"],
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
        Node(attacks.code_space_bound, ["evaluation_systems", "jailbreak_instructions", "jailbreak_start",
                                        "params:evaluate.jailbreak", "params:evaluate.code_search",
                                        "params:evaluate.batch_size", "params:seed",
                                        *(f"jailbreak_{b}.jailbreak_results" for b in BUDGETS)],
             ["code_space_bound", "code_space_bound_answers"], name="code_space_bound"),
        Node(overhead.overhead, ["evaluation_systems", "eval_neutral", "eval_toxic", "params:evaluate.overhead"],
             "overhead_metrics", name="overhead"),
        Node(attacks.code_stability, ["evaluation_systems", "eval_neutral", "params:evaluate.budgets",
                                      "params:evaluate.code_stability", "params:seed"],
             "code_stability_metrics", name="code_stability"),
        Node(evaluation_report, ["toxic_image_metrics", "utility_metrics", "jailbreak_clean", "overhead_metrics",
                                 "code_stability_metrics", "code_space_bound",
                                 *(f"jailbreak_{b}.jailbreak_results" for b in BUDGETS)],
             ["evaluation_metrics", "evaluation_report", "jailbreak_dsr_plot", "toxic_dsr_plot",
              "adversarial_images_plot", "adversarial_images"], name="evaluation_report"),
    ])
    return _models() + shared + sum(budgets, Pipeline([]))
