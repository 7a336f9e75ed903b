"""Bad launches fail before submission with a message that says what to fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_autothink.config import load_config
from megatron_autothink.launch.checks import (
    LaunchError,
    check_container,
    check_layout,
    check_resume,
    check_writable_dir,
    preflight,
)
from megatron_autothink.launch.options import SlurmOptions, parse_slurm_time
from tests.launch.cases import EXAMPLE_RECIPES, REPO


def test_slurm_time_formats() -> None:
    assert parse_slurm_time("90") == 5400
    assert parse_slurm_time("10:30") == 630
    assert parse_slurm_time("04:00:00") == 14400
    assert parse_slurm_time("2-00") == 172800
    assert parse_slurm_time("1-02:03") == 93780
    assert parse_slurm_time("1-02:03:04") == 93784
    with pytest.raises(ValueError, match="not a SLURM time"):
        parse_slurm_time("4h")


def test_gpus_per_node_must_fit_tensor_parallel() -> None:
    cfg = load_config(REPO / EXAMPLE_RECIPES["anneal_7b"], ["parallel.tp=4"])
    with pytest.raises(LaunchError, match=r"parallel.tp=4 does not divide the 6 GPUs"):
        check_layout(cfg, SlurmOptions(nodes=2, gpus_per_node=6))


def test_world_size_must_be_divisible_by_model_parallel() -> None:
    cfg = load_config("tiny_cpu", ["parallel.pp=2"])
    with pytest.raises(
        LaunchError, match=r"1 node\(s\) x 3 CPU ranks = world size 3 .*tp\*pp\*cp=2"
    ):
        check_layout(cfg, SlurmOptions(nodes=1, gpus_per_node=0, procs_per_node=3))


def test_global_batch_must_divide_across_data_parallel() -> None:
    cfg = load_config("tiny_cpu")  # global batch 8, micro batch 2
    with pytest.raises(LaunchError, match=r"data\.global_batch_size: 8 is not divisible"):
        check_layout(cfg, SlurmOptions(nodes=8, gpus_per_node=0, procs_per_node=1))


def test_cpu_jobs_cannot_use_gpu_only_features() -> None:
    cfg = load_config("tiny_cpu", ["parallel.backend=nccl"])
    with pytest.raises(LaunchError, match="nccl needs GPUs"):
        check_layout(cfg, SlurmOptions(gpus_per_node=0))


def test_example_layouts_fit_1_2_8_nodes() -> None:
    for path in EXAMPLE_RECIPES.values():
        cfg = load_config(REPO / path)
        for nodes in (1, 2, 8):
            check_layout(cfg, SlurmOptions(nodes=nodes))


def test_container_needs_an_image() -> None:
    with pytest.raises(LaunchError, match="--container pyxis needs an image"):
        check_container(SlurmOptions(container={"runtime": "pyxis"}))
    with pytest.raises(LaunchError, match="no container runtime"):
        check_container(SlurmOptions(container={"image": "x.sif"}))


def test_container_image_file_must_exist(tmp_path: Path) -> None:
    missing = tmp_path / "missing.sif"
    with pytest.raises(LaunchError, match="does not exist"):
        check_container(SlurmOptions(container={"runtime": "apptainer", "image": str(missing)}))
    missing.write_text("")
    check_container(SlurmOptions(container={"runtime": "apptainer", "image": str(missing)}))
    # registry references cannot be checked here and pass
    check_container(SlurmOptions(container={"runtime": "pyxis", "image": "nvcr.io#nvidia/x:1"}))
    check_container(SlurmOptions(container={"runtime": "apptainer", "image": "docker://a/b:1"}))
    with pytest.raises(LaunchError, match="enroot syntax"):
        check_container(SlurmOptions(container={"runtime": "pyxis", "image": "docker://a/b:1"}))


def test_unwritable_run_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(LaunchError, match=r"is not writable: .*file is not a directory"):
        check_writable_dir(blocker / "run", "run directory", create=False)
    with pytest.raises(LaunchError, match="whitespace"):
        check_writable_dir(tmp_path / "a b", "run directory", create=False)


def test_read_only_file_system_is_detected() -> None:
    ro = Path("/proc/sys")  # read-only for everyone, root included
    with pytest.raises(LaunchError, match="not writable"):
        check_writable_dir(ro / "autothink-run", "run directory", create=True)


def test_dry_run_checks_create_nothing(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b"
    check_writable_dir(target, "run directory", create=False)
    assert not (tmp_path / "a").exists()
    check_writable_dir(target, "run directory", create=True)
    assert target.is_dir() and not list(target.iterdir())


def test_requeue_needs_resume() -> None:
    cfg = load_config("tiny_cpu", ["checkpoint.resume=false"])
    with pytest.raises(LaunchError, match="start again from step 0"):
        check_resume(cfg, SlurmOptions())
    assert check_resume(cfg, SlurmOptions(requeue=False)) == []
    cfg = load_config("tiny_cpu", ["checkpoint.save_on_signal=false"])
    (warning,) = check_resume(cfg, SlurmOptions())
    assert "last periodic checkpoint (every 100 steps)" in warning


def test_options_validation_messages() -> None:
    with pytest.raises(ValueError, match="one rank per GPU"):
        SlurmOptions(gpus_per_node=8, procs_per_node=4)
    with pytest.raises(ValueError, match="exclusive=false needs cpus_per_rank"):
        SlurmOptions(exclusive=False)
    with pytest.raises(ValueError, match="must be shorter than time"):
        SlurmOptions(time="5", signal_lead_s=300)
    with pytest.raises(ValueError, match="not a valid environment variable"):
        SlurmOptions(env={"NCCL IB": "x"})
    with pytest.raises(ValueError, match="SRC:DST"):
        SlurmOptions(container={"mounts": ["/only-one-path"]})
    with pytest.raises(ValueError, match="one long option"):
        SlurmOptions(sbatch_args=["-p h100"])


def test_preflight_resolves_relative_run_dir(tmp_path: Path) -> None:
    cfg = load_config("tiny_cpu", ["logging.run_dir=runs/x"])
    image = {"runtime": "apptainer", "image": "docker://a/b:1"}
    opts = SlurmOptions(gpus_per_node=0, time="01:00:00", container=image)
    assert preflight(cfg, opts, tmp_path, create=True) == []
    assert (tmp_path / "runs" / "x").is_dir()


def test_no_time_limit_and_no_container_are_warned_about() -> None:
    cfg = load_config("tiny_cpu")
    opts = SlurmOptions(gpus_per_node=0, python="/home/me/venv/bin/python")
    time_warning, host_warning = preflight(cfg, opts, Path("/tmp"), create=False)
    assert "no --time" in time_warning and "pass --time" in time_warning
    assert "/home/me/venv/bin/python" in host_warning and "--container" in host_warning
    # with a time limit and an image: nothing to say
    image = {"runtime": "pyxis", "image": "nvcr.io#x/y:1"}
    opts = SlurmOptions(gpus_per_node=0, time="4:00:00", container=image)
    assert preflight(cfg, opts, Path("/tmp"), create=False) == []


def _data_tree(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "shards": tmp_path / "lustre" / "data" / "shards",
        "model": tmp_path / "lustre" / "models" / "qwen",
        "work": tmp_path / "work",
    }
    for p in paths.values():
        p.mkdir(parents=True)
    return paths


def test_recipe_paths_must_exist(tmp_path: Path) -> None:
    t = _data_tree(tmp_path)
    opts = SlurmOptions(gpus_per_node=0, time="1:00:00")
    ok = [f"data.train_path={t['shards']}", f"train.init_from={t['model']}"]
    preflight(load_config("tiny_cpu", ok), opts, t["work"], create=True)
    missing = t["model"].parent / "qwen-typo"
    cfg = load_config("tiny_cpu", [ok[0], f"train.init_from={missing}"])
    with pytest.raises(LaunchError, match=r"train\.init_from=.*qwen-typo does not exist"):
        preflight(cfg, opts, t["work"], create=True)
    cfg = load_config("tiny_cpu", ["data.train_path=shards-typo"])  # relative to WORKDIR
    with pytest.raises(LaunchError, match=r"data\.train_path=shards-typo does not exist"):
        preflight(cfg, opts, t["work"], create=True)


def test_recipe_paths_must_be_inside_the_container(tmp_path: Path) -> None:
    t = _data_tree(tmp_path)
    lustre = tmp_path / "lustre"
    cfg = load_config(
        "tiny_cpu", [f"data.train_path={t['shards']}", f"data.tokenizer_path={t['model']}"]
    )
    opts = SlurmOptions(
        gpus_per_node=0,
        time="1:00:00",
        container={
            "runtime": "pyxis",
            "image": "nvcr.io#x/y:1",
            "mounts": [f"{lustre}/data:{lustre}/data"],
        },
    )
    with pytest.raises(LaunchError) as e:
        preflight(cfg, opts, t["work"], create=True)
    msg = str(e.value)
    assert f"data.tokenizer_path={t['model']} is not inside the container" in msg
    assert f"--mount {t['model']}:{t['model']}" in msg
    # mounted somewhere else: the host side of the mount must hold it
    opts.container.mounts = [
        f"{lustre}/data:{lustre}/data",
        f"{tmp_path}/elsewhere:{lustre}/models",
    ]
    with pytest.raises(LaunchError, match=r"host path .*elsewhere/qwen, through the mount"):
        preflight(cfg, opts, t["work"], create=True)
    opts.container.mounts = [f"{lustre}:{lustre}"]
    preflight(cfg, opts, t["work"], create=True)
    # what the ranks write must be mounted too
    cfg = load_config("tiny_cpu", [f"checkpoint.dir={tmp_path}/ckpt"])
    with pytest.raises(LaunchError, match=r"checkpoint\.dir=.*ckpt is not inside the container"):
        preflight(cfg, opts, t["work"], create=True)


def test_dry_run_reports_path_problems_as_warnings(tmp_path: Path) -> None:
    """--dry-run still prints the script of a recipe with placeholder paths, and says why it
    would not submit."""
    cfg = load_config("tiny_cpu", [f"data.train_path={tmp_path}/nope"])
    opts = SlurmOptions(gpus_per_node=0, time="1:00:00")
    *_, warning = preflight(cfg, opts, tmp_path, create=False)
    assert "nope does not exist" in warning and "an error when submitting" in warning
    with pytest.raises(LaunchError, match="nope does not exist"):
        preflight(cfg, opts, tmp_path, create=True)
