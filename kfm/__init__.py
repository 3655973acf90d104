"""kfm: pretrain a domain foundation model from scratch."""

__version__ = "0.1.0"
