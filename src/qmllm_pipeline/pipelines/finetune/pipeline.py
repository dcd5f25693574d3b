from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.parameters import load_parameters, run_settings_node, variants
from qmllm_pipeline.pipelines.finetune import nodes

SHARED = ["stage2_data", "stage2_validation", "text_corpus", "tokenizer", "llm", "clip_model", "clip_image_processor",
          "eval_utility", "eval_neutral", "eval_items", "emoji_catalogue", "run_settings"]
SHARED_PARAMETERS = ("params:finetune.stage2", "params:finetune.evaluation")


def create_pipeline(parameters: dict | None = None, **kwargs) -> Pipeline:
    """Stage 2 and its measurements, instantiated per variant by namespace (one per entry of `variants` in
    `parameters`; default: the project's)."""
    names = variants(parameters or load_parameters())
    template = Pipeline([
        Node(nodes.finetune_variant, ["qmllm_config", "stage1_weights", "llm", "stage2_data",
                                      "params:finetune.stage2", "run_settings"],
             ["finetuned_llm", "lora_adapter", "finetune_summary", "finetune_loss_curve"], name="finetune_variant"),
        Node(nodes.variant_model, ["qmllm_config", "stage1_weights", "finetuned_llm", "clip_model", "run_settings"],
             "variant_model", name="variant_model"),
        Node(nodes.finetuned_model, ["variant_model", "tokenizer", "clip_image_processor"], "finetuned_model",
             name="finetuned_model"),
        Node(nodes.variant_utility, ["finetuned_model", "eval_utility", "params:finetune.evaluation"],
             "utility_scores", name="variant_utility"),
        Node(nodes.variant_naming, ["finetuned_model", "eval_items", "emoji_catalogue", "params:finetune.evaluation"],
             "naming_scores", name="variant_naming"),
        Node(nodes.variant_safety, ["finetuned_model", "eval_neutral", "text_corpus", "stage2_validation",
                                    "params:finetune.evaluation"], "safety_scores", name="variant_safety"),
        Node(nodes.variant_report, ["utility_scores", "naming_scores", "safety_scores", "finetune_summary"],
             "finetune_metrics", name="variant_report"),
    ])
    per_variant = [pipeline(template, namespace=name, inputs=set(SHARED), parameters={p: p for p in SHARED_PARAMETERS})
                   for name in names]
    shared = Pipeline([
        run_settings_node(),
        Node(nodes.stage2_validation, ["text_corpus", "params:finetune.data"], "stage2_validation",
             name="stage2_validation"),
        Node(nodes.synthetic_replay, ["text_corpus", "stage2_validation", "llm", "tokenizer", "params:finetune.data",
                                      "run_settings"], "synthetic_replay", name="synthetic_replay"),
        Node(nodes.replayed_instructions, ["dialogs", "text_corpus", "stage2_validation", "synthetic_replay",
                                           "params:finetune.data", "params:seed"], "replayed_instructions",
             name="replayed_instructions"),
        Node(nodes.dialog_examples, ["dialogs", "text_corpus", "stage2_validation", "replayed_instructions",
                                     "tokenizer", "params:finetune.data"], "dialog_examples", name="dialog_examples"),
        Node(nodes.stage2_data, ["dialog_features", "dialog_examples", "text_corpus", "stage2_validation", "tokenizer",
                                 "params:finetune.stage2"], "stage2_data", name="stage2_data"),
    ])
    report = Pipeline([
        Node(nodes.blind_guess, ["dialogs", "eval_utility"], "blind_guess", name="blind_guess"),
        Node(nodes.finetune_report, ["blind_guess", *(f"{name}.finetune_metrics" for name in names)],
             "finetune_metrics", name="finetune_report"),
    ])
    return shared + sum(per_variant, Pipeline([])) + report
