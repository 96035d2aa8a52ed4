import os

os.environ["HF_HUB_OFFLINE"] = "1"  # a stray hub call fails fast instead of hanging
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
