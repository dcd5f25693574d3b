from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.safety_map import nodes
from qmllm_pipeline.pipelines.shared import safeclip_nodes


def create_pipeline(**kwargs) -> Pipeline:
    """Algorithm 1 over D_map on qmllm's CLS codes, tau and the unseen-code policy chosen on D_map's validation
    part, and the toxic-image DSR / FPR of the map against the SafeCLIP-style filter."""
    return Pipeline([
        Node(nodes.cls_path, ["qmllm.qmllm_config", "qmllm.stage1_weights", "clip_model", "params:device"],
             "safety_cls_path",
             name="cls_path"),
        Node(nodes.dmap_codes, ["safety_cls_path", "clip_image_processor", "dmap", "dmap_validation"], "dmap_codes",
             name="dmap_codes"),
        Node(nodes.evaluation_codes, ["safety_cls_path", "clip_image_processor", *nodes.EVALUATION_SPLITS],
             "evaluation_codes", name="evaluation_codes"),
        Node(nodes.fit_safety_map, ["dmap_codes", "dmap", "dmap_validation", "params:safety_map"],
             ["safety_map", "tau_trade_off", "safety_map_choice"], name="fit_safety_map"),
        *safeclip_nodes(),
        Node(nodes.safeclip_scores, ["safeclip_filter", *nodes.EVALUATION_SPLITS], "safeclip_scores",
             name="safeclip_scores"),
        Node(nodes.evaluate_detectors, ["dmap_codes", "evaluation_codes", "safety_map", "safety_map_choice",
                                        "safeclip_scores"], "safety_metrics", name="evaluate_detectors"),
        Node(nodes.safety_map_heatmap, "safety_map", "safety_map_heatmap", name="safety_map_heatmap"),
        Node(nodes.guarded_manifest, ["safety_map", "qmllm.qmllm_config", "qmllm.lora_adapter"], "guarded_manifest",
             name="guarded_manifest"),
    ])
