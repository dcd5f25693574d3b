"""Nodes that several pipelines hold, built in one place (`parameters.run_settings_node` is the other). Kedro
keeps one copy of a node that two added pipelines both hold (same name, inputs and outputs), so each pipeline
still runs alone."""

from kedro.pipeline import Node

from qmllm_pipeline.models.safeclip import SafeCLIPFilter
from qmllm_pipeline.world.scenes import category_prompts


def safeclip_nodes() -> list[Node]:
    """The SafeCLIP-style filter (docs/method.md): one class per catalogue item, prompted in the style CLIP
    was trained on, refusing above `safety_map.safeclip_threshold` (the safety map's comparison and the
    evaluated `safeclip` system read the same one)."""
    return [Node(category_prompts, ["emoji_catalogue", "params:data.layout.backgrounds",
                                    "params:foundation.clip.text_side"], "safeclip_prompts", name="safeclip_prompts"),
            Node(SafeCLIPFilter, ["clip_model", "clip_tokenizer", "clip_image_processor", "safeclip_prompts",
                                  "params:safety_map.safeclip_threshold", "params:device"], "safeclip_filter",
                 name="safeclip_filter")]
