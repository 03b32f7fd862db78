"""The shipped multiple-choice task: in-process scoring, and lm-evaluation-harness's
``local-completions`` model run through ``llama2 serve`` giving the same accuracy."""

from __future__ import annotations

import pytest

from llama2 import Transformer, load_model, save_model
from llama2.eval import multiple_choice as mc
from llama2.generate import prompt_logprobs

from .conftest import tiny_config

TASK = "llama2_assistant_mc"


@pytest.fixture(scope="module")
def model_dir(llama_tokenizer, tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval") / "tiny-lm"
    save_model(Transformer.from_config(tiny_config(vocab_size=32000), seed=0), path, tokenizer=llama_tokenizer)
    return path


def test_shipped_task_loads():
    task = mc.MultipleChoiceTask.load()
    assert task.name == TASK and len(task.docs) >= 20
    for doc in task.docs:
        assert task.context(doc).startswith("Question: ") and task.context(doc).endswith("\nAnswer:")
        assert len(task.choices(doc)) == 4 and 0 <= task.target(doc) < 4
        assert "  " not in task.context(doc) + "".join(task.choices(doc))  # see README: tokenizers differ on runs of spaces


def write_task(folder, doc_to_text: str, data: bytes = b'{"q": "2+2?", "choices": ["3", "4"], "answer": 1}\n'):
    (folder / "t.jsonl").write_bytes(data)
    (folder / "t.yaml").write_text(
        "task: t\noutput_type: multiple_choice\ndataset_kwargs:\n  data_file: t.jsonl\n"
        f"doc_to_text: {doc_to_text!r}\ndoc_to_choice: '{{{{choices}}}}'\ndoc_to_target: '{{{{answer}}}}'\n")
    return folder / "t.yaml"


def test_a_task_template_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
    task = mc.MultipleChoiceTask.load(write_task(tmp_path, payload))
    with pytest.raises(ValueError, match="not allowed"):
        task.context(task.docs[0])
    assert not marker.exists()


def test_a_task_template_still_renders_plain_jinja(tmp_path):
    task = mc.MultipleChoiceTask.load(write_task(tmp_path, "Q: {{ q | upper }}{% if q %}!{% endif %}"))
    assert task.context(task.docs[0]) == "Q: 2+2?!" and task.choices(task.docs[0]) == ["3", "4"]


@pytest.mark.parametrize("data, error", [
    (b'{"q": "a"}\n{"q": \n', r"t\.jsonl:2: not valid JSON"),
    (b'{"q": "a"}\n\n{"q": "\xff"}\n', r"t\.jsonl:3: not UTF-8"),
    (b'[1, 2]\n', r"t\.jsonl:1: each line must be a JSON object"),
])
def test_a_bad_task_data_line_is_named_by_file_and_line(tmp_path, data, error):
    with pytest.raises(ValueError, match=error):
        mc.MultipleChoiceTask.load(write_task(tmp_path, "{{q}}", data))


def test_encode_pair_follows_lm_eval(llama_tokenizer):
    ctx, cont = mc.encode_pair(llama_tokenizer, "Question: 2+2?\nAnswer: ", "4")
    assert ctx[0] == 1 and ctx.count(1) == 1  # one BOS, on the context
    assert ctx + cont == llama_tokenizer.encode("Question: 2+2?\nAnswer: 4", bos=True)  # the space moved over


def test_loglikelihoods_equal_prompt_logprobs(model_dir, llama_tokenizer):
    model = load_model(model_dir)
    pairs = [mc.encode_pair(llama_tokenizer, "Question: What is frozen water called?\nAnswer:", " " + c)
             for c in ("Ice", "Steam", "A very long answer indeed")]
    got = mc.loglikelihoods(model, pairs)  # one right-padded batch
    for (ctx, cont), ll in zip(pairs, got):
        alone, _ = prompt_logprobs(model, ctx + cont)
        assert ll == pytest.approx(sum(alone[len(ctx) - 1 :]), abs=1e-4)


def test_evaluate_task_on_a_model_directory(model_dir, llama_tokenizer):
    result = mc.evaluate_task(model_dir, limit=5)  # what `llama2 evaluate --task` calls
    assert result == mc.evaluate(load_model(model_dir), llama_tokenizer, limit=5).to_dict()
    assert result["task"] == TASK and result["n"] == 5 and 0 <= result["acc"] <= 1


def test_lm_eval_local_completions_through_the_server_matches_in_process(model_dir, llama_tokenizer):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'lm-eval[api]')")
    pytest.importorskip("aiohttp", reason="lm-eval's API models need lm-eval[api]")
    from lm_eval.tasks import TaskManager

    from llama2.serve.app import create_app

    from .test_serve import running_server

    expected = mc.evaluate(load_model(model_dir), llama_tokenizer)
    with running_server(create_app(model_dir, max_batch_size=4)) as url:
        out = lm_eval.simple_evaluate(
            model="local-completions",
            model_args={
                "model": model_dir.name,
                "base_url": f"{url}/v1/completions",
                # lm-eval tokenizes with the model directory's tokenizer and sends token ids;
                # add_bos_token puts exactly one BOS in front (the server takes ids as given).
                "tokenizer_backend": "huggingface",
                "tokenizer": str(model_dir),
                "add_bos_token": True,
                "num_concurrent": 4,  # concurrent requests: the engine batches them
                "max_retries": 1,
                "max_length": 128,
            },
            tasks=[TASK],
            task_manager=TaskManager(include_path=str(mc.TASK_DIR), include_defaults=False),
            log_samples=True,
            bootstrap_iters=0,
        )
    result = out["results"][TASK]
    assert result["acc,none"] == expected.acc
    assert result["acc_norm,none"] == expected.acc_norm
    samples = out["samples"][TASK]
    assert len(samples) == expected.n
    for sample in samples:
        served = [resp[0][0] for resp in sample["resps"]]
        assert served == pytest.approx(expected.items[sample["doc_id"]].loglikelihoods, abs=1e-4)
