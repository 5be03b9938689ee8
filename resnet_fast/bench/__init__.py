"""`resnet-fast bench`: cli (flags, plan, run), contenders (the models raced), timing, report (table, JSON, CSV).

timing is also the clock of the benchmarks/ scripts that time calls themselves, so their numbers
and bench's are taken the same way.
"""
from .cli import add_arguments, main, run

__all__ = ["add_arguments", "main", "run"]
