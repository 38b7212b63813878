"""The built-in model's pretraining corpus: English prose from documentation that installed
toolchains ship, assembled offline.

Two sources, both read from disk, never downloaded:

* CPython's standard library (PSF License Version 2): the docstrings of every module,
  class and function (read with ``ast``, never imported) and the plain-text language
  reference topics of ``pydoc_data.topics``;
* the Rust toolchain's ``rust-docs`` component (the Rust Project's books: The Rust
  Programming Language, the Reference, the Rustonomicon, Rust by Example, the Cargo,
  rustc, rustdoc, edition, style and embedded books; Apache-2.0 OR MIT, used under MIT):
  the ``<p>`` paragraphs of each page's ``<main>``, code blocks left out.

Each docstring, topic or page is one document. Indented blocks (code examples, option
tables) and paragraphs that are mostly not letters are dropped, the rest reflowed into one
line per paragraph with typographic quotes and dashes made ASCII, exact duplicates
removed, and the documents sorted by id. Copyright notices and licence texts:
``engine/assets/CORPUS-LICENSES.txt``.

Other versions ship other text, so the assembled corpus is shipped, not rebuilt:
``engine/assets/tessera-corpus-v1.jsonl.xz`` (one JSON document per line), assembled from
CPython 3.11.7 and rust-docs 1.95.0. :func:`load` reads it and checks its sha256 (of the
uncompressed bytes, so the compressor does not matter); ``python -m tessera.train.corpus
--rebuild FILE`` assembles it again (exactly equal with those two versions).

The held-out split is by source group (a whole stdlib module, or a whole reference
topic), chosen by a hash of the group's name, so near-duplicate paragraphs of one module
never straddle the split.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import logging
import lzma
import platform
import re
import shutil
import subprocess
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from tessera.engine.builtin import ASSETS

log = logging.getLogger(__name__)

CORPUS_VERSION = "tessera-corpus-v1"
CORPUS_FILE = ASSETS / f"{CORPUS_VERSION}.jsonl.xz"
# sha256 of the uncompressed JSON lines of the shipped corpus (checked by ``load``).
CORPUS_SHA256 = "0f5fd511ac69f070ea862e0b28a9d626f50d076294336dd4bbfd16518a4c6206"
SOURCES = ("CPython 3.11.7 standard library docstrings and pydoc_data.topics (PSF-2.0); "
           "Rust 1.95.0 rust-docs books (Apache-2.0 OR MIT, used under MIT)")

HELD_OUT_PER_MILLE = 40  # of source groups (stdlib modules, reference topics, pages)

# Standard-library folders that are tests, demos or generated tables, not documentation.
_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "lib2to3",
                         "turtledemo", "__phello__", "encodings", "msilib", "pydoc_data"})
# The rust-docs books read (each a folder of mdBook pages under share/doc/rust/html).
RUST_BOOKS = ("book", "cargo", "edition-guide", "embedded-book", "nomicon", "reference",
              "rust-by-example", "rustc", "rustdoc", "style-guide")
_RUST_SKIP_PAGES = frozenset({"print.html", "toc.html", "404.html", "index.html"})
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_MIN_PARAGRAPH_WORDS = 4
_MIN_LETTER_SHARE = 0.80  # letters and spaces among a kept paragraph's characters
_MAX_NON_ASCII_SHARE = 0.02
_ASCII = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                        "\u2013": "-", "\u2014": "--", "\u2026": "...", "\u00a0": " "})


@dataclass(frozen=True)
class Document:
    id: str  # "stdlib:json/__init__.py:json.dumps", "topic:assignment", "rust:book/ch01.html"
    group: str  # the split unit: "stdlib:json/__init__.py", "topic:assignment", the page
    title: str  # what the text documents: "json.dumps", "assignment", the page's path
    text: str  # paragraphs separated by one blank line

    @property
    def held_out(self) -> bool:
        digest = hashlib.sha256(self.group.encode("utf-8")).digest()
        return int.from_bytes(digest[:4], "big") % 1000 < HELD_OUT_PER_MILLE


def prose(paragraph: str) -> str | None:
    """One paragraph reflowed onto one line with ASCII quotes and dashes, or None when it
    is not English prose: fewer than four words, less than 80% letters and spaces, more
    than 2% non-ASCII characters (a translation), or a start like code, a prompt or a
    list/table."""
    text = re.sub(r"\s+", " ", paragraph.translate(_ASCII)).strip()
    if text.startswith((">>>", "...", "*", "-", "=", "+", "|", "$", "#")):
        return None
    if len(_WORD.findall(text)) < _MIN_PARAGRAPH_WORDS:
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    if sum(not ch.isascii() for ch in text) > _MAX_NON_ASCII_SHARE * len(text):
        return None
    return text if letters >= _MIN_LETTER_SHARE * len(text) else None


def clean_text(raw: str) -> str:
    """Keep the prose paragraphs of a docstring or topic, one line each. A paragraph is a
    run of non-blank lines; one with an indented line (a code example, an option table, a
    grammar rule) is dropped whole."""
    kept: list[str] = []
    for block in re.split(r"\n\s*\n", raw.expandtabs(8)):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line[:1].isspace() for line in lines):
            continue
        text = prose(" ".join(lines))
        if text is not None:
            kept.append(text)
    return "\n\n".join(kept)


def _stdlib_files(root: Path) -> Iterator[Path]:
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if any(part in _SKIP_PARTS for part in parts):
            continue
        yield path


def _docstrings(tree: ast.Module, module: str) -> Iterator[tuple[str, str]]:
    """(qualified name, docstring) of the module, its classes and functions, nested
    definitions included, in source order."""
    doc = ast.get_docstring(tree, clean=True)
    if doc:
        yield module, doc
    queue: list[tuple[str, ast.AST]] = [(module, tree)]
    while queue:
        prefix, node = queue.pop(0)
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                name = f"{prefix}.{child.name}"
                doc = ast.get_docstring(child, clean=True)
                if doc:
                    yield name, doc
                queue.append((name, child))


def stdlib_documents(root: Path | None = None) -> Iterator[Document]:
    root = root or Path(sysconfig.get_paths()["stdlib"])
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        module = rel.removesuffix(".py").replace("/", ".").removesuffix(".__init__")
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            log.warning("skipped unparsable file", extra={"file": rel})
            continue
        group = f"stdlib:{rel}"
        for name, doc in _docstrings(tree, module):
            text = clean_text(doc)
            if text:
                yield Document(id=f"{group}:{name}", group=group, title=name, text=text)


def topic_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics  # the language reference as plain text

    for key in sorted(topics):
        text = clean_text(topics[key])
        if text:
            yield Document(id=f"topic:{key}", group=f"topic:{key}", title=key, text=text)


class _MainParagraphs(HTMLParser):
    """The text of each ``<p>`` inside ``<main>``, code blocks (``<pre>``) left out."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._main = 0
        self._skip = 0
        self._current: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "main":
            self._main += 1
        elif tag in ("pre", "script", "style"):
            self._skip += 1
        elif tag == "p" and self._main and not self._skip:
            self._current = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "main":
            self._main -= 1
        elif tag in ("pre", "script", "style"):
            self._skip -= 1
        elif tag == "p" and self._current is not None:
            self.paragraphs.append("".join(self._current))
            self._current = None

    def handle_data(self, data: str) -> None:
        if self._current is not None and not self._skip:
            self._current.append(data)


def rust_docs_dir() -> Path:
    """``share/doc/rust/html`` of the ``rustc`` on PATH (its sysroot)."""
    rustc = shutil.which("rustc")
    if rustc is None:
        raise FileNotFoundError("rustc is not on PATH: pass the rust-docs html folder")
    sysroot = subprocess.run([rustc, "--print", "sysroot"], check=True, capture_output=True,
                             text=True).stdout.strip()
    return Path(sysroot) / "share" / "doc" / "rust" / "html"


def rust_documents(html_root: Path) -> Iterator[Document]:
    for book in RUST_BOOKS:
        for page in sorted((html_root / book).rglob("*.html")):
            if page.name in _RUST_SKIP_PAGES:
                continue
            parser = _MainParagraphs()
            parser.feed(page.read_text(encoding="utf-8"))
            kept = [text for text in map(prose, parser.paragraphs) if text is not None]
            if kept:
                rel = page.relative_to(html_root).as_posix()
                yield Document(id=f"rust:{rel}", group=f"rust:{rel}", title=rel,
                               text="\n\n".join(kept))


def assemble(rust_html: Path | None = None) -> list[Document]:
    """Every document of both sources, deduplicated by text (the first by id wins) and
    sorted by id."""
    rust_html = rust_html or rust_docs_dir()
    docs = sorted([*stdlib_documents(), *topic_documents(), *rust_documents(rust_html)],
                  key=lambda d: d.id)
    seen: set[str] = set()
    unique: list[Document] = []
    for doc in docs:
        if doc.text not in seen:
            seen.add(doc.text)
            unique.append(doc)
    return unique


def serialise(docs: list[Document]) -> bytes:
    lines = [json.dumps({"id": d.id, "group": d.group, "title": d.title, "text": d.text},
                        ensure_ascii=False, sort_keys=True) for d in docs]
    return ("\n".join(lines) + "\n").encode("utf-8")


def parse(data: bytes) -> list[Document]:
    docs: list[Document] = []
    for line in data.decode("utf-8").splitlines():
        record = json.loads(line)
        docs.append(Document(id=record["id"], group=record["group"], title=record["title"],
                             text=record["text"]))
    return docs


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load(path: Path = CORPUS_FILE, expected_sha256: str | None = CORPUS_SHA256) -> list[Document]:
    """The shipped corpus; raises ``ValueError`` if its content is not the one pinned."""
    data = lzma.decompress(path.read_bytes())
    digest = sha256(data)
    if expected_sha256 is not None and digest != expected_sha256:
        raise ValueError(f"{path}: corpus sha256 {digest} is not the pinned {expected_sha256}")
    return parse(data)


def split(docs: list[Document]) -> tuple[list[Document], list[Document]]:
    """(train, held out)."""
    return [d for d in docs if not d.held_out], [d for d in docs if d.held_out]


def write(docs: list[Document], path: Path) -> str:
    """Write the corpus xz-compressed; returns the sha256 of the uncompressed bytes."""
    data = serialise(docs)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    return sha256(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tessera.train.corpus",
        description="Check and describe the built-in model's pretraining corpus, or "
                    "assemble it again from the installed documentation.")
    parser.add_argument("--rebuild", type=Path, metavar="FILE", default=None,
                        help="assemble the corpus into FILE (.jsonl.xz); equal to the "
                             "shipped one with CPython 3.11.7 and rust-docs 1.95.0")
    parser.add_argument("--rust-docs", type=Path, metavar="DIR", default=None,
                        help="rust-docs html folder (default: the sysroot of rustc on PATH)")
    args = parser.parse_args(argv)
    if args.rebuild is not None:
        docs = assemble(args.rust_docs)
        digest = write(docs, args.rebuild)
        same = "equal to" if digest == CORPUS_SHA256 else "differs from"
        print(f"{args.rebuild}: {len(docs)} documents, sha256 {digest} "  # noqa: T201
              f"({same} the shipped corpus; assembled on Python {platform.python_version()})")
        return
    train, held = split(load())
    size = {name: sum(len(d.text.encode()) for d in part)
            for name, part in (("train", train), ("held out", held))}
    print(f"{CORPUS_FILE.name}: sha256 {CORPUS_SHA256} (verified)\n{SOURCES}\n"  # noqa: T201
          f"{len(train)} train documents ({size['train']} bytes), {len(held)} held out "
          f"({size['held out']} bytes)")


if __name__ == "__main__":
    main()
