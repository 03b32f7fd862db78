"""`llama2 prepare` and the packed-sequence loader: BOS/EOS framing, determinism, skipping
complete shards, malformed lines reported, no window twice per epoch, rank awareness."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llama2.corpus import default_corpus_files, read_text
from llama2.data import shards
from llama2.data.shards import (
    EvalBatches,
    PackedLoader,
    PackedSequences,
    TokenStream,
    prepare,
    read_documents,
    read_index,
    token_dtype,
)
from llama2.tokenizer import Tokenizer, add_infilling_pieces, train_tokenizer


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A slice of an embedded book as JSONL and text, and a 384-piece tokenizer trained on it."""
    root = tmp_path_factory.mktemp("corpus")
    text = read_text(default_corpus_files()[2])[:120_000]
    paras = [p.strip() for p in text.split("\n\n") if len(p.strip()) > 40]
    jsonl = root / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras[:300]))
    txt = root / "book.txt"
    txt.write_text("\n\n\n".join(paras[300:]))
    train_tokenizer([txt], root / "tok", vocab_size=384, verbose=False)
    return {"jsonl": jsonl, "txt": txt, "tok": root / "tok" / "tokenizer.model", "n_jsonl": 300}


def quiet(msg):
    pass


def test_prepare_wraps_documents_and_splits(corpus, tmp_path):
    out = tmp_path / "data"
    index = prepare([corpus["jsonl"], corpus["txt"]], corpus["tok"], out, val_fraction=0.1, workers=1, log=quiet)
    assert index["dtype"] == "uint16" and index["vocab_size"] == 384 and (out / "tokenizer.model").is_file()
    assert index["documents"]["val"] > 0 and index["documents"]["train"] > 5 * index["documents"]["val"]
    tok = Tokenizer(out / "tokenizer.model")
    for split in ("train", "val"):
        ids = TokenStream(out, split).read(0, index["tokens"][split])
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert (ids == tok.bos_id).sum() == (ids == tok.eos_id).sum() == index["documents"][split]
    # The first JSONL document that went to train, decoded back.
    docs = list(read_documents(corpus["jsonl"]))
    first = next(d for d in docs if not shards.in_validation(d, 0.1))
    ids = TokenStream(out, "train").read(0, index["tokens"]["train"])
    end = int(np.argmax(ids == tok.eos_id))
    assert tok.decode(ids[1:end]) == first


def test_prepare_is_deterministic_parallel_and_skips_complete_shards(corpus, tmp_path, monkeypatch):
    inputs = [corpus["jsonl"], corpus["txt"]]
    a = prepare(inputs, corpus["tok"], tmp_path / "a", val_fraction=0.1, workers=1, shard_chars=20_000, log=quiet)
    b = prepare(inputs, corpus["tok"], tmp_path / "b", val_fraction=0.1, workers=2, shard_chars=20_000, log=quiet)
    assert len(a["splits"]["train"]) > 2  # several shards
    assert a["splits"] == b["splits"]
    for shard in a["splits"]["train"] + a["splits"]["val"]:
        assert (tmp_path / "a" / shard["file"]).read_bytes() == (tmp_path / "b" / shard["file"]).read_bytes()
    # Re-running does no tokenizing; a damaged shard is redone.
    calls = []
    real = shards._encode_shard
    monkeypatch.setattr(shards, "_encode_shard", lambda job: calls.append(job[2]) or real(job))
    prepare(inputs, corpus["tok"], tmp_path / "a", val_fraction=0.1, workers=1, shard_chars=20_000, log=quiet)
    assert calls == []
    victim = tmp_path / "a" / a["splits"]["train"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-2])
    again = prepare(inputs, corpus["tok"], tmp_path / "a", val_fraction=0.1, workers=1, shard_chars=20_000,
                    log=quiet)
    assert calls == [str(victim)] and again["splits"] == a["splits"]


def test_malformed_lines_are_counted_and_reported(corpus, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "good one"}\nnot json\n{"txt": "no text field"}\n[1, 2]\n\xff\xfe\n\n'
                    b'{"text": "good two"}\n')
    messages = []
    index = prepare([bad], corpus["tok"], tmp_path / "d", val_fraction=0.0, workers=1, log=messages.append)
    assert index["malformed"] == 4 and index["inputs"][0]["malformed"] == 4
    assert index["documents"]["train"] == 2
    assert any("4 malformed line(s)" in m and "bad.jsonl:2" in m for m in messages)


def test_errors_are_one_clear_line(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        prepare([tmp_path / "missing.txt"], corpus["tok"], tmp_path / "x", log=quiet)
    with pytest.raises(FileNotFoundError, match="no index.json .*llama2 prepare"):
        read_index(tmp_path)


def test_token_dtype():
    assert token_dtype(32000) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(128256) == np.uint32


@pytest.fixture(scope="module")
def data(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    prepare([corpus["jsonl"], corpus["txt"]], corpus["tok"], out, val_fraction=0.1, workers=1,
            shard_chars=15_000, log=quiet)
    return out


def test_windows_cross_shards_and_overlap_by_one(data):
    stream = TokenStream(data, "train")
    assert len(stream.arrays) > 2
    seqs = PackedSequences(stream, 64)
    whole = stream.read(0, len(stream))
    assert len(seqs) == (len(whole) - 1) // 64
    for i in (0, 1, len(seqs) - 1):
        assert np.array_equal(seqs[i], whole[i * 64: i * 64 + 65])
    batch = seqs.batch([3, 5])
    assert batch["tokens"].shape == (2, 64) and batch["tokens"].dtype.is_floating_point is False
    assert np.array_equal(batch["labels"][0, :-1].numpy(), batch["tokens"][0, 1:].numpy())


def _epoch_indices(seqs, batch, accum, world, seed=0):
    """Per optimizer step: the set of windows each rank reads, over one epoch."""
    loaders = [PackedLoader(seqs, batch, grad_accum=accum, seed=seed, rank=r, world_size=world) for r in range(world)]
    steps = []
    for _ in range(loaders[0].steps_per_epoch):
        steps.append([np.concatenate([ld.next_indices() for _ in range(accum)]) for ld in loaders])
    return steps


def test_loader_no_window_twice_per_epoch_and_ranks_partition_the_global_batch(data):
    seqs = PackedSequences(TokenStream(data, "train"), 32)
    one = _epoch_indices(seqs, batch=2, accum=4, world=1)
    two = _epoch_indices(seqs, batch=2, accum=2, world=2)
    four = _epoch_indices(seqs, batch=4, accum=1, world=2)
    seen = np.concatenate([np.concatenate(s) for s in one])
    assert len(seen) == len(set(seen.tolist())) == len(one) * 8  # nothing twice within the epoch
    assert len(one) == len(seqs) // 8
    for a, b, c in zip(one, two, four):
        assert not set(b[0].tolist()) & set(b[1].tolist())  # ranks are disjoint
        # the same global batch whatever the split between ranks and accumulation
        assert sorted(a[0].tolist()) == sorted(np.concatenate(b).tolist()) == sorted(np.concatenate(c).tolist())


def test_loader_is_deterministic_and_resumes_exactly(data):
    seqs = PackedSequences(TokenStream(data, "train"), 32)

    def run(loader, n):
        return [next(loader)["tokens"] for _ in range(n)]

    a, b = PackedLoader(seqs, 3, grad_accum=2, seed=1), PackedLoader(seqs, 3, grad_accum=2, seed=1)
    other = PackedLoader(seqs, 3, grad_accum=2, seed=2)
    n = 2 * 2 * (len(seqs) // 6) + 5  # micro-batches: into the third epoch
    xs, ys = run(a, n), run(b, n)
    assert all((x == y).all() for x, y in zip(xs, ys))
    assert not all((x == y).all() for x, y in zip(xs[:4], run(other, 4)))
    assert a.epoch == 2
    # Resume from a saved position: the same batches as the uninterrupted loader.
    fresh = PackedLoader(seqs, 3, grad_accum=2, seed=1)
    run(fresh, 10)
    state = json.loads(json.dumps(fresh.state_dict()))  # survives serialisation
    resumed = PackedLoader(seqs, 3, grad_accum=2, seed=1)
    resumed.load_state_dict(state)
    assert all((x == y).all() for x, y in zip(run(resumed, n - 10), xs[10:]))
    with pytest.raises(ValueError, match="seq_len changed"):
        PackedLoader(PackedSequences(TokenStream(data, "train"), 16), 3).load_state_dict(state)


def test_loader_refuses_a_batch_larger_than_the_data(data):
    seqs = PackedSequences(TokenStream(data, "val"), 32)
    with pytest.raises(ValueError, match="fewer than one global batch"):
        PackedLoader(seqs, len(seqs) + 1)


def test_eval_batches_cover_the_same_windows_for_any_world_size(data):
    seqs = PackedSequences(TokenStream(data, "val"), 16)
    one = [b["tokens"] for b in EvalBatches(seqs, 2, max_batches=5)]
    two = [[b["tokens"] for b in EvalBatches(seqs, 2, rank=r, world_size=2, max_batches=5)] for r in range(2)]
    assert len(one) == 5 and [len(t) for t in two] == [3, 2]
    assert all((x == y).all() for x, y in zip(one[0::2], two[0])) and all(
        (x == y).all() for x, y in zip(one[1::2], two[1]))
    assert list(map(len, [list(EvalBatches(seqs, 2, max_batches=5))] * 2)) == [5, 5]  # re-iterable


def test_cli_tokenizer_and_prepare(corpus, tmp_path, capsys):
    from llama2.cli import main as cli

    assert cli(["tokenizer", "train", "--input", str(corpus["txt"]), "--out", str(tmp_path / "tok"),
                "--vocab-size", "384"]) == 0
    assert "384 pieces" in capsys.readouterr().out
    assert cli(["tokenizer", "encode", "--tokenizer", str(tmp_path / "tok"), "--bos", "--json", "Hello there"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids[0] == 1 and cli(["tokenizer", "decode", "--tokenizer", str(tmp_path / "tok"), *map(str, ids)]) == 0
    assert capsys.readouterr().out.strip() == "Hello there"
    assert cli(["prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(corpus["jsonl"]), "--out",
                str(tmp_path / "d"), "--workers", "1", "--no-progress"]) == 0
    assert read_index(tmp_path / "d")["documents"]["train"] > 0
    assert cli(["prepare", "--tokenizer", str(tmp_path / "tok"), "--input", str(tmp_path / "none.txt"),
                "--out", str(tmp_path / "d")]) == 1
    assert "none.txt" in capsys.readouterr().err


def test_prepare_writes_the_bytes_it_always_wrote(corpus, tmp_path):
    """Shard bytes, sidecars and index.json are pinned by a hash (the inputs' folder written as "<corpus>")."""
    out = tmp_path / "data"
    prepare([corpus["jsonl"], corpus["txt"]], corpus["tok"], out, val_fraction=0.1, workers=1, shard_chars=20_000,
            log=quiet)
    h = hashlib.sha256()
    for path in sorted(out.iterdir()):
        data = path.read_bytes().replace(str(corpus["jsonl"].parent).encode(), b"<corpus>")
        h.update(path.name.encode() + b"\0" + data)
    assert h.hexdigest()[:16] == "db673ee75fbad4d3"


# ---- prompt/completion rows: the completion-only loss -------------------------------------------

@pytest.fixture
def completions(corpus, tmp_path):
    """Three prompt/completion rows between two plain texts, prepared into one shard."""
    rows = [{"text": "A plain document before them."},
            *({"prompt": f"Question {k}: what comes after the door?", "completion": f" The garden, {k} times."}
              for k in range(3)),
            {"text": "A plain document after them."}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    index = prepare([path], corpus["tok"], tmp_path / "d", val_fraction=0.0, workers=1, log=quiet)
    return {"rows": rows, "index": index, "dir": tmp_path / "d", "tok": Tokenizer(corpus["tok"])}


def test_prompt_completion_rows_are_one_document_each_with_a_mask(completions):
    index, tok = completions["index"], completions["tok"]
    assert index["documents"]["train"] == 5 and index["completions"] == {"train": 3, "val": 0}
    assert index["splits"]["train"][0]["mask"] == "train-00000.mask"
    stream = TokenStream(completions["dir"], "train")
    ids, kind = stream.read(0, len(stream)), stream.read_mask(0, len(stream))
    keep = kind > 0
    starts = np.flatnonzero(ids == tok.bos_id).tolist() + [len(ids)]
    docs = [(ids[a + 1:b - 1], keep[a + 1:b - 1]) for a, b in zip(starts, starts[1:])]  # without BOS, EOS
    assert [tok.decode(d.tolist()) for d, _ in docs] == [r.get("text") or r["prompt"] + r["completion"]
                                                         for r in completions["rows"]]
    # The targets: all of a plain document, the completion of a prompt/completion row.
    assert [tok.decode(d[k].tolist()) for d, k in docs] == [r.get("text") or r["completion"].strip()
                                                            for r in completions["rows"]]
    assert keep[ids == tok.eos_id].all() and keep.sum() < len(ids)
    assert set(kind[:int(np.argmax(ids == tok.eos_id)) + 1]) == {1}  # the plain text before them
    assert set(kind[keep]) == {1, 2}


def test_the_loader_sets_a_prompts_labels_to_ignore(completions):
    stream = TokenStream(completions["dir"], "train")
    seqs = PackedSequences(stream, 16)
    batch = seqs.batch(range(len(seqs)))
    keep = np.concatenate([stream.read_mask(16 * i + 1, 16 * i + 17) for i in range(len(seqs))]) > 0
    labels = batch["labels"].flatten().numpy()
    assert (labels[~keep] == -100).all() and (labels[keep] >= 0).all()
    assert (batch["tokens"] >= 0).all() and "weights" not in batch  # inputs are never masked


def test_completion_weight_weighs_a_completions_targets(completions):
    from llama2.train.core import cross_entropy

    stream = TokenStream(completions["dir"], "train")
    seqs = PackedSequences(stream, 16, completion_weight=4.0)
    batch = seqs.batch(range(len(seqs)))
    kind = torch.from_numpy(np.stack([stream.read_mask(16 * i + 1, 16 * i + 17) for i in range(len(seqs))]))
    assert torch.equal(batch["weights"], torch.where(kind == 2, 4.0, 1.0))
    logits = torch.randn(*batch["labels"].shape, 384)
    each = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    w = batch["weights"].flatten() * (batch["labels"].flatten() >= 0)
    assert torch.allclose(cross_entropy(logits, batch["labels"], weights=batch["weights"]), (each * w).sum() / w.sum())
    # weights of 1 are the plain mean
    assert torch.allclose(cross_entropy(logits, batch["labels"], weights=torch.ones_like(batch["weights"])),
                          cross_entropy(logits, batch["labels"]))
    with pytest.raises(ValueError, match="completion_weight must be > 0"):
        PackedSequences(stream, 16, completion_weight=0)


def test_plain_texts_prepare_as_before_and_need_no_mask(corpus, tmp_path):
    index = prepare([corpus["jsonl"]], corpus["tok"], tmp_path / "d", val_fraction=0.1, workers=1, log=quiet)
    assert "completions" not in index and not list((tmp_path / "d").glob("*.mask"))
    assert not TokenStream(tmp_path / "d").masked


def test_a_missing_mask_and_a_bad_row_are_one_line(completions, corpus, tmp_path):
    (completions["dir"] / "train-00000.mask").unlink()
    with pytest.raises(FileNotFoundError, match="train-00000.mask: loss mask missing"):
        TokenStream(completions["dir"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no completion"}\n{"prompt": "x", "completion": ""}\n{"text": "fine"}\n')
    messages = []
    index = prepare([bad], corpus["tok"], tmp_path / "b", val_fraction=0.0, workers=1, log=messages.append)
    assert index["malformed"] == 2 and any('"completion"' in m and "bad.jsonl:1" in m for m in messages)


def test_completion_rows_are_never_fim_transformed(tmp_path):
    tok_file = Path(__file__).parent / "fixtures" / "llama2-tokenizer" / "tokenizer.model"
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"prompt": "def f():\n    return", "completion": " 1\n"}) + "\n")
    add_infilling_pieces(tok_file, tmp_path / "code.model")
    index = prepare([path], tmp_path / "code.model", tmp_path / "d", val_fraction=0.0, workers=1, log=quiet,
                    fim_rate=1.0)
    tok = Tokenizer(tmp_path / "code.model")
    ids = TokenStream(tmp_path / "d").read(0, index["tokens"]["train"]).tolist()
    assert ids == tok.encode("def f():\n    return 1\n", bos=True, eos=True)


def test_pretraining_weighs_completions_only_when_the_data_has_them(corpus, completions, tmp_path):
    from llama2.model import ModelConfig
    from llama2.train import pretrain

    plain = tmp_path / "plain"
    prepare([corpus["jsonl"]], corpus["tok"], plain, val_fraction=0.1, workers=1, log=quiet)
    model = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=384, multiple_of=16, max_seq_len=16)
    settings = dict(model=model, seq_len=16, batch_size=2, micro_batch_size=2, max_steps=1, warmup_steps=1,
                    eval_every=0, save_every=0, completion_weight=4.0)
    with pytest.raises(ValueError, match=r"completion_weight 4.0: .*plain has no prompt/completion rows"):
        pretrain.run(pretrain.PretrainConfig(data=str(plain), out=str(tmp_path / "a"), **settings), quiet=True)
    last = pretrain.run(pretrain.PretrainConfig(data=str(completions["dir"]), out=str(tmp_path / "b"), **settings),
                        quiet=True)
    assert last["step"] == 1 and last["loss"] > 0
    with pytest.raises(ValueError, match="completion_weight must be > 0"):
        pretrain.PretrainConfig(completion_weight=-1.0)


def test_masks_read_across_shards_with_and_without_one(corpus, tmp_path):
    """A window may span a plain shard (no .mask: every token a target) and a masked one."""
    path = tmp_path / "rows.jsonl"
    rows = [{"text": "A plain document of some length. " * 5}] * 3 + [{"prompt": "Q: x?", "completion": " y."}] * 3
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare([path], corpus["tok"], tmp_path / "d", val_fraction=0.0, workers=1, shard_chars=300, log=quiet)
    index = read_index(tmp_path / "d")
    assert len(index["splits"]["train"]) >= 2 and "mask" not in index["splits"]["train"][0]
    stream = TokenStream(tmp_path / "d")
    whole = stream.read_mask(0, len(stream))
    first = index["splits"]["train"][0]["tokens"]
    assert (whole[:first] == 1).all() and {0, 2} <= set(whole[first:].tolist())
    assert np.array_equal(stream.read_mask(first - 3, first + 4), whole[first - 3:first + 4])
