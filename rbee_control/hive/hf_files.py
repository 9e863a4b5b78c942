"""Which GGUF file(s) of a Hugging Face repo an `hf:` ref means.

A GGUF repo usually holds one model in many quantizations, some of them split
into `-00001-of-0000N.gguf` parts. Files are grouped into quantizations (a split
set is one), each tagged from its name (`Q4_K_M`, `IQ4_XS`, `F16`, ...), and a ref
without a file picks the way Ollama and `llama-server -hf` do: `Q4_K_M`, else the
closest 4-bit, else the smallest. Pure logic: listing the repo is `refs.py`'s job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rbee_worker.protocol.errors import ErrorCode, RbeeError

SPLIT_RE = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)
_QUANT_RE = re.compile(r"(?<![A-Za-z0-9])(I?Q[1-8](?:_[A-Za-z0-9]+)*|F16|F32|BF16)(?![A-Za-z0-9])", re.I)
#: the 4-bit quantizations in the order a default prefers them (quality per byte)
FOUR_BIT = ("Q4_K_M", "Q4_K_S", "Q4_K_L", "Q4_K", "Q4_0", "Q4_1", "IQ4_XS", "IQ4_NL")
DEFAULT_TAG = FOUR_BIT[0]


@dataclass(frozen=True, slots=True)
class RepoFile:
    path: str
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Quant:
    """One loadable model of the repo: a single file, or a complete split set in part order."""

    files: tuple[RepoFile, ...]
    tag: str | None

    @property
    def primary(self) -> str:
        """The file a runtime opens (the first part of a split set)."""
        return self.files[0].path

    @property
    def split(self) -> bool:
        return len(self.files) > 1 or SPLIT_RE.search(self.primary) is not None

    @property
    def size(self) -> int | None:
        sizes = [f.size for f in self.files]
        return None if any(s is None for s in sizes) else sum(s for s in sizes if s is not None)

    @property
    def base(self) -> str:
        """The file name without directory, split suffix or `.gguf`: the default model name."""
        name = self.primary.rsplit("/", 1)[-1]
        return SPLIT_RE.sub("", name) if SPLIT_RE.search(name) else re.sub(r"\.gguf$", "", name, flags=re.I)

    def to_json(self) -> dict[str, object]:
        return {"tag": self.tag, "size": self.size, "files": [f.path for f in self.files]}


def quant_tag(path: str) -> str | None:
    """The quantization named in a file path (the last one, so `Q8_0/x-Q8_0.gguf` is Q8_0), upper case."""
    found = _QUANT_RE.findall(SPLIT_RE.sub(".gguf", path))
    return found[-1].upper() if found else None


def group(files: Iterable[RepoFile]) -> list[Quant]:
    """Every `.gguf` file of a listing as quantizations; incomplete split sets and projectors are left out."""
    singles: list[Quant] = []
    sets: dict[tuple[str, int], dict[int, RepoFile]] = {}
    for f in files:
        if not f.path.lower().endswith(".gguf") or f.path.rsplit("/", 1)[-1].lower().startswith("mmproj"):
            continue
        m = SPLIT_RE.search(f.path)
        if m is None:
            singles.append(Quant((f,), quant_tag(f.path)))
        else:
            sets.setdefault((f.path[: m.start()], int(m.group(2))), {})[int(m.group(1))] = f
    for (_, count), parts in sets.items():
        if sorted(parts) == list(range(1, count + 1)):
            ordered = tuple(parts[i] for i in range(1, count + 1))
            singles.append(Quant(ordered, quant_tag(ordered[0].path)))
    return sorted(singles, key=lambda q: q.primary)


def choose(quants: Sequence[Quant], ref: str, tag: str | None = None) -> tuple[Quant, str]:
    """The quantization `tag` names (case-insensitive), or the default; and why, for the operator."""
    if not quants:
        raise RbeeError(
            ErrorCode.MODEL_NOT_FOUND,
            f"{ref}: the repo has no .gguf files",
            details={"ref": ref, "gguf_files": []},
            hint="rbee runs GGUF models: look for a repo whose name ends in -GGUF",
        )
    if tag is not None:
        matches = [q for q in quants if q.tag == tag.upper()]
        if len(matches) == 1:
            return matches[0], f"quantization {matches[0].tag} as asked"
        what = "names more than one file" if matches else "matches no file"
        raise _listing_error(ref, matches or quants, f"{ref}: tag {tag!r} {what}")
    if len(quants) == 1:
        return quants[0], "the only GGUF model in the repo"
    by_tag: dict[str, list[Quant]] = {}
    for q in quants:
        by_tag.setdefault(q.tag or "", []).append(q)
    for wanted in FOUR_BIT:
        if len(by_tag.get(wanted, [])) == 1:
            why = "the default" if wanted == DEFAULT_TAG else f"the closest 4-bit to {DEFAULT_TAG}"
            return by_tag[wanted][0], f"{wanted}, {why}"
    four = [q for q in quants if q.tag and q.tag.lstrip("I").startswith("Q4")]
    if len(four) == 1:
        return four[0], f"{four[0].tag}, the only 4-bit quantization"
    sized = [q for q in (four or quants) if q.size is not None]
    if sized:
        smallest = min(sized, key=lambda q: (q.size, q.primary))
        return smallest, f"{smallest.tag or smallest.primary}, the smallest (no {DEFAULT_TAG} in the repo)"
    raise _listing_error(ref, quants, f"{ref}: the repo has {len(quants)} GGUF models; name one")


def _listing_error(ref: str, quants: Sequence[Quant], message: str) -> RbeeError:
    listing = [q.to_json() for q in quants[:50]]
    example = next((q.tag for q in quants if q.tag), None)
    m = re.match(r"hf:([^/:@]+/[^/:@]+)", ref)
    repo = m.group(1) if m else ref
    return RbeeError(
        ErrorCode.MODEL_NOT_FOUND if "matches no" in message else ErrorCode.INVALID_REQUEST,
        message + "; the repo has: " + ", ".join(f"{q.tag or '?'} ({q.primary})" for q in quants[:20]),
        details={"ref": ref, "gguf_files": listing},
        hint=f"rbee-keeper models search hf:{repo}"
        + (f", then e.g. hf:{repo}:{example}" if example else f", then hf:{repo}/{quants[0].primary}"),
    )
