"""Teacher generation on Ray Data: SFT chats or DPO pairs sampled from an AR teacher
(`jobs/generate.py`, configured by `config.GenerateConfig`).

    prompt JSONL ─ prompts.py: read, parse, n candidate rows per prompt
                 ─ teachers.py / vllm_teacher.py: generate
                 ─ job.py (driver): group a prompt's candidates ─ records.py: an SFT chat or a
                   DPO pair ─ output.py: part-NNNNN.jsonl files

Each prompt row becomes `sampling.n` candidate rows, each with its own seed derived from
(sampling.seed, the row's key, the candidate index), so a candidate is the same whatever batch or
replica it lands in. Both teacher backends, transformers (teachers.py) and vLLM through
`ray.data.llm` (vllm_teacher.py), return the same columns (`teachers.GENERATED_SCHEMA`).

The dataset keeps its order, so the candidates of a prompt reach the driver one after another:
no shuffle (a groupby costs a hash shuffle per run) and no second pass. The driver writes
`part-NNNNN.jsonl` files, which a `data.sft` / `data.dpo` files source reads as is.
"""
