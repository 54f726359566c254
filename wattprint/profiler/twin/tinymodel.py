"""A tiny Llama model with random weights and a real tokenizer, made on the spot (no download).

:func:`write_tiny_model` writes a Hugging Face model directory that vLLM (CPU or GPU) serves in
seconds: a Llama-architecture ``config.json``, random weights as ``model.safetensors`` and a byte-level
BPE tokenizer trained on a small embedded English text, with a chat template so that
``/v1/chat/completions`` works too. Its outputs are gibberish; its shapes and its steps are real.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from wattprint.errors import ConfigError

#: files that make a complete model directory (the weights are checked separately)
REQUIRED_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json")
MARKER = ".wattprint-tiny-model.json"

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"

#: Llama-2-like chat template: system / user / assistant turns, assistant turns end with EOS.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>\n{{ message['content'] }}\n"
    "{% elif message['role'] == 'user' %}<|user|>\n{{ message['content'] }}\n"
    "{% else %}<|assistant|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

# Public-domain-style English prose and technical text written for this file: enough variety for
# a ~1-2k entry byte-level BPE to learn common English words.
_CORPUS = """\
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of
foolishness. Call me by my name, and I will answer you from the other side of the river.
The sun rose slowly over the hills, and the light spread across the fields where the farmers were
already at work. Children ran along the road to school, laughing and shouting to one another.
In the city, the streets filled with people on their way to offices, shops and factories.
A language model reads a prompt, splits it into tokens, and predicts the next token again and again.
Each step of the engine processes a batch of requests: some are in the prefill phase, reading their
prompt, and others are in the decode phase, writing one new token at a time.
The key and value cache keeps the attention state of every token that has already been processed,
so that the model does not have to compute it again. Memory bandwidth limits the decode phase, while
the prefill phase is limited by arithmetic throughput.
Energy is power integrated over time. A graphics processor reports its energy counter in millijoules,
and a profiler samples that counter many times a second to learn how much energy each step used.
Science explains the world through observation and experiment. Mathematics gives it a precise
language. History tells us where we came from, and literature tells us who we are.
What is the capital of France? The capital of France is Paris. What is two plus two? It is four.
Please write a short poem about the sea. The sea is wide and deep and blue; it holds the sky and
sings to you. Summarize the following article in three sentences. Translate this sentence into
French. Explain why the sky is blue. Give me a recipe for bread: flour, water, salt and yeast.
Mix them, knead the dough, let it rise for an hour, shape the loaf and bake it in a hot oven.
The weather today is cloudy with a chance of rain in the afternoon and a cool wind from the north.
Once upon a time there was a little house at the edge of a forest, and in the house lived an old
woman with her cat. Every morning she walked to the well to fetch water, and every evening she sat
by the fire and told stories about kings, queens, dragons and brave young travellers.
Numbers: zero one two three four five six seven eight nine ten hundred thousand million.
Days: Monday Tuesday Wednesday Thursday Friday Saturday Sunday. Months: January February March April
May June July August September October November December. Colors: red green blue yellow black white.
def main():\n    print("hello, world")\n    return 0\n
The server answered the request with a stream of tokens, and the client printed them as they came.
Good morning! How are you today? I am fine, thank you. Could you help me with my homework, please?
Of course. Let us start with the first question and work through the rest together, step by step.
"""


def _train_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD, UNK],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Repeat the corpus so that merges get past min_frequency; training is deterministic.
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tok


def is_complete(model_dir: str | Path) -> bool:
    """True when ``model_dir`` holds a complete model written by :func:`write_tiny_model`."""
    d = Path(model_dir)
    return (
        all((d / f).is_file() for f in REQUIRED_FILES)
        and any(d.glob("*.safetensors"))
        and (d / MARKER).is_file()
    )


def write_tiny_model(
    model_dir: str | Path,
    *,
    layers: int = 2,
    hidden: int = 128,
    heads: int = 2,
    kv_heads: int = 2,
    intermediate: int = 256,
    vocab: int = 1024,
    max_position_embeddings: int = 8192,
    dtype: str = "bfloat16",
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight Llama model with a trained BPE tokenizer into ``model_dir``.

    Idempotent: if ``model_dir`` already holds a complete model, nothing is written (whatever its
    parameters). The directory is filled through a temporary sibling directory, so an interrupted
    call leaves no half model behind. ``hidden // heads`` is the head dimension (vLLM's CPU attention
    needs >= 64). Returns the model directory.
    """
    model_dir = Path(model_dir)
    if is_complete(model_dir):
        return model_dir
    if hidden % heads or heads % kv_heads:
        raise ConfigError(f"hidden ({hidden}) must divide by heads ({heads}) and heads by kv_heads ({kv_heads})")
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ConfigError(f"dtype must be bfloat16, float16 or float32, got {dtype!r}")
    if vocab < 300:
        raise ConfigError(f"vocab must be >= 300 (256 bytes + specials + merges), got {vocab}")

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from transformers.utils import logging as hf_logging

    model_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{model_dir.name}.", dir=model_dir.parent))
    try:
        tok = _train_tokenizer(vocab)
        fast = PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=BOS,
            eos_token=EOS,
            pad_token=PAD,
            unk_token=UNK,
            model_max_length=max_position_embeddings,
            clean_up_tokenization_spaces=False,
        )
        fast.chat_template = CHAT_TEMPLATE
        fast.save_pretrained(tmp)

        config = LlamaConfig(
            vocab_size=tok.get_vocab_size(),
            hidden_size=hidden,
            intermediate_size=intermediate,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=hidden // heads,
            max_position_embeddings=max_position_embeddings,
            bos_token_id=tok.token_to_id(BOS),
            eos_token_id=tok.token_to_id(EOS),
            pad_token_id=tok.token_to_id(PAD),
            tie_word_embeddings=False,
            rms_norm_eps=1e-5,
        )
        torch_dtype = getattr(torch, dtype)
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(torch_dtype)
        model.config.dtype = torch_dtype  # written as "dtype" (and "torch_dtype" by older transformers)
        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        (tmp / MARKER).write_text(
            json.dumps(
                {
                    "layers": layers,
                    "hidden": hidden,
                    "heads": heads,
                    "kv_heads": kv_heads,
                    "intermediate": intermediate,
                    "vocab": tok.get_vocab_size(),
                    "max_position_embeddings": max_position_embeddings,
                    "dtype": dtype,
                    "seed": seed,
                },
                indent=2,
            )
            + "\n"
        )
        model_dir.mkdir(exist_ok=True)
        # Move the marker last: a directory is complete only once it is there.
        names = sorted(p.name for p in tmp.iterdir() if p.name != MARKER) + [MARKER]
        for name in names:
            os.replace(tmp / name, model_dir / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return model_dir
