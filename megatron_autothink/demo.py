"""``autothink demo``: the tiny end-to-end pipeline on CPU, resumable phase by phase.

Phases (each leaves ``<out>/.done/<phase>``; a rerun skips finished phases, and training resumes
inside a phase from its checkpoints):

1. ``prep``        digits train/test shards, the text-only variant, the tiny tokenizer;
2. ``anneal``      bi-mode annealing (SFT on mixed thinking / direct answers);
3. ``eval_before`` greedy eval of the annealed model in auto/long/short on the test split;
4. ``rl``          LMM-R1-style text-only RL (stage ``fre``), then BPO on the images (``bpo``);
5. ``eval_after``  the same eval on the final RL checkpoint;
6. ``export``      HF directory of the final model, reloaded in transformers, one test answer;
7. ``report``      report.md + PNG plots (``megatron_autothink.report``).

Training runs through ``train.run.main`` on ``recipes/demo_tiny.yaml`` (``--smoke``:
``demo_smoke.yaml``) with the data paths of this run filled in.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_autothink.config import AutothinkConfig, load_config

log = logging.getLogger("megatron_autothink.demo")

PHASES = ("prep", "anneal", "eval_before", "rl", "eval_after", "export", "report")


class DemoSettings:
    """Sizes of one demo flavour (the recipe holds the training settings)."""

    def __init__(self, smoke: bool) -> None:
        self.recipe = "demo_smoke" if smoke else "demo_tiny"
        self.n_train = 400 if smoke else 4000
        # 500 test questions: ~100 per difficulty, so the 2-point accuracy goal is above the
        # 1-sample granularity (~3 points at 150 questions).
        self.n_test = 30 if smoke else 500
        self.eval_limit: int | None = 12 if smoke else None
        self.max_new_tokens = 48 if smoke else 96


def build_config(out: Path, s: DemoSettings) -> AutothinkConfig:
    """The recipe with this run's folders: every stage gets its own train_path."""
    data = out / "data"
    cfg = load_config(
        s.recipe,
        [
            f"data.train_path={data / 'digits'}",
            f"data.eval_path={data / 'digits'}",
            f"data.tokenizer_path={data / 'digits' / 'tokenizer'}",
            f"logging.run_dir={out / 'run'}",
        ],
    )
    stages = [
        st.model_copy(
            update={
                "train_path": str(data / ("digits_text" if st.text_only else "digits")),
            }
        )
        for st in cfg.stages
    ]
    return cfg.model_copy(update={"stages": stages})


def _phase_prep(out: Path, s: DemoSettings, cfg: AutothinkConfig) -> dict[str, Any]:
    from megatron_autothink.data.digits import prep_digits
    from megatron_autothink.data.tokenizer import build_tiny_tokenizer

    data = out / "data"
    for name, text_only in (("digits", False), ("digits_text", True)):
        prep_digits(
            str(data / name),
            n_train=s.n_train,
            n_test=s.n_test,
            seed=0,
            text_only=text_only,
            progress=False,
        )
    tok = data / "digits" / "tokenizer"
    if not (tok / "tokenizer.json").is_file():
        build_tiny_tokenizer(str(tok))
    return {"train": s.n_train, "test": s.n_test}


def _run_stages(cfg: AutothinkConfig, n: int) -> None:
    from megatron_autothink.train.run import main as train_main

    rc = train_main(cfg.model_copy(update={"stages": cfg.stages[:n]}))
    if rc != 0:
        raise RuntimeError(f"training exited with code {rc}")


def _stage_dir(cfg: AutothinkConfig, stage: str) -> Path:
    return Path(cfg.logging.run_dir) / "checkpoints" / stage


def _eval(out: Path, s: DemoSettings, cfg: AutothinkConfig, stage: str, name: str) -> Any:
    from megatron_autothink.eval.runner import evaluate

    summary = evaluate(
        _stage_dir(cfg, stage),
        str(out / "data" / "digits"),
        split="test",
        limit=s.eval_limit,
        out=out / name,
        max_new_tokens=s.max_new_tokens,
    )
    print((out / name / "summary.md").read_text())
    return summary["goals"]


def _phase_export(out: Path, s: DemoSettings, cfg: AutothinkConfig) -> dict[str, Any]:
    """Export the final checkpoint to HF, reload it in transformers, answer one test prompt."""
    import shutil

    import torch
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from megatron_autothink.data.image_processing import image_config
    from megatron_autothink.eval.model import export_training_checkpoint, latest_iter
    from megatron_autothink.eval.runner import load_prompts

    last = cfg.stages[-1].name
    hf = out / "hf_model"
    shutil.rmtree(hf, ignore_errors=True)  # a half-written export from an interrupted run
    export_training_checkpoint(latest_iter(_stage_dir(cfg, last)), hf)
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


def _phase_report(out: Path, s: DemoSettings, cfg: AutothinkConfig) -> dict[str, Any]:
    from megatron_autothink.report import write_report

    return {"report": str(write_report(out))}


def run_demo(out: Path, smoke: bool) -> dict[str, Any]:
    """Run (or resume) every phase; return ``{phase: result}`` of the phases run now."""
    s = DemoSettings(smoke)
    out.mkdir(parents=True, exist_ok=True)
    done = out / ".done"
    done.mkdir(exist_ok=True)
    cfg = build_config(out, s)
    n_stages = len(cfg.stages)
    steps: dict[str, Callable[[], Any]] = {
        "prep": lambda: _phase_prep(out, s, cfg),
        "anneal": lambda: _run_stages(cfg, 1),
        "eval_before": lambda: _eval(out, s, cfg, cfg.stages[0].name, "eval_before"),
        "rl": lambda: _run_stages(cfg, n_stages),
        "eval_after": lambda: _eval(out, s, cfg, cfg.stages[-1].name, "eval_after"),
        "export": lambda: _phase_export(out, s, cfg),
        "report": lambda: _phase_report(out, s, cfg),
    }
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
    total = time.perf_counter() - t_start
    timing = {p: json.loads((done / p).read_text())["seconds"] for p in PHASES}
    (out / "timing.json").write_text(json.dumps({"this_run_s": total, "phases_s": timing}))
    print(
        f"[demo] total wall time {total:.1f}s this run "
        f"(all phases incl. earlier runs: {sum(timing.values()):.1f}s); report: {out / 'report.md'}"
    )
    return results


def main(args: argparse.Namespace) -> int:
    """Entry of ``autothink demo`` (``args.out``, ``args.smoke``)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    run_demo(Path(args.out), bool(args.smoke))
    return 0
