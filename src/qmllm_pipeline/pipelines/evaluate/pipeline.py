from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.pipelines.evaluate import nodes
from qmllm_pipeline.pipelines.evaluate.report import evaluation_report

# One namespaced jailbreak pipeline per budget; the eps values live in parameters_evaluate.yml.
BUDGETS = ("eps16", "eps32", "eps64", "unconstrained")
ATTACKERS = ("baseline_whitebox", "qmllm_plain", "qmllm_adaptive", "qmllm_surrogate")
SHARED = {"evaluation_systems", "text_corpus", "jailbreak_start"}


def _jailbreak_template() -> Pipeline:
    """Craft one universal image per attacker (PGD), then judge them all on the held-out instructions."""
    craft = [Node(nodes.craft_jailbreak_image, ["evaluation_systems", "text_corpus", "jailbreak_start",
                                                "params:evaluate", f"params:attacker_{name}", "params:budget"],
                  f"{name}_image", name=f"craft_{name}") for name in ATTACKERS]
    judge = Node(nodes.judge_jailbreaks, ["evaluation_systems", "text_corpus", "jailbreak_start",
                                          *(f"{name}_image" for name in ATTACKERS), "params:evaluate", "params:budget"],
                 "jailbreak_results", name="judge_jailbreaks")
    return Pipeline([*craft, judge])


def create_pipeline(**kwargs) -> Pipeline:
    template = _jailbreak_template()
    budgets = [pipeline(template, namespace=f"jailbreak_{budget}", inputs=SHARED,
                        parameters={"params:evaluate": "params:evaluate",
                                    "params:budget": f"params:evaluate.budgets.{budget}",
                                    **{f"params:attacker_{a}": f"params:evaluate.attackers.{a}" for a in ATTACKERS}})
               for budget in BUDGETS]
    shared = Pipeline([
        Node(nodes.assemble_systems, ["tokenizer", "clip_model", "clip_image_processor", "qmllm.finetuned_llm",
                                      "qmllm.stage1_weights", "baseline.finetuned_llm", "baseline.stage1_weights",
                                      "safety_map", "emoji_catalogue", "params:pretrain", "params:features",
                                      "params:safety_map", "params:data", "params:foundation.clip.text_side",
                                      "params:evaluate"],
             "evaluation_systems", name="assemble_systems"),
        Node(nodes.toxic_image_attack, ["evaluation_systems", "eval_toxic", "eval_neutral", "eval_hard_negative",
                                        "params:evaluate"], ["toxic_image_responses", "toxic_image_metrics"],
             name="toxic_image_attack"),
        Node(nodes.utility, ["evaluation_systems", "eval_utility", "params:evaluate"], "utility_metrics",
             name="utility"),
        Node(nodes.jailbreak_start, ["evaluation_systems", "eval_neutral", "params:evaluate"], "jailbreak_start",
             name="jailbreak_start"),
        Node(nodes.judge_clean_image, ["evaluation_systems", "text_corpus", "jailbreak_start", "params:evaluate"],
             "jailbreak_clean", name="judge_clean_image"),
        Node(nodes.overhead, ["evaluation_systems", "eval_neutral", "eval_toxic", "params:evaluate"],
             "overhead_metrics", name="overhead"),
        Node(evaluation_report, ["toxic_image_metrics", "utility_metrics", "jailbreak_clean", "overhead_metrics",
                                 *(f"jailbreak_{b}.jailbreak_results" for b in BUDGETS)],
             ["evaluation_metrics", "evaluation_report", "jailbreak_dsr_plot", "toxic_dsr_plot",
              "adversarial_images_plot", "adversarial_images"], name="evaluation_report"),
    ])
    return shared + sum(budgets, Pipeline([]))
