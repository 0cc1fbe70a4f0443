"""The output folder of a run: every path ``hiap prune`` / ``hiap compare`` write, named in one place."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["RunFolder"]


@dataclass(frozen=True)
class RunFolder:
    """The files of one run under ``root`` (``hiap prune -o``, or one method, budget and seed of ``hiap compare``)."""

    root: Path

    # What a run leaves; a fresh run into a folder holding any of them would mix into someone else's results.
    OUTPUTS = ("checkpoint.pt", "log.jsonl", "pruned.safetensors", "report.md", "report.json", "result.json",
               "compare.json", "compare.md", "plots")

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def checkpoint(self) -> Path:
        """The training checkpoint (``--resume`` continues from it)."""
        return self.root / "checkpoint.pt"

    @property
    def log(self) -> Path:
        """One JSON line per logged step, epoch and event."""
        return self.root / "log.jsonl"

    @property
    def pruned(self) -> Path:
        """The pruned model (``hiap.load_pruned``)."""
        return self.root / "pruned.safetensors"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def result(self) -> Path:
        """A baseline's outcome in a comparison."""
        return self.root / "result.json"

    @property
    def compare_md(self) -> Path:
        return self.root / "compare.md"

    @property
    def compare_json(self) -> Path:
        return self.root / "compare.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def run(self, method: str, target: float, seed: int) -> "RunFolder":
        """The folder of one run of a comparison."""
        return RunFolder(self.root / f"{method}-t{target:.3f}-s{seed}")

    def earlier_outputs(self) -> list[str]:
        """What an earlier run left here: its outputs and the folders of a comparison's runs."""
        if not self.root.is_dir():
            return []
        found = sorted(name for name in self.OUTPUTS if (self.root / name).exists())
        return found + sorted(p.name for p in self.root.iterdir() if p.is_dir() and RunFolder(p).log.exists())
