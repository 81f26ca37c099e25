"""shardquant: stream a safetensors checkpoint to NVFP4 or FP8 without building the model."""
__version__ = "0.2.0"
