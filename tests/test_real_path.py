"""The pieces the real path needs, on tiny models with the real architectures' layout: a Llama tokenizer
without `<image>` or a chat template, given both, and its LLM the embedding row the new token needs."""

import pytest
import torch
from transformers import LlamaForCausalLM

from qmllm_pipeline.constants import IGNORE_INDEX, IMAGE_TOKEN
from qmllm_pipeline.fixtures import llama_tokenizer
from qmllm_pipeline.models.conversation import VICUNA_V1_SYSTEM, prepare_for_images
from qmllm_pipeline.models.tokenizer import encode_chat, encode_prompt
from qmllm_pipeline.scaling import small_llama


def tiny_llama(vocab_size: int, initializer_range: float = 0.02) -> LlamaForCausalLM:
    return small_llama(vocab_size, initializer_range=initializer_range)


def test_prepare_for_images_adds_the_placeholder_and_mean_rows():
    tokenizer = llama_tokenizer()
    assert IMAGE_TOKEN not in tokenizer.get_vocab() and tokenizer.pad_token is None and not tokenizer.chat_template
    llm = tiny_llama(len(tokenizer))
    before = {name: layer.weight.detach().clone()
              for name, layer in (("in", llm.get_input_embeddings()), ("out", llm.get_output_embeddings()))}
    done = prepare_for_images(tokenizer, llm, "vicuna_v1")
    assert done["added_tokens"] == [IMAGE_TOKEN] and done["embedding_rows"] == [len(before["in"]), len(tokenizer)]
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert image_id == len(before["in"])
    assert tokenizer(f"{IMAGE_TOKEN}\nWhat is it?", add_special_tokens=False)["input_ids"].count(image_id) == 1
    assert tokenizer.pad_token == tokenizer.unk_token
    for name, layer in (("in", llm.get_input_embeddings()), ("out", llm.get_output_embeddings())):
        weight = layer.weight.detach()
        assert weight.shape[0] == len(tokenizer)
        assert torch.equal(weight[:image_id], before[name])  # the old rows untouched
        assert torch.allclose(weight[image_id], before[name].mean(0))
    again = prepare_for_images(tokenizer, llm, "vicuna_v1")  # idempotent
    assert again["added_tokens"] == [] and again["embedding_rows"] == [len(tokenizer)] * 2


def test_the_vicuna_format_is_llavas_and_marks_the_answer_for_the_loss():
    tokenizer = llama_tokenizer()
    prepare_for_images(tokenizer, None, "vicuna_v1")
    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\nWhat is it?"}, {"role": "assistant", "content": "A cat."}]
    ids, labels = encode_chat(tokenizer, messages, 512)
    text = tokenizer.decode(ids)
    assert text.startswith(f"<s>{VICUNA_V1_SYSTEM} USER: {IMAGE_TOKEN}")
    assert text.endswith("What is it? ASSISTANT: A cat.</s>")
    answer = [i for i, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert tokenizer.decode(answer).strip() == "A cat.</s>"
    prompt = encode_prompt(tokenizer, f"{IMAGE_TOKEN}\nWhat is it?")
    assert tokenizer.decode(prompt).endswith("What is it? ASSISTANT:")


def test_a_format_must_be_known_and_a_tokenizer_without_a_template_needs_one():
    with pytest.raises(ValueError, match="conversation format 'llama9'"):
        prepare_for_images(llama_tokenizer(), None, "llama9")
    with pytest.raises(ValueError, match="no chat template"):
        prepare_for_images(llama_tokenizer(), None, None)


def test_lora_trains_the_adapters_only_and_merges_to_the_same_answers():
    from qmllm_pipeline.models.lora import LoraSettings, merged, with_lora

    tokenizer = llama_tokenizer()
    llm = tiny_llama(len(tokenizer) + 1, initializer_range=0.5)  # a frozen head that can say something sharp
    base = {name: p.detach().clone() for name, p in llm.named_parameters()}
    model = with_lora(llm, LoraSettings(rank=4, alpha=8, dropout=0.0))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    ids = torch.randint(3, 60, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(60):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]  # the adapters learn
    for name, p in model.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p.detach(), base[name.replace(".base_layer", "")]), name  # the base is untouched
    model.eval()
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        prompt = ids[:1, :6]
        answer = model.generate(input_ids=prompt, max_new_tokens=8, do_sample=False)
        plain = merged(model)
        assert not any("lora_" in name for name, _ in plain.named_parameters())
        assert torch.allclose(plain(input_ids=ids).logits, adapted, atol=1e-4)
        assert torch.equal(plain.generate(input_ids=prompt, max_new_tokens=8, do_sample=False), answer)
    with pytest.raises(ValueError, match="LoRA rank 0"):
        with_lora(tiny_llama(10), LoraSettings(rank=0))


def test_stage2_with_lora_leaves_the_llm_weights_and_returns_them_merged():
    """`finetune` with LoRA on a Q-MLLM whose LLM is the Llama layout: its base weights do not move while the
    adapters train, and the model it returns holds a plain LLM with the adapters merged in."""
    from qmllm_pipeline.models.qmllm import QMLLM, QMLLMConfig
    from qmllm_pipeline.models.stage2 import LoraSpec, Stage2Data, Stage2Settings, train_stage2
    from qmllm_pipeline.models.training import TrainingConfig
    from qmllm_pipeline.tracking import StepLogger

    llm = tiny_llama(64, initializer_range=0.5)
    before = {name: p.detach().clone() for name, p in llm.named_parameters()}
    config = QMLLMConfig(vision_width=8, llm_width=16, image_token_id=2, variant="qmllm", quantized=True,
                         cls_codes=4, patch_codes=8)
    model = QMLLM(config, llm)
    dialogs = [([3, 2, 5, 7, 9, 11], [-100, -100, -100, 7, 9, 11], row) for row in range(4)]
    logger = StepLogger("t", every=1)
    training = TrainingConfig(steps=30, batch_size=4, lr=3e-2, warmup_steps=1, grad_clip=1.0)
    model, adapters = train_stage2(model, Stage2Data(torch.randn(4, 8), torch.randn(4, 5, 8), dialogs),
                                   Stage2Settings(training, lora=LoraSpec(rank=4, alpha=8, dropout=0.0, enabled=True)),
                                   0, step_logger=logger)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(adapters)
    losses = [value for _, value in logger.history["loss"]]
    assert losses[-1] < losses[0]
    assert type(model.llm) is LlamaForCausalLM and not any("lora_" in n for n, _ in model.llm.named_parameters())
    changed = [name for name, p in model.llm.named_parameters() if not torch.equal(p.detach(), before[name])]
    assert changed and all("proj" in name for name in changed)  # the adapted linear layers, merged
    assert torch.equal(model.llm.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(model.llm.get_input_embeddings().weight, before["model.embed_tokens.weight"])
