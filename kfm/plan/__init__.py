"""Capacity planner: step time, tokens/s, MFU, memory and days for a config on a GPU allocation.

`kfm plan CONFIG --nodes N` (kfm_cli/plan.py) is the front end; see kfm/plan/README.md. This
package file imports nothing, so `kfm.model.flops` can read `kfm.plan.hardware` (the one table of
GPU figures) without pulling in the planner.
"""
