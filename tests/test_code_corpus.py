"""The bundled code corpus (Python's standard library, cut into definitions) and the synthetic
code world (templated functions with tests): what ships, how source is cut, splits, tests that
pass for the right body and fail for a wrong one."""

import ast
import json
import lzma
import re
import statistics
import textwrap

import pytest

from llama2.corpus import code_corpus_dir, code_corpus_files, iter_documents, split_python_source
from llama2.data.code_world import (
    CODE_FAMILIES,
    SPLITS,
    CodeTask,
    code_documents,
    code_keys,
    code_tasks,
    run_test,
)
from llama2.data.shards import read_documents

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def records():
    return [json.loads(line) for f in code_corpus_files() for line in lzma.open(f, "rt", encoding="utf-8")]


# -- the shipped corpus ------------------------------------------------------------------------

def test_code_corpus_ships_with_its_licence_and_sources():
    files = code_corpus_files()
    assert [p.name for p in files] == ["python-stdlib.jsonl.xz"]
    assert 100_000 < files[0].stat().st_size < 1 * MiB
    sources = (code_corpus_dir() / "SOURCES.md").read_text(encoding="utf-8")
    assert "`python-stdlib.jsonl.xz`" in sources and "3.11" in sources
    licence = (code_corpus_dir() / "LICENSE-PSF.txt").read_text(encoding="utf-8")
    assert "PYTHON SOFTWARE FOUNDATION LICENSE VERSION 2" in licence


def test_code_corpus_holds_one_to_three_mb_of_source_named_in_sources(records):
    assert 1_000_000 < sum(len(r["text"]) for r in records) < 3_000_000
    sources = (code_corpus_dir() / "SOURCES.md").read_text(encoding="utf-8")
    for name in {r["source"] for r in records}:
        assert name.startswith("Lib/") and f"`{name.removeprefix('Lib/')}`" in sources, name


def test_every_code_document_is_python_that_parses(records):
    for r in records:
        ast.parse(r["text"])
        assert r["text"] == r["text"].strip() and r["text"]


def test_code_documents_fit_a_tiny_models_context(records):
    lengths = [len(r["text"]) for r in records]
    assert len(records) > 800
    assert 800 < statistics.median(lengths) <= 1536
    assert sum(n <= 3000 for n in lengths) / len(lengths) > 0.9


def test_both_readers_give_the_stored_documents(records):
    path = code_corpus_files()[0]
    texts = [r["text"] for r in records]
    assert list(iter_documents(path)) == texts
    assert list(read_documents(path)) == texts


# -- cutting source into documents -------------------------------------------------------------

MODULE = textwrap.dedent('''\
    """A module."""

    import os

    # A comment that belongs to small().
    def small():
        return 1


    class Big:
        """A class longer than the limit."""

        def one(self):
            return "{}"

        def two(self):
            return "{}"

        def three(self):
            return "{}"


    if __name__ == "__main__":
        small()
    '''.format("a" * 150, "b" * 150, "c" * 150))


def test_small_statements_are_packed_with_their_comments():
    docs = split_python_source(MODULE, max_chars=300, min_chars=60)
    assert docs[0].startswith('"""A module."""') and "import os" in docs[0]
    assert "# A comment that belongs to small().\ndef small():" in "\n".join(docs)
    assert all(d == d.strip() for d in docs)


def test_a_long_class_is_split_between_methods_with_its_header_repeated():
    docs = split_python_source(MODULE, max_chars=300, min_chars=60)
    big = [d for d in docs if "class Big:" in d]
    assert len(big) == 3
    for d in docs:
        ast.parse(d)
    assert [m for d in big for m in re.findall(r"def (\w+)\(self\)", d)] == ["one", "two", "three"]
    assert sum(d.count('"""A class longer than the limit."""') for d in docs) == 1


def test_a_short_tail_stays_with_its_neighbour_and_nothing_is_lost():
    docs = split_python_source(MODULE, max_chars=300, min_chars=60)
    assert 'if __name__ == "__main__":' in docs[-1] and "def three" in docs[-1]
    assert split_python_source(MODULE, max_chars=10_000) == [MODULE.strip()]
    kept = "".join(docs).replace("class Big:", "")
    for line in MODULE.splitlines():
        if line.strip() and line != "class Big:":
            assert line.strip() in kept


def test_a_long_function_stays_whole():
    source = "def f():\n" + "".join(f"    x{i} = {i}\n" for i in range(100))
    assert split_python_source(source, max_chars=100, min_chars=10) == [source.strip()]


def test_source_that_does_not_parse_is_refused():
    with pytest.raises(SyntaxError):
        split_python_source("def f(:\n    pass\n")


# -- the code world ---------------------------------------------------------------------------

def test_code_world_splits_are_disjoint_held_out_behaviours():
    keys = {s: set(code_keys(s)) for s in SPLITS}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["val"] and not keys["val"] & keys["test"]
    assert len(keys["test"]) >= 25 and len(keys["train"]) > 4 * len(keys["test"])
    for family in CODE_FAMILIES:  # every family is trained on and tested
        assert any(k.startswith(family + ":") for k in keys["train"])
        assert any(k.startswith(family + ":") for k in keys["test"])
    train = {t.key for t in code_tasks(0, "train", 500)}
    assert train == keys["train"] and not train & {t.key for t in code_tasks(1, "test", 200)}


def test_code_world_is_deterministic_and_the_seed_changes_only_the_surface():
    assert code_tasks(3, "test", 20) == code_tasks(3, "test", 20)
    assert code_tasks(3, "test", 40) != code_tasks(4, "test", 40)
    assert set(code_keys("test")) == {t.key for t in code_tasks(4, "test", len(code_keys("test")))}


def test_a_task_is_a_function_whose_middle_is_one_body_line():
    for t in code_tasks(0, "train", 60):
        assert isinstance(t, CodeTask)
        assert t.prefix.startswith(f"def {t.name}(") and '"""' in t.prefix
        assert t.middle.startswith("    ") and t.middle.endswith("\n") and t.middle.count("\n") == 1
        tree = ast.parse(t.source)
        assert [type(n) for n in tree.body] == [ast.FunctionDef] and tree.body[0].name == t.name
        assert t.test.count("assert ") >= 3


def test_the_right_middle_passes_its_test_in_a_fresh_process():
    tasks = code_tasks(0, "test", 40)
    picked = [next(t for t in tasks if t.family == f) for f in CODE_FAMILIES]
    for t in picked:
        assert run_test(t.source, t.test), t.source


def test_every_task_passes_its_test():
    for split in SPLITS:
        for t in code_tasks(0, split, len(code_keys(split))):
            exec(t.source + t.test, {})


def test_a_wrong_middle_fails_its_test():
    tasks = code_tasks(0, "test", 40)
    for family in ("affine", "string"):
        a, b = [t for t in tasks if t.family == family][:2]
        assert not run_test(a.prefix + b.middle + a.suffix, a.test), (a.key, b.key)
    cond = next(t for t in tasks if t.family == "cond")
    assert not run_test(cond.prefix + "    if False:\n" + cond.suffix, cond.test)


def test_code_documents_are_function_then_test():
    docs = code_documents(0, "train", 5)
    tasks = code_tasks(0, "train", 5)
    assert docs == [f"{t.source}\n{t.test}" for t in tasks]
    for d in docs:
        exec(d, {})
    assert code_documents(0, "train", 5, tests=False) == [t.source for t in tasks]


def test_more_tasks_than_behaviours_repeat_them_with_a_new_surface():
    n = len(code_keys("test"))
    tasks = code_tasks(0, "test", 2 * n)
    assert [t.key for t in tasks[:n]] == [t.key for t in tasks[n:]]
    assert any(a != b for a, b in zip(tasks[:n], tasks[n:]))


@pytest.mark.parametrize("split,n,match", [("dev", 3, "split must be one of train, val, test, got 'dev'"),
                                           ("train", -1, "n must be non-negative")])
def test_bad_arguments_are_refused(split, n, match):
    with pytest.raises(ValueError, match=match):
        code_tasks(0, split, n)


# -- llama2 prepare --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def code_tokenizer(tmp_path_factory):
    from llama2.tokenizer import train_tokenizer

    root = tmp_path_factory.mktemp("codetok")
    (root / "code.txt").write_text("\n\n".join(code_documents(0, "train", 200)))
    return train_tokenizer([root / "code.txt"], root / "tok", vocab_size=400, verbose=False)


def test_prepare_adds_code_world_documents_of_the_train_split(code_tokenizer, tmp_path):
    from llama2.data.shards import PrepareConfig, prepare_from_config

    (tmp_path / "empty.txt").write_text("")
    cfg = PrepareConfig(val_fraction=0.0, workers=1, progress=False, code_world_documents=30, world_seed=2)
    index = prepare_from_config(cfg, [tmp_path / "empty.txt"], code_tokenizer.path, tmp_path / "data", log=lambda m: None)
    assert index["documents"]["train"] == 30
    assert list(read_documents(tmp_path / "data" / "code-world.jsonl")) == code_documents(2, "train", 30)
    cfg.code_world_tests = False
    prepare_from_config(cfg, [tmp_path / "empty.txt"], code_tokenizer.path, tmp_path / "data", log=lambda m: None)
    assert list(read_documents(tmp_path / "data" / "code-world.jsonl")) == code_documents(2, "train", 30, tests=False)


def test_prepare_adds_the_code_corpus(code_tokenizer, tmp_path):
    from llama2.data.shards import PrepareConfig, prepare_from_config

    (tmp_path / "empty.txt").write_text("")
    cfg = PrepareConfig(val_fraction=0.0, workers=1, progress=False, code_corpus=True)
    index = prepare_from_config(cfg, [tmp_path / "empty.txt"], code_tokenizer.path, tmp_path / "data", log=lambda m: None)
    assert index["documents"]["train"] == sum(1 for _ in iter_documents(code_corpus_files()[0]))
    assert index["inputs"][-1]["path"].endswith("python-stdlib.jsonl.xz")


def test_function_names_are_unique_to_a_behaviour():
    names = {}
    for split in SPLITS:
        for t in code_tasks(0, split, 2 * len(code_keys(split))):
            assert names.setdefault(t.name, t.key) == t.key, t.name
