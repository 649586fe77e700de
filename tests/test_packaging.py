"""The installed package: one top-level import name, and `kernels` (a PyPI package transformers
imports) left alone."""
import subprocess
import sys


def test_kernels_folder_is_not_a_top_level_package(tmp_path):
    # run outside the repository, whose root folder would otherwise be on sys.path
    code = ("import importlib.util, peft_ops, peft_ops.kernels as k; spec = importlib.util.find_spec('kernels');"
            "print(spec.origin if spec else None); print(k.__name__)")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    origin, name = result.stdout.split()
    assert name == "peft_ops.kernels"
    assert origin == "None" or "peft" not in origin  # absent, or the PyPI package: never our folder
