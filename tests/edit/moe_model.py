"""A tiny Mixtral-style model trained at test time on a few capital facts (seconds on a CPU), with
a word-level tokenizer of the facts' words — a MoE model that knows something,
so an edit can be seen replacing what it knew."""

from __future__ import annotations

from pathlib import Path

CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid"}
TEMPLATES = ("The capital of {X} is", "{X} has its capital in", "The name of the capital of {X} is")
SPECIALS = ["<pad>", "<s>", "</s>"]


def write_word_tokenizer(directory: Path) -> None:
    """A word-level tokenizer over the facts' words (one token per word: an entity and its
    capital are single tokens, so "predicts the capital" is one argmax)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = sorted({w for c, city in CAPITALS.items() for t in TEMPLATES
                    for w in (t.replace("{X}", c) + " " + city).split()} | {"is", "."})
    vocab = {t: i for i, t in enumerate(SPECIALS + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(SPECIALS)
    Path(directory).mkdir(parents=True, exist_ok=True)
    tok.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
         "unk_token": "<pad>", "pad_token": "<pad>"}))


def make_trained_mixtral(directory: Path, steps: int = 150, seed: int = 0):
    """Train and save the model into `directory`; returns the HF model (eval mode, float32)."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer

    write_word_tokenizer(directory)
    tok = Tokenizer.from_file(str(Path(directory) / "tokenizer.json"))
    sentences = [t.replace("{X}", c) + " " + city for c, city in CAPITALS.items() for t in TEMPLATES]
    ids = [tok.encode(s).ids for s in sentences]
    width = max(map(len, ids))
    pad = tok.token_to_id("<pad>")
    batch = torch.tensor([x + [pad] * (width - len(x)) for x in ids])
    labels = torch.tensor([x + [-100] * (width - len(x)) for x in ids])
    torch.manual_seed(seed)
    config = T.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=tok.get_vocab_size(), max_position_embeddings=64,
                             num_local_experts=8, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0,
                             router_aux_loss_coef=0.0)
    model = T.AutoModelForCausalLM.from_config(config, attn_implementation="eager").train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: one thread is ~100x faster than two on a busy machine
    try:
        for _ in range(steps):
            loss = model(batch, labels=labels).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    model.eval()
    model.save_pretrained(directory, safe_serialization=True)
    return model
