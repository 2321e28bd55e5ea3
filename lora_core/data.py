"""Training data: alpaca records and Chinese-Vicuna chats (prompt templates, labels with the prompt masked,
EOS always learned), raw text for continued pretraining (documents joined with EOS, packed into blocks, every
token learned), and bad records reported by file and line."""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

IGNORE = -100  # label of tokens that are not trained on (PyTorch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Template:
    """alpaca-lora's template format; chat templates add a preamble and per-turn wrappers."""

    name: str
    prompt_input: str = ""
    prompt_no_input: str = ""
    response_split: str = "### Response:"
    chat_pre: str = ""
    chat_turn: str = "User:{input}\n\nAssistant:"  # the user's turn, up to where the assistant answers
    chat_sep: str = "\n\n"  # after each assistant answer
    stop: tuple[str, ...] = ("### Instruction:",)  # where generation stops by default: the next prompt

    def prompt(self, instruction: str, input: str = "") -> str:
        if input:
            return self.prompt_input.format(instruction=instruction, input=input)
        return self.prompt_no_input.format(instruction=instruction)

    def chat_prompt(self, history: list[tuple[str, str]], message: str) -> str:
        """A conversation rendered as training renders chat records, ending where the assistant answers."""
        text = self.chat_pre
        for user, answer in history:
            text += self.chat_turn.format(input=user) + answer + self.chat_sep
        return text + self.chat_turn.format(input=message)

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings in a chat: the template's, plus the start of the user's next turn."""
        return self.stop + (self.chat_turn.split("{input}")[0].strip(),)


# alpaca-lora's templates/alpaca.json and alpaca_short.json, word for word
ALPACA = Template(
    "alpaca",
    prompt_input="Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n"
    "{input}\n\n### Response:\n",
    prompt_no_input="Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n",
)
ALPACA_SHORT = Template(
    "alpaca_short",
    prompt_input="### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n",
    prompt_no_input="### Instruction:\n{instruction}\n\n### Response:\n",
)
# Chinese-Vicuna's chat prompt (chat_prompt in its prompt.py); alpaca records use the alpaca wording
VICUNA_CHAT = Template(
    "vicuna_chat",
    prompt_input=ALPACA.prompt_input,
    prompt_no_input=ALPACA.prompt_no_input,
    response_split="Assistant:",
    chat_pre="The following is a conversation between an AI assistant called Assistant and a human user called User. "
    "The assistant is intelligent, knowledgeable and polite to answer questions of user.\n\n",
)
TEMPLATES = {t.name: t for t in (ALPACA, ALPACA_SHORT, VICUNA_CHAT)}


def load_template(name_or_path: str) -> Template:
    """A built-in name, or a JSON file in alpaca-lora's format (prompt_input, prompt_no_input, response_split)."""
    if name_or_path in TEMPLATES:
        return TEMPLATES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(f"template {name_or_path!r}: not one of {', '.join(TEMPLATES)} and no such file")
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
        return Template(path.stem, spec["prompt_input"], spec["prompt_no_input"],
                        spec.get("response_split", "### Response:"))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a template ({type(e).__name__}: {e}); it needs prompt_input and "
                         "prompt_no_input strings with {instruction} and {input}") from e


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def n_targets(self) -> int:
        """Tokens the loss is taken on: labels after the first position (nothing predicts position 0)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class DataReport:
    """What happened to the records: kept, truncated, dropped, and why."""

    kept: int = 0
    documents: int = 0  # raw-text documents, packed into `blocks` of the examples kept
    blocks: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    bad: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def summary(self) -> str:
        raw = f" ({self.blocks} blocks of raw text from {self.documents} documents)" if self.documents else ""
        return (f"{self.kept} examples kept{raw}, {self.truncated} truncated to the cutoff, {self.dropped_too_long} "
                f"dropped (prompt fills the cutoff), {len(self.bad)} bad records skipped")


ACCEPTED = ("alpaca records {instruction, input, output}, Chinese-Vicuna chats {input: [turns], output: [turns]} or "
            "raw text records {text}, as a JSON list or JSON lines, or raw text as .txt files")
TEXT_SUFFIXES = (".txt", ".md")  # a file of these is one raw-text document
PLACEHOLDER = re.compile(r"\{\{\s*\w+\s*\}\}")  # {{name}}: a template field someone forgot to fill in


def read_text(path: str | Path, what: str = "data file") -> str:
    """A UTF-8 text file (BOM allowed), with one-line errors naming the file (and line) for what goes wrong."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: a directory, not a {what}; pass the file(s) inside it")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} not found")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}); re-save the "
                         "file as UTF-8") from None


def _json(text: str):
    try:
        return json.loads(text)
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply to be a record", text, 0) from None


def read_records(path: str | Path) -> list[tuple[str, dict | object]]:
    """(where, record) pairs from a JSON list or JSON lines; `where` is 'file:line' for the messages."""
    path = Path(path)
    text = read_text(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        raise ValueError(f"{path}: plain text, not JSON records; give alpaca records as a JSON list or JSON lines "
                         "(train.py also takes .txt files, as raw text for continued pretraining)")
    if text.lstrip().startswith("["):
        try:
            rows = _json(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{e.lineno}: malformed JSON ({e.msg}); fix the file or convert it to JSON "
                             "lines") from e
        return [(f"{path}:record {i + 1}", r) for i, r in enumerate(rows)]
    out = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", _json(line)))
        except json.JSONDecodeError as e:
            out.append((f"{path}:{lineno}", ValueError(f"not JSON ({e.msg})")))
    return out


def format_of(record) -> str | None:
    """The name of a record format we do not train on, recognised by its keys, else None."""
    if not isinstance(record, dict):
        return None
    keys = set(record)
    if {"chosen", "rejected"} <= keys:
        return "preference data (chosen/rejected pairs, for DPO or reward models)"
    if keys & {"messages", "conversations"}:
        return "chat messages in OpenAI/ShareGPT form (messages or conversations lists)"
    return None


def is_raw_text(record) -> bool:
    """A {text} record of continued-pretraining data (and not an instruction record that happens to hold a text)."""
    return isinstance(record, dict) and "text" in record and not record.keys() & {"instruction", "output", "input"}


def document_of(record) -> str:
    """The document of a raw-text record; raises ValueError with what is wrong."""
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError("a raw-text record needs a 'text' string")
    if not record["text"].strip():
        raise ValueError("empty 'text'")
    return record["text"]


def pack_documents(documents: list[str], tokenizer, cutoff_len: int) -> list[Example]:
    """Documents as one token stream (each opened with BOS when the tokenizer adds one, closed with EOS), cut
    into blocks of cutoff_len tokens that overlap by one: every token but the first is predicted exactly once
    (a block's first token is the last of the block before, which nothing in that block predicts)."""
    stream = [i for doc in documents for i in tokenizer.encode(doc, eos=True)]
    step = cutoff_len - 1
    blocks = [stream[s:s + cutoff_len] for s in range(0, len(stream) - 1, step)]
    return [Example(b, list(b)) for b in blocks]


def read_file(path: str | Path) -> tuple[list[str] | None, list]:
    """(raw-text documents, []) for a .txt file (one document); ([], records) for JSON / JSON lines, whose first
    records that parse decide: all {text} records make a raw-text file (documents_of), else (None, records)."""
    path = Path(path)
    if path.suffix.lower() in TEXT_SUFFIXES:
        text = read_text(path)
        if not text.strip():
            raise ValueError(f"{path}: an empty text file; remove it from --data")
        return [text], []
    records = read_records(path)
    head = [r for _, r in records if not isinstance(r, Exception)][:20]
    return ([] if head and all(is_raw_text(r) for r in head) else None), records


def documents_of(records, strict: bool, report: DataReport) -> list[str]:
    """The documents of raw-text records; bad ones skipped and reported (or fatal with strict)."""
    documents = []
    for where, record in records:
        try:
            documents.append(document_of(record))
        except ValueError as e:
            if strict:
                raise ValueError(f"{where}: {e} (drop --strict to skip bad records)") from None
            report.bad.append(f"{where}: {e}")
    return documents


def texts_of(paths) -> list[str]:
    """Every text a file holds (instructions, inputs and outputs, chat turns, raw documents), bad records skipped:
    what vocabulary extension learns new tokens from."""
    texts = []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        documents, records = read_file(path)
        if documents is not None:
            texts += documents + documents_of(records, False, DataReport())
            continue
        for _, record in records:
            if isinstance(record, dict):
                fields = [record.get(k) for k in ("instruction", "input", "output")]
                fields = [x for f in fields for x in (f if isinstance(f, list) else [f])]  # chats: lists of turns
                texts += [f for f in fields if isinstance(f, str) and f.strip()]
    return texts


def segments_of(record, template: Template) -> list[tuple[str, bool]]:
    """(text, supervised) pieces of one record; raises ValueError with what is wrong."""
    if isinstance(record, Exception):
        raise record
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    if isinstance(record.get("input"), list):  # Chinese-Vicuna chat: one output per user turn
        turns, answers = record["input"], record.get("output")
        if not isinstance(answers, list) or len(answers) != len(turns) or not turns:
            raise ValueError("a chat record needs 'input' and 'output' lists of the same, non-zero length")
        if not all(isinstance(t, str) for t in turns + answers):
            raise ValueError("chat turns must be strings")
        pieces = []
        for i, (user, answer) in enumerate(zip(turns, answers)):
            lead = (template.chat_pre if i == 0 else template.chat_sep) + template.chat_turn.format(input=user)
            pieces += [(lead, False), (answer, True)]
        return pieces
    instruction, inp, output = record.get("instruction"), record.get("input", ""), record.get("output")
    if not isinstance(instruction, str) or not instruction.strip():
        raise ValueError("missing or empty 'instruction' string")
    if inp is None:
        inp = ""
    if not isinstance(inp, str):
        raise ValueError(f"'input' must be a string, got {type(inp).__name__}")
    if not isinstance(output, str) or not output.strip():
        raise ValueError("missing or empty 'output' string")
    return [(template.prompt(instruction, inp), False), (output, True)]


def encode_segments(segments, tokenizer, cutoff_len: int, train_on_inputs: bool) -> tuple[Example | None, bool]:
    """Token ids of the whole text with labels; EOS appended and learned unless the cutoff cuts the text
    (alpaca-lora's rule: a cut answer has not ended).

    The text is tokenized whole (so ids equal what inference sees); segment boundaries are found by
    tokenizing each prefix of the text, as alpaca-lora did for its prompt. Returns (example or None if
    no target token survives the cutoff, whether it was truncated).
    """
    text = "".join(t for t, _ in segments)
    ids = tokenizer.encode(text)
    labels = list(ids)
    end, start_tok = 0, 0
    for piece, supervised in segments:
        end += len(piece)
        stop_tok = len(tokenizer.encode(text[:end])) if end < len(text) else len(ids)
        if not supervised and not train_on_inputs:
            labels[start_tok:stop_tok] = [IGNORE] * (stop_tok - start_tok)
        start_tok = stop_tok
    truncated = len(ids) + 1 > cutoff_len
    if truncated:  # the text goes on: no EOS to learn here (it would teach stopping mid-answer at the cutoff)
        ids, labels = ids[:cutoff_len], labels[:cutoff_len]
    else:
        ids, labels = ids + [tokenizer.eos_id], labels + [tokenizer.eos_id]
    if all(label == IGNORE for label in labels[:-1]) and not train_on_inputs:
        return None, truncated  # the prompt fills the cutoff: at most one token would be learned
    return Example(ids, labels), truncated


def load_examples(paths, tokenizer, template: Template, cutoff_len: int = 256, train_on_inputs: bool = False,
                  strict: bool = False) -> tuple[list[Example], DataReport]:
    """Every record of every file, encoded; bad records skipped and counted (or fatal with strict). Raw-text files
    (.txt, {text} records) may be mixed in: their documents are packed into blocks after the records."""
    if tokenizer.eos_id is None:
        raise ValueError(f"{tokenizer.path}: the tokenizer has no EOS token; training could never learn to stop")
    report, examples, placeholders, documents = DataReport(), [], [], []
    for path in [paths] if isinstance(paths, (str, Path)) else paths:
        raw, records = read_file(path)
        if raw is not None:
            documents += raw + documents_of(records, strict, report)
            continue
        for where, record in records:
            try:
                segments = segments_of(record, template)
            except ValueError as e:
                kind = format_of(record)
                if kind and all(format_of(r) == kind for _, r in records[:20]):
                    raise ValueError(f"{path}: the records are {kind}, which train.py does not train on; it takes "
                                     f"{ACCEPTED}") from None
                if strict:
                    raise ValueError(f"{where}: {e} (drop --strict to skip bad records)") from None
                report.bad.append(f"{where}: {e}")
                continue
            found = PLACEHOLDER.search("".join(text for text, _ in segments))
            if found:
                placeholders.append((where, found.group()))
            example, truncated = encode_segments(segments, tokenizer, cutoff_len, train_on_inputs)
            report.truncated += truncated
            if example is None:
                report.dropped_too_long += 1
            else:
                examples.append(example)
    if documents:
        blocks = pack_documents(documents, tokenizer, cutoff_len)
        examples += blocks
        report.documents, report.blocks = len(documents), len(blocks)
    report.kept = len(examples)
    if placeholders:
        where, field_ = placeholders[0]
        report.warnings.append(f"{len(placeholders)} records hold {{{{name}}}}-style placeholders (first: {field_} at "
                               f"{where}); they will be learned literally: fill them in before training")
    if not examples:
        raise ValueError(f"no usable examples in {paths}: {report.summary()}")
    return examples, report


def split_validation(examples: list[Example], val_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A count (>= 1) or a fraction (< 1) of the examples, chosen with the seed, held out for evaluation."""
    n = int(val_size) if val_size >= 1 else int(round(val_size * len(examples)))
    if n <= 0:
        return examples, []
    if n >= len(examples):
        raise ValueError(f"--val-size {val_size} leaves no training examples out of {len(examples)}; lower it")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    held = set(order[:n])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def show_example(example: Example, tokenizer) -> str:
    """The example as the model sees it, with the masked (not trained) part in [[...]]."""
    out, run, masked = [], [], None
    for tok_id, label in zip(example.input_ids + [None], example.labels + [None]):
        is_masked = label == IGNORE
        if tok_id is None or (run and is_masked != masked):
            text = tokenizer.decode(run)
            out.append(f"[[{text}]]" if masked else text)
            run = []
        run.append(tok_id)
        masked = is_masked
    return "".join(out)
