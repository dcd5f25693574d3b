from kedro.pipeline import Node, Pipeline, pipeline

from qmllm_pipeline.parameters import load_parameters, run_settings_node, variants
from qmllm_pipeline.pipelines.pretrain import nodes

SHARED = ["stage1_data", "model_inputs", "llm", "name_head_weights", "run_settings"]


def create_pipeline(parameters: dict | None = None, **kwargs) -> Pipeline:
    """The model config and stage 1, instantiated per variant by namespace (outputs `qmllm.*`, `baseline.*`, one
    per entry of `variants` in `parameters`; default: the project's)."""
    names = variants(parameters or load_parameters())
    template = Pipeline([
        Node(nodes.model_config, ["model_inputs", "params:features", "params:pretrain", "params:variant"],
             "qmllm_config", name="model_config"),
        Node(nodes.pretrain_variant, ["qmllm_config", "llm", "name_head_weights", "stage1_data", "params:pretrain",
                                      "run_settings"],
             ["stage1_weights", "pretrain_summary", "pretrain_loss_curve"], name="pretrain_variant"),
    ])
    per_variant = [pipeline(template, namespace=name, inputs=set(SHARED),
                            parameters={"params:features": "params:features", "params:pretrain": "params:pretrain",
                                        "params:variant": f"params:variants.{name}"})
                   for name in names]
    shared = Pipeline([
        run_settings_node(),
        Node(nodes.stage1_data, ["caption_corpus", "caption_features", "caption_targets", "tokenizer",
                                 "params:pretrain"], "stage1_data", name="stage1_data"),
        Node(nodes.name_vocabulary, ["emoji_catalogue", "tokenizer", "params:data.layout.backgrounds",
                                     "params:pretrain.name_head"], "name_vocabulary", name="name_vocabulary"),
        Node(nodes.model_inputs, ["tokenizer", "llm", "stage1_data", "name_vocabulary"], "model_inputs",
             name="model_inputs"),
        Node(nodes.name_head_weights, ["model_inputs", "stage1_data", "caption_corpus", "name_vocabulary",
                                       "params:pretrain.name_head", "run_settings"],
             ["name_head_weights", "name_head_summary"], name="name_head"),
    ])
    report = Pipeline([Node(nodes.pretrain_report, ["name_head_summary", *(f"{n}.pretrain_summary" for n in names)],
                            "pretrain_metrics", name="pretrain_report")])
    return shared + sum(per_variant, Pipeline([])) + report
