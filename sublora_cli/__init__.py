"""sublora: shrink saved LoRA adapters with second-order, submodular rank allocation."""

__version__ = "0.1.0"
