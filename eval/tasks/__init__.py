"""kfm's benchmark tasks for lm-evaluation-harness: YAML task configs read by
`lm_eval.tasks.TaskManager(include_path=TASKS_DIR)`, documents built from `eval.registry`."""

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
"""The folder of kfm's task YAML files (an lm-eval include path)."""
