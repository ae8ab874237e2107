"""Experiments over many runs: the accuracy suite's definition (profiles, methods, task groups), its results file,
and the val-only selection of settings (grid, choose, plan). ``benchmarks/suite.py`` runs it; ``benchmarks/report.py``
writes docs/RESULTS.md from its results. The PEFT baseline is a training method of the engine (``peft_lora``)."""

from heartlora.experiments.selection import (
    FORMAT,
    Profile,
    choose,
    grid_points,
    load_results,
    next_run,
    plan,
    records_by_id,
    run_id,
    save_results,
    settings_tag,
)
from heartlora.experiments.suite import FEWSHOT, GROUPS, METHODS, NATURAL, PROFILES, STRUCTURED, group_of, machine

__all__ = ["FEWSHOT", "FORMAT", "GROUPS", "METHODS", "NATURAL", "PROFILES", "STRUCTURED", "Profile", "choose",
           "grid_points", "group_of", "load_results", "machine", "next_run", "plan", "records_by_id", "run_id", "save_results",
           "settings_tag"]
