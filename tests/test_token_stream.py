"""Token streams (continual pre-training): packing, the token cache, corpora, budgets and bad input."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from cl.errors import UserError
from cl.models.causal_lm import byte_tokenizer
from cl.stream import TokenBlocks
from scenarios import corpora
from scenarios.token_stream import build_cache, token_stream


def write_tokens(path, tokens, dtype="uint16"):
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def test_packing_has_no_padding_and_every_token_is_a_target_once_per_epoch(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 60000, 1000)
    f = write_tokens(tmp_path / "a.bin", tokens)
    blocks = TokenBlocks.packed(f, "uint16", 32)
    assert len(blocks) == (1000 - 1) // 32 == 31
    seen = []
    for batch in blocks.batches(5, shuffle=True, seed=3):
        assert batch.x.shape[1] == batch.y.shape[1] == 32 and batch.x.dtype == torch.long
        assert (batch.y != -100).all()  # no padding anywhere
        assert torch.equal(batch.x[:, 1:], batch.y[:, :-1])  # y is x shifted by one token
        seen.append(batch.y.reshape(-1))
    seen = torch.cat(seen)
    # the targets of one epoch are tokens 1 .. 31·32 of the file, each exactly once
    assert torch.equal(seen.sort().values, torch.from_numpy(tokens[1 : 1 + 31 * 32].astype(np.int64)).sort().values)
    starts = blocks.starts.tolist()
    assert starts == list(range(0, 31 * 32, 32))


def test_blocks_subset_and_concat_read_the_right_tokens_from_several_files(tmp_path):
    a = write_tokens(tmp_path / "a.bin", np.arange(0, 100))
    b = write_tokens(tmp_path / "b.bin", np.arange(1000, 1100))
    A = TokenBlocks.packed(a, "uint16", 10).with_task(0)
    B = TokenBlocks.packed(b, "uint16", 10).with_task(1)
    both = TokenBlocks.concat([A.subset([2, 0]), B.subset([5])])
    batch = both.collate(torch.arange(3))
    assert batch.x[:, 0].tolist() == [20, 0, 1050] and batch.y[:, -1].tolist() == [30, 10, 1060]
    assert batch.t.tolist() == [0, 0, 1]
    clone = __import__("pickle").loads(__import__("pickle").dumps(both))  # paths travel, not data
    assert clone._arrays is None and torch.equal(clone.collate([2]).x, both.collate([2]).x)


def corpus_files(folder, texts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(texts):
        (folder / f"doc{i:02d}.txt").write_text(text)
    return corpora.text_files(str(folder))


def test_the_cache_is_built_once_and_holds_every_document(tmp_path, monkeypatch):
    texts = [f"document {i} " + "word " * (20 + i) for i in range(40)]
    corpus = corpus_files(tmp_path / "docs", texts)
    tok = byte_tokenizer()
    cache = build_cache(corpus, tok, "tiny", tmp_path / "cache", eval_fraction=0.25, split_seed=0)
    meta = cache.meta
    total = sum(len(t.encode()) + 1 for t in texts)  # bytes + one eos per document
    assert meta["tokens"]["train"] + meta["tokens"]["eval"] == total
    assert meta["documents"]["train"] + meta["documents"]["eval"] == 40 and 0 < meta["documents"]["eval"] < 40
    train = np.fromfile(cache.file("train"), dtype=meta["dtype"])
    assert (train == tok.eos_token_id).sum() == meta["documents"]["train"]
    # a second build (another run) opens the arrays: no document is read, nothing is tokenised
    monkeypatch.setattr(corpus, "documents", lambda: (_ for _ in ()).throw(AssertionError("re-tokenised")))
    again = build_cache(corpus, tok, "tiny", tmp_path / "cache", eval_fraction=0.25, split_seed=0)
    assert again.folder == cache.folder and again.meta == meta
    # a changed file is another corpus: a new cache
    (tmp_path / "docs" / "doc00.txt").write_text("changed text")
    changed = corpora.text_files(str(tmp_path / "docs"))
    assert build_cache(changed, tok, "tiny", tmp_path / "cache", 0.25, 0).folder != cache.folder


def test_a_cache_made_by_another_tokenizer_is_refused(tmp_path):
    corpus = corpus_files(tmp_path / "docs", ["some text here"] * 5)
    cache = build_cache(corpus, byte_tokenizer(), "tiny", tmp_path / "cache", 0.2, 0)
    meta = json.loads((cache.folder / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = "0" * 64  # the same name, another vocabulary
    (cache.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="different tokenizer.*delete that folder"):
        build_cache(corpus, byte_tokenizer(), "tiny", tmp_path / "cache", 0.2, 0)


def test_man_pages_become_plain_text():
    roff = "\n".join([
        '.\\" a comment', ".TH LS 1", ".SH NAME", "ls \\- list directory contents", ".SH SYNOPSIS",
        ".SY ls", ".OP \\-a", ".RI [ file ]", ".YS", ".SH DESCRIPTION", ".PP", "List information about the",
        "\\fBFILE\\fPs (the current", "directory by default).", ".TP", ".BR \\-a ,", "do not ignore entries",
        ".nf", "line one", "line two", ".fi", "\\(lqquoted\\(rq \\(em done\\(co"])
    text = corpora.man_to_text(roff)
    assert "a comment" not in text and ".TH" not in text
    assert "ls - list directory contents" in text
    assert "ls [-a] [file]" in text
    assert "List information about the FILEs (the current directory by default)." in text
    assert "-a, do not ignore entries" in text
    assert "line one\nline two" in text
    assert "“quoted” — done©" in text


def test_debian_man_pages_read_the_installed_package():
    corpus = corpora.debian_man_pages("manpages-de", max_documents=3)
    docs = list(corpus.documents())
    assert len(docs) == 3 and all(len(d) > 100 for d in docs)
    assert any(w in " ".join(docs) for w in ("BEZEICHNUNG", "BESCHREIBUNG"))  # German section names


def stream_of(tmp_path, folders, **kwargs):
    domains = [{"name": name, "corpus": corpus_files(tmp_path / name, texts)} for name, texts in folders.items()]
    settings = dict(tokenizer="tiny", cache_dir=tmp_path / "cache", seq_len=16, tokens_per_experience=64,
                    eval_tokens=32, eval_fraction=0.3, data_seed=0)
    settings.update(kwargs)
    return token_stream(domains, **settings)


def test_a_stream_trains_on_its_budget_and_never_on_held_out_documents(tmp_path):
    texts = {"en": [f"english text number {i} " * 6 for i in range(30)],
             "de": [f"deutscher Text Nummer {i} " * 6 for i in range(30)]}
    lic = tmp_path / "licenses"
    lic.mkdir()
    (lic / "GPL").write_text("GNU GENERAL PUBLIC LICENSE " * 40)  # a file named without a suffix is text
    stream = stream_of(tmp_path, texts, held_out=[{"name": "licenses", "corpus": corpora.text_files(str(lic / "*"))}])
    assert stream.modality == "tokens" and len(stream) == 2 and list(stream.held_out) == ["licenses"]
    for exp in stream:
        assert exp.train.tokens == 64 and exp.eval.tokens == 32 and set(exp.train.t.tolist()) == {exp.index}
        # train and held-out blocks come from different files: disjoint documents
        assert {f.rsplit("/", 1)[-1] for f in exp.train.files} == {"train.bin"}
        assert {f.rsplit("/", 1)[-1] for f in exp.eval.files} == {"eval.bin"}
    text = bytes(stream[1].train.collate(torch.arange(4)).x.reshape(-1).tolist()).decode(errors="replace")
    assert "Nummer" in text
    assert stream.info["domains"][2]["held_out"] is True


@pytest.mark.parametrize("make,message", [
    (lambda tmp: stream_of(tmp, {"en": ["   ", "\n\n"]}), "has no text"),
    (lambda tmp: stream_of(tmp, {"en": ["short text"] * 30}, tokens_per_experience=10**6),
     "tokens_per_experience=1000000 is more than the .* train tokens that en holds"),
    (lambda tmp: stream_of(tmp, {"en": ["short text"] * 30}, eval_tokens=10**5), "raise scenario.eval_fraction"),
    (lambda tmp: corpora.text_files(str(tmp / "nowhere" / "*.txt")), "No file or folder matches"),
    (lambda tmp: corpora.debian_man_pages("manpages-xx"), "manpages-xx is not installed; run `make install`"),
    (lambda tmp: token_stream([]), "scenario.domains is empty"),
], ids=["empty corpus", "budget", "eval budget", "missing folder", "missing package", "no domains"])
def test_bad_input_is_one_sentence(tmp_path, make, message):
    with pytest.raises(UserError, match=message) as e:
        make(tmp_path)
    assert "\n" not in str(e.value)


def test_a_jsonl_corpus_reads_its_text_field(tmp_path):
    f = tmp_path / "docs.jsonl"
    f.write_text("\n".join(json.dumps({"body": f"text {i}"}) for i in range(3)) + "\n")
    assert list(corpora.text_files(str(f), text_field="body").documents()) == ["text 0", "text 1", "text 2"]
    with pytest.raises(UserError, match="has no 'text' field; set the corpus's text_field"):
        list(corpora.text_files(str(f)).documents())


def test_gzipped_roff_of_a_folder_is_not_mistaken_for_text(tmp_path):
    (tmp_path / "page.1.gz").write_bytes(gzip.compress(b".TH X 1\n"))
    with pytest.raises(UserError, match="hold no .txt, .md, .jsonl files"):
        corpora.text_files(str(tmp_path))


def test_the_python_standard_library_is_a_code_domain():
    corpus = corpora.python_stdlib()
    first = next(iter(corpus.documents()))
    assert corpus.about["files"] > 100 and ("import" in first or "def " in first)


def test_a_hub_corpus_offline_fails_in_one_sentence(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    corpus = corpora.hub_dataset("no-such-user/no-such-corpus")
    with pytest.raises(UserError, match="Could not open the hub dataset no-such-user/no-such-corpus") as e:
        next(iter(corpus.documents()))
    assert "\n" not in str(e.value)
