"""The command-line programs: lora-train, lora-generate, lora-export (train.py, generate.py and export.py
at the top of a checkout are thin shims onto these)."""
