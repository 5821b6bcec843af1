"""Token counting: offline tokenizers, prompt and completion counts, prices."""
