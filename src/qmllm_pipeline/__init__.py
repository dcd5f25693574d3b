"""qmllm-pipeline: Q-MLLM (vector-quantized multimodal LLM defense) as a Kedro project."""

__version__ = "0.1.0"
