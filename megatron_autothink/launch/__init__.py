"""SLURM launcher: render, check and submit sbatch scripts.

``render.render_sbatch`` is a pure function (config + options -> script text); ``checks`` fails
bad launches before submission; ``submit`` writes the run directory and calls ``sbatch``;
``cli`` is ``autothink launch``. The trainer's side of the checkpoint-and-requeue protocol the
scripts set up is ``train/preempt.py``. See docs/launch.md.
"""

from megatron_autothink.launch.checks import LaunchError
from megatron_autothink.launch.options import ContainerOptions, SlurmOptions, parse_slurm_time
from megatron_autothink.launch.render import render_sbatch

__all__ = [
    "ContainerOptions",
    "LaunchError",
    "SlurmOptions",
    "parse_slurm_time",
    "render_sbatch",
]
