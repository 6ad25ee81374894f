"""Typed schema of the data pipeline (``data=NAME``, ``tokenizer=NAME`` in sbtrain commands).

Two halves share one ``data`` node so a recipe names a corpus once:

- build (``sbtrain-data``): raw files -> tokens -> ``<output>/data.bin|.idx`` + ``manifest.json``
- train (the trainer's loader): which built datasets, their blend weights, the split, the shuffle

Stored in Hydra's ConfigStore as ``data/data_schema`` and ``tokenizer/tokenizer_schema``;
recipes start with ``defaults: [data_schema, _self_]`` so a typo in a key is an error.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from sbtrain.config.model import ConfigError

FORMATS = ("json", "parquet", "text", "arrow")
INVALID_UTF8_POLICIES = ("replace", "error")
TEXT_UNITS = ("file", "paragraph")
BAD_RECORD_POLICIES = ("error", "skip")
TOKENIZER_KINDS = ("pretrained", "train_bpe")
RECORD_TYPES = ("text", "chat")
CHAT_LOSS_ON = ("assistant", "all")


@dataclass
class TokenizerConfig:
    # pretrained: AutoTokenizer.from_pretrained(path), a local HF folder.
    # train_bpe: a byte-level BPE trained on the corpus, saved to `path` (default <data.output>/tokenizer).
    kind: str = "pretrained"
    path: str | None = None
    vocab_size: int = 8192  # train_bpe only
    min_frequency: int = 2  # train_bpe only
    # End-of-document token appended to every document. None: the tokenizer's eos_token.
    eod_token: str | None = None
    train_max_documents: int | None = None  # train_bpe: train on the first N documents only

    def validate(self) -> TokenizerConfig:
        if self.kind not in TOKENIZER_KINDS:
            raise ConfigError(f"tokenizer.kind={self.kind!r} is not one of {TOKENIZER_KINDS}")
        if self.kind == "pretrained" and not self.path:
            raise ConfigError(
                "tokenizer.path is not set: give a local HF tokenizer folder (tokenizer.path=DIR), "
                "or train one on the corpus with tokenizer=train_bpe"
            )
        if self.kind == "train_bpe" and not 257 <= self.vocab_size:
            # 256 byte symbols + the EOD token is the smallest byte-level vocabulary that can merge anything.
            raise ConfigError(f"tokenizer.vocab_size={self.vocab_size} must be at least 257 for a byte-level BPE")
        return self


@dataclass
class ChatConfig:
    """Conversation records (``data.records=chat``; sbtrain/data/chat.py)."""

    field: str = "messages"  # the record field holding [{role, content}, ...]
    # The chat template: null = the tokenizer's own (tokenizer_config.json chat_template; chatml when
    # tokenizer=train_bpe), chatml = built in, or a path to a Jinja file.
    template: str | None = None
    loss_on: str = "assistant"  # assistant: the assistant turns only | all: every token
    # A conversation longer than this many tokens (EOD included) is a bad record (error, or a counted skip
    # with data.on_bad_record=skip); null: any length (training splits long ones across samples).
    max_tokens: int | None = None

    def validate(self) -> ChatConfig:
        if self.loss_on not in CHAT_LOSS_ON:
            raise ConfigError(f"data.chat.loss_on={self.loss_on!r} is not one of {CHAT_LOSS_ON}")
        if not self.field:
            raise ConfigError("data.chat.field is empty: name the field holding the messages, e.g. messages")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise ConfigError(f"data.chat.max_tokens={self.max_tokens} must be >= 2 (or null: any length)")
        return self


@dataclass
class DataConfig:
    # ---- build: raw corpus -> indexed dataset ----
    paths: list[str] = field(default_factory=list)  # local files / globs, or one hub dataset name
    format: str | None = None  # json | parquet | text | arrow; None: from each file's extension
    text_field: str = "text"
    # text: a document per record / file | chat: a conversation per record, with a loss mask (data.chat)
    records: str = "text"
    chat: ChatConfig = field(default_factory=ChatConfig)
    streaming: bool = False  # iterate the files instead of materialising them (corpora larger than memory)
    invalid_utf8: str = "replace"  # replace (count the lines) | error (names file and line)
    # Plain text (.txt/.text), the rule every command shares (sbtrain.data.sources.text_documents):
    # file = the whole file is one document; paragraph = each block of non-blank lines is one.
    # Newlines inside a document are kept as text either way.
    text_unit: str = "file"
    # A malformed JSON Lines record or an empty input file: error (names file:line) | skip (counted in
    # the manifest and printed).
    on_bad_record: str = "error"
    # A file whose invalid-UTF-8 bytes exceed this fraction of its size is refused (it is binary or another
    # encoding, and "replace" would turn it into garbage); below it the bytes become U+FFFD with a warning.
    max_undecodable_fraction: float = 0.01
    num_proc: int = 1  # tokenizer worker processes
    output: str = "data/tokenized/corpus"  # directory: data.bin, data.idx, manifest.json
    overwrite: bool = False
    hub_split: str = "train"

    # ---- train: built datasets -> packed samples ----
    datasets: list[str] = field(default_factory=list)  # built dataset dirs; empty: [output]
    weights: list[float] = field(default_factory=list)  # blend weights (token share); empty: equal
    seed: int = 1234  # document permutation and window shuffle
    split_seed: int = 4321  # which documents are held out; fixed so every stage sees the same split
    valid_fraction: float = 0.0  # fraction of each dataset's documents held out for validation
    shuffle_window: int = 1024  # samples shuffled inside windows of this many samples
    per_domain_packing: bool = False  # pack documents of one dataset only into a sample
    document_boundaries: bool = False  # yield cu_seqlens for document masking
    # A dataset smaller than its share of one global batch would be repeated within every step: refused
    # unless this is true (then a warning gives the epoch count).
    allow_repeat: bool = False
    # Global batches built ahead in a background thread while the step runs (0 = off). The checkpointed
    # loader state counts only the batches training received, so a resume is exact either way.
    prefetch: int = 2

    def validate(self) -> DataConfig:
        if self.records not in RECORD_TYPES:
            raise ConfigError(f"data.records={self.records!r} is not one of {RECORD_TYPES}")
        self.chat.validate()
        if self.records == "chat" and self.format == "text":
            raise ConfigError("data.records=chat reads JSON / Parquet / Arrow records with a messages field, not "
                              "plain text: set data.format to json (or null) or data.records=text")
        if self.format is not None and self.format not in FORMATS:
            raise ConfigError(f"data.format={self.format!r} is not one of {FORMATS} (or null to infer)")
        if self.invalid_utf8 not in INVALID_UTF8_POLICIES:
            raise ConfigError(f"data.invalid_utf8={self.invalid_utf8!r} is not one of {INVALID_UTF8_POLICIES}")
        if self.text_unit not in TEXT_UNITS:
            raise ConfigError(f"data.text_unit={self.text_unit!r} is not one of {TEXT_UNITS} (file: one document "
                              "per file; paragraph: one per block of non-blank lines)")
        if self.on_bad_record not in BAD_RECORD_POLICIES:
            raise ConfigError(f"data.on_bad_record={self.on_bad_record!r} is not one of {BAD_RECORD_POLICIES}")
        if not 0.0 <= self.max_undecodable_fraction <= 1.0:
            raise ConfigError(f"data.max_undecodable_fraction={self.max_undecodable_fraction} must be in [0, 1] "
                              "(0.01: refuse a file with more than 1% invalid UTF-8 bytes)")
        if self.num_proc < 1:
            raise ConfigError(f"data.num_proc={self.num_proc} must be >= 1")
        if not self.text_field:
            raise ConfigError("data.text_field is empty: name the column that holds the text, e.g. text")
        if self.weights and len(self.weights) != len(self.train_datasets()):
            raise ConfigError(
                f"data.weights has {len(self.weights)} entries but data.datasets has "
                f"{len(self.train_datasets())}: give one weight per dataset"
            )
        if any(w <= 0 for w in self.weights):
            raise ConfigError(f"data.weights={list(self.weights)} must all be positive")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ConfigError(f"data.valid_fraction={self.valid_fraction} must be in [0, 1)")
        if self.shuffle_window < 1:
            raise ConfigError(f"data.shuffle_window={self.shuffle_window} must be >= 1 (1 = no shuffle)")
        if self.prefetch < 0:
            raise ConfigError(f"data.prefetch={self.prefetch} must be >= 0 (batches built ahead; 0 = off)")
        return self

    def train_datasets(self) -> list[str]:
        return list(self.datasets) if self.datasets else [self.output]


@dataclass
class DataCommandConfig:
    """Root of ``sbtrain-data``."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)


def register_data_schema() -> None:
    """Store the schemas (idempotent: ConfigStore overwrites)."""
    cs = ConfigStore.instance()
    cs.store(group="data", name="data_schema", node=DataConfig)
    cs.store(group="tokenizer", name="tokenizer_schema", node=TokenizerConfig)
    cs.store(name="data_command_schema", node=DataCommandConfig)


register_data_schema()
