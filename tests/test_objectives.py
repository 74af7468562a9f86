"""Training objectives, plan and sample order: pure torch / Python, no Ray."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from llada_ray.config import (
    CapStage,
    CptStage,
    DpoStage,
    EditingConfig,
    PipelineConfig,
    SftStage,
    TinyModelConfig,
    load_config,
)
from llada_ray.diffusion.losses import masked_token_nll
from llada_ray.diffusion.masks import position_ids_for
from llada_ray.model import DiffusionLM, build_tiny_model
from llada_ray.model.adapter import block_diffusion_inputs, causal_inputs, stable_inputs
from llada_ray.pipeline.graph import stage_graph
from llada_ray.train.batches import RowStore, dpo_batch, micro_batch_index, packed_batch, sft_batch
from llada_ray.train.objectives import Editing, cpt_loss, dpo_loss, sft_loss
from llada_ray.train.plan import find_unit, learning_rate, total_steps, units

L = 48


@pytest.fixture(scope="module")
def dlm(tiny_tokenizer) -> DiffusionLM:
    tiny = TinyModelConfig(hidden_size=64, num_layers=2, intermediate_size=128)
    hf = build_tiny_model(tiny, tiny_tokenizer, seed=3)
    return DiffusionLM(hf, attention="dense").eval()


def _rows(tokenizer, n: int = 2) -> dict[str, list]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, len(tokenizer) - 1, (n, L), generator=gen)
    docs = (torch.arange(L) >= 20).long() + (torch.arange(L) >= 37).long()
    return {
        "input_ids": list(ids.numpy()),
        "doc_ids": [docs.numpy()] * n,
        "completion": [np.ones(L, dtype=bool)] * n,
        "num_tokens": [L] * n,
    }


def test_block_one_reads_an_ar_model_exactly_where_the_context_is_clean(dlm, tiny_tokenizer):
    """At block size 1 a noisy query sees its own token and the clean tokens before it: the AR
    model's view. So wherever xt is unmasked, BD logits equal the AR model's logits. With the AR
    shift (shift_labels) a masked token is predicted from the previous position, so its loss is
    the AR next-token loss whenever that previous token is unmasked. Without the shift (LLaDA2)
    the query is the mask token itself at position i, which the AR model never saw: the b1 start
    is not the AR loss; the warmup phase exists to teach exactly that."""
    batch = packed_batch(_rows(tiny_tokenizer))
    x0, doc = batch.input_ids, batch.doc_ids
    pos = position_ids_for(doc, True)
    masked = torch.zeros_like(x0, dtype=torch.bool)
    masked[:, 3::4] = True
    xt = torch.where(masked, dlm.mask_token_id, x0)
    with torch.no_grad():
        ar = dlm(**causal_inputs(x0, doc, pos))
        bd = dlm(**block_diffusion_inputs(xt, x0, doc, pos, 1))
    clean = ~masked
    torch.testing.assert_close(bd[clean], ar[clean], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(bd[masked], ar[masked], atol=1e-3)  # the mask token differs

    # Shifted loss at masked targets i (predecessor i-1 clean, same document) == AR loss at i.
    target = masked[:, 1:] & (doc[:, 1:] == doc[:, :-1])
    bd_nll = masked_token_nll(bd[:, :-1], x0[:, 1:], target)
    ar_nll = masked_token_nll(ar[:, :-1], x0[:, 1:], target)
    torch.testing.assert_close(bd_nll, ar_nll, rtol=1e-5, atol=1e-5)
    assert target.sum() > 10


def test_stable_phase_drops_the_clean_half_exactly(dlm, tiny_tokenizer):
    """At block = L no noisy query may see a clean key (only strictly earlier blocks), so the
    stable phase's xt-only pass gives the BD pass's logits at half the tokens."""
    batch = packed_batch(_rows(tiny_tokenizer))
    stage = CptStage(phases=[{"name": "s", "block_size": L, "tokens": 1, "lr": 1.0}])
    with torch.no_grad():
        out = cpt_loss(
            dlm,
            batch,
            stage,
            L,
            dlm.mask_token_id,
            torch.Generator().manual_seed(1),
            restart_positions=True,
        )
        gen = torch.Generator().manual_seed(1)
        pos = position_ids_for(batch.doc_ids, True)
        xt = torch.where(
            torch.rand(batch.input_ids.shape, generator=gen) < 0.5,
            dlm.mask_token_id,
            batch.input_ids,
        )
        stable = dlm(**stable_inputs(xt, batch.doc_ids, pos))
        bd = dlm(**block_diffusion_inputs(xt, batch.input_ids, batch.doc_ids, pos, L))
    torch.testing.assert_close(stable, bd, rtol=1e-5, atol=1e-5)
    assert 0 < out.metrics["masked_ratio"] < 1 and out.loss.item() > 0


def _chat_rows(tokenizer, n: int = 3) -> dict[str, list]:
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(5, 400, (5 + i,), generator=gen).tolist() for i in range(n)]

    def response(i: int) -> list[int]:
        return torch.randint(5, 400, (16 * (i + 1) - 5 - i,), generator=gen).tolist()

    return {
        "input_ids": [p + response(i) for i, p in enumerate(prompts)],
        "prompt_len": [len(p) for p in prompts],
        "prompt_ids": prompts,
        "chosen_ids": [response(i) for i in range(n)],
        "rejected_ids": [response(i) for i in range(n)],
    }


def test_sft_pairs_and_cap_term(dlm, tiny_tokenizer):
    rows = _chat_rows(tiny_tokenizer)
    batch = sft_batch(rows, tiny_tokenizer.pad_token_id)
    assert batch.input_ids.shape[1] % 16 == 0 and not batch.maskable[:, :5].any()
    sft = SftStage(block_size=16)
    cap = CapStage(block_size=16, cap_lambda=2.0)
    with torch.no_grad():
        plain = sft_loss(dlm, batch, sft, dlm.mask_token_id, torch.Generator().manual_seed(4))
        conf = sft_loss(dlm, batch, cap, dlm.mask_token_id, torch.Generator().manual_seed(4))
    # Complementary pairs mask every response token exactly once: half of them overall.
    assert plain.metrics["masked_ratio"] == pytest.approx(0.5)
    assert conf.metrics["elbo"] == pytest.approx(plain.metrics["elbo"])  # same draws
    expected = plain.metrics["elbo"] + 2.0 * conf.metrics["cap_entropy"]
    assert conf.metrics["loss"] == pytest.approx(expected, rel=1e-6)


def test_dpo_starts_at_log_two_against_itself(dlm, tiny_tokenizer):
    batch = dpo_batch(_chat_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    assert len(batch.input_ids) == 6
    with torch.no_grad():
        out = dpo_loss(dlm, dlm, batch, DpoStage(block_size=16, elbo_samples=2),
                       dlm.mask_token_id, torch.Generator().manual_seed(5))  # fmt: skip
    # Policy == reference on the same (t, mask) draws: every margin is 0.
    assert out.loss.item() == pytest.approx(np.log(2))
    assert out.metrics["reward_margin"] == 0 and out.metrics["reward_accuracy"] == 0


def test_tiny_plan_runs_and_rates() -> None:
    cfg = load_config("configs/tiny.yaml")
    names = [u.name for u in units(cfg)]
    assert names[0] == "ar_pretrain" and names[-5:] == ["merge", "sft", "cap", "dpo", "ar_sft"]
    baseline, sft = find_unit(cfg, "ar_sft"), find_unit(cfg, "sft")
    assert (baseline.starts_from, baseline.data, baseline.epochs) == (
        "ar_pretrain",
        sft.data,
        sft.epochs,
    )  # the AR parent, on the SFT rows, for as many epochs
    assert find_unit(cfg, "sft").starts_from == "merge"
    phases = [u for u in units(cfg) if u.name.startswith("cpt-")]
    assert [u.objective for u in phases].count("stable") == 1
    assert phases[0].first_of_stage and not phases[1].first_of_stage
    assert phases[1].carries_optimizer and not phases[0].carries_optimizer
    cap = find_unit(cfg, "cap")
    dpo = find_unit(cfg, "dpo")
    assert dpo.lr == pytest.approx(cap.lr * cap.stage.min_lr_ratio)  # DPO starts at CAP's end

    ar = find_unit(cfg, "ar_pretrain")
    steps = total_steps(ar, cfg, train_rows=0, world_size=2)
    stage = ar.training
    assert steps == -(-ar.tokens // (stage.micro_batch_size * 2 * cfg.data.seq_len))
    rates = [learning_rate(ar, s, steps) for s in range(steps)]
    warmup = stage.warmup_steps
    assert rates[0] == pytest.approx(ar.lr / warmup) and max(rates) == pytest.approx(ar.lr)
    assert rates[-1] == pytest.approx(ar.lr * 0.1)
    assert all(a >= b for a, b in itertools.pairwise(rates[warmup:]))
    later = phases[3]
    assert learning_rate(later, 0, 100) == later.lr  # no warmup after the first phase


def test_dpo_needs_a_rate_from_somewhere() -> None:
    raw = {"name": "x", "tokenizer": {"source": "train"}, "stages": [{"stage": "dpo"}]}
    with pytest.raises(ValueError, match="dpo without lr"):
        units(PipelineConfig.model_validate(raw))


def test_samples_cover_each_training_row_once_per_epoch(tmp_path) -> None:
    table = pa.table({"x": np.arange(103)})
    (tmp_path / "shards").mkdir()
    pq.write_table(table.slice(0, 50), tmp_path / "shards/a.parquet", row_group_size=7)
    pq.write_table(table.slice(50), tmp_path / "shards/b.parquet", row_group_size=7)
    manifest = {"shards": [{"file": "shards/a.parquet", "rows": 50},
                           {"file": "shards/b.parquet", "rows": 53}]}  # fmt: skip
    (tmp_path / "manifest.json").write_text(__import__("json").dumps(manifest))
    store = RowStore(pafs.LocalFileSystem(), str(tmp_path), validation_fraction=0.1)
    assert set(store.train_ids).isdisjoint(store.val_ids)
    assert len(store.train_ids) + len(store.val_ids) == 103 and len(store.val_ids) == 10

    # 2 ranks × 2 micro-batches × 3 rows per step: the ranks' slices tile the global batch.
    world, micro, accum = 2, 3, 2
    taken = [
        micro_batch_index(step, m, r, world, micro, accum)
        for step in range(20)
        for m in range(accum)
        for r in range(world)
    ]
    flat = np.concatenate(taken)
    assert sorted(flat) == list(range(20 * world * micro * accum))
    rows = store.train_sample(seed=5, index=flat)
    n = len(store.train_ids)
    for epoch in range(len(flat) // n):
        assert sorted(rows[epoch * n : (epoch + 1) * n]) == sorted(store.train_ids)
    assert list(store.rows(rows[:4])["x"]) == list(rows[:4])
    # A pure function of the index: a resumed run asks again and gets the same rows.
    np.testing.assert_array_equal(store.train_sample(5, flat[37:41]), rows[37:41])


def test_rows_are_read_by_index_in_memory_bounded_by_the_cache(tmp_path) -> None:
    """Rows come back by global index across shards and row groups, equal to the whole table
    read at once; Arrow holds at most the cached row groups, never the corpus."""
    seq, group, shards, per_shard = 512, 16, 4, 1600
    (tmp_path / "shards").mkdir()
    listed = []
    for k in range(shards):
        ids = np.arange(k * per_shard, (k + 1) * per_shard)
        table = pa.table({"x": ids, "input_ids": [np.full(seq, i, np.int32) for i in ids]})
        pq.write_table(table, tmp_path / f"shards/{k}.parquet", row_group_size=group)
        listed.append({"file": f"shards/{k}.parquet", "rows": per_shard})
    (tmp_path / "manifest.json").write_text(__import__("json").dumps({"shards": listed}))
    corpus_bytes = shards * per_shard * seq * 4

    store = RowStore(pafs.LocalFileSystem(), str(tmp_path), 0.0, cached_groups=8)
    before, peak = pa.total_allocated_bytes(), 0
    rng = np.random.default_rng(0)
    for _ in range(300):
        ids = rng.integers(0, shards * per_shard, 8)
        rows = store.rows(ids)
        assert rows["x"] == list(ids)
        assert [r[0] for r in rows["input_ids"]] == list(ids) and len(rows["input_ids"][0]) == seq
        peak = max(peak, pa.total_allocated_bytes() - before)
    assert len(store.cache) == 8
    assert peak <= 8 * group * seq * 4 * 2 < corpus_bytes / 10  # the cache (+ a batch), not more
    with pytest.raises(IndexError, match="outside"):
        store.rows(np.array([shards * per_shard]))


def test_resume_that_would_take_other_samples_is_refused_before_submitting(tmp_path) -> None:
    """A run resumes under any number of DCP workers, but never with other data, another global
    batch or seq_len (each fixes which samples a step takes), nor DeepSpeed's files under
    another world size; the refusal names the field."""
    import json

    from llada_ray.train.outputs import pipeline_root, run_path
    from llada_ray.train.run import check_resumable

    raw = load_config("configs/tiny.yaml").model_dump()
    raw["storage"] = {"root": str(tmp_path)}
    cfg = PipelineConfig.model_validate(raw)
    fs, run_root = pipeline_root(cfg)
    unit = find_unit(cfg, "ar_pretrain")
    check_resumable(cfg, fs, run_root, unit, "d1")  # nothing written yet
    ckpt = tmp_path / cfg.name / "train" / "pretrain" / "ar_pretrain" / "checkpoint_00000050"
    ckpt.mkdir(parents=True)
    stage = unit.training
    batch = stage.micro_batch_size * stage.grad_accumulation * cfg.scaling.num_workers
    written = {"data": "d1", "global_batch": batch, "seq_len": cfg.data.seq_len,
               "format": "dcp", "world_size": 7, "files": {}}  # fmt: skip
    (ckpt / "manifest.json").write_text(json.dumps(written))
    assert check_resumable(cfg, fs, run_root, unit, "d1")  # another world size: resharded
    with pytest.raises(RuntimeError, match="written with data 'd1' and this config has 'd2'"):
        check_resumable(cfg, fs, run_root, unit, "d2")
    for field, value in (("global_batch", batch * 2), ("seq_len", 7), ("format", "deepspeed")):
        (ckpt / "manifest.json").write_text(json.dumps({**written, field: value}))
        with pytest.raises(RuntimeError, match=f"written with {field} "):
            check_resumable(cfg, fs, run_root, unit, "d1")
    deepspeed = raw | {"scaling": {"num_workers": 2, "strategy": "deepspeed"}}
    (ckpt / "manifest.json").write_text(json.dumps({**written, "format": "deepspeed"}))
    with pytest.raises(RuntimeError, match="written with world_size 7 and this config has 2"):
        check_resumable(PipelineConfig.model_validate(deepspeed), fs, run_root, unit, "d1")
    assert run_path(run_root, unit).endswith("train/pretrain/ar_pretrain")


def _reader(half: str, vocab: int):
    """A model that reads its answer off its input: the clean half (an oracle that knows every
    original token) or the noisy half (a copier of its corrupted input)."""

    def model(input_ids, logits_for=None, **_):
        n = logits_for or input_ids.shape[1]
        ids = input_ids[:, n:] if half == "clean" else input_ids[:, :n]
        return torch.nn.functional.one_hot(ids, vocab).float() * 30

    return model


@pytest.mark.parametrize("substitution", ["in_sequence", "uniform"])
def test_editing_stream_is_near_zero_for_an_oracle_and_large_for_a_copier(
    dlm, tiny_tokenizer, substitution
):
    """Both objectives that train editing (SFT/CAP and CPT), on their real batches."""
    vocab, mask = len(tiny_tokenizer), dlm.mask_token_id
    settings = EditingConfig(substitution_rate=0.3, loss_weight=0.5, substitution=substitution)
    editing = Editing(settings, vocab, mask)
    sft = sft_batch(_chat_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    packed = packed_batch(_rows(tiny_tokenizer))
    stage = CptStage(phases=[{"name": "b", "block_size": 16, "tokens": 1, "lr": 1.0}])

    def losses(model) -> list[dict[str, float]]:
        sft_out = sft_loss(model, sft, SftStage(block_size=16), mask, _gen(4), editing)
        cpt_out = cpt_loss(
            model, packed, stage, 16, mask, _gen(4), restart_positions=True, editing=editing
        )
        return [sft_out.metrics, cpt_out.metrics]

    for oracle, copier in zip(losses(_reader("clean", vocab)), losses(_reader("copy", vocab)),
                              strict=True):  # fmt: skip
        assert oracle["t2t_loss"] < 1e-6 and oracle["t2t_substituted_loss"] < 1e-6
        assert copier["t2t_substituted_loss"] == pytest.approx(30.0, rel=1e-4)
        assert copier["t2t_loss"] == pytest.approx(30.0 * copier["substituted_ratio"], rel=1e-4)
        assert 0.1 < copier["substituted_ratio"] < 0.5  # 0.3 of a few dozen tokens
        assert copier["loss"] == pytest.approx(copier["m2t_loss"] + 0.5 * copier["t2t_loss"])


def test_editing_keeps_complementary_masks_and_reports_both_streams(dlm, tiny_tokenizer):
    batch = sft_batch(_chat_rows(tiny_tokenizer), tiny_tokenizer.pad_token_id)
    editing = Editing(EditingConfig(), len(tiny_tokenizer), dlm.mask_token_id)
    with torch.no_grad():
        plain = sft_loss(dlm, batch, SftStage(block_size=16), dlm.mask_token_id, _gen(4))
        mixed = sft_loss(dlm, batch, SftStage(block_size=16), dlm.mask_token_id, _gen(4), editing)
    # The same masks (drawn first): every response token is masked exactly once per pair.
    assert mixed.metrics["masked_ratio"] == plain.metrics["masked_ratio"] == pytest.approx(0.5)
    # The masked stream now reads an input with replaced tokens: its loss moves.
    assert mixed.metrics["m2t_loss"] != pytest.approx(plain.metrics["elbo"], rel=1e-6)
    assert mixed.metrics["t2t_loss"] > 0
    assert mixed.loss.item() == pytest.approx(
        mixed.metrics["m2t_loss"] + mixed.metrics["t2t_loss"], rel=1e-6
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_the_editing_switch_changes_exactly_the_stages_that_train_it() -> None:
    """A committed run is reused only if its settings hash matches: turning editing on must
    invalidate the runs it changes (and what starts from them), and no other."""
    cfg = load_config("configs/tiny.yaml")
    before = {s.name: s.config_hash for s in stage_graph(cfg)}
    edited = cfg.model_copy(update={"editing": EditingConfig(stages=["sft", "cap"])})
    after = {s.name: s.config_hash for s in stage_graph(edited)}
    assert [k for k in before if before[k] != after[k]] == ["sft", "cap", "dpo"]
    # Naming a later stage too changes nothing for the earlier ones.
    fewer = cfg.model_copy(update={"editing": EditingConfig(stages=["sft"])})
    only_sft = {s.name: s.config_hash for s in stage_graph(fewer)}
    assert only_sft["sft"] == after["sft"] and only_sft["cap"] != after["cap"]
