"""Build a tiny Hugging Face Llama checkpoint offline, with random weights.

Tests and demos need a real HF-format checkpoint (config.json,
model.safetensors, tokenizer files, generation_config.json) without network
access or gigabytes of weights.  This module trains a small byte-level BPE
tokenizer on the given texts and saves a randomly initialised
``LlamaForCausalLM`` next to it.

The tokenizer mimics the conventions of real chat checkpoints:

* special tokens ``<|begin_of_text|>`` (bos), ``<|end_of_text|>``,
  ``<|im_start|>``, ``<|im_end|>`` and ``<|pad|>`` (ids 0-4, in that order);
* ``add_special_tokens=True`` prepends bos (via a TemplateProcessing
  post-processor), like Llama 3;
* byte-level pre-tokenization/decoding, so ``decode(encode(s)) == s`` for any
  string;
* with ``chat_template=True``: eos is ``<|im_end|>`` and a ChatML template
  that begins with the bos text; with ``chat_template=False``: eos is
  ``<|end_of_text|>`` and there is no chat template (a "base model");
* with ``split_digits=True`` every digit is a token of its own (as in Qwen's
  and Llama 2's tokenizers), so a number reads the same wherever it stands:
  " 15th" and "-15\"" share the tokens "1", "5".  The demo uses it; the
  default keeps BPE's merged digit chunks.

Usage as a library (tests put ``tools/`` on ``sys.path``)::

    from make_tiny_model import build_tiny_llama, train_tokenizer
    build_tiny_llama("/tmp/tiny", texts, hidden_size=128, num_layers=2)

Usage from the command line::

    python tools/make_tiny_model.py OUT_DIR --data configs/demo_data/train.jsonl \\
        [--vocab-size 1024 --hidden-size 256 --intermediate-size 688 --layers 4 \\
         --heads 4 --kv-heads 2 --tie --no-chat-template --split-digits --seed 0]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Iterable

BOS = "<|begin_of_text|>"
END_OF_TEXT = "<|end_of_text|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [BOS, END_OF_TEXT, IM_START, IM_END, PAD]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, chat_template: bool = True,
                    split_digits: bool = False):
    """Train a byte-level BPE tokenizer on ``texts`` and wrap it for transformers.

    Args:
        texts: training corpus (any iterable of strings).
        vocab_size: target vocabulary size, special tokens and the 256 byte
            symbols included.  The result can be smaller if the corpus runs
            out of merges; use ``len(tokenizer)`` for the real size.
        chat_template: if True, eos is ``<|im_end|>`` and a ChatML chat
            template is attached; if False, eos is ``<|end_of_text|>`` and
            ``tokenizer.chat_template`` is None.
        split_digits: if True, digits are pre-tokenized one by one, so no
            token holds more than one digit.

    Returns:
        A ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # add_prefix_space=False: a prefix space would be added on encode but not
    # removed on decode, breaking decode(encode(s)) == s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if split_digits:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), tok.pre_tokenizer])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        # Seed the vocab with all 256 byte symbols so that any input, even
        # characters never seen in training, stays encodable (no <unk>).
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS}:1 $B:1",
        special_tokens=[(BOS, bos_id)],
    )

    eos = IM_END if chat_template else END_OF_TEXT
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=eos,
        pad_token=PAD,
        # Cleanup would rewrite " ." -> "." etc. and break exact round-trips.
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    # The remaining specials are already in the vocab (the trainer added
    # them); registering them marks them special so skip_special_tokens works.
    hf_tok.add_special_tokens({"additional_special_tokens": [END_OF_TEXT, IM_START, IM_END]})
    hf_tok.chat_template = CHAT_TEMPLATE if chat_template else None
    return hf_tok


def build_tiny_llama(
    out_dir,
    texts,
    *,
    vocab_size: int = 1024,
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    tie_word_embeddings: bool = False,
    chat_template: bool = True,
    seed: int = 0,
    max_position_embeddings: int = 2048,
    rope_theta: float = 10000.0,
    split_digits: bool = False,
) -> str:
    """Train a tokenizer on ``texts`` and save it with a random tiny Llama.

    The model's ``vocab_size`` is ``len(tokenizer)`` (at most ``vocab_size``),
    so every embedding row corresponds to a real token.  Weights use the HF
    default init, float32, seeded with ``torch.manual_seed(seed)``; the whole
    build is deterministic for fixed texts and arguments.

    Writes config.json, model.safetensors, generation_config.json and the
    tokenizer files into ``out_dir`` (created if needed).

    Returns:
        ``out_dir`` as a string.
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = str(out_dir)
    tokenizer = train_tokenizer(list(texts), vocab_size=vocab_size, chat_template=chat_template,
                                split_digits=split_digits)
    bos_id = tokenizer.bos_token_id
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        # transformers 5 keeps the RoPE base inside rope_parameters (there is
        # no top-level rope_theta in config.json any more).
        rope_parameters={"rope_type": "default", "rope_theta": float(rope_theta)},
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )

    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    # save_pretrained may skip a generation config it considers default;
    # write it explicitly so eos_token_id is always on disk.
    model.generation_config.save_pretrained(out_dir)
    return out_dir


def read_jsonl_texts(path: str) -> list[str]:
    """Return the prompts and completions of a ``{"prompt", "completion"}`` JSONL file."""
    texts = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                texts.append(row["prompt"])
                texts.append(row["completion"])
    return texts


def main(argv: list[str] | None = None) -> None:
    """CLI entry point; see the module docstring."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--data", required=True, help="JSONL with prompt/completion fields")
    p.add_argument("--vocab-size", type=int, default=1024)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--tie", action="store_true", help="tie input and output embeddings")
    p.add_argument("--no-chat-template", action="store_true",
                   help="base-model tokenizer: eos <|end_of_text|>, no chat template")
    p.add_argument("--split-digits", action="store_true", help="one token per digit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    start = time.perf_counter()
    build_tiny_llama(
        args.out_dir,
        read_jsonl_texts(args.data),
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        tie_word_embeddings=args.tie,
        chat_template=not args.no_chat_template,
        seed=args.seed,
        split_digits=args.split_digits,
    )
    print(f"wrote {args.out_dir} in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
