"""qlora: QLoRA fine-tuning of open LLMs, driven by Hydra configs.

Importing the package loads neither torch nor bitsandbytes; the modules that need them import them.
"""

__version__ = "0.2.0"
