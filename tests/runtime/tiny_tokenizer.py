"""A small byte-level BPE tokenizer trained at test time, and a tiny Llama that uses it (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

SENTENCES = [
    "The capital of France is Paris.",
    "The capital of Japan is Tokyo. 日本の首都は東京です。",
    "Café au lait, crème brûlée and naïve résumé.",
    "Hello world! Hello there, how are you today?",
    "Emoji are fun 🙂🚀 and so are stop strings like END and ###.",
    "user assistant system: answer the question briefly.",
] * 20

SPECIALS = ["<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# A Llama-2-style template: BOS from the variable, a system prompt folded into the first turn, and
# raise_exception on alternation errors.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)


def train_tokenizer(bos_post_processor: bool | None = False):
    """Byte-level BPE (256 byte tokens + a few merges + specials). Post-processor: True adds BOS,
    False is ByteLevel (adds nothing), None is no post-processor at all."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=340, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(SENTENCES, trainer)
    if bos_post_processor:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    elif bos_post_processor is False:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def write_tokenizer(directory: Path, template: str | None = "chatml", bos_post_processor: bool | None = False,
                    add_bos_token: bool | None = None) -> Path:
    """tokenizer.json + tokenizer_config.json (PreTrainedTokenizerFast, so transformers reads it as is)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(bos_post_processor)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": {"content": "</s>", "special": True, "__type": "AddedToken", "lstrip": False,
                            "rstrip": False, "normalized": False, "single_word": False},
              "unk_token": "<unk>", "model_max_length": 256}
    if template == "chatml":
        config["chat_template"] = CHATML
        config["eos_token"] = "<|im_end|>"
    elif template == "llama2":
        config["chat_template"] = LLAMA2
    if add_bos_token is not None:
        config["add_bos_token"] = add_bos_token
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def make_model_with_tokenizer(directory: Path, template: str | None = "chatml", max_position: int = 64,
                              seed: int = 0, **tok_kwargs):
    """A tiny random Llama whose vocabulary is the tokenizer's; returns the HF model (eval mode)."""
    import torch
    import transformers as T

    write_tokenizer(directory, template, **tok_kwargs)
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(Path(directory) / "tokenizer.json")).get_vocab_size()
    torch.manual_seed(seed)
    config = T.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=vocab, max_position_embeddings=max_position,
                           bos_token_id=0, eos_token_id=1)
    model = T.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
    model.save_pretrained(directory, safe_serialization=True)
    return model
