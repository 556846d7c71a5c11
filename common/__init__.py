"""Shared code of the five CIL scripts: the method-facing core (data, batches, memory, models, evaluation, which
import only each other, errors and dist) and the harness around a run. One line a module: README, "Layout"."""
