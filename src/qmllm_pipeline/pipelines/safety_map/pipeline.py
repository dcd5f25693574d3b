from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.safety_map import nodes


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.cls_codes, ["dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_hard_negative",
                               "clip_model", "clip_image_processor", "tokenizer", "llm", "qmllm.stage1_weights",
                               "params:pretrain", "params:features"], "cls_codes", name="cls_codes"),
        Node(nodes.fit_safety_map, ["cls_codes", "dmap", "dmap_validation", "params:safety_map"],
             ["safety_map", "tau_trade_off", "safety_map_choice"], name="fit_safety_map"),
        Node(nodes.evaluate_detectors, ["cls_codes", "safety_map", "safety_map_choice", "eval_toxic", "eval_neutral",
                                        "eval_hard_negative", "clip_model", "clip_image_processor", "tokenizer",
                                        "emoji_catalogue", "params:safety_map", "params:data",
                                        "params:foundation.clip.text_side"],
             "safety_metrics", name="evaluate_detectors"),
        Node(nodes.safety_map_heatmap, "safety_map", "safety_map_heatmap", name="safety_map_heatmap"),
        Node(nodes.guarded_manifest, ["safety_map", "params:pretrain", "params:features", "params:safety_map"],
             "guarded_manifest", name="guarded_manifest"),
    ])
