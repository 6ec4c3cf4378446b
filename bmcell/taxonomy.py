"""Cell classes and how evaluation merges them.

The default is the study's taxonomy: 17 training classes, with bare nuclei (BN) and
artifacts (ART) merged into one class for evaluation (16 evaluation classes). A lab
may load another taxonomy from JSON; nothing else in bmcell hard-codes class names.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class CellClass:
    code: str
    name: str
    description: str = ""
    # Key binding on the reviewer's page ("" = none).
    key: str = ""


DEFAULT_CLASSES: tuple[CellClass, ...] = (
    CellClass("PEB", "proerythroblast / basophilic erythroblast"),
    CellClass("PCEB", "polychromatic erythroblast"),
    CellClass("OEB", "orthochromatic erythroblast"),
    CellClass("MB", "myeloblast"),
    CellClass("PMC", "promyelocyte"),
    CellClass("MC", "myelocyte"),
    CellClass("MMC", "metamyelocyte"),
    CellClass("Band", "band neutrophil"),
    CellClass("Seg", "segmented neutrophil"),
    CellClass("EO", "eosinophil"),
    CellClass("BA", "basophil / mast cell"),
    CellClass("MO", "monocyte"),
    CellClass("LY", "lymphocyte"),
    CellClass("PC", "plasma cell"),
    CellClass("MIT", "mitotic cell"),
    CellClass("BN", "bare nucleus"),
    CellClass("ART", "artifact"),
)


@dataclass(frozen=True)
class Taxonomy:
    """Ordered training classes plus the merge used for evaluation.

    ``eval_merge`` maps a training class code to the evaluation class it counts as;
    codes absent from it evaluate as themselves.
    """

    name: str
    classes: tuple[CellClass, ...]
    eval_merge: dict[str, str] = field(default_factory=dict)
    myeloid: tuple[str, ...] = ()
    erythroid: tuple[str, ...] = ()
    # A differential count's blast percentage counts these; the classes left out of
    # its percentages (bare nuclei, artifacts: not nucleated cells, ICSH) are reported apart.
    blasts: tuple[str, ...] = ()
    not_counted: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        codes = [c.code for c in self.classes]
        if len(set(codes)) != len(codes):
            raise ValueError(f"taxonomy {self.name!r} repeats a class code: {codes}")
        unknown = set(self.eval_merge) - set(codes)
        if unknown:
            raise ValueError(f"taxonomy {self.name!r} merges unknown classes: {sorted(unknown)}")

    @property
    def codes(self) -> list[str]:
        return [c.code for c in self.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def index(self, code: str) -> int:
        try:
            return self.codes.index(code)
        except ValueError:
            raise KeyError(f"unknown class {code!r}; expected one of {self.codes}") from None

    @property
    def eval_codes(self) -> list[str]:
        """Evaluation classes, in training order of their first member."""
        seen: list[str] = []
        for code in self.codes:
            target = self.eval_merge.get(code, code)
            if target not in seen:
                seen.append(target)
        return seen

    def eval_index_map(self) -> list[int]:
        """For each training class index, the index of its evaluation class."""
        eval_codes = self.eval_codes
        return [eval_codes.index(self.eval_merge.get(c, c)) for c in self.codes]

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "classes": [
                {"code": c.code, "name": c.name}
                | ({"description": c.description} if c.description else {})
                | ({"key": c.key} if c.key else {})
                for c in self.classes
            ],
            "eval_merge": self.eval_merge,
            "myeloid": list(self.myeloid),
            "erythroid": list(self.erythroid),
            "blasts": list(self.blasts),
            "not_counted": list(self.not_counted),
        }

    @classmethod
    def from_json(cls, data: dict) -> Taxonomy:
        return cls(
            name=data["name"],
            classes=tuple(
                CellClass(c["code"], c["name"], c.get("description", ""), c.get("key", ""))
                for c in data["classes"]
            ),
            eval_merge=dict(data.get("eval_merge", {})),
            myeloid=tuple(data.get("myeloid", ())),
            erythroid=tuple(data.get("erythroid", ())),
            blasts=tuple(data.get("blasts", ())),
            not_counted=tuple(data.get("not_counted", ())),
        )

    @classmethod
    def load(cls, path: str | Path) -> Taxonomy:
        """Read a taxonomy file (JSON, or YAML by its .yaml/.yml suffix), validated."""
        path = Path(path)
        fmt = "yaml" if path.suffix.lower() in (".yaml", ".yml") else "json"
        return parse_taxonomy(path.read_text(), fmt=fmt, source=str(path))


DEFAULT_TAXONOMY = Taxonomy(
    name="jslh-17",
    classes=DEFAULT_CLASSES,
    eval_merge={"BN": "BN+ART", "ART": "BN+ART"},
    myeloid=("MB", "PMC", "MC", "MMC", "Band", "Seg", "EO", "BA", "MO"),
    erythroid=("PEB", "PCEB", "OEB"),
    blasts=("MB",),
    not_counted=("BN", "ART"),
)


class TaxonomyError(ValueError):
    """A taxonomy file's error, naming its line (when known) and field."""

    def __init__(self, message: str, *, field: str, line: int | None = None, source: str = ""):
        where = f"{source}:" if source else ""
        where += f"line {line}: " if line else ""
        super().__init__(f"{where}{field}: {message}")
        self.field = field
        self.line = line


_LIST_FIELDS = ("myeloid", "erythroid", "blasts", "not_counted")
_TOP_FIELDS = {"name", "classes", "eval_merge", *_LIST_FIELDS}
_CLASS_FIELDS = {"code", "name", "description", "key"}


def _line_of(text: str, needle: str, start_line: int = 1) -> int | None:
    """The first line at or after start_line whose text contains needle."""
    for i, line in enumerate(text.splitlines()[start_line - 1 :], start=start_line):
        if needle in line:
            return i
    return None


def parse_taxonomy(text: str, *, fmt: str = "json", source: str = "") -> Taxonomy:
    """Parse and validate a taxonomy file's text; errors name the line and the field."""
    if fmt == "yaml":
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            raise TaxonomyError(
                str(getattr(e, "problem", e)),
                field="(syntax)",
                line=mark.line + 1 if mark else None,
                source=source,
            ) from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaxonomyError(e.msg, field="(syntax)", line=e.lineno, source=source) from None

    def err(msg: str, fld: str, needle: str | None = None, after: int = 1) -> TaxonomyError:
        return TaxonomyError(
            msg, field=fld, line=_line_of(text, needle or fld, after), source=source
        )

    if not isinstance(data, dict):
        raise TaxonomyError("the file must hold a mapping", field="(top)", line=1, source=source)
    for key in data:
        if key not in _TOP_FIELDS:
            raise err(f"unknown field; expected one of {sorted(_TOP_FIELDS)}", str(key))
    if not isinstance(data.get("name"), str) or not data["name"].strip():
        raise err("required, a non-empty string", "name")
    classes = data.get("classes")
    if not isinstance(classes, list) or not classes:
        raise err("required, a non-empty list of classes", "classes")
    seen: dict[str, int] = {}
    keys: dict[str, str] = {}
    line = _line_of(text, "classes") or 1
    parsed = []
    for i, c in enumerate(classes):
        fld = f"classes[{i}]"
        if not isinstance(c, dict):
            raise err("each class must be a mapping with code and name", fld, "classes")
        code = c.get("code")
        cline = _line_of(text, str(code), line + (1 if i else 0)) if isinstance(code, str) else None
        line = cline or line
        for key in c:
            if key not in _CLASS_FIELDS:
                raise err(
                    f"unknown field; expected one of {sorted(_CLASS_FIELDS)}",
                    f"{fld}.{key}",
                    str(key),
                    line,
                )
        if not isinstance(code, str) or not code.strip():
            raise err("required, a non-empty string", f"{fld}.code", "code", line)
        if code in seen:
            raise err(
                f"repeats class code {code!r} (classes[{seen[code]}])", f"{fld}.code", code, line
            )
        seen[code] = i
        if not isinstance(c.get("name"), str) or not c["name"].strip():
            raise err("required, a non-empty string", f"{fld}.name", "name", line)
        if not isinstance(c.get("description", ""), str):
            raise err("must be a string", f"{fld}.description", "description", line)
        key = c.get("key", "")
        if key != "" and (not isinstance(key, str) or len(key) != 1 or key.isspace()):
            raise err(
                "must be one character (the reviewer page's key binding)", f"{fld}.key", "key", line
            )
        if key:
            if key in keys:
                raise err(f"key {key!r} is already bound to {keys[key]}", f"{fld}.key", "key", line)
            keys[key] = code
        parsed.append(c)
    merge = data.get("eval_merge", {})
    if not isinstance(merge, dict):
        raise err("must map a class code to its evaluation class", "eval_merge")
    for code, target in merge.items():
        if code not in seen:
            raise err(
                f"unknown class code {code!r}",
                f"eval_merge.{code}",
                str(code),
                _line_of(text, "eval_merge") or 1,
            )
        if not isinstance(target, str) or not target:
            raise err(
                "the evaluation class must be a non-empty string",
                f"eval_merge.{code}",
                str(code),
                _line_of(text, "eval_merge") or 1,
            )
    for fld in _LIST_FIELDS:
        value = data.get(fld, [])
        if not isinstance(value, list):
            raise err("must be a list of class codes", fld)
        for code in value:
            if code not in seen:
                raise err(f"unknown class code {code!r}", fld)
    return Taxonomy.from_json(data)


def check_additive(old: Taxonomy, new: Taxonomy) -> None:
    """Raise TaxonomyError unless new only appends classes to old.

    Existing classes keep their position and meaning (code, name, evaluation merge);
    description and key bindings may change. Appended classes get new output rows.
    """
    if len(new.classes) < len(old.classes):
        raise TaxonomyError(
            f"removes classes {sorted(set(old.codes) - set(new.codes))}; a model's taxonomy may only append classes",
            field="classes",
        )
    for i, (a, b) in enumerate(zip(old.classes, new.classes, strict=False)):
        if a.code != b.code:
            raise TaxonomyError(
                f"class {i} was {a.code!r}, now {b.code!r}; existing classes keep their order and codes",
                field=f"classes[{i}].code",
            )
        if a.name != b.name:
            raise TaxonomyError(
                f"class {a.code!r} was named {a.name!r}, now {b.name!r}; existing classes keep their meaning",
                field=f"classes[{i}].name",
            )
        if old.eval_merge.get(a.code, a.code) != new.eval_merge.get(a.code, a.code):
            raise TaxonomyError(
                f"class {a.code!r} changes its evaluation class", field=f"eval_merge.{a.code}"
            )


# Per process, a model's taxonomy for a short while: callers ask per request, not per cell.
_CACHE_TTL_S = 30.0
_cache: dict[str, tuple[float, Taxonomy]] = {}


def for_model(conn, model_name: str, *, max_age_s: float = _CACHE_TTL_S) -> Taxonomy:
    """The latest taxonomy stored for model_name, or the study's default."""
    import time

    now = time.monotonic()
    hit = _cache.get(model_name)
    if hit is not None and now - hit[0] < max_age_s:
        return hit[1]
    row = conn.execute(
        "SELECT taxonomy FROM model_taxonomies WHERE model_name = %s ORDER BY version DESC LIMIT 1",
        (model_name,),
    ).fetchone()
    tax = DEFAULT_TAXONOMY if row is None else Taxonomy.from_json(row["taxonomy"])
    _cache[model_name] = (now, tax)
    return tax


def store_for_model(conn, model_name: str, taxonomy: Taxonomy, *, loaded_by: str) -> int:
    """Store a new taxonomy version for model_name (add-only after the first); its number."""
    with conn.transaction():
        row = conn.execute(
            "SELECT version, taxonomy FROM model_taxonomies WHERE model_name = %s"
            " ORDER BY version DESC LIMIT 1 FOR UPDATE",
            (model_name,),
        ).fetchone()
        if row is not None:
            check_additive(Taxonomy.from_json(row["taxonomy"]), taxonomy)
        version = 1 if row is None else row["version"] + 1
        conn.execute(
            "INSERT INTO model_taxonomies (model_name, version, taxonomy, loaded_by)"
            " VALUES (%s, %s, %s::jsonb, %s)",
            (model_name, version, json.dumps(taxonomy.to_json()), loaded_by),
        )
    _cache.pop(model_name, None)
    return version
