"""The pipeline configuration: one validated `PipelineConfig` describes a whole run.

Everything a run depends on (model, data, the stage list with every phase's block size, token
budget and learning rate, λ, β, storage, tracking, scaling) is data in YAML, validated here once,
before anything is submitted. Errors name the field path, e.g. `stages.2.phases.1.block_size`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from llada_ray.diffusion.schedule import plan_phases

PositiveInt = Annotated[int, Field(gt=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
Rate = Annotated[float, Field(gt=0, le=1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --- model and tokenizer ---------------------------------------------------------------------


class TinyModelConfig(Strict):
    """Architecture of the embedded tiny model (built from scratch, no download)."""

    family: Literal["llama", "qwen2", "qwen3", "llada2_moe"] = "qwen3"
    hidden_size: PositiveInt = 128
    num_layers: PositiveInt = 4
    num_heads: PositiveInt = 4
    num_kv_heads: PositiveInt = 2
    intermediate_size: PositiveInt = 384
    max_position_embeddings: PositiveInt = 4096
    rope_theta: PositiveFloat = 10000.0
    # llada2_moe only: LLaDA2.0's sparse layers (the first `dense_layers` stay dense).
    num_experts: PositiveInt = 8
    experts_per_token: PositiveInt = 2
    expert_groups: PositiveInt = 4
    groups_per_token: PositiveInt = 2
    expert_intermediate_size: PositiveInt = 64
    shared_experts: Annotated[int, Field(ge=0)] = 1
    dense_layers: Annotated[int, Field(ge=0)] = 1

    @model_validator(mode="after")
    def _heads_divide(self) -> TinyModelConfig:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                "num_heads must divide hidden_size and num_kv_heads must divide num_heads"
            )
        if self.num_experts % self.expert_groups or self.groups_per_token > self.expert_groups:
            raise ValueError(
                "expert_groups must divide num_experts and groups_per_token be at most "
                "expert_groups"
            )
        if self.experts_per_token > self.groups_per_token * self.num_experts // self.expert_groups:
            raise ValueError("experts_per_token exceeds the experts of groups_per_token groups")
        return self


class ModelConfig(Strict):
    source: str = Field("tiny", description='"tiny", a Hugging Face model id, or a local directory')
    tiny: TinyModelConfig = TinyModelConfig()
    trust_remote_code: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["auto", "block_sparse", "dense", "flex", "eager"] = Field(
        "auto", description="auto: flex on CUDA, block_sparse on CPU"
    )
    attention_tile: PositiveInt = Field(128, description="query/key tile of block_sparse and flex")
    mask_token: str = Field("<|mask|>", description="added to the tokenizer if it has none")

    @property
    def is_tiny(self) -> bool:
        return self.source == "tiny"


class TokenizerConfig(Strict):
    source: str = Field(
        "model",
        description='"model" (the model\'s own), "train" (byte-level BPE on the corpus), '
        "a Hugging Face id or a directory",
    )
    vocab_size: PositiveInt = Field(2048, description="for source: train")
    train_chars: PositiveInt = Field(20_000_000, description="corpus characters to train on")


# --- data -------------------------------------------------------------------------------------


class FileSource(Strict):
    type: Literal["files"] = "files"
    path: str = Field(description="local path, directory or glob; or s3://bucket/prefix")
    format: Literal["text", "jsonl", "parquet"] = "text"
    field: str = Field("text", description="column / JSON field holding the document")
    text_unit: Literal["file", "line"] = Field("file", description="for text: a document per …")


IntRange = tuple[PositiveInt, PositiveInt]  # inclusive bounds, drawn uniformly


class TaskConfig(Strict):
    """Difficulty of the built-in verifiable task family: one setting for every task source and
    for the held-out evaluation, so test examples always come from the training distribution.
    A hash of each prompt puts it in the train or the held-out split (data/tasks.py)."""

    kinds: list[Literal["add", "reverse", "shift", "sort", "upper"]] = Field(
        ["reverse", "shift", "sort", "upper"], min_length=1
    )
    add_digits: IntRange = Field((2, 2), description="digits of each addend")
    sort_count: IntRange = Field((6, 9), description="how many numbers to sort")
    sort_max: PositiveInt = Field(9, description="numbers to sort are drawn from 0..sort_max")
    word_length: IntRange = Field((3, 10), description="letters per word (reverse, shift, upper)")
    upper_words: IntRange = Field((1, 1), description="words to copy in upper case")
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.1, description="share of the distinct questions kept for evaluation only"
    )
    min_heldout_questions: PositiveInt = Field(
        500, description="each kind must leave at least this many distinct held-out questions"
    )

    @field_validator("add_digits", "sort_count", "word_length", "upper_words")
    @classmethod
    def _bounds(cls, bounds: tuple[int, int], info: ValidationInfo) -> tuple[int, int]:
        # A word of one letter reads the same reversed; sorting needs two numbers.
        least = {"sort_count": 2, "word_length": 2}.get(info.field_name or "", 1)
        if not least <= bounds[0] <= bounds[1]:
            raise ValueError(
                f"{info.field_name}: [{bounds[0]}, {bounds[1]}] needs {least} ≤ lower ≤ upper"
            )
        return bounds

    def distinct_questions(self, kind: str) -> int:
        """How many different prompts these settings allow for `kind`: the generators of
        data/tasks.py counted (tested against enumerating them)."""

        def span(bounds: tuple[int, int]) -> range:
            return range(bounds[0], bounds[1] + 1)

        if kind == "add":
            numbers = sum(10 if d == 1 else 9 * 10 ** (d - 1) for d in span(self.add_digits))
            return numbers**2
        if kind == "sort":
            return sum((self.sort_max + 1) ** n for n in span(self.sort_count))
        if kind == "reverse":  # palindromes are redrawn
            return sum(26**n - 26 ** ((n + 1) // 2) for n in span(self.word_length))
        words = sum(26**n for n in span(self.word_length))
        if kind == "shift":
            return words
        return sum(words**n for n in span(self.upper_words))  # upper

    @model_validator(mode="after")
    def _enough_heldout(self) -> TaskConfig:
        for kind in self.kinds:
            heldout = int(self.distinct_questions(kind) * self.heldout_fraction)
            if heldout < self.min_heldout_questions:
                raise ValueError(
                    f"task kind {kind!r}: these settings allow {self.distinct_questions(kind)} "
                    f"distinct questions, so a held-out share of {self.heldout_fraction} leaves "
                    f"~{heldout}, fewer than min_heldout_questions ({self.min_heldout_questions})"
                    ": widen its settings (digits, counts, word lengths)"
                )
        return self


class TaskSource(Strict):
    """The built-in verifiable task family (generated, checkable answers; see data.task)."""

    type: Literal["task"] = "task"
    examples: PositiveInt = 20_000
    seed: int = 0
    format: Literal["text", "chat"] = Field(
        "text",
        description="pre-training documents as plain text `prompt answer`, or rendered with the "
        "run tokenizer's chat template (instruction data mixed into pre-training); either way "
        "the prompt is context and the answer the completion",
    )


DataSource = Annotated[FileSource | TaskSource, Field(discriminator="type")]


class DataConfig(Strict):
    seq_len: PositiveInt = 256
    restart_positions: bool = Field(True, description="RoPE positions restart at each document")
    split_documents: bool = Field(
        True,
        description="false: a document that does not fit in a row's rest starts the next row "
        "(padding ends the row), so short documents (prompt + answer) are never cut apart",
    )
    pretrain: list[DataSource] = [TaskSource()]
    sft: list[DataSource] = [TaskSource()]
    dpo: list[DataSource] = [TaskSource()]
    task: TaskConfig = TaskConfig()
    validation_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.02
    bad_rows: Literal["skip", "fail"] = Field("skip", description="skip: count and go on")
    max_document_chars: PositiveInt = Field(
        10_000_000, description="longer documents are bad rows (too_long), not packed"
    )


# --- stages -----------------------------------------------------------------------------------


class TrainingStage(Strict):
    """Knobs every training stage shares."""

    micro_batch_size: PositiveInt = 8
    grad_accumulation: PositiveInt = 1
    weight_decay: Annotated[float, Field(ge=0)] = 0.01
    warmup_steps: Annotated[int, Field(ge=0)] = 10
    grad_clip: PositiveFloat = 1.0
    lr_schedule: Literal["constant", "cosine"] = Field(
        "cosine", description="after warmup: hold the rate, or cosine-decay it to min_lr_ratio·lr"
    )
    min_lr_ratio: Annotated[float, Field(ge=0, le=1)] = 0.1
    eval_every_steps: PositiveInt = 50
    eval_rows: PositiveInt = Field(256, description="held-out rows per validation pass")
    checkpoint_every_steps: PositiveInt = Field(
        50, description="a checkpoint also runs validation: its loss ranks the top-k"
    )
    keep_top_k: PositiveInt = Field(3, description="checkpoints kept by validation loss (+ latest)")


class ArPretrainStage(TrainingStage):
    """Causal-LM pre-training, so the tiny default has an AR model to convert."""

    stage: Literal["ar_pretrain"] = "ar_pretrain"
    tokens: PositiveInt
    lr: PositiveFloat = 1e-3
    loss_on: Literal["all", "completion"] = Field(
        "all",
        description="completion: no loss on the prompts of prompt/completion documents "
        "(the built-in task's); plain-text documents are all completion",
    )


class CptPhase(Strict):
    name: str
    block_size: PositiveInt
    tokens: PositiveInt
    lr: PositiveFloat


class EmbedNoise(Strict):
    """Gaussian noise on masked-token embedding outputs early in CPT (report §7.1)."""

    steps: Annotated[int, Field(ge=0)] = 100
    std: PositiveFloat | Literal["embedding_rms"] = "embedding_rms"


class CptStage(TrainingStage):
    """Each phase is its own Ray Train run at a constant rate (the decay is of the block size);
    the optimizer state carries over from phase to phase, warmup runs in the first only."""

    stage: Literal["cpt"] = "cpt"
    phases: list[CptPhase]
    lr_schedule: Literal["constant", "cosine"] = "constant"
    embed_noise: EmbedNoise = Field(EmbedNoise(), description="in the first phase's first steps")
    t_min: Rate = 1e-3
    antithetic: bool = True
    weighting: Literal["inv_t", "uniform"] = "inv_t"
    shift_labels: bool = Field(False, description="keep the AR next-token shift (Dream-style)")
    loss_on: Literal["all", "completion"] = Field(
        "all",
        description="completion: only the completions of prompt/completion documents are masked "
        "and scored (their prompts stay clean context); plain-text documents are all completion",
    )


class MergeStage(Strict):
    stage: Literal["merge"] = "merge"
    top_k: PositiveInt = 3


class SftStage(TrainingStage):
    stage: Literal["sft"] = "sft"
    epochs: PositiveFloat = 1.0
    lr: PositiveFloat = 1e-4
    block_size: PositiveInt = 32
    t_min: Rate = 0.3
    t_max: Rate = 0.8
    complementary: bool = True
    weighting: Literal["inv_t", "uniform"] = "uniform"
    normalization: Literal["maskable", "masked"] = "masked"
    max_len: PositiveInt = 512

    @model_validator(mode="after")
    def _band(self) -> SftStage:
        if self.t_min > self.t_max:
            raise ValueError(f"t_min ({self.t_min}) must not exceed t_max ({self.t_max})")
        return self


class CapStage(SftStage):
    stage: Literal["cap"] = "cap"  # type: ignore[assignment]
    cap_lambda: Annotated[float, Field(ge=0)] = 2.0


class DpoStage(TrainingStage):
    stage: Literal["dpo"] = "dpo"
    epochs: PositiveFloat = 1.0
    beta: PositiveFloat = 0.1
    lr: PositiveFloat | None = Field(None, description="None: the previous stage's final rate")
    lr_schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    block_size: PositiveInt = 32
    elbo_samples: PositiveInt = 1
    max_len: PositiveInt = 512


EditableStage = Literal["cpt", "sft", "cap"]
EDITABLE_STAGES: tuple[str, ...] = get_args(EditableStage)


class EditingConfig(Strict):
    """LLaDA2.1's token editing in training (RECIPE.md §7): beside the masked (M2T) stream, an
    editing (T2T) stream replaces a share of the visible answer tokens of the noised input with
    random tokens and supervises the original token at every visible position, so the model
    learns to spot a wrong token (and to keep a right one) wherever it may be."""

    substitution_rate: Rate = Field(
        0.1, description="share of the visible (unmasked) maskable tokens replaced at random"
    )
    substitution: Literal["uniform", "in_sequence"] = Field(
        "in_sequence",
        description="a replacement is the token at a random visible answer position of the same "
        "row (in_sequence: plausible mistakes), or drawn from the vocabulary (uniform, as the "
        "LLaDA2.1 report describes it); bench/editing.py measures both",
    )
    loss_weight: PositiveFloat = Field(1.0, description="the T2T stream's weight beside M2T's")
    stages: list[EditableStage] | None = Field(
        None,
        min_length=1,
        description="the stages that train both streams; None: every one of "
        "cpt, sft, cap the pipeline has",
    )


class ArSftStage(TrainingStage):
    """The fair AR baseline: the AR parent (ar_pretrain's output, else model.source) fine-tuned
    with the next-token loss on the rows the sft stage trains on, for as many epochs: both sides
    of a decoding comparison have seen the same data."""

    stage: Literal["ar_sft"] = "ar_sft"
    lr: PositiveFloat = 1e-4
    epochs: PositiveFloat | None = Field(None, description="None: the sft stage's")


Stage = Annotated[
    ArPretrainStage | CptStage | MergeStage | SftStage | CapStage | DpoStage | ArSftStage,
    Field(discriminator="stage"),
]
STAGE_ORDER = ["ar_pretrain", "cpt", "merge", "sft", "cap", "dpo", "ar_sft"]


# --- where things go --------------------------------------------------------------------------


class StorageConfig(Strict):
    root: str = Field("runs", description="local directory, or s3://bucket/prefix")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, …)")
    region: str = "us-east-1"
    retry_attempts: PositiveInt = Field(
        10, description="S3 attempts per request, backing off exponentially: 10 ride out ~90 s"
    )


class TrackingConfig(Strict):
    uri: str = Field("sqlite:///mlflow.db", description="MLflow tracking URI")
    experiment: str = "llada-ray"
    registered_model: str | None = Field(
        None, description="MLflow registry name of the exported model; default: the pipeline's"
    )
    model_alias: str = Field("candidate", description="alias set on each newly exported version")


class DecodingConfig(Strict):
    """How the static decode engine runs its steps (llada_ray/decoding/engine.py)."""

    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="auto: CUDA graphs on CUDA, eager on CPU (compiling every bucket takes "
        "minutes on a laptop's cores); on: torch.compile on any device (inductor on CPU)",
    )
    length_bucket: PositiveInt = Field(
        256, description="a step attends to the KV cache up to this times a power of two"
    )
    prefix_cache_mb: Annotated[float, Field(ge=0)] = Field(
        256.0,
        description="keys and values of prompt blocks kept across requests (LRU), at most this "
        "many MiB; 0: no prefix cache",
    )
    multi_block_edit: bool = Field(
        False,
        description="token editing revises the previous block too while the next one decodes: "
        "every forward carries it (twice the queries, for every request, editing or not), its "
        "cache entries rewritten; a block reaches the output a block later",
    )


class DecodeMode(Strict):
    """Joint-threshold decoding (LLaDA2.1): unmask every masked position above `threshold`
    (τ_mask); with `edit_threshold` (τ_edit) set, also replace every decided answer token of the
    block whose prediction differs from it with probability above τ_edit, then edit-only
    forwards after a block's last mask until nothing changes or `max_post_edit_steps` (with
    multi-block editing only in the block an answer ends in: the next block's forwards check
    the others)."""

    threshold: Rate
    edit_threshold: Rate | None = None
    max_post_edit_steps: Annotated[int, Field(ge=0)] = 16


# Presets: Speed drafts at a low τ_mask and lets edits repair the draft; Quality is conservative.
DEFAULT_MODES = {
    "speed": DecodeMode(threshold=0.5, edit_threshold=0.5),
    "quality": DecodeMode(threshold=0.9, edit_threshold=0.9),
}
NO_EDITING = "none"  # the mode a request names to decode at τ alone, whatever the default


def decode_mode(modes: dict[str, DecodeMode], mode: str | None, threshold: float) -> DecodeMode:
    """The preset `mode` names, or τ alone (no editing) for None or "none"; a ValueError naming
    the presets for any other name."""
    if mode is None or mode == NO_EDITING:
        return DecodeMode(threshold=threshold)
    if mode not in modes:
        raise ValueError(f"mode {mode!r} is not one of {sorted(modes)} (or {NO_EDITING!r})")
    return modes[mode]


class Modes(Strict):
    """Decoding presets, and the one used when a request names none."""

    mode: str | None = Field(
        None, description="default preset of `modes` (token editing); None: τ, no editing"
    )
    modes: dict[str, DecodeMode] = Field(DEFAULT_MODES, description="decoding presets")

    @model_validator(mode="after")
    def _mode_exists(self) -> Modes:
        if NO_EDITING in self.modes:
            raise ValueError(f"modes: {NO_EDITING!r} is taken (τ alone, no editing)")
        decode_mode(self.modes, self.mode, 1.0)  # a default that names no preset is refused
        return self


class EvaluationConfig(Modes):
    """Task accuracy after each post-training stage, decoded as served (the tiny default)."""

    task_examples: Annotated[int, Field(ge=0)] = Field(
        0, description="held-out verifiable-task examples; 0: no evaluation"
    )
    seed: int = Field(99, description="a seed no data source uses")
    threshold: Rate = 0.9
    max_new_tokens: PositiveInt = 32
    batch_size: PositiveInt = 16
    decoding: DecodingConfig = DecodingConfig()

    @property
    def decode_mode(self) -> DecodeMode:
        """The thresholds evaluation decodes with."""
        return decode_mode(self.modes, self.mode, self.threshold)


class ScalingConfig(Strict):
    num_workers: Annotated[int, Field(ge=0)] = 2
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    strategy: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    zero_stage: Annotated[int, Field(ge=0, le=3)] = 0
    offload_optimizer: bool = False
    fsdp_mixed_precision: bool = Field(
        False, description="fsdp: weights in model.dtype for compute, gradients reduced in fp32"
    )
    max_failures: Annotated[int, Field(ge=0)] = Field(
        3, description="worker-group restarts from the last checkpoint before a run fails"
    )

    @model_validator(mode="after")
    def _zero_needs_deepspeed(self) -> ScalingConfig:
        if self.strategy != "deepspeed" and (self.zero_stage or self.offload_optimizer):
            raise ValueError("zero_stage and offload_optimizer apply to strategy: deepspeed only")
        if self.strategy != "fsdp" and self.fsdp_mixed_precision:
            raise ValueError("fsdp_mixed_precision applies to strategy: fsdp only")
        return self


# --- the whole run ----------------------------------------------------------------------------


class PipelineConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    model: ModelConfig = ModelConfig()
    tokenizer: TokenizerConfig = TokenizerConfig()
    data: DataConfig = DataConfig()
    stages: list[Stage]
    storage: StorageConfig = StorageConfig()
    tracking: TrackingConfig = TrackingConfig()
    scaling: ScalingConfig = ScalingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    editing: EditingConfig | None = Field(None, description="train with token editing (T2T)")

    @field_validator("stages")
    @classmethod
    def _stages_fit(cls, stages: list, info: ValidationInfo) -> list:
        kinds = [s.stage for s in stages]
        if not kinds:
            raise ValueError("the pipeline has no stages")
        order = [STAGE_ORDER.index(k) for k in kinds]
        if order != sorted(order) or len(set(kinds)) != len(kinds):
            raise ValueError(
                f"stages {kinds} must appear at most once each, in the order {STAGE_ORDER}"
            )
        if "ar_sft" in kinds and "sft" not in kinds:
            raise ValueError("stage ar_sft trains on the sft stage's rows: it needs an sft stage")
        if "merge" in kinds and "cpt" not in kinds:
            raise ValueError("stage merge averages CPT checkpoints: it needs a cpt stage")
        if "merge" in kinds:
            cpt = stages[kinds.index("cpt")]
            merge = stages[kinds.index("merge")]
            if merge.top_k > cpt.keep_top_k + 1:
                raise ValueError(
                    f"merge.top_k ({merge.top_k}) exceeds the checkpoints cpt keeps "
                    f"(keep_top_k {cpt.keep_top_k} + the latest)"
                )
        data: DataConfig | None = info.data.get("data")
        for i, stage in enumerate(stages):
            if isinstance(stage, CptStage) and data is not None:
                for j, phase in enumerate(stage.phases):
                    if data.seq_len % phase.block_size:
                        raise ValueError(
                            f"stages.{i}.phases.{j}.block_size: {phase.block_size} does not divide "
                            f"data.seq_len ({data.seq_len})"
                        )
                try:
                    plan_phases(
                        [(p.name, p.block_size, p.tokens, p.lr) for p in stage.phases], data.seq_len
                    )
                except ValueError as err:
                    raise ValueError(f"stages.{i}.phases: {err}") from None
        return stages

    @model_validator(mode="after")
    def _combinations(self) -> PipelineConfig:
        if self.model.dtype == "float16" and self.scaling.strategy != "deepspeed":
            raise ValueError(
                "model.dtype float16 needs loss scaling: use bfloat16, or strategy deepspeed"
            )
        shifted = any(isinstance(s, CptStage) and s.shift_labels for s in self.stages)
        if shifted and any(isinstance(s, SftStage | DpoStage) for s in self.stages):
            raise ValueError(
                "shift_labels: post-training and decoding use the unshifted LLaDA2 convention; "
                "a shifted CPT model cannot feed sft / cap / dpo here"
            )
        if self.editing is not None:
            kinds = [s.stage for s in self.stages]
            named = self.editing.stages or []
            if missing := [k for k in named if k not in kinds]:
                raise ValueError(f"editing.stages: {missing} not among the pipeline's stages")
            if not any(self.edits(k) for k in kinds):
                raise ValueError(f"editing: the pipeline has none of the stages {EDITABLE_STAGES}")
            if shifted and self.edits("cpt"):
                raise ValueError("editing: the T2T stream reads unshifted logits (no shift_labels)")
        return self

    def edits(self, stage: str) -> EditingConfig | None:
        """The editing settings if `stage` trains the T2T stream."""
        if self.editing is None:
            return None
        return self.editing if stage in (self.editing.stages or EDITABLE_STAGES) else None

    def anchored(self, base: Path) -> PipelineConfig:
        """Relative local storage and sqlite paths made absolute against `base`: a job runs in
        a temporary copy of its working directory, where relative paths would be lost."""
        root, uri = self.storage.root, self.tracking.uri
        if not root.startswith("s3://") and not Path(root).is_absolute():
            root = str((base / root).resolve())
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            uri = f"sqlite:///{(base / uri.removeprefix('sqlite:///')).resolve()}"
        return self.model_copy(
            update={
                "storage": self.storage.model_copy(update={"root": root}),
                "tracking": self.tracking.model_copy(update={"uri": uri}),
            }
        )

    @model_validator(mode="after")
    def _tokenizer_fits_model(self) -> PipelineConfig:
        if self.model.is_tiny and self.tokenizer.source == "model":
            raise ValueError(
                "tokenizer.source: the tiny model has no tokenizer of its own; use train"
            )
        return self


# --- serving ----------------------------------------------------------------------------------


class Autoscaling(Strict):
    min_replicas: Annotated[int, Field(ge=0)] = 1
    max_replicas: PositiveInt = 1
    target_ongoing_requests: PositiveFloat = Field(
        16, description="per replica; about one full batch"
    )

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        if self.max_replicas < self.min_replicas:
            raise ValueError("max_replicas must be ≥ min_replicas")
        return self


LLADA2_BLOCK_SIZE = 32  # the released LLaDA2.0 models decode in blocks of 32


class ServeConfig(Modes):
    """The Serve app: which model, how it decodes, how requests are batched and limited."""

    model: str = Field(description="an exported model or checkpoint directory, local or s3://")
    model_name: str = Field("llada-ray", description="the id clients pass as `model`")
    decoder: Literal["block", "ar"] = Field("block", description="ar: the AR baseline")
    block_size: PositiveInt | None = Field(
        None,
        description="the block size the model was trained at; None: the export's own "
        f"(lineage.json), else {LLADA2_BLOCK_SIZE} (LLaDA2's)",
    )
    threshold: Rate = Field(0.95, description="default τ (a request may set `threshold`)")
    min_accept: PositiveInt = 1
    use_cache: bool = True
    decoding: DecodingConfig = DecodingConfig()
    temperature: Annotated[float, Field(ge=0, le=2)] = Field(0.0, description="default; 0 greedy")
    default_max_tokens: PositiveInt = 128
    max_tokens_limit: PositiveInt = Field(4096, description="larger requests are refused (400)")
    max_length: PositiveInt = Field(
        4096,
        description="context in tokens, prompt and answer (at most the model's): the KV cache "
        "holds max_batch_size rows of it",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    attention: Literal["auto", "block_sparse", "dense", "flex", "eager"] = "auto"
    torch_threads: PositiveInt | None = Field(None, description="default: the replica's CPUs")
    max_batch_size: PositiveInt = 16
    max_ongoing_requests: PositiveInt = Field(64, description="per replica, queued + decoding")
    num_cpus: PositiveFloat = 1.0
    num_gpus: Annotated[float, Field(ge=0)] = 0.0
    autoscaling: Autoscaling = Autoscaling()
    api_key_env: str = Field(
        "LLADA_RAY_API_KEY", description="environment variable holding the Bearer key; unset: open"
    )
    route_prefix: str = "/"
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    storage: StorageConfig = StorageConfig()

    @model_validator(mode="after")
    def _batches_fit(self) -> ServeConfig:
        # A batch never holds more than the replica's ongoing requests (ENVIRONMENT.md).
        if self.max_ongoing_requests < self.max_batch_size:
            raise ValueError("max_ongoing_requests must be ≥ max_batch_size")
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must be ≤ max_tokens_limit")
        return self


class ConfigError(ValueError):
    """A config file that cannot be read or does not validate; the message names the problem."""


def load_config(path: str | Path) -> PipelineConfig:
    return PipelineConfig.model_validate(read_yaml(path))


def read_yaml(path: str | Path) -> dict:
    """A YAML mapping, or a ConfigError naming the file and what is wrong with it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as err:
        raise ConfigError(f"cannot read config {path}: {err.strerror}") from err
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw
