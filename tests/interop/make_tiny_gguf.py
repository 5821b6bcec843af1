"""Write a tiny llama-architecture GGUF model with random weights, for llama.cpp's server.

Run with the llama-cpp-python environment's Python (it has `gguf` and `numpy`), not the
test venv's: `python make_tiny_gguf.py OUT.gguf`. Nothing is downloaded.

The model is 2 blocks of 64 dimensions over a vocabulary of 573 pieces (a
SentencePiece-style `llama` tokenizer: <unk>, <s>, </s>, the 256 byte pieces, printable ASCII,
and a few words with every prefix of each, so prompts tokenize into something). Every weight
is random and small except for one planted chain: the embedding of word i has a large
component on dimension i and the output matrix maps that dimension to word i+1 (and every
other token to word 0). Greedy decoding (temperature 0) then writes the words in order, with
a margin no rounding can flip, so two identical calls give identical text, and the text never
reaches an end-of-sequence token: a call ends at its `max_tokens` with finish_reason "length".
Two of the words are not ASCII, so the stream carries multi-byte UTF-8.
"""

from __future__ import annotations

import sys

import gguf
import numpy as np

WORDS = [
    "hello", "from", "a", "tiny", "random", "model", "that", "the", "gateway", "meters",
    "every", "token", "it", "relays", "to", "you", "and", "bills", "each", "account",
    "in", "micro", "units", "so", "nothing", "is", "lost", "or", "counted", "twice",
    "café", "日本",
]  # fmt: skip
DIM = 64
BLOCKS = 2
HEADS = 4
FFN = 128
CONTEXT = 2048
SPACE = "\u2581"  # SentencePiece's word-start mark


def vocabulary() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    pieces: list[str] = [SPACE]
    pieces += [chr(c) for c in range(33, 127)]
    for word in WORDS:
        for end in range(1, len(word) + 1):
            pieces += [word[:end], SPACE + word[:end]]
    seen = set(tokens)
    for piece in pieces:
        if piece not in seen:
            seen.add(piece)
            tokens.append(piece)
            types.append(gguf.TokenType.NORMAL)
    # SentencePiece merges the pair whose result scores highest: longer pieces first.
    scores = [0.0] * 259 + [float(len(t)) for t in tokens[259:]]
    return tokens, scores, [int(t) for t in types]


def weights(tokens: list[str]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(13)
    vocab = len(tokens)

    def rand(*shape: int, std: float = 0.02) -> np.ndarray:
        return (rng.standard_normal(shape) * std).astype(np.float32)

    word_ids = [tokens.index(SPACE + w) for w in WORDS]
    embed = rand(vocab, DIM)
    output = rand(vocab, DIM)
    for i, tid in enumerate(word_ids):
        embed[tid, i] += 4.0
    other = len(WORDS)  # the dimension every non-word token shares
    for tid in range(vocab):
        if tid not in word_ids:
            embed[tid, other] += 4.0
    for i in range(len(WORDS)):
        output[word_ids[(i + 1) % len(WORDS)], i] = 1.0
    output[word_ids[0], other] = 1.0
    tensors = {
        "token_embd.weight": embed,
        "output_norm.weight": np.ones(DIM, dtype=np.float32),
        "output.weight": output,
    }
    for b in range(BLOCKS):
        tensors |= {
            f"blk.{b}.attn_norm.weight": np.ones(DIM, dtype=np.float32),
            f"blk.{b}.attn_q.weight": rand(DIM, DIM),
            f"blk.{b}.attn_k.weight": rand(DIM, DIM),
            f"blk.{b}.attn_v.weight": rand(DIM, DIM),
            f"blk.{b}.attn_output.weight": rand(DIM, DIM),
            f"blk.{b}.ffn_norm.weight": np.ones(DIM, dtype=np.float32),
            f"blk.{b}.ffn_gate.weight": rand(FFN, DIM),
            f"blk.{b}.ffn_up.weight": rand(FFN, DIM),
            f"blk.{b}.ffn_down.weight": rand(DIM, FFN),
        }
    return tensors


def write(path: str) -> None:
    tokens, scores, types = vocabulary()
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("interop-tiny-random")
    writer.add_context_length(CONTEXT)
    writer.add_embedding_length(DIM)
    writer.add_block_count(BLOCKS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(HEADS)
    writer.add_rope_dimension_count(DIM // HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    for name, array in weights(tokens).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


if __name__ == "__main__":
    write(sys.argv[1])
