from kedro.pipeline import Node, Pipeline

from qmllm_pipeline.pipelines.data import nodes

# the scene tables the world summary counts, in the order the summary lists them
SCENE_SPLITS = ("caption_corpus", "dmap", "dmap_validation", "eval_toxic", "eval_neutral", "eval_hard_negative",
                "eval_items")


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
        Node(nodes.summarise_world,
             {"catalogue": "emoji_catalogue", "dialogs": "dialogs", "eval_utility": "eval_utility",
              "text_corpus": "text_corpus", **{name: name for name in SCENE_SPLITS}},
             "world_summary", name="summarise_world"),
    ])
