"""ds-mlm: pretrain RoBERTa masked language models with DeepSpeed, from folders of text files."""

__version__ = "0.1.0"
