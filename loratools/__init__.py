"""loratools: LoRA/QLoRA adapter algebra and model conversion on checkpoints on disk."""
__version__ = "0.1.0"
