"""A model directory dynamo.mocker accepts without any download: a byte-level tokenizer.json (text encodes to
one token per byte, like the mock engine's), a small config.json and a tokenizer_config.json with a chat
template (Dynamo serves a model's chat endpoint only with one). Used by tests, perf/kv_routing.py and demos.

The vocabulary is padded to ``vocab_size`` with word tokens ``w<id>`` that text never encodes to: the
mocker emits random ids above 1000 and `hpcserve bench` sends random ids in 1000-30000, and Dynamo refuses
ids outside the vocabulary and decodes unknown ones to nothing."""

from __future__ import annotations

import json
from pathlib import Path


def make_byte_model(d: str | Path, vocab_size: int = 32000) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(d / "tokenizer.json"))
    (d / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": len(vocab), "hidden_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 128,
        "max_position_embeddings": 32768, "bos_token_id": 1, "eos_token_id": 2}))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "model_max_length": 32768,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"}))
    return d
