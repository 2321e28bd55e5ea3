"""The JSONL file generate.py --input-file writes: answers appended (and flushed) to a hidden .partial file
as they come, renamed to the output name only when every record is answered; an interrupted run keeps its
answers, and a rerun with resume continues after them. The output never replaces its own input or an
existing file unless told to."""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path


class AnswerFile:
    def __init__(self, out: str | Path, source: str | Path, force: bool = False, resume: bool = False):
        self.out = Path(out)
        if self.out.resolve() == Path(source).resolve():
            raise ValueError(f"{self.out}: the output file is the input file; the answers would replace the "
                             "questions: choose another --output-file")
        if self.out.is_dir():
            raise IsADirectoryError(f"{self.out}: a directory; --output-file names a .jsonl file")
        if self.out.exists() and not force:
            raise FileExistsError(f"{self.out}: already exists; pass --force to replace it or choose another "
                                  "--output-file")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.partial = self.out.with_name(f".{self.out.name}.partial")
        self.done: list[dict] = self._read_partial() if resume else []
        if not resume:
            self.partial.unlink(missing_ok=True)
        self._file = None

    def _read_partial(self) -> list[dict]:
        """Rows already answered by an interrupted run (a torn last line is dropped)."""
        if not self.partial.is_file():
            return []
        rows = []
        lines = self.partial.read_text(encoding="utf-8", errors="replace").splitlines()
        for i, line in enumerate(lines, 1):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i == len(lines):
                    break  # cut off mid-write
                raise ValueError(f"{self.partial}:{i}: not an answer row; delete the file to start over") from None
        with open(self.partial, "w", encoding="utf-8") as f:  # rewrite without a torn line
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        return rows

    def check_same_questions(self, records: list[dict]):
        """The partial answers must belong to these records, in order."""
        for i, (row, record) in enumerate(zip(self.done, records)):
            if row.get("instruction") != record.get("instruction"):
                raise ValueError(f"{self.partial}: answer {i + 1} is for {row.get('instruction')!r}, but the input's "
                                 f"record {i + 1} asks {record.get('instruction')!r}; delete it or drop --resume")
        if len(self.done) > len(records):
            raise ValueError(f"{self.partial}: holds {len(self.done)} answers for {len(records)} records; delete it "
                             "or drop --resume")

    def add(self, row: dict):
        if self._file is None:
            self._file = open(self.partial, "a", encoding="utf-8")  # noqa: SIM115 (closed in finish/close)
        try:
            self._file.write(json.dumps(row, ensure_ascii=False) + "\n")
            self._file.flush()  # an interruption loses at most the answer being written
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise OSError(f"{self.partial}: the disk filled up while writing an answer; the answers before it are "
                          "kept there: free some space and rerun with --resume") from e

    def close(self):
        if self._file is not None:
            self._file.close()
            self._file = None

    def finish(self):
        self.close()
        if not self.partial.exists():
            self.partial.write_text("")
        os.replace(self.partial, self.out)
