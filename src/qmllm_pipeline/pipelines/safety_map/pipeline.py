from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.safety_map import nodes

SPLITS = ("dmap", "dmap_validation", *nodes.EVALUATION_SPLITS)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.cls_path, ["qmllm.qmllm_config", "qmllm.stage1_weights", "clip_model"], "safety_cls_path",
             name="cls_path"),
        Node(nodes.cls_codes, {"model": "safety_cls_path", "clip_image_processor": "clip_image_processor",
                               **{split: split for split in SPLITS}}, "cls_codes", name="cls_codes"),
        Node(nodes.fit_safety_map, ["cls_codes", "dmap", "dmap_validation", "params:safety_map"],
             ["safety_map", "tau_trade_off", "safety_map_choice"], name="fit_safety_map"),
        Node(nodes.safeclip_filter, ["clip_model", "clip_tokenizer", "clip_image_processor", "emoji_catalogue",
                                     "params:data.layout.backgrounds", "params:foundation.clip.text_side",
                                     "params:safety_map.safeclip_threshold"], "safeclip_filter",
             name="safeclip_filter"),
        Node(nodes.evaluate_detectors, ["cls_codes", "safety_map", "safety_map_choice", "safeclip_filter",
                                        *nodes.EVALUATION_SPLITS], "safety_metrics", name="evaluate_detectors"),
        Node(nodes.safety_map_heatmap, "safety_map", "safety_map_heatmap", name="safety_map_heatmap"),
        Node(nodes.guarded_manifest, "safety_map", "guarded_manifest", name="guarded_manifest"),
    ])
