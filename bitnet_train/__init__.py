"""bitnet_train: BitNet b1.58 training, export and runtime."""
__version__ = "0.1.0"
