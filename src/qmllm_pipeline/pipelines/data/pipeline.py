from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.data import nodes

# the training scene tables the world summary counts first, in its order (the evaluation splits follow)
TRAINING_SCENES = ("caption_corpus", "dmap", "dmap_validation")


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline([
        Node(nodes.validate_emoji_catalogue, ["emoji_catalogue_raw", "params:data"], "emoji_catalogue",
             name="validate_emoji_catalogue"),
        Node(nodes.render_caption_corpus, ["emoji_catalogue", "params:data"], "caption_corpus",
             name="render_caption_corpus"),
        Node(nodes.build_text_corpus, ["emoji_catalogue", "caption_corpus", "params:data"], "text_corpus",
             name="build_text_corpus"),
        Node(nodes.make_dialogs, ["emoji_catalogue", "text_corpus", "params:data"], "dialogs",
             name="make_dialogs"),
        Node(nodes.render_dmap, ["emoji_catalogue", "params:data"], "dmap", name="render_dmap"),
        Node(nodes.render_dmap_validation, ["emoji_catalogue", "params:data"], "dmap_validation",
             name="render_dmap_validation"),
        Node(nodes.render_evaluation_splits, ["emoji_catalogue", "params:data"],
             ["eval_toxic", "eval_neutral", "eval_hard_negative", "eval_utility", "eval_items"],
             name="render_evaluation_splits"),
        Node(nodes.draw_contact_sheet, ["eval_toxic", "eval_neutral", "eval_hard_negative", "params:data"],
             "world_contact_sheet", name="draw_contact_sheet"),
        Node(nodes.summarise_scenes, {name: name for name in TRAINING_SCENES}, "training_scenes_summary",
             name="summarise_training_scenes"),
        Node(nodes.summarise_evaluation_scenes, ["eval_toxic", "eval_neutral", "eval_hard_negative", "eval_items"],
             "evaluation_scenes_summary", name="summarise_evaluation_scenes"),
        Node(nodes.summarise_world, ["emoji_catalogue", "dialogs", "eval_utility", "text_corpus",
                                     "training_scenes_summary", "evaluation_scenes_summary"], "world_summary",
             name="summarise_world"),
    ])
