import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "fixtures"
LLAMA = FIXTURES / "tiny-llama"
GPT2 = FIXTURES / "tiny-gpt2"
LLAMA_ADAPTERS = ["llama-lora", "llama-rslora", "llama-patterns", "llama-dora", "llama-embed", "llama-mts"]
GPT2_ADAPTERS = ["gpt2-lora", "gpt2-bias"]
ADAPTERS = LLAMA_ADAPTERS + GPT2_ADAPTERS
CHECKPOINTS = ["tiny-llama", "tiny-llama-tuned", "tiny-gpt2", "tiny-gpt2-tuned"]

torch.set_num_threads(min(2, os.cpu_count() or 1))


def base_of(adapter: str) -> Path:
    return LLAMA if adapter.startswith("llama") else GPT2


def run_cli(*args, expect: int | None = 0):
    """Invoke the CLI in-process the way a user would; assert the exit code when `expect` is given."""
    from loratools.cli import cli

    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if expect is not None:
        assert result.exit_code == expect, (result.exit_code, result.stdout, result.stderr)
    return result


def tree_digest(path: Path) -> dict[str, str]:
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path.parent if path.is_file() else path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in files}


@pytest.fixture
def copy_fixture(tmp_path):
    def _copy(name: str) -> Path:
        dst = tmp_path / name
        shutil.copytree(FIXTURES / name, dst)
        return dst

    return _copy
