"""Names shared by the whole project (LLaVA keeps these in `llava/constants.py`)."""

IMAGE_TOKEN = "<image>"   # the placeholder a prompt carries where the image tokens are spliced in
IGNORE_INDEX = -100       # label of a token that is not trained on (prompt, image, padding)

SYSTEMS = ("baseline", "safeclip", "qmllm")   # what the evaluation compares (docs/method.md, "Evaluation protocol")
STAGES = ("data", "ingest", "foundation", "features", "pretrain", "finetune", "safety_map", "evaluate")  # pipelines
