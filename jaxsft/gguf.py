"""GGUF file -> Hugging Face model directory that jaxsft trains and transformers loads unchanged.

    jaxsft import-gguf FILE.gguf OUT_DIR [--dtype float32|bfloat16]

transformers reads the file (`from_pretrained(dir, gguf_file=name)`, which needs the `gguf`
package: `pip install "jaxsft[gguf]"`): it maps the GGUF metadata to a config, dequantizes every
tensor and converts the GGUF tokenizer to a fast one with its chat template. `save_pretrained`
refuses a model loaded that way, so the pieces are written here: `config.json` from the config
(no quantization fields: the weights are plain floats now), the weights as safetensors by
`jaxsft.hfwrite`, as `jaxsft export` writes them (one tensor at a time; a tied head is the embedding,
so it is not written twice), the tokenizer files and `generation_config.json`.

An architecture jaxsft cannot train is refused by name before any tensor is dequantized, and the
resulting config is checked by the same code `jaxsft.models.from_pretrained` reads it with.

Atomic as `jaxsft export` is: everything goes into `.OUT.partial-PID` next to OUT, renamed to OUT
at the very end; an error removes it, so a truncated or unsupported file leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxsft.errors import JaxsftError, ModelError
from jaxsft.hfwrite import Tensor, building, check_dtype, check_new_output, natural_order, parse_size, write_weights
from jaxsft.models.families import SUPPORTED_MODEL_TYPES, args_from_hf_config



def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or e.__class__.__name__


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401 - transformers' GGUF loader imports it itself
    except ImportError:
        raise JaxsftError('reading GGUF files needs the gguf package: pip install "jaxsft[gguf]" '
                          '(or pip install "gguf>=0.17")') from None


def read_gguf_metadata(path: str | Path) -> tuple[str, dict]:
    """`(GGUF architecture, config dict)` of a GGUF file as transformers maps its metadata; no
    tensor is read. A file that is not GGUF or is cut short is a `ModelError` naming it."""
    path = Path(path)
    _require_gguf()
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint, read_field

    try:
        # The reader builds a view of every tensor as it opens the file: one cut short fails here.
        architecture = read_field(GGUFReader(path), "general.architecture")
    except Exception as e:  # noqa: BLE001 - a damaged file fails in numpy, struct or gguf, each its own way
        raise ModelError(f"{path}: not a readable GGUF file, or cut short ({_one_line(e)})") from None
    if not architecture:
        raise ModelError(f"{path}: the GGUF metadata has no general.architecture")
    architecture = str(architecture[0])
    try:
        config = load_gguf_checkpoint(str(path))["config"]
    except Exception as e:  # noqa: BLE001 - metadata transformers cannot map, each its own way
        if "not supported" in str(e):  # "GGUF model with architecture ... is not supported yet."
            raise ModelError(f"{path}: GGUF architecture {architecture!r} cannot be imported: transformers' GGUF "
                             f"loader does not read it (jaxsft trains {', '.join(SUPPORTED_MODEL_TYPES)})") from None
        raise ModelError(f"{path}: transformers could not read the GGUF metadata ({_one_line(e)})") from None
    return architecture, config


def check_model_type(path: Path, architecture: str, config: dict) -> None:
    """Refuses, naming the architecture, a model type that is none of jaxsft's families."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        called = "" if model_type == architecture else f" (model type {model_type!r})"
        raise ModelError(f"{path}: GGUF architecture {architecture!r}{called} is not one jaxsft can train "
                         f"(jaxsft trains {', '.join(SUPPORTED_MODEL_TYPES)})")


def check_trainable(path: Path, architecture: str, config: dict) -> None:
    """Refuses, naming the architecture, a config `jaxsft.models` cannot build: its model type or
    one of its settings (RoPE type, activation, layer types)."""
    check_model_type(path, architecture, config)
    try:
        args_from_hf_config(config)
    except ModelError as e:
        raise ModelError(f"{path}: GGUF architecture {architecture!r}: {e}") from None


def _hf_config(model, dtype: str) -> dict:
    """The model's config as `save_pretrained` writes it (what differs from the class defaults),
    without quantization fields or private ones."""
    config = {k: v for k, v in model.config.to_diff_dict().items() if "quantiz" not in k and not k.startswith("_")}
    config["architectures"] = [type(model).__name__]
    config["dtype"] = dtype
    return config


def _tensors(model) -> list[Tensor]:
    """The state dict as tensors to write (float32 numpy on read; the writer casts), by name; a tied
    head shares the embedding's storage and is not written."""
    import torch

    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state = {k: v for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    return [Tensor(k, tuple(v.shape), lambda v=v: v.detach().to(torch.float32).numpy())
            for k, v in sorted(state.items(), key=lambda kv: natural_order(kv[0]))]


def _load(path: Path, dtype: str):
    """`(model, tokenizer)` from transformers' GGUF loader, errors in one line naming the file."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     dtype=getattr(torch, dtype))
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # noqa: BLE001 - transformers' loading errors vary (OSError, ValueError, KeyError, ...)
        raise ModelError(f"{path}: transformers could not load the GGUF file ({_one_line(e)})") from None
    return model, tokenizer


def import_gguf(gguf_file: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Writes the Hugging Face directory `out` (which must not exist or be empty) from a GGUF file,
    its weights dequantized to `dtype`; returns `out`."""
    path, out = Path(gguf_file).absolute(), Path(out).absolute()
    check_dtype(dtype, "import-gguf")
    if not path.is_file():
        raise ModelError(f"GGUF file not found: {path}")
    check_new_output(out, "import-gguf")
    architecture, config = read_gguf_metadata(path)
    check_model_type(path, architecture, config)  # before the slow part, dequantizing
    model, tokenizer = _load(path, dtype)
    hf_config = _hf_config(model, dtype)
    check_trainable(path, architecture, hf_config)
    with building(out, "import-gguf") as tmp:
        write_weights(tmp, _tensors(model), dtype, parse_size("5GB"))
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        tokenizer.save_pretrained(str(tmp))
        model.generation_config.save_pretrained(str(tmp))
    return out
