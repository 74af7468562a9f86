"""Token editing (LLaDA2.1), measured: the same conversion trained with and without the T2T
stream, decoded in the Speed and Quality modes, against the fair AR baseline.

The base is `configs/tiny.yaml` as `make demo` trains it (trained first if it is not there).
Each variant repeats the base's conversion at the same budget (the same rows, steps and rates)
with the editing stream on, as a pipeline of its own (`<name>-t2t-<variant>`):
  - `none`: the base, no editing stream;
  - `in_sequence`: from the AR parent, CPT, SFT and CAP train both streams, replacements drawn
    from the row's own visible answer tokens (`editing:`'s defaults);
  - `uniform`: the same with replacements drawn from the vocabulary;
  - `in_sequence_post`: from the base's merged model, SFT and CAP only.
Every final (DPO) model answers the pipeline's held-out questions as the pipeline asks them
(`llada_ray.evaluation.evaluate`), at the plain served τ (no editing) and in each preset of
`evaluation.modes` (Speed, Quality), with and without multi-block editing; each merged model at
the plain τ; the model without editing also at τ 0.05 (the errors of a draft that takes nearly a
block per forward: what edits would have to repair). Each row keeps its
accuracy, TPF, repeated 3-gram share, edits and edit-only forwards per block (mean, p99). The AR
baseline (`ar_sft`) gives the accuracy and repetition to beat; speed is tokens/s at batch 1 on
the compiled engine, fastest of 3. The cache is checked against the uncached path on the same
questions (identical tokens).

    python bench/editing.py   → bench/results/editing.json and a table
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import ray
import torch
from decode import fastest, target
from levers import base_config, model_dir

from llada_ray.config import DecodeMode, EditingConfig, PipelineConfig
from llada_ray.data import tasks
from llada_ray.decoding import ARDecoder, BlockDecoder, Decoder, EngineOptions, Sampling
from llada_ray.evaluation import evaluate
from llada_ray.model import DiffusionLM, load_model
from llada_ray.pipeline.scheduler import run_pipeline
from llada_ray.train.plan import served_block_size

ROOT = Path(__file__).resolve().parent.parent
EXACTNESS_QUESTIONS = 64
DRAFT_TAU = 0.05  # below every preset: nearly every forward takes the whole block
# Each editing variant: (substitution, stages that train the T2T stream).
VARIANTS = {
    "in_sequence": ("in_sequence", ["cpt", "sft", "cap"]),
    "uniform": ("uniform", ["cpt", "sft", "cap"]),
    "in_sequence_post": ("in_sequence", ["sft", "cap"]),
}


def pipelines(base: PipelineConfig) -> dict[str, PipelineConfig]:
    """`none` (the base) and each variant: the base's conversion from its AR parent (post-
    training only, from its merged model, for a variant whose stream skips CPT) with only
    `editing` changed."""
    if base.editing is not None:
        raise SystemExit("bench/editing.py measures editing against a base without it: "
                         "configs/tiny.yaml must not set editing")  # fmt: skip
    out = {"none": base}
    for name, (substitution, stages) in VARIANTS.items():
        raw = base.model_dump(mode="json")
        raw["name"] = f"{base.name}-t2t-{name}"
        post = "cpt" not in stages
        raw["model"]["source"] = model_dir(base, "merge" if post else "ar_pretrain")
        raw["tokenizer"] = {"source": "model"}
        drop = ("ar_pretrain", "ar_sft", *(("cpt", "merge") if post else ()))
        raw["stages"] = [s for s in raw["stages"] if s["stage"] not in drop]
        raw["editing"] = {"substitution": substitution, "stages": stages}
        out[name] = PipelineConfig.model_validate(raw)
    return out


def train(base: PipelineConfig) -> dict[str, PipelineConfig]:
    say = lambda line: print(line, flush=True)  # noqa: E731
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        run_pipeline(base, say=say)
        out = pipelines(base)
        for cfg in out.values():
            run_pipeline(cfg, say=say)
    finally:
        ray.shutdown()
    return out


TRAINED = {
    "none": "no editing",
    "in_sequence": "editing, in-sequence (CPT, SFT, CAP)",
    "uniform": "editing, uniform (CPT, SFT, CAP)",
    "in_sequence_post": "editing, in-sequence (SFT, CAP)",
}


def describe(name: str, mode: DecodeMode, multi_block: bool) -> str:
    how = f"τ {mode.threshold}" if mode.edit_threshold is None else (
        f"{name.capitalize()}: τ_mask {mode.threshold}, τ_edit {mode.edit_threshold}")  # fmt: skip
    return how + (", multi-block" if multi_block else "")


def sampling(mode: DecodeMode, max_new: int) -> Sampling:
    return Sampling(**mode.model_dump(), max_new_tokens=max_new)


def main() -> None:
    torch.set_num_threads(os.cpu_count() or 1)
    base = base_config()
    configs = train(base)
    ev = base.evaluation
    examples = tasks.examples(ev.seed, 0, ev.task_examples, "heldout", base.data.task)
    print(f"questions: {tasks.counts(base.data, ev.task_examples)}", flush=True)
    block = served_block_size(base)
    plain = DecodeMode(threshold=ev.threshold)
    modes = {"plain": plain} | dict(ev.modes)
    batched = EngineOptions(ev.batch_size, ev.decoding.length_bucket)
    results: dict[str, dict] = {}
    table: list[tuple[str, str, str]] = []  # the README's: (result, trained with, decodes)

    def run(row: str, trained: str, how: str, decoder: Decoder, mode: DecodeMode) -> None:
        result = evaluate(decoder, tok, examples, sampling(mode, ev.max_new_tokens)).summary()
        results[row] = result
        table.append((row, trained, how))
        print(f"{row:<26} accuracy {result['accuracy']:.3f} TPF "
              f"{result['tokens_per_forward']:.2f} repeated 3-grams "
              f"{result['repeated_3gram_share']:.3f} edits {result['edits']} edit-only "
              f"forwards/block {result['post_edit_forwards_mean']:.2f}", flush=True)  # fmt: skip

    ar_hf, tok = load_model(model_dir(base, "ar_sft"))
    ar = ARDecoder(DiffusionLM(ar_hf), tok.eos_token_id, engine=batched)
    run("ar_sft", "AR baseline (`ar_sft`)", "AR", ar, DecodeMode(threshold=1.0))
    # The draft's own errors: the model without editing at a τ that takes nearly a block a
    # forward (what editing would have to repair), and each conversion's merged model.
    draft = DecodeMode(threshold=DRAFT_TAU)
    models = {}
    for name, cfg in configs.items():
        if any(s.stage == "merge" for s in cfg.stages):
            hf, tok = load_model(model_dir(cfg, "merge"))
            decoder = BlockDecoder(DiffusionLM(hf), tok.eos_token_id, block, engine=batched)
            run(f"{name}_merge", f"{TRAINED[name]}: after CPT and merge", f"τ {ev.threshold}",
                decoder, plain)  # fmt: skip
        hf, tok = load_model(model_dir(cfg, "dpo"))
        models[name] = DiffusionLM(hf)
        for mbe in (False, True):
            decoder = BlockDecoder(models[name], tok.eos_token_id, block, engine=batched,
                                   multi_block_edit=mbe)  # fmt: skip
            extra = {"draft": draft} if name == "none" and not mbe else {}
            for mode_name, mode in (modes | extra).items():
                if mbe and mode.edit_threshold is None:
                    continue  # nothing to edit: the same decode
                row = f"{name}_{mode_name}" + ("_mbe" if mbe else "")
                run(row, TRAINED[name], describe(mode_name, mode, mbe), decoder, mode)

    primary = EditingConfig().substitution  # what `editing: {}` trains
    speed, quality = modes["speed"], modes["quality"]
    # Exactness on the trained model: the cache against the uncached path, every mode.
    same = total = 0
    for mode in (speed, quality):
        for mbe in (False, True):
            kw = {"engine": batched, "multi_block_edit": mbe}
            cached = BlockDecoder(models[primary], tok.eos_token_id, block, **kw)
            uncached = BlockDecoder(models[primary], tok.eos_token_id, block, use_cache=False, **kw)
            asked = examples[:EXACTNESS_QUESTIONS]
            a = evaluate(cached, tok, asked, sampling(mode, ev.max_new_tokens)).answers
            b = evaluate(uncached, tok, asked, sampling(mode, ev.max_new_tokens)).answers
            same += sum(x == y for x, y in zip(a, b, strict=True))
            total += len(a)

    # Speed at batch 1 on the compiled engine.
    compiled = EngineOptions(1, ev.decoding.length_bucket, "on")
    runs = [
        ("ar_sft_compiled_b1", ARDecoder(DiffusionLM(ar_hf), tok.eos_token_id, engine=compiled),
         Sampling(max_new_tokens=ev.max_new_tokens)),
        (f"{primary}_speed_compiled_b1",
         BlockDecoder(models[primary], tok.eos_token_id, block, engine=compiled),
         sampling(speed, ev.max_new_tokens)),
        (f"{primary}_speed_mbe_compiled_b1",
         BlockDecoder(models[primary], tok.eos_token_id, block, engine=compiled,
                      multi_block_edit=True),
         sampling(speed, ev.max_new_tokens)),
        (f"{primary}_quality_compiled_b1",
         BlockDecoder(models[primary], tok.eos_token_id, block, engine=compiled),
         sampling(quality, ev.max_new_tokens)),
    ]  # fmt: skip
    results |= fastest(runs, tok, examples)

    s, q = results[f"{primary}_speed"], results[f"{primary}_quality"]
    without = results["none_plain"]
    ar_row = results["ar_sft"]
    ratio = s["tokens_per_forward"] / q["tokens_per_forward"]
    speed_b1 = (results[f"{primary}_speed_compiled_b1"]["tokens_per_s"]
                / results["ar_sft_compiled_b1"]["tokens_per_s"])  # fmt: skip
    targets = {
        "quality_vs_same_budget_without_editing": target(
            q["accuracy"] - without["accuracy"], 0.0,
            f"{primary} substitutions in Quality mode against the model trained without editing "
            f"at its served τ {ev.threshold}"),
        "speed_vs_quality_tpf": target(ratio, 1.6, f"{s['tokens_per_forward']:.2f} against "
                                       f"{q['tokens_per_forward']:.2f}"),
        "speed_vs_quality_accuracy_loss": target(q["accuracy"] - s["accuracy"], 0.02,
                                                 higher=False),
        "speed_vs_ar_tokens_per_s_batch1": target(speed_b1, 3.0, "compiled engine, CPU"),
        "repeated_3grams_speed_vs_ar": target(
            s["repeated_3gram_share"] - ar_row["repeated_3gram_share"], 0.01,
            f"{s['repeated_3gram_share']:.4f} against the AR baseline's "
            f"{ar_row['repeated_3gram_share']:.4f}", higher=False),
        "edit_only_forwards_per_block_speed": target(
            s["post_edit_forwards_mean"], None,
            f"mean; p99 {s['post_edit_forwards_p99']:.0f}, cap {speed.max_post_edit_steps}"),
        "cached_equals_uncached": target(same / total, 1.0,
            f"identical answers, {EXACTNESS_QUESTIONS} questions × Speed, Quality × multi-block "
            "off, on (tests/test_editing.py checks tokens against a slow reference)"),
    }  # fmt: skip
    report = {
        "setup": {
            "model": "tiny (configs/tiny.yaml) and its conversions with each editing setting",
            "task_settings": tasks.describe(base.data.task),
            "kinds": sorted(base.data.task.kinds),
            "question_counts": tasks.counts(base.data, ev.task_examples),
            "examples": ev.task_examples,
            "eval_seed": ev.seed,
            "block_size": block,
            "modes": {k: v.model_dump() for k, v in modes.items()},
            "variants": {k: {"substitution": v[0], "stages": v[1]} for k, v in VARIANTS.items()},
            "editing": EditingConfig().model_dump(),
            "primary": primary,
            "cpus": os.cpu_count(),
        },
        "table": table,
        "results": results,
        "targets": targets,
    }
    out = ROOT / "bench" / "results" / "editing.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\n{'decoder':<30}{'accuracy':>9}{'TPF':>7}{'rep3':>7}{'edits':>7}{'post':>6}"
          f"{'tokens/s':>10}")  # fmt: skip
    for name, r in results.items():
        print(f"{name:<30}{r['accuracy']:>9.3f}{r['tokens_per_forward']:>7.2f}"
              f"{r['repeated_3gram_share']:>7.3f}{r['edits']:>7}{r['post_edit_forwards_mean']:>6.2f}"
              f"{r['tokens_per_s']:>10.1f}")  # fmt: skip
    for name, t in targets.items():
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        print(f"{name}: {value} (goal {t['goal']}) met {t['met']}")
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
