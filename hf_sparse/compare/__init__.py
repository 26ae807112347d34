"""``hf-sparse compare``: methods x densities x seeds side by side, and the accuracy-density curves."""

from .grid import GridRun, plan_grid, run_grid
from .summary import write_summary

__all__ = ["GridRun", "plan_grid", "run_grid", "write_summary"]
