"""The README's Python code runs as written (offline, on a CPU), so it cannot rot."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_python_code_runs_as_written(tmp_path, monkeypatch, capsys):
    blocks = python_blocks()
    assert blocks, "the README has no Python code"
    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    namespace: dict = {"__name__": "__readme__"}
    try:
        for number, block in enumerate(blocks, 1):
            exec(compile(block, f"README.md (Python block {number})", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    # The quickstart's pruned model lands on its budget and keeps the accuracy of the model it came from.
    import hiap

    vit, pruned = namespace["vit"], namespace["pruned"]
    assert abs(hiap.count_macs(pruned) / hiap.count_macs(vit) - 2 / 3) <= 0.01 * 2 / 3
    assert namespace["accuracy"](pruned) >= namespace["dense_accuracy"] - 0.05
    assert "of the MACs" in capsys.readouterr().out
