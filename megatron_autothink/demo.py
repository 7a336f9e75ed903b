"""``autothink demo``: the R-4B / VL-Rethinker effects reproduced at tiny scale on CPU, resumable
phase by phase (issue #19; the study that picked every setting: docs/demo_study.md).

Phases (each leaves ``<out>/.done/<phase>``; a rerun skips finished phases, and training resumes
inside a phase from its checkpoints):

1. ``prep``         the digits-depth task (four handwritten digits per image, five levels of
   computation depth), train/test shards and the tiny tokenizer;
2. ``anneal``       bi-mode annealing from scratch on the naive mix (thinking atrophy);
3. ``eval_anneal``  greedy auto / long / short eval, and auto mode sampled at temperature 1
   (its thinking rate estimates the policy's P(think) per level);
4. ``curate``       a short continuation whose think ratio rises with the level;
5. ``eval_curate``
6. ``bpo``          Bi-mode Policy Optimization from the curated checkpoint;
7. ``eval_bpo``
8. ``grpo``         the control: plain GRPO from the same checkpoint, same rollouts per step;
9. ``eval_grpo``
10. ``ssr``         the same GRPO with Selective Sample Replay (its advantages per step);
11. ``export``      HF directory of the BPO model, reloaded in transformers, one test answer;
12. ``report``      report.md, the goal table and PNGs (``megatron_autothink.report``).

Training runs through ``pipeline.main`` on ``recipes/demo_tiny.yaml`` (``--smoke``:
``demo_smoke.yaml``), whose stages are named like the training phases, with this run's data
paths, ``--seed`` and any dotted overrides applied. The settings are recorded in
``<out>/demo_args.json``; resuming with other settings is refused (it would mix two runs).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from megatron_autothink.config import AutothinkConfig, ConfigError, load_config

log = logging.getLogger("megatron_autothink.demo")

TRAIN_PHASES = ("anneal", "curate", "bpo", "grpo", "ssr")
# eval phase -> the stage it evaluates
EVAL_PHASES = {
    "eval_anneal": "anneal",
    "eval_curate": "curate",
    "eval_bpo": "bpo",
    "eval_grpo": "grpo",
}
PHASES = (
    "prep",
    "anneal",
    "eval_anneal",
    "curate",
    "eval_curate",
    "bpo",
    "eval_bpo",
    "grpo",
    "eval_grpo",
    "ssr",
    "export",
    "report",
)
SAMPLED = "sampled"  # <eval dir>/sampled: auto mode at temperature 1


class DemoSettings:
    """Sizes of one demo flavour (the recipe holds the training settings)."""

    def __init__(self, smoke: bool) -> None:
        self.recipe = "demo_smoke" if smoke else "demo_tiny"
        # 40k samples: the 1500-step anneal sees each about twice (8 packed rows of ~7 samples)
        self.n_train = 400 if smoke else 40_000
        # 1200 test questions: >= 200 per level (levels are drawn uniformly), so a 3-point gap
        # is 6 questions
        self.n_test = 30 if smoke else 1200
        self.eval_limit: int | None = 10 if smoke else None
        self.max_new_tokens = 96


def build_config(
    out: Path, s: DemoSettings, seed: int | None = None, overrides: Sequence[str] = ()
) -> AutothinkConfig:
    """The recipe with this run's data and run folders, ``train.seed`` and ``overrides``."""
    data = out / "data" / "digits"
    extra = [f"train.seed={seed}"] if seed is not None else []
    cfg = load_config(
        s.recipe,
        [
            f"data.train_path={data}",
            f"data.eval_path={data}",
            f"data.tokenizer_path={data / 'tokenizer'}",
            f"logging.run_dir={out / 'run'}",
            *extra,
            *overrides,
        ],
    )
    names = tuple(st.name for st in cfg.stages)
    if names != TRAIN_PHASES:
        raise ConfigError(
            f"{s.recipe}: the demo's stages must be {list(TRAIN_PHASES)} in that order, got "
            f"{list(names)}"
        )
    return cfg


def _check_args(out: Path, args: dict[str, Any]) -> None:
    """Record this run's settings; refuse to resume a demo folder made with other ones."""
    path = out / "demo_args.json"
    if path.is_file():
        before = json.loads(path.read_text())
        if before != args:
            raise SystemExit(
                f"{out} holds a demo run with other settings ({before}); this run asks for "
                f"{args}. Use another --out, or delete {out} to start over."
            )
    else:
        path.write_text(json.dumps(args, indent=1))


def _phase_prep(out: Path, s: DemoSettings) -> dict[str, Any]:
    from megatron_autothink.data.digits import DigitsConfig, prep_digits

    prep_digits(
        str(out / "data" / "digits"),
        n_train=s.n_train,
        n_test=s.n_test,
        seed=0,
        config=DigitsConfig(family="depth", depth_split_sum=True),
        progress=False,
    )
    return {"train": s.n_train, "test": s.n_test}


def _run_stages(cfg: AutothinkConfig, stage: str) -> dict[str, Any]:
    """Train up to and including ``stage`` (earlier finished stages are skipped by the run)."""
    from megatron_autothink.pipeline import main as train_main

    n = TRAIN_PHASES.index(stage) + 1
    rc = train_main(cfg.model_copy(update={"stages": cfg.stages[:n]}))
    if rc != 0:
        raise RuntimeError(f"training exited with code {rc}")
    return {"stage": stage, "steps": cfg.stages[n - 1].steps}


def _stage_dir(cfg: AutothinkConfig, stage: str) -> Path:
    return Path(cfg.logging.run_dir) / "checkpoints" / stage


def _eval(out: Path, s: DemoSettings, cfg: AutothinkConfig, name: str) -> dict[str, Any]:
    """Greedy auto / long / short into ``out/name``, auto sampled at T = 1 into ``.../sampled``."""
    from megatron_autothink.eval.runner import evaluate

    kw: dict[str, Any] = {
        "split": "test",
        "limit": s.eval_limit,
        "max_new_tokens": s.max_new_tokens,
    }
    model = _stage_dir(cfg, EVAL_PHASES[name])
    greedy = evaluate(model, str(out / "data" / "digits"), out=out / name, temperature=0.0, **kw)
    print((out / name / "summary.md").read_text())
    evaluate(
        model,
        str(out / "data" / "digits"),
        modes=("auto",),
        out=out / name / SAMPLED,
        temperature=1.0,
        **kw,
    )
    auto = greedy["modes"]["auto"]["all"]
    return {"auto_accuracy": auto["accuracy"], "auto_think_rate": auto["think_rate"]}


def _phase_export(out: Path, s: DemoSettings, cfg: AutothinkConfig) -> dict[str, Any]:
    """Export the BPO checkpoint to HF, reload it in transformers, answer one test prompt."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from megatron_autothink.data.image_processing import image_config
    from megatron_autothink.eval.model import export_training_checkpoint, latest_iter
    from megatron_autothink.eval.runner import load_prompts

    hf = out / "hf_model"
    shutil.rmtree(hf, ignore_errors=True)  # a half-written export from an interrupted run
    export_training_checkpoint(latest_iter(_stage_dir(cfg, "bpo")), hf)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(hf), dtype=torch.float32)
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(hf))
    p = load_prompts(
        str(out / "data" / "digits"), str(hf), image_config(cfg), split="test", limit=1
    )[0]
    # Auto mode (no prefill): the model picks thinking or a direct answer itself. A plain greedy
    # loop without KV cache (tiny model) avoids generate()'s mRoPE-state handling.
    ids = list(p.prompt_ids)
    eos: Any = tok.convert_tokens_to_ids("<|im_end|>")
    pad = int(model.config.image_token_id)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(s.max_new_tokens):
            x = torch.tensor([ids + new])
            model.model.rope_deltas = None
            logits = model(
                input_ids=x,
                pixel_values=p.pixel_values,
                image_grid_thw=p.image_grid_thw,
                mm_token_type_ids=(x == pad).int(),
                use_cache=False,
            ).logits
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            if nxt == eos:
                break
    question = str(tok.decode([t for t in p.prompt_ids if t != pad], skip_special_tokens=True))
    answer = str(tok.decode(new, skip_special_tokens=True))
    print(f"[export] transformers reloaded {hf}\n  question: {question.strip()[-160:]}")
    print(f"  answer:   {answer!r}\n  truth:    {p.answer}")
    result = {"hf_dir": str(hf), "question": question, "answer": answer, "truth": p.answer}
    (out / "hf_answer.json").write_text(json.dumps(result, indent=1))
    return result


def _phase_report(out: Path) -> dict[str, Any]:
    from megatron_autothink.report import write_report

    return {"report": str(write_report(out))}


def run_demo(
    out: Path, smoke: bool, seed: int | None = None, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """Run (or resume) every phase; return ``{phase: result}`` of the phases run now."""
    s = DemoSettings(smoke)
    cfg = build_config(out, s, seed, overrides)  # a bad override fails before any work
    out.mkdir(parents=True, exist_ok=True)
    _check_args(out, {"smoke": smoke, "seed": cfg.train.seed, "overrides": list(overrides)})
    done = out / ".done"
    done.mkdir(exist_ok=True)
    steps: dict[str, Callable[[], Any]] = {"prep": lambda: _phase_prep(out, s)}
    for st in TRAIN_PHASES:
        steps[st] = lambda st=st: _run_stages(cfg, st)  # type: ignore[misc]
    for ev in EVAL_PHASES:
        steps[ev] = lambda ev=ev: _eval(out, s, cfg, ev)  # type: ignore[misc]
    steps["export"] = lambda: _phase_export(out, s, cfg)
    steps["report"] = lambda: _phase_report(out)
    t_start = time.perf_counter()
    results: dict[str, Any] = {}
    for i, phase in enumerate(PHASES, 1):
        marker = done / phase
        if marker.exists():
            print(f"[demo {i}/{len(PHASES)}] {phase}: done before, skipped", flush=True)
            continue
        print(f"[demo {i}/{len(PHASES)}] {phase} ...", flush=True)
        t0 = time.perf_counter()
        results[phase] = steps[phase]()
        dt = time.perf_counter() - t0
        marker.write_text(json.dumps({"seconds": dt, "result": results[phase]}, default=str))
        print(f"[demo {i}/{len(PHASES)}] {phase} finished in {dt:.1f}s", flush=True)
        if phase != "report" and (done / "report").exists():
            (done / "report").unlink()  # a phase rerun after the report: write it again
    total = time.perf_counter() - t_start
    timing = {p: json.loads((done / p).read_text())["seconds"] for p in PHASES}
    (out / "timing.json").write_text(json.dumps({"this_run_s": total, "phases_s": timing}))
    print(
        f"[demo] total wall time {total:.1f}s this run "
        f"(all phases incl. earlier runs: {sum(timing.values()):.1f}s); report: {out / 'report.md'}"
    )
    return results


def main(args: argparse.Namespace) -> int:
    """Entry of ``autothink demo`` (``args.out``, ``args.smoke``, ``args.seed``,
    ``args.overrides``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_demo(
        Path(args.out),
        bool(args.smoke),
        getattr(args, "seed", None),
        list(getattr(args, "overrides", []) or []),
    )
    return 0
