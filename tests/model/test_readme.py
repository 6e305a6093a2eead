"""The README's API snippet runs as written, and the README stays what it promises (size, line length, the two
commands CI reads)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"


def _api_snippet() -> str:
    text = README.read_text()
    api = text[text.index("## API"):]
    m = re.search(r"```python\n(.*?)```", api, re.S)
    assert m, "README's API section has no python block"
    return m.group(1)


@pytest.mark.timeout(600)
def test_api_snippet_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no checkpoint file here: the snippet's random-weights path
    scope = {}
    exec(compile(_api_snippet(), "README.md:API", "exec"), scope)
    assert "{'msca': 13, 'ham': 1, 'block': 13, 'conv1x1': 5, 'resize': 2, 'norm': 4, 'embed': 4, 'group_norm': 3, 'head': 1}" \
        in capsys.readouterr().out
    assert tuple(scope["logits"].shape) == (1, 150, 512, 640) and tuple(scope["classes"].shape) == (1, 512, 640)
    assert all(m.backend == "auto" for m in scope["model"].modules() if hasattr(m, "backend"))


def test_readme_shape():
    text = README.read_text()
    assert len(text) <= 10_500, len(text)
    assert max(len(line) for line in text.splitlines()) <= 200
    for marker in ("<!-- ci:install -->", "<!-- ci:test -->", "docs/benchmarks.md"):
        assert marker in text
