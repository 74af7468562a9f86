"""Teacher generation (jobs/generate.py): a tiny teacher saved locally, the transformers backend
on a real Ray cluster, and its JSONL read back by the SFT / DPO row builders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from llada_ray.config import FileSource, StorageConfig, TinyModelConfig
from llada_ray.data import tasks
from llada_ray.data.chat import dpo_row, prompt_ids, sft_row
from llada_ray.data.corpus import list_files
from llada_ray.data.documents import parse_file
from llada_ray.generate import job
from llada_ray.generate.config import GenerateConfig, load_generate_config
from llada_ray.generate.prompts import expand_candidates, parse_prompt
from llada_ray.generate.records import choose_pair
from llada_ray.generate.teachers import TransformersTeacher
from llada_ray.model import build_tiny_model
from llada_ray.model.io import save_model

pytestmark = pytest.mark.integration
MAX_NEW = 8
BAD = {"invalid_json": 1, "missing_field": 1, "no_prompt": 1, "empty": 1}


@pytest.fixture(scope="module")
def teacher(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer: PreTrainedTokenizerFast
) -> Path:
    """A randomly initialised tiny AR model in HF layout (safetensors), with its tokenizer."""
    path = tmp_path_factory.mktemp("teacher")
    arch = TinyModelConfig(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
    )
    model = build_tiny_model(arch, tiny_tokenizer, seed=1)
    # With tied embeddings a random model's greedy choice is its last input token again (here
    # "\n", an empty response); its own random output layer makes it say something.
    model.config.tie_word_embeddings = False
    with torch.random.fork_rng():
        torch.manual_seed(1)
        head = torch.randn_like(model.lm_head.weight) * 0.2
    # Special tokens get logit 0 against ~500 random ones: the greedy answer is text, never an
    # immediate EOS (an empty response the job would skip).
    head[tiny_tokenizer.all_special_ids] = 0.0
    model.lm_head.weight = torch.nn.Parameter(head)
    save_model(model, tiny_tokenizer, path)
    assert list(path.glob("*.safetensors"))
    return path


def task_rows(n: int) -> list[dict]:
    return [
        {"prompt": ex.prompt, "answer": ex.answer, "task": ex.task}
        for ex in (tasks.example(5, i, "train") for i in range(n))
    ]


def write_prompts(root: Path) -> list[list[dict]]:
    """Two files of prompts, good and bad; returns the good ones' messages, in file order."""
    good_a = [
        *task_rows(2),  # answers the tiny teacher will not hit: no right/wrong pair for DPO
        {"prompt": "Say something about alpha and beta"},
        {
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Reverse: abcde"},
                {"role": "assistant", "content": "edcba"},  # an SFT chat: answer regenerated
            ]
        },
    ]
    good_b = [{"messages": [{"role": "user", "content": "x = 17; y ="}]}]
    a = [json.dumps(r) for r in good_a]
    a.insert(1, "{oops")
    a.insert(3, json.dumps({"text": "no prompt field"}))
    a.insert(4, "")
    b = [json.dumps({"messages": [{"role": "assistant", "content": "hi"}]}), json.dumps(good_b[0])]
    root.mkdir()
    (root / "a.jsonl").write_text("\n".join(a) + "\n")
    (root / "b.jsonl").write_text("\n".join(b) + "\n")
    return [parse_prompt(json.dumps(r))[0] for r in good_a + good_b]


def config(teacher: Path, prompts: Path, output: Path, **overrides: object) -> dict:
    return {
        "teacher": str(teacher),
        "input": str(prompts),
        "output": str(output),
        "kind": "sft",
        "backend": "transformers",
        "sampling": {"max_new_tokens": MAX_NEW, "temperature": 0.0, "seed": 3},
        "batch_size": 2,  # several batches, prompts of unequal length padded together
        **overrides,
    }


def read_jsonl(directory: Path) -> list[dict]:
    """The records as the SFT / DPO packing reads a `files` source: its file listing (a
    directory, sorted) and its JSON-lines parsing, where a bad line would be an error record."""
    fs, files = list_files(FileSource(path=str(directory), format="jsonl"), StorageConfig())
    assert files and all(Path(f.path).name.startswith("part-") for f in files)
    records = []
    for i, info in enumerate(files):
        with fs.open_input_stream(info.path) as stream:
            lines = parse_file(
                stream.read(),
                path=info.path,
                source=0,
                file=i,
                fmt="text",
                field="text",
                text_unit="line",
                max_chars=1 << 20,
            )
        assert not [r for r in lines if r["error"]]
        records += [json.loads(r["text"]) for r in lines]
    return records


def greedy_reference(teacher: Path, tokenizer: PreTrainedTokenizerFast, messages: list) -> str:
    """Plain `model.generate`, one unpadded prompt, outside Ray."""
    model = AutoModelForCausalLM.from_pretrained(teacher, use_safetensors=True).eval()
    ids = torch.tensor([prompt_ids(tokenizer, messages)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=MAX_NEW, do_sample=False)
    new = out[0, ids.shape[1] :].tolist()
    if tokenizer.eos_token_id in new:
        new = new[: new.index(tokenizer.eos_token_id)]
    return tokenizer.decode(new, skip_special_tokens=True)


def test_sft_job_matches_greedy_reference(
    ray_cluster, tmp_path: Path, teacher: Path, tiny_tokenizer, capsys: pytest.CaptureFixture
) -> None:
    good = write_prompts(tmp_path / "prompts")
    out = tmp_path / "sft"
    cfg_path = tmp_path / "generate.yaml"
    cfg_path.write_text(yaml.safe_dump(config(teacher, tmp_path / "prompts", out)))

    assert job.main(["--config", str(cfg_path)]) == 0
    stdout = capsys.readouterr().out
    records = read_jsonl(out)
    assert f"rows written   {len(records)} " in stdout
    assert "empty 1, invalid_json 1, missing_field 1, no_prompt 1" in stdout
    assert len(records) == len(good)  # a random teacher's 8 tokens are never all special

    for record, messages in zip(records, good, strict=True):
        assert record["messages"][:-1] == messages  # prompt order kept across files
        assert record["messages"][-1]["role"] == "assistant"
        row = sft_row(record, tiny_tokenizer, block_size=16, max_len=512)
        assert 0 < row.prompt_len < len(row.input_ids)
    # The longest prompt, batched with a shorter (left-padded) one, against a plain generate.
    longest = max(range(len(good)), key=lambda i: len(prompt_ids(tiny_tokenizer, good[i])))
    reference = greedy_reference(teacher, tiny_tokenizer, good[longest])
    assert records[longest]["messages"][-1]["content"] == reference
    assert records[0]["messages"][-1]["content"] == greedy_reference(
        teacher, tiny_tokenizer, good[0]
    )

    # A second run into the same directory is refused unless the config says overwrite.
    assert job.main(["--config", str(cfg_path)]) == 2
    assert "output:" in capsys.readouterr().err


def test_dpo_pairs_and_counts(ray_cluster, tmp_path: Path, teacher: Path, tiny_tokenizer) -> None:
    good = write_prompts(tmp_path / "prompts")
    raw = config(
        teacher,
        tmp_path / "prompts",
        tmp_path / "dpo",
        kind="dpo",
        sampling={"max_new_tokens": MAX_NEW, "temperature": 1.0, "top_p": 0.95, "n": 3, "seed": 3},
        batch_size=4,
    )
    report = job.generate(GenerateConfig.model_validate(raw))
    assert report.backend == "transformers"
    assert report.prompts == len(good) + sum(BAD.values())
    assert report.bad_prompts == BAD
    assert report.candidates == 3 * len(good)
    # The two task rows carry an answer the random teacher never produces: no right/wrong pair.
    assert report.skipped == {"none_correct": 2}
    records = read_jsonl(tmp_path / "dpo")
    assert report.rows == len(records) == len(good) - 2
    for record, messages in zip(records, good[2:], strict=True):
        assert record["prompt"] == messages
        assert record["chosen"] != record["rejected"]
        row = dpo_row(record, tiny_tokenizer, block_size=16, max_len=512)
        assert row.chosen_ids != row.rejected_ids


def candidate_rows(messages: list[list[dict]], n: int, seed: int) -> pa.Table:
    rows = [
        {"key": k, "chat": json.dumps(m), "answer": None, "task": None}
        for k, m in enumerate(messages)
    ]
    return expand_candidates(pa.Table.from_pylist(rows), n=n, seed=seed)


def test_teacher_log_probs_and_per_row_sampling(
    tmp_path: Path, teacher: Path, tiny_tokenizer
) -> None:
    """The actor class in process: a sampled candidate depends on the seed and the row only,
    not on the batch it is generated in; its mean log-probability is the teacher's."""
    good = write_prompts(tmp_path / "prompts")
    cfg = GenerateConfig.model_validate(
        config(
            teacher,
            tmp_path / "prompts",
            tmp_path / "out",
            kind="dpo",
            sampling={"max_new_tokens": MAX_NEW, "temperature": 0.8, "top_p": 0.9, "n": 2},
        )
    )
    actor = TransformersTeacher(cfg.model_dump(mode="json"))
    batch = candidate_rows(good, n=2, seed=0)
    together = actor(batch).to_pylist()
    assert actor(batch).to_pylist() == together  # the same seed: the same samples
    alone = actor(batch.slice(5, 1)).to_pylist()  # other batch-mates, no padding
    assert alone[0]["text"] == together[5]["text"]
    assert math.isclose(alone[0]["mean_logprob"], together[5]["mean_logprob"], abs_tol=1e-4)
    assert len({r["text"] for r in together}) > len(good)  # a prompt's two candidates differ
    reseeded = actor(candidate_rows(good, n=2, seed=1)).to_pylist()
    assert [r["text"] for r in reseeded] != [r["text"] for r in together]

    model = AutoModelForCausalLM.from_pretrained(teacher, use_safetensors=True).eval()
    row = together[2]
    prompt = prompt_ids(tiny_tokenizer, json.loads(row["chat"]))
    # Re-run the sampled tokens through the model: their mean log-probability under it.
    tokens = _sampled_tokens(actor, batch.slice(2, 1))
    assert len(tokens) == row["num_tokens"]
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, len(prompt) - 1 : -1].float(), dim=-1)
    expected = logp.gather(1, torch.tensor(tokens)[:, None]).mean().item()
    assert math.isclose(row["mean_logprob"], expected, abs_tol=1e-4)


def _sampled_tokens(actor: TransformersTeacher, one_row: pa.Table) -> list[int]:
    """The generated token ids of a one-row batch (the actor returns only their text)."""
    seen: list[torch.Tensor] = []
    generate = actor.model.generate

    def spy(*args: object, **kwargs: object) -> torch.Tensor:
        out = generate(*args, **kwargs)
        seen.append(out)
        return out

    actor.model.generate = spy  # type: ignore[method-assign]
    result = actor(one_row).to_pylist()[0]
    width = len(prompt_ids(actor.tokenizer, json.loads(result["chat"])))
    return seen[0][0, width:].tolist()[: result["num_tokens"]]


def test_choose_pair_ranks_by_correctness_then_log_prob() -> None:
    def cand(text: str, logprob: float | None, answer: str | None = "42") -> dict:
        return {"text": text, "mean_logprob": logprob, "answer": answer, "task": "add"}

    pair = choose_pair([cand("41", -0.1), cand(" 42 ", -2.0), cand("7", -3.0)], "auto")
    assert isinstance(pair, tuple) and (pair[0]["text"], pair[1]["text"]) == (" 42 ", "7")
    assert choose_pair([cand("41", -1.0), cand("40", -2.0)], "auto") == "none_correct"
    assert choose_pair([cand("42", -1.0), cand("42 ", -2.0)], "auto") == "all_correct"
    assert choose_pair([cand("a", -1.0), cand("a", -2.0), cand(" ", 0.0)], "auto") == (
        "too_few_distinct"
    )
    by_logprob = choose_pair([cand("41", -1.0), cand("42", -2.0), cand("x", -0.5)], "logprob")
    assert isinstance(by_logprob, tuple)
    assert (by_logprob[0]["text"], by_logprob[1]["text"]) == ("x", "42")
    no_answer = [cand("a", -1.0, None), cand("b", -2.0, None)]
    assert choose_pair(no_answer, "correctness") == "no_answer"
    assert choose_pair([cand("a", -1.0, None), cand("b", -1.0, None)], "auto") == "tied_scores"


def test_example_config_validates() -> None:
    cfg = load_generate_config(Path(__file__).parent.parent / "configs" / "generate-sft.yaml")
    assert (cfg.kind, cfg.sampling.n, cfg.backend) == ("sft", 1, "auto")


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"kind": "dpo"}, "sampling.n"),
        ({"kind": "dpo", "sampling": {"n": 2}}, "sampling.temperature"),
        ({"sampling": {"temprature": 0.5}}, "sampling.temprature"),
        ({"backend": "tgi"}, "backend"),
        ({"batch_size": 0}, "batch_size"),
        ({"teacher": None}, "teacher"),
        ({"input": "/nonexistent/prompts/*.jsonl"}, "input:"),
    ],
)
def test_bad_config_is_refused_before_ray(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    change: dict,
    field: str,
) -> None:
    def untouched(*args: object, **kwargs: object) -> None:
        raise AssertionError("Ray was touched")

    monkeypatch.setattr(job.ray, "init", untouched)
    monkeypatch.setattr(job, "generate", untouched)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    raw = config(tmp_path / "teacher", tmp_path / "prompts.jsonl", tmp_path / "out") | change
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert job.main(["--config", str(path)]) == 2
    assert field in capsys.readouterr().err


def test_output_holding_the_input_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    raw = config(tmp_path / "teacher", tmp_path / "prompts.jsonl", tmp_path, overwrite=True)
    path = tmp_path / "generate.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert job.main(["--config", str(path)]) == 2
    assert "output:" in capsys.readouterr().err
    assert (tmp_path / "prompts.jsonl").exists()
