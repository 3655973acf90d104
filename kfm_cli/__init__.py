"""The `kfm` command line: the composition root above `kfm`, `eval` and `data_pipeline`.

It sits outside all three packages because it composes them (`kfm data run` runs the curation
pipeline, `kfm eval` the evaluation code); `kfm` itself never imports `eval` or `data_pipeline`.
"""

from kfm_cli.main import build_parser, main

__all__ = ["build_parser", "main"]
