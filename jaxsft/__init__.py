"""jaxsft: supervised fine-tuning of Hugging Face language models in JAX.

Entry points: `jaxsft.config.load_config`, `jaxsft.train.train`, `jaxsft.export.export`,
`jaxsft.models.from_pretrained`; the `jaxsft` command wraps them (`jaxsft/cli.py`).
"""

__version__ = "0.1.0"
