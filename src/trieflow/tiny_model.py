"""A tiny, reproducible chat model for local runs and tests, built without any hub.

vLLM (CPU) and transformers load it like any Qwen2 checkpoint: a byte-level BPE tokenizer
trained here on text generated in this module, a Qwen-style chat template that renders
tools and tool calls, and a randomly initialised ``Qwen2ForCausalLM``. Its outputs are
noise, but every token path a real model exercises (chat template, special tokens, tool
calls forced by structured output, logprobs, token ids) is real.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<tool_call>",
    "</tool_call>",
    "<tool_response>",
    "</tool_response>",
)

# Qwen2.5-style template, trimmed: system/user/assistant/tool turns, tool schemas in the
# system turn, assistant tool calls as <tool_call>{json}</tool_call> (what vLLM's "hermes"
# parser reads), consecutive tool results grouped into one user turn.
CHAT_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou may call functions. Signatures:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\nReturn each call as <tool_call>\\n"
    '{"name": <name>, "arguments": <json>}\\n</tool_call><|im_end|>\\n\' }}'
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}"
    "{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' + tool_call.name + \'", "arguments": \' }}'
    "{%- if tool_call.arguments is string %}{{- tool_call.arguments }}"
    "{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

# Shape of the network: head_dim = 128 / 2 = 64, which vLLM's CPU attention accepts.
MODEL_SHAPE: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "num_hidden_layers": 2,
    "max_position_embeddings": 4096,
}
VOCAB_SIZE = 512  # tokenizer merges stop below this; the embedding table has this size
SEED = 1234
_RECIPE_VERSION = "1"
_STAMP = "trieflow-tiny-model.json"


def _corpus() -> list[str]:
    """Local training text: prose, chat-template glue, JSON and tool-call shapes."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        import this  # the Zen of Python, ROT13-encoded in the standard library

    zen = "".join(this.d.get(c, c) for c in this.s)
    words = [
        "weather",
        "city",
        "temperature",
        "search",
        "file",
        "read",
        "write",
        "run",
        "test",
        "patch",
        "python",
        "code",
        "function",
        "arguments",
        "name",
        "result",
        "error",
        "value",
        "list",
        "open",
        "close",
        "the",
        "a",
        "of",
        "to",
        "in",
        "is",
        "and",
        "for",
        "with",
        "you",
        "can",
        "call",
        "tool",
        "user",
        "assistant",
        "system",
        "please",
        "what",
        "how",
        "why",
    ]
    sentences = [
        " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(64)
    ]
    json_lines = [
        json.dumps({"name": words[i % len(words)], "arguments": {"x": i, "city": "Paris"}})
        for i in range(32)
    ]
    return [zen, CHAT_TEMPLATE, *sentences, *json_lines, "0123456789 {}[]():,.\"'\n"]


def _recipe_digest() -> str:
    recipe = json.dumps(
        [_RECIPE_VERSION, SPECIAL_TOKENS, CHAT_TEMPLATE, MODEL_SHAPE, VOCAB_SIZE, SEED],
        sort_keys=True,
    )
    return hashlib.sha256(recipe.encode()).hexdigest()[:16]


def _build_tokenizer(dest: Path) -> int:
    """Trains the byte-level BPE and saves it with the chat template; returns its size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE - 16,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(SPECIAL_TOKENS[3:]),
        model_max_length=MODEL_SHAPE["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(dest)
    return int(tokenizer.get_vocab_size())


def _build_model(dest: Path, tokenizer_size: int) -> None:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if tokenizer_size > VOCAB_SIZE:
        raise RuntimeError(f"tokenizer has {tokenizer_size} tokens > {VOCAB_SIZE}")
    eos = SPECIAL_TOKENS.index("<|im_end|>")
    pad = SPECIAL_TOKENS.index("<|endoftext|>")
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        tie_word_embeddings=True,
        bos_token_id=pad,
        eos_token_id=eos,
        pad_token_id=pad,
        dtype="float32",
        **MODEL_SHAPE,
    )
    torch.manual_seed(SEED)
    model = Qwen2ForCausalLM(config)  # type: ignore[no-untyped-call]
    model.save_pretrained(dest, safe_serialization=True)
    GenerationConfig(  # type: ignore[no-untyped-call]
        bos_token_id=pad, eos_token_id=[eos, pad], pad_token_id=pad
    ).save_pretrained(dest)


def build_tiny_model(dest: Path) -> Path:
    """Builds the tiny model into ``dest`` unless an identical build is already there.

    Idempotent and safe to call from concurrent processes: the model is built in a
    sibling temporary folder and renamed into place; a stamp file names the recipe.
    """
    dest = Path(dest)
    digest = _recipe_digest()
    if _is_built(dest, digest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        size = _build_tokenizer(staging)
        _build_model(staging, size)
        (staging / _STAMP).write_text(json.dumps({"recipe": digest, "tokenizer_size": size}))
        if dest.exists() and not _is_built(dest, digest):
            shutil.rmtree(dest)  # a build from an older recipe
        try:
            os.replace(staging, dest)
        except OSError:
            if not _is_built(dest, digest):  # not a concurrent identical build: real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def _is_built(dest: Path, digest: str) -> bool:
    stamp = dest / _STAMP
    return stamp.is_file() and json.loads(stamp.read_text()).get("recipe") == digest
