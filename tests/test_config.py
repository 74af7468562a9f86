"""Config: the shipped configs validate; bad configs fail naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from llada_ray.config import ConfigError, PipelineConfig, load_config
from llada_ray.diffusion.schedule import plan_phases
from llada_ray.generate.config import load_generate_config
from llada_ray.train.plan import phase_range

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_validate(path: Path) -> None:
    # configs/generate-*.yaml are teacher-generation jobs; every other file is a pipeline.
    (load_generate_config if path.name.startswith("generate-") else load_config)(path)


def tiny() -> dict:
    return yaml.safe_load((Path(__file__).parent.parent / "configs" / "tiny.yaml").read_text())


def stage(raw: dict, kind: str) -> dict:
    return next(s for s in raw["stages"] if s["stage"] == kind)


def cpt_index(raw: dict) -> int:
    return next(i for i, s in enumerate(raw["stages"]) if s["stage"] == "cpt")


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (
            lambda r: r["stages"][cpt_index(r)]["phases"][1].update(block_size=24),
            "stages.{cpt}.phases.1.block_size",
        ),
        (lambda r: r["stages"][cpt_index(r)]["phases"][0].update(lr=-1), "lr"),
        (lambda r: r["scaling"].update(strategy="horovod"), "scaling.strategy"),
        (lambda r: r["scaling"].update(zero_stage=2), "zero_stage"),
        (lambda r: r["data"].update(seq_len="long"), "data.seq_len"),
        (lambda r: r["model"].update(attention_kernel="x"), "model.attention_kernel"),
        (lambda r: r["stages"].reverse(), "must appear at most once each, in the order"),
        (lambda r: stage(r, "dpo").update(beta=0), "beta"),
        (lambda r: r["stages"].remove(stage(r, "sft")), "ar_sft trains on the sft stage's rows"),
        (lambda r: r["data"]["task"].update(word_length=[5, 3]), "word_length: [5, 3] needs 2"),
        (lambda r: r["data"]["task"].update(sort_count=[1, 3]), "sort_count: [1, 3] needs 2"),
        (lambda r: r["data"]["task"].update(kinds=["add", "divide"]), "data.task.kinds"),
        (lambda r: r["data"]["pretrain"][0].update(format="html"), "format"),
        (lambda r: r["stages"][cpt_index(r) + 1].update(top_k=9), "merge.top_k (9) exceeds"),
        (lambda r: r["stages"][0].update(eval_rows=0), "eval_rows"),
        (lambda r: r["model"].update(dtype="float16"), "float16 needs loss scaling"),
        (lambda r: r["stages"][cpt_index(r)].update(shift_labels=True), "shift_labels"),
        (lambda r: r.update(editing={"stages": ["dpo"]}), "editing.stages.0"),
        (lambda r: r.update(editing={"substitution_rate": 0}), "editing.substitution_rate"),
        (lambda r: r.update(editing={"substitution": "random"}), "editing.substitution"),
        (
            lambda r: (
                r.update(editing={"stages": ["sft"]}),
                r["stages"].remove(stage(r, "sft")),
                r["stages"].remove(stage(r, "ar_sft")),
            ),
            "['sft'] not among the pipeline's",
        ),
        (lambda r: r["evaluation"].update(mode="turbo"), "mode 'turbo' is not one of"),
        (
            lambda r: r["evaluation"].update(
                modes={"speed": {"threshold": 0.5, "edit_threshold": 2}}
            ),
            "evaluation.modes.speed.edit_threshold",
        ),
    ],
)
def test_bad_config_names_the_field(edit, field: str) -> None:
    raw = tiny()
    field = field.format(cpt=cpt_index(raw))
    edit(raw)
    with pytest.raises(ValidationError) as err:
        PipelineConfig.model_validate(raw)
    assert field in str(err.value)


def test_unreadable_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_wsd_schedule_labels_and_refuses() -> None:
    phases = plan_phases(
        [("w1", 1, 10, 1e-4), ("w2", 4, 10, 1e-4), ("s", 64, 10, 1e-4), ("d", 32, 10, 1e-4)], 64
    )
    assert [p.kind for p in phases] == ["warmup", "warmup", "stable", "decay"]
    with pytest.raises(ValueError, match="must rise"):
        plan_phases([("a", 4, 1, 1e-4), ("b", 1, 1, 1e-4), ("c", 8, 1, 1e-4)], 64)
    with pytest.raises(ValueError, match="does not divide"):
        plan_phases([("a", 48, 1, 1e-4)], 64)


def test_cli_validate_prints_plan_or_names_the_problem(tmp_path: Path, capsys) -> None:
    from llada_ray.cli import main

    assert main(["validate", str(Path(__file__).parent.parent / "configs" / "tiny.yaml")]) == 0
    out = capsys.readouterr().out
    assert "stable" in out and "decay" in out
    raw = tiny()
    raw["data"]["seq_len"] = 100
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(bad)]) == 2
    assert "does not divide data.seq_len (100)" in capsys.readouterr().err


def test_jobs_refuse_a_bad_config_or_phase_before_submitting(tmp_path: Path, capsys) -> None:
    from llada_ray.train.run import main

    raw = tiny()
    raw["stages"][cpt_index(raw)]["phases"][0]["block_size"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert main("cpt", ["--config", str(bad)]) == 2
    assert "block_size: 3 does not divide" in capsys.readouterr().err
    good = Path(__file__).parent.parent / "configs" / "tiny.yaml"
    assert main("cpt", ["--config", str(good), "--phase", "nope"]) == 2
    assert "no phase 'nope' of stage cpt" in capsys.readouterr().err
    assert main("cpt", ["--config", str(good), "--phase", "warmup-b4:nope"]) == 2
    assert "no phase 'warmup-b4:nope' of stage cpt (its phases: ['warmup-b1'" in (
        capsys.readouterr().err
    )
    assert main("cpt", ["--config", str(good), "--phase", "stable:warmup-b4"]) == 2
    assert "phase range 'stable:warmup-b4' runs backwards" in capsys.readouterr().err
    cfg = load_config(good)
    assert [u.name for u in phase_range(cfg, "warmup-b4:stable")] == [
        "cpt-warmup-b4", "cpt-warmup-b32", "cpt-warmup-b64", "cpt-stable"]  # fmt: skip
    assert [u.name for u in phase_range(cfg, "stable")] == ["cpt-stable"]


def test_serve_config_validates_and_serve_refuses_bad_settings(tmp_path: Path, capsys) -> None:
    from llada_ray.cli import main
    from llada_ray.serve.app import build

    shipped = yaml.safe_load((Path(__file__).parent.parent / "serve" / "config.yaml").read_text())
    app = shipped["applications"][0]
    assert app["import_path"] == "llada_ray.serve.app:build"
    build(app["args"])  # validates; deploys nothing
    with pytest.raises(ValueError, match="max_ongoing_requests must be ≥ max_batch_size"):
        build(app["args"] | {"max_batch_size": 128})
    bad = tmp_path / "serve.yaml"
    bad.write_text(yaml.safe_dump({"threshold": 1.5}))
    assert main(["serve", "some/model", "--config", str(bad)]) == 2
    assert "threshold" in capsys.readouterr().err
