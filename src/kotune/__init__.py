"""kotune: fine-tune Korean language models with LoRA.

Submodules are independent stages — config, data, prompt, model, train,
generate — importable on their own; importing `kotune` itself loads nothing heavy.
"""

__version__ = "0.1.0"
