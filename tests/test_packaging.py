"""The repository root shadows no distribution's package: `kernels` (on PyPI: Hugging Face's kernel hub,
which transformers imports) and `bench` (an unrelated PyPI package) must resolve to those packages, or to
nothing, never to folders of this repository; and the installed Triton kernels are `peft_ops.kernels`."""
import importlib.util
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE = ("import importlib.util, peft_ops, peft_ops.kernels as k\n"
        "for name in ('kernels', 'bench'):\n"
        "    spec = importlib.util.find_spec(name)\n"
        "    print(name, spec.origin if spec and spec.origin else None)\n"
        "print('installed', k.__name__)\n")


def _run(code: str, cwd: str, home) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("where", ["outside", "repository root"])
def test_no_root_folder_shadows_a_distribution(where, tmp_path):
    # `python -c` puts its working directory first on sys.path: from the root, every root folder is importable
    result = _run(CODE, ROOT if where == "repository root" else str(tmp_path), tmp_path)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["installed"] == "peft_ops.kernels"
    for name in ("kernels", "bench"):
        assert lines[name] == "None" or not lines[name].startswith(os.path.join(ROOT, name)), (name, lines[name])


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None or importlib.util.find_spec("peft") is None,
                    reason="the integration extra (transformers, peft) is not installed")
def test_transformers_and_peft_import_from_the_repository_root(tmp_path):
    result = _run("import transformers, peft, peft_ops; import transformers.integrations.hub_kernels", ROOT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
