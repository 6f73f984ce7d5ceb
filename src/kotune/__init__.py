"""kotune: fine-tune Korean language models with LoRA.

Submodules are stages — config, data, prepare, train, infer, retrieval, evaluate, serve — importable on their own
(docs/architecture.md); importing `kotune` itself loads nothing heavy.
"""

__version__ = "0.1.0"
