"""metrics.jsonl (one line per optimizer step and per evaluation) and the loss-curve PNG."""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, resume_step: int = 0):
        self.path = path
        self.rows = []
        if resume_step and path.is_file():  # keep what the resumed run had logged up to its checkpoint
            self.rows = [r for r in self._read(path) if r.get("step", 0) <= resume_step]
        self._rewrite()

    @staticmethod
    def _read(path: Path) -> list[dict]:
        """The rows of metrics.jsonl; a torn last line (a kill during its write) is dropped, a bad line
        before it is an error naming the file and line."""
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        rows = []
        for i, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError("not an object")
                rows.append(row)
            except ValueError as e:
                if i == len(lines):
                    break  # written half when the run was killed
                raise ValueError(f"{path}:{i}: not a metrics row ({e}); delete the line or the file to resume") from e
        return rows

    def _rewrite(self):
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        os.replace(tmp, self.path)

    def add(self, **row):
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def plot(self, png: Path):
        """Train loss per step and eval loss per evaluation, written atomically."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        evals = [(r["step"], r["eval_loss"]) for r in self.rows if "eval_loss" in r]
        fig, ax = plt.subplots(figsize=(7, 4))
        if train:
            ax.plot(*zip(*train), label="train loss", lw=1)
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("cross-entropy per target token")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = png.with_name(png.stem + ".tmp.png")
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, png)
