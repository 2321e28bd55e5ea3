"""generate.py: talk to a base model plus a LoRA adapter (or a merged export).

    python generate.py --adapter lora-out --prompt "Who are you?"
    python generate.py --adapter lora-out --input-file questions.json --output-file answers.jsonl
    python generate.py --adapter lora-out --interactive
    python generate.py --adapter lora-out --serve          # chat page + OpenAI-compatible API on 127.0.0.1:7860
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tqdm import tqdm

from lora_core import server
from lora_core.answers import AnswerFile
from lora_core.api import base_of, check_base_dtype, load
from lora_core.batch_generation import generate_batch
from lora_core.chat import Conversation
from lora_core.data import load_template, read_records
from lora_core.generation import generate
from lora_core.kernels import dispatch
from lora_core.sampling import Sampling

COMMANDS = "/reset starts a new conversation, /quit (or Ctrl-D) leaves"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Generate with a base model and an optional LoRA adapter.")
    p.add_argument("--base", default=None, help="model dir, .gguf or smollm2-135m (default: the adapter's own base)")
    p.add_argument("--adapter", default=None, help="a PEFT-format LoRA adapter directory (ours or PEFT's)")
    p.add_argument("--base-dtype", default="int8", help="base weight precision: int8, int4 (group-wise 4-bit, CPU), "
                   "bf16 or fp32")
    p.add_argument("--compile", action="store_true", help="compile the one-token decode step with torch.compile "
                   "(paid once per process, printed on stderr; eager if compiling fails)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the float base weights before "
                   "quantizing: decodes at the base's speed (merged int8 is close to unmerged, not bit-identical)")
    p.add_argument("--template", default=None, help="prompt template (default: the adapter's training template, "
                   "else alpaca)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, with no template")
    p.add_argument("--prompt", default=None, help="one instruction; the response alone goes to stdout")
    p.add_argument("--input", default=None, help="the alpaca input field for --prompt")
    p.add_argument("--input-file", default=None, help="alpaca JSON / JSONL records to answer in turn")
    p.add_argument("--output-file", default=None, help="JSONL of the records with their responses (with --input-file)")
    p.add_argument("--batch-size", type=int, default=8, help="--input-file records answered together, left-padded "
                   "(greedy answers are those of batch size 1)")
    p.add_argument("--force", action="store_true", help="replace an existing --output-file")
    p.add_argument("--resume", action="store_true", help="continue an interrupted --input-file run: records "
                   "already answered are skipped")
    p.add_argument("--interactive", action="store_true", help=f"chat; {COMMANDS}")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy decoding")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens (default 40, 0 off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.9, 1 off)")
    p.add_argument("--repetition-penalty", type=float, default=1.1, help="> 1 discourages repeating context tokens")
    p.add_argument("--max-new-tokens", type=int, default=256, help="upper bound on the response length")
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable; default: the "
                   "template's next '### Instruction:')")
    p.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--int8-path", default=None, help="force the int8 kernels: dequant, gemv, weight_only, int_mm, "
                   "or forward=NAME (default: measured for this CPU)")
    server.add_arguments(p)
    return p.parse_args(argv)


def check_args(a: argparse.Namespace) -> list[str]:
    """Refuse combinations that cannot apply together; return warnings for settings that do nothing
    (Sampling.check adds those about the decoding filters)."""
    modes = [m for m, on in (("--prompt", a.prompt is not None), ("--input-file", a.input_file),
                             ("--interactive", a.interactive), ("--serve", a.serve)) if on]
    if len(modes) != 1:
        raise ValueError(f"choose one of --prompt, --input-file, --interactive or --serve (got "
                         f"{', '.join(modes) or 'none'})")
    if a.merge and not a.adapter:
        raise ValueError("--merge folds an adapter into the base weights: give --adapter too, or drop --merge")
    if a.input is not None and a.prompt is None:
        raise ValueError("--input is the alpaca input field of --prompt; give --prompt too")
    if (a.output_file or a.resume or a.force) and not a.input_file:
        raise ValueError("--output-file, --force and --resume go with --input-file")
    if a.input_file and not a.output_file:
        raise ValueError("--input-file needs --output-file for the responses")
    if a.raw and (a.template or a.input is not None or a.interactive or a.input_file or a.serve):
        raise ValueError("--raw sends --prompt as is: it cannot go with --template, --input, --input-file, "
                         "--interactive or --serve (the server's /v1/completions takes raw prompts)")
    if a.serve:
        server.check_arguments(a)
        if a.compile:
            raise ValueError("--compile applies to --prompt, --input-file and --interactive; --serve decodes eagerly")
    if a.batch_size < 1:
        raise ValueError(f"--batch-size {a.batch_size}: must be at least 1")
    if a.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {a.max_new_tokens}: must be at least 1")
    if a.temperature == 0 and a.seed is not None:
        return ["--temperature 0 is greedy decoding: --seed has no effect"]
    return []


def sampling_of(a: argparse.Namespace) -> Sampling:
    greedy = a.temperature == 0
    top_k = a.top_k if a.top_k is not None else (0 if greedy else 40)
    top_p = a.top_p if a.top_p is not None else (1.0 if greedy else 0.9)
    s = Sampling(a.temperature, top_k, top_p, a.repetition_penalty)
    for w in s.check():  # warns about filters given with greedy decoding
        print(f"generate.py: warning: {w}", file=sys.stderr)
    return s


def trained_template(adapter: str | None) -> str:
    """The template the adapter was trained with (training_args.json beside it), else alpaca."""
    args = Path(adapter) / "training_args.json" if adapter else None
    if args and args.is_file():
        try:
            return json.loads(args.read_text(encoding="utf-8")).get("template", "alpaca")
        except json.JSONDecodeError:
            pass
    return "alpaca"


def questions(path) -> list[dict]:
    """The alpaca records of --input-file; bad ones reported by file:line and skipped."""
    good, bad = [], 0
    for where, r in read_records(path):
        if isinstance(r, Exception) or not isinstance(r, dict) or not isinstance(r.get("instruction"), str):
            print(f"{where}: skipped: not an alpaca record with an 'instruction' string", file=sys.stderr)
            bad += 1
            continue
        good.append(r)
    if bad:
        print(f"{path}: {bad} bad records skipped", file=sys.stderr)
    if not good:
        raise ValueError(f"{path}: no alpaca record with an 'instruction' string to answer")
    return good


def answer_file(model, tok, template, a, sampling, stop, records: list[dict], out: AnswerFile) -> int:
    out.check_same_questions(records)
    if out.done:
        print(f"resuming: {len(out.done)} of {len(records)} records already answered in {out.partial}",
              file=sys.stderr)
    todo = records[len(out.done):]
    try:
        with tqdm(total=len(todo), desc="generating", unit="record", file=sys.stderr) as bar:
            for b in range(0, len(todo), a.batch_size):
                batch = todo[b:b + a.batch_size]
                ids = [tok.encode(template.prompt(r["instruction"], r.get("input") or "")) for r in batch]
                for r, g in zip(batch, generate_batch(model, tok, ids, sampling, a.max_new_tokens, stop, a.seed,
                                                            compile=a.compile)):
                    out.add({**r, "response": g.text.strip()})
                bar.update(len(batch))
    except KeyboardInterrupt:
        out.close()
        print(f"\ngenerate.py: interrupted; the answers so far are in {out.partial}: rerun with --resume to "
              "continue", file=sys.stderr)
        return 130
    out.finish()
    print(f"{len(records)} responses written to {out.out}", file=sys.stderr)
    return 0


def chat(model, tok, template, a, sampling, stop) -> int:
    conv = Conversation(tok, template, model.args.max_seq_len, a.max_new_tokens)
    print(f"chatting with the {template.name} template; {COMMANDS}", file=sys.stderr)
    while True:
        try:
            message = input("User: ").strip()
        except EOFError:
            print()
            return 0
        if message in ("/quit", "/exit"):
            return 0
        if message == "/reset":
            conv.reset()
            print("(new conversation)", file=sys.stderr)
            continue
        if not message:
            continue
        trimmed = conv.trimmed
        ids = conv.prompt_ids(message)
        if conv.trimmed > trimmed:
            print(f"(the oldest {conv.trimmed - trimmed} turns were dropped to fit the context)", file=sys.stderr)
        print("Assistant: ", end="", flush=True)
        g = generate(model, tok, ids, sampling, a.max_new_tokens, stop, a.seed,
                     on_text=lambda t: print(t, end="", flush=True), compile=a.compile)
        print()
        print(f"[{g.speed()}]", file=sys.stderr)
        conv.add(message, g.text.strip())


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        for w in check_args(a):
            print(f"generate.py: warning: {w}", file=sys.stderr)
        sampling = sampling_of(a)
        check_base_dtype(a.base_dtype)
        template = None if a.raw else load_template(a.template or trained_template(a.adapter))
        base = base_of(a.base, a.adapter)
        if a.int8_path:
            dispatch.force(a.int8_path)
        records = out = None
        if a.input_file:  # the questions and the output are checked before the model loads
            records = questions(a.input_file)
            out = AnswerFile(a.output_file, a.input_file, force=a.force, resume=a.resume)
        model, tok = load(base, dtype=a.base_dtype, adapter=a.adapter, device=a.device, merge=a.merge)
        stop = tuple(a.stop) if a.stop is not None else (
            () if template is None else template.chat_stop if a.interactive else template.stop)
        if a.serve:
            return server.serve(model, tok, template, a, stop)
        if a.input_file:
            return answer_file(model, tok, template, a, sampling, stop, records, out)
        if a.interactive:
            return chat(model, tok, template, a, sampling, stop)
        text = a.prompt if template is None else template.prompt(a.prompt, a.input or "")
        g = generate(model, tok, tok.encode(text), sampling, a.max_new_tokens, stop, a.seed,
                     on_text=lambda t: print(t, end="", flush=True), compile=a.compile)
        print()
        print(g.speed(), file=sys.stderr)
        return 0
    except (ValueError, OSError) as e:
        print(f"generate.py: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
