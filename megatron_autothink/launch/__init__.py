"""SLURM launcher: render, check and submit sbatch scripts; the trainer's pre-emption helper.

``render.render_sbatch`` is a pure function (config + options -> script text); ``checks`` fails
bad launches before submission; ``submit`` writes the run directory and calls ``sbatch``;
``preempt`` is what the trainer uses to honour the checkpoint-and-requeue protocol; ``cli`` is
``autothink launch``. See docs/launch.md.
"""

from megatron_autothink.launch.checks import LaunchError
from megatron_autothink.launch.options import ContainerOptions, SlurmOptions, parse_slurm_time
from megatron_autothink.launch.preempt import PreemptionWatcher, marker_path, write_marker
from megatron_autothink.launch.render import render_sbatch

__all__ = [
    "ContainerOptions",
    "LaunchError",
    "PreemptionWatcher",
    "SlurmOptions",
    "marker_path",
    "parse_slurm_time",
    "render_sbatch",
    "write_marker",
]
