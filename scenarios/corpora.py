"""Text corpora for token streams (continual pre-training): what a domain's documents are.

A `Corpus` names its documents (an iterator of texts, in a fixed order) and a fingerprint of
their content, which keys the token cache (`scenarios.token_stream`): a changed file gives a new
cache, an unchanged corpus is never tokenised twice. Sources, each a `_target_` in a domain's
config:

- `text_files(paths)`: local files or folders (glob patterns; `.txt` and `.md` files are one
  document each, `.jsonl` files one document per line's `text_field`);
- `debian_man_pages(package)`: the man pages a Debian package installed (`dpkg -L`), turned from
  roff into plain text. `manpages` (English), `manpages-de`, `manpages-fr` and `manpages-es` hold
  the same kind of text in four languages (GPL; `make install` installs them): a language-shift
  stream like Ibrahim et al.'s English -> German;
- `python_stdlib()`: the running Python's standard-library sources, a code domain;
- `hub_dataset(path)`: an HF `datasets` dataset, streamed, for users with a network.
"""
from __future__ import annotations

import glob
import gzip
import hashlib
import itertools
import json
import re
import subprocess
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

from cl.errors import UserError

TEXT_SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class Corpus:
    """A domain's documents: `documents()` yields their texts in a fixed order; `fingerprint`
    identifies that content (files with their sizes and modification times, or a hub dataset and
    revision); `about` is what results.json says of it."""

    name: str
    fingerprint: str
    documents: Callable[[], Iterator[str]]
    about: dict = field(default_factory=dict)


def _files_fingerprint(kind: str, files: Sequence[Path], extra: dict | None = None) -> str:
    h = hashlib.sha256(json.dumps({"kind": kind, **(extra or {})}, sort_keys=True).encode())
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


# ---- local files -----------------------------------------------------------------------------

def text_files(paths: str | Sequence[str], text_field: str = "text", max_documents: int | None = None,
               name: str | None = None) -> Corpus:
    """Local text files, from glob patterns or folders; relative to the working directory. A
    `.jsonl` file holds a document per line (its `text_field`); any other file is one document.
    A folder is searched recursively for `.txt`, `.md` and `.jsonl` files. `max_documents` keeps
    the first ones."""
    patterns = [paths] if isinstance(paths, str) else list(paths)
    files: list[Path] = []
    for pattern in patterns:
        pattern = str(Path(pattern).expanduser())
        matched = [Path(p) for p in sorted(glob.glob(pattern, recursive=True))]
        for p in matched:
            if p.is_dir():
                files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in TEXT_SUFFIXES)
            else:
                files.append(p)
        if not matched:
            raise UserError(f"No file or folder matches {pattern!r}; give the corpus existing paths or glob patterns "
                            f"({', '.join(TEXT_SUFFIXES)} files).")
    files = list(dict.fromkeys(files))
    if not files:
        raise UserError(f"{', '.join(map(repr, patterns))} hold no {', '.join(TEXT_SUFFIXES)} files; point the "
                        "corpus at text files, or at folders that contain them.")

    def all_documents() -> Iterator[str]:
        for f in files:
            if f.suffix != ".jsonl":
                yield f.read_text(encoding="utf-8", errors="replace")
                continue
            with open(f, encoding="utf-8", errors="replace") as lines:
                for n, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{f}:{n} is not a JSON line ({e.msg}); fix the file or leave it out.") from None
                    if not isinstance(record, dict) or text_field not in record:
                        raise UserError(f"{f}:{n} has no {text_field!r} field; set the corpus's text_field to the "
                                        "field that holds the text.")
                    yield str(record[text_field])

    return Corpus(name or Path(patterns[0]).stem,
                  _files_fingerprint("files", files, {"text_field": text_field, "max_documents": max_documents}),
                  lambda: itertools.islice(all_documents(), max_documents),
                  {"source": "files", "patterns": patterns, "files": len(files)})


# ---- Debian man pages ------------------------------------------------------------------------

def package_files(package: str) -> list[Path]:
    """The files a Debian package installed (`dpkg -L`), or one sentence saying how to install it."""
    try:
        listing = subprocess.run(["dpkg", "-L", package], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise UserError(f"The corpus reads the Debian package {package}, and this system has no dpkg; use "
                        "text_files with a folder of text instead.") from None
    if listing.returncode != 0:
        raise UserError(f"The Debian package {package} is not installed; run `make install` (it installs the corpora "
                        f"of the presets) or `apt-get install {package}`.")
    return [Path(line) for line in listing.stdout.splitlines() if line.strip()]


def debian_man_pages(package: str, sections: Sequence[int | str] | None = None, max_documents: int | None = None,
                     name: str | None = None) -> Corpus:
    """The man pages (roff, gzipped) a Debian package installed, each as one plain-text document
    (`man_to_text`), in path order; pages that only include another (`.so`) are skipped.
    `sections` keeps only those man sections (e.g. [1, 8]); `max_documents` the first pages."""
    pages = sorted(f for f in package_files(package) if "/man/" in str(f) and f.name.endswith(".gz") and f.is_file())
    if sections is not None:
        wanted = {str(s) for s in sections}
        pages = [p for p in pages if p.parent.name.removeprefix("man") in wanted]
    if not pages:
        raise UserError(f"The Debian package {package} installed no man pages{' in sections ' + str(list(sections)) if sections else ''}; "
                        "name a package of man pages (manpages, manpages-de, manpages-fr, manpages-es).")

    def documents() -> Iterator[str]:
        for page in pages:
            roff = gzip.decompress(page.read_bytes()).decode("utf-8", errors="replace")
            if roff.lstrip().startswith(".so "):
                continue
            yield man_to_text(roff)

    return Corpus(name or package, _files_fingerprint("debian_man_pages", pages, {"converter": MAN_TO_TEXT_VERSION,
                                                                               "max_documents": max_documents}),
                  lambda: itertools.islice(documents(), max_documents), {"source": f"Debian package {package}", "pages": len(pages),
                              "license": "see /usr/share/doc/" + package + "/copyright"})


MAN_TO_TEXT_VERSION = 1
_ESCAPES = {"-": "-", "e": "\\", "&": "", ",": "", "/": "", ":": "", "|": "", "^": "", "~": " ", " ": " ",
            "0": " ", "'": "'", "`": "`", ".": ".", "%": "", "c": ""}
_NAMED = {"em": "—", "en": "–", "aq": "'", "dq": '"', "lq": "“", "rq": "”", "oq": "‘", "cq": "’", "bu": "•",
          "co": "©", "rg": "®", "tm": "™", "hy": "-", "mi": "-", "pl": "+", "mu": "×", "di": "÷", "de": "°",
          "ga": "`", "aa": "´", "ti": "~", "ha": "^", "rs": "\\", "sl": "/", "lh": "☜", "rh": "☞", "Fo": "«",
          "Fc": "»", "fo": "‹", "fc": "›", "r!": "¡", "r?": "¿", "ss": "ß", "<=": "≤", ">=": "≥", "!=": "≠",
          "->": "→", "<-": "←", "ba": "|", "br": "│", "ul": "_", "rn": "‾", "sq": "□", "ct": "¢", "Eu": "€",
          "eu": "€", "Po": "£", "Ye": "¥", "ps": "¶", "sc": "§", ":a": "ä", ":o": "ö", ":u": "ü", ":A": "Ä",
          ":O": "Ö", ":U": "Ü", "'e": "é", "`e": "è", "^e": "ê", "'a": "á", "`a": "à", ",c": "ç", "~n": "ñ"}
_STRINGS = {"lq": "“", "rq": "”", "R": "®", "Tm": "™", "(lq": "“", "(rq": "”", "(Tm": "™"}
_INLINE = re.compile(r"\\(?:f(?:\[[^\]]*\]|\(..|.)|s[+-]?\d+|\*(?:\[[^\]]*\]|\(..|.)|\((..)|\[([^\]]*)\]|"
                     r"[kmnz]\S|[hvwoxlLDHSNbXZ]'[^']*'|(.))")
_FONT_MACROS = {"B", "I", "R", "SM", "SB"}
_ALTERNATING = {"BR", "RB", "BI", "IB", "IR", "RI"}
_HEADINGS = {"SH", "SS"}


def _unescape(text: str) -> str:
    def sub(m: re.Match) -> str:
        whole = m.group(0)
        if m.group(1) is not None:
            return _NAMED.get(m.group(1), "")
        if m.group(2) is not None:
            name = m.group(2)
            return _NAMED.get(name, chr(int(name[2:], 16)) if re.fullmatch(r"u[0-9A-Fa-f]{4,6}", name) else "")
        if whole.startswith("\\*"):
            return _STRINGS.get(whole[2:].strip("[]"), "")
        if m.group(3) is not None:
            return _ESCAPES.get(m.group(3), m.group(3))
        return ""

    return _INLINE.sub(sub, text)


def _arguments(rest: str) -> list[str]:
    """A macro line's arguments: space-separated, double quotes group."""
    return [a[1:-1] if a.startswith('"') and a.endswith('"') and len(a) > 1 else a
            for a in re.findall(r'"[^"]*"?|\S+', rest)]


def man_to_text(roff: str) -> str:
    """Plain text of a man page's roff source: comments and layout requests dropped, headings,
    font macros' arguments, synopses and paragraph tags kept, escapes turned into the characters
    they stand for, and text lines filled into paragraphs as man does (kept line by line between
    .nf and .fi). Not a typesetter: what matters for language modelling is the running text, in
    its language."""
    paragraphs: list[str] = []
    words: list[str] = []
    fill = True

    def text(line: str) -> None:
        if not line.strip():
            brk()
        elif fill:
            words.append(line.strip())
        else:
            brk()
            paragraphs.append(line.rstrip())

    def brk() -> None:
        if words:
            paragraphs.append(" ".join(words))
            words.clear()

    def para() -> None:
        brk()
        if paragraphs and paragraphs[-1] != "":
            paragraphs.append("")

    for line in roff.splitlines():
        if line.startswith(('.\\"', "'\\\"", '\\"')) or line.strip() in (".", "'"):
            continue
        if not (line.startswith((".", "'")) and len(line) > 1):
            text(_unescape(line.replace("\t", " ")))
            continue
        macro, _, rest = line[1:].lstrip().partition(" ")
        args = _arguments(rest)
        if macro in _HEADINGS:
            para()
            paragraphs += [_unescape(" ".join(args)), ""]
        elif macro in _FONT_MACROS:
            text(_unescape(" ".join(args)))
        elif macro in _ALTERNATING:
            text(_unescape("".join(args)))
        elif macro in ("TP", "PP", "LP", "P", "sp", "HP"):
            para()
        elif macro in ("IP", "SY"):
            para() if macro == "IP" else brk()
            if args:
                text(_unescape(args[0]))
        elif macro == "OP":
            text("[" + _unescape(" ".join(args)) + "]")
        elif macro in ("UR", "MT"):
            text(_unescape(rest.strip()))
        elif macro in ("br", "YS"):
            brk()
        elif macro in ("nf", "EX"):
            brk()
            fill = False
        elif macro in ("fi", "EE"):
            fill = True
        # anything else is layout (or a request we do not render): not text
    brk()
    return re.sub(r"\n{3,}", "\n\n", "\n".join(paragraphs)).strip() + "\n"


# ---- Python's standard library ---------------------------------------------------------------

def python_stdlib(exclude: Sequence[str] = ("test", "tests", "idlelib", "site-packages", "lib2to3"),
                  name: str = "python_stdlib") -> Corpus:
    """The running Python's standard-library `.py` files (a code domain), test suites excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(f for f in root.rglob("*.py") if not set(f.relative_to(root).parts[:-1]) & set(exclude))
    if not files:
        raise UserError(f"{root} holds no Python sources; use text_files with a folder of code instead.")
    return Corpus(name, _files_fingerprint("python_stdlib", files),
                  lambda: (f.read_text(encoding="utf-8", errors="replace") for f in files),
                  {"source": f"Python standard library ({root})", "files": len(files), "license": "PSF"})


# ---- Hugging Face datasets -------------------------------------------------------------------

def hub_dataset(path: str, config: str | None = None, split: str = "train", text_field: str = "text",
                revision: str | None = None, max_documents: int | None = None, name: str | None = None) -> Corpus:
    """An HF `datasets` dataset, streamed (never held in memory), `max_documents` at most."""
    def documents() -> Iterator[str]:
        try:
            import datasets
        except ImportError:
            raise UserError("hub_dataset corpora need the `datasets` package: pip install datasets.") from None
        try:
            data = datasets.load_dataset(path, config, split=split, revision=revision, streaming=True)
        except Exception as e:  # offline, a wrong name or split: the hub's own words, in one sentence
            raise UserError(f"Could not open the hub dataset {path}{'/' + config if config else ''} (split {split}): "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; check the name and the "
                            "network, or use text_files with local files.") from None
        for n, record in enumerate(data):
            if max_documents is not None and n >= max_documents:
                return
            if text_field not in record:
                raise UserError(f"The hub dataset {path} has no {text_field!r} field (it has {', '.join(record)}); "
                                "set the corpus's text_field.")
            yield str(record[text_field])

    fingerprint = hashlib.sha256(json.dumps({"kind": "hub", "path": path, "config": config, "split": split,
                                             "text_field": text_field, "revision": revision,
                                             "max_documents": max_documents}, sort_keys=True).encode()).hexdigest()
    return Corpus(name or path.split("/")[-1], fingerprint, documents,
                  {"source": f"hub dataset {path}", "config": config, "split": split, "revision": revision})
