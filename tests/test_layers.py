"""The package's layers (docs/architecture.md): the import contract holds, `llama2 --help`
loads no heavy optional dependency, and the shared helpers live once, below every layer."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_import_contract_holds():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.skip("import-linter is not installed (pip install -e '.[test]')")
    out = subprocess.run([exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout[-3000:]


def test_llama2_help_imports_no_heavy_optional_dependency():
    code = ("import contextlib, io, sys\nfrom llama2.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            "    try:\n        main(['--help'])\n    except SystemExit:\n        pass\n"
            "print(' '.join(m for m in ('uvicorn', 'matplotlib', 'gguf', 'transformers', 'lm_eval',\n"
            "                           'torch.distributed.checkpoint') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_the_guard_command_trains_in_train_and_classifies_with_the_shared_classifier():
    import llama2.guard
    import llama2.train.guard
    from llama2.cli import COMMANDS

    assert COMMANDS["guard"][0] == "llama2.train.guard"
    assert llama2.train.guard.Guard is llama2.guard.Guard  # `guard check` uses what the server loads


def test_log_to_stderr_prints_on_rank_zero_only_and_not_when_quiet(monkeypatch, capsys):
    from llama2.utils import log_to_stderr

    monkeypatch.setenv("RANK", "0")
    log_to_stderr(False)("shown")
    log_to_stderr(True)("quiet")
    monkeypatch.setenv("RANK", "1")
    log_to_stderr(False)("other rank")
    assert capsys.readouterr().err == "shown\n"


def test_default_device_is_the_gpu_when_there_is_one():
    from llama2.utils import check_device, default_device

    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert check_device(None) == default_device()


def test_read_jsonl_numbers_lines_and_skips_blank_ones(tmp_path):
    from llama2.utils import read_jsonl

    f = tmp_path / "rows.jsonl"
    f.write_bytes(b'\xef\xbb\xbf{"a": 1}\n\n{"a": 2}\n')
    assert list(read_jsonl(f)) == [(1, {"a": 1}), (3, {"a": 2})]


def test_guard_rows_name_the_file_and_line_of_an_unknown_category(tmp_path):
    from llama2.guard import guard_rows

    f = tmp_path / "guard.jsonl"
    f.write_text('{"messages": [{"role": "user", "content": "hi"}], "unsafe": true, "categories": ["O9"]}\n')
    with pytest.raises(ValueError, match=f"^{f}:1: unknown categories"):
        guard_rows(str(f), "train", 0, 0)


